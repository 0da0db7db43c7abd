"""Keskar et al. (2017)'s ε-sharpness, and a Gaussian average-case companion.

ε-sharpness (Keskar et al. 2017, eq. 3), with x the flat vector of parameters:

    φ(x, ε, A) = (max_{y ∈ C_ε} f(x + A y) − f(x)) / (1 + f(x)) × 100,
    C_ε = {y : |y_i| ≤ ε (|(A⁺x)_i| + 1)},

A = I (full space) or a random n×p matrix (``subspace_dim=p``), A⁺ its pseudo-inverse. The
maximisation is inexact: L-BFGS-B (scipy, float64, on the host) for ``max_iter`` iterations
and at most ``2·max_iter`` evaluations (plus f(x), two starts and one vertex: ≤ 24 in all for
the paper's 10), driven by a jitted value-and-gradient of the loss over all ``batches``.
Value *and* gradient are negated (a published re-implementation negated only the value).
Details that make the estimate reliable:

- **Box-normalised coordinates** ``y = b ⊙ u``, ``u ∈ [-1, 1]^p``, ``b_i = ε(|(A⁺x)_i| + 1)``,
  so the optimiser sees a unit box whatever the scale of the parameters.
- **Starts that work at an exact minimum** (zero gradient, where L-BFGS-B from y = 0 would stop
  at once): the better of the box corner ``sign(∇f)`` (the first-order maximiser; skipped
  when the gradient is zero) and a random point of the box; L-BFGS-B's tolerances are set to
  zero so a flat function (x⁸ at 0: values ~1e-24) is not declared converged.
- **Best value seen**: every evaluation is inside the box, and the largest loss met is kept;
  at the end the box vertex nearest the best point is tried too (a convex loss is maximised
  at a vertex).

The random subspace: A has i.i.d. N(0, 1) entries drawn from ``key`` (the paper does not give
the law; this is the plain reading of "a random matrix", ``np.random.randn(n, p)``). Columns
then have norm ≈ √n and A⁺x ≈ Aᵀx/n is small, so the box is ≈ ε wide in each of the p
coordinates and a perturbation Ay has norm ≈ ε√(np). With N(0, 1/n) entries instead, the
perturbations would be √n times smaller and φ nearly zero for large models.
``A⁺x = (AᵀA)⁻¹Aᵀx`` is computed from the p×p Gram matrix, never an n×n matrix. A is held
in memory (n·p numbers: 584 MB for F1 at p = 100 in float32).

The loss decides how BatchNorm and dropout behave (e.g. eval-mode statistics, dropout off):
pass ``params = {"params": ..., "batch_stats": ...}`` with ``wrt="^params/"`` to perturb only
the weights.

>>> import jax, jax.numpy as jnp
>>> f = lambda p, batch: 100.0 * jnp.sum(p ** 2)   # at its exact minimum p = 0
>>> r = epsilon_sharpness(f, jnp.zeros(1), None, epsilon=1e-3, key=jax.random.key(0))
>>> round(r.value, 6)                               # 100 ε² / (1 + 0) × 100
0.01
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
from jax.flatten_util import ravel_pytree

from sharp_minima import hessian
from sharp_minima import tree_util as tu

PyTree = Any
VERSION = 2  # bump when the estimator changes, so cached experiment results are recomputed


class _BudgetSpent(Exception):
    """Stops L-BFGS-B after its evaluation budget (the best point seen is kept)."""


class Sharpness(NamedTuple):
    """Result of `epsilon_sharpness`.

    Attributes:
      value: φ in percent.
      loss: f(x).
      max_loss: the largest f(x + Ay) found in the box.
      num_evals: loss-and-gradient evaluations over all batches (including f(x)).
      perturbation: A y of the maximiser, a pytree like ``params`` (zero outside ``wrt``).
      epsilon: ε.
      subspace_dim: p (None for the full space).
    """

    value: float
    loss: float
    max_loss: float
    num_evals: int
    perturbation: PyTree
    epsilon: float
    subspace_dim: int | None


def _lbfgsb_unit_box(fun_and_grad, x0, max_iter: int, memory: int = 10, maxls: int = 20):
    """scipy's L-BFGS-B on the box [-1, 1]^n, tolerances zero, ``max_iter`` iterations.

    Drives scipy's compiled ``setulb`` directly, as ``scipy.optimize.minimize`` does, but without
    its per-coordinate Python loops over the bounds (≈ 3 s for n = 1.5M, more than ten loss
    evaluations of a small model). Falls back to ``scipy.optimize.minimize`` when the private
    routine has another signature (other scipy versions).
    """
    try:
        from scipy.optimize import _lbfgsb

        n, m = x0.size, memory
        x = np.array(x0, np.float64)
        f, g = np.array(0.0), np.zeros(n)
        low, up, nbd = -np.ones(n), np.ones(n), np.full(n, 2, np.int32)  # 2: both bounds
        wa = np.zeros(2 * m * n + 5 * n + 11 * m * m + 8 * m)
        iwa = np.zeros(3 * n, np.int32)
        task, ln_task = np.zeros(2, np.int32), np.zeros(2, np.int32)
        lsave, isave, dsave = np.zeros(4, np.int32), np.zeros(44, np.int32), np.zeros(29)
        step = functools.partial(_lbfgsb.setulb, m, x, low, up, nbd)
        step(f, g, 0.0, 0.0, wa, iwa, task, lsave, isave, dsave, maxls, ln_task)
    except (ImportError, AttributeError, TypeError, ValueError):
        scipy.optimize.minimize(
            fun_and_grad,
            x0,
            jac=True,
            method="L-BFGS-B",
            bounds=scipy.optimize.Bounds(-np.ones(x0.size), np.ones(x0.size)),
            options={"maxiter": max_iter, "maxfun": 2 * max_iter, "ftol": 0.0, "gtol": 0.0},
        )
        return
    iterations = 0
    while True:
        if task[0] == 3:  # wants f and g at x
            f, g = fun_and_grad(x)
            g = np.asarray(g, np.float64)
        elif task[0] == 1:  # a new iterate
            iterations += 1
            if iterations >= max_iter:
                return
        else:  # converged or failed (e.g. line search): stop
            return
        step(f, g, 0.0, 0.0, wa, iwa, task, lsave, isave, dsave, maxls, ln_task)


@functools.lru_cache(maxsize=32)
def _jitted_value_and_grad(loss_fn, wrt):
    def run(params, batches, weights, u, bounds, matrix):
        selected, merge = tu.select(params, wrt)
        x0, unravel = ravel_pytree(selected)

        def f(u):
            y = bounds * u
            delta = y if matrix is None else matrix @ y
            x = x0 + delta.astype(x0.dtype)
            return hessian.batch_mean(
                lambda b: loss_fn(merge(unravel(x), params), b), batches, weights
            )

        return jax.value_and_grad(f)(u)

    return jax.jit(run)


def random_subspace(key, n: int, p: int, dtype=jnp.float32) -> jax.Array:
    """The n×p matrix A with i.i.d. N(0, 1) entries (the law used for ``subspace_dim``)."""
    return jax.random.normal(key, (n, p), dtype)


def _box_bounds(x0, epsilon, matrix):
    """b_i = ε(|(A⁺x)_i| + 1), with A⁺x from the p×p Gram matrix (float64 solve)."""
    if matrix is None:
        coords = np.abs(np.asarray(x0, np.float64))
    else:
        gram = np.asarray(matrix.T @ matrix, np.float64)
        rhs = np.asarray(matrix.T @ x0, np.float64)
        coords = np.abs(np.linalg.lstsq(gram, rhs, rcond=None)[0])
    return epsilon * (coords + 1.0)


def epsilon_sharpness(
    loss_fn,
    params: PyTree,
    batches: PyTree,
    *,
    epsilon: float,
    key: jax.Array,
    subspace_dim: int | None = None,
    subspace: jax.Array | None = None,
    max_iter: int = 10,
    weights=None,
    wrt=None,
) -> Sharpness:
    """Keskar et al.'s ε-sharpness φ(x, ε, A) of ``loss_fn`` at ``params`` (module docstring).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``; f is its weighted mean over ``batches``.
      params: the point x (any pytree).
      batches: batches with a leading axis over batches (as in `sharp_minima.hessian`), or None.
      epsilon: box size ε (the paper uses 1e-3 and 5e-4).
      key: random key (random start; A when ``subspace_dim`` is given).
      subspace_dim: p for a random n×p matrix A (the paper: 100); None = full space (A = I).
      subspace: an explicit n×p matrix A instead (e.g. the identity, for testing).
      max_iter: L-BFGS-B iterations (the paper: 10).
      weights: per-batch weights (ragged last batch), as in `sharp_minima.hessian`.
      wrt: which parameters are perturbed (regex on the leaf path, or predicate).

    Returns:
      `Sharpness`.

    Raises:
      ValueError: non-positive ε or max_iter, bad subspace shape, or bad loss/batches.
    """
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    params_r, w, n, dtype = hessian._prepare(loss_fn, params, batches, weights, wrt)
    selected, merge = tu.select(params, wrt)
    x0, unravel = ravel_pytree(selected)
    k_start, k_matrix = jax.random.split(key)
    matrix = subspace
    if matrix is None and subspace_dim is not None:
        if not 1 <= subspace_dim:
            raise ValueError(f"subspace_dim must be >= 1, got {subspace_dim}")
        matrix = random_subspace(k_matrix, n, subspace_dim, dtype)
    if matrix is not None:
        matrix = jnp.asarray(matrix, dtype)
        if matrix.ndim != 2 or matrix.shape[0] != n:
            raise ValueError(f"subspace must have shape ({n}, p), got {matrix.shape}")
    p = n if matrix is None else matrix.shape[1]
    bounds64 = _box_bounds(x0, epsilon, matrix)
    bounds = jnp.asarray(bounds64, dtype)
    run = _jitted_value_and_grad(loss_fn, wrt)
    best = {"value": -np.inf, "u": np.zeros(p)}
    cache = {}
    count = [0]

    def evaluate(u):
        u = np.clip(np.asarray(u, np.float64), -1.0, 1.0)
        h = hash(u.tobytes())
        if h in cache:
            return cache[h]
        value, grad = run(params_r, batches, w, jnp.asarray(u, dtype), bounds, matrix)
        value, grad = float(value), np.asarray(grad, np.float64)
        count[0] += 1
        if not np.isfinite(value):
            raise FloatingPointError(f"the loss is {value} inside the ε-box (ε={epsilon})")
        if value > best["value"]:
            best["value"], best["u"] = value, u.copy()
        cache.clear()  # only the latest point is ever asked for again
        cache[h] = (value, grad)
        return value, grad

    f0, g0 = evaluate(np.zeros(p))
    starts = [np.asarray(jax.random.uniform(k_start, (p,), minval=-1.0, maxval=1.0), np.float64)]
    if np.any(g0 != 0):
        starts.insert(0, np.sign(g0))
    results = [evaluate(s) for s in starts]
    values = [r[0] for r in results]
    i = int(np.argmax(values))
    u_start = starts[i]
    cache.clear()  # L-BFGS-B first asks for its start point: answer without a new evaluation
    cache[hash(np.clip(u_start, -1.0, 1.0).tobytes())] = results[i]

    # Scale-free objective for L-BFGS-B: (f − f(x)) / s with s the rise at the start, so a
    # flat function (x⁸: rises ~1e-24) is optimised like a steep one.
    rise = abs(max(values) - f0)
    scale = rise if rise > 0 else 1.0

    budget = count[0] + 2 * max_iter  # L-BFGS-B's line searches may overrun its maxfun

    def negated(u):
        if count[0] >= budget:
            raise _BudgetSpent
        value, grad = evaluate(u)
        return -(value - f0) / scale, -grad / scale  # negate value and gradient: maximise f

    try:
        _lbfgsb_unit_box(negated, u_start, max_iter)
    except _BudgetSpent:
        pass
    # A convex loss takes its box maximum at a vertex: try the vertex nearest the best point
    # (one evaluation; rescues coordinates stuck where a flat direction has ~zero gradient).
    evaluate(np.where(best["u"] >= 0, 1.0, -1.0))
    y = bounds64 * best["u"]
    y = jnp.asarray(y, dtype)
    delta = y if matrix is None else matrix @ y  # on device: A can be large
    perturbation = merge(unravel(delta), tu.zeros_like(params))
    phi = (best["value"] - f0) / (1.0 + f0) * 100.0
    return Sharpness(
        float(phi),
        f0,
        float(best["value"]),
        count[0],
        perturbation,
        float(epsilon),
        None if subspace is None and subspace_dim is None else p,
    )


@functools.lru_cache(maxsize=32)
def _jitted_average(loss_fn, wrt, chunk):
    def run(params, batches, weights, key, sigma, num_samples):
        selected, merge = tu.select(params, wrt)
        x0, unravel = ravel_pytree(selected)

        def f(x):
            return hessian.batch_mean(
                lambda b: loss_fn(merge(unravel(x), params), b), batches, weights
            )

        keys = jax.random.split(key, num_samples)
        noise = lambda k: sigma * jax.random.normal(k, x0.shape, x0.dtype)  # noqa: E731
        losses = jax.lax.map(lambda k: f(x0 + noise(k)), keys, batch_size=chunk)
        return f(x0), losses

    return jax.jit(run, static_argnums=5)


def average_sharpness(
    loss_fn,
    params: PyTree,
    batches: PyTree,
    *,
    sigma: float,
    key: jax.Array,
    num_samples: int = 100,
    chunk_size: int = 10,
    weights=None,
    wrt=None,
) -> hessian.Estimate:
    """Average-case sharpness: E_z[f(x + σz)] − f(x), z ~ N(0, I), with its standard error.

    A cheap companion of `epsilon_sharpness` (one loss evaluation per sample, ``chunk_size``
    samples vmapped at a time). For a quadratic it equals σ²/2 · tr(H).

    >>> import jax, jax.numpy as jnp
    >>> f = lambda p, batch: 0.5 * jnp.sum(jnp.array([1.0, 3.0]) * p ** 2)
    >>> e = average_sharpness(f, jnp.zeros(2), None, sigma=0.1, key=jax.random.key(0),
    ...                       num_samples=4000)
    >>> abs(e.value - 0.5 * 0.01 * 4.0) < 4 * e.stderr
    True
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if num_samples < 2 or chunk_size < 1:
        raise ValueError("num_samples must be >= 2 and chunk_size >= 1")
    params_r, w, _, _ = hessian._prepare(loss_fn, params, batches, weights, wrt)
    run = _jitted_average(loss_fn, wrt, min(chunk_size, num_samples))
    f0, losses = run(params_r, batches, w, key, sigma, num_samples)
    increase = np.asarray(losses, np.float64) - float(f0)
    return hessian.Estimate(
        float(increase.mean()),
        float(increase.std(ddof=1) / np.sqrt(num_samples)),
        num_samples,
    )
