"""Training harness: TrainState, jitted data-parallel steps, the loop with hooks, checkpoints.

One call, ``train(config, workdir)``, trains any config of ``configs/`` and resumes when the
workdir already holds checkpoints of the same run. Pieces are importable on their own:

- `TrainState` — params, BatchNorm statistics, optimizer state, step and the loop key, as one
  pytree (checkpointed whole, so a resumed run continues bit for bit on the same hardware).
- `make_optimizer` — optax optimizer and learning-rate schedule from ``config.optim`` /
  ``config.schedule`` (sgd, momentum, nesterov, adam, adamw, rmsprop, adagrad; constant, step
  decay, cosine, warm-up with the linear scaling rule of Goyal et al. 2017, reduce-on-plateau).
- `make_train_step`, `make_eval_step` — ``jit``-compiled once; the state is donated; the batch
  is sharded over the ``"data"`` axis of a device mesh and the state replicated, so the same code
  runs on one CPU, several GPUs, a TPU, or several hosts (after ``jax.distributed.initialize()``).
- `classification_loss` — the default `TrainLoss`; any research loss of the same protocol
  ``(params, model_state, batch, key) -> (objective, aux)`` can be passed to `train` instead,
  and any optax transformation as ``tx``.
- `Hook` — a callable run every N steps or epochs inside the loop (curvature tracking plugs in
  here); it may return metrics to log, a replacement state (e.g. new directions in the
  optimizer state), write arrays with ``ctx.save_arrays``, or raise `StopTraining`.
- The loop's pieces: `restore_or_init`, `Checkpointer` (last + best), `MetricsBuffer`,
  `MetricsLog`, `Progress`, `make_evaluators` / `evaluate`, `run_hooks`.

Weight decay is the L2 term ``λ/2 ‖w‖²`` added to the loss (kernels and embeddings only), as in
Keskar et al. (2017) and Jastrzębski et al. (2019).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sharp_minima import data as data_lib
from sharp_minima import files, losses, optim
from sharp_minima.models import MODELS, get_model

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "adagrad")
SCHEDULES = ("constant", "step", "cosine", "plateau")
# Config fields that may change between a run and its resumption (the rest must match).
# The config fields that determine a run's training trajectory: a workdir holding checkpoints
# refuses to resume with other values. Everything else may change between a run and its
# resumption (num_epochs, logging, evaluation, checkpointing, early stopping, num_devices) and
# so may any section a study adds for its measurements (``keskar``, ``curvature``, ...).
TRAINING_FIELDS = ("seed", "model", "data", "batch_size", "optim", "schedule")
EVAL_METRICS = ("loss", "accuracy")

# A training loss: ``loss(params, model_state, batch, key) -> (objective, aux)``; ``aux`` is a
# dict whose ``"model_state"`` entry (if any) replaces the BatchNorm statistics and whose other
# (scalar) entries are logged as ``train/<name>``.
TrainLoss = Callable[[Any, Any, Any, jax.Array], tuple[jax.Array, dict]]


class ConfigError(ValueError):
    """The config names something unknown or asks for an impossible combination."""


class NonFiniteError(FloatingPointError):
    """The training loss became NaN or Inf; the message names the step."""


class StopTraining(Exception):
    """Raised by a hook (or early stopping) to end training after the current step."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training, after the last completed step was checkpointed; the message
    says where and how to resume."""


class CheckpointError(ValueError):
    """No checkpoint of the workdir can be restored (the message names each and why)."""


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree.

    Attributes:
      step: number of optimizer steps taken (int32 scalar).
      params: model parameters.
      batch_stats: BatchNorm running statistics (``{}`` for models without BatchNorm).
      opt_state: optax state.
      key: raw ``uint32`` data of the loop key (``jax.random.key_data``) so that the state can be
        checkpointed; dropout at step ``t`` uses ``fold_in(key, t)``.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    key: jax.Array

    def variables(self):
        """The ``variables`` dict for ``model.apply``."""
        if self.batch_stats:
            return {"params": self.params, "batch_stats": self.batch_stats}
        return {"params": self.params}


# --------------------------------------------------------------------------- config checks


def validate_config(config, num_devices: int | None = None) -> None:
    """Fails early and clearly on bad names and impossible combinations.

    Raises:
      ConfigError: naming the offending field.
    """
    c = config

    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    need(
        c.model.name in MODELS,
        f"config.model.name: unknown model {c.model.name!r}; valid names: "
        + ", ".join(sorted(MODELS)),
    )
    need(
        c.data.name in data_lib.DATASETS,
        f"config.data.name: unknown data set {c.data.name!r}; "
        "valid names: " + ", ".join(data_lib.DATASETS),
    )
    need(
        c.optim.name in OPTIMIZERS,
        f"config.optim.name: unknown optimizer {c.optim.name!r}; "
        "valid names: " + ", ".join(OPTIMIZERS),
    )
    need(
        c.schedule.name in SCHEDULES,
        f"config.schedule.name: unknown schedule "
        f"{c.schedule.name!r}; valid names: " + ", ".join(SCHEDULES),
    )
    need(c.batch_size >= 1, f"config.batch_size must be >= 1, got {c.batch_size}")
    need(c.num_epochs >= 1, f"config.num_epochs must be >= 1, got {c.num_epochs}")
    need(c.optim.learning_rate > 0, "config.optim.learning_rate must be > 0")
    need(c.optim.weight_decay >= 0, "config.optim.weight_decay must be >= 0")
    need(c.optim.proximal >= 0, "config.optim.proximal (λ) must be >= 0")
    need(c.optim.proximal_inner_steps >= 1, "config.optim.proximal_inner_steps must be >= 1")
    need(
        0.0 <= c.data.validation_fraction < 1.0, "config.data.validation_fraction must be in [0, 1)"
    )
    need(c.schedule.warmup_epochs >= 0, "config.schedule.warmup_epochs must be >= 0")
    need(
        c.schedule.warmup_epochs < c.num_epochs or c.schedule.warmup_epochs == 0,
        f"config.schedule.warmup_epochs ({c.schedule.warmup_epochs}) must be shorter than "
        f"config.num_epochs ({c.num_epochs})",
    )
    need(
        c.schedule.name != "step" or len(c.schedule.boundaries_epochs) > 0,
        "config.schedule.name='step' needs config.schedule.boundaries_epochs",
    )
    need(
        c.optim.name != "adamw" or c.optim.weight_decay == 0 or c.optim.decoupled,
        "config.optim: adamw has its own decay; set optim.decoupled=True or use adam",
    )
    need(
        not c.data.augment or c.data.name in ("cifar10", "cifar100", "svhn"),
        f"config.data.augment (random crop + flip) is for image data sets, not {c.data.name!r}",
    )
    for name in ("eval_every_epochs", "log_every_steps", "eval_batch_size"):
        need(c[name] >= 1, f"config.{name} must be >= 1, got {c[name]}")
    need(c.eval_train_examples >= 0, "config.eval_train_examples must be >= 0 (0 = all)")
    need(c.num_devices >= 0, "config.num_devices must be >= 0 (0 = all)")
    need(
        c.data.max_train is None or c.data.max_train >= 1,
        f"config.data.max_train must be >= 1, got {c.data.max_train}",
    )
    need(c.checkpoint.keep >= 1, f"config.checkpoint.keep must be >= 1, got {c.checkpoint.keep}")
    need(c.checkpoint.every_steps >= 0, "config.checkpoint.every_steps must be >= 0 (0 = off)")
    need(c.checkpoint.every_epochs >= 1, "config.checkpoint.every_epochs must be >= 1")
    bm = c.checkpoint.best_metric
    need(
        bm == "auto" or _is_metric(bm, ("train", "val")),
        f"config.checkpoint.best_metric must be 'auto' or one of "
        f"{', '.join(f'{s}/{m}' for s in ('train', 'val') for m in EVAL_METRICS)} (never the "
        f"test set), got {bm!r}",
    )
    need(
        not str(bm).startswith("val/") or c.data.validation_fraction > 0,
        "config.checkpoint.best_metric uses val/ but config.data.validation_fraction is 0",
    )
    o = c.optim
    need(0 <= o.momentum < 1, f"config.optim.momentum must be in [0, 1), got {o.momentum}")
    need(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "config.optim.b1 and b2 must be in [0, 1)")
    need(o.eps > 0, "config.optim.eps must be > 0")
    need(o.grad_clip_norm >= 0, "config.optim.grad_clip_norm must be >= 0 (0 = off)")
    s = c.schedule
    need(s.decay_factor > 0, "config.schedule.decay_factor must be > 0")
    need(s.plateau_patience >= 1, "config.schedule.plateau_patience must be >= 1 (epochs)")
    need(0 < s.plateau_factor <= 1, "config.schedule.plateau_factor must be in (0, 1]")
    need(s.base_batch_size >= 0, "config.schedule.base_batch_size must be >= 0 (0 = off)")
    need(
        all(b > 0 for b in s.boundaries_epochs),
        "config.schedule.boundaries_epochs must be positive",
    )
    need(c.early_stop.patience >= 0, "config.early_stop.patience must be >= 0 (0 = off)")
    if c.early_stop.patience:
        need(
            _is_metric(c.early_stop.metric, ("train", "val", "test")),
            f"config.early_stop.metric must be <train|val|test>/<"
            f"{'|'.join(EVAL_METRICS)}>, got {c.early_stop.metric!r}",
        )
        need(
            not c.early_stop.metric.startswith("val/") or c.data.validation_fraction > 0,
            "config.early_stop.metric uses val/ but config.data.validation_fraction is 0",
        )
    if num_devices is not None:
        need(
            c.batch_size % num_devices == 0,
            f"config.batch_size={c.batch_size} is not "
            f"divisible by the number of devices ({num_devices})",
        )


def _is_metric(name, splits) -> bool:
    split, _, metric = str(name).partition("/")
    return split in splits and metric in EVAL_METRICS


# ------------------------------------------------------------------------------- devices


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D ``"data"`` mesh over the first ``num_devices`` devices (0 = all, every host)."""
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ConfigError(
                f"config.num_devices={num_devices} but only {len(devices)} devices are available"
            )
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), ("data",))


