"""What a run logs: the per-step metrics buffer (checked for NaN/Inf, `NonFiniteError`) and
the metric writers (``metrics.jsonl`` always; TensorBoard event files when
``config.tensorboard`` is set, so λ_max and the losses can be watched live with
``tensorboard --logdir <workdir>``)."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np

from sharp_minima import files


class NonFiniteError(FloatingPointError):
    """The training loss became NaN or Inf; the message names the step (``.step``).

    Args:
      message: the error's text.
      step: the step where the loss became non-finite.
    """

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


def log_step_metrics(groups: int = 1) -> tuple[str, ...]:
    """The metrics `make_train_step` computes on its log steps only (0 on the others), so
    that a log record holds the log step's value, not the interval's mean
    (`sharp_minima.train.MetricsBuffer`): ``minibatch/grad_norm``, and with SAM's
    m-sharpness (``groups`` > 1) ``sam/grad_norm`` and ``sam/cos``.

    Args:
      groups: the step's m-sharpness groups.

    Returns:
      The metrics' names.
    """
    return ("minibatch/grad_norm",) + (("sam/grad_norm", "sam/cos") if groups > 1 else ())


class MetricsBuffer:
    """Per-step metrics kept on device until a log step; then fetched, checked and averaged.

    Args:
      steps_per_epoch: for the epoch named in errors.
      log_every: steps between log records.
      sampled: metrics the step computes on its log steps only (0 elsewhere; default
        `sharp_minima.train.log_step_metrics` without groups): a record holds their log
        step's value, and none when it ends elsewhere (the end of a run).
    """

    def __init__(self, steps_per_epoch: int, log_every: int, sampled=None):
        self.pending: list[tuple[int, dict]] = []
        self.steps_per_epoch, self.log_every = steps_per_epoch, log_every
        self.sampled = log_step_metrics() if sampled is None else tuple(sampled)

    def add(self, step: int, metrics: dict) -> None:
        """Keeps one step's metrics (device arrays) until the next `flush`.

        Args:
          step: the step.
          metrics: the step's metrics.
        """
        self.pending.append((step, metrics))

    PREFIX = "_loop/pending/"

    def state_dict(self) -> dict[str, np.ndarray]:
        """The steps not yet logged (a checkpoint between two log steps, e.g. at Ctrl-C), so
        that the resumed run logs the same averages as an uninterrupted one.

        Returns:
          ``{name: array}`` (empty when nothing is pending).
        """
        if not self.pending:
            return {}
        fetched = jax.device_get([m for _, m in self.pending])
        out = {f"{self.PREFIX}step": np.asarray([s for s, _ in self.pending])}
        for k in fetched[0]:
            out[f"{self.PREFIX}{k}"] = np.asarray([m[k] for m in fetched])
        return out

    def load_state_dict(self, arrays: dict | None) -> None:
        """Continues from `state_dict`'s output (nothing pending when it holds none).

        Args:
          arrays: `state_dict`'s output, or None.
        """
        steps = (arrays or {}).get(f"{self.PREFIX}step")
        if steps is None:
            return
        keys = [k[len(self.PREFIX) :] for k in arrays if k.startswith(self.PREFIX)]
        keys = [k for k in keys if k != "step"]
        self.pending = [
            (int(s), {k: arrays[f"{self.PREFIX}{k}"][i] for k in keys}) for i, s in enumerate(steps)
        ]

    def flush(self, step: int, epoch: int, last_checkpoint) -> dict | None:
        """The averaged record of the pending steps.

        Args:
          step: the current step.
          epoch: the current epoch.
          last_checkpoint: the last checkpoint's step (for the error), or None.

        Returns:
          The record, or None when nothing is pending.

        Raises:
          NonFiniteError: the objective of some step was NaN/Inf (naming the first such step).
        """
        if not self.pending:
            return None
        fetched = jax.device_get([m for _, m in self.pending])
        for (s, _), mets in zip(self.pending, fetched):
            value = float(mets["minibatch/objective"])
            if not math.isfinite(value):
                raise NonFiniteError(
                    f"training loss became {value} at step {s} (epoch "
                    f"{(s - 1) // self.steps_per_epoch + 1}); last checkpoint: "
                    f"{'none yet' if last_checkpoint is None else f'step {last_checkpoint}'}. "
                    "Lower the learning rate or check the data.",
                    step=s,
                )
        avg = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        for k in self.sampled:  # measured on log steps only (see make_train_step)
            avg.pop(k, None)
            if step % self.log_every == 0 and k in fetched[-1]:
                avg[k] = float(fetched[-1][k])
        self.pending.clear()
        return {"step": step, "epoch": epoch, **avg}


class MetricsLog:
    """Appends one JSON record per line to ``metrics.jsonl``; truncates on resume.

    Args:
      path: the ``metrics.jsonl`` file.
      enabled: write at all.
    """

    def __init__(self, path: str, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def records(self) -> list[dict]:
        """The records in the file (a line cut by a kill is dropped).

        Returns:
          A list of dicts.
        """
        if not os.path.exists(self.path):
            return []
        out = []
        with open(self.path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:  # a line cut by a kill: drop it
                        pass
        return out

    def truncate_after(self, step: int) -> list[dict]:
        """Drops records of steps after ``step`` (written after the last checkpoint).

        Args:
          step: the last checkpoint's step.

        Returns:
          The records kept.
        """
        keep = [r for r in self.records() if r.get("step", 0) <= step]
        if self.enabled:
            files.write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        return keep

    def write(self, record: dict) -> None:
        """Appends ``record`` as one JSON line.

        Args:
          record: a dict of JSON-able values.
        """
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")


class TensorBoardLog:
    """Writes the numeric fields of each record as TensorBoard scalars (``tensorboardX``) to
    ``<workdir>/tensorboard``. A resumed run writes the steps after its last checkpoint
    again (TensorBoard shows the later values).

    Args:
      logdir: the event files' folder.
    """

    def __init__(self, logdir: str):
        from tensorboardX import SummaryWriter  # noqa: PLC0415 - an optional dependency

        self.writer = SummaryWriter(logdir=logdir, flush_secs=10)

    def write(self, record: dict) -> None:
        """Writes the record's numeric ``prefix/name`` fields as scalars at its step.

        Args:
          record: a dict with ``"step"``.
        """
        step = int(record.get("step", 0))
        for key, value in record.items():
            if "/" in key and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(key, float(value), global_step=step)

    def close(self) -> None:
        """Flushes and closes the writer."""
        self.writer.close()


class MetricWriters:
    """The run's metric writers behind one interface: every record goes to ``metrics.jsonl``
    (`MetricsLog`, which the loop also reads back on a resume) and to TensorBoard when asked.

    Args:
      workdir: the run's folder.
      enabled: write at all (process 0 only writes).
      tensorboard: also write TensorBoard events.
    """

    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = False):
        self.jsonl = MetricsLog(os.path.join(workdir, "metrics.jsonl"), enabled=enabled)
        self.others = (
            [TensorBoardLog(os.path.join(workdir, "tensorboard"))]
            if (enabled and tensorboard)
            else []
        )

    def truncate_after(self, step: int) -> list[dict]:
        """`MetricsLog.truncate_after` of ``metrics.jsonl``.

        Args:
          step: the last checkpoint's step.

        Returns:
          The records kept.
        """
        return self.jsonl.truncate_after(step)

    def write(self, record: dict) -> None:
        """Writes ``record`` to every writer.

        Args:
          record: a dict with ``"step"``.
        """
        self.jsonl.write(record)
        for w in self.others:
            w.write(record)

    def close(self) -> None:
        """Closes the TensorBoard writer, if any."""
        for w in self.others:
            w.close()
