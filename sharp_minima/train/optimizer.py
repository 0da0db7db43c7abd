"""The optimizer a training run's config names: the optax transformation of ``config.optim``
(sgd, momentum, nesterov, adam, adamw, rmsprop, adagrad; gradient clipping; Keskar et al.'s
proximal sub-problems) and the learning-rate schedule of ``config.schedule`` (constant, step,
cosine, warm-up with the linear scaling rule of Goyal et al. 2017, reduce-on-plateau), or a
transformation of the caller's own (`resolve_optimizer`); and the schedules by epoch of a
population's members (`epoch_schedule`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sharp_minima import optim
from sharp_minima.train.config import ConfigError


def learning_rate_schedule(config, steps_per_epoch: int) -> Callable[[Any], Any]:
    """Step -> learning rate (before any reduce-on-plateau factor).

    With ``schedule.base_batch_size > 0`` the linear scaling rule applies (Goyal et al. 2017):
    the peak rate is ``lr · batch_size / base_batch_size``, reached by a linear warm-up from
    ``lr`` over ``warmup_epochs``.

    Args:
      config: the run's config (``optim.learning_rate``, ``batch_size``, ``num_epochs``,
        ``schedule``).
      steps_per_epoch: optimizer steps per epoch.

    Returns:
      An optax schedule ``step -> learning rate``.
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


def epoch_schedule(
    value: float,
    *,
    boundaries_epochs=(),
    factor: float = 1.0,
    warmup_epochs: float = 0.0,
    warmup_from: float | None = None,
    warmup: str = "linear",
) -> Callable[[float], float]:
    """``epoch -> value`` of a learning rate (or batch size) that changes between chunks of
    training, by epochs (examples seen / N): what `sharp_minima.train.Population` reads for
    each member, where a batch size that grows makes steps the wrong clock.

    Step changes: ``value × factor^c`` after the c-th of ``boundaries_epochs`` (a decay with
    ``factor < 1``, Smith et al. 2018's growing batch with ``factor > 1``). Warm-up over
    ``warmup_epochs`` from ``warmup_from`` (Goyal et al. 2017): ``"linear"`` (gradual) or
    ``"constant"`` (held at ``warmup_from``, then ``value``).

    Args:
      value: the value after any warm-up and before the first boundary.
      boundaries_epochs: the epochs at which ``factor`` applies once more (increasing).
      factor: the step factor.
      warmup_epochs: the warm-up's length (0: none).
      warmup_from: where the warm-up starts (default: ``value``).
      warmup: ``"linear"`` or ``"constant"``.

    Returns:
      ``schedule(epoch) -> value``.

    Raises:
      ValueError: an unknown warm-up, or boundaries that do not increase.

    >>> gradual = epoch_schedule(0.4, warmup_epochs=2, warmup_from=0.1)
    >>> [round(gradual(e), 3) for e in (0, 1, 2, 5)]
    [0.1, 0.25, 0.4, 0.4]
    >>> decay = epoch_schedule(0.2, boundaries_epochs=(10, 20), factor=0.25)
    >>> [decay(e) for e in (0, 10, 25)]
    [0.2, 0.05, 0.0125]
    """
    if warmup not in ("linear", "constant"):
        raise ValueError(f"warmup must be 'linear' or 'constant', got {warmup!r}")
    bounds = tuple(float(b) for b in boundaries_epochs)
    if list(bounds) != sorted(bounds):
        raise ValueError(f"boundaries_epochs must increase, got {bounds}")
    start = value if warmup_from is None else warmup_from

    def schedule(epoch: float):
        if epoch < warmup_epochs:
            if warmup == "constant":
                return start
            return start + (value - start) * (epoch / warmup_epochs)
        passed = sum(epoch >= b - 1e-9 for b in bounds)  # tolerant of float epochs
        return value * factor**passed if passed else value

    return schedule


def make_optimizer(config, steps_per_epoch: int):
    """The optax transformation of ``config.optim`` with its schedule: the base optimizer,
    preceded by SAM or ASAM (``config.sam``, `sharp_minima.optim.sam`), decoupled weight
    decay (``optim.decoupled``), Keskar et al.'s proximal term (``optim.proximal``) and
    gradient clipping when asked, followed by reduce-on-plateau with
    ``schedule.name == "plateau"``.

    Args:
      config: the run's config.
      steps_per_epoch: optimizer steps per epoch.

    Returns:
      ``(tx, lr_fn)``: the transformation and ``lr_fn(step, opt_state)``, the learning rate
      in effect (plateau factor included), logged as ``train/learning_rate``.
    """
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
    sam = config.get("sam")
    if sam is not None and sam.rho > 0:  # first: it turns the clean gradient into SAM's
        parts.append(optim.sam(sam.rho, adaptive=sam.adaptive, eta=sam.eta))
    if o.decoupled and o.weight_decay and o.name != "adamw":  # (adamw decays by itself)
        parts.append(optax.add_decayed_weights(o.weight_decay))
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
    logged when it carries an ``inject_hyperparams`` ``learning_rate``).

    Args:
      config: the run's config.
      steps_per_epoch: optimizer steps per epoch.
      tx: the caller's transformation, or None.

    Returns:
      ``(tx, lr_fn)``; ``lr_fn`` is None when the rate cannot be read.

    Raises:
      ConfigError: ``config.sam.rho > 0`` with a ``tx`` of the caller's.
    """
    if tx is None:
        return make_optimizer(config, steps_per_epoch)
    if config.get("sam") is not None and config.sam.rho > 0:
        raise ConfigError(
            "config.sam.rho > 0 builds SAM into the config's optimizer, not into a tx of your "
            "own: chain sharp_minima.optim.sam into it and leave config.sam.rho at 0"
        )
    try:
        probe = jax.eval_shape(tx.init, {"w": jax.ShapeDtypeStruct((1,), jnp.float32)})
    except (ValueError, TypeError):  # a transform that needs the real params' shapes
        return tx, None
    if optax.tree_utils.tree_get(probe, "learning_rate") is None:
        return tx, None
    return tx, lambda step, opt_state: optax.tree_utils.tree_get(opt_state, "learning_rate")
