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

`SharpnessMeter` (``SharpnessMeter(loss_fn, wrt=...)``) owns the compiled value-and-gradient
and average-sharpness kernels: hold one to measure many models of one architecture without
recompiling. `epsilon_sharpness` and `average_sharpness` build one per call.

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

from sharp_minima import hessian, objective

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


def random_subspace(key, n: int, p: int, dtype=jnp.float32) -> jax.Array:
    """The n×p matrix A with i.i.d. N(0, 1) entries (the law used for ``subspace_dim``).

    Args:
      key: PRNG key.
      n: rows (the number of parameters).
      p: columns (the subspace's dimension).
      dtype: the entries' dtype.

    Returns:
      An (n, p) array.
    """
    return jax.random.normal(key, (n, p), dtype)


def _box_bounds(x0, epsilon, matrix, offset=1.0):
    """b_i = ε(|(A⁺x)_i| + offset), with A⁺x from the p×p Gram matrix (float64 solve):
    Keskar's box for offset 1, the adaptive box ε|(A⁺x)_i| for offset 0."""
    if matrix is None:
        coords = np.abs(np.asarray(x0, np.float64))
    else:
        gram = np.asarray(matrix.T @ matrix, np.float64)
        rhs = np.asarray(matrix.T @ x0, np.float64)
        coords = np.abs(np.linalg.lstsq(gram, rhs, rcond=None)[0])
    return epsilon * (coords + offset)


def _subspace_matrix(subspace, subspace_dim, key, n: int, dtype):
    """The n×p matrix A of ε-sharpness: ``subspace`` as given, a random one of ``subspace_dim``
    columns, or None (the full space)."""
    matrix = subspace
    if matrix is None and subspace_dim is not None:
        if not 1 <= subspace_dim:
            raise ValueError(f"subspace_dim must be >= 1, got {subspace_dim}")
        matrix = random_subspace(key, n, subspace_dim, dtype)
    if matrix is not None:
        matrix = jnp.asarray(matrix, dtype)
        if matrix.ndim != 2 or matrix.shape[0] != n:
            raise ValueError(f"subspace must have shape ({n}, p), got {matrix.shape}")
    return matrix


