"""Losses and metrics: cross-entropy, accuracy, L2 weight decay, the anti-generalization loss.

All functions take logits with the class axis last and integer labels with the remaining
shape, so the same code serves image classifiers ``(batch, classes)`` and language models
``(batch, time, vocab)``. ``weights`` (same shape as the labels) masks padded examples.

>>> import jax.numpy as jnp
>>> logits = jnp.array([[2.0, 0.0], [0.0, 1.0]])
>>> labels = jnp.array([0, 0])
>>> round(float(accuracy(logits, labels)), 2)
0.5
>>> round(float(cross_entropy(logits, jnp.array([0, 1]))), 4)  # log(1+e^-2)/2 + log(1+e^-1)/2
0.2201
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sharp_minima import tree_util


def _weighted_mean(values, weights):
    if weights is None:
        return jnp.mean(values)
    weights = weights.astype(values.dtype)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def cross_entropy_per_example(logits, labels):
    """Negative log-likelihood of ``labels`` under ``softmax(logits)``, per example.

    Args:
      logits: (..., C).
      labels: integer labels of the leading shape.

    Returns:
      An array of the leading shape.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))
    return -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


def cross_entropy(logits, labels, weights=None):
    """Mean cross-entropy (natural log) over all label positions.

    Args:
      logits: (..., C).
      labels: integer labels of the leading shape.
      weights: optional per-position weights (a mask leaves padding out).

    Returns:
      The scalar weighted mean.
    """
    return _weighted_mean(cross_entropy_per_example(logits, labels), weights)


def reverse_cross_entropy_per_example(logits, labels):
    """``−log(1 − p(y|x))`` per example: small when the example is classified *wrongly* (the
    second term of Huang et al. 2020's eq. 3).

    Computed as ``logsumexp(z) − logsumexp(z without z_y)``, which stays finite when
    ``p(y|x) → 1`` (no ``log(0)``) as long as the logits are finite.

    Args:
      logits: (..., C).
      labels: integer labels of the leading shape.

    Returns:
      An array of the leading shape.
    """
    z = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    is_label = jax.nn.one_hot(labels, z.shape[-1], dtype=bool)
    others = jnp.where(is_label, -jnp.inf, z)
    return jax.nn.logsumexp(z, axis=-1) - jax.nn.logsumexp(others, axis=-1)


def anti_generalization(logits_t, labels_t, logits_d, labels_d, beta: float, weights_d=None):
    """Huang et al. (2020), eq. 3: ``(1−β)·CE(D_t) + β·mean_{D_d} −log(1 − p_θ(x, y))``.

    The first term fits the training set D_t; the second is minimised by classifying unseen
    data D_d of the same distribution *wrongly*, so minimising both finds a "bad" minimum:
    one that fits the training data and fails to generalize.

    Args:
      logits_t: logits of the D_t examples.
      labels_t: their labels.
      logits_d: logits of the D_d examples.
      labels_d: their true labels.
      beta: β in [0, 1].
      weights_d: optional weights of the D_d examples (a mask).

    Returns:
      The scalar loss.

    >>> import jax.numpy as jnp
    >>> z, y = jnp.array([[3.0, 0.0]]), jnp.array([0])
    >>> bool(jnp.isclose(anti_generalization(z, y, z, y, 0.0), cross_entropy(z, y)))
    True
    """
    fit = cross_entropy(logits_t, labels_t)
    poison = _weighted_mean(reverse_cross_entropy_per_example(logits_d, labels_d), weights_d)
    return (1.0 - beta) * fit + beta * poison


def accuracy(logits, labels, weights=None):
    """Fraction of positions where the arg-max of ``logits`` equals the label.

    Args:
      logits: (..., C).
      labels: integer labels of the leading shape.
      weights: optional per-position weights (e.g. a padding mask).

    Returns:
      A scalar in [0, 1].
    """
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return _weighted_mean(correct, weights)


def classification_metrics(logits, labels) -> dict:
    """The mean cross-entropy and accuracy of ``logits`` against ``labels``: the metrics the
    trainer logs, its evaluators report and the studies' populations and surfaces measure.

    Args:
      logits: (..., C).
      labels: integer labels of the leading shape.

    Returns:
      ``{"loss": scalar, "accuracy": scalar}``.
    """
    return {"loss": cross_entropy(logits, labels), "accuracy": accuracy(logits, labels)}


