"""Checkpoints of a run: the last few and the best (orbax), restore with fallback past damaged
ones, and the check that a workdir's run may be resumed with a config."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import math
import os
import shutil
import sys

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sharp_minima import files
from sharp_minima.train.config import TRAINING_FIELDS, ConfigError, config_dict
from sharp_minima.train.steps import TrainState, init_state


class CheckpointError(ValueError):
    """No checkpoint of the workdir can be restored (the message names each and why)."""


def best_metric(config) -> str:
    """The metric that picks the best checkpoint (``"auto"``: val/accuracy if there is a
    validation split, else train/accuracy — never the test set).

    Args:
      config: the run's config.

    Returns:
      A metric name such as ``"val/accuracy"``.
    """
    m = config.checkpoint.best_metric
    if m == "auto":
        return "val/accuracy" if config.data.validation_fraction > 0 else "train/accuracy"
    return m


class Checkpointer:
    """The last ``config.checkpoint.keep`` states (``checkpoints/``) and the best one by
    `best_metric` (``checkpoint_best/``), saved synchronously with orbax.

    Args:
      workdir: the run's folder.
      config: the run's config (``checkpoint.keep``, ``checkpoint.best_metric``).
    """

    def __init__(self, workdir: str, config):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        opts = dict(enable_async_checkpointing=False, create=True)
        root = os.path.abspath(workdir)
        self.root = root
        # A save interrupted by a kill leaves "<step>.orbax-checkpoint-tmp…" folders behind;
        # the caller holds the workdir lock, so no other process is writing them.
        for sub in ("checkpoints", "checkpoint_best"):
            folder = os.path.join(root, sub)
            for name in os.listdir(folder) if os.path.isdir(folder) else ():
                if "orbax-checkpoint-tmp" in name:
                    shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
        self.last = ocp.CheckpointManager(
            os.path.join(root, "checkpoints"),
            options=ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.keep, **opts),
        )
        self.metric = best_metric(config)
        self.best = ocp.CheckpointManager(
            os.path.join(root, "checkpoint_best"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1,
                best_fn=lambda m: m[self.metric],
                best_mode="min" if self.metric.endswith("loss") else "max",
                keep_checkpoints_without_metrics=False,
                **opts,
            ),
        )

    def latest_step(self) -> int | None:
        """The step of the newest checkpoint.

        Returns:
          The step, or None without a checkpoint.
        """
        return self.last.latest_step()

    def restore_latest(self, target: TrainState, log=None) -> TrainState | None:
        """The newest saved state that restores, with ``target``'s shardings (None when there
        is no checkpoint).

        A damaged checkpoint (a truncated file, missing metadata, ...) is moved aside to
        ``checkpoints_damaged/<step>`` (never deleted) and the next older one is tried; ``log``
        is told which step was damaged and why.

        Raises:
          CheckpointError: checkpoints exist but none restores (each is named, with its
            error; nothing is moved).

        Args:
          target: a state of the run's structure, placed as the restored one should be.
          log: takes a line per damaged checkpoint moved aside.

        Returns:
          The restored `TrainState`, or None.
        """
        abstract = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, target)
        damaged = []
        for step in sorted(self.last.all_steps(), reverse=True):
            try:
                with _silenced_logging():
                    state = self.last.restore(step, args=self._ocp.args.StandardRestore(abstract))
            except Exception as e:  # noqa: BLE001  (any failure to read means "damaged")
                _drop_orbax_read_noise()
                meta = os.path.join(self.root, "checkpoints", str(step), "default", "_METADATA")
                reason = "its _METADATA file is missing" if not os.path.exists(meta) else None
                damaged.append((step, reason or _first_line(e)))
                continue
            for bad, reason in damaged:
                moved = self._move_aside(bad)
                if log is not None:
                    log(f"checkpoint at step {bad} is damaged ({reason}); moved to {moved}")
            if damaged:
                self.last.reload()
            return state
        if damaged:
            raise CheckpointError(
                f"no checkpoint in {self.root}/checkpoints restores ("
                + "; ".join(f"step {s}: {r}" for s, r in damaged)
                + "); move the folder aside to start over"
            )
        return None

    def _move_aside(self, step: int) -> str:
        src = os.path.join(self.root, "checkpoints", str(step))
        dst = os.path.join(self.root, "checkpoints_damaged", str(step))
        n = 1
        while os.path.exists(dst):
            n += 1
            dst = os.path.join(self.root, "checkpoints_damaged", f"{step}-{n}")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.replace(src, dst)
        return dst

    def save(
        self, state: TrainState, metrics: dict | None = None, hook_state: dict | None = None
    ) -> None:
        """Saves ``state`` as the latest (once per step) and, given evaluation ``metrics``
        holding a finite `best_metric`, as the best candidate. ``hook_state`` (the arrays the
        loop needs to continue exactly: its hooks' state, `sharp_minima.train.hooks.hook_state`,
        and the steps not yet logged) goes to
        ``hook_state/<step>.npz``, written before the checkpoint it belongs to and kept as
        long as that checkpoint (None: no file, for a run whose hooks keep no state).

        Args:
          state: the state to save.
          metrics: the evaluation record of this step, if any.
          hook_state: the loop's arrays to save beside it.
        """
        s = int(state.step)
        if self.last.latest_step() != s:
            if hook_state is not None and jax.process_index() == 0:
                buf = io.BytesIO()
                np.savez(buf, **(hook_state or {}))
                files.write_atomic(self._hook_state_path(s), buf.getvalue())
            self.last.save(s, args=self._ocp.args.StandardSave(state))
            self._prune_hook_state()
        value = (metrics or {}).get(self.metric)
        if value is not None and math.isfinite(value):
            self.best.save(s, args=self._ocp.args.StandardSave(state), metrics={self.metric: value})

    def _hook_state_path(self, step: int) -> str:
        return os.path.join(self.root, "hook_state", f"{step}.npz")

    def _prune_hook_state(self) -> None:
        folder = os.path.join(self.root, "hook_state")
        if jax.process_index() != 0 or not os.path.isdir(folder):
            return
        kept = {f"{s}.npz" for s in self.last.all_steps()}
        for name in os.listdir(folder):
            if name.endswith(".npz") and name not in kept:
                os.remove(os.path.join(folder, name))

    def load_hook_state(self, step: int) -> dict | None:
        """The hook state saved with the checkpoint of ``step`` (None for a checkpoint saved
        without one, e.g. by an older version).

        Args:
          step: the checkpoint's step.

        Returns:
          ``{name: array}`` or None.
        """
        path = self._hook_state_path(step)
        if not os.path.exists(path):
            return None
        with np.load(path) as z:
            return {k: z[k] for k in z.files}

    def close(self) -> None:
        """Closes both orbax managers (call when the run ends)."""
        self.last.close()
        self.best.close()


@contextlib.contextmanager
def _silenced_logging():
    """Orbax and asyncio log whole tracebacks when a checkpoint cannot be read; the caller
    reports the failure in one line instead."""
    logging.disable(logging.CRITICAL)
    hook, sys.unraisablehook = sys.unraisablehook, lambda unraisable: None
    try:
        yield
    except BaseException:
        gc.collect()  # failed reader tasks complain when collected: let them do it now
        raise
    finally:
        sys.unraisablehook = hook
        logging.disable(logging.NOTSET)


def _is_read_noise(error: BaseException | None) -> bool:
    """Whether ``error`` is the complaint of a reader abandoned by a failed restore: raised
    inside orbax, or TensorStore finishing a read after orbax closed its event loop (a
    RuntimeError "Event loop is closed" from asyncio's ``call_soon_threadsafe``)."""
    tb = getattr(error, "__traceback__", None)
    names = []
    while tb is not None:
        if "orbax" in tb.tb_frame.f_code.co_filename:
            return True
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return (
        isinstance(error, RuntimeError)
        and "Event loop is closed" in str(error)
        and "call_soon_threadsafe" in names
    )


class _OrbaxReadNoise(logging.Filter):
    def filter(self, record):
        return "orbax" not in record.getMessage() and "async_deserialize" not in str(record.msg)


_noise_dropped = False


def _drop_orbax_read_noise() -> None:
    """After a checkpoint failed to read, orbax's abandoned reader tasks complain whenever they
    are garbage-collected ("Task exception was never retrieved", "Exception ignored in ...") or
    finish ("Event loop is closed", printed by TensorStore's callback thread through
    ``sys.unraisablehook`` or ``sys.excepthook``) — possibly long after the restore. Drop those
    (and only those, `_is_read_noise`) for the rest of the process; the failure itself was
    reported in one line."""
    global _noise_dropped
    if _noise_dropped:
        return
    _noise_dropped = True
    unraisable_hook, except_hook = sys.unraisablehook, sys.excepthook

    def unraisable(args):
        if not _is_read_noise(args.exc_value):
            unraisable_hook(args)

    def excepthook(kind, value, tb):
        if not _is_read_noise(value):
            except_hook(kind, value, tb)

    sys.unraisablehook, sys.excepthook = unraisable, excepthook
    logging.getLogger("asyncio").addFilter(_OrbaxReadNoise())


def _first_line(error: BaseException, limit: int = 160) -> str:
    text = next((ln.strip() for ln in str(error).splitlines() if ln.strip()), "")
    text = text.split(" See full")[0]  # TensorStore appends its whole spec
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def restore_checkpoint(directory: str, target: TrainState, step: int | None = None):
    """Restores a `TrainState` from an orbax folder (latest step unless ``step`` is given),
    with the shardings of ``target``. Returns None when the folder has no checkpoint.

    Args:
      directory: an orbax checkpoint folder (e.g. ``<workdir>/checkpoint_best``).
      target: a state of the run's structure.
      step: the step to restore (default: the latest).

    Returns:
      The `TrainState`, or None.
    """
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(os.path.abspath(directory)) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        return mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def restore_or_init(checkpointer: Checkpointer, model, tx, sample_x, key, mesh: Mesh, log=None):
    """``(state, resumed_from)``: the newest checkpoint that restores if there is one (see
    `Checkpointer.restore_latest`), else a fresh `init_state`; replicated over ``mesh``.

    Args:
      checkpointer: the run's `Checkpointer`.
      model: the Flax model.
      tx: the optax transformation.
      sample_x: a batch of inputs (for the shapes).
      key: the initialisation key.
      mesh: the data mesh (the state is replicated over it).
      log: takes the lines about damaged checkpoints.

    Returns:
      ``(state, resumed_from)``: resumed_from is the restored step, 0 for a fresh state.
    """
    state = init_state(model, tx, sample_x, key)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    restored = checkpointer.restore_latest(state, log=log)
    if restored is None:
        return state, 0
    return restored, int(restored.step)


def check_resumable(workdir: str, config) -> None:
    """Refuses a config whose `TRAINING_FIELDS` differ from those of the checkpointed run in
    ``workdir``. A workdir without a checkpoint (e.g. a run that failed before its first
    checkpoint) accepts any config.

    Raises:
      ConfigError: naming the fields that differ.

    Args:
      workdir: the run's folder.
      config: the config about to resume it.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path) or not has_checkpoint(workdir):
        return
    with open(path) as f:
        old = json.load(f)
    new = config_dict(config)
    if "sam" not in old and not (new.get("sam") or {}).get("rho"):
        old["sam"] = new.get("sam")  # a run from before SAM's settings: trained without it
    diff = sorted(k for k in TRAINING_FIELDS if old.get(k) != new.get(k))
    if diff:
        raise ConfigError(
            f"{workdir} holds a run with a different config (fields differ: {', '.join(diff)}); "
            "use another --workdir, or delete it to start over"
        )


def has_checkpoint(workdir: str) -> bool:
    """Whether ``workdir/checkpoints`` holds a checkpoint.

    Args:
      workdir: the run's folder.

    Returns:
      True when there is at least one.
    """
    folder = os.path.join(workdir, "checkpoints")
    return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))