def serialize_collectives(mesh: Mesh) -> Callable[[Any], Any]:
    """``block_until_ready`` when ``mesh`` spans several *CPU* devices, identity otherwise.

    XLA:CPU runs each simulated device's part of a program on a shared thread pool; with
    several multi-device programs in flight (async dispatch) on few cores, the all-reduce of one
    can wait forever for a participant whose thread is busy with another (an abort after 40 s
    in ``rendezvous.cc``). Waiting for each step keeps one collective program in flight.
    GPUs and TPUs keep fully asynchronous dispatch.
    """
    if mesh.size > 1 and mesh.devices.flat[0].platform == "cpu":
        return jax.block_until_ready
    return lambda x: x


def replicate(x, mesh: Mesh):
    """A host array (the same on every host) as a global array replicated over ``mesh``."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, P()), lambda idx: x[idx])


# ------------------------------------------------------------------------ optimizer/schedule


def learning_rate_schedule(config, steps_per_epoch: int) -> Callable[[Any], Any]:
    """Step -> learning rate (before any reduce-on-plateau factor).

    With ``schedule.base_batch_size > 0`` the linear scaling rule applies (Goyal et al. 2017):
    the peak rate is ``lr · batch_size / base_batch_size``, reached by a linear warm-up from
    ``lr`` over ``warmup_epochs``.
    """
    s, lr = config.schedule, config.optim.learning_rate
    peak = lr * config.batch_size / s.base_batch_size if s.base_batch_size else lr
    total = config.num_epochs * steps_per_epoch
    warmup = int(round(s.warmup_epochs * steps_per_epoch))
    if s.name == "step":
        boundaries = {int(b * steps_per_epoch): s.decay_factor for b in s.boundaries_epochs}
        main = optax.piecewise_constant_schedule(peak, boundaries)
    elif s.name == "cosine":
        main = optax.cosine_decay_schedule(peak, max(total - warmup, 1))
    else:  # constant, plateau (the plateau factor is applied by the optimizer chain)
        main = optax.constant_schedule(peak)
    if not warmup:
        return main
    start = lr if s.base_batch_size else 0.0
    ramp = optax.linear_schedule(start, peak, warmup)
    if s.name == "step":  # boundaries count from step 0, not from the end of the warm-up
        return optax.join_schedules([ramp, lambda t: main(t + warmup)], [warmup])
    return optax.join_schedules([ramp, main], [warmup])


def make_optimizer(config, steps_per_epoch: int):
    """Returns ``(tx, lr_fn)``: the optax transformation and ``lr_fn(step, opt_state)``."""
    o = config.optim
    sched = learning_rate_schedule(config, steps_per_epoch)
    if o.name == "sgd":
        base = optax.sgd(sched)
    elif o.name in ("momentum", "nesterov"):
        base = optax.sgd(sched, momentum=o.momentum, nesterov=o.name == "nesterov" or o.nesterov)
    elif o.name == "adam":
        base = optax.adam(sched, b1=o.b1, b2=o.b2, eps=o.eps)
    elif o.name == "adamw":
        base = optax.adamw(sched, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    elif o.name == "rmsprop":
        base = optax.rmsprop(sched, eps=o.eps, momentum=o.momentum or None)
    else:
        base = optax.adagrad(sched, eps=o.eps)
    parts = []
    if o.proximal:  # Keskar et al.'s conservative training: proximal sub-problems
        parts.append(optim.proximal(o.proximal, o.proximal_inner_steps))
    if o.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
    parts.append(base)
    if config.schedule.name == "plateau":
        # Patience counts epochs: the per-step training loss is averaged over one epoch.
        parts.append(
            optax.contrib.reduce_on_plateau(
                factor=config.schedule.plateau_factor,
                patience=config.schedule.plateau_patience,
                accumulation_size=steps_per_epoch,
            )
        )
    tx = optax.chain(*parts)
    plateau_index = len(parts) - 1 if config.schedule.name == "plateau" else None

    def lr_fn(step, opt_state):
        lr = sched(step)
        if plateau_index is not None:
            lr = lr * opt_state[plateau_index].scale
        return lr

    return tx, lr_fn


# ------------------------------------------------------------------------------ the steps


def classification_loss(model, weight_decay: float = 0.0) -> TrainLoss:
    """The default training loss: mean cross-entropy (+ ``weight_decay · l2_penalty``).

    Returns ``loss(params, model_state, batch, key) -> (objective, aux)``, the `TrainLoss`
    protocol: the model runs in training mode (batch statistics, dropout from ``key``);
    ``aux["model_state"]`` holds the updated BatchNorm statistics and the other entries of
    ``aux`` (``loss``, ``accuracy``) are logged as ``train/<name>``.
    """

    def loss(params, model_state, batch, key):
        logits, model_state = losses.train_forward(model, params, model_state, batch["x"], key)
        data_loss = losses.cross_entropy(logits, batch["y"])
        objective = data_loss
        if weight_decay:
            objective = objective + weight_decay * losses.l2_penalty(params)
        aux = {
            "model_state": model_state,
            "loss": data_loss,
            "accuracy": losses.accuracy(logits, batch["y"]),
        }
        return objective, aux

    return loss


def make_train_step(
    loss_fn: TrainLoss,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    lr_fn: Callable[[Any, Any], Any] | None = None,
    log_every: int = 1,
):
    """``train_step(state, batch) -> (state, metrics)``, jitted once with the state donated.

    Args:
      loss_fn: a `TrainLoss` (e.g. `classification_loss`, or a research loss).
      tx: any optax transformation; ``tx.update`` receives the params and ``value=objective``
        (for ``reduce_on_plateau``).
      mesh: the batch arrives sharded along its ``"data"`` axis; the state stays replicated.
      lr_fn: optional ``lr_fn(step, opt_state)`` logged as ``train/learning_rate``.
      log_every: ``train/grad_norm`` (one more pass over all gradients, ~10% of an F1 step on a
        CPU) is computed only on steps that end a multiple of ``log_every`` (0 elsewhere).

    Metrics (prefixed ``train/``: ``objective``, the scalars of the loss's aux, ``grad_norm``,
    ``learning_rate``) are computed inside the step and stay on device until a log step.
    """

    tx = optax.with_extra_args_support(tx)  # a plain transform ignores value=

    def step(state: TrainState, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (objective, aux), grads = grad_fn(state.params, state.batch_stats, batch, key)
        aux = dict(aux)
        stats = aux.pop("model_state", state.batch_stats)
        updates, opt_state = tx.update(grads, state.opt_state, state.params, value=objective)
        params = optax.apply_updates(state.params, updates)
        on_log_step = (state.step + 1) % log_every == 0
        grad_norm = jax.lax.cond(
            on_log_step, optax.tree.norm, lambda g: jnp.zeros((), jnp.float32), grads
        )
        metrics = {"train/objective": objective, "train/grad_norm": grad_norm}
        metrics.update({f"train/{k}": v for k, v in aux.items()})
        if lr_fn is not None:
            metrics["train/learning_rate"] = lr_fn(state.step, state.opt_state)
        new = state.replace(
            step=state.step + 1, params=params, batch_stats=stats, opt_state=opt_state
        )
        return new, metrics

    return jax.jit(step, donate_argnums=0, out_shardings=NamedSharding(mesh, P()))


def make_eval_step(model, mesh: Mesh, batch_size: int):
    """``eval_step(state, x, y, w, i)``: sums of loss, correct predictions and weights over
    batch ``i`` of the padded, replicated eval arrays (``w`` masks the padding)."""

    def step(state: TrainState, x, y, w, i):
        def take(a):
            out = jax.lax.dynamic_slice_in_dim(a, i * batch_size, batch_size)
            return jax.lax.with_sharding_constraint(out, NamedSharding(mesh, P("data")))

        bx, by, bw = take(x), take(y), take(w)
        logits = model.apply(state.variables(), bx, train=False)
        ce = losses.cross_entropy_per_example(logits, by)
        bw = jnp.broadcast_to(bw.reshape(bw.shape + (1,) * (ce.ndim - 1)), ce.shape)
        correct = (jnp.argmax(logits, -1) == by).astype(jnp.float32)
        return {
            "loss": jnp.sum(ce * bw),
            "correct": jnp.sum(correct * bw),
            "count": jnp.sum(bw),
        }

    return jax.jit(step, out_shardings=NamedSharding(mesh, P()))


def make_get_batch(mesh: Mesh, augment: bool):
    """``get_batch(x, y, perm, i, key, step)``: batch ``i`` of an epoch permutation, gathered
    on device from the replicated training arrays, augmented, and sharded over ``"data"``."""

    def get(x, y, perm, i, key, step):
        idx = jax.lax.dynamic_index_in_dim(perm, i, keepdims=False)
        bx, by = x[idx], y[idx]
        if augment:
            bx = data_lib.random_crop_flip(jax.random.fold_in(key, step), bx)
        return {"x": bx, "y": by}

    return jax.jit(get, out_shardings=NamedSharding(mesh, P("data")))


class Evaluator:
    """Loss and accuracy of a state on a fixed example set, with one compiled step."""

    def __init__(self, eval_step, x, y, batch_size: int, mesh: Mesh):
        n = len(x)
        padded = -(-n // batch_size) * batch_size
        pad = [(0, padded - n)] + [(0, 0)] * (x.ndim - 1)
        self.num_batches = padded // batch_size
        self.x = replicate(np.pad(x, pad), mesh)
        self.y = replicate(np.pad(y, pad[: y.ndim]), mesh)
        self.w = replicate(np.pad(np.ones(n, np.float32), (0, padded - n)), mesh)
        self.eval_step = eval_step
        self.size = n
        self.sync = serialize_collectives(mesh)

    def __call__(self, state) -> dict[str, float]:
        parts = [
            self.sync(self.eval_step(state, self.x, self.y, self.w, i))
            for i in range(self.num_batches)
        ]
        sums = jax.device_get(jax.tree.map(lambda *a: sum(a), *parts))
        count = max(float(sums["count"]), 1.0)
        return {"loss": float(sums["loss"]) / count, "accuracy": float(sums["correct"]) / count}


# -------------------------------------------------------------------------- hooks


class HookResult(NamedTuple):
    """What a hook may return: scalars to log and/or a replacement `TrainState`."""

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
    """

    fn: Callable[[LoopContext], Any]
    every_steps: int | None = None
    every_epochs: int | None = None
    name: str = "hook"
    until_step: int | None = None  # the step schedule stops after this step (None: never)
    at_start: bool = False  # also before the first step of a fresh run (step 0)

    def due(self, when: str, step: int, epoch: int) -> bool:
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
    """

    def __init__(self, patience: int, factor: float = 0.1, metric: str = "val/loss"):
        if patience < 1 or not 0 < factor < 1:
            raise ValueError(f"need patience >= 1 and 0 < factor < 1, got {patience}, {factor}")
        self.patience, self.factor, self.metric = patience, factor, metric

    def drops(self, history: list[dict]) -> list[int]:
        """Indices of the evaluations in ``history`` after which the rate drops."""
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
    """What a hook sees: the current state and where the loop is."""

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
        ``workdir/arrays/<name>/<step>.npz`` (process 0 only); returns the path."""
        return save_arrays(self.workdir, name, self.step, **arrays)


