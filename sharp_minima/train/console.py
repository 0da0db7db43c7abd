"""What a run shows and logs, and how it takes Ctrl-C: the progress line, the epoch line's
keys, `plural`, the deferred Ctrl-C of the loop, the per-step metrics buffer, and the metric
writers (``metrics.jsonl`` always; TensorBoard event files when ``config.tensorboard`` is set,
so λ_max and the losses can be watched live with ``tensorboard --logdir <workdir>``)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

import jax
import numpy as np

from sharp_minima import files


class NonFiniteError(FloatingPointError):
    """The training loss became NaN or Inf; the message names the step (``.step``)."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


def fmt_time(seconds: float) -> str:
    """``1h02m03s`` / ``2m03s`` / ``3s``."""
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """The console of one run: one progress line, and one line per evaluation.

    Steps/s counts training steps over the time spent in training steps only: the loop calls
    `pause` (after the steps so far have finished) before evaluation, hooks and checkpoints,
    and `resume` after them. On a terminal the progress line is a tqdm bar updated in place
    (messages print above it); elsewhere (logs, captured output) it is printed at most every
    ``interval`` seconds.
    """

    def __init__(
        self,
        total_steps: int,
        step: int,
        *,
        label: str = "",
        enabled: bool = True,
        log: Callable[[str], None] | None = None,
        stream=None,
        interval: float = 60.0,
    ):
        self.total, self.label, self.enabled = total_steps, label, enabled
        self.stream = sys.stdout if stream is None else stream
        self.log = log or (lambda s: print(s, file=self.stream, flush=True))
        self.tty = log is None and getattr(self.stream, "isatty", lambda: False)()
        self.interval = interval if not self.tty else 0.5
        self.seconds, self.steps = 0.0, 0
        self._t, self._step, self._last_print = None, step, 0.0
        self._bar = None

    def resume(self, step: int) -> None:
        """Starts (or restarts, dropping the running stretch) timing training at ``step``."""
        self._t, self._step = time.perf_counter(), step

    def pause(self, state, step: int) -> None:
        if self._t is None:
            return
        jax.block_until_ready(state.step)  # the steps dispatched so far have finished
        self.seconds += time.perf_counter() - self._t
        self.steps += step - self._step
        self._t = None

    def current_rate(self, step: int) -> float:
        """Training steps per second so far, including the running stretch up to ``step``
        (call after a fetch that waited for those steps)."""
        steps, seconds = self.steps, self.seconds
        if self._t is not None:
            steps += step - self._step
            seconds += time.perf_counter() - self._t
        return steps / seconds if seconds > 0 and steps > 0 else float("nan")

    @property
    def rate(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else float("nan")

    def update(self, step: int, epoch: int, num_epochs: int, record: dict) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last_print < self.interval and step < self.total:
            return
        self._last_print = now
        rate = self.current_rate(step)
        text = f"{self.label}step {step}/{self.total} epoch {epoch}/{num_epochs}"
        for key, fmt in (("minibatch/loss", "loss {:.4f}"), ("minibatch/accuracy", "acc {:.2%}")):
            if key in record:
                text += "  " + fmt.format(record[key])
        if math.isfinite(rate) and rate > 0:  # unknown before a timed step has finished
            text += f"  | {rate:.1f} steps/s  ETA {fmt_time((self.total - step) / rate)}"
        if self.tty:
            self._show(step, text)
        else:
            self.log(text)

    def _show(self, step: int, text: str) -> None:
        if self._bar is None:
            from tqdm.auto import tqdm  # noqa: PLC0415 - only a terminal needs it

            self._bar = tqdm(
                total=self.total,
                initial=step,
                file=self.stream,
                dynamic_ncols=True,
                leave=False,
                bar_format="{percentage:3.0f}%|{bar:20}| {desc}",
            )
        self._bar.n = step
        self._bar.set_description_str(text, refresh=True)

    def message(self, text: str) -> None:
        """A line of its own (above the progress bar on a terminal)."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            self.log(text)

    def close(self) -> None:
        """Removes the progress bar (if any)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def plural(n: int, word: str, words: str | None = None) -> str:
    """``"1 epoch"``, ``"2 epochs"``: a count with its noun (``words``: an irregular plural).

    >>> plural(1, "run"), plural(3, "run"), plural(0, "batch", "batches")
    ('1 run', '3 runs', '0 batches')
    """
    return f"{n} {word if n == 1 else words or word + 's'}"


class MetricsBuffer:
    """Per-step metrics kept on device until a log step; then fetched, checked and averaged."""

    def __init__(self, steps_per_epoch: int, log_every: int):
        self.pending: list[tuple[int, dict]] = []
        self.steps_per_epoch, self.log_every = steps_per_epoch, log_every

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    PREFIX = "_loop/pending/"

    def state_dict(self) -> dict[str, np.ndarray]:
        """The steps not yet logged (a checkpoint between two log steps, e.g. at Ctrl-C), so
        that the resumed run logs the same averages as an uninterrupted one."""
        if not self.pending:
            return {}
        fetched = jax.device_get([m for _, m in self.pending])
        out = {f"{self.PREFIX}step": np.asarray([s for s, _ in self.pending])}
        for k in fetched[0]:
            out[f"{self.PREFIX}{k}"] = np.asarray([m[k] for m in fetched])
        return out

    def load_state_dict(self, arrays: dict | None) -> None:
        """Continues from `state_dict`'s output (nothing pending when it holds none)."""
        steps = (arrays or {}).get(f"{self.PREFIX}step")
        if steps is None:
            return
        keys = [k[len(self.PREFIX) :] for k in arrays if k.startswith(self.PREFIX)]
        keys = [k for k in keys if k != "step"]
        self.pending = [
            (int(s), {k: arrays[f"{self.PREFIX}{k}"][i] for k in keys}) for i, s in enumerate(steps)
        ]

    def flush(self, step: int, epoch: int, last_checkpoint) -> dict | None:
        """The averaged record of the pending steps (None if there are none).

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
        avg.pop("minibatch/grad_norm")  # measured on log steps only (see make_train_step)
        if step % self.log_every == 0:
            avg["minibatch/grad_norm"] = float(fetched[-1]["minibatch/grad_norm"])
        self.pending.clear()
        return {"step": step, "epoch": epoch, **avg}


class MetricsLog:
    """Appends one JSON record per line to ``metrics.jsonl``; truncates on resume."""

    def __init__(self, path: str, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def records(self) -> list[dict]:
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
        """Drops records of steps after ``step`` (written after the last checkpoint)."""
        keep = [r for r in self.records() if r.get("step", 0) <= step]
        if self.enabled:
            files.write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        return keep

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")


class TensorBoardLog:
    """Writes the numeric fields of each record as TensorBoard scalars (``tensorboardX``) to
    ``<workdir>/tensorboard``. A resumed run writes the steps after its last checkpoint
    again (TensorBoard shows the later values)."""

    def __init__(self, logdir: str):
        from tensorboardX import SummaryWriter  # noqa: PLC0415 - an optional dependency

        self.writer = SummaryWriter(logdir=logdir, flush_secs=10)

    def write(self, record: dict) -> None:
        step = int(record.get("step", 0))
        for key, value in record.items():
            if "/" in key and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(key, float(value), global_step=step)

    def close(self) -> None:
        self.writer.close()


class MetricWriters:
    """The run's metric writers behind one interface: every record goes to ``metrics.jsonl``
    (`MetricsLog`, which the loop also reads back on a resume) and to TensorBoard when asked."""

    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = False):
        self.jsonl = MetricsLog(os.path.join(workdir, "metrics.jsonl"), enabled=enabled)
        self.others = (
            [TensorBoardLog(os.path.join(workdir, "tensorboard"))]
            if (enabled and tensorboard)
            else []
        )

    def truncate_after(self, step: int) -> list[dict]:
        return self.jsonl.truncate_after(step)

    def write(self, record: dict) -> None:
        self.jsonl.write(record)
        for w in self.others:
            w.write(record)

    def close(self) -> None:
        for w in self.others:
            w.close()


def on_console(key: str) -> bool:
    """Whether the epoch's console line shows ``key``: the evaluations and, of the hooks'
    scalars, the top eigenvalue and a changed learning rate (every scalar is in
    ``metrics.jsonl``)."""
    prefix, _, name = key.partition("/")
    return bool(name) and (
        prefix in ("train", "val", "test") or name in ("lambda_1", "learning_rate")
    )


class _InterruptFlag:
    requested = False


@contextlib.contextmanager
def deferred_interrupt():
    """Ctrl-C (SIGINT) during training sets a flag that the loop checks between steps, so a
    step, an evaluation or a checkpoint write is never cut in half (an orbax save interrupted
    midway leaves its asyncio machinery broken). A second Ctrl-C interrupts at once. Outside the
    main thread (where signal handlers cannot be set) Ctrl-C behaves as usual."""
    flag = _InterruptFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.requested:
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        flag.requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
