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
- `Hook` — a callable run every N steps or epochs inside the loop (curvature tracking plugs in
  here); it may return metrics to log or raise `StopTraining`.

Weight decay is the L2 term ``λ/2 ‖w‖²`` added to the loss (kernels and embeddings only), as in
Keskar et al. (2017) and Jastrzębski et al. (2019).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

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
RESUMABLE_CHANGES = ("num_epochs", "log_every_steps", "checkpoint", "progress", "early_stop")


class ConfigError(ValueError):
    """The config names something unknown or asks for an impossible combination."""


class NonFiniteError(FloatingPointError):
    """The training loss became NaN or Inf; the message names the step."""


class StopTraining(Exception):
    """Raised by a hook (or early stopping) to end training after the current step."""


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
    if c.early_stop.patience:
        need(
            c.early_stop.metric.split("/")[0] in ("train", "val", "test"),
            f"config.early_stop.metric must be train/..., val/... or test/..., got "
            f"{c.early_stop.metric!r}",
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


def make_loss(model, weight_decay: float):
    """``loss(params, batch_stats, batch, key, train) -> (objective, (data_loss, logits, stats))``.

    The objective is the mean cross-entropy plus ``weight_decay · l2_penalty(params)``.
    """

    def loss(params, batch_stats, batch, key, train):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        if train:
            logits, updates = model.apply(
                variables, batch["x"], train=True, mutable=["batch_stats"], rngs={"dropout": key}
            )
            new_stats = updates.get("batch_stats", batch_stats)
        else:
            logits, new_stats = model.apply(variables, batch["x"], train=False), batch_stats
        data_loss = losses.cross_entropy(logits, batch["y"])
        objective = data_loss
        if weight_decay:
            objective = objective + weight_decay * losses.l2_penalty(params)
        return objective, (data_loss, logits, new_stats)

    return loss


def make_train_step(model, tx, lr_fn, weight_decay: float, mesh: Mesh, log_every: int = 1):
    """``train_step(state, batch) -> (state, metrics)``, jitted once with the state donated.

    The batch arrives sharded along ``"data"``; the state stays replicated. Metrics (prefixed
    ``train/``) are computed inside the step and stay on device until a log step fetches them.
    ``train/grad_norm`` is computed only on steps that end a multiple of ``log_every`` (0
    elsewhere): it is one more pass over all gradients, ~10% of an F1 step on a CPU.
    """
    loss = make_loss(model, weight_decay)

    def step(state: TrainState, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        grad_fn = jax.value_and_grad(loss, has_aux=True)
        (objective, (data_loss, logits, stats)), grads = grad_fn(
            state.params, state.batch_stats, batch, key, True
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params, value=objective)
        params = optax.apply_updates(state.params, updates)
        on_log_step = (state.step + 1) % log_every == 0
        grad_norm = jax.lax.cond(
            on_log_step, optax.tree.norm, lambda g: jnp.zeros((), jnp.float32), grads
        )
        metrics = {
            "train/loss": data_loss,
            "train/objective": objective,
            "train/accuracy": losses.accuracy(logits, batch["y"]),
            "train/grad_norm": grad_norm,
            "train/learning_rate": lr_fn(state.step, state.opt_state),
        }
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


# -------------------------------------------------------------------------- hooks, progress


@dataclasses.dataclass
class Hook:
    """A function called inside the training loop.

    ``fn(ctx: LoopContext) -> dict | None`` runs after step ``s`` when ``every_steps`` divides
    ``s``, and/or after each ``every_epochs``-th epoch (after evaluation). A returned dict of
    (prefixed) scalars is logged to ``metrics.jsonl``; raising `StopTraining` ends the run.
    """

    fn: Callable[[LoopContext], dict | None]
    every_steps: int | None = None
    every_epochs: int | None = None
    name: str = "hook"


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


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


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


def _checkpoint_managers(workdir: str, config):
    import orbax.checkpoint as ocp

    opts = dict(enable_async_checkpointing=False, create=True)
    last = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.keep, **opts),
    )
    metric = best_metric(config)
    mode = "min" if metric.endswith("loss") else "max"
    best = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoint_best"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1,
            best_fn=lambda m: m[metric],
            best_mode=mode,
            keep_checkpoints_without_metrics=False,
            **opts,
        ),
    )
    return last, best


def best_metric(config) -> str:
    """The metric that picks the best checkpoint (``"auto"``: val/accuracy if there is a
    validation split, else train/accuracy — never the test set)."""
    m = config.checkpoint.best_metric
    if m == "auto":
        return "val/accuracy" if config.data.validation_fraction > 0 else "train/accuracy"
    return m


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


