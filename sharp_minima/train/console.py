"""What a run shows, and how it takes Ctrl-C: the progress line, the epoch line's keys,
`plural`, `fmt_time`, and the deferred Ctrl-C of the loop. What a run logs is in
`sharp_minima.train.metrics`."""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Callable

import jax


def fmt_time(seconds: float) -> str:
    """``1h02m03s`` / ``2m03s`` / ``3s``.

    Args:
      seconds: a duration.

    Returns:
      The text.
    """
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

    Args:
      total_steps: the run's steps.
      step: the step it starts (or resumes) at.
      label: a prefix of every line (e.g. the run's name).
      enabled: show anything at all.
      log: takes the lines instead of a stream (no bar).
      stream: the output stream (default stdout).
      interval: seconds between progress lines when not on a terminal.
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
        """Starts (or restarts, dropping the running stretch) timing training at ``step``.

        Args:
          step: the step timing starts at.
        """
        self._t, self._step = time.perf_counter(), step

    def pause(self, state, step: int) -> None:
        """Stops timing once the steps dispatched so far have finished.

        Args:
          state: the state (waited on).
          step: the current step.
        """
        if self._t is None:
            return
        jax.block_until_ready(state.step)  # the steps dispatched so far have finished
        self.seconds += time.perf_counter() - self._t
        self.steps += step - self._step
        self._t = None

    def current_rate(self, step: int) -> float:
        """Training steps per second so far, including the running stretch up to ``step``
        (call after a fetch that waited for those steps).

        Args:
          step: the current step.

        Returns:
          Steps per second (nan before a timed step).
        """
        steps, seconds = self.steps, self.seconds
        if self._t is not None:
            steps += step - self._step
            seconds += time.perf_counter() - self._t
        return steps / seconds if seconds > 0 and steps > 0 else float("nan")

    @property
    def rate(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else float("nan")

    def update(self, step: int, epoch: int, num_epochs: int, record: dict) -> None:
        """Shows the progress line (at most every ``interval`` seconds off a terminal).

        Args:
          step: the current step.
          epoch: the current epoch.
          num_epochs: the run's epochs.
          record: the last metrics (mini-batch loss and accuracy are shown).
        """
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
        """A line of its own (above the progress bar on a terminal).

        Args:
          text: the line.
        """
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

    Args:
      n: the count.
      word: the noun.
      words: its plural when not ``word + "s"``.

    Returns:
      The text.

    >>> plural(1, "run"), plural(3, "run"), plural(0, "batch", "batches")
    ('1 run', '3 runs', '0 batches')
    """
    return f"{n} {word if n == 1 else words or word + 's'}"


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