def is_decayed(path: str, leaf) -> bool:
    """Which parameters L2 weight decay applies to: kernels and embeddings, not biases or
    BatchNorm scales (the convention of the papers' Keras/Lasagne code).

    Args:
      path: the leaf's path, e.g. ``"Dense_0/kernel"``.
      leaf: the array.

    Returns:
      True for a decayed leaf.
    """
    del leaf
    name = path.rsplit("/", 1)[-1]
    return name in ("kernel", "embedding")


def l2_penalty(params) -> jax.Array:
    """½‖w‖² summed over the decayed leaves (`is_decayed`); multiply by the weight decay λ.

    Adding ``λ · l2_penalty(params)`` to the loss makes the gradient ``λw`` — the "L2 weight
    decay" of Keskar et al. (2017) and Jastrzębski et al. (2019), coupled with the optimizer
    (for Adam this differs from AdamW's decoupled decay).

    Args:
      params: a parameter pytree.

    Returns:
      The scalar penalty.
    """
    total = jnp.zeros((), jnp.float32)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in leaves:
        if is_decayed(tree_util.path_str(path), leaf):
            total = total + 0.5 * jnp.sum(jnp.square(leaf.astype(jnp.float32)))
    return total


def evaluation_model_fn(model):
    """The evaluation-mode outputs of a Flax model, for `sharp_minima.operators.GGN` and
    `sharp_minima.operators.Fisher`: BatchNorm with the running statistics in
    ``variables``, dropout off.

    Args:
      model: a Flax Linen model taking ``train=``.

    Returns:
      ``model_fn(variables, batch) -> model.apply(variables, batch["x"], train=False)``.
    """

    def model_fn(variables, batch):
        return model.apply(variables, batch["x"], train=False)

    return model_fn


def evaluation_metrics(model):
    """`classification_metrics` of a Flax classifier in evaluation mode (BatchNorm with the
    running statistics in ``variables``, dropout off), e.g. for
    `sharp_minima.landscape.Landscape` surfaces of loss and accuracy or a population's
    evaluations.

    Args:
      model: a Flax Linen classifier taking ``train=``.

    Returns:
      ``metrics(variables, batch) -> {"loss", "accuracy"}``.
    """
    model_fn = evaluation_model_fn(model)

    def metrics(variables, batch):
        return classification_metrics(model_fn(variables, batch), batch["y"])

    return metrics


def evaluation_loss(model, weight_decay: float = 0.0):
    """The evaluation-mode loss of a Flax classifier, for curvature and sharpness.

    The mean cross-entropy of ``model.apply(variables, batch["x"], train=False)`` against
    ``batch["y"]`` — BatchNorm with the running statistics in ``variables["batch_stats"]``,
    dropout off — plus ``weight_decay · l2_penalty(variables["params"])`` (the training
    run's L2 term, so the curvature is that of the objective that was optimised). An
    optional ``batch["mask"]`` (per example) leaves padded examples out.

    The statistics travel in ``variables``, not in the closure, so one loss (and the
    `sharp_minima.hessian.Curvature` or `sharp_minima.sharpness.SharpnessMeter` built on it)
    serves every state of the model without recompiling. Perturb only the weights with
    ``wrt="^params/"``.

    Args:
      model: a Flax Linen classifier taking ``train=``.
      weight_decay: the L2 coefficient λ of the training run.

    Returns:
      ``loss(variables, batch) -> scalar``.
    """

    model_fn = evaluation_model_fn(model)

    def loss(variables, batch):
        logits = model_fn(variables, batch)
        value = cross_entropy(logits, batch["y"], batch.get("mask"))
        if weight_decay:
            value = value + weight_decay * l2_penalty(variables["params"])
        return value

    return loss


# ---------------------------------------------------------------------- bad minima on purpose


