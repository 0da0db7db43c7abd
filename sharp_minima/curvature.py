"""The solvers over any symmetric curvature operator: Lanczos, eigenpairs, spectral density,
trace and Frobenius norm, on a base class that owns its compiled kernels.

An operator is a symmetric matrix M(params) of the ``wrt`` parameters, averaged over weighted
batches,

    M = sum_b w_b M_b / sum_b w_b,

given by its product with a flat vector (`Operator.flat_matvec`). The Hessian
(`sharp_minima.hessian.Curvature`), the generalised Gauss–Newton, the Fisher and the gradient
covariance (`sharp_minima.operators`) are subclasses that only define that product; every
solver here serves all of them, the way curvlinops' operators share one base. ``batches`` is
the batch pytree with one extra *leading axis over batches* (one batch is
``jax.tree.map(lambda x: x[None], batch)``) or ``None``; the weighted average is
accumulated with `lax.scan` inside `jit`, so many examples need the memory of one batch.

Products run in the parameters' dtype; the small Lanczos tridiagonal is diagonalised on the
host in float64 (numpy/scipy), without switching ``jax_enable_x64``.

**Compiled code belongs to the caller.** An operator holds the jitted kernels of its methods;
reused with new parameters, batches or BatchNorm statistics of the same shapes it does not
recompile (``num_traces`` counts the compilations). Nothing here caches a caller's function.

**Devices.** Batches sharded with `shard_batches` run data-parallel. Parameters sharded along
their own axes (FSDP-style, a ``NamedSharding`` on the params) make the Lanczos basis and
every vector of the solvers follow them: each device holds 1/d of the (m, D) basis
(`Operator.lanczos` shows the layout); the tridiagonal stays small and replicated.

Only jax, numpy and scipy are imported: importing this module never imports flax, TFDS or
TensorFlow.

References:
  Lanczos (1950); Parlett (1998) for error bounds and locking; Golub & Welsch (1969) for
  Gauss quadrature from the tridiagonal; Ghorbani, Krishnan & Xiao (2019) and Ubaru, Chen &
  Saad (2017) for stochastic Lanczos quadrature; Hutchinson (1989) and Meyer, Musco, Musco &
  Woodruff (2021, Hutch++) for traces; Jastrzębski et al. (2019) for the top-k approximation
  of the Frobenius norm.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from sharp_minima import objective
from sharp_minima import tree_util as tu
from sharp_minima.objective import PyTree, batch_mean, shard_batches

__all__ = [
    "VERIFY_STEPS",
    "basis_sharding",
    "Eigenpairs",
    "Estimate",
    "LanczosResult",
    "Operator",
    "SpectralDensity",
    "WHICH",
    "batch_mean",
    "lanczos",
    "rademacher_probes",
    "shard_batches",
    "tridiagonal_eigh",
]

WHICH = ("LA", "SA", "LM", "BE")
# Lanczos steps of the verifying restart of `Operator.eigenpairs` (the safe default).
VERIFY_STEPS = 10

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


def _project(basis, x, rows=None):
    """``(h, x - h @ basis)`` with ``h = basis @ x``: one Gram–Schmidt pass against the first
    ``rows`` rows (all by default; may be traced).

    Modified Gram–Schmidt, one row at a time: each filled row is read from memory once (the
    dot product and the update then hit the cache), and the empty rows of a large basis
    are never read.
    """
    m, _ = basis.shape
    rows = m if rows is None else rows

    def body(r, carry):
        h, x = carry
        v = basis[r]
        c = jnp.vdot(v, x)
        return h.at[r].set(c), x - c * v

    return lax.fori_loop(0, rows, body, (jnp.zeros((m,), basis.dtype), x))


def _orthogonalize(basis, w):
    """Classical Gram–Schmidt twice against all rows of ``basis`` (unused rows are zero)."""
    h1, w = _project(basis, w)
    h2, w = _project(basis, w)
    return w, h1 + h2


def _lanczos_steps(matvec, basis, alphas, betas, start, stop, key, anorm, sharding=None, dim=None):
    """Runs Lanczos steps ``start..stop-1`` on a preallocated (m, n) basis.

    Rows ``0..start`` of ``basis`` must hold the orthonormal vectors built so far (row
    ``start`` is the current vector). ``anorm`` is a running estimate of the operator norm
    used for the breakdown test. Returns the updated ``(basis, alphas, betas, anorm)``.

    Each step is the three-term recurrence with partial reorthogonalisation (`_lanczos_step`).
    """

    def body(i, carry):
        (basis, alphas, betas, anorm), orth = _lanczos_step(
            matvec, key, i, carry[:4], carry[4], dim=dim
        )
        return _constrain(basis, sharding), alphas, betas, anorm, orth

    init = (basis, alphas, betas, anorm, _init_orth(basis.shape[0], basis.dtype, start))
    return lax.fori_loop(start, stop, body, init)[:4]


def _init_orth(m, dtype, start):
    """The orthogonality estimates at row ``start``: ω of the current and previous vectors
    unknown, so the first two steps reorthogonalise in full (``force = 2``)."""
    eye = jnp.arange(m) == start
    prev = jnp.arange(m) == start - 1
    return eye.astype(dtype), prev.astype(dtype), jnp.asarray(2, jnp.int32)


def _orthogonality_level(dtype):
    """How far the basis may drift from orthogonality before a sweep: √ε, Simon's
    semi-orthogonality (eigenvalues to working accuracy), in single and lower precision;
    ε^(3/4) (about 2e-12) in float64, whose users ask for Ritz vectors orthonormal to more
    than √ε (1.5e-8)."""
    eps = jnp.finfo(dtype).eps
    return eps**0.75 if jnp.dtype(dtype) == jnp.float64 else eps**0.5


def _omega_next(omega, omega_prev, alphas, betas, i, beta, anorm):
    """Simon's (1984) recurrence: estimates ω_{i+1,k} of v_{i+1}·v_k (k ≤ i) from those of
    v_i (``omega``) and v_{i−1} (``omega_prev``), with ``alphas[i]`` and ``beta`` = β_i set,
    plus the rounding of one step, ε‖A‖/β_i, with the sign that makes it grow."""
    m = omega.shape[0]
    k = jnp.arange(m)
    eps = jnp.finfo(omega.dtype).eps
    beta = jnp.maximum(beta, jnp.finfo(omega.dtype).tiny)
    beta_prev = jnp.where(i > 0, betas[jnp.maximum(i - 1, 0)], 0)
    up = jnp.concatenate([omega[1:], jnp.zeros((1,), omega.dtype)])  # ω_{i,k+1}
    down = jnp.concatenate([jnp.zeros((1,), omega.dtype), omega[:-1]])  # ω_{i,k−1}
    beta_down = jnp.concatenate([jnp.zeros((1,), betas.dtype), betas[:-1]])  # β_{k−1}
    new = betas * up + (alphas - alphas[i]) * omega + beta_down * down - beta_prev * omega_prev
    psi = eps * anorm / beta
    new = new / beta + jnp.where(new >= 0, psi, -psi)
    new = jnp.where(k < i, new, 0)
    new = jnp.where(k == i, psi, new)
    return jnp.where(k == i + 1, 1, new)


def _lanczos_step(matvec, key, i, carry, orth, locked=0, dim=None):
    """Lanczos step ``i`` on ``carry = (basis, alphas, betas, anorm)``.

    Partial reorthogonalisation (Simon 1984; as PROPACK does): the recurrence's estimates ω of
    the new vector's overlaps with the basis (`_omega_next`, O(m) numbers a step) decide
    whether to orthogonalise it against the rows in use, which happens only when some
    |ω| exceeds `_orthogonality_level` (√ε ≈ 3e-4 in float32, ε^(3/4) ≈ 2e-12 in float64;
    then for the next vector too), at a breakdown, and in the first two steps after
    ``start``. Semi-orthogonality keeps the eigenvalues of T accurate to working precision
    (Simon 1984), while most steps skip the sweep over the stored rows (the memory-bound part
    at large m). A
    reorthogonalisation is one Gram–Schmidt pass, and a second only when the first removed
    more than half of the vector's norm ("twice is enough", Parlett 1998).
    ``orth = (omega, omega_prev, force)`` is carried from step to step (`_init_orth`).
    The first ``locked`` rows (Ritz vectors locked by a restart of `Operator.eigenpairs`,
    whose residuals the recurrence does not model) are swept at every step. ``dim``: the
    operator's dimension when the basis is wider (padded to a multiple of the devices its
    columns are split over); random vectors are then zero in the padding.
    """
    basis, alphas, betas, anorm = carry
    omega, omega_prev, force = orth
    n = basis.shape[1]
    eps = jnp.finfo(basis.dtype).eps
    v, v_prev = basis[i], basis[jnp.maximum(i - 1, 0)]
    w = matvec(v)
    anorm = jnp.maximum(anorm, jnp.linalg.norm(w))
    alpha = jnp.vdot(v, w)
    beta_prev = jnp.where(i > 0, betas[jnp.maximum(i - 1, 0)], 0)
    w = w - alpha * v - beta_prev * v_prev
    # Breakdown (an invariant Krylov subspace): continue from a random vector instead,
    # with a zero coupling, so T splits into blocks; eigenvalues outside the subspace, and
    # further copies of repeated ones, are then still found, and no 0/0 appears. (A cond
    # on the vector alone: the random vector is drawn only when needed.)
    breakdown = jnp.linalg.norm(w) <= 100 * eps * anorm

    def fresh():
        r = jax.random.normal(jax.random.fold_in(key, i), (n,), basis.dtype)
        r = _unpadded(r, dim)
        return r / jnp.linalg.norm(r)

    x = lax.cond(breakdown, fresh, lambda: w)
    beta_guess = jnp.linalg.norm(x)
    omega_new = _omega_next(omega, omega_prev, alphas.at[i].set(alpha), betas, i, beta_guess, anorm)
    k = jnp.arange(omega.shape[0])
    level = jnp.max(jnp.where(k <= i, jnp.abs(omega_new), 0))
    drift = level > _orthogonality_level(basis.dtype)
    full = drift | breakdown | (force > 0)
    h, x = _project(basis, x, jnp.where(full, i + 1, locked))
    again = jnp.linalg.norm(x) < 0.5 * beta_guess
    h2, x = _project(basis, x, jnp.where(again, i + 1, 0))
    full = full | again
    alpha = alpha + jnp.where(breakdown, 0, h[i] + h2[i])
    norm_x = jnp.linalg.norm(x)
    beta = jnp.where(breakdown, 0, norm_x).astype(basis.dtype)
    # After a sweep the new vector is orthogonal to working accuracy; the next one is swept
    # too (the error it inherits from v_i was not removed), as PRO prescribes.
    omega_new = jnp.where(full & (k <= i), eps, omega_new)
    force = jnp.where(drift | breakdown, 1, jnp.maximum(force - 1, 0))
    # The last step keeps only beta. (A clamped row and a select on that row, not
    # ``.at[i + 1].set(mode="drop")``: XLA lowers the dropped write to a select over the whole
    # basis, rewriting all m rows every step.)
    row = jnp.minimum(i + 1, basis.shape[0] - 1)
    new_row = jnp.where(i + 1 < basis.shape[0], x / norm_x, basis[row])
    basis = lax.dynamic_update_slice_in_dim(basis, new_row[None], row, axis=0)
    carry = basis, alphas.at[i].set(alpha), betas.at[i].set(beta), anorm
    return carry, (omega_new, omega, force)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _init_basis(v0, num_steps, sharding=None):
    """A zero (num_steps, n) basis with the normalised ``v0`` in row 0, and zero alphas and
    betas; laid out by ``sharding`` (`basis_sharding`) when given. (Jitted, so the basis is
    written once, in place; module level: no loss in it.)"""
    v0 = v0 / jnp.linalg.norm(v0)
    basis = _constrain(jnp.zeros((num_steps, v0.shape[0]), v0.dtype), sharding)
    basis = _constrain(basis.at[0].set(v0), sharding)
    return basis, jnp.zeros((num_steps,), v0.dtype), jnp.zeros((num_steps,), v0.dtype)


def _fallback_key(v0):
    # A key derived from the start vector, so `lanczos` stays deterministic without the
    # caller having to pass one (used only for restarts after a breakdown).
    bits = lax.bitcast_convert_type(v0.astype(jnp.float32), jnp.uint32)
    return jax.random.key(jnp.bitwise_xor.reduce(bits))


def lanczos(
    matvec: Callable[[jax.Array], jax.Array],
    v0: jax.Array,
    num_steps: int,
    *,
    key=None,
    sharding: NamedSharding | None = None,
):
    """Symmetric Lanczos with partial reorthogonalisation.

    Pure: a `lax.fori_loop` over a preallocated (num_steps, n) basis, so compile time does not
    depend on ``num_steps``. Simon's (1984) recurrence estimates each new vector's overlaps
    with the basis; the vector is orthogonalised against the stored rows (modified
    Gram–Schmidt, twice when needed) only when an estimate exceeds √ε (ε^(3/4) in float64),
    and the one after it too, as PROPACK does: the basis stays semi-orthogonal, which keeps
    the tridiagonal's eigenvalues accurate to working precision, and most steps skip the
    memory-bound sweep. On breakdown (an invariant Krylov subspace) the iteration continues
    from a random vector orthogonal to the basis with a zero off-diagonal, so repeated
    eigenvalues are found with their multiplicity and no NaN is produced.

    Args:
      matvec: symmetric linear map on vectors of ``v0``'s shape and dtype.
      v0: (n,) start vector (need not be normalised).
      num_steps: number of Lanczos steps m (1 <= m <= n).
      key: key for restart vectors after a breakdown; default derived from ``v0``.
      sharding: optional layout of the (num_steps, n) basis, e.g. `basis_sharding` of
        parameters split over devices (n must be divisible by their number).

    Returns:
      `LanczosResult` (alphas, betas, basis). Diagonalise the tridiagonal with
      `tridiagonal_eigh` (float64, on the host).

    Raises:
      ValueError: ``v0`` is not a vector, or ``num_steps`` is out of range.

    Example:
      >>> import jax.numpy as jnp
      >>> from sharp_minima import curvature
      >>> A = jnp.diag(jnp.array([3.0, 1.0, -2.0, 0.5]))
      >>> res = curvature.lanczos(lambda v: A @ v, jnp.ones(4), 4)
      >>> values, _ = curvature.tridiagonal_eigh(res.alphas, res.betas)
      >>> values.round(6).tolist()
      [-2.0, 0.5, 1.0, 3.0]
    """
    if jnp.ndim(v0) != 1:
        raise ValueError(f"v0 must be a vector, got shape {jnp.shape(v0)}")
    n = jnp.shape(v0)[0]
    if not 1 <= num_steps <= n:
        raise ValueError(f"num_steps must be in [1, {n}] (the dimension), got {num_steps}")
    if sharding is not None and n % sharding.mesh.size:
        raise ValueError(
            f"a basis split over {sharding.mesh.size} devices needs n divisible by "
            f"{sharding.mesh.size}, got n = {n}: pad v0 (and the matvec) with zeros"
        )
    key = _fallback_key(v0) if key is None else key
    basis, alphas, betas = _init_basis(v0, num_steps, sharding)
    basis, alphas, betas, _ = _lanczos_steps(
        matvec, basis, alphas, betas, 0, num_steps, key, jnp.zeros((), basis.dtype), sharding
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


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


class Eigenpairs(NamedTuple):
    """Output of `eigenpairs`.

    Attributes:
      values: (k,) float64 eigenvalues ("LA": descending; "SA": ascending; "LM": by
        descending magnitude; "BE": descending).
      vectors: pytree like params with a leading axis k; orthonormal (entries of parameters
        outside ``wrt`` are zero).
      residuals: (k,) float64 ``||M v - lambda v||``: Lanczos's estimate
        ``|beta_m s_mi|`` (free; equal to the true residual while the basis stays
        orthonormal), or measured with one product per vector when ``exact_residuals=True``.
      converged: (k,) bool: the eigenvalue error bound ``min(r, r^2 / gap)`` (r the
        residual, gap the distance to the nearest other Ritz value) is at most
        ``tol * max|lambda|``.
      num_steps: Lanczos steps (products) taken, over all restarts, not counting the k products
        of ``exact_residuals``.
      tridiagonal: ``(alphas, betas)`` of the last Lanczos run (float64, the rows in use),
        e.g. to save along training.
    """

    values: np.ndarray
    vectors: PyTree
    residuals: np.ndarray
    converged: np.ndarray
    num_steps: int
    tridiagonal: tuple[np.ndarray, np.ndarray] = (np.zeros(0), np.zeros(0))


class Estimate(NamedTuple):
    """A stochastic estimate and its cost.

    Attributes:
      value: the estimate.
      stderr: one standard error.
      num_matvecs: operator products it took.
    """

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


def _error_bounds(theta, residuals, idx):
    """Eigenvalue error bounds ``min(r, r^2 / gap)`` of the Ritz values ``theta[idx]``
    (Parlett 1998, Sec. 11.7; gap = distance to the nearest other Ritz value). numpy."""
    others = np.abs(theta[idx][:, None] - theta[None, :])
    others[np.arange(len(idx)), idx] = np.inf
    if len(theta) < 2:  # no gap to measure: only the residual bound holds
        return residuals
    gap = np.maximum(others.min(axis=1), np.finfo(np.float64).tiny)
    return np.minimum(residuals, residuals**2 / gap)


def _ritz_residuals(betas, s, idx, locked_res=None):
    """Residual estimates ``|beta_m s_mi|`` of the Ritz pairs ``idx``; after a restart that
    locked k pairs in the first rows of T (decoupled there, so Lanczos sees no residual),
    their residuals at lock time (``locked_res``) are added in quadrature, weighted by each
    Ritz vector's components on the locked rows. numpy."""
    res = np.abs(betas[-1] * s[-1, idx])
    if locked_res is None:
        return res
    k = len(locked_res)
    return np.sqrt(res**2 + ((s[:k, idx] * locked_res[:, None]) ** 2).sum(0))