class SharpnessMeter:
    """Sharpness measurements of one loss, owning their compiled kernels.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``; f is its weighted mean over ``batches``.
      wrt: which parameters are perturbed (regex on the leaf path, or predicate); e.g.
        ``"^params/"`` for a Flax model's weights, keeping its BatchNorm statistics.

    Attributes:
      objective: the `sharp_minima.objective.Objective`.
      num_traces: kernels traced (= compiled) so far; reuse with inputs of the same shapes
        does not add to it.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> meter = SharpnessMeter(lambda p, batch: p["a"] * jnp.sum(p["x"] ** 2), wrt="x")
      >>> values = [meter.epsilon_sharpness({"x": jnp.zeros(1), "a": jnp.float32(a)}, None,
      ...                                   epsilon=1e-3, key=jax.random.key(0)).value
      ...           for a in (100.0, 200.0)]
      >>> [round(v, 6) for v in values], meter.num_traces
      ([0.01, 0.02], 1)
    """

    def __init__(self, loss_fn, *, wrt=None):
        self.objective = objective.Objective(loss_fn, wrt)
        self.num_traces = 0
        self._value_and_grad_jit = jax.jit(self._value_and_grad_kernel)
        self._average_jit = jax.jit(self._average_kernel, static_argnames=("num_samples", "chunk"))

    def _value_and_grad_kernel(self, params, batches, weights, u, bounds, matrix):
        """f(x + A(b ⊙ u)) and its gradient in u."""
        self.num_traces += 1
        x0, f = self.objective.mean_loss(params, batches, weights)

        def g(u):
            y = bounds * u
            delta = y if matrix is None else matrix @ y
            return f(x0 + delta.astype(x0.dtype))

        return jax.value_and_grad(g)(u)

    def _average_kernel(self, params, batches, weights, key, sigma, *, num_samples, chunk):
        self.num_traces += 1
        x0, f = self.objective.mean_loss(params, batches, weights)
        keys = jax.random.split(key, num_samples)
        noise = lambda k: sigma * jax.random.normal(k, x0.shape, x0.dtype)  # noqa: E731
        losses = jax.lax.map(lambda k: f(x0 + noise(k)), keys, batch_size=chunk)
        return f(x0), losses

    def epsilon_sharpness(
        self,
        params: PyTree,
        batches: PyTree,
        *,
        epsilon: float,
        key: jax.Array,
        subspace_dim: int | None = None,
        subspace: jax.Array | None = None,
        max_iter: int = 10,
        weights=None,
        adaptive: bool = False,
    ) -> Sharpness:
        """Keskar et al.'s ε-sharpness φ(x, ε, A) at ``params`` (see the module docstring).

        Args:
          params: the point x (any pytree).
          batches: batches with a leading axis over batches (as in `sharp_minima.hessian`),
            or None.
          epsilon: box size ε (the paper uses 1e-3 and 5e-4).
          key: random key (random start; A when ``subspace_dim`` is given).
          subspace_dim: p for a random n×p matrix A (the paper: 100); None = full space.
          subspace: an explicit n×p matrix A instead (e.g. the identity, for testing).
          max_iter: L-BFGS-B iterations (the paper: 10).
          weights: per-batch weights (ragged last batch), as in `sharp_minima.hessian`.
          adaptive: the box |y_i| ≤ ε|(A⁺x)_i| instead of ε(|(A⁺x)_i| + 1): the adaptive
            (∞-norm) sharpness of Kwon et al. (2021), invariant under rescalings of the
            parameters that leave the function unchanged (e.g. a ReLU layer × α, the next
            × 1/α), which change φ. A parameter at exactly 0 is not perturbed.

        Returns:
          `Sharpness`.

        Raises:
          ValueError: non-positive ε or max_iter, bad subspace shape, or bad loss/batches.
          FloatingPointError: the loss is not finite inside the box.
        """
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        prep = self.objective.prepare(params, batches, weights)
        n, dtype = prep.dim, prep.dtype
        x0 = self.objective.flatten(params)
        k_start, k_matrix = jax.random.split(key)
        matrix = _subspace_matrix(subspace, subspace_dim, k_matrix, n, dtype)
        p = n if matrix is None else matrix.shape[1]
        bounds64 = _box_bounds(x0, epsilon, matrix, offset=0.0 if adaptive else 1.0)
        bounds = jnp.asarray(bounds64, dtype)
        best = {"value": -np.inf, "u": np.zeros(p)}
        cache = {}
        count = [0]

        def evaluate(u):
            u = np.clip(np.asarray(u, np.float64), -1.0, 1.0)
            h = hash(u.tobytes())
            if h in cache:
                return cache[h]
            value, grad = self._value_and_grad_jit(
                prep.params, batches, prep.weights, jnp.asarray(u, dtype), bounds, matrix
            )
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
        starts = [np.asarray(jax.random.uniform(k_start, (p,), minval=-1.0), np.float64)]
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
        y = jnp.asarray(bounds64 * best["u"], dtype)
        delta = y if matrix is None else matrix @ y  # on device: A can be large
        phi = (best["value"] - f0) / (1.0 + f0) * 100.0
        return Sharpness(
            float(phi),
            f0,
            float(best["value"]),
            count[0],
            self.objective.unflatten(params, delta),
            float(epsilon),
            None if subspace is None and subspace_dim is None else p,
        )

    def average_sharpness(
        self,
        params: PyTree,
        batches: PyTree,
        *,
        sigma: float,
        key: jax.Array,
        num_samples: int = 100,
        chunk_size: int = 10,
        weights=None,
    ) -> hessian.Estimate:
        """Average-case sharpness: E_z[f(x + σz)] − f(x), z ~ N(0, I), with its standard error.

        A cheap companion of `epsilon_sharpness` (one loss evaluation per sample,
        ``chunk_size`` samples vmapped at a time). For a quadratic it equals σ²/2 · tr(H).

        Args:
          params: the point x.
          batches: batches with a leading axis over batches, or None.
          sigma: σ > 0.
          key: key of the samples.
          num_samples: samples z (≥ 2).
          chunk_size: samples evaluated at once.
          weights: optional per-batch weights.

        Returns:
          `sharp_minima.hessian.Estimate` (value, stderr over the samples, evaluations).

        Raises:
          ValueError: σ ≤ 0, fewer than 2 samples, or chunk_size < 1.
          FloatingPointError: the loss is NaN/Inf at the parameters or at a sample.
        """
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        if num_samples < 2 or chunk_size < 1:
            raise ValueError("num_samples must be >= 2 and chunk_size >= 1")
        prep = self.objective.prepare(params, batches, weights)
        f0, losses = self._average_jit(
            prep.params,
            batches,
            prep.weights,
            key,
            sigma,
            num_samples=num_samples,
            chunk=min(chunk_size, num_samples),
        )
        objective.check_finite(f"the loss at the parameters (average sharpness, f={f0})", f0)
        objective.check_finite(f"the loss under Gaussian perturbations (σ={sigma:g})", losses)
        increase = np.asarray(losses, np.float64) - float(f0)
        return hessian.Estimate(
            float(increase.mean()),
            float(increase.std(ddof=1) / np.sqrt(num_samples)),
            num_samples,
        )


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
    adaptive: bool = False,
) -> Sharpness:
    """Keskar et al. (2017)'s ε-sharpness φ(x, ε, A) of ``loss_fn`` at ``params`` (their
    eq. 3: the largest rise of f in the box C_ε around x, in percent of 1 + f(x), found by
    L-BFGS-B), with a fresh `SharpnessMeter`: compiles on every call; hold a
    `SharpnessMeter` to measure several models.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: the point x (any pytree).
      batches: batches with a leading axis over batches, or None.
      epsilon: box size ε (the paper uses 1e-3 and 5e-4).
      key: random key (random start; A when ``subspace_dim`` is given).
      subspace_dim: p for a random n×p matrix A (the paper: 100); None = full space.
      subspace: an explicit n×p matrix A instead.
      max_iter: L-BFGS-B iterations (the paper: 10).
      weights: per-batch weights (ragged last batch).
      wrt: the parameters perturbed.
      adaptive: Kwon et al. (2021)'s adaptive box |y_i| ≤ ε|(A⁺x)_i| (see
        `SharpnessMeter.epsilon_sharpness`).

    Returns:
      `Sharpness`.

    Raises:
      ValueError: non-positive ε or max_iter, bad subspace shape, or bad loss/batches.
      FloatingPointError: the loss is not finite inside the box.
    """
    return SharpnessMeter(loss_fn, wrt=wrt).epsilon_sharpness(
        params,
        batches,
        epsilon=epsilon,
        key=key,
        subspace_dim=subspace_dim,
        subspace=subspace,
        max_iter=max_iter,
        weights=weights,
        adaptive=adaptive,
    )


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
    """Average-case sharpness E_z[f(x + σz)] − f(x) with a fresh `SharpnessMeter` (see
    `SharpnessMeter.average_sharpness`).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: the point x.
      batches: batches with a leading axis over batches, or None.
      sigma: σ > 0.
      key: key of the samples.
      num_samples: samples z.
      chunk_size: samples evaluated at once.
      weights: optional per-batch weights.
      wrt: the parameters perturbed.

    Returns:
      `sharp_minima.hessian.Estimate`.

    Raises:
      ValueError, FloatingPointError: as `SharpnessMeter.average_sharpness`.

    >>> import jax, jax.numpy as jnp
    >>> f = lambda p, batch: 0.5 * jnp.sum(jnp.array([1.0, 3.0]) * p ** 2)
    >>> e = average_sharpness(f, jnp.zeros(2), None, sigma=0.1, key=jax.random.key(0),
    ...                       num_samples=4000)
    >>> abs(e.value - 0.5 * 0.01 * 4.0) < 4 * e.stderr
    True
    """
    return SharpnessMeter(loss_fn, wrt=wrt).average_sharpness(
        params,
        batches,
        sigma=sigma,
        key=key,
        num_samples=num_samples,
        chunk_size=chunk_size,
        weights=weights,
    )
