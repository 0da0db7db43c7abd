"""The Hessian: Hessian-vector products, and the Hessian operator with its solvers
(Lanczos, eigenpairs, spectral density, trace and Frobenius norm).

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

**Compiled code belongs to the caller.** `Curvature` (``Curvature(loss_fn, wrt=...)``) holds
the jitted kernels of its methods (`Curvature.matvec`, `Curvature.eigenpairs`,
`Curvature.spectral_density`, `Curvature.trace`, `Curvature.frobenius_norm`); reused with new
parameters, batches or BatchNorm statistics of the same shapes it does not recompile. Keep
one along training (curvature tracking) and let it go when done: nothing here caches the
loss. The module-level functions (`eigenpairs`, `trace`, ...) build a `Curvature` for one
call, so they compile on every call. State that changes during training (BatchNorm
statistics) belongs in ``params`` (e.g. ``{"params": ..., "batch_stats": ...}`` with
``wrt="^params/"``), never in the loss's closure.

The solvers are `sharp_minima.curvature`'s (shared with the Gauss–Newton, Fisher and gradient
covariance operators of `sharp_minima.operators`), re-exported here under their old names;
the plumbing (``wrt`` selection, raveling, the weighted batch mean, validation) is
`sharp_minima.objective`'s.

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

from collections.abc import Callable

import jax

from sharp_minima import objective
from sharp_minima.curvature import (  # noqa: F401  (re-exported: hessian's public names)
    WHICH,
    Eigenpairs,
    Estimate,
    LanczosResult,
    Operator,
    SpectralDensity,
    lanczos,
    rademacher_probes,
    tridiagonal_eigh,
)
from sharp_minima.objective import LossFn, PyTree, batch_mean, shard_batches

_probes = rademacher_probes  # the name the tests of earlier versions use

__all__ = [
    "Curvature",
    "Eigenpairs",
    "Estimate",
    "LanczosResult",
    "batch_mean",
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

# --------------------------------------------------------------------------------------
# Hessian-vector products
# --------------------------------------------------------------------------------------


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
    objective.check_scalar_loss(loss_fn, params, batch)
    objective.check_like("tangent", tangent, params)
    grad = jax.grad(loss_fn)
    return jax.jvp(lambda p: grad(p, batch), (params,), (tangent,))[1]


# --------------------------------------------------------------------------------------
# The Hessian operator
# --------------------------------------------------------------------------------------


class Curvature(Operator):
    """The Hessian of a loss as an operator that owns its compiled kernels.

    The solvers (`eigenpairs`, `spectral_density`, `trace`, `frobenius_norm`, `lanczos`,
    `matvec`) are `sharp_minima.curvature.Operator`'s; this class defines the product, a
    Hessian-vector product by forward-over-reverse differentiation averaged over the
    weighted batches. ``Curvature(loss_fn, wrt=...)`` compiles each kernel the first time it
    is used and reuses it for any parameters, batches and weights of the same shapes and
    dtypes: hold one along training and call it with new parameters (and BatchNorm
    statistics, which belong in ``params``) each time. Nothing outside the object keeps the
    loss alive.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      wrt: restrict to a subset of the parameters: a regex searched in each leaf's path
        (``"Dense_1/"``, ``"^params/"``) or a predicate on the path. The other leaves are held
        fixed and returned vectors are zero there.
      chunk: HVPs evaluated at once (vmapped) by `trace`, `frobenius_norm` and the residual
        check of `eigenpairs`.

    Attributes:
      objective: the `sharp_minima.objective.Objective` (loss and ``wrt``).
      num_traces: how many times a kernel was traced (= compiled) so far; a reused object
        whose inputs keep their shapes does not add to it.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from sharp_minima import hessian
      >>> loss = lambda p, batch: 0.5 * jnp.sum(p["scale"] * p["w"] ** 2)
      >>> curv = hessian.Curvature(loss, wrt="w")
      >>> for s in (1.0, 2.0, 3.0):  # new "statistics" each time, one compilation
      ...     top = curv.eigenpairs({"w": jnp.zeros(4), "scale": s * jnp.arange(1.0, 5.0)},
      ...                           None, k=1, key=jax.random.key(0))
      >>> round(float(top.values[0]), 4), curv.num_traces
      (12.0, 1)
    """

    name = "hessian"
    products = "Hessian-vector products"

    def __init__(self, loss_fn: LossFn, *, wrt=None, chunk: int = 8):
        super().__init__(objective.Objective(loss_fn, wrt), chunk=chunk)

    @property
    def loss_fn(self) -> LossFn:
        return self.objective.loss_fn

    def flat_matvec(self, params, batches, weights, operands=None):
        """The Hessian on flat vectors, for a kernel of your own; call inside a trace.

        Args:
          params: pytree at which the Hessian is taken.
          batches: batch pytree with a leading axis over batches, or ``None``.
          weights: per-batch weights summing to one (`objective.normalized_weights`).
          operands: unused (the Hessian has no arrays of its own).

        Returns:
          ``(x0, matvec)``: the flat ``wrt`` parameters and ``v -> H v``, the weighted average
          over the batches of the forward-over-reverse HVP.
        """
        x0, f = self.objective.flat_loss(params)
        grad = jax.grad(f)

        def one(v, batch):
            return jax.jvp(lambda x: grad(x, batch), (x0,), (v,))[1]

        return x0, lambda v: batch_mean(lambda b: one(v, b), batches, weights)


# --------------------------------------------------------------------------------------
# Module-level functions: one call, one Curvature (hold a Curvature to reuse compiled code)
# --------------------------------------------------------------------------------------


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
      ``matvec(tangent) -> pytree like params`` (`Curvature.operator`).

    Example:
      >>> import jax.numpy as jnp
      >>> from sharp_minima import hessian
      >>> loss = lambda w, b: jnp.mean((b["x"] @ w - b["y"]) ** 2)
      >>> batches = {"x": jnp.eye(2)[None], "y": jnp.zeros((1, 2))}
      >>> hessian.hessian_matvec(loss, jnp.zeros(2), batches)(jnp.array([1.0, 2.0]))
      Array([1., 2.], dtype=float32)
    """
    return Curvature(loss_fn, wrt=wrt).operator(params, batches, weights=weights)


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
    check_every: int = 1,
    restart: bool = True,
    exact_residuals: bool = False,
) -> Eigenpairs:
    """Extreme Hessian eigenpairs by Lanczos with partial reorthogonalisation.

    ``Curvature(loss_fn, wrt=wrt).eigenpairs(params, batches, ...)``. Compiles on every
    call: to track the eigenpairs along training, hold one `Curvature` and pass the previous
    ``vectors`` as ``init_vectors``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: pytree at which the Hessian is taken.
      batches: batch pytree with a leading axis over batches, or ``None``.
      k: number of eigenpairs.
      key: key of the start vector (and of restarts).
      num_steps: a hard limit on the Lanczos basis (default: grows as needed).
      which: ``"LA"`` largest, ``"SA"`` smallest, ``"LM"`` largest magnitude, ``"BE"`` both
        ends.
      weights: optional per-batch weights (e.g. real examples per batch).
      wrt: restrict to a subset of the parameters (a regex searched in each leaf's path, or
        a predicate on the path); the other leaves are held fixed.
      init_vectors: optional warm start, a pytree like params with a leading axis.
      tol: eigenvalue accuracy relative to ``max|λ|``.
      check_every: Lanczos steps between convergence tests.
      restart: lock converged pairs and verify with a restart (finds repeated eigenvalues).
      exact_residuals: measure ``‖Hv − λv‖`` with k more HVPs.

    Returns:
      `Eigenpairs`: ``values``, ``vectors`` (pytree like params, leading axis k),
      ``residuals``, ``converged``, ``num_steps``, ``tridiagonal``. See
      `curvature.Operator.eigenpairs` for the algorithm (Parlett 1998; Simon 1984).

    Raises:
      ValueError: bad ``k``, ``num_steps``, ``which``, ``weights``, shapes or ``wrt``;
        a non-scalar loss.
      FloatingPointError: NaN or Inf in the Hessian-vector products.

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
    return Curvature(loss_fn, wrt=wrt).eigenpairs(
        params,
        batches,
        k=k,
        key=key,
        num_steps=num_steps,
        which=which,
        weights=weights,
        init_vectors=init_vectors,
        tol=tol,
        check_every=check_every,
        restart=restart,
        exact_residuals=exact_residuals,
    )


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
    """Hessian spectral density by stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017;
    Ghorbani et al. 2019), ``Curvature(loss_fn, wrt=wrt).spectral_density(...)``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: pytree at which the Hessian is taken.
      batches: batch pytree with a leading axis over batches, or ``None``.
      key: key of the Rademacher probes.
      num_probes: number of probe vectors (the density's standard error is over them).
      num_steps: Lanczos steps per probe (default ``min(n, 80)``).
      num_points: size of the evaluation grid.
      sigma: Gaussian smoothing width (default 1% of the Ritz values' range).
      grid: explicit evaluation points instead of ``num_points``.
      weights: optional per-batch weights.
      wrt: restrict to a subset of the parameters (a regex searched in each leaf's path, or
        a predicate on the path); the other leaves are held fixed.

    Returns:
      `SpectralDensity`: ``grid``, ``density`` and ``stderr`` on it, and per probe the Ritz
      values ``nodes`` and their ``weights`` (Σ weights · nodes ≈ tr(H)/n).

    Raises:
      ValueError: bad arguments or shapes. FloatingPointError: NaN or Inf in the products.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from sharp_minima import hessian
      >>> loss = lambda w, batch: 0.5 * jnp.sum(jnp.array([1.0, 2.0, 3.0, 4.0]) * w**2)
      >>> out = hessian.spectral_density(loss, jnp.zeros(4), None, key=jax.random.key(0))
      >>> float((out.weights * out.nodes).sum(1).mean().round(5))  # tr(H) / n
      2.5
    """
    return Curvature(loss_fn, wrt=wrt).spectral_density(
        params,
        batches,
        key=key,
        num_probes=num_probes,
        num_steps=num_steps,
        num_points=num_points,
        sigma=sigma,
        grid=grid,
        weights=weights,
    )


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
    """Stochastic estimate of the Hessian trace: Hutch++ (Meyer et al. 2021) or Hutchinson
    (1989), ``Curvature(loss_fn, wrt=wrt, chunk=chunk).trace(...)``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: pytree at which the Hessian is taken.
      batches: batch pytree with a leading axis over batches, or ``None``.
      key: key of the probes.
      num_matvecs: Hessian-vector products to spend (Hutch++ splits them in thirds).
      method: ``"hutch++"`` or ``"hutchinson"``.
      weights: optional per-batch weights.
      wrt: restrict to a subset of the parameters (a regex searched in each leaf's path, or
        a predicate on the path); the other leaves are held fixed.
      chunk: probes evaluated at once with ``vmap`` (memory against speed).

    Returns:
      `Estimate` ``(value, stderr, num_matvecs)``.

    Raises:
      ValueError: bad ``method``, ``num_matvecs`` or shapes.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from sharp_minima import hessian
      >>> loss = lambda w, batch: 0.5 * jnp.sum(jnp.arange(1.0, 5.0) * w**2)
      >>> est = hessian.trace(loss, jnp.zeros(4), None, key=jax.random.key(0), num_matvecs=12)
      >>> round(est.value, 4)
      10.0
    """
    return Curvature(loss_fn, wrt=wrt, chunk=chunk).trace(
        params, batches, key=key, num_matvecs=num_matvecs, method=method, weights=weights
    )


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
    """Estimate of the Hessian's Frobenius norm ‖H‖_F, ``Curvature.frobenius_norm``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: pytree at which the Hessian is taken.
      batches: batch pytree with a leading axis over batches, or ``None``.
      key: key of the probes (or of the Lanczos start vector for ``"top_k"``).
      method: ``"hutchinson"`` (E‖Hz‖² = ‖H‖_F², Rademacher z) or ``"top_k"`` (the root
        sum of squares of the k largest-magnitude eigenvalues, Jastrzębski et al. 2019).
      num_matvecs: probes for ``"hutchinson"``.
      k: eigenvalues for ``"top_k"``.
      weights: optional per-batch weights.
      wrt: restrict to a subset of the parameters (a regex searched in each leaf's path, or
        a predicate on the path); the other leaves are held fixed.
      chunk: probes evaluated at once with ``vmap``.

    Returns:
      `Estimate` ``(value, stderr, num_matvecs)``.

    Raises:
      ValueError: bad ``method`` or shapes.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from sharp_minima import hessian
      >>> loss = lambda w, batch: 0.5 * jnp.sum(jnp.array([3.0, 4.0]) * w**2)
      >>> est = hessian.frobenius_norm(loss, jnp.zeros(2), None, key=jax.random.key(0))
      >>> round(est.value, 4)  # a diagonal H: every Rademacher probe gives the exact value
      5.0
    """
    return Curvature(loss_fn, wrt=wrt, chunk=chunk).frobenius_norm(
        params, batches, key=key, method=method, num_matvecs=num_matvecs, k=k, weights=weights
    )
