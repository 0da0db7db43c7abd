"""A training run's config: its checks, and the data, model and optimizer it names.

`validate_config` fails early and clearly on bad names and impossible combinations (one
`ConfigError` naming the field); `load_data`, `build_model` and `make_optimizer` read
``config.data``, ``config.model`` and ``config.optim`` / ``config.schedule``; `setup` does the
first three once and returns a `Setup` that `train` takes as it
is, so a study that builds a run's data and model hands them over instead of having the
trainer validate and build again.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sharp_minima import data as data_lib
from sharp_minima import optim
from sharp_minima.models import MODELS, get_model
from sharp_minima.train.hooks import parse_target

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "adagrad")
SCHEDULES = ("constant", "step", "cosine", "plateau")
# The config fields that determine a run's training trajectory: a workdir holding checkpoints
# refuses to resume with other values. Everything else may change between a run and its
# resumption (num_epochs, logging, evaluation, checkpointing, early stopping, num_devices) and
# so may any section a study adds for its measurements (``keskar``, ``curvature``, ...).
TRAINING_FIELDS = ("seed", "model", "data", "batch_size", "optim", "schedule")
EVAL_METRICS = ("loss", "accuracy")


class ConfigError(ValueError):
    """The config names something unknown or asks for an impossible combination."""


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
    for target in c.early_stop.get("targets", ()) or ():
        parsed = parse_target(target)
        need(
            parsed is not None and _is_metric(parsed[0], ("train", "val", "test")),
            f"config.early_stop.targets: {target!r} is not '<train|val|test>/<"
            f"{'|'.join(EVAL_METRICS)}><op><number>' with op one of >= <= > <",
        )
        need(
            parsed is None or not parsed[0].startswith("val/") or c.data.validation_fraction > 0,
            f"config.early_stop.targets: {target!r} uses val/ but "
            "config.data.validation_fraction is 0",
        )
    need(
        not c.get("tensorboard", False) or importlib.util.find_spec("tensorboardX") is not None,
        "config.tensorboard=True needs the tensorboardX package: "
        "pip install 'sharp_minima[tensorboard]'",
    )
    if num_devices is not None:
        need(
            c.batch_size % num_devices == 0,
            f"config.batch_size={c.batch_size} is not "
            f"divisible by the number of devices ({num_devices})",
        )


def _is_number(x) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)


def check_numbers(
    config,
    path: str,
    *,
    low: float | None = None,
    low_open: bool = False,
    high: float | None = None,
    high_open: bool = False,
    integer: bool = False,
    nonempty: bool = True,
    unique: bool = True,
) -> tuple:
    """Checks the number or tuple of numbers at ``config.<path>`` (e.g. ``"nsgd.gammas"``):
    numbers (not text such as ``abc`` or ``nan`` the command line left as a string), finite,
    integers when ``integer``, within ``[low, high]`` (open ends with ``low_open`` /
    ``high_open``), for a tuple at least one value (``nonempty``) and no value twice
    (``unique``: each value names a run). Returns the values as a tuple.

    Raises:
      ConfigError: one line naming ``config.<path>``, what it must be and what it got.

    >>> import ml_collections
    >>> c = ml_collections.ConfigDict({"nsgd": {"gammas": (0.1, 0.1)}})
    >>> try:
    ...     check_numbers(c, "nsgd.gammas", low=0)
    ... except ConfigError as e:
    ...     print(e)
    config.nsgd.gammas lists 0.1 twice; each value names a run, list it once
    """
    value = config
    for part in path.split("."):
        value = value[part]
    many = isinstance(value, tuple | list)
    values = tuple(value) if many else (value,)
    name = f"config.{path}"
    kind = "integers" if integer else "numbers"
    if many and nonempty and not values:
        raise ConfigError(f"{name} is empty; list at least one value, e.g. {name}=(0.1,)")
    bound = []
    if low is not None:
        bound.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bound.append(f"{'<' if high_open else '<='} {high:g}")
    want = f"{'' if many else 'a '}finite {kind if many else kind[:-1]}" + (
        f" {' and '.join(bound)}" if bound else ""
    )
    for v in values:
        bad = not _is_number(v) or not math.isfinite(v) or (integer and float(v) != int(v))
        bad = bad or (low is not None and (v <= low if low_open else v < low))
        bad = bad or (high is not None and (v >= high if high_open else v > high))
        if bad:
            got = f"{v!r} in {tuple(values)!r}" if many and len(values) > 1 else f"{v!r}"
            raise ConfigError(f"{name} must be {want}, got {got}")
    if many and unique:
        dup = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if dup is not None:
            raise ConfigError(f"{name} lists {dup:g} twice; each value names a run, list it once")
    return values


def _is_metric(name, splits) -> bool:
    split, _, metric = str(name).partition("/")
    return split in splits and metric in EVAL_METRICS


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


def resolve_optimizer(config, steps_per_epoch: int, tx):
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


def config_dict(config) -> dict:
    """The config as plain JSON data (what ``config.json`` holds)."""
    return json.loads(config.to_json_best_effort())


@dataclasses.dataclass(frozen=True)
class Setup:
    """A validated run config with the data and model it names, built once.

    `train` takes it in place of a config (``train.train(setup, workdir)``) and neither
    validates nor builds again; a study builds one per run and shares the data (and a model
    whose config is unchanged) between its runs.
    """

    config: Any
    data: Any
    model: Any
    mesh: Any


def setup(config, *, data=None, model=None) -> Setup:
    """Validates ``config`` (with the device count and the data's size), loads the data and
    builds the model — each unless given.

    Raises:
      ConfigError: bad config (before any compilation). DataNotFoundError: no data.
    """
    from sharp_minima.train.steps import make_mesh  # noqa: PLC0415 - steps import flax

    mesh = make_mesh(config.num_devices)
    validate_config(config, mesh.size)
    data = load_data(config) if data is None else data
    n = len(data.x_train)
    if config.batch_size > n:
        raise ConfigError(
            f"config.batch_size={config.batch_size} exceeds the {n} training "
            f"examples of {data.name}"
        )
    model = build_model(config, data) if model is None else model
    return Setup(config, data, model, mesh)