def save_arrays(workdir: str, name: str, step: int, **arrays) -> str:
    """``workdir/arrays/<name>/<step:08d>.npz``, written atomically (process 0 only)."""
    path = os.path.join(workdir, "arrays", name, f"{step:08d}.npz")
    if jax.process_index() == 0:
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(jax.device_get(v)) for k, v in arrays.items()})
        files.write_atomic(path, buf.getvalue())
    return path


def run_hooks(hooks: Sequence[Hook], when: str, ctx: LoopContext) -> tuple[TrainState, dict]:
    """Runs the hooks due at ``ctx.step`` / ``ctx.epoch``; returns the (possibly replaced)
    state and the scalars they returned.

    Raises:
      ValueError: a hook returned a state of another structure, or something else.
    """
    metrics = {}
    for h in hooks:
        if not h.due(when, ctx.step, ctx.epoch):
            continue
        out = h.fn(ctx)
        if isinstance(out, TrainState):
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
            ctx.state = _conform(h.name, ctx.state, out.state)
        metrics.update(out.metrics or {})
    return ctx.state, metrics


def _conform(name: str, old: TrainState, new: TrainState) -> TrainState:
    """``new`` with ``old``'s dtypes and shardings (so the jitted step does not recompile);
    raises ValueError when the tree structure or a leaf shape differs."""
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


