"""Hessian-vector products, Lanczos, eigenpairs, spectral density, trace and Frobenius norm.

The curvature loss is ``loss_fn(params, batch) -> scalar``; ``params`` is any pytree and
``batch`` any pytree (or ``None`` for a loss without data). Operator-level functions take
``batches``: the batch pytree with one extra *leading axis over batches* (one batch is
``jax.tree.map(lambda x: x[None], batch)``), or ``None``. The operator is the weighted
average of the per-batch Hessians,

    H = sum_b w_b H_b / sum_b w_b,

accumulated with `lax.scan` inside `jit`, so the Hessian of many examples needs the memory
of one batch. With ``weights=None`` all batches weigh the same. For a ragged last batch, pad
it, let the loss ignore the padding (e.g. a ``mask`` in the batch) and pass the number of
real examples per batch as ``weights``: the operator is then exactly the full-data Hessian.

Hessian-vector products run in the parameters' dtype; the small Lanczos tridiagonal is
diagonalised on the host in float64 (numpy/scipy), without switching ``jax_enable_x64``.

Data parallelism: put ``batches`` on a device mesh with `shard_batches` (the example axis is
split across devices, parameters are replicated); every function here then runs sharded
under `jit` and returns the same numbers as on one device.

Only jax, numpy and scipy are imported: importing this module never imports flax, TFDS or
TensorFlow.

References:
  Lanczos (1950); Golub & Welsch (1969) for Gauss quadrature from the tridiagonal;
  Ghorbani, Krishnan & Xiao (2019) and Ubaru, Chen & Saad (2017) for stochastic Lanczos
  quadrature; Hutchinson (1989) and Meyer, Musco, Musco & Woodruff (2021, Hutch++) for traces;
  Jastrzębski et al. (2019) for the top-k approximation of the Frobenius norm.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jax import lax
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding, PartitionSpec

from sharp_minima import tree_util as tu

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

__all__ = [
    "Eigenpairs",
    "Estimate",
    "LanczosResult",
    "SpectralDensity",
    "eigenpairs",
    "frobenius_norm",
    "hessian_matvec",
    "hvp",
    "lanczos",
    "shard_batches",
    "spectral_density",
    "trace",
    "tridiagonal_eigh",
]

WHICH = ("LA", "SA", "LM", "BE")


# --------------------------------------------------------------------------------------
# Hessian-vector products and the batched operator
# --------------------------------------------------------------------------------------


def _check_scalar_loss(loss_fn, params, batch):
    out = jax.eval_shape(loss_fn, params, batch)
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(
            f"loss_fn must return a scalar, got shape {shape}; reduce the per-example losses "
            "(e.g. with .mean()) inside loss_fn"
        )


def _check_like(name, tree, params):
    ts, ps = jax.tree.structure(tree), jax.tree.structure(params)
    if ts != ps:
        raise ValueError(f"{name} must have the structure of params: got {ts}, expected {ps}")
    for t, p in zip(jax.tree.leaves(tree), jax.tree.leaves(params)):
        if jnp.shape(t) != jnp.shape(p):
            raise ValueError(
                f"{name} must have the leaf shapes of params: got {jnp.shape(t)} "
                f"where params has {jnp.shape(p)}"
            )


def hvp(loss_fn: LossFn, params: PyTree, batch: PyTree, tangent: PyTree) -> PyTree:
    """Hessian-vector product ``H(params) @ tangent`` of ``loss_fn(., batch)``.

    Forward-over-reverse (`jax.jvp` of `jax.grad`): one call costs about as much as two or
    three gradient evaluations, and never forms H. Pure and jittable.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: pytree at which the Hessian is taken.
      batch: data passed to ``loss_fn`` (any pytree, or ``None``).
      tangent: pytree of the structure and leaf shapes of ``params``.

    Returns:
      A pytree like ``params``.

    Raises:
      ValueError: ``loss_fn`` is not scalar, or ``tangent`` does not match ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> from sharp_minima import hessian
      >>> A = jnp.array([[2.0, 1.0], [1.0, 3.0]])
      >>> loss = lambda x, batch: 0.5 * x @ A @ x
      >>> hessian.hvp(loss, jnp.zeros(2), None, jnp.array([1.0, 0.0]))
      Array([2., 1.], dtype=float32)
    """
    _check_scalar_loss(loss_fn, params, batch)
    _check_like("tangent", tangent, params)
    grad = jax.grad(loss_fn)
    return jax.jvp(lambda p: grad(p, batch), (params,), (tangent,))[1]


def _num_batches(batches) -> int:
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


def _normalized_weights(batches, weights, dtype):
    """Per-batch weights summing to one (``None`` when there are no batches)."""
    if batches is None:
        if weights is not None:
            raise ValueError("weights were given but batches is None")
        return None
    nb = _num_batches(batches)
    if weights is None:
        return jnp.full((nb,), 1.0 / nb, dtype)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (nb,):
        raise ValueError(f"weights must have shape ({nb},) (one per batch), got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {w}")
    return jnp.asarray(w / w.sum(), dtype)


def _flat_operator(loss_fn, params, batches, weights, wrt):
    """The Hessian operator on the flat vector of the parameters selected by ``wrt``.

    Call inside a trace: returns ``(x0, unravel, merge, matvec)`` where ``matvec(v)`` is
    the weighted-average HVP of all batches (a `lax.scan` over the leading batch axis).
    """
    selected, merge = tu.select(params, wrt)
    x0, unravel = ravel_pytree(selected)

    def loss_flat(x, batch):
        return loss_fn(merge(unravel(x), params), batch)

    grad = jax.grad(loss_flat)

    def one(v, batch):
        return jax.jvp(lambda x: grad(x, batch), (x0,), (v,))[1]

    return x0, unravel, merge, lambda v: batch_mean(lambda b: one(v, b), batches, weights)


def batch_mean(fn, batches, weights):
    """``Σ_b weights[b] · fn(batch_b)`` by a `lax.scan` over the leading batch axis (memory of
    one batch); ``fn(None)`` when ``batches`` is None. ``fn`` may return any pytree.

    Call inside a trace, with weights that sum to one (see `hessian_matvec`'s ``weights``).
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


def _prepare(loss_fn, params, batches, weights, wrt):
    """Validates the operator's inputs on the host; returns (weights, dim, dtype)."""
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    selected, _ = tu.select(params, wrt)
    if not selected:
        raise ValueError("params has no array leaves")
    dtype = jnp.result_type(*selected)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"params must be floating point, got dtype {dtype}")
    dim = sum(int(np.prod(jnp.shape(x))) for x in selected)
    one_batch = None if batches is None else jax.tree.map(lambda x: x[0], batches)
    if batches is not None:
        _num_batches(batches)
    _check_scalar_loss(loss_fn, params, one_batch)
    w = _normalized_weights(batches, weights, dtype)
    params, w = _replicate_like(batches, (params, w))
    return params, w, dim, dtype


