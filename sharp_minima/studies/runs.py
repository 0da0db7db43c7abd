"""The run kit every study uses: derived run configs, run folders, training that records a
diverged run instead of retrying it, measurement caches, aggregation over seeds, and reading
back what a run logged.

A study composes these with the library's measurements; none of it is specific to a paper.

- `derive` — a run's config from the study's: a locked copy with dotted fields changed.
- `run_dir` — ``<workdir>/runs/<name>/...``, the one place run folders are named.
- `train_run` — `sharp_minima.train.train`, or the `Diverged` record of a run whose loss
  became NaN/Inf (written to ``diverged.json`` with the step; a later call returns the
  record and never trains that run again).
- `Cache` — named values (JSON) and arrays (``.npz``), each stored with the key it was
  computed under (everything the value depends on: the training step, the measurement's
  settings, the code's version); a value whose key changed is recomputed, the others are
  read back, so a study extended with a new setting computes only what is new.
- `aggregate` — mean, std, min and max over the seeds of each group of run records.
- `read_metrics`, `series`, `read_arrays` — a run's ``metrics.jsonl`` and ``arrays/``.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from sharp_minima import files, train

__all__ = [
    "Cache",
    "Diverged",
    "aggregate",
    "derive",
    "read_arrays",
    "read_metrics",
    "run_dir",
    "series",
    "train_run",
]


# ------------------------------------------------------------------------------ run configs


def derive(config, changes: dict[str, Any] | None = None, **fields) -> ml_collections.ConfigDict:
    """A locked copy of ``config`` with fields changed: ``changes`` by dotted path
    (``{"optim.learning_rate": 0.1}``), ``fields`` at the top level (``batch_size=32``).

    Args:
      config: the config.
      changes: ``{dotted path: value}``.
      **fields: top-level fields.

    Returns:
      A locked ``ml_collections.ConfigDict``.

    >>> import ml_collections
    >>> c = ml_collections.ConfigDict({"seed": 0, "optim": {"learning_rate": 0.1}})
    >>> d = derive(c, {"optim.learning_rate": 0.05}, seed=3)
    >>> (d.seed, d.optim.learning_rate, c.optim.learning_rate)
    (3, 0.05, 0.1)

    Raises:
      train.ConfigError: a path that names no field of ``config``.
    """
    out = copy.deepcopy(config)
    out.unlock()
    for dotted, value in {**(changes or {}), **fields}.items():
        *parents, leaf = dotted.split(".")
        node = out
        try:
            for p in parents:
                node = node[p]
            if leaf not in node:
                raise KeyError(leaf)
        except KeyError:
            raise train.ConfigError(f"derive: config has no field {dotted!r}") from None
        if isinstance(value, dict):
            value = ml_collections.ConfigDict(value)
        node[leaf] = value
    out.lock()
    return out


def run_dir(workdir: str, *parts) -> str:
    """``<workdir>/runs/<part>/<part>...``: the folder of one run of a study.

    Args:
      workdir: the study's folder.
      *parts: the run's name, in parts (e.g. regime and seed).

    Returns:
      The folder's path.
    """
    return os.path.join(workdir, "runs", *(str(p) for p in parts))


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class Diverged:
    """A run whose training loss became NaN/Inf: reported, never retried.

    Attributes:
      message: what happened (the trainer's message).
      step: the step where the loss became non-finite, if known.
    """

    message: str
    step: int | None = None


class NothingToReport(RuntimeError):
    """A study none of whose claims could be tested because its runs diverged (the message
    names them); its report and results are written all the same."""


def diverged_runs(workdir: str) -> list[dict]:
    """``[{"run", "step", "message"}]``: every run under ``workdir/runs`` that diverged
    (`train_run`'s ``diverged.json``), named by its folder below ``runs/``, in name order."""
    root = run_dir(workdir)
    out = []
    for folder, _, names in sorted(os.walk(root)):
        if "diverged.json" in names:
            with open(os.path.join(folder, "diverged.json")) as f:
                rec = json.load(f)
            out.append(
                {
                    "run": os.path.relpath(folder, root),
                    "step": rec.get("step"),
                    "message": rec.get("message", rec.get("error", "")),
                }
            )
    return out


def train_run(config, folder: str, *, log=print, label: str = "", **kwargs):
    """Trains one run into ``folder`` (resuming it), or returns its `Diverged` record.

    Args:
      config: the run's config, or a `sharp_minima.train.Setup` (validated once, with the
        data and model the study built).
      folder: the run's folder (`run_dir`).
      log, label: as for `sharp_minima.train.train`.
      **kwargs: the other arguments of `sharp_minima.train.train` (``tx``, ``hooks``,
        ``loss_fn``, ``data``, ``init_variables``).

    Returns:
      the `sharp_minima.train.TrainResult`, or `Diverged` when the loss became NaN/Inf now or
      in an earlier call (``diverged.json`` in ``folder``).
    """
    marker = os.path.join(folder, "diverged.json")
    if os.path.exists(marker):
        with open(marker) as f:
            rec = json.load(f)
        return Diverged(rec.get("message", rec.get("error", "")), rec.get("step"))
    try:
        return train.train(config, folder, log=log, label=label, **kwargs)
    except train.NonFiniteError as e:
        log(f"{label}diverged: {e}")
        out = Diverged(str(e), getattr(e, "step", None))
        if jax.process_index() == 0:
            files.write_json(marker, dataclasses.asdict(out))
        return out


# ------------------------------------------------------------------------------- caches


def _plain(x):
    """``x`` as JSON would give it back (tuples as lists, numpy as Python numbers)."""
    return json.loads(json.dumps(x, default=files.to_builtin))


class Cache:
    """Values computed once and kept under the key they depend on.

    ``path`` is a JSON file ``{name: {"key": key, "value": value}}``; arrays go to
    ``<path without .json>.<name>.npz`` beside it, their keys in the same JSON file. Every
    write is atomic and happens as soon as a value is computed, so an interrupted study keeps
    what it measured. Only process 0 writes.

    Args:
      path: the JSON file (its folder is created when needed).

    >>> import tempfile
    >>> cache = Cache(os.path.join(tempfile.mkdtemp(), "measure.json"))
    >>> cache.get("phi", {"eps": 1e-3, "step": 8}, lambda: 2.5)
    2.5
    >>> cache.get("phi", {"eps": 1e-3, "step": 8}, lambda: 1 / 0)  # read back
    2.5
    >>> cache.get("phi", {"eps": 5e-4, "step": 8}, lambda: 0.6)  # another key: recomputed
    0.6
    """

    def __init__(self, path: str):
        self.path = path
        self._entries: dict = {}
        if os.path.exists(path):
            with open(path) as f:
                self._entries = json.load(f)

    def _array_path(self, name: str) -> str:
        stem = self.path[: -len(".json")] if self.path.endswith(".json") else self.path
        return f"{stem}.{name}.npz"

    def _hit(self, name: str, key) -> bool:
        entry = self._entries.get(name)
        return entry is not None and entry.get("key") == _plain(key)

    def _store(self, name: str, key, value) -> None:
        self._entries[name] = {"key": _plain(key), "value": value}
        if jax.process_index() == 0:
            files.write_json(self.path, self._entries)

    def get(self, name: str, key, compute: Callable[[], Any]):
        """The value stored under ``name`` if it was computed under ``key``; else
        ``compute()``, stored (as JSON gives it back, so a first and a later call return
        equal values).

        Args:
          name: the value's name.
          key: what it depends on (JSON data); another key recomputes it.
          compute: ``() -> value`` (JSON data).

        Returns:
          The value.
        """
        if self._hit(name, key):
            return self._entries[name]["value"]
        value = _plain(compute())
        self._store(name, key, value)
        return value

    def arrays(self, name: str, key, compute: Callable[[], dict]) -> dict[str, np.ndarray]:
        """Like `get` for a dict of arrays (stored as ``.npz``).

        Args:
          name: the arrays' name.
          key: what they depend on (JSON data).
          compute: ``() -> {name: array}``.

        Returns:
          ``{name: numpy array}``.
        """
        path = self._array_path(name)
        if self._hit(name, key) and os.path.exists(path):
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
        value = {k: np.asarray(v) for k, v in compute().items()}
        if jax.process_index() == 0:
            buf = io.BytesIO()
            np.savez(buf, **value)
            files.write_atomic(path, buf.getvalue())
        self._store(name, key, os.path.basename(path))
        return value

    def names(self) -> list[str]:
        """The names stored so far.

        Returns:
          Sorted names.
        """
        return sorted(self._entries)


# ---------------------------------------------------------------------------- aggregation


def _number(v) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)


def aggregate(records: list[dict], by: str, *, exclude=("seed",)) -> dict:
    """Statistics over the records of each group (e.g. the seeds of one regime).

    The statistics of every numeric field of the records that did not diverge (``"diverged":
    True`` in the record); None and non-finite values are left out of a field's statistics
    and ``n`` says how many counted. Groups keep the order they first appear in.

    Args:
      records: one dict per run (fields, and ``"diverged": True`` for a diverged run).
      by: the field that names a run's group.
      exclude: fields left out of the statistics.

    Returns:
      ``{group: {"runs": n, "diverged": d, field: {"mean", "std", "min", "max", "n"}}}``.

    >>> recs = [{"regime": "sb", "seed": 0, "acc": 1.0}, {"regime": "sb", "seed": 1, "acc": 3.0},
    ...         {"regime": "lb", "seed": 0, "diverged": True}]
    >>> out = aggregate(recs, "regime")
    >>> out["sb"]["acc"], out["lb"]["diverged"]
    ({'mean': 2.0, 'std': 1.0, 'min': 1.0, 'max': 3.0, 'n': 2}, 1)
    """
    groups: dict[Any, list[dict]] = {}
    for r in records:
        groups.setdefault(r[by], []).append(r)
    out = {}
    for name, rs in groups.items():
        ok = [r for r in rs if not r.get("diverged")]
        stats: dict[str, Any] = {"runs": len(rs), "diverged": len(rs) - len(ok)}
        fields = [k for r in ok for k, v in r.items() if _number(v)]
        for field in dict.fromkeys(fields):
            if field in exclude or field == by:
                continue
            vals = [float(r[field]) for r in ok if _number(r.get(field))]
            vals = [v for v in vals if math.isfinite(v)]
            if vals:
                stats[field] = {
                    "mean": float(np.mean(vals)),
                    "std": float(np.std(vals)),
                    "min": float(np.min(vals)),
                    "max": float(np.max(vals)),
                    "n": len(vals),
                }
        out[name] = stats
    return out


# ------------------------------------------------------------------------- logged series


def read_metrics(folder: str) -> list[dict]:
    """The records of a run's ``metrics.jsonl`` (empty before the run has logged).

    Args:
      folder: the run's folder.

    Returns:
      A list of dicts.
    """
    return train.MetricsLog(os.path.join(folder, "metrics.jsonl")).records()


def series(records: list[dict], prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of a logged series: ``values`` is (T,) for one key ``prefix``
    (``"train/loss"``), or (T, k) for numbered keys ``prefix1 .. prefixk``
    (``"hessian/lambda_"``), over the records that hold it, by step.

    Args:
      records: `read_metrics`'s records.
      prefix: the key, or the prefix of numbered keys.

    Returns:
      ``(steps (T,), values (T,) or (T, k))``.

    >>> recs = [{"step": 4, "h/l_1": 3.0, "h/l_2": 1.0}, {"step": 0, "h/l_1": 2.0, "h/l_2": 0.5}]
    >>> series(recs, "h/l_")[1].tolist()
    [[2.0, 0.5], [3.0, 1.0]]
    """
    rows = {}
    for r in records:
        if prefix in r:
            rows[r["step"]] = r[prefix]
        elif f"{prefix}1" in r:
            vals, i = [], 1
            while f"{prefix}{i}" in r:
                vals.append(r[f"{prefix}{i}"])
                i += 1
            rows[r["step"]] = vals
    steps = np.asarray(sorted(rows), int)
    values = np.asarray([rows[s] for s in steps], float)
    if values.ndim == 1 and any(f"{prefix}1" in r for r in records):
        values = values.reshape(len(steps), -1)
    return steps, values


def read_arrays(folder: str, name: str) -> list[tuple[int, dict[str, np.ndarray]]]:
    """``[(step, arrays), ...]`` written by a hook with ``ctx.save_arrays(name, ...)`` in a
    run's folder, in step order.

    Args:
      folder: the run's folder.
      name: the arrays' name.

    Returns:
      ``[(step, {name: numpy array})]``.
    """
    where = os.path.join(folder, "arrays", name)
    if not os.path.isdir(where):
        return []
    out = []
    for f in sorted(os.listdir(where)):
        if f.endswith(".npz"):
            with np.load(os.path.join(where, f)) as z:
                out.append((int(f.split(".")[0]), {k: z[k] for k in z.files}))
    return out