# -------------------------------------------------------------------------- progress, metrics


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """The console of one run: one line updated in place, and one line per evaluation.

    Steps/s counts training steps over the time spent in training steps only: the loop calls
    `pause` (after the steps so far have finished) before evaluation, hooks and checkpoints,
    and `resume` after them. On a terminal the progress line is rewritten in place; elsewhere
    (logs, notebooks' captured output) it is printed at most every ``interval`` seconds.
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
        self._t, self._step, self._shown, self._last_print = None, step, False, 0.0

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
        for key, fmt in (("train/loss", "loss {:.4f}"), ("train/accuracy", "acc {:.2%}")):
            if key in record:
                text += "  " + fmt.format(record[key])
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        text += f"  | {rate:.1f} steps/s"
        if math.isfinite(eta):
            text += f"  ETA {_fmt_time(eta)}"
        if self.tty:
            self.stream.write("\r" + text.ljust(100)[:160])
            self.stream.flush()
            self._shown = True
        else:
            self.log(text)

    def message(self, text: str) -> None:
        """A line of its own (clears the in-place line first)."""
        if self._shown:
            self.stream.write("\r" + " " * 160 + "\r")
            self._shown = False
        self.log(text)


class MetricsBuffer:
    """Per-step metrics kept on device until a log step; then fetched, checked and averaged."""

    def __init__(self, steps_per_epoch: int, log_every: int):
        self.pending: list[tuple[int, dict]] = []
        self.steps_per_epoch, self.log_every = steps_per_epoch, log_every

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def flush(self, step: int, epoch: int, last_checkpoint) -> dict | None:
        """The averaged record of the pending steps (None if there are none).

        Raises:
          NonFiniteError: the objective of some step was NaN/Inf (naming the first such step).
        """
        if not self.pending:
            return None
        fetched = jax.device_get([m for _, m in self.pending])
        for (s, _), mets in zip(self.pending, fetched):
            value = float(mets["train/objective"])
            if not math.isfinite(value):
                raise NonFiniteError(
                    f"training loss became {value} at step {s} (epoch "
                    f"{(s - 1) // self.steps_per_epoch + 1}); last checkpoint: "
                    f"{'none yet' if last_checkpoint is None else f'step {last_checkpoint}'}. "
                    "Lower the learning rate or check the data."
                )
        avg = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        avg.pop("train/grad_norm")  # measured on log steps only (see make_train_step)
        if step % self.log_every == 0:
            avg["train/grad_norm"] = float(fetched[-1]["train/grad_norm"])
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


# ------------------------------------------------------------------------------ checkpoints


def best_metric(config) -> str:
    """The metric that picks the best checkpoint (``"auto"``: val/accuracy if there is a
    validation split, else train/accuracy — never the test set)."""
    m = config.checkpoint.best_metric
    if m == "auto":
        return "val/accuracy" if config.data.validation_fraction > 0 else "train/accuracy"
    return m


class Checkpointer:
    """The last ``config.checkpoint.keep`` states (``checkpoints/``) and the best one by
    `best_metric` (``checkpoint_best/``), saved synchronously with orbax."""

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

    def save(self, state: TrainState, metrics: dict | None = None) -> None:
        """Saves ``state`` as the latest (once per step) and, given evaluation ``metrics``
        holding a finite `best_metric`, as the best candidate."""
        s = int(state.step)
        if self.last.latest_step() != s:
            self.last.save(s, args=self._ocp.args.StandardSave(state))
        value = (metrics or {}).get(self.metric)
        if value is not None and math.isfinite(value):
            self.best.save(s, args=self._ocp.args.StandardSave(state), metrics={self.metric: value})

    def close(self) -> None:
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
    finally:
        gc.collect()  # failed reader tasks complain when collected: let them do it now
        sys.unraisablehook = hook
        logging.disable(logging.NOTSET)


def _from_orbax(tb) -> bool:
    while tb is not None:
        if "orbax" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


class _OrbaxReadNoise(logging.Filter):
    def filter(self, record):
        return "orbax" not in record.getMessage() and "async_deserialize" not in str(record.msg)


_noise_dropped = False


def _drop_orbax_read_noise() -> None:
    """After a checkpoint failed to read, orbax's abandoned reader tasks complain whenever they
    are garbage-collected ("Task exception was never retrieved", "Exception ignored in ...") —
    possibly long after the restore. Drop those (and only those) for the rest of the process;
    the failure itself was reported in one line."""
    global _noise_dropped
    if _noise_dropped:
        return
    _noise_dropped = True
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _from_orbax(getattr(unraisable.exc_value, "__traceback__", None)):
            previous(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_OrbaxReadNoise())


def _first_line(error: BaseException, limit: int = 160) -> str:
    text = next((ln.strip() for ln in str(error).splitlines() if ln.strip()), "")
    text = text.split(" See full")[0]  # TensorStore appends its whole spec
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def restore_checkpoint(directory: str, target: TrainState, step: int | None = None):
    """Restores a `TrainState` from an orbax folder (latest step unless ``step`` is given),
    with the shardings of ``target``. Returns None when the folder has no checkpoint."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(os.path.abspath(directory)) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        return mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def restore_or_init(checkpointer: Checkpointer, model, tx, sample_x, key, mesh: Mesh, log=None):
    """``(state, resumed_from)``: the newest checkpoint that restores if there is one (see
    `Checkpointer.restore_latest`), else a fresh `init_state`; replicated over ``mesh``."""
    state = init_state(model, tx, sample_x, key)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    restored = checkpointer.restore_latest(state, log=log)
    if restored is None:
        return state, 0
    return restored, int(restored.step)


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: the final state, the model, the data and the evaluation history."""

    state: TrainState
    model: Any
    data: Any
    history: list[dict]
    final: dict
    resumed_from: int
    stopped_early: bool = False


def load_data(config):
    """``sharp_minima.data.load`` with the fields of ``config.data``."""
    d = config.data
    return data_lib.load(
        d.name,
        data_dir=d.data_dir,
        idx_dir=d.idx_dir,
        validation_fraction=d.validation_fraction,
        seed=d.seed if d.seed is not None else config.seed,
        allow_download=d.allow_download,
        max_train=d.max_train,
        **dict(d.options),
    )


def build_model(config, data):
    """The model of ``config.model`` sized for ``data`` (number of classes)."""
    return get_model(config.model.name, num_classes=data.num_classes, **dict(config.model.kwargs))


def run_keys(config) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(init_key, data_key, aug_key)`` of a run: initialisation, shuffling, augmentation."""
    return tuple(jax.random.split(jax.random.key(config.seed), 3))