def hessian_matvec(
    loss_fn: LossFn,
    params: PyTree,
    batches: PyTree | None,
    *,
    weights=None,
    wrt=None,
) -> Callable[[PyTree], PyTree]:
    """The (weighted, multi-batch) Hessian as a jitted function of a tangent pytree.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: pytree.
      batches: batch pytree with a leading axis over batches, or ``None``.
      weights: optional per-batch weights (e.g. the number of real examples per batch).
      wrt: restrict to a subset of the parameters: a regex searched in each leaf's path
        (``"Dense_1/"``) or a predicate on the path. The other leaves are held fixed and the
        product's entries for them are zero.

    Returns:
      ``matvec(tangent) -> pytree like params``.

    Example:
      >>> import jax.numpy as jnp
      >>> from sharp_minima import hessian
      >>> loss = lambda w, b: jnp.mean((b["x"] @ w - b["y"]) ** 2)
      >>> batches = {"x": jnp.eye(2)[None], "y": jnp.zeros((1, 2))}
      >>> hessian.hessian_matvec(loss, jnp.zeros(2), batches)(jnp.array([1.0, 2.0]))
      Array([1., 2.], dtype=float32)
    """
    params, w, _, _ = _prepare(loss_fn, params, batches, weights, wrt)
    fn = _jitted_matvec(loss_fn, wrt)

    def matvec(tangent):
        _check_like("tangent", tangent, params)
        return fn(params, batches, w, tangent)

    return matvec


@functools.lru_cache(maxsize=64)
def _jitted_matvec(loss_fn, wrt):
    def fn(params, batches, weights, tangent):
        _, unravel, merge, matvec = _flat_operator(loss_fn, params, batches, weights, wrt)
        sel, _ = tu.select(tangent, wrt)
        v, _ = ravel_pytree(sel)
        return merge(unravel(matvec(v)), tu.zeros_like(params))

    return jax.jit(fn)


# --------------------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------------------


