"""The objective every geometric measurement is taken of: one home for its plumbing.

A loss is ``loss_fn(params, batch) -> scalar``, ``params`` any pytree, ``batch`` any pytree
(or ``None``). Measurements (`sharp_minima.hessian`, `sharp_minima.sharpness`,
`sharp_minima.landscape`) see it as a function of one flat vector: the leaves of ``params``
selected by ``wrt`` (`tree_util.select`), raveled at the edge, the other leaves held fixed —
e.g. ``wrt="^params/"`` on ``{"params": ..., "batch_stats": ...}`` perturbs the weights of a
Flax model and keeps its BatchNorm statistics. Over data it is the weighted mean over
``batches`` (the batch pytree with one extra *leading axis over batches*), accumulated with
`lax.scan` so many examples need the memory of one batch:

    F(x) = sum_b w_b f(x, batch_b) / sum_b w_b.

`Objective` holds only the loss and ``wrt``; it owns no compiled code (the objects of
`hessian` and `sharpness` that use it do). Its methods are meant to be called inside a trace,
except `Objective.prepare`, which validates the inputs on the host first.

Only jax and numpy are imported here.

>>> import jax.numpy as jnp
>>> obj = Objective(lambda p, b: jnp.sum(p["w"] * b), wrt="w")
>>> x0, f = obj.mean_loss({"w": jnp.ones(2), "c": jnp.zeros(1)}, jnp.array([[1.0], [3.0]]),
...                       jnp.array([0.5, 0.5]))
>>> float(f(x0))  # mean over two batches of sum(w * b): (2 + 6) / 2
4.0
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding, PartitionSpec

from sharp_minima import tree_util as tu

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

__all__ = [
    "Objective",
    "Prepared",
    "batch_mean",
    "check_finite",
    "check_like",
    "check_scalar_loss",
    "example_weights",
    "normalized_weights",
    "num_batches",
    "per_example_losses",
    "replicate_like",
    "shard_batches",
]


# ------------------------------------------------------------------------------ validation


def _signature(tree: PyTree):
    """The structure, shapes and dtypes of a pytree (hashable)."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves)


def check_scalar_loss(loss_fn: LossFn, params: PyTree, batch: PyTree) -> None:
    """Raises ValueError unless ``loss_fn(params, batch)`` is a scalar (checked abstractly)."""
    out = jax.eval_shape(loss_fn, params, batch)
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(
            f"loss_fn must return a scalar, got shape {shape}; reduce the per-example losses "
            "(e.g. with .mean()) inside loss_fn"
        )


def check_like(name: str, tree: PyTree, params: PyTree) -> None:
    """Raises ValueError unless ``tree`` has the structure and leaf shapes of ``params``."""
    ts, ps = jax.tree.structure(tree), jax.tree.structure(params)
    if ts != ps:
        raise ValueError(f"{name} must have the structure of params: got {ts}, expected {ps}")
    for t, p in zip(jax.tree.leaves(tree), jax.tree.leaves(params)):
        if jnp.shape(t) != jnp.shape(p):
            raise ValueError(
                f"{name} must have the leaf shapes of params: got {jnp.shape(t)} "
                f"where params has {jnp.shape(p)}"
            )


def check_finite(what: str, *arrays) -> None:
    """Raises FloatingPointError naming ``what`` when any array holds NaN or Inf."""
    for a in arrays:
        if not np.all(np.isfinite(np.asarray(a))):
            raise FloatingPointError(
                f"{what} produced non-finite values (NaN/Inf): check the loss, the parameters "
                "and the data for overflow"
            )


def num_batches(batches: PyTree) -> int:
    """The size of the leading (number-of-batches) axis shared by every leaf of ``batches``."""
    leaves = jax.tree.leaves(batches)
    if not leaves:
        raise ValueError("batches has no array leaves; pass None for a loss without data")
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if None in sizes or len(sizes) != 1:
        raise ValueError(
            "every leaf of batches needs the same leading (number-of-batches) axis; got "
            f"leading sizes {sorted(str(s) for s in sizes)}. One batch is passed as x[None]."
        )
    return sizes.pop()


def normalized_weights(batches: PyTree | None, weights, dtype) -> jax.Array | None:
    """Per-batch weights summing to one (equal when ``weights`` is None; None without data).

    Raises:
      ValueError: weights of the wrong length, negative, non-finite or all zero.
    """
    if batches is None:
        if weights is not None:
            raise ValueError("weights were given but batches is None")
        return None
    nb = num_batches(batches)
    if weights is None:
        return jnp.full((nb,), 1.0 / nb, dtype)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (nb,):
        raise ValueError(f"weights must have shape ({nb},) (one per batch), got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {w}")
    return jnp.asarray(w / w.sum(), dtype)