def initial_params(config, model, sample_x):
    """The parameters `train` starts ``config`` from (e.g. for the distance travelled)."""
    init_key, _ = jax.random.split(run_keys(config)[0])
    return model.init({"params": init_key, "dropout": init_key}, sample_x, train=False)["params"]


def init_state(model, tx, sample_x, key) -> TrainState:
    """Initial `TrainState` (on the host's default device; `train` replicates it)."""
    init_key, loop_key = jax.random.split(key)
    variables = model.init({"params": init_key, "dropout": init_key}, sample_x, train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        # Copies: some transforms (optax.lbfgs) reuse one buffer in several state leaves,
        # which a donating step cannot take.
        opt_state=jax.tree.map(jnp.array, tx.init(params)),
        key=jax.random.key_data(loop_key),
    )


def make_evaluators(config, model, data, mesh: Mesh) -> dict[str, Evaluator]:
    """Loss and accuracy on the training subset (``eval_train_examples``), the validation
    split (if any) and the test set, in evaluation mode, each with one compiled step."""
    ebs = config.eval_batch_size - config.eval_batch_size % mesh.size or mesh.size
    step = make_eval_step(model, mesh, ebs)
    m = config.eval_train_examples or len(data.x_train)
    out = {"train": Evaluator(step, data.x_train[:m], data.y_train[:m], ebs, mesh)}
    if data.x_val is not None:
        out["val"] = Evaluator(step, data.x_val, data.y_val, ebs, mesh)
    out["test"] = Evaluator(step, data.x_test, data.y_test, ebs, mesh)
    return out