def init_state(model, tx, sample_x, key) -> TrainState:
    """Initial `TrainState` (on the host's default device; `train` replicates it)."""
    init_key, loop_key = jax.random.split(key)
    variables = model.init({"params": init_key, "dropout": init_key}, sample_x, train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        key=jax.random.key_data(loop_key),
    )


def _config_dict(config) -> dict:
    return json.loads(config.to_json_best_effort())


def _check_resumable(workdir: str, config) -> None:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)
    new = _config_dict(config)
    diff = sorted(
        k for k in set(old) | set(new) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k)
    )
    if diff:
        raise ConfigError(
            f"{workdir} holds a run with a different config (fields differ: {', '.join(diff)}); "
            "use another --workdir, or delete it to start over"
        )


def train(
    config,
    workdir: str,
    *,
    hooks: Sequence[Hook] = (),
    data=None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Trains ``config`` into ``workdir``; resumes from the latest checkpoint there.

    Args:
      config: a ``ConfigDict`` of ``configs/`` (see ``configs/base.py``).
      workdir: output folder (config.json, metrics.jsonl, checkpoints/, checkpoint_best/).
      hooks: `Hook` s called during the loop.
      data: a preloaded `sharp_minima.data.Dataset` (default: ``load_data(config)``).
      log: progress printer (default ``print``; silent on hosts other than process 0).

    Returns:
      `TrainResult`.

    Raises:
      ConfigError: bad config (before any compilation). DataNotFoundError: no data.
      NonFiniteError: NaN/Inf loss, naming the step.
    """
    main_host = jax.process_index() == 0
    if log is None:
        log = (lambda s: print(s, flush=True)) if main_host else (lambda s: None)
    mesh = make_mesh(config.num_devices)
    validate_config(config, mesh.size)
    os.makedirs(workdir, exist_ok=True)
    _check_resumable(workdir, config)
    if data is None:
        data = load_data(config)
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
    tx, lr_fn = make_optimizer(config, steps_per_epoch)
    root = jax.random.key(config.seed)
    init_key, data_key, aug_key = jax.random.split(root, 3)
    state = init_state(model, tx, jnp.asarray(data.x_train[:1]), init_key)
    state = jax.device_put(state, NamedSharding(mesh, P()))

    last_mngr, best_mngr = _checkpoint_managers(workdir, config)
    metrics_log = MetricsLog(os.path.join(workdir, "metrics.jsonl"), enabled=main_host)
    resumed_from = 0
    latest = last_mngr.latest_step()
    if latest is not None:
        import orbax.checkpoint as ocp

        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        state = last_mngr.restore(latest, args=ocp.args.StandardRestore(abstract))
        resumed_from = int(state.step)
        log(f"resumed from step {resumed_from} ({workdir}/checkpoints)")
    # Records logged after the checkpoint are dropped: the resumed run writes them again.
    history = [r for r in metrics_log.truncate_after(resumed_from) if "test/loss" in r]

    train_step = make_train_step(
        model, tx, lr_fn, config.optim.weight_decay, mesh, config.log_every_steps
    )
    get_batch = make_get_batch(mesh, config.data.augment)
    ebs = config.eval_batch_size - config.eval_batch_size % mesh.size or mesh.size
    eval_step = make_eval_step(model, mesh, ebs)
    m = config.eval_train_examples or n
    evaluators = {"train": Evaluator(eval_step, data.x_train[:m], data.y_train[:m], ebs, mesh)}
    if data.x_val is not None:
        evaluators["val"] = Evaluator(eval_step, data.x_val, data.y_val, ebs, mesh)
    evaluators["test"] = Evaluator(eval_step, data.x_test, data.y_test, ebs, mesh)
    x_train, y_train = replicate(data.x_train, mesh), replicate(data.y_train, mesh)
    sync = serialize_collectives(mesh)

    def evaluate(state, epoch):
        rec = {"step": int(state.step), "epoch": epoch}
        for split, ev in evaluators.items():
            for k, v in ev(state).items():
                rec[f"{split}/{k}"] = v
        return rec

    def run_hooks(when, step, epoch):
        out = {}
        for h in hooks:
            due = (when == "step" and h.every_steps and step % h.every_steps == 0) or (
                when == "epoch" and h.every_epochs and epoch % h.every_epochs == 0
            )
            if due:
                ctx = LoopContext(
                    state, step, epoch, steps_per_epoch, model, data, config, workdir, history
                )
                res = h.fn(ctx)
                if res:
                    out.update(res)
        return out

    def save(state, metrics=None):
        s = int(state.step)
        if last_mngr.latest_step() != s:
            import orbax.checkpoint as ocp

            last_mngr.save(s, args=ocp.args.StandardSave(state))
        if metrics is not None:
            import orbax.checkpoint as ocp

            bm = best_metric(config)
            if bm in metrics and math.isfinite(metrics[bm]):
                best_mngr.save(s, args=ocp.args.StandardSave(state), metrics={bm: metrics[bm]})

    log(
        f"training {config.model.name} on {data.name} ({data.source}): {n} examples, "
        f"batch {config.batch_size}, {steps_per_epoch} steps/epoch x {config.num_epochs} epochs "
        f"on {mesh.size} device(s) [{jax.devices()[0].platform}]"
    )
    pending: list[tuple[int, dict]] = []
    t_start, step_start = time.time(), resumed_from
    t_window, step_window = t_start, resumed_from
    stopped_early = False
    step = resumed_from

    def flush_metrics(step, epoch):
        nonlocal t_window, step_window
        if not pending:
            return
        fetched = jax.device_get([m for _, m in pending])
        for (s, _), mets in zip(pending, fetched):
            if not math.isfinite(float(mets["train/objective"])):
                raise NonFiniteError(
                    f"training loss became {float(mets['train/objective'])} at step {s} "
                    f"(epoch {s // steps_per_epoch + 1}); last checkpoint: "
                    f"{last_mngr.latest_step()}. Lower the learning rate or check the data."
                )
        avg = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        avg.pop("train/grad_norm")  # measured on log steps only (see make_train_step)
        if step % config.log_every_steps == 0:
            avg["train/grad_norm"] = float(fetched[-1]["train/grad_norm"])
        pending.clear()
        now = time.time()
        rate = (step - step_window) / max(now - t_window, 1e-9)
        overall = (step - step_start) / max(now - t_start, 1e-9)
        t_window, step_window = now, step
        rec = {"step": step, "epoch": epoch, **avg, "train/steps_per_sec": rate}
        metrics_log.write(rec)
        if config.progress:
            eta = (total_steps - step) / max(overall, 1e-9)
            log(
                f"step {step}/{total_steps} epoch {epoch}/{config.num_epochs}  "
                f"loss {avg['train/loss']:.4f}  acc {100 * avg['train/accuracy']:.2f}%  "
                f"lr {avg['train/learning_rate']:.3g}  | {rate:.1f} steps/s  "
                f"ETA {_fmt_time(eta)}"
            )

    # A run that had stopped early stays stopped when the command is run again.
    first_epoch = resumed_from // steps_per_epoch
    if resumed_from and _early_stop(config, history):
        log(f"already stopped early at step {resumed_from} ({config.early_stop.metric})")
        first_epoch, stopped_early = config.num_epochs, True
    try:
        for epoch0 in range(first_epoch, config.num_epochs):
            epoch = epoch0 + 1
            perm = data_lib.epoch_permutation(
                jax.random.fold_in(data_key, epoch0), n, config.batch_size
            )
            for i in range(step - epoch0 * steps_per_epoch, steps_per_epoch):
                batch = get_batch(x_train, y_train, perm, i, aug_key, step)
                state, mets = sync(train_step(state, batch))
                step += 1
                pending.append((step, mets))
                if step % config.log_every_steps == 0:
                    flush_metrics(step, epoch)
                if config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0:
                    flush_metrics(step, epoch)
                    save(state)
                extra = run_hooks("step", step, epoch)
                if extra:
                    metrics_log.write({"step": step, "epoch": epoch, **extra})
            flush_metrics(step, epoch)
            if epoch % config.eval_every_epochs == 0 or epoch == config.num_epochs:
                rec = evaluate(state, epoch)
                rec.update(run_hooks("epoch", step, epoch))
                metrics_log.write(rec)
                history.append(rec)
                log(
                    f"epoch {epoch}: "
                    + "  ".join(
                        f"{k} {v:.4f}" for k, v in rec.items() if "/" in k and isinstance(v, float)
                    )
                )
                save(state, rec)
                if _early_stop(config, history):
                    log(
                        f"early stop: {config.early_stop.metric} did not improve for "
                        f"{config.early_stop.patience} evaluations"
                    )
                    stopped_early = True
                    break
            else:
                save(state)
    except StopTraining as e:
        flush_metrics(step, step // steps_per_epoch + 1)
        log(f"stopped by a hook at step {step}: {e}")
        save(state)
        stopped_early = True
    except KeyboardInterrupt:
        # Lose nothing: keep the last completed step (if its buffers are still alive).
        try:
            save(state)
            log(f"interrupted at step {int(state.step)}; checkpoint saved, rerun to resume")
        except Exception:  # the state may have been donated to a step that never finished
            log("interrupted; rerun to resume from the last checkpoint")
        raise
    finally:
        last_mngr.close()
        best_mngr.close()

    final = history[-1] if history else evaluate(state, step // steps_per_epoch)
    return TrainResult(state, model, data, history, final, resumed_from, stopped_early)


def _early_stop(config, history) -> bool:
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
