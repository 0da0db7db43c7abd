"""The hook protocol of the training loop: `Hook`, what a hook sees (`LoopContext`) and may
return (`HookResult`), and the hooks every study can use (`ValidationPlateau`).

Imports only jax, numpy and optax: `sharp_minima.tracking` builds its hooks on this module
without importing the loop (or flax).
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sharp_minima import files

if TYPE_CHECKING:  # the state's class lives with the steps, which import flax
    from sharp_minima.train.steps import TrainState


class StopTraining(Exception):
    """Raised by a hook (or early stopping) to end training after the current step."""


class HookResult(NamedTuple):
    """What a hook may return.

    Attributes:
      metrics: scalars to log, or None.
      state: a replacement `TrainState`, or None.
    """

    metrics: dict | None = None
    state: TrainState | None = None


@dataclasses.dataclass
class Hook:
    """A function called inside the training loop.

    ``fn(ctx: LoopContext)`` runs after step ``s`` when ``every_steps`` divides ``s`` (and
    ``s <= until_step`` if given; before that step's checkpoint), and/or after each
    ``every_epochs``-th epoch (after evaluation, before the epoch's checkpoint): e.g.
    ``Hook(tracker, every_steps=10, until_step=200, every_epochs=1)`` measures often early in
    training and once per epoch later; ``at_start=True`` adds a call at step 0, before
    training (not when a run resumes). It may return

    - ``None``;
    - a dict of prefixed scalars, logged to ``metrics.jsonl``;
    - a `TrainState` (``ctx.state.replace(...)``), used from the next step on — e.g. new
      directions inside the optimizer state (``optax.tree_utils.tree_set``); it must keep
      the state's tree structure and shapes (leaves are cast to the old dtypes and placed
      like them); the checkpoint keeps it, so it survives a resume;
    - a `HookResult` with both.

    It may write arrays to the workdir with ``ctx.save_arrays`` and end the run by raising
    `StopTraining`.

    A hook that keeps state between calls which the next call depends on (e.g. a tracker's
    warm-start vectors) makes a resume exact by giving ``fn`` two methods:
    ``state_dict() -> {name: array}`` and ``load_state_dict({name: array})``. The loop saves
    that state with every checkpoint (``hook_state/<step>.npz``, under the hook's ``name``,
    which must then be unique) and loads it when the run resumes from that checkpoint.

    Attributes:
      fn: the function (or a callable object with ``state_dict``/``load_state_dict``).
      every_steps: call after every that many steps (None: never by steps).
      every_epochs: call after every that many epochs.
      name: a unique name when ``fn`` keeps state.
      until_step: no step calls after this step.
      at_start: also call at step 0, before training.
    """

    fn: Callable[[LoopContext], Any]
    every_steps: int | None = None
    every_epochs: int | None = None
    name: str = "hook"
    until_step: int | None = None  # the step schedule stops after this step (None: never)
    at_start: bool = False  # also before the first step of a fresh run (step 0)

    def due(self, when: str, step: int, epoch: int) -> bool:
        """Whether the hook runs now.

        Args:
          when: ``"start"``, ``"step"`` or ``"epoch"``.
          step: the current step.
          epoch: the current epoch.

        Returns:
          True when due.
        """
        if when == "start":
            return self.at_start
        if when == "step":
            early = self.until_step is None or step <= self.until_step
            return bool(self.every_steps) and early and step % self.every_steps == 0
        return bool(self.every_epochs) and epoch % self.every_epochs == 0


class ValidationPlateau:
    """An epoch hook: the learning rate ÷ ``1 / factor`` when ``metric`` has not improved for
    ``patience`` evaluations (Jastrzębski et al. 2019: ÷10 when the validation loss has not
    improved for 100 epochs).

    The optimizer must carry an ``optax.inject_hyperparams`` ``learning_rate``. Stateless:
    each call replays the rule over ``ctx.history`` (the evaluations so far, restored on a
    resume), so a resumed run drops at the same epochs. Use as
    ``Hook(ValidationPlateau(patience=5), every_epochs=1)``.

    Args:
      patience: evaluations without improvement before a drop.
      factor: the learning rate's multiplier at a drop.
      metric: the logged metric (lower is better).
    """

    def __init__(self, patience: int, factor: float = 0.1, metric: str = "val/loss"):
        if patience < 1 or not 0 < factor < 1:
            raise ValueError(f"need patience >= 1 and 0 < factor < 1, got {patience}, {factor}")
        self.patience, self.factor, self.metric = patience, factor, metric

    def drops(self, history: list[dict]) -> list[int]:
        """Indices of the evaluations in ``history`` after which the rate drops.

        Args:
          history: the evaluation records.

        Returns:
          The indices (among the records holding ``metric``).
        """
        best, wait, out = float("inf"), 0, []
        for i, rec in enumerate(r for r in history if self.metric in r):
            if rec[self.metric] < best:
                best, wait = rec[self.metric], 0
                continue
            wait += 1
            if wait >= self.patience:
                out.append(i)
                wait = 0
        return out

    def __call__(self, ctx):
        evaluated = [r for r in ctx.history if self.metric in r]
        if not evaluated:
            raise ValueError(f"ValidationPlateau: no {self.metric!r} in the evaluations")
        if not self.drops(evaluated) or self.drops(evaluated)[-1] != len(evaluated) - 1:
            return None
        lr = optax.tree_utils.tree_get(ctx.state.opt_state, "learning_rate")
        if lr is None:
            raise ValueError("ValidationPlateau needs an optax.inject_hyperparams learning_rate")
        new = optax.tree_utils.tree_set(ctx.state.opt_state, learning_rate=lr * self.factor)
        return HookResult(
            {"plateau/learning_rate": float(lr * self.factor)}, ctx.state.replace(opt_state=new)
        )


@dataclasses.dataclass
class LoopContext:
    """What a hook sees: the current state and where the loop is.

    Attributes:
      state: the current `TrainState`.
      step: the steps taken.
      epoch: the current epoch.
      steps_per_epoch: steps in an epoch.
      model: the Flax model.
      data: the `sharp_minima.data.Dataset`.
      config: the run's config.
      workdir: the run's folder.
      history: the evaluation records so far.
    """

    state: TrainState
    step: int
    epoch: int
    steps_per_epoch: int
    model: Any
    data: Any
    config: Any
    workdir: str
    history: list[dict]

    def save_arrays(self, name: str, **arrays) -> str:
        """Writes ``arrays`` (e.g. eigenvectors, tridiagonals, iterates) atomically to
        ``workdir/arrays/<name>/<step>.npz`` (process 0 only).

        Args:
          name: the arrays' folder name.
          **arrays: numpy or jax arrays.

        Returns:
          The file's path.
        """
        return save_arrays(self.workdir, name, self.step, **arrays)


def save_arrays(workdir: str, name: str, step: int, **arrays) -> str:
    """``workdir/arrays/<name>/<step:08d>.npz``, written atomically (process 0 only).

    Args:
      workdir: the run's folder.
      name: the arrays' folder name.
      step: the step (the file's name).
      **arrays: numpy or jax arrays.

    Returns:
      The file's path.
    """
    path = os.path.join(workdir, "arrays", name, f"{step:08d}.npz")
    if jax.process_index() == 0:
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(jax.device_get(v)) for k, v in arrays.items()})
        files.write_atomic(path, buf.getvalue())
    return path


def _stateful(hooks: Sequence[Hook]) -> list[Hook]:
    return [h for h in hooks if callable(getattr(h.fn, "state_dict", None))]


def check_hooks(hooks: Sequence[Hook]) -> None:
    """Raises ValueError unless the hooks that keep state have distinct names and can load it
    back."""
    names = [h.name for h in _stateful(hooks)]
    for h in _stateful(hooks):
        if not callable(getattr(h.fn, "load_state_dict", None)):
            raise ValueError(f"hook {h.name!r} has state_dict() but no load_state_dict()")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(
            f"hooks that keep state need distinct names to be checkpointed; {dup} is used "
            "more than once (Hook(..., name=...))"
        )


def hook_state(hooks: Sequence[Hook]) -> dict[str, np.ndarray]:
    """The state of the stateful hooks, as ``{"<hook name>/<key>": array}`` (on the host)."""
    out = {}
    for h in _stateful(hooks):
        for k, v in (h.fn.state_dict() or {}).items():
            out[f"{h.name}/{k}"] = np.asarray(jax.device_get(v))
    return out


def load_hook_state(hooks: Sequence[Hook], arrays: dict | None) -> list[str]:
    """Gives each stateful hook its part of ``arrays`` (`hook_state`'s output; a hook that had
    nothing to save gets nothing). With ``arrays=None`` (a checkpoint saved without hook
    state) returns the names of the stateful hooks, which start afresh."""
    if arrays is None:
        return [h.name for h in _stateful(hooks)]
    for h in _stateful(hooks):
        prefix = f"{h.name}/"
        mine = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
        if mine:
            h.fn.load_state_dict(mine)
    return []


def run_hooks(hooks: Sequence[Hook], when: str, ctx: LoopContext) -> tuple[TrainState, dict]:
    """Runs the hooks due at ``ctx.step`` / ``ctx.epoch``.

    Args:
      hooks: the run's hooks.
      when: ``"start"``, ``"step"`` or ``"epoch"``.
      ctx: the loop's `LoopContext`.

    Returns:
      ``(state, scalars)``: the (possibly replaced) state and the scalars the hooks returned.

    Raises:
      ValueError: a hook returned a state of another structure, or something else.
    """
    metrics = {}
    for h in hooks:
        if not h.due(when, ctx.step, ctx.epoch):
            continue
        out = h.fn(ctx)
        if isinstance(out, type(ctx.state)):
            out = HookResult(state=out)
        elif isinstance(out, dict):
            out = HookResult(metrics=out)
        elif out is None:
            continue
        elif not isinstance(out, HookResult):
            raise ValueError(
                f"hook {h.name!r} returned {type(out).__name__}; return None, a dict of "
                "scalars, a TrainState or a HookResult"
            )
        if out.state is not None:
            ctx.state = conform(h.name, ctx.state, out.state)
        metrics.update(out.metrics or {})
    return ctx.state, metrics


def conform(name: str, old: TrainState, new: TrainState) -> TrainState:
    """``new`` with ``old``'s dtypes and shardings (so the jitted step does not recompile).

    Args:
      name: the hook's name (for the error).
      old: the state before the hook.
      new: the state the hook returned.

    Returns:
      The conformed `TrainState`.

    Raises:
      ValueError: the tree structure or a leaf shape differs.
    """
    if jax.tree.structure(old) != jax.tree.structure(new) or any(
        jnp.shape(a) != jnp.shape(b) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new))
    ):
        raise ValueError(
            f"hook {name!r} returned a state of another structure or shape; replace leaves with "
            "arrays like them (e.g. optax.tree_utils.tree_set)"
        )

    def like(n, o):
        if n is o:
            return o
        # A new leaf is copied: the training step donates the state, and the hook may keep
        # the array it returned (e.g. eigenvectors it warm-starts from next time).
        n = jnp.array(n, o.dtype, copy=True)
        sharding = getattr(o, "sharding", None)
        return jax.device_put(n, sharding) if sharding is not None else n

    return jax.tree.map(like, new, old)