def shard_batches(batches: PyTree, devices=None, axis_name: str = "data") -> PyTree:
    """Shards the example axis (axis 1) of ``batches`` across devices.

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


def _replicate_like(batches, tree):
    """Replicates ``tree`` on the mesh ``batches`` is sharded over (no-op otherwise)."""
    for x in jax.tree.leaves(batches):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return jax.device_put(tree, NamedSharding(sharding.mesh, PartitionSpec()))
    return tree


# --------------------------------------------------------------------------------------
# Lanczos
# --------------------------------------------------------------------------------------


class LanczosResult(NamedTuple):
    """Output of `lanczos`.

    Attributes:
      alphas: (m,) diagonal of the tridiagonal T.
      betas: (m,) ``betas[j]`` couples basis vectors j and j+1; ``betas[m-1]`` is the norm of
        the final residual (used for convergence estimates). A zero marks a breakdown after
        which Lanczos continued from a fresh random vector.
      basis: (m, n) orthonormal Lanczos vectors (rows).
    """

    alphas: jax.Array
    betas: jax.Array
    basis: jax.Array


def _orthogonalize(basis, w):
    """Classical Gram–Schmidt twice against all rows of ``basis`` (unused rows are zero)."""
    h1 = basis @ w
    w = w - h1 @ basis
    h2 = basis @ w
    w = w - h2 @ basis
    return w, h1 + h2


def _lanczos_steps(matvec, basis, alphas, betas, start, stop, key, anorm):
    """Runs Lanczos steps ``start..stop-1`` on a preallocated (m, n) basis.

    Rows ``0..start`` of ``basis`` must hold the orthonormal vectors built so far (row
    ``start`` is the current vector). ``anorm`` is a running estimate of the operator norm
    used for the breakdown test. Returns the updated ``(basis, alphas, betas, anorm)``.
    """
    n = basis.shape[1]
    eps = jnp.finfo(basis.dtype).eps

    def body(i, carry):
        basis, alphas, betas, anorm = carry
        w = matvec(basis[i])
        anorm = jnp.maximum(anorm, jnp.linalg.norm(w))
        # Classical Gram–Schmidt twice against the whole basis (rows past i are zero). The
        # products read the basis row-major: h @ basis, never basis.T @ h, which XLA on CPU
        # would materialise.
        h1 = basis @ w
        w = w - h1 @ basis
        # Breakdown (an invariant Krylov subspace): continue from a random vector instead,
        # with a zero coupling, so T splits into blocks; eigenvalues outside the subspace, and
        # further copies of repeated ones, are then still found, and no 0/0 appears. The
        # choice is a select before the second pass (not a cond, which would copy the basis
        # every step); a random vector needs no cancellation-correcting second pass, so the
        # one pass it gets leaves it orthogonal to working precision.
        breakdown = jnp.linalg.norm(w) <= 100 * eps * anorm
        r = jax.random.normal(jax.random.fold_in(key, i), (n,), basis.dtype)
        x = jnp.where(breakdown, r / jnp.linalg.norm(r), w)
        h2 = basis @ x
        x = x - h2 @ basis
        alpha = h1[i] + jnp.where(breakdown, 0, h2[i])
        norm_x = jnp.linalg.norm(x)
        beta = jnp.where(breakdown, 0, norm_x).astype(basis.dtype)
        basis = basis.at[i + 1].set(x / norm_x, mode="drop")  # the last step keeps only beta
        return basis, alphas.at[i].set(alpha), betas.at[i].set(beta), anorm

    return lax.fori_loop(start, stop, body, (basis, alphas, betas, anorm))


def _init_basis(v0, num_steps):
    v0 = v0 / jnp.linalg.norm(v0)
    basis = jnp.zeros((num_steps, v0.shape[0]), v0.dtype).at[0].set(v0)
    return basis, jnp.zeros((num_steps,), v0.dtype), jnp.zeros((num_steps,), v0.dtype)


def _fallback_key(v0):
    # A key derived from the start vector, so `lanczos` stays deterministic without the
    # caller having to pass one (used only for restarts after a breakdown).
    bits = lax.bitcast_convert_type(v0.astype(jnp.float32), jnp.uint32)
    return jax.random.key(jnp.bitwise_xor.reduce(bits))


def lanczos(matvec: Callable[[jax.Array], jax.Array], v0: jax.Array, num_steps: int, *, key=None):
    """Symmetric Lanczos with full reorthogonalisation.

    Pure: a `lax.fori_loop` over a preallocated (num_steps, n) basis, so compile time does not
    depend on ``num_steps``. Every new vector is orthogonalised against the whole basis by
    classical Gram–Schmidt twice. On breakdown (an invariant Krylov subspace) the iteration
    continues from a random vector orthogonal to the basis with a zero off-diagonal, so
    repeated eigenvalues are found with their multiplicity and no NaN is produced.

    Args:
      matvec: symmetric linear map on vectors of ``v0``'s shape and dtype.
      v0: (n,) start vector (need not be normalised).
      num_steps: number of Lanczos steps m (1 <= m <= n).
      key: key for restart vectors after a breakdown; default derived from ``v0``.

    Returns:
      `LanczosResult` (alphas, betas, basis). Diagonalise the tridiagonal with
      `tridiagonal_eigh` (float64, on the host).

    Raises:
      ValueError: ``v0`` is not a vector, or ``num_steps`` is out of range.

    Example:
      >>> import jax.numpy as jnp
      >>> from sharp_minima import hessian
      >>> A = jnp.diag(jnp.array([3.0, 1.0, -2.0, 0.5]))
      >>> res = hessian.lanczos(lambda v: A @ v, jnp.ones(4), 4)
      >>> values, _ = hessian.tridiagonal_eigh(res.alphas, res.betas)
      >>> values.round(6).tolist()
      [-2.0, 0.5, 1.0, 3.0]
    """
    if jnp.ndim(v0) != 1:
        raise ValueError(f"v0 must be a vector, got shape {jnp.shape(v0)}")
    n = jnp.shape(v0)[0]
    if not 1 <= num_steps <= n:
        raise ValueError(f"num_steps must be in [1, {n}] (the dimension), got {num_steps}")
    key = _fallback_key(v0) if key is None else key
    basis, alphas, betas = _init_basis(v0, num_steps)
    basis, alphas, betas, _ = _lanczos_steps(
        matvec, basis, alphas, betas, 0, num_steps, key, jnp.zeros((), basis.dtype)
    )
    return LanczosResult(alphas, betas, basis)


def tridiagonal_eigh(alphas, betas) -> tuple[np.ndarray, np.ndarray]:
    """Eigendecomposition of the Lanczos tridiagonal in float64 on the host.

    Args:
      alphas: (m,) diagonal.
      betas: (m,) or (m-1,) off-diagonal (a trailing residual norm is ignored).

    Returns:
      ``(values, vectors)``: ascending float64 eigenvalues (m,) and eigenvectors (m, m) as
      columns.
    """
    a = np.asarray(alphas, np.float64)
    b = np.asarray(betas, np.float64)[: a.shape[0] - 1]
    if a.shape[0] == 1:
        return a.copy(), np.ones((1, 1))
    return scipy.linalg.eigh_tridiagonal(a, b)


def _check_finite(what, *arrays):
    for a in arrays:
        if not np.all(np.isfinite(np.asarray(a))):
            raise FloatingPointError(
                f"{what} produced non-finite values (NaN/Inf): check the loss, the parameters "
                "and the data for overflow"
            )


# --------------------------------------------------------------------------------------
# Eigenpairs
# --------------------------------------------------------------------------------------


class Eigenpairs(NamedTuple):
    """Output of `eigenpairs`.

    Attributes:
      values: (k,) float64 eigenvalues ("LA": descending; "SA": ascending; "LM": by
        descending magnitude; "BE": descending).
      vectors: pytree like params with a leading axis k; orthonormal (entries of parameters
        outside ``wrt`` are zero).
      residuals: (k,) float64 ``||H v - lambda v||`` measured with one HVP per vector.
      converged: (k,) bool, ``residuals <= tol * max|lambda|``.
      num_steps: Lanczos steps (HVPs) taken, over all restarts, not counting the k HVPs
        that measure the residuals.
    """

    values: np.ndarray
    vectors: PyTree
    residuals: np.ndarray
    converged: np.ndarray
    num_steps: int


def _select_ritz(theta, k, which):
    """Indices of the wanted Ritz values (theta ascending) in the order documented above."""
    if which == "LA":
        return np.arange(len(theta) - 1, len(theta) - 1 - k, -1)
    if which == "SA":
        return np.arange(k)
    if which == "LM":
        return np.argsort(-np.abs(theta), kind="stable")[:k]
    top = np.arange(len(theta) - 1, len(theta) - 1 - (k + 1) // 2, -1)
    bottom = np.arange(k // 2)[::-1]
    return np.concatenate([top, bottom])


@functools.lru_cache(maxsize=64)
def _jitted_lanczos_chunk(loss_fn, wrt):
    def run(params, batches, weights, basis, alphas, betas, start, stop, key, anorm):
        _, _, _, matvec = _flat_operator(loss_fn, params, batches, weights, wrt)
        return _lanczos_steps(matvec, basis, alphas, betas, start, stop, key, anorm)

    return jax.jit(run, donate_argnums=(3, 4, 5))


@functools.lru_cache(maxsize=64)
def _jitted_matmat(loss_fn, wrt, chunk):
    """``vectors (p, n) -> H @ vectors`` (p HVPs, ``chunk`` of them vmapped at a time)."""

    def run(params, batches, weights, vectors):
        _, _, _, matvec = _flat_operator(loss_fn, params, batches, weights, wrt)
        return lax.map(matvec, vectors, batch_size=chunk)

    return jax.jit(run)


@functools.partial(jax.jit, donate_argnums=(0,))
def _jitted_lock(basis, coeffs, values, key):
    """A new basis: the Ritz vectors ``coeffs @ basis`` locked in its first k rows (with
    ``values`` on the diagonal of T and zero couplings), then a random orthogonal vector."""
    k, (m, n) = coeffs.shape[0], basis.shape
    ritz = coeffs @ basis
    new = jnp.zeros_like(basis).at[:k].set(ritz)
    r = jax.random.normal(key, (n,), basis.dtype)
    r, _ = _orthogonalize(new, r)
    r, _ = _orthogonalize(new, r / jnp.linalg.norm(r))
    new = new.at[k].set(r / jnp.linalg.norm(r))
    alphas = jnp.zeros((m,), basis.dtype).at[:k].set(values)
    return new, alphas, jnp.zeros((m,), basis.dtype)


def _flat_start(params, wrt, dtype):
    selected, _ = tu.select(params, wrt)
    x0, unravel = ravel_pytree(selected)
    return x0.astype(dtype), unravel


def eigenpairs(
    loss_fn: LossFn,
    params: PyTree,
    batches: PyTree | None,
    *,
    k: int,
    key: jax.Array,
    num_steps: int | None = None,
    which: str = "LA",
    weights=None,
    wrt=None,
    init_vectors: PyTree | None = None,
    tol: float = 1e-4,
    check_every: int = 10,
) -> Eigenpairs:
    """Extreme Hessian eigenpairs by Lanczos with full reorthogonalisation.

    Runs Lanczos in jitted chunks of ``check_every`` steps on one preallocated basis (the
    compiled code does not depend on ``num_steps``) until the Lanczos residual estimates of
    the k wanted Ritz pairs are below ``tol * max|lambda|``. A single Krylov sequence sees only
    one copy of a repeated eigenvalue, so the converged pairs are then locked and Lanczos
    restarts from a random vector orthogonal to them; it stops when a restart adds nothing to
    the wanted set (usually one extra chunk). Finally it forms the Ritz vectors and measures
    the true residuals with k more HVPs. Jastrzębski et al. (2019) track
    the top eigenpairs this way along training; pass the previous vectors as
    ``init_vectors`` to warm-start.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``. Pass the same function object on
        repeated calls to reuse the compiled code.
      params: pytree at which the Hessian is taken.
      batches: batch pytree with a leading axis over batches, or ``None``.
      k: number of eigenpairs.
      key: key for the start vector (and restarts after a breakdown).
      num_steps: size of the Lanczos basis, i.e. the most steps between restarts (default
        ``min(n, 3k + 60)``; memory is ``num_steps * n`` numbers in the params' dtype).
      which: "LA" largest algebraic, "SA" smallest algebraic, "LM" largest magnitude, "BE"
        both ends (ceil(k/2) largest and floor(k/2) smallest).
      weights: optional per-batch weights (see module docstring).
      wrt: restrict to a subset of the parameters (regex on the leaf path, or predicate).
      init_vectors: optional pytree like params with a leading axis (e.g. the previous
        ``vectors``); Lanczos starts from their sum plus a small random part.
      tol: relative residual tolerance for early stopping and the ``converged`` flags.
      check_every: steps between convergence checks.

    Returns:
      `Eigenpairs`.

    Raises:
      ValueError: bad ``k``, ``num_steps``, ``which``, ``weights`` or shapes; non-scalar loss.
      FloatingPointError: the HVPs produced NaN or Inf.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from sharp_minima import hessian
      >>> A = jnp.diag(jnp.arange(10.0))
      >>> loss = lambda params, batch: 0.5 * params["w"] @ A @ params["w"]
      >>> out = hessian.eigenpairs(loss, {"w": jnp.zeros(10)}, None, k=3,
      ...                          key=jax.random.key(0))
      >>> out.values.round(5).tolist(), bool(out.converged.all())
      ([9.0, 8.0, 7.0], True)
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    params, w, n, dtype = _prepare(loss_fn, params, batches, weights, wrt)
    if not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > n:
        raise ValueError(f"k={k} exceeds the dimension {n} of the (selected) parameters")
    m = min(n, 3 * k + 60) if num_steps is None else num_steps
    if m < k:
        raise ValueError(f"num_steps={m} must be at least k={k}")
    if m > n:
        raise ValueError(f"num_steps={m} exceeds the dimension {n} of the (selected) parameters")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")

    key_start, key_restart = jax.random.split(key)
    x0, unravel = _flat_start(params, wrt, dtype)
    v0 = jax.random.normal(key_start, x0.shape, dtype)
    if init_vectors is not None:
        sel, _ = tu.select(init_vectors, wrt)
        prev = jax.vmap(lambda *leaves: ravel_pytree(list(leaves))[0])(*sel)
        if prev.shape[-1] != n:
            raise ValueError(
                f"init_vectors must be params-shaped with a leading axis; got {prev.shape}"
            )
        guess = prev.astype(dtype).sum(0)
        v0 = guess / jnp.linalg.norm(guess) + 0.1 * v0 / jnp.linalg.norm(v0)

    basis, alphas, betas = _init_basis(v0, m)
    anorm = jnp.zeros((), dtype)
    run = _jitted_lanczos_chunk(loss_fn, wrt)
    eps = np.finfo(dtype).eps
    pos = 0  # rows of the basis in use; basis[pos] is the vector to expand next
    total = 0  # Lanczos steps (HVPs) taken, over all restarts
    locked = None  # eigenvalues locked at the last restart
    for restart in itertools.count():
        while pos < m:
            stop = min(pos + check_every, m)
            basis, alphas, betas, anorm = run(
                params, batches, w, basis, alphas, betas, pos, stop, key_restart, anorm
            )
            total += stop - pos
            pos = stop
            a, b = np.asarray(alphas[:pos]), np.asarray(betas[:pos])
            _check_finite(f"Hessian-vector products (Lanczos step {total})", a, b)
            if pos < k or pos == m:
                continue
            theta, s = tridiagonal_eigh(a, b)
            idx = _select_ritz(theta, k, which)
            scale = max(np.abs(theta).max(), np.finfo(np.float64).tiny)
            # A (near-)zero last beta means the Krylov space just became invariant: every Ritz
            # pair looks converged although eigenvalues outside it are unseen. Stop only while
            # the iteration is still exploring.
            exploring = abs(b[-1]) > math.sqrt(eps) * scale
            if exploring and np.all(np.abs(b[-1] * s[-1, idx]) <= tol * scale):
                break
        theta, s = tridiagonal_eigh(alphas[:pos], betas[:pos])
        idx = _select_ritz(theta, k, which)
        coeffs = np.zeros((k, m))
        coeffs[:, :pos] = s[:, idx].T
        values = theta[idx]
        scale = max(np.abs(theta).max(), np.finfo(np.float64).tiny)
        # A single Krylov sequence sees one copy of a repeated eigenvalue (e.g. the last layer
        # of a multi-output MSE model has a Kronecker-structured Hessian). So lock the wanted
        # Ritz pairs, restart from a random vector orthogonal to them and stop only when a
        # restart adds nothing to the wanted set.
        same = locked is not None and np.allclose(
            np.sort(values), np.sort(locked), rtol=0, atol=tol * scale
        )
        if pos == m or same or k + 1 + check_every > m:
            break
        basis, alphas, betas = _jitted_lock(
            basis,
            jnp.asarray(coeffs, dtype),
            jnp.asarray(values, dtype),
            jax.random.fold_in(key_restart, restart),
        )
        locked, pos = values, k

    ritz = jnp.asarray(coeffs, dtype) @ basis  # (k, n); rows past `pos` are zero
    del basis
    hv = _jitted_matmat(loss_fn, wrt, min(k, 8))(params, batches, w, ritz)
    values = theta[idx]
    residuals = np.linalg.norm(
        np.asarray(hv, np.float64) - values[:, None] * np.asarray(ritz, np.float64), axis=1
    )
    _check_finite("Hessian-vector products (residuals)", residuals)
    scale = max(np.abs(theta).max(), np.finfo(np.float64).tiny)
    _, merge = tu.select(params, wrt)
    zeros = tu.zeros_like(params)
    vectors = jax.vmap(lambda r: merge(unravel(r), zeros))(ritz)
    return Eigenpairs(values, vectors, residuals, residuals <= tol * scale, total)


# --------------------------------------------------------------------------------------
# Stochastic estimators
# --------------------------------------------------------------------------------------


class Estimate(NamedTuple):
    """A stochastic estimate: ``value`` ± ``stderr`` (one standard error), and its cost."""

    value: float
    stderr: float
    num_matvecs: int


class SpectralDensity(NamedTuple):
    """Output of `spectral_density` (stochastic Lanczos quadrature).

    Attributes:
      nodes: (num_probes, m) Ritz values per probe (float64).
      weights: (num_probes, m) Gauss quadrature weights per probe (each row sums to 1).
      grid: (num_points,) evaluation points.
      density: (num_points,) Gaussian-smoothed spectral density (integrates to ~1).
      stderr: (num_points,) standard error of ``density`` over the probes.
      sigma: the Gaussian smoothing width used.
    """

    nodes: np.ndarray
    weights: np.ndarray
    grid: np.ndarray
    density: np.ndarray
    stderr: np.ndarray
    sigma: float


def _probes(key, num, n, dtype):
    """Rademacher probes (num, n): E[z z^T] = I."""
    return jax.random.rademacher(key, (num, n), dtype)


@functools.lru_cache(maxsize=64)
def _jitted_slq(loss_fn, wrt, num_steps):
    def run(params, batches, weights, probes, key):
        _, _, _, matvec = _flat_operator(loss_fn, params, batches, weights, wrt)

        def one(args):
            v0, i = args
            basis, alphas, betas = _init_basis(v0, num_steps)
            _, alphas, betas, _ = _lanczos_steps(
                matvec,
                basis,
                alphas,
                betas,
                0,
                num_steps,
                jax.random.fold_in(key, i),
                jnp.zeros((), basis.dtype),
            )
            return alphas, betas

        # Probes one after another: each needs a full basis, and only the tridiagonals are kept.
        return lax.map(one, (probes, jnp.arange(probes.shape[0])))

    return jax.jit(run)


def spectral_density(
    loss_fn: LossFn,
    params: PyTree,
    batches: PyTree | None,
    *,
    key: jax.Array,
    num_probes: int = 10,
    num_steps: int | None = None,
    num_points: int = 1000,
    sigma: float | None = None,
    grid=None,
    weights=None,
    wrt=None,
) -> SpectralDensity:
    """Hessian spectral density by stochastic Lanczos quadrature (SLQ).

    For each Rademacher probe z, ``num_steps`` Lanczos steps from z/|z| give Ritz values
    theta_j and weights tau_j (squared first components of the tridiagonal's eigenvectors);
    ``sum_j tau_j f(theta_j)`` is the Gauss quadrature of ``z^T f(H) z / n``, exact for
    polynomials of degree < 2 num_steps. The density is the probe average of
    ``sum_j tau_j N(t; theta_j, sigma^2)`` (Ghorbani et al. 2019).

    Args:
      loss_fn, params, batches, weights, wrt: the operator (see `eigenpairs`).
      key: key for the probes.
      num_probes: number of probes.
      num_steps: Lanczos steps per probe (default ``min(n, 80)``).
      num_points: grid size when ``grid`` is not given.
      sigma: smoothing width (default 1% of the Ritz-value range, or 1e-3 if it is empty).
      grid: optional evaluation points.

    Returns:
      `SpectralDensity`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from sharp_minima import hessian
      >>> loss = lambda w, batch: 0.5 * jnp.sum(jnp.array([1.0, 2.0, 3.0, 4.0]) * w**2)
      >>> out = hessian.spectral_density(loss, jnp.zeros(4), None, key=jax.random.key(0))
      >>> float((out.weights * out.nodes).sum(1).mean().round(5))  # tr(H) / n
      2.5
    """
    params, w, n, dtype = _prepare(loss_fn, params, batches, weights, wrt)
    m = min(n, 80) if num_steps is None else num_steps
    if not 1 <= m <= n:
        raise ValueError(f"num_steps must be in [1, {n}] (the dimension), got {m}")
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    key_probe, key_restart = jax.random.split(key)
    z = _probes(key_probe, num_probes, n, dtype)
    alphas, betas = _jitted_slq(loss_fn, wrt, m)(params, batches, w, z, key_restart)
    _check_finite("Hessian-vector products (spectral density)", alphas, betas)
    nodes, taus = [], []
    for a, b in zip(np.asarray(alphas), np.asarray(betas)):
        theta, s = tridiagonal_eigh(a, b)
        nodes.append(theta)
        taus.append(s[0] ** 2)
    nodes, taus = np.stack(nodes), np.stack(taus)
    lo, hi = nodes.min(), nodes.max()
    if sigma is None:
        sigma = 0.01 * (hi - lo) if hi > lo else 1e-3
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if grid is None:
        grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points)
    grid = np.asarray(grid, np.float64)
    gauss = np.exp(-0.5 * ((grid[None, None, :] - nodes[..., None]) / sigma) ** 2)
    per_probe = (taus[..., None] * gauss).sum(1) / (sigma * math.sqrt(2 * math.pi))
    stderr = (
        per_probe.std(0, ddof=1) / math.sqrt(num_probes)
        if num_probes > 1
        else np.full_like(grid, np.nan)
    )
    return SpectralDensity(nodes, taus, grid, per_probe.mean(0), stderr, float(sigma))