def _converged_on_device(alphas, betas, pos, min_pos, tol, *, k, which):
    """Whether the k wanted Ritz values of ``T[:pos, :pos]`` meet the eigenvalue tolerance:
    the device-side twin of the host test in `Curvature.eigenpairs` (one dense ``eigh`` of the
    whole m x m tridiagonal, its unused rows set far outside the spectrum and decoupled, so
    the compiled code does not depend on ``pos``)."""
    m = alphas.shape[0]
    rows = jnp.arange(m)
    live = rows < pos
    bound = jnp.max(jnp.abs(alphas)) + 2 * jnp.max(jnp.abs(betas)) + 1  # >= ||T|| (Gershgorin)
    diag = jnp.where(live, alphas, 2 * bound)
    off = jnp.where(rows < pos - 1, betas, 0)[:-1]
    theta, s = jnp.linalg.eigh(jnp.diag(diag) + jnp.diag(off, 1) + jnp.diag(off, -1))
    real = jnp.sum(jnp.where(live[:, None], s**2, 0), axis=0) > 0.5
    neg_inf = jnp.asarray(-jnp.inf, theta.dtype)
    if which == "BE":
        _, top = lax.top_k(jnp.where(real, theta, neg_inf), (k + 1) // 2)
        _, bottom = lax.top_k(jnp.where(real, -theta, neg_inf), k // 2)
        idx = jnp.concatenate([top, bottom])
    else:
        score = {"LA": theta, "SA": -theta, "LM": jnp.abs(theta)}[which]
        _, idx = lax.top_k(jnp.where(real, score, neg_inf), k)
    last = betas[jnp.maximum(pos - 1, 0)]
    res = jnp.abs(last * s[jnp.maximum(pos - 1, 0), idx])
    dist = jnp.abs(theta[idx][:, None] - theta[None, :])
    dist = jnp.where(real[None, :] & (jnp.arange(m)[None, :] != idx[:, None]), dist, jnp.inf)
    gap = dist.min(axis=1)  # inf for a lone Ritz value: then only the residual bound holds
    err = jnp.where(
        jnp.isfinite(gap),
        jnp.minimum(res, res**2 / jnp.maximum(gap, jnp.finfo(theta.dtype).tiny)),
        res,
    )
    scale = jnp.max(jnp.where(real, jnp.abs(theta), 0))
    eps = jnp.finfo(alphas.dtype).eps
    # A (near-)zero last beta means the Krylov space just became invariant: every Ritz pair
    # looks converged although eigenvalues outside it are unseen. Stop only while exploring.
    exploring = jnp.abs(last) > jnp.sqrt(eps) * scale
    ok = (pos >= min_pos) & exploring & jnp.all(err <= tol * scale)
    return ok | ~jnp.all(jnp.isfinite(alphas))  # NaN: stop at once, the host reports it


def _ritz(a, b, k: int, which: str, locked_res):
    """The Ritz values of the tridiagonal (alphas ``a``, betas ``b``, float64 on the host):
    ``(theta, s, idx, scale, estimates)`` — all values and vectors, the wanted ones' indices,
    max|theta| and the wanted pairs' residual estimates."""
    theta, s = tridiagonal_eigh(a, b)
    idx = _select_ritz(theta, k, which)
    scale = max(np.abs(theta).max(), np.finfo(np.float64).tiny)
    return theta, s, idx, scale, _ritz_residuals(b, s, idx, locked_res)


def _ritz_coefficients(s, idx, pos: int, m: int) -> np.ndarray:
    """(k, m): the wanted Ritz vectors' coefficients in the first ``pos`` basis rows."""
    coeffs = np.zeros((len(idx), m))
    coeffs[:, :pos] = s[:, idx].T
    return coeffs


def _same_values(a, b, atol: float) -> bool:
    """Whether two sets of eigenvalues agree to ``atol`` (sorted)."""
    return np.allclose(np.sort(a), np.sort(b), rtol=0, atol=atol)


def _basis_rows(k, n: int, num_steps, check_every: int, tol: float) -> int:
    """The Lanczos basis's first size for `Operator.eigenpairs` (``num_steps``, or by default
    ``min(n, max(2k + 20, 30))``, doubled later as needed), its arguments checked."""
    if not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > n:
        raise ValueError(f"k={k} exceeds the dimension {n} of the (selected) parameters")
    m = min(n, max(2 * k + 20, 30)) if num_steps is None else num_steps
    if m < k:
        raise ValueError(f"num_steps={m} must be at least k={k}")
    if m > n:
        raise ValueError(f"num_steps={m} exceeds the dimension {n} of the (selected) parameters")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    return m


@functools.partial(jax.jit, static_argnums=(3,))
def _jitted_grow(basis, alphas, betas, m):
    """The basis, alphas and betas padded with zeros to m rows (module level: no loss)."""
    pad = m - basis.shape[0]
    return (
        jnp.pad(basis, ((0, pad), (0, 0))),
        jnp.pad(alphas, (0, pad)),
        jnp.pad(betas, (0, pad)),
    )


@functools.partial(jax.jit, donate_argnums=(0,), static_argnums=(4,))
def _jitted_lock(basis, coeffs, values, key, dim=None):
    """A new basis: the Ritz vectors ``coeffs @ basis`` locked in its first k rows (with
    ``values`` on the diagonal of T and zero couplings), then a random orthogonal vector.
    (Module level: it does not depend on the caller's loss.)"""
    k, (m, n) = coeffs.shape[0], basis.shape
    ritz = coeffs @ basis
    new = jnp.zeros_like(basis).at[:k].set(ritz)
    r = _unpadded(jax.random.normal(key, (n,), basis.dtype), dim)
    r, _ = _orthogonalize(new, r)
    r, _ = _orthogonalize(new, r / jnp.linalg.norm(r))
    new = new.at[k].set(r / jnp.linalg.norm(r))
    alphas = jnp.zeros((m,), basis.dtype).at[:k].set(values)
    return new, alphas, jnp.zeros((m,), basis.dtype)


def rademacher_probes(key, num, n, dtype):
    """Rademacher probes, entries ±1 with equal probability, so E[z zᵀ] = I (Hutchinson 1989).

    Args:
      key: PRNG key.
      num: number of probes.
      n: their dimension.
      dtype: their dtype.

    Returns:
      An array (num, n).
    """
    return jax.random.rademacher(key, (num, n), dtype)


def _mean_and_stderr(samples):
    samples = np.asarray(samples, np.float64)
    if samples.size < 2:
        return float(samples.mean()), float("nan")
    return float(samples.mean()), float(samples.std(ddof=1) / math.sqrt(samples.size))


# --------------------------------------------------------------------------------------
# The operator base
# --------------------------------------------------------------------------------------


def basis_sharding(params: PyTree, wrt, dim: int) -> NamedSharding | None:
    """How the solvers lay out (m, D) bases and (k, D) vectors for these parameters.

    Args:
      params: the parameters (their leaves' shardings decide).
      wrt: the selected subset (as in `Operator`).
      dim: D, the number of selected parameters (any D: the operators pad it).

    Returns:
      ``NamedSharding(mesh, P(None, <all mesh axes>))`` when some selected leaf of
      ``params`` is itself split over a mesh of d > 1 devices (FSDP-style): each device
      then holds 1/d of every basis (D padded with zeros to a multiple of d, which the
      operators ignore). ``None`` (replicated, the default layout) otherwise, e.g. for
      replicated parameters with batches sharded over the data axis.
    """
    del dim  # any D: the operators pad it
    selected, _ = tu.select(params, wrt)
    for leaf in selected:
        sharding = getattr(leaf, "sharding", None)
        if (
            isinstance(sharding, NamedSharding)
            and sharding.mesh.size > 1
            and any(axis is not None for axis in sharding.spec)
        ):
            return NamedSharding(sharding.mesh, PartitionSpec(None, sharding.mesh.axis_names))
    return None


def _pad(v, width):
    """``v`` (n,) with zeros appended up to ``width``."""
    return v if v.shape[0] == width else jnp.pad(v, (0, width - v.shape[0]))


def _unpadded(v, dim):
    """``v`` with its entries past ``dim`` (the padding) set to zero."""
    if dim is None or dim == v.shape[0]:
        return v
    return jnp.where(jnp.arange(v.shape[0]) < dim, v, 0)


def _padded(matvec, dim, width):
    """The product on vectors padded from ``dim`` to ``width`` (zero in the padding)."""
    if width == dim:
        return matvec
    return lambda v: _pad(matvec(v[:dim]), width)


def _constrain(x, sharding):
    return x if sharding is None else lax.with_sharding_constraint(x, sharding)


def _placed(like, tree):
    """``tree``'s single-device arrays replicated over the mesh of ``like``'s arrays (the
    batches, the parameters), where the kernels' outputs live: a kernel called again with
    its own outputs (a grown basis, a sketch ``Q``) then sees the inputs of its first call
    and is not compiled a second time. Unchanged without a mesh, or when the mesh spans
    processes (a process-local array cannot be placed on it)."""
    meshes = [
        leaf.sharding
        for leaf in jax.tree.leaves(like)
        if isinstance(getattr(leaf, "sharding", None), NamedSharding)
    ]
    if not meshes or not meshes[0].is_fully_addressable:
        return tree
    target = NamedSharding(meshes[0].mesh, PartitionSpec())

    def place(x):
        single = isinstance(getattr(x, "sharding", None), jax.sharding.SingleDeviceSharding)
        return jax.device_put(x, target) if single else x

    return jax.tree.map(place, tree)


class Operator:
    """A symmetric curvature operator of the ``wrt`` parameters that owns its compiled kernels.

    A subclass defines `flat_matvec` (the product with a flat vector, averaged over the
    weighted batches) and, optionally, `operands` (arrays of its own that its kernels take,
    e.g. the sampling key of a Monte-Carlo Fisher). Everything else is here: `matvec`,
    `operator`, `lanczos`, `eigenpairs`, `spectral_density`, `trace`, `frobenius_norm`. Each
    kernel (a block of products, Lanczos until convergence, stochastic Lanczos quadrature) is
    compiled the first time it is used and reused for any parameters, batches and weights of
    the same shapes and dtypes: hold one along training and call it with new parameters (and
    BatchNorm statistics, which belong in ``params``) each time.

    Args:
      objective: the `sharp_minima.objective.Objective` whose parameters (``wrt``) the
        operator acts on.
      chunk: products evaluated at once (vmapped) by `trace`, `frobenius_norm` and the
        residual check of `eigenpairs`.

    Attributes:
      name: the operator's short name: the metric prefix of
        `sharp_minima.tracking.EigenTracker` and the word in messages.
      products: what one product is called in messages ("Hessian-vector products").
      objective: the `sharp_minima.objective.Objective` (function and ``wrt``).
      num_traces: how many times a kernel was traced (= compiled) so far; a reused object
        whose inputs keep their shapes does not add to it.
    """

    name = "operator"
    products = "matrix-vector products"

    def __init__(self, objective_: objective.Objective, *, chunk: int = 8):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.objective = objective_
        self.chunk = chunk
        self.num_traces = 0
        self._matvec_jit = jax.jit(self._matvec_kernel)
        self._matmat_jit = jax.jit(self._matmat_kernel, static_argnames="chunk")
        self._drawn_matmat_jit = jax.jit(self._drawn_matmat_kernel, static_argnames="chunk")
        self._lanczos_jit = jax.jit(
            self._lanczos_kernel,
            donate_argnums=(4, 5, 6),
            static_argnames=("k", "which", "check_every", "sharding"),
        )
        self._slq_jit = jax.jit(self._slq_kernel, static_argnames=("num_steps", "sharding"))
        # Around the Lanczos loop, one compiled call each instead of an op-by-op program per
        # parameter leaf: the start vector and the Ritz vectors as params-like pytrees.
        self._start_jit = jax.jit(self._start_vector, static_argnums=(1, 2))
        self._vectors_jit = jax.jit(self._ritz_vectors)

    @property
    def wrt(self):
        return self.objective.wrt

    # -- what a subclass defines --------------------------------------------------------

    def flat_matvec(self, params, batches, weights, operands=None):
        """The operator on flat vectors, for a kernel of your own (e.g. a jitted function on
        `lanczos`); call inside a trace. Subclasses define it.

        Args:
          params: pytree at which the operator is taken.
          batches: batch pytree with a leading axis over batches, or ``None``.
          weights: per-batch weights summing to one (`objective.normalized_weights`).
          operands: `operands`'s value, passed as an argument (never closed over).

        Returns:
          ``(x0, matvec)``: the flat selected parameters and ``v -> M v`` on flat vectors,
          averaged over the batches with ``weights``.
        """
        raise NotImplementedError

    def operands(self) -> PyTree:
        """Arrays of the operator's own that every kernel takes as an argument (never closed
        over), e.g. the Monte-Carlo Fisher's key.

        Returns:
          A pytree, or None (the default: no arrays).
        """
        return None

    def operand_draws(self, count: int) -> PyTree | None:
        """``count`` independent draws of `operands`, stacked on a leading axis, for an
        operator that is itself a random draw (the Monte-Carlo Fisher's labels): `trace`
        gives each probe its own draw, so its error covers the draw's variance. None (the
        default): the operator is not random.

        Args:
          count: how many draws.

        Returns:
          A pytree with a leading axis of ``count``, or None.
        """
        return None

    # -- kernels (traced once per input shape) ------------------------------------------

    def _matvec_kernel(self, params, batches, weights, operands, tangent):
        self.num_traces += 1
        _, matvec = self.flat_matvec(params, batches, weights, operands)
        return self.objective.unflatten(params, matvec(self.objective.flatten(tangent)))

    def _matmat_kernel(self, params, batches, weights, operands, vectors, *, chunk):
        """``vectors (p, n) -> M @ vectors`` (p products, ``chunk`` of them vmapped at a time)."""
        self.num_traces += 1
        _, matvec = self.flat_matvec(params, batches, weights, operands)
        return lax.map(matvec, vectors, batch_size=chunk)

    def _drawn_matmat_kernel(self, params, batches, weights, draws, vectors, *, chunk):
        """``vectors (p, n) -> [M_j @ vectors_j]``: each product with its own draw of the
        operands (``draws``, leading axis p)."""
        self.num_traces += 1

        def one(vd):
            return self.flat_matvec(params, batches, weights, vd[1])[1](vd[0])

        return lax.map(one, (vectors, draws), batch_size=chunk)

    def _lanczos_kernel(
        self,
        params,
        batches,
        weights,
        operands,
        basis,
        alphas,
        betas,
        pos,
        min_pos,
        limit,
        key,
        anorm,
        tol,
        locked,
        *,
        k,
        which,
        check_every,
        sharding,
    ):
        """Lanczos from row ``pos`` until the k wanted Ritz values meet ``tol`` (tested on the
        device every ``check_every`` steps) or ``limit`` steps are done (``limit = m - 1``
        keeps the next Lanczos vector in the last row, so a grown basis can go on). ``k = 0``
        runs to ``limit`` without testing."""
        self.num_traces += 1
        x0, matvec = self.flat_matvec(params, batches, weights, operands)
        dim = x0.shape[0]
        matvec = _padded(matvec, dim, basis.shape[1])

        def cond(carry):
            return (carry[3] < limit) & ~carry[5]

        # One loop of single steps, the test under a `lax.cond` every `check_every` steps (it
        # reads only alphas and betas): nested loops made XLA copy the basis at every chunk.
        def body(carry):
            basis, alphas, betas, pos, anorm, _, orth = carry
            (basis, alphas, betas, anorm), orth = _lanczos_step(
                matvec, key, pos, (basis, alphas, betas, anorm), orth, locked, dim
            )
            basis = _constrain(basis, sharding)
            pos = pos + 1
            if k == 0:
                return basis, alphas, betas, pos, anorm, jnp.asarray(False), orth
            done = lax.cond(
                (pos % check_every == 0) | (pos == limit),
                lambda: _converged_on_device(alphas, betas, pos, min_pos, tol, k=k, which=which),
                lambda: jnp.asarray(False),
            )
            return basis, alphas, betas, pos, anorm, done, orth

        basis = _constrain(basis, sharding)
        pos = jnp.asarray(pos, jnp.int32)
        orth = _init_orth(basis.shape[0], basis.dtype, pos)
        init = (basis, alphas, betas, pos, anorm, jnp.asarray(False), orth)
        return lax.while_loop(cond, body, init)[:5]

    def _slq_kernel(self, params, batches, weights, operands, probes, key, *, num_steps, sharding):
        self.num_traces += 1
        x0, matvec = self.flat_matvec(params, batches, weights, operands)
        dim = x0.shape[0]
        matvec = _padded(matvec, dim, probes.shape[1])

        def one(args):
            v0, i = args
            basis, alphas, betas = _init_basis(v0, num_steps, sharding)
            _, alphas, betas, _ = _lanczos_steps(
                matvec,
                basis,
                alphas,
                betas,
                0,
                num_steps,
                jax.random.fold_in(key, i),
                jnp.zeros((), basis.dtype),
                sharding,
                dim,
            )
            return alphas, betas

        # Probes one after another: each needs a full basis, and only the tridiagonals are kept.
        return lax.map(one, (probes, jnp.arange(probes.shape[0])))

    # -- the operator -------------------------------------------------------------------

    def _prepare(self, params, batches, weights):
        return self.objective.prepare(params, batches, weights)

    def operator(self, params, batches, *, weights=None) -> Callable[[PyTree], PyTree]:
        """The operator at ``params`` over ``batches`` as a function on pytrees; the inputs are
        validated once.

        Args:
          params: pytree at which the operator is taken.
          batches: batch pytree with a leading axis over batches, or ``None``.
          weights: optional per-batch weights.

        Returns:
          ``tangent -> M @ tangent`` (pytrees like params; zero outside ``wrt``), jitted.

        Raises:
          ValueError: bad weights or shapes, or a ``wrt`` that selects nothing.
        """
        prep = self._prepare(params, batches, weights)
        operands = self.operands()

        def matvec(tangent):
            objective.check_like("tangent", tangent, params)
            tangent = _placed((batches, prep.params), tangent)
            return self._matvec_jit(prep.params, batches, prep.weights, operands, tangent)

        return matvec

    def matvec(self, params, batches, tangent, *, weights=None) -> PyTree:
        """One product ``M @ tangent``.

        Args:
          params: pytree at which the operator is taken.
          batches: batch pytree with a leading axis over batches, or ``None``.
          tangent: pytree like ``params``.
          weights: optional per-batch weights.

        Returns:
          A pytree like params (zero outside ``wrt``).

        Raises:
          ValueError: a tangent of another structure, bad weights or shapes.
        """
        return self.operator(params, batches, weights=weights)(tangent)

    def _matmat(self, prep, batches, vectors):
        vectors = _placed((batches, prep.params), vectors)
        return self._matmat_jit(
            prep.params, batches, prep.weights, self.operands(), vectors, chunk=self.chunk
        )

    def _sharding(self, prep):
        return basis_sharding(prep.params, self.objective.wrt, prep.dim)

    def _width(self, prep) -> int:
        """The basis's number of columns: D, rounded up to a multiple of the devices its
        columns are split over (the padding is zero and the operator ignores it)."""
        sharding = self._sharding(prep)
        d = 1 if sharding is None else sharding.mesh.size
        return -(-prep.dim // d) * d

    def _run_lanczos(
        self,
        prep,
        batches,
        basis,
        alphas,
        betas,
        pos,
        min_pos,
        limit,
        key,
        anorm,
        tol,
        *,
        k,
        which,
        check_every,
        locked=0,
    ):
        basis, alphas, betas, key, anorm, tol, locked = _placed(
            (batches, prep.params),
            (basis, alphas, betas, key, anorm, jnp.asarray(tol, prep.dtype), jnp.int32(locked)),
        )
        return self._lanczos_jit(
            prep.params,
            batches,
            prep.weights,
            self.operands(),
            basis,
            alphas,
            betas,
            pos,
            min_pos,
            limit,
            key,
            anorm,
            tol,
            locked,
            k=k,
            which=which,
            check_every=check_every,
            sharding=self._sharding(prep),
        )

    # -- Lanczos ------------------------------------------------------------------------

    def lanczos(
        self,
        params: PyTree,
        batches: PyTree | None,
        *,
        num_steps: int,
        key: jax.Array,
        weights=None,
    ) -> LanczosResult:
        """``num_steps`` Lanczos steps of the operator from a random start vector (the kernel
        `eigenpairs` runs, without its stopping test).

        Args:
          params: pytree at which the operator is taken.
          batches: batch pytree with a leading axis over batches, or ``None``.
          num_steps: steps (the basis has that many rows; at most the dimension).
          key: key of the start vector.
          weights: optional per-batch weights.

        Returns:
          `LanczosResult`: the tridiagonal (``alphas``, ``betas``) and the (num_steps, D)
          ``basis``, laid out like the parameters (`basis_sharding`).

        Raises:
          ValueError: ``num_steps`` out of range, bad weights or shapes.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from sharp_minima import hessian
          >>> loss = lambda w, batch: 0.5 * jnp.sum(jnp.arange(1.0, 6.0) * w**2)
          >>> res = hessian.Curvature(loss).lanczos(jnp.zeros(5), None, num_steps=5,
          ...                                       key=jax.random.key(0))
          >>> hessian.tridiagonal_eigh(res.alphas, res.betas)[0].round(4).tolist()
          [1.0, 2.0, 3.0, 4.0, 5.0]
        """
        prep = self._prepare(params, batches, weights)
        if not 1 <= num_steps <= prep.dim:
            raise ValueError(
                f"num_steps must be in [1, {prep.dim}] (the dimension), got {num_steps}"
            )
        key_start, key_restart = jax.random.split(key)
        v0 = _pad(jax.random.normal(key_start, (prep.dim,), prep.dtype), self._width(prep))
        basis, alphas, betas = _init_basis(v0, num_steps, self._sharding(prep))
        basis, alphas, betas, _, _ = self._run_lanczos(
            prep,
            batches,
            basis,
            alphas,
            betas,
            0,
            num_steps,
            num_steps,
            key_restart,
            jnp.zeros((), prep.dtype),
            1.0,
            k=0,
            which="LA",
            check_every=1,
        )
        objective.check_finite(f"{self.products} (Lanczos)", alphas, betas)
        return LanczosResult(alphas, betas, basis)

    # -- eigenpairs ---------------------------------------------------------------------

    def eigenpairs(
        self,
        params: PyTree,
        batches: PyTree | None,
        *,
        k: int,
        key: jax.Array,
        num_steps: int | None = None,
        which: str = "LA",
        weights=None,
        init_vectors: PyTree | None = None,
        tol: float = 1e-4,
        check_every: int = 1,
        restart: bool = True,
        exact_residuals: bool = False,
    ) -> Eigenpairs:
        """Extreme eigenpairs of the operator by Lanczos with partial reorthogonalisation.

        One jitted call runs Lanczos on a preallocated basis and, every ``check_every``
        steps, tests on the device whether the k wanted Ritz values are accurate to
        ``tol * max|lambda|`` (error bound ``min(r, r^2 / gap)`` from the Lanczos residual
        estimates r); the compiled code depends on neither ``num_steps`` nor where it stops.
        The tridiagonal is then diagonalised in float64 on the host and the Ritz vectors
        formed. Jastrzębski et al. (2019) track the top eigenpairs this way along training;
        pass the previous vectors as ``init_vectors`` to warm-start.

        A single Krylov sequence sees only one copy of a repeated eigenvalue (e.g. in the
        Kronecker-structured last layer of a multi-output model) and would drop the others
        without a word. So by default (``restart=True``) the converged pairs are locked and
        a short verifying restart (`VERIFY_STEPS` = 10 steps) runs from a random vector
        orthogonal to them: a missed copy rises among the wanted Ritz values, which then
        must converge, and restarts go on until one adds nothing to the wanted set. The
        check costs about 10 products per call. ``restart=False`` skips it: for callers
        who know their spectrum is simple, or warm-start along training where one missed
        copy per call does no harm (`sharp_minima.tracking.EigenTracker`).

        Args:
          params: pytree at which the operator is taken.
          batches: batch pytree with a leading axis over batches, or ``None``.
          k: number of eigenpairs.
          key: key for the start vector (and restarts after a breakdown).
          num_steps: size of the Lanczos basis, i.e. the most steps between restarts
            (memory is ``num_steps * n`` numbers). By default the basis starts at
            ``min(n, max(2k + 20, 30))`` rows and doubles whenever it fills up before the
            wanted pairs converge; an explicit ``num_steps`` is a hard limit.
          which: "LA" largest algebraic, "SA" smallest algebraic, "LM" largest magnitude,
            "BE" both ends (ceil(k/2) largest and floor(k/2) smallest).
          weights: optional per-batch weights (see the module docstring).
          init_vectors: optional pytree like params with a leading axis (e.g. the previous
            ``vectors``); Lanczos starts from their sum plus a small random part.
          tol: eigenvalue accuracy relative to ``max|lambda|``, for stopping and the
            ``converged`` flags.
          check_every: steps between convergence tests (on the device, cheap).
          restart: lock and verify with a restart, to find repeated eigenvalues (see
            above); False for one Krylov sequence.
          exact_residuals: measure ``||M v - lambda v||`` with k more products instead of
            reporting the Lanczos estimates.

        Returns:
          `Eigenpairs`.

        Raises:
          ValueError: bad ``k``, ``num_steps``, ``which``, ``weights`` or shapes; non-scalar
            loss.
          FloatingPointError: the products produced NaN or Inf.
        """
        if which not in WHICH:
            raise ValueError(f"which must be one of {WHICH}, got {which!r}")
        prep = self._prepare(params, batches, weights)
        n, dtype = prep.dim, prep.dtype
        grow = num_steps is None
        m = _basis_rows(k, n, num_steps, check_every, tol)
        key_start, key_restart = jax.random.split(key)
        v0 = self._start_jit(key_start, n, dtype, init_vectors)
        basis, alphas, betas = _init_basis(_pad(v0, self._width(prep)), m, self._sharding(prep))
        anorm = jnp.zeros((), dtype)
        pos, total, locked, locked_res = 0, 0, None, None  # basis[pos]: the next to expand
        min_pos = k  # no convergence test before this row
        for round_ in itertools.count():
            limit = m - 1 if grow and m < n else m
            basis, alphas, betas, stop, anorm = self._run_lanczos(
                prep, batches, basis, alphas, betas, pos, min_pos, limit, key_restart, anorm,
                tol, k=k, which=which, check_every=check_every, locked=0 if locked is None else k,
            )  # fmt: skip
            stop = int(stop)
            total, pos = total + stop - pos, stop
            a, b = np.asarray(alphas, np.float64)[:pos], np.asarray(betas, np.float64)[:pos]
            objective.check_finite(f"{self.products} (Lanczos step {total})", a, b)
            theta, s, idx, scale, estimates = _ritz(a, b, k, which, locked_res)
            values = theta[idx]
            if grow and pos == limit < m:
                if np.any(_error_bounds(theta, estimates, idx) > tol * scale):
                    # Not converged in a full basis: double it and go on (one new compilation).
                    m = min(n, 2 * m)
                    basis, alphas, betas = _jitted_grow(basis, alphas, betas, m)
                    continue
            same = locked is not None and _same_values(values, locked, tol * scale)
            if not restart or pos == m or same or k + 1 + check_every > m:
                break
            coeffs = jnp.asarray(_ritz_coefficients(s, idx, pos, m), dtype)
            key_round = jax.random.fold_in(key_restart, round_)
            basis, alphas, betas = _jitted_lock(
                basis, coeffs, jnp.asarray(values, dtype), key_round, n
            )
            # The new block needs a few steps before the locked pairs (decoupled, zero
            # residual) may be declared complete: enough for an eigenvalue the first
            # Krylov sequence missed (a second copy) to rise among the wanted Ritz values.
            locked, pos, min_pos = values, k, min(m, k + VERIFY_STEPS)
            locked_res = estimates  # a locked pair's residual stays what it was

        coeffs = jnp.asarray(_ritz_coefficients(s, idx, pos, m), dtype)
        ritz, vectors = self._vectors_jit(prep.params, coeffs, basis)  # on the basis's devices
        del basis
        residuals = estimates
        if exact_residuals:
            residuals = self._exact_residuals(prep, batches, ritz, values)
        converged = _error_bounds(theta, residuals, idx) <= tol * scale
        return Eigenpairs(values, vectors, residuals, converged, total, (a, b))

    def _ritz_vectors(self, params, coeffs, basis):
        """The Ritz vectors ``coeffs @ basis``: (k, n) flat rows (the basis's padding
        dropped; rows past the basis's last are zero) and as pytrees like ``params``."""
        n = self.objective.flatten(params).shape[0]
        ritz = (coeffs @ basis)[:, :n]
        return ritz, jax.vmap(lambda r: self.objective.unflatten(params, r))(ritz)

    def _start_vector(self, key, n: int, dtype, init_vectors):
        """A random start vector, or the sum of ``init_vectors`` (a pytree like the params
        with a leading axis) plus a small random part (a warm start)."""
        v0 = jax.random.normal(key, (n,), dtype)
        if init_vectors is None:
            return v0
        prev = jax.vmap(self.objective.flatten)(init_vectors)
        if prev.ndim != 2 or prev.shape[-1] != n:
            raise ValueError(
                f"init_vectors must be params-shaped with a leading axis; got {prev.shape}"
            )
        guess = prev.astype(dtype).sum(0)
        return guess / jnp.linalg.norm(guess) + 0.1 * v0 / jnp.linalg.norm(v0)

    def _exact_residuals(self, prep, batches, ritz, values) -> np.ndarray:
        """``||M v - lambda v||`` of the Ritz pairs, with k more products."""
        hv = self._matmat(prep, batches, ritz)
        residuals = np.linalg.norm(
            np.asarray(hv, np.float64) - values[:, None] * np.asarray(ritz, np.float64), axis=1
        )
        objective.check_finite(f"{self.products} (residuals)", residuals)
        return residuals

    # -- spectral density ---------------------------------------------------------------

    def spectral_density(
        self,
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
    ) -> SpectralDensity:
        """Spectral density of the operator by stochastic Lanczos quadrature (SLQ).

        For each Rademacher probe z, ``num_steps`` Lanczos steps from z/|z| give Ritz values
        theta_j and weights tau_j (squared first components of the tridiagonal's
        eigenvectors); ``sum_j tau_j f(theta_j)`` is the Gauss quadrature of
        ``z^T f(H) z / n``, exact for polynomials of degree < 2 num_steps. The density is the
        probe average of ``sum_j tau_j N(t; theta_j, sigma^2)`` (Ghorbani et al. 2019).

        Args:
          params, batches, weights: the operator (see `eigenpairs`).
          key: key for the probes.
          num_probes: number of probes.
          num_steps: Lanczos steps per probe (default ``min(n, 80)``).
          num_points: grid size when ``grid`` is not given.
          sigma: smoothing width (default 1% of the Ritz-value range, or 1e-3 if empty).
          grid: optional evaluation points.

        Returns:
          `SpectralDensity`.

        Raises:
          ValueError: a non-positive ``sigma``, or bad arguments or shapes.
        """
        nodes, taus, _ = self._quadrature(
            params, batches, key, num_probes, num_steps, weights, "spectral density"
        )
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

    def _quadrature(self, params, batches, key, num_probes, num_steps, weights, what):
        """``(nodes, weights, n)``: the Gauss quadrature (Ritz values and squared first
        components) of ``num_probes`` Rademacher probes, ``num_steps`` Lanczos steps each."""
        prep = self._prepare(params, batches, weights)
        n = prep.dim
        m = min(n, 80) if num_steps is None else num_steps
        if not 1 <= m <= n:
            raise ValueError(f"num_steps must be in [1, {n}] (the dimension), got {m}")
        if num_probes < 1:
            raise ValueError(f"num_probes must be >= 1, got {num_probes}")
        key_probe, key_restart = jax.random.split(key)
        z = rademacher_probes(key_probe, num_probes, n, prep.dtype)
        z = jax.vmap(lambda v: _pad(v, self._width(prep)))(z)
        alphas, betas = self._slq_jit(
            prep.params,
            batches,
            prep.weights,
            self.operands(),
            z,
            key_restart,
            num_steps=m,
            sharding=self._sharding(prep),
        )
        objective.check_finite(f"{self.products} ({what})", alphas, betas)
        nodes, taus = [], []
        for a, b in zip(np.asarray(alphas), np.asarray(betas)):
            theta, vec = tridiagonal_eigh(a, b)
            nodes.append(theta)
            taus.append(vec[0] ** 2)
        return np.stack(nodes), np.stack(taus), n

    def log_det(
        self,
        params: PyTree,
        batches: PyTree | None,
        *,
        key: jax.Array,
        floor: float | None = None,
        num_probes: int = 10,
        num_steps: int | None = None,
        weights=None,
    ) -> Estimate:
        """log det of the operator's positive part, Σ_{λ > floor} log λ, by stochastic Lanczos
        quadrature: n · mean over probes of Σⱼ τⱼ log θⱼ over the Ritz values θⱼ above
        ``floor`` (Ubaru, Chen & Saad 2017). The quantity of the lecture notes' Laplace
        picture, P(A) ∝ det(H_A)^(-1/2), for a network whose Hessian has a bulk of (near-)zero
        and negative eigenvalues. The standard error is over the probes.

        Args:
          params, batches, weights: the operator (see `eigenpairs`).
          key: key for the probes.
          floor: eigenvalues at or below it are left out (default 1e-6 · the largest Ritz
            value).
          num_probes, num_steps: as for `spectral_density`.

        Returns:
          `Estimate` of the log-determinant (``num_matvecs`` = probes × steps).

        Raises:
          ValueError: no Ritz value above ``floor`` (the positive part is empty).
        """
        nodes, taus, n = self._quadrature(
            params, batches, key, num_probes, num_steps, weights, "log-determinant"
        )
        floor = 1e-6 * max(float(nodes.max()), 0.0) if floor is None else float(floor)
        above = nodes > floor
        if not above.any():
            raise ValueError(f"no Ritz value exceeds floor={floor:g}: the positive part is empty")
        logs = np.where(above, np.log(np.where(above, nodes, 1.0)), 0.0)
        samples = n * (taus * logs).sum(1)
        return Estimate(*_mean_and_stderr(samples), nodes.size)

    # -- trace and Frobenius norm -------------------------------------------------------

    def trace(
        self,
        params: PyTree,
        batches: PyTree | None,
        *,
        key: jax.Array,
        num_matvecs: int = 99,
        method: str = "hutch++",
        weights=None,
    ) -> Estimate:
        """Stochastic estimate of the operator's trace.

        ``"hutchinson"``: mean of z^T M z over Rademacher probes (Hutchinson 1989).
        ``"hutch++"``: a third of the budget sketches the top of the spectrum
        (Q = qr(H S)), whose trace is taken exactly, and the rest runs Hutchinson on the
        deflated remainder (Meyer et al. 2021); far lower variance when a few eigenvalues
        dominate, as in neural networks. The standard error is that of the Hutchinson part.
        For an operator that is itself a random draw (`operand_draws`: the Monte-Carlo
        Fisher) each probe gets its own draw, so the mean estimates the trace of the
        expected operator and the error covers the draws' variance (label sampling) as well
        as the probes'; one draw's sketch cannot, so ``"hutch++"`` runs as Hutchinson there.

        Args:
          params, batches, weights: the operator (see `eigenpairs`).
          key: key for the probes.
          num_matvecs: total number of products.
          method: ``"hutch++"`` or ``"hutchinson"``.

        Returns:
          `Estimate` of tr(M).

        Raises:
          ValueError: an unknown ``method``, or too few ``num_matvecs`` (Hutch++ needs 3).
        """
        if method not in ("hutch++", "hutchinson"):
            raise ValueError(f"method must be 'hutch++' or 'hutchinson', got {method!r}")
        prep = self._prepare(params, batches, weights)
        n, dtype = prep.dim, prep.dtype
        draws = self.operand_draws(max(num_matvecs, 1))
        if method == "hutchinson" or draws is not None:
            if num_matvecs < 1:
                raise ValueError(f"num_matvecs must be >= 1, got {num_matvecs}")
            z = rademacher_probes(key, num_matvecs, n, dtype)
            if draws is None:
                hz = self._matmat(prep, batches, z)
            else:
                hz = self._drawn_matmat_jit(
                    prep.params, batches, prep.weights, draws, z, chunk=self.chunk
                )
            samples = np.einsum("pn,pn->p", np.asarray(z, np.float64), np.asarray(hz, np.float64))
            objective.check_finite(f"{self.products} (trace)", samples)
            return Estimate(*_mean_and_stderr(samples), num_matvecs)
        if num_matvecs < 3:
            raise ValueError(f"hutch++ needs num_matvecs >= 3, got {num_matvecs}")
        s = min(num_matvecs // 3, n)
        g = num_matvecs - 2 * s
        k1, k2 = jax.random.split(key)
        hs = self._matmat(prep, batches, rademacher_probes(k1, s, n, dtype))
        q, _ = jnp.linalg.qr(hs.T)  # (n, s), orthonormal columns spanning M S
        hq = self._matmat(prep, batches, q.T)
        exact = float(np.einsum("ns,sn->", np.asarray(q, np.float64), np.asarray(hq, np.float64)))
        z = rademacher_probes(k2, g, n, dtype)
        z = z - (z @ q) @ q.T  # (I - QQ^T) z
        hz = self._matmat(prep, batches, z)
        samples = np.einsum("pn,pn->p", np.asarray(z, np.float64), np.asarray(hz, np.float64))
        objective.check_finite(f"{self.products} (trace)", samples, [exact])
        mean, stderr = _mean_and_stderr(samples) if g else (0.0, float("nan"))
        return Estimate(exact + mean, stderr, 2 * s + g)

    def frobenius_norm(
        self,
        params: PyTree,
        batches: PyTree | None,
        *,
        key: jax.Array,
        method: str = "hutchinson",
        num_matvecs: int = 100,
        k: int = 50,
        weights=None,
    ) -> Estimate:
        """Estimate of the operator's Frobenius norm.

        ``"hutchinson"``: ``||M||_F^2 = E ||M z||^2`` over Rademacher probes; the standard
        error of the norm follows by the delta method. ``"top_k"``: ``sqrt(sum_i lambda_i^2)``
        over the k largest-magnitude eigenvalues, the approximation of Jastrzębski et al.
        (2019, Table 1, top-50); a lower bound with no sampling error (``stderr`` is NaN).

        Args:
          params, batches, weights: the operator (see `eigenpairs`).
          key: key for the probes / the Lanczos start vector.
          method: ``"hutchinson"`` or ``"top_k"``.
          num_matvecs: probes for ``"hutchinson"``.
          k: eigenvalues for ``"top_k"``.

        Returns:
          `Estimate` of ||M||_F.

        Raises:
          ValueError: an unknown ``method`` or ``num_matvecs < 1``.
        """
        if method == "top_k":
            out = self.eigenpairs(params, batches, k=k, key=key, which="LM", weights=weights)
            return Estimate(float(np.sqrt(np.sum(out.values**2))), float("nan"), out.num_steps)
        if method != "hutchinson":
            raise ValueError(f"method must be 'hutchinson' or 'top_k', got {method!r}")
        if num_matvecs < 1:
            raise ValueError(f"num_matvecs must be >= 1, got {num_matvecs}")
        prep = self._prepare(params, batches, weights)
        z = rademacher_probes(key, num_matvecs, prep.dim, prep.dtype)
        hz = self._matmat(prep, batches, z)
        samples = (np.asarray(hz, np.float64) ** 2).sum(1)
        objective.check_finite(f"{self.products} (Frobenius norm)", samples)
        sq, sq_err = _mean_and_stderr(samples)
        value = math.sqrt(max(sq, 0.0))
        return Estimate(value, sq_err / (2 * value) if value > 0 else float("nan"), num_matvecs)