# ---------------------------------------------------------------------------- the batch mean


def batch_mean(fn: Callable[[PyTree], PyTree], batches: PyTree | None, weights) -> PyTree:
    """``Σ_b weights[b] · fn(batch_b)`` by a `lax.scan` over the leading batch axis (memory of
    one batch); ``fn(None)`` when ``batches`` is None. ``fn`` may return any pytree.

    Call inside a trace, with weights that sum to one (`normalized_weights`).
    """
    if batches is None:
        return fn(None)
    first = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], batches))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)

    def body(acc, xs):
        batch, w = xs
        out = fn(batch)
        return jax.tree.map(lambda a, o: a + w.astype(a.dtype) * o, acc, out), None

    acc, _ = lax.scan(body, zeros, (batches, weights))
    return acc


# ------------------------------------------------------------------------------ examples


def example_weights(batch: PyTree, size: int, dtype) -> jax.Array:
    """The weights ωᵢ (summing to one) of a batch's ``size`` examples in its mean loss:
    ``1/size`` each, or ``batch["mask"]`` (1 for a real example, 0 for padding, as
    `sharp_minima.losses` reads it) normalised. Call inside a trace."""
    mask = batch.get("mask") if isinstance(batch, dict) else None
    if mask is None:
        return jnp.full((size,), 1.0 / size, dtype)
    mask = mask.astype(dtype)
    return mask / jnp.maximum(mask.sum(), 1)


def per_example_losses(f: Callable[[jax.Array, PyTree], jax.Array], x, batch) -> jax.Array:
    """``(B,)`` values ``f(x, example_i)`` of a mean loss on each example of ``batch`` alone
    (a batch of one, by `vmap`): the per-example losses whose gradients are the per-example
    gradients. Right when examples do not interact (no BatchNorm in training mode).
    Call inside a trace."""
    return jax.vmap(lambda ex: f(x, jax.tree.map(lambda a: a[None], ex)))(batch)


# -------------------------------------------------------------------------------- sharding


def shard_batches(batches: PyTree, devices=None, axis_name: str = "data") -> PyTree:
    """Shards the example axis (axis 1) of ``batches`` across devices.

    Every measurement then runs data-parallel under `jit` (the parameters are replicated on
    the same mesh by `Objective.prepare`) and gives the same numbers as on one device.

    Args:
      batches: batch pytree with a leading axis over batches.
      devices: devices to use (default: all local devices).
      axis_name: name of the mesh axis.

    Returns:
      ``batches`` placed with ``NamedSharding(mesh, P(None, axis_name))``.

    Raises:
      ValueError: the per-batch size is not divisible by the number of devices.
    """
    devices = list(jax.local_devices() if devices is None else devices)
    mesh = jax.sharding.Mesh(np.array(devices), (axis_name,))
    sharding = NamedSharding(mesh, PartitionSpec(None, axis_name))
    for path, x in jax.tree_util.tree_flatten_with_path(batches)[0]:
        if jnp.ndim(x) < 2 or jnp.shape(x)[1] % len(devices):
            raise ValueError(
                f"batches leaf {tu.path_str(path) or '<root>'} has shape {jnp.shape(x)}: its "
                f"axis 1 (examples per batch) must be divisible by the {len(devices)} devices"
            )
    return jax.device_put(batches, sharding)


def replicate_like(batches: PyTree | None, tree: PyTree) -> PyTree:
    """Replicates ``tree`` on the mesh ``batches`` is sharded over (no-op otherwise); leaves
    already laid out on that mesh keep their sharding."""
    for x in jax.tree.leaves(batches):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return jax.tree.map(lambda leaf, mesh=sharding.mesh: _replicate(leaf, mesh), tree)
    return tree


def _replicate(leaf, mesh):
    """``leaf`` replicated on ``mesh``, unless already laid out on it (e.g. FSDP parameters)."""
    own = getattr(leaf, "sharding", None)
    if isinstance(own, NamedSharding) and own.mesh == mesh:
        return leaf
    return jax.device_put(leaf, NamedSharding(mesh, PartitionSpec()))


