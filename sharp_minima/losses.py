"""Losses and metrics: cross-entropy, accuracy, L2 weight decay.

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
    """Negative log-likelihood of ``labels`` under ``softmax(logits)``, per example."""
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))
    return -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


def cross_entropy(logits, labels, weights=None):
    """Mean cross-entropy (natural log) over all label positions (``weights`` masks)."""
    return _weighted_mean(cross_entropy_per_example(logits, labels), weights)


def accuracy(logits, labels, weights=None):
    """Fraction of positions where the arg-max of ``logits`` equals the label."""
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return _weighted_mean(correct, weights)


def is_decayed(path: str, leaf) -> bool:
    """Which parameters L2 weight decay applies to: kernels and embeddings, not biases or
    BatchNorm scales (the convention of the papers' Keras/Lasagne code)."""
    del leaf
    name = path.rsplit("/", 1)[-1]
    return name in ("kernel", "embedding")


def l2_penalty(params) -> jax.Array:
    """½‖w‖² summed over the decayed leaves (`is_decayed`); multiply by the weight decay λ.

    Adding ``λ · l2_penalty(params)`` to the loss makes the gradient ``λw`` — the "L2 weight
    decay" of Keskar et al. (2017) and Jastrzębski et al. (2019), coupled with the optimizer
    (for Adam this differs from AdamW's decoupled decay).
    """
    total = jnp.zeros((), jnp.float32)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in leaves:
        if is_decayed(tree_util.path_str(path), leaf):
            total = total + 0.5 * jnp.sum(jnp.square(leaf.astype(jnp.float32)))
    return total


def evaluation_loss(model, weight_decay: float = 0.0):
    """The evaluation-mode loss of a Flax classifier, for curvature and sharpness.

    Returns ``loss(variables, batch) -> scalar``: the mean cross-entropy of
    ``model.apply(variables, batch["x"], train=False)`` against ``batch["y"]`` — BatchNorm with
    the running statistics in ``variables["batch_stats"]``, dropout off — plus
    ``weight_decay · l2_penalty(variables["params"])`` (the training run's L2 term, so the
    curvature is that of the objective that was optimised). An optional ``batch["mask"]``
    (per example) leaves padded examples out.

    The statistics travel in ``variables``, not in the closure, so one loss (and the
    `sharp_minima.hessian.Curvature` or `sharp_minima.sharpness.SharpnessMeter` built on it)
    serves every state of the model without recompiling. Perturb only the weights with
    ``wrt="^params/"``.
    """

    def loss(variables, batch):
        logits = model.apply(variables, batch["x"], train=False)
        value = cross_entropy(logits, batch["y"], batch.get("mask"))
        if weight_decay:
            value = value + weight_decay * l2_penalty(variables["params"])
        return value

    return loss