def _mean_and_stderr(samples):
    samples = np.asarray(samples, np.float64)
    if samples.size < 2:
        return float(samples.mean()), float("nan")
    return float(samples.mean()), float(samples.std(ddof=1) / math.sqrt(samples.size))


def trace(
    loss_fn: LossFn,
    params: PyTree,
    batches: PyTree | None,
    *,
    key: jax.Array,
    num_matvecs: int = 99,
    method: str = "hutch++",
    weights=None,
    wrt=None,
    chunk: int = 8,
) -> Estimate:
    """Stochastic estimate of the Hessian trace.

    ``"hutchinson"``: mean of z^T H z over Rademacher probes (Hutchinson 1989).
    ``"hutch++"``: a third of the budget sketches the top of the spectrum (Q = qr(H S)),
    whose trace is taken exactly, and the rest runs Hutchinson on the deflated remainder
    (Meyer et al. 2021); far lower variance when a few eigenvalues dominate, as in
    neural networks. The standard error is that of the Hutchinson part.

    Args:
      loss_fn, params, batches, weights, wrt: the operator (see `eigenpairs`).
      key: key for the probes.
      num_matvecs: total number of HVPs.
      method: ``"hutch++"`` or ``"hutchinson"``.
      chunk: HVPs evaluated at once (vmapped).

    Returns:
      `Estimate` of tr(H).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from sharp_minima import hessian
      >>> loss = lambda w, batch: 0.5 * jnp.sum(jnp.arange(1.0, 5.0) * w**2)
      >>> est = hessian.trace(loss, jnp.zeros(4), None, key=jax.random.key(0), num_matvecs=12)
      >>> round(est.value, 4)
      10.0
    """
    if method not in ("hutch++", "hutchinson"):
        raise ValueError(f"method must be 'hutch++' or 'hutchinson', got {method!r}")
    params, w, n, dtype = _prepare(loss_fn, params, batches, weights, wrt)
    matmat = _jitted_matmat(loss_fn, wrt, chunk)
    if method == "hutchinson":
        if num_matvecs < 1:
            raise ValueError(f"num_matvecs must be >= 1, got {num_matvecs}")
        z = _probes(key, num_matvecs, n, dtype)
        hz = matmat(params, batches, w, z)
        samples = np.einsum("pn,pn->p", np.asarray(z, np.float64), np.asarray(hz, np.float64))
        _check_finite("Hessian-vector products (trace)", samples)
        return Estimate(*_mean_and_stderr(samples), num_matvecs)
    if num_matvecs < 3:
        raise ValueError(f"hutch++ needs num_matvecs >= 3, got {num_matvecs}")
    s = min(num_matvecs // 3, n)
    g = num_matvecs - 2 * s
    k1, k2 = jax.random.split(key)
    hs = matmat(params, batches, w, _probes(k1, s, n, dtype))
    q, _ = jnp.linalg.qr(hs.T)  # (n, s), orthonormal columns spanning H S
    hq = matmat(params, batches, w, q.T)
    exact = float(np.einsum("ns,sn->", np.asarray(q, np.float64), np.asarray(hq, np.float64)))
    z = _probes(k2, g, n, dtype)
    z = z - (z @ q) @ q.T  # (I - QQ^T) z
    hz = matmat(params, batches, w, z)
    samples = np.einsum("pn,pn->p", np.asarray(z, np.float64), np.asarray(hz, np.float64))
    _check_finite("Hessian-vector products (trace)", samples, [exact])
    mean, stderr = _mean_and_stderr(samples) if g else (0.0, float("nan"))
    return Estimate(exact + mean, stderr, 2 * s + g)


def frobenius_norm(
    loss_fn: LossFn,
    params: PyTree,
    batches: PyTree | None,
    *,
    key: jax.Array,
    method: str = "hutchinson",
    num_matvecs: int = 100,
    k: int = 50,
    weights=None,
    wrt=None,
    chunk: int = 8,
) -> Estimate:
    """Estimate of the Hessian's Frobenius norm.

    ``"hutchinson"``: ``||H||_F^2 = E ||H z||^2`` over Rademacher probes; the standard error
    of the norm follows by the delta method. ``"top_k"``: ``sqrt(sum_i lambda_i^2)`` over the
    k largest-magnitude eigenvalues, the approximation of Jastrzębski et al. (2019, Table 1,
    top-50); a lower bound with no sampling error (``stderr`` is NaN).

    Args:
      loss_fn, params, batches, weights, wrt: the operator (see `eigenpairs`).
      key: key for the probes / the Lanczos start vector.
      method: ``"hutchinson"`` or ``"top_k"``.
      num_matvecs: probes for ``"hutchinson"``.
      k: eigenvalues for ``"top_k"``.
      chunk: HVPs evaluated at once (vmapped).

    Returns:
      `Estimate` of ||H||_F.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from sharp_minima import hessian
      >>> loss = lambda w, batch: 0.5 * jnp.sum(jnp.array([3.0, 4.0]) * w**2)
      >>> est = hessian.frobenius_norm(loss, jnp.zeros(2), None, key=jax.random.key(0))
      >>> round(est.value, 4)  # a diagonal H: every Rademacher probe gives the exact value
      5.0
    """
    if method == "top_k":
        out = eigenpairs(
            loss_fn, params, batches, k=k, key=key, which="LM", weights=weights, wrt=wrt
        )
        return Estimate(float(np.sqrt(np.sum(out.values**2))), float("nan"), out.num_steps + k)
    if method != "hutchinson":
        raise ValueError(f"method must be 'hutchinson' or 'top_k', got {method!r}")
    if num_matvecs < 1:
        raise ValueError(f"num_matvecs must be >= 1, got {num_matvecs}")
    params, w, n, dtype = _prepare(loss_fn, params, batches, weights, wrt)
    z = _probes(key, num_matvecs, n, dtype)
    hz = _jitted_matmat(loss_fn, wrt, chunk)(params, batches, w, z)
    samples = (np.asarray(hz, np.float64) ** 2).sum(1)
    _check_finite("Hessian-vector products (Frobenius norm)", samples)
    sq, sq_err = _mean_and_stderr(samples)
    value = math.sqrt(max(sq, 0.0))
    return Estimate(value, sq_err / (2 * value) if value > 0 else float("nan"), num_matvecs)
