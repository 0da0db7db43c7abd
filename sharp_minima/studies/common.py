"""What every study shares besides its runs (`sharp_minima.studies.runs`): named key
streams, table cells, the claims table, and `write_outputs` — the one place a study's
report, results and figures are saved."""

from __future__ import annotations

import io
import os
import zlib
from collections.abc import Callable

import jax
import numpy as np

from sharp_minima import files, plotting


def key_streams(seed: int, *names: str) -> dict[str, jax.Array]:
    """Independent keys named after what they are for, from one root ``key(seed)``.

    Each stream is ``fold_in(key(seed), crc32(name))``: adding a stream never changes the
    others, and no stream coincides with ``jax.random.split(key(seed), n)``, which the trainer
    uses for its init/data/augmentation keys.

    >>> keys = key_streams(0, "subset", "sharpness")
    >>> sorted(keys), bool((jax.random.key_data(keys["subset"])
    ...                     != jax.random.key_data(keys["sharpness"])).any())
    (['sharpness', 'subset'], True)
    """
    root = jax.random.key(seed)
    return {n: jax.random.fold_in(root, zlib.crc32(n.encode()) & 0x7FFFFFFF) for n in names}


def mean_std(summary: dict, key: str, group, digits: int = 2) -> str:
    """``"mean ± std"`` (or ``"mean"`` for one run, ``"—"`` when absent) of a field of
    `sharp_minima.studies.runs.aggregate`'s summary, for a table cell."""
    stat = summary.get(group, {}).get(key)
    if not isinstance(stat, dict):
        return "—"
    mean, std = stat["mean"], stat["std"]
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if stat["n"] > 1 else f"{mean:.{digits}f}"


INLINE_SIZE = 64  # arrays up to this many numbers stay in results.json


def _move_arrays(obj, path: str, arrays: dict):
    """``obj`` with every array of more than `INLINE_SIZE` numbers moved into ``arrays``."""
    if isinstance(obj, dict):
        return {
            k: _move_arrays(v, f"{path}/{k}" if path else str(k), arrays) for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return [_move_arrays(v, f"{path}/{i}", arrays) for i, v in enumerate(obj)]
    if hasattr(obj, "shape") and np.size(obj) > INLINE_SIZE:
        arrays[path] = np.asarray(obj)
        return f"results.npz:{path}"
    return obj


Claim = tuple[str, bool, str]  # (the paper's claim, holds here, the numbers behind it)


def claims_table(claims: list) -> list[str]:
    """The report's ``## Claims`` section: a yes/no line per claim with its numbers (claims
    as ``(claim, holds, numbers)`` or as the dicts of ``results["claims"]``)."""
    lines = ["## Claims", "", "| claim | holds here | numbers |", "| --- | --- | --- |"]
    for c in claims:
        c, ok, nums = (c["claim"], c["holds"], c["numbers"]) if isinstance(c, dict) else c
        lines.append(f"| {c} | {'yes' if ok else 'no'} | {nums} |")
    return lines


def write_outputs(
    config,
    results: dict,
    workdir: str,
    log=print,
    *,
    claims: Callable,
    figures: Callable,
    report: Callable,
) -> dict:
    """Saves a study's outputs, all in ``workdir``: ``report.md``, ``results.json`` (arrays of
    more than `INLINE_SIZE` numbers go to ``results.npz``, named by their path in the results,
    which ``results.json`` gives as ``"results.npz:<path>"``) and each figure as PNG and PDF,
    on process 0, atomically; prints the claims. Returns ``results`` with its claims.

    Args:
      config, results: the study's config and what its ``run`` measured.
      claims: the study's ``claims(config, results) -> [(claim, holds, numbers)]``.
      figures: ``figures(config, results) -> {name: Figure}`` (draws, saves nothing).
      report: ``report_markdown(config, results) -> str`` (sees ``results["claims"]``).
    """
    found = claims(config, results)
    results = {
        **results,
        "claims": [{"claim": c, "holds": ok, "numbers": n} for c, ok, n in found],
    }
    names = []
    if jax.process_index() == 0:
        arrays: dict[str, np.ndarray] = {}
        plain = _move_arrays(results, "", arrays)
        files.write_json(os.path.join(workdir, "results.json"), plain)
        if arrays:
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            files.write_atomic(os.path.join(workdir, "results.npz"), buf.getvalue())
        files.write_atomic(os.path.join(workdir, "report.md"), report(config, results))
        for name, fig in figures(config, results).items():
            plotting.save(fig, workdir, name)
            names.append(name)
    for claim, ok, nums in found:
        log(f"[{'yes' if ok else 'no '}] {claim}: {nums}")
    log(f"wrote {workdir}/report.md, results.json and {', '.join(names)} (.png/.pdf)")
    return results