def evaluate(evaluators: dict[str, Evaluator], state: TrainState, epoch: int) -> dict:
    """One evaluation record ``{"step", "epoch", "<split>/loss", "<split>/accuracy", ...}``."""
    rec = {"step": int(state.step), "epoch": epoch}
    for split, ev in evaluators.items():
        for k, v in ev(state).items():
            rec[f"{split}/{k}"] = v
    return rec


def _config_dict(config) -> dict:
    return json.loads(config.to_json_best_effort())


def check_resumable(workdir: str, config) -> None:
    """Refuses a config whose `TRAINING_FIELDS` differ from those of the checkpointed run in
    ``workdir``. A workdir without a checkpoint (e.g. a run that failed before its first
    checkpoint) accepts any config.

    Raises:
      ConfigError: naming the fields that differ.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path) or not _has_checkpoint(workdir):
        return
    with open(path) as f:
        old = json.load(f)
    new = _config_dict(config)
    diff = sorted(k for k in TRAINING_FIELDS if old.get(k) != new.get(k))
    if diff:
        raise ConfigError(
            f"{workdir} holds a run with a different config (fields differ: {', '.join(diff)}); "
            "use another --workdir, or delete it to start over"
        )


def _has_checkpoint(workdir: str) -> bool:
    folder = os.path.join(workdir, "checkpoints")
    return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def _optimizer(config, steps_per_epoch: int, tx):
    """``(tx, lr_fn)``: the config's optimizer, or the injected ``tx`` (whose learning rate is
    logged when it carries an ``inject_hyperparams`` ``learning_rate``)."""
    if tx is None:
        return make_optimizer(config, steps_per_epoch)
    try:
        probe = jax.eval_shape(tx.init, {"w": jax.ShapeDtypeStruct((1,), jnp.float32)})
    except (ValueError, TypeError):  # a transform that needs the real params' shapes
        return tx, None
    if optax.tree_utils.tree_get(probe, "learning_rate") is None:
        return tx, None
    return tx, lambda step, opt_state: optax.tree_utils.tree_get(opt_state, "learning_rate")


def train(
    config,
    workdir: str,
    *,
    loss_fn: TrainLoss | None = None,
    tx: optax.GradientTransformation | None = None,
    hooks: Sequence[Hook] = (),
    data=None,
    log: Callable[[str], None] | None = None,
    label: str = "",
    init_variables: dict | None = None,
) -> TrainResult:
    """Trains ``config`` into ``workdir``; resumes from the latest checkpoint there.

    Args:
      config: a ``ConfigDict`` of ``configs/`` (see ``configs/base.py``).
      workdir: output folder (config.json, metrics.jsonl, checkpoints/, checkpoint_best/,
        arrays/ written by hooks).
      loss_fn: a `TrainLoss` ``(params, model_state, batch, key) -> (objective, aux)``
        (default: `classification_loss` of the config's model with its weight decay). Build
        the model with `build_model` to write one.
      tx: an optax transformation (default: `make_optimizer` from the config).
      hooks: `Hook` s called during the loop; they may replace the state.
      data: a preloaded `sharp_minima.data.Dataset` (default: ``load_data(config)``).
      log: line printer (default: the console, with an in-place progress line on a terminal;
        silent on hosts other than process 0).
      label: prefix of the progress line (e.g. the run's name in a study).
      init_variables: start from these ``{"params": ..., "batch_stats": ...}`` (e.g. another
        run's ``result.state.variables()``) instead of a random initialisation, with a fresh
        optimizer state and step 0; ignored when ``workdir`` has a checkpoint to resume.

    Returns:
      `TrainResult`.

    Raises:
      ConfigError: bad config (before any compilation). DataNotFoundError: no data.
      NonFiniteError: NaN/Inf loss, naming the step.
    """
    main_host = jax.process_index() == 0
    if not main_host:
        log = lambda s: None  # noqa: E731
    mesh = make_mesh(config.num_devices)
    validate_config(config, mesh.size)
    lock = files.workdir_lock(workdir, log=log) if main_host else contextlib.nullcontext()
    with lock:
        return _train_locked(
            config, workdir, mesh, loss_fn, tx, hooks, data, log, label, init_variables
        )


def _train_locked(
    config, workdir, mesh, loss_fn, tx, hooks, data, log, label, init_variables
) -> TrainResult:
    main_host = jax.process_index() == 0
    check_resumable(workdir, config)
    data = load_data(config) if data is None else data
    n = len(data.x_train)
    if config.batch_size > n:
        raise ConfigError(
            f"config.batch_size={config.batch_size} exceeds the {n} training "
            f"examples of {data.name}"
        )
    steps_per_epoch = n // config.batch_size
    total_steps = steps_per_epoch * config.num_epochs
    if main_host:
        files.write_json(os.path.join(workdir, "config.json"), _config_dict(config))

    model = build_model(config, data)
    tx, lr_fn = _optimizer(config, steps_per_epoch, tx)
    loss_fn = classification_loss(model, config.optim.weight_decay) if loss_fn is None else loss_fn
    init_key, data_key, aug_key = run_keys(config)
    checkpointer = Checkpointer(workdir, config)
    state, resumed_from = restore_or_init(
        checkpointer, model, tx, jnp.asarray(data.x_train[:1]), init_key, mesh, log=log or print
    )
    if init_variables is not None and not resumed_from:
        # Copies: the training step donates its state, and the caller keeps its arrays.
        params = jax.tree.map(jnp.array, init_variables["params"])
        start = state.replace(
            params=params,
            batch_stats=jax.tree.map(jnp.array, init_variables.get("batch_stats", {})),
            opt_state=jax.tree.map(jnp.array, tx.init(params)),
        )
        try:
            state = _conform("init_variables", state, start)
        except ValueError:
            raise ValueError(
                "init_variables do not match the model's parameters (structure or shapes)"
            ) from None
    metrics_log = MetricsLog(os.path.join(workdir, "metrics.jsonl"), enabled=main_host)
    # Records logged after the checkpoint are dropped: the resumed run writes them again.
    history = [r for r in metrics_log.truncate_after(resumed_from) if "test/loss" in r]
    progress = Progress(
        total_steps, resumed_from, label=label, enabled=config.progress and main_host, log=log
    )
    if resumed_from:
        progress.message(f"{label}resumed from step {resumed_from} ({workdir}/checkpoints)")
    progress.message(
        f"{label}training {config.model.name} on {data.name} ({data.source}): {n} examples, "
        f"batch {config.batch_size}, {steps_per_epoch} steps/epoch x {config.num_epochs} "
        f"epochs on {mesh.size} device(s) [{jax.devices()[0].platform}]"
    )
    loop = _Loop(
        config=config,
        workdir=workdir,
        model=model,
        data=data,
        mesh=mesh,
        hooks=hooks,
        checkpointer=checkpointer,
        metrics_log=metrics_log,
        progress=progress,
        history=history,
        train_step=make_train_step(
            loss_fn, tx, mesh, lr_fn=lr_fn, log_every=config.log_every_steps
        ),
        evaluators=make_evaluators(config, model, data, mesh),
        steps_per_epoch=steps_per_epoch,
        data_key=data_key,
        aug_key=aug_key,
    )
    try:
        state, stopped_early = loop.run(state, resumed_from)
    finally:
        checkpointer.close()
    final = history[-1] if history else evaluate(loop.evaluators, state, loop.epoch_of(state))
    return TrainResult(state, model, data, history, final, resumed_from, stopped_early)


@dataclasses.dataclass
class _Loop:
    """The epoch/step loop of `train` (one object so that its pieces share the run's parts)."""

    config: Any
    workdir: str
    model: Any
    data: Any
    mesh: Mesh
    hooks: Sequence[Hook]
    checkpointer: Checkpointer
    metrics_log: MetricsLog
    progress: Progress
    history: list[dict]
    train_step: Callable
    evaluators: dict[str, Evaluator]
    steps_per_epoch: int
    data_key: jax.Array
    aug_key: jax.Array

    def __post_init__(self):
        self.buffer = MetricsBuffer(self.steps_per_epoch, self.config.log_every_steps)
        self.get_batch = make_get_batch(self.mesh, self.config.data.augment)
        self.x_train = replicate(self.data.x_train, self.mesh)
        self.y_train = replicate(self.data.y_train, self.mesh)
        self.sync = serialize_collectives(self.mesh)

    def epoch_of(self, state) -> int:
        return int(state.step) // self.steps_per_epoch

    def _context(self, state, step, epoch) -> LoopContext:
        return LoopContext(
            state,
            step,
            epoch,
            self.steps_per_epoch,
            self.model,
            self.data,
            self.config,
            self.workdir,
            self.history,
        )

    def _flush(self, step, epoch):
        rec = self.buffer.flush(step, epoch, self.checkpointer.latest_step())
        if rec is not None:
            rate = self.progress.current_rate(step)
            self.metrics_log.write({**rec, "train/steps_per_sec": rate})
            self.progress.update(step, epoch, self.config.num_epochs, rec)

    def _hooks(self, when, state, step, epoch):
        if not any(h.due(when, step, epoch) for h in self.hooks):
            return state, {}
        return run_hooks(self.hooks, when, self._context(state, step, epoch))

    def _end_of_epoch(self, state, step, epoch) -> tuple[TrainState, bool]:
        """Evaluation, epoch hooks, checkpoint; True when early stopping ends the run."""
        c = self.config
        if epoch % c.eval_every_epochs and epoch != c.num_epochs:
            state, extra = self._hooks("epoch", state, step, epoch)
            if extra:
                self.metrics_log.write({"step": step, "epoch": epoch, **extra})
            if epoch % c.checkpoint.every_epochs == 0:
                self.checkpointer.save(state)
            return state, False
        rec = evaluate(self.evaluators, state, epoch)
        self.history.append(rec)  # epoch hooks see this evaluation in ctx.history
        state, extra = self._hooks("epoch", state, step, epoch)
        rec.update(extra)
        self.metrics_log.write(rec)
        shown = "  ".join(
            f"{k} {v:.4f}" for k, v in rec.items() if "/" in k and isinstance(v, float)
        )
        self.progress.message(
            f"{self.progress.label}epoch {epoch}/{c.num_epochs}: {shown}  "
            f"({self.progress.rate:.1f} steps/s)"
        )
        self.checkpointer.save(state, rec)
        if should_stop_early(c, self.history):
            self.progress.message(
                f"{self.progress.label}early stop: {c.early_stop.metric} did not improve for "
                f"{c.early_stop.patience} evaluations"
            )
            return state, True
        return state, False

    def run(self, state, resumed_from: int) -> tuple[TrainState, bool]:
        with _deferred_interrupt() as interrupt:
            self.interrupt = interrupt
            return self._run(state, resumed_from)

    def _run(self, state, resumed_from: int) -> tuple[TrainState, bool]:
        c, spe = self.config, self.steps_per_epoch
        step = resumed_from
        first_step = resumed_from + 1
        # A run that had stopped early stays stopped when the command is run again.
        if resumed_from and should_stop_early(c, self.history):
            self.progress.message(f"already stopped early at step {resumed_from}")
            return state, True
        if not resumed_from:
            state, extra = self._hooks("start", state, 0, 0)
            if extra:
                self.metrics_log.write({"step": 0, "epoch": 0, **extra})
        try:
            for epoch0 in range(resumed_from // spe, c.num_epochs):
                epoch = epoch0 + 1
                perm = data_lib.epoch_permutation(
                    jax.random.fold_in(self.data_key, epoch0),
                    len(self.data.x_train),
                    c.batch_size,
                )
                self.progress.resume(step)
                for i in range(step - epoch0 * spe, spe):
                    batch = self.get_batch(self.x_train, self.y_train, perm, i, self.aug_key, step)
                    state, mets = self.sync(self.train_step(state, batch))
                    step += 1
                    if step == first_step:  # steps/s leaves out the step that compiled
                        jax.block_until_ready(state.step)
                        self.progress.resume(step)
                    self.buffer.add(step, mets)
                    if self.interrupt.requested:  # Ctrl-C: stop here, between two steps
                        raise KeyboardInterrupt
                    if step % c.log_every_steps == 0:
                        self._flush(step, epoch)
                    saving = c.checkpoint.every_steps and step % c.checkpoint.every_steps == 0
                    if saving or any(h.due("step", step, epoch) for h in self.hooks):
                        self._flush(step, epoch)
                        self.progress.pause(state, step)
                        state, extra = self._hooks("step", state, step, epoch)
                        if extra:
                            self.metrics_log.write({"step": step, "epoch": epoch, **extra})
                        if saving:
                            self.checkpointer.save(state)
                        self.progress.resume(step)
                self._flush(step, epoch)
                self.progress.pause(state, step)
                state, stop = self._end_of_epoch(state, step, epoch)
                if stop:
                    return state, True
                if self.interrupt.requested:
                    raise KeyboardInterrupt
        except StopTraining as e:
            self._flush(step, step // spe + 1)
            self.progress.message(f"{self.progress.label}stopped by a hook at step {step}: {e}")
            self.checkpointer.save(state)
            return state, True
        except KeyboardInterrupt:
            # Lose nothing: keep the last completed step (if its buffers are still alive).
            try:
                self.checkpointer.save(state)
                where = f"at step {int(state.step)}"
            except Exception:  # the state may have been donated to a step that never finished
                where = (
                    f"at step {step} (resumes from checkpoint {self.checkpointer.latest_step()})"
                )
            raise Interrupted(
                f"{self.progress.label}interrupted {where}; rerun the same command to resume"
            ) from None
        return state, False


class _InterruptFlag:
    requested = False


@contextlib.contextmanager
def _deferred_interrupt():
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


def should_stop_early(config, history) -> bool:
    """True when ``early_stop.metric`` has not improved by ``min_delta`` for ``patience``
    evaluations (computed from the logged history, so it survives a resume)."""
    es = config.early_stop
    if not es.patience:
        return False
    values = [r[es.metric] for r in history if es.metric in r]
    if len(values) <= es.patience:
        return False
    sign = 1.0 if es.metric.endswith("loss") else -1.0  # minimise losses, maximise the rest
    best_before = min(sign * v for v in values[: -es.patience])
    recent = min(sign * v for v in values[-es.patience :])
    return recent > best_before - es.min_delta