def _warn_if_examples_as_batches(nb: int, one_batch: PyTree) -> None:
    """A batch passed without the leading batches axis reads as ``nb`` one-example batches:
    then some leaf of "a batch" is a scalar (e.g. one label). Warn, since it is rarely meant."""
    scalars = [
        tu.path_str(p) or "<root>"
        for p, x in jax.tree_util.tree_flatten_with_path(one_batch)[0]
        if jnp.ndim(x) == 0
    ]
    if nb > 1 and scalars:
        warnings.warn(
            f"batches is read as {nb} batches in which leaf {scalars[0]!r} is a scalar: if this "
            "is ONE batch of examples, add the leading batches axis "
            "(jax.tree.map(lambda x: x[None], batch))",
            UserWarning,
            stacklevel=4,
        )


# ------------------------------------------------------------------------------ the objective


class Prepared(NamedTuple):
    """Validated inputs of a measurement (see `Objective.prepare`).

    Attributes:
      params: the parameters, replicated on the batches' mesh when they are sharded.
      weights: (num_batches,) weights summing to one, or None without data.
      dim: the number of selected (``wrt``) parameters n.
      dtype: their common floating dtype.
    """

    params: PyTree
    weights: jax.Array | None
    dim: int
    dtype: Any


class Objective:
    """A loss over the ``wrt`` subset of the parameters, flat at the edge, batch-averaged.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      wrt: which leaves are variables: None (all), a regex searched in each leaf path
        (``"Dense_1/"``, ``"^params/"``) or a predicate on the path; the others are held fixed.

    Raises:
      ValueError: ``loss_fn`` is not callable.
    """

    def __init__(self, loss_fn: LossFn, wrt: str | Callable[[str], bool] | None = None):
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn
        self.wrt = wrt
        self._checked = set()  # abstract signatures whose loss was checked to be scalar

    # -- host side ----------------------------------------------------------------------

    def prepare(self, params: PyTree, batches: PyTree | None, weights=None) -> Prepared:
        """Validates a measurement's inputs on the host (before anything is compiled).

        Raises:
          ValueError: no (floating) parameters selected, batches without a common leading
            axis, bad weights, or a loss that is not scalar.
        """
        selected, _ = tu.select(params, self.wrt)
        if not selected:
            raise ValueError("params has no array leaves")
        dtype = jnp.result_type(*selected)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"params must be floating point, got dtype {dtype}")
        dim = sum(int(np.prod(jnp.shape(x))) for x in selected)
        one_batch = None
        if batches is not None:
            nb = num_batches(batches)
            one_batch = jax.tree.map(  # its shapes: the checks below are abstract
                lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x)), batches
            )
            _warn_if_examples_as_batches(nb, one_batch)
        signature = _signature((params, one_batch))
        if signature not in self._checked:
            check_scalar_loss(self.loss_fn, params, one_batch)
            self._checked.add(signature)
        w = normalized_weights(batches, weights, dtype)
        params, w = replicate_like(batches, (params, w))
        return Prepared(params, w, dim, dtype)

    # -- inside a trace -----------------------------------------------------------------

    def split(self, params: PyTree) -> tuple[jax.Array, Callable[[jax.Array], PyTree]]:
        """``(x0, place)``: the flat selected parameters and ``place(x)``, the full params with
        the selected leaves replaced by the flat vector ``x``."""
        selected, merge = tu.select(params, self.wrt)
        x0, unravel = ravel_pytree(selected)
        return x0, lambda x: merge(unravel(x), params)

    def flatten(self, tree: PyTree) -> jax.Array:
        """The flat vector of a params-like pytree's selected leaves (e.g. a tangent)."""
        selected, _ = tu.select(tree, self.wrt)
        return ravel_pytree(selected)[0]

    def unflatten(self, params: PyTree, x: jax.Array) -> PyTree:
        """A pytree like ``params`` holding ``x`` in the selected leaves and zeros elsewhere."""
        selected, merge = tu.select(params, self.wrt)
        return merge(ravel_pytree(selected)[1](x), tu.zeros_like(params))

    def flat_loss(self, params: PyTree) -> tuple[jax.Array, Callable[[jax.Array, PyTree], Any]]:
        """``(x0, f)`` with ``f(x, batch)`` the loss at the flat selected parameters ``x``."""
        x0, place = self.split(params)
        return x0, lambda x, batch: self.loss_fn(place(x), batch)

    def mean_loss(
        self, params: PyTree, batches: PyTree | None, weights
    ) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
        """``(x0, F)`` with ``F(x)`` the weighted mean loss over ``batches`` at flat ``x``."""
        x0, f = self.flat_loss(params)
        return x0, lambda x: batch_mean(lambda b: f(x, b), batches, weights)
