"""A training run's config: its checks, and the data and model it names.

`validate_config` fails early and clearly on bad names and impossible combinations (one
`ConfigError` naming the field); `load_data` and `build_model` read ``config.data`` and
``config.model`` (`sharp_minima.train.optimizer` reads ``config.optim`` and
``config.schedule``); `setup` does the checks and the first two once and returns a `Setup`
that `train` takes as it is, so a study that builds a run's data and model hands them over
instead of having the trainer validate and build again.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from typing import Any

import jax
import numpy as np

from sharp_minima import data as data_lib
from sharp_minima.models import MODELS, get_model
from sharp_minima.train.stopping import parse_target

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "adagrad")
SCHEDULES = ("constant", "step", "cosine", "plateau")
# The config fields that determine a run's training trajectory: a workdir holding checkpoints
# refuses to resume with other values. Everything else may change between a run and its
# resumption (num_epochs, logging, evaluation, checkpointing, early stopping, num_devices) and
# so may any section a study adds for its measurements (``keskar``, ``curvature``, ...).
TRAINING_FIELDS = ("seed", "model", "data", "batch_size", "optim", "sam", "schedule")
EVAL_METRICS = ("loss", "accuracy")


class ConfigError(ValueError):
    """The config names something unknown or asks for an impossible combination."""


def validate_config(config, num_devices: int | None = None) -> None:
    """Fails early and clearly on bad names and impossible combinations.

    Raises:
      ConfigError: naming the offending field.

    Args:
      config: the run's config.
      num_devices: the devices it will run on (checks that the batch divides), if known.
    """
    c, need = config, _need
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
    _validate_optimizer_and_stopping(c, num_devices)


def _need(cond, msg) -> None:
    if not cond:
        raise ConfigError(msg)


def _validate_optimizer_and_stopping(c, num_devices) -> None:
    """`validate_config`'s second half: the optimizer's and schedule's numbers, early
    stopping and its targets, TensorBoard, the batch against the devices."""
    need = _need
    o = c.optim
    need(0 <= o.momentum < 1, f"config.optim.momentum must be in [0, 1), got {o.momentum}")
    need(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "config.optim.b1 and b2 must be in [0, 1)")
    need(o.eps > 0, "config.optim.eps must be > 0")
    need(o.grad_clip_norm >= 0, "config.optim.grad_clip_norm must be >= 0 (0 = off)")
    if "sam" in c:  # SAM (sharp_minima.optim.sam); rho = 0: off
        m, rho = c.sam.group_size, c.sam.rho
        need(rho >= 0 and c.sam.eta >= 0, "config.sam.rho and config.sam.eta must be >= 0")
        ok = m == 0 or (m >= 1 and c.batch_size % m == 0 and rho > 0)  # 0: the whole batch
        need(ok, f"config.sam.group_size ({m}) must divide batch_size, with sam.rho > 0")
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

    Args:
      config: the config.
      path: the dotted field.
      low: the smallest allowed value (None: unbounded).
      low_open: ``low`` itself not allowed.
      high: the largest allowed value.
      high_open: ``high`` itself not allowed.
      integer: the values must be integers.
      nonempty: a tuple must hold a value.
      unique: no value twice.

    Returns:
      The values as a tuple.

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
    """``sharp_minima.data.load`` with the fields of ``config.data``.

    Args:
      config: the run's config.

    Returns:
      A `sharp_minima.data.Dataset`.

    Raises:
      sharp_minima.data.DataNotFoundError: no source has the data set.
    """
    d = config.data
    return data_lib.load(
        d.name,
        data_dir=d.data_dir,
        idx_dir=d.idx_dir,
        manual_dir=d.manual_dir,
        validation_fraction=d.validation_fraction,
        seed=d.seed if d.seed is not None else config.seed,
        allow_download=d.allow_download,
        max_train=d.max_train,
        **dict(d.options),
    )


def build_model(config, data):
    """The model of ``config.model`` sized for ``data`` (number of classes).

    Args:
      config: the run's config.
      data: the `sharp_minima.data.Dataset` (its number of classes).

    Returns:
      The Flax module.
    """
    return get_model(config.model.name, num_classes=data.num_classes, **dict(config.model.kwargs))


def run_keys(config) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(init_key, data_key, aug_key)`` of a run: initialisation, shuffling, augmentation.

    Args:
      config: the run's config (its ``seed``).

    Returns:
      Three keys.
    """
    return tuple(jax.random.split(jax.random.key(config.seed), 3))


def config_dict(config) -> dict:
    """The config as plain JSON data (what ``config.json`` holds).

    Args:
      config: the run's config.

    Returns:
      A dict of JSON data.
    """
    return json.loads(config.to_json_best_effort())


@dataclasses.dataclass(frozen=True)
class Setup:
    """A validated run config with the data and model it names, built once.

    `train` takes it in place of a config (``train.train(setup, workdir)``) and neither
    validates nor builds again; a study builds one per run and shares the data (and a model
    whose config is unchanged) between its runs.

    Attributes:
      config: the validated config (locked).
      data: the `sharp_minima.data.Dataset`.
      model: the Flax module.
      mesh: the data mesh over the devices the run uses.
    """

    config: Any
    data: Any
    model: Any
    mesh: Any


def dividing_devices(batch_size: int) -> int:
    """How many devices ``num_devices = 0`` trains on: all of them when the batch size divides
    over them (e.g. 8 TPU cores and a batch of 128), else on one host the most that it
    divides over (a batch of 100 on 8 cores: 4), so a config runs unchanged on any runtime.
    Data parallelism averages the same global batch either way. Several hosts use every
    device (and `validate_config` names a batch that does not divide).

    Args:
      batch_size: the global batch size.

    Returns:
      The number of devices.
    """
    n = jax.device_count()
    if jax.process_count() > 1 or batch_size < 1:
        return n
    return max(d for d in range(1, n + 1) if batch_size % d == 0)


def setup(config, *, data=None, model=None) -> Setup:
    """Validates ``config`` (with the device count and the data's size), loads the data and
    builds the model — each unless given.

    Raises:
      ConfigError: bad config (before any compilation). DataNotFoundError: no data.

    Args:
      config: the run's config.
      data: a loaded data set to use instead of loading ``config.data``.
      model: a built model to use instead of building ``config.model``.

    Returns:
      A `Setup`.
    """
    from sharp_minima.train.steps import make_mesh  # noqa: PLC0415 - steps import flax

    mesh = make_mesh(config.num_devices or dividing_devices(config.batch_size))
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