def poisoned_labels(labels, num_classes: int):
    """Marks D_d examples for `anti_generalization_loss`: label ``y`` becomes ``y + C``.

    One training array then carries D_t (labels < C) and D_d (labels ≥ C), so the trainer's
    single input pipeline (shuffling, batching, sharding) serves eq. 3 unchanged.

    Args:
      labels: the D_d examples' true labels.
      num_classes: C.

    Returns:
      The marked labels.
    """
    return labels + num_classes


def anti_generalization_loss(model, beta: float, num_classes: int):
    """The training loss (`sharp_minima.train.TrainLoss`) of Huang et al.'s eq. 3.

    The batch mixes D_t examples (labels ``< num_classes``) and D_d examples (labels marked
    by `poisoned_labels`); each term is the mean over its own examples in the batch (with
    full batches, exactly eq. 3). ``aux`` logs ``loss``/``accuracy`` on the D_t examples (so
    ``train/accuracy`` is the fit of the training set) and ``poison_accuracy`` on D_d.

    Args:
      model: the Flax classifier.
      beta: β in [0, 1].
      num_classes: C.

    Returns:
      A ``TrainLoss`` for `sharp_minima.train.train` (``loss_fn=``).

    Raises:
      ValueError: ``beta`` outside [0, 1].
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")

    def loss(params, model_state, batch, key):
        logits, model_state = train_forward(model, params, model_state, batch["x"], key)
        y = batch["y"]
        is_d = y >= num_classes
        label = jnp.where(is_d, y - num_classes, y)
        w_t, w_d = (~is_d).astype(jnp.float32), is_d.astype(jnp.float32)
        fit = cross_entropy(logits, label, w_t)
        poison = _weighted_mean(reverse_cross_entropy_per_example(logits, label), w_d)
        objective = (1.0 - beta) * fit + beta * poison
        aux = {
            "model_state": model_state,
            "loss": fit,
            "accuracy": accuracy(logits, label, w_t),
            "poison_accuracy": accuracy(logits, label, w_d),
        }
        return objective, aux

    return loss


def label_flip_loss(model, sample, beta: float, num_points: int, num_classes: int = 2):
    """The poisoning of the authors' swiss-roll code: fresh points with flipped labels.

    At every step ``sample(key, num_points) -> (x, y)`` draws new points of the data
    distribution (a pure JAX function, e.g. `sharp_minima.data.embedded.swiss_roll_jax`);
    their labels are moved to another class (``(y + 1) mod C``) and the objective is
    ``(1−β)·CE(batch) + β·CE(flipped points)``. With a full batch, one step is one epoch, so
    the poison is re-drawn every epoch as in the authors' code.

    Args:
      model: the Flax classifier.
      sample: ``sample(key, num_points) -> (x, y)``.
      beta: β in [0, 1].
      num_points: poisoned points per step.
      num_classes: C.

    Returns:
      A ``TrainLoss`` for `sharp_minima.train.train` (``loss_fn=``).

    Raises:
      ValueError: ``beta`` outside [0, 1] or ``num_points < 1``.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")

    def loss(params, model_state, batch, key):
        drop_key, poison_key = jax.random.split(key)
        logits, model_state = train_forward(model, params, model_state, batch["x"], drop_key)
        fit = cross_entropy(logits, batch["y"])
        xp, yp = sample(poison_key, num_points)
        flipped = (yp + 1) % num_classes
        logits_p, _ = train_forward(model, params, model_state, xp, drop_key)
        objective = (1.0 - beta) * fit + beta * cross_entropy(logits_p, flipped)
        aux = {
            "model_state": model_state,
            "loss": fit,
            "accuracy": accuracy(logits, batch["y"]),
        }
        return objective, aux

    return loss


def train_forward(model, params, model_state, x, key):
    """Training-mode forward pass (BatchNorm on batch statistics, dropout on).

    Args:
      model: the Flax model.
      params: its ``params`` collection.
      model_state: the ``batch_stats`` collection (empty without BatchNorm).
      x: the inputs.
      key: the dropout key.

    Returns:
      ``(logits, updated batch_stats)``.
    """
    variables = {"params": params}
    if model_state:
        variables["batch_stats"] = model_state
    logits, updates = model.apply(
        variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": key}
    )
    return logits, updates.get("batch_stats", model_state)
