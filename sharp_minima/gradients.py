"""Gradient statistics at fixed parameters: the gradient noise scale, and mini-batch
gradients against given directions.

**Noise.** With per-example gradients gᵢ of a mean loss over N examples, G = E[gᵢ] the mean
gradient and Σ = Cov[gᵢ] their covariance (the matrix of `sharp_minima.operators.
GradientCovariance`), a mini-batch gradient of B examples drawn with replacement has mean G and
covariance Σ/B. `GradientNoise` estimates, inside ``jit``, from every example's |gᵢ|² and
gᵢ·Ḡ — exact, by the layer identities of `sharp_minima.per_example` (dense, convolutional
and embedding layers: about one gradient's cost, no per-example gradient of a weight matrix
formed) and, for leaves where none applies, by per-example gradients in chunks (``vmap``
inside ``lax.map``: the memory of one chunk of gradients):

- ``|G|²`` and ``tr Σ``, both unbiased: tr Σ = N/(N−1)·(mean|gᵢ|² − |Ḡ|²) and
  |G|² = |Ḡ|² − tr Σ/N (squaring the mean gradient's norm alone, as some trainers do, is
  biased high by tr Σ/N; averaging norms instead of squared norms biases tr Σ low);
- **B_simple = tr Σ / |G|²** (McCandlish et al. 2018, the critical batch size's simple
  estimate), with standard errors (influence functions over the examples) and per-layer
  parts that add up to the whole;
- **B_noise = tr(HΣ) / (GᵀHG)** with Hessian-vector products (`GradientNoise.b_noise`).

The **two-batch estimator** (McCandlish et al., App. A.1) needs no per-example gradients:
from the squared norms of a small-batch gradient (B_small) and a big-batch gradient (B_big)
at the same parameters,

    |G|² ≈ (B_big |G_big|² − B_small |G_small|²) / (B_big − B_small),
    tr Σ ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big).

In data-parallel training the small batches are the per-device gradients and the big one
their all-reduced mean, so a training step gets it almost for free (`two_batch_grad`,
`two_batch`); `sharp_minima.tracking.NoiseTracker` smooths both with bias-corrected EMAs.

Conventions that trip users:

- **Mean, not summed, loss.** Every statistic here is of the *mean* loss, so gᵢ is one
  example's gradient. With a summed loss every gradient is N times larger and tr Σ N² times.
- **Finite N.** Batches drawn without replacement from N examples have covariance
  Σ/B·(1 − B/N)·N/(N−1). Two quantities, two names: the **noise scale** η(1 − B/N)/B of a
  mean loss (`noise_scale`; the lecture notes' g = η(N/B − 1) is N times it, for a summed
  loss) and the **temperature** T = ησ²(1 − B/N)/(2B) of the SDE picture (`temperature`,
  for isotropic per-example variance σ²), the T of exp(−L/T).
- **Momentum** μ scales the effective step, the noise scale and the temperature by
  1/(1 − μ).

`DirectionProbe` measures what Jastrzębski et al. (2019, Sec. 3.2, Figs. 5 and 6) measure
along the training trajectory: ``J`` mini-batch gradients g_j of a loss, their mean |cos|
with the top directions e_1..e_top (e.g. Hessian eigenvectors) and with random directions,
the mean change of the loss after a step along e_1 only,

    ΔL(α) = mean_j L(θ − α η ⟨g_j, e₁⟩ e₁) − L(θ),

and the loss on a line through θ along e₁ scaled by the expected step,
L(θ + k e₁ η mean_j |⟨g_j, e₁⟩|). L is the weighted mean over ``batches`` (the curvature
subset); the gradients are of single mini-batches drawn from ``examples``. The plumbing (the
``wrt`` subset, raveling at the edge, the batch mean) is `sharp_minima.objective.Objective`.

Only jax and numpy are imported here.

References:
  McCandlish, Kaplan, Amodei et al. (2018), "An empirical model of large-batch training";
  Smith & Le (2018); Jastrzębski et al. (2017, 2019).
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sharp_minima import hessian, objective, per_example
from sharp_minima import tree_util as tu
from sharp_minima.objective import Objective, batch_mean, per_example_losses

__all__ = [
    "DirectionProbe",
    "GradientNoise",
    "NoiseEstimate",
    "NoiseScale",
    "two_batch_grad",
    "noise_scale",
    "temperature",
    "two_batch",
]


class DirectionProbe:
    """Mini-batch gradients against directions, with one compiled kernel owned by the probe.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` (e.g.
        `sharp_minima.losses.evaluation_loss`).
      wrt: which parameters (`sharp_minima.objective.Objective`).
      top: how many of the directions the alignment averages over (the paper: 5).
      num_random: random unit directions of the baseline alignment.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> loss = lambda p, b: 0.5 * jnp.mean((b["x"] @ p["w"]) ** 2)
      >>> x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 3)))
      >>> probe = DirectionProbe(loss, top=1)
      >>> e = {"w": jnp.eye(3)[:1]}  # one direction: the first axis
      >>> out = probe({"w": jnp.ones(3)}, e, {"x": x}, jnp.arange(64).reshape(4, 16),
      ...             {"x": x[None]}, None, step_size=0.1, alphas=[0.5, 2.0],
      ...             ks=[-1.0, 0.0, 1.0], key=jax.random.key(0))
      >>> out["delta"].shape, bool(jnp.isclose(out["along"][1], out["loss"]))
      ((2,), True)
    """

    def __init__(self, loss_fn, *, wrt=None, top: int = 5, num_random: int = 8):
        if top < 1 or num_random < 1:
            raise ValueError(f"top and num_random must be >= 1, got {top}, {num_random}")
        self.objective = Objective(loss_fn, wrt)
        self.top, self.num_random = top, num_random
        self._kernel_jit = jax.jit(self._kernel)

    def _kernel(self, params, directions, examples, indices, batches, weights, lr, alphas, ks, key):
        obj = self.objective
        x0, f = obj.flat_loss(params)

        def full_loss(x):
            return batch_mean(lambda b: f(x, b), batches, weights)

        def grad(idx):
            batch = jax.tree.map(lambda a: a[idx], examples)
            return jax.grad(lambda x: f(x, batch))(x0)

        g = lax.map(grad, indices)  # (J, D)
        e = jax.vmap(obj.flatten)(directions)  # (K, D)
        gnorm = jnp.linalg.norm(g, axis=1, keepdims=True)
        cos_top = jnp.mean(jnp.abs(g @ e[: self.top].T) / gnorm)
        r = jax.random.normal(key, (self.num_random, x0.shape[0]), x0.dtype)
        r = r / jnp.linalg.norm(r, axis=1, keepdims=True)
        cos_random = jnp.mean(jnp.abs(g @ r.T) / gnorm)
        loss0 = full_loss(x0)
        g1 = g @ e[0]  # (J,) components along e_1

        def delta(alpha):
            return jnp.mean(lax.map(lambda c: full_loss(x0 - alpha * lr * c * e[0]), g1)) - loss0

        step = lr * jnp.mean(jnp.abs(g1))
        along = lax.map(lambda k: full_loss(x0 + k * step * e[0]), ks)
        return {
            "cos_top": cos_top,
            "cos_random": cos_random,
            "loss": loss0,
            "delta": lax.map(delta, alphas),
            "step_e1": step,
            "along": along,
        }

    def __call__(
        self,
        params: Any,
        directions: Any,
        examples: Any,
        indices,
        batches: Any,
        weights=None,
        *,
        step_size: float,
        alphas,
        ks,
        key: jax.Array,
    ) -> dict[str, jax.Array]:
        """Measures at ``params``.

        Args:
          params: the parameters (a pytree; ``wrt`` selects the variables).
          directions: a pytree like ``params`` with a leading axis K ≥ 1 (orthonormal, e.g.
            ``eigenpairs(...).vectors``); e₁ is the first.
          examples: the examples the mini-batches are drawn from (a batch pytree whose
            leaves have a leading example axis).
          indices: (J, B) integer indices into ``examples``: J mini-batches of B examples.
          batches, weights: where L is evaluated (stacked batches, as for `hessian`).
          step_size: η.
          alphas: the step multiples α of ΔL(α).
          ks: the grid of k of the line through θ along e₁.
          key: key of the random directions.

        Returns:
          ``{"cos_top", "cos_random", "loss" (L(θ)), "delta" (ΔL per α), "step_e1"
          (η mean|⟨g, e₁⟩|), "along" (L per k)}``.
        """
        prepared = self.objective.prepare(params, batches, weights)
        dtype = prepared.dtype
        return self._kernel_jit(
            prepared.params,
            directions,
            examples,
            jnp.asarray(indices),
            batches,
            prepared.weights,
            jnp.asarray(step_size, dtype),
            jnp.asarray(alphas, dtype),
            jnp.asarray(ks, dtype),
            key,
        )


# ------------------------------------------------------------------------------ noise scale


class NoiseEstimate(NamedTuple):
    """Unbiased estimates, each with one standard error (over the examples).

    Attributes:
      grad_norm_sq: |G|², the squared norm of the expected gradient.
      grad_norm_sq_stderr: its standard error.
      trace_cov: tr Σ, the per-example gradient covariance's trace.
      trace_cov_stderr: its standard error.
      b_simple: tr Σ / |G|² (McCandlish et al. 2018).
      b_simple_stderr: its standard error (delta method).
    """

    grad_norm_sq: float
    grad_norm_sq_stderr: float
    trace_cov: float
    trace_cov_stderr: float
    b_simple: float
    b_simple_stderr: float


class NoiseScale(NamedTuple):
    """Output of `GradientNoise.measure`.

    Attributes:
      total: the `NoiseEstimate` of all ``wrt`` parameters.
      layers: ``{group: NoiseEstimate}`` per parameter group (their ``grad_norm_sq`` and
        ``trace_cov`` add up to the total's).
      mean_gradient: Ḡ, a pytree like params (zero outside ``wrt``).
      num_examples: N.
      routes: ``{leaf path: route}``, how each ``wrt`` leaf's per-example moments were
        computed: a layer identity ("dense", "embedding", "conv"), "formed" (a small leaf's
        per-example gradients written out in one pass), "chunked" (the chunked exact path)
        or "projected" (``num_probes > 0``); see `sharp_minima.per_example`.
    """

    total: NoiseEstimate
    layers: dict
    mean_gradient: Any
    num_examples: int
    routes: dict | None = None


def noise_scale(learning_rate, batch_size, num_examples=None, momentum=0.0) -> float:
    """The SGD noise scale η(1 − B/N)/(B(1 − μ)) of a mean loss: how strongly a step's
    gradient noise is felt, per unit of gradient variance (Smith & Le 2018's g = η(N/B − 1)
    is N times it, for a summed loss). It is not a temperature: `temperature` multiplies it
    by σ²/2.

    Args:
      learning_rate: η.
      batch_size: B.
      num_examples: N (``None``: N → ∞), for sampling without replacement.
      momentum: μ (heavy ball).

    Returns:
      The noise scale as a float.

    >>> round(noise_scale(0.1, 100, 1000, momentum=0.9), 6)
    0.009
    """
    finite = 1.0 if num_examples is None else 1.0 - batch_size / num_examples
    return float(learning_rate) * finite / (batch_size * (1.0 - momentum))


def temperature(
    learning_rate, batch_size, num_examples=None, momentum=0.0, *, gradient_variance
) -> float:
    """The SGD temperature T = ησ²(1 − B/N)/(2B(1 − μ)) of a mean loss whose per-example
    gradients have isotropic variance σ² per coordinate (unbiased, over the N examples): the
    stationary density of the SDE picture is ∝ exp(−L/T), and `sharp_minima.dynamics.
    langevin_noise` simulates at T. `noise_scale` × σ²/2.

    Args:
      learning_rate: η.
      batch_size: B.
      num_examples: N (``None``: N → ∞).
      momentum: μ (heavy ball).
      gradient_variance: σ², the per-example gradient variance per coordinate (keyword).

    Returns:
      T as a float.

    >>> round(temperature(0.1, 100, 1000, momentum=0.9, gradient_variance=2.0), 6)
    0.009
    """
    noise = noise_scale(learning_rate, batch_size, num_examples, momentum)
    return noise * float(gradient_variance) / 2.0


class CriticalBatch(NamedTuple):
    """McCandlish et al. (2018)'s fit of steps S and examples E = S·B to a target against B:
    S = S_min(1 + B_crit/B), i.e. (S/S_min − 1)(E/E_min − 1) = 1, with B_crit = E_min/S_min.

    Attributes:
      s_min, e_min: the fewest steps (B → ∞) and examples (B → 0).
      b_crit: E_min/S_min, with its standard error ``b_crit_stderr`` (from the fit's
        residuals).
      residual: the root-mean-square relative error of the fitted S.
    """

    s_min: float
    e_min: float
    b_crit: float
    b_crit_stderr: float
    residual: float

    def steps(self, batch_size) -> np.ndarray:
        """The fitted S at ``batch_size``."""
        return self.s_min * (1.0 + self.b_crit / np.asarray(batch_size, np.float64))


def critical_batch(batch_sizes, steps) -> CriticalBatch:
    """Fits S = S_min + E_min/B (linear in 1/B) to measured steps-to-target, each point
    weighted by 1/S (relative errors), for B_crit = E_min/S_min (McCandlish et al. 2018).

    Raises:
      ValueError: fewer than 3 finite points, or a fit without positive S_min and E_min.

    >>> fit = critical_batch([8, 32, 128, 512], [1000 * (1 + 64 / b) for b in (8, 32, 128, 512)])
    >>> round(fit.b_crit, 6), round(fit.s_min, 6), round(fit.residual, 9)
    (64.0, 1000.0, 0.0)
    """
    b = np.asarray(batch_sizes, np.float64)
    s = np.asarray(steps, np.float64)
    ok = np.isfinite(s) & (s > 0) & (b > 0)
    b, s = b[ok], s[ok]
    if len(b) < 3:
        raise ValueError(f"the critical-batch fit needs >= 3 finite points, got {len(b)}")
    x = np.stack([1.0 / s, 1.0 / (b * s)], axis=1)  # (S_min + E_min/B)/S = 1
    coef, *_ = np.linalg.lstsq(x, np.ones(len(b)), rcond=None)
    s_min, e_min = (float(v) for v in coef)
    if not (s_min > 0 and e_min > 0):
        raise ValueError(
            f"the fit S = S_min + E_min/B gave S_min={s_min:.4g}, E_min={e_min:.4g}: the steps do "
            "not fall with B as the model has them (too few batch sizes, or all in one regime)"
        )
    res = x @ coef - 1.0
    dof = max(len(b) - 2, 1)
    cov = (res @ res / dof) * np.linalg.inv(x.T @ x)
    grad = np.array([-e_min / s_min**2, 1.0 / s_min])  # ∂(E_min/S_min)
    se = float(np.sqrt(max(grad @ cov @ grad, 0.0)))
    return CriticalBatch(s_min, e_min, e_min / s_min, se, float(np.sqrt(np.mean(res**2))))


def two_batch(small_sq, big_sq, small_size, big_size) -> tuple[float, float]:
    """``(|G|², tr Σ)`` from the squared norms of a small- and a big-batch gradient taken at
    the same parameters (McCandlish et al. 2018, App. A.1): E|g_B|² = |G|² + tr Σ/B solved
    for the two sizes. Unbiased for batches drawn with replacement, and for small batches
    that partition the big one (without replacement). Works on arrays too (inside `jit`).

    Args:
      small_sq: |g_small|² (or its average over steps).
      big_sq: |g_big|².
      small_size: B_small.
      big_size: B_big (> B_small).

    Returns:
      ``(grad_norm_sq, trace_cov)``.

    Raises:
      ValueError: unless 0 < ``small_size`` < ``big_size``.

    >>> two_batch(small_sq=1.5, big_sq=1.0625, small_size=2, big_size=16)
    (1.0, 1.0)
    """
    if not 0 < small_size < big_size:
        raise ValueError(f"need 0 < small_size < big_size, got {small_size}, {big_size}")
    g2 = (big_size * big_sq - small_size * small_sq) / (big_size - small_size)
    tr = (small_sq - big_sq) / (1.0 / small_size - 1.0 / big_size)
    return g2, tr


def two_batch_grad(loss_fn, small_size: int):
    """``value_and_grad`` of a mean loss that also returns the two-batch statistics, for the
    price of one gradient (McCandlish et al. 2018, App. A.1).

    The gradient is taken on the first ``small_size`` examples of the batch and on the rest
    separately (the same arithmetic as one batch gradient, split in two) and combined, so the
    step gets the small-batch gradient's squared norm for free. In data-parallel training the
    per-device gradients before the all-reduce are the natural small batches (B_small = B/d);
    pass their mean squared norm to `two_batch` directly.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the mean over the batch's examples.
      small_size: examples in the small batch (the first ones of each batch).

    Returns:
      ``fn(params, batch) -> (loss, grads, {"small_sq": |g_small|², "big_sq": |g_batch|²})``
      (every batch leaf with one leading size B > ``small_size``, examples unmasked); feed
      the statistics to `two_batch` with ``small_size`` and ``big_size = B``, and smooth
      them over steps (one step gives one noisy sample).

    Raises:
      ValueError: ``small_size < 1``; when called, a batch not larger than ``small_size``.
    """
    if small_size < 1:
        raise ValueError(f"small_size must be >= 1, got {small_size}")
    value_and_grad = jax.value_and_grad(loss_fn)

    def fn(params, batch):
        sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
        if len(sizes) != 1 or not sizes.pop() > small_size:
            raise ValueError(
                f"every batch leaf needs one leading size larger than small_size={small_size}"
            )
        big = jax.tree.leaves(batch)[0].shape[0]
        v_small, g_small = value_and_grad(params, jax.tree.map(lambda x: x[:small_size], batch))
        v_rest, g_rest = value_and_grad(params, jax.tree.map(lambda x: x[small_size:], batch))
        w = small_size / big
        grads = jax.tree.map(lambda a, b: w * a + (1 - w) * b, g_small, g_rest)
        stats = {"small_sq": tu.dot(g_small, g_small), "big_sq": tu.dot(grads, grads)}
        return w * v_small + (1 - w) * v_rest, grads, stats

    return fn


class GradientNoise:
    """Per-example gradient statistics of a mean loss at fixed parameters: |G|², tr Σ,
    B_simple (`measure`) and B_noise (`b_noise`), with one compiled kernel each owned by
    the object.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the *mean* over the batch's examples
        (e.g. `sharp_minima.losses.evaluation_loss`); an optional ``batch["mask"]`` marks
        padding (`sharp_minima.objective.example_weights`). Examples must not interact
        (no BatchNorm in training mode).
      wrt: which parameters (`sharp_minima.objective.Objective`).
      groups: the per-layer split: ``{name: regex}`` (searched in the parameter paths;
        first match wins, unmatched leaves form "other"), or None: one group per module
        (a leaf's path without its last part).
      chunk: per-example gradients held at once (chunked path; formed convolution kernels).
      method: how exact per-example moments are computed. "layers" (default): from each
        layer's inputs and output cotangents wherever a layer identity applies
        (`sharp_minima.per_example`: dense, embedding and convolution layers, small leaves
        formed), about one gradient's cost; the other leaves, leaf by leaf, and every leaf
        with "chunked": per-example gradients written out ``chunk`` at a time. Both are
        exact; `NoiseScale.routes` says which leaf took which route.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> loss = lambda w, b: jnp.mean(b["x"] @ w)  # gᵢ = xᵢ
      >>> x = jnp.array([[1.0, 0.0], [3.0, 0.0], [1.0, 2.0], [3.0, 2.0]])
      >>> est = GradientNoise(loss).measure(jnp.zeros(2), {"x": x[None]}).total
      >>> round(est.trace_cov, 4), round(est.grad_norm_sq, 4)  # 4/3·(1 + 1), 2² + 1² − 8/3/4
      (2.6667, 4.3333)
    """

    def __init__(
        self,
        loss_fn,
        *,
        wrt=None,
        groups: dict | None = None,
        chunk: int = 16,
        method: str = "layers",
    ):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if method not in ("layers", "chunked"):
            raise ValueError(f'method must be "layers" or "chunked", got {method!r}')
        self.method = method
        self.objective = Objective(loss_fn, wrt)
        self.hessian = hessian.Curvature(loss_fn, wrt=wrt)
        self.groups, self.chunk = groups, chunk
        self.num_traces = 0
        self._moments_jit = jax.jit(
            self._moments_kernel, static_argnames=("num_probes", "group_of", "serial")
        )
        self._b_noise_jit = jax.jit(self._b_noise_kernel)
        self._sharpness_jit = jax.jit(self._sharpness_kernel)

    # -- layout ----------------------------------------------------------------------

    def _group_of_leaves(self, params):
        """``(names, ids, paths)``: the group names, each selected leaf's group index and
        each selected leaf's path."""
        paths = jax.tree_util.tree_map_with_path(lambda p, x: tu.path_str(p), params)
        selected_paths, _ = tu.select(paths, self.objective.wrt)
        names, ids = [], []
        for path in selected_paths:
            if self.groups is None:
                name = path.rsplit("/", 1)[0] if "/" in path else path
            else:
                name = next((g for g, rx in self.groups.items() if re.search(rx, path)), "other")
            if name not in names:
                names.append(name)
            ids.append(names.index(name))
        return names, np.asarray(ids), selected_paths

    # -- kernels ------------------------------------------------------------------------

    def _leaf_loss(self, params):
        """``(leaves, f)``: the selected leaves (a list) and ``f(leaves, batch)``."""
        selected, merge = tu.select(params, self.objective.wrt)
        return selected, lambda leaves, batch: self.objective.loss_fn(merge(leaves, params), batch)

    def _mean_gradient(self, params, batches, weights):
        x0, f = self.objective.flat_loss(params)
        return x0, batch_mean(lambda b: jax.grad(f)(x0, b), batches, weights)

    def _moments_kernel(self, params, batches, weights, key, *, num_probes, group_of, serial=False):
        """Per example i and group g: |gᵢ⁽ᵍ⁾|² and gᵢ⁽ᵍ⁾·Ḡ⁽ᵍ⁾ (exact, or estimated with
        ``num_probes`` random projections per group), the example's weight πᵢ, |Ḡ⁽ᵍ⁾|², Ḡ
        and, for projections, each probe's weighted Σ|gᵢ − Ḡ|² per group (its spread over
        the probes is the projections' noise); ``group_of`` holds each leaf's group."""
        self.num_traces += 1
        leaves, f = self._leaf_loss(params)
        num_groups = max(group_of) + 1
        dtype = jnp.result_type(*leaves)

        def omega_of(batch):
            return objective.example_weights(batch, jax.tree.leaves(batch)[0].shape[0], dtype)

        def group_sums(per_leaf):  # (..., leaves) -> (..., groups)
            return jnp.stack(
                [
                    sum(per_leaf[..., j] for j in range(len(leaves)) if group_of[j] == g)
                    for g in range(num_groups)
                ],
                axis=-1,
            )

        if num_probes:
            # gᵢ⁽ᵍ⁾·z for Rademacher z on the leaves of group g (the same probes for every
            # batch): one linearisation of the per-example losses per batch, whose transpose
            # gives the mean gradient and whose K·(groups) products give the projections;
            # E[(gᵢ·z)²] = |gᵢ|², E[(gᵢ·z)(Ḡ·z)] = gᵢ·Ḡ.
            keys = jax.random.split(key, num_groups * len(leaves)).reshape(num_groups, -1)
            probes = [
                [
                    jax.random.rademacher(keys[g, j], (num_probes,) + a.shape, a.dtype)
                    if group_of[j] == g
                    else jnp.zeros((num_probes,) + a.shape, a.dtype)
                    for j, a in enumerate(leaves)
                ]
                for g in range(num_groups)
            ]

            def one_batch(batch):
                _, lin = jax.linearize(lambda x: per_example_losses(f, x, batch), leaves)
                omega = omega_of(batch)
                grad = jax.linear_transpose(lin, leaves)(omega)[0]
                u = jnp.stack([jax.vmap(lin)(z) for z in probes])  # (groups, K, B)
                return grad, u, omega

            grads, u, omega = lax.map(one_batch, batches)
            mean = [jnp.tensordot(weights, g, axes=1) for g in grads]
            gz = jnp.stack(
                [  # (groups, K): Ḡ·z
                    sum(jnp.einsum("k...,...->k", zj, m) for zj, m in zip(z, mean)) for z in probes
                ]
            )
            u = jnp.moveaxis(u, 1, 3)  # (nb, K, B, groups)
            sq = jnp.mean(u**2, axis=1)
            dot = jnp.mean(u * gz.T[None, :, None, :], axis=1)
            pi = omega * weights[:, None]
            units = jnp.einsum("nb,nkbg->gk", pi, u**2 - 2 * u * gz.T[None, :, None, :])
            codes = jnp.full((len(leaves),), -1)
        else:
            omega = jax.vmap(omega_of)(batches)
            pi = omega * weights[:, None]
            n_leaves = len(leaves)
            plan = None
            if self.method == "layers":
                plan = per_example.plan(f, leaves, per_example.example_of(batches))
            layers = plan is not None and set(plan.routes) != {"chunked"}
            if layers:  # not when the jaxpr could not be read, nor when nothing qualifies
                sq, dot, mean = per_example.moments(f, plan, leaves, batches, pi, chunk=self.chunk)
                routes = plan.routes
            else:
                routes = ("chunked",) * n_leaves
                sq = dot = jnp.zeros(pi.shape + (n_leaves,), dtype)
                mean = [jnp.zeros_like(a) for a in leaves]
            slow = [j for j, r in enumerate(routes) if r == "chunked"]
            if slow:  # per-example gradients of these leaves alone, chunk at a time

                def f_slow(sub, batch):
                    full = list(leaves)
                    for j, a in zip(slow, sub):
                        full[j] = a
                    return f(full, batch)

                sub = [leaves[j] for j in slow]
                if layers:  # Ḡ came with the layers' pass
                    sub_mean = [mean[j] for j in slow]
                else:
                    sub_mean = batch_mean(lambda b: jax.grad(f_slow)(sub, b), batches, weights)

                def one_batch(batch):
                    def example(ex):
                        g = jax.grad(f_slow)(sub, jax.tree.map(lambda a: a[None], ex))
                        sq = jnp.stack([jnp.vdot(a, a) for a in g])
                        return sq, jnp.stack([jnp.vdot(a, m) for a, m in zip(g, sub_mean)])

                    # One example at a time when the examples are split over devices: XLA's
                    # SPMD partitioner miscompiles a vmapped convolution's kernel gradient
                    # over a sharded axis (silently wrong numbers; jax 0.10).
                    size = 1 if serial else self.chunk
                    return lax.map(example, batch, batch_size=size)

                sq_s, dot_s = lax.map(one_batch, batches)  # (nb, B, slow leaves) twice
                idx = jnp.asarray(slow)
                sq, dot = sq.at[..., idx].set(sq_s), dot.at[..., idx].set(dot_s)
                mean = list(mean)
                for j, m in zip(slow, sub_mean):
                    mean[j] = m
            sq, dot = group_sums(sq), group_sums(dot)
            units = jnp.zeros((num_groups, 1), dtype)
            codes = jnp.asarray([per_example.ROUTES.index(r) for r in routes])
        mean_sq = group_sums(jnp.stack([jnp.vdot(m, m) for m in mean]))
        _, merge = tu.select(params, self.objective.wrt)
        vector = merge(list(mean), jax.tree.map(jnp.zeros_like, params))
        return sq, dot, pi, mean_sq, vector, units, codes

    def _b_noise_kernel(self, params, batches, weights, examples):
        self.num_traces += 1
        x0, f = self.objective.flat_loss(params)
        _, mean = self._mean_gradient(params, batches, weights)
        _, hvp = self.hessian.flat_matvec(params, batches, weights)

        def quad(ex):
            d = jax.grad(f)(x0, jax.tree.map(lambda a: a[None], ex)) - mean
            return d @ hvp(d)

        q = lax.map(quad, examples)
        return q, mean @ hvp(mean)

    def _sharpness_kernel(self, params, minibatches):
        self.num_traces += 1
        x0, f = self.objective.flat_loss(params)

        def one(batch):
            grad = lambda x: jax.grad(f)(x, batch)  # noqa: E731
            g, hg = jax.jvp(grad, (x0,), (grad(x0),))
            return jnp.stack([g @ hg, g @ g])

        return lax.map(one, minibatches)

    # -- host side ----------------------------------------------------------------------

    def batch_sharpness(self, params, minibatches) -> hessian.Estimate:
        """E_B[g_Bᵀ H_B g_B / |g_B|²] over the given mini-batches, g_B and H_B the gradient and
        Hessian of the mini-batch's mean loss: the "batch sharpness" that settles at 2/η under
        SGD while λ_max stays below it (Andreyev & Beneventano 2024). One HVP per mini-batch.

        Args:
          params: pytree at which it is measured.
          minibatches: the mini-batches stacked, a leading axis J over mini-batches of B
            examples (e.g. the batches SGD would draw).

        Returns:
          `sharp_minima.hessian.Estimate`, the standard error over the mini-batches.
        """
        prep = self.objective.prepare(params, minibatches)
        out = np.asarray(self._sharpness_jit(prep.params, minibatches), np.float64)
        objective.check_finite("Hessian-vector products (batch sharpness)", out)
        ratio = out[:, 0] / np.maximum(out[:, 1], np.finfo(np.float64).tiny)
        se = ratio.std(ddof=1) / math.sqrt(len(ratio)) if len(ratio) > 1 else float("nan")
        return hessian.Estimate(float(ratio.mean()), float(se), len(ratio))

    def measure(
        self, params, batches, *, weights=None, num_probes: int = 0, key: jax.Array | None = None
    ) -> NoiseScale:
        """|G|², tr Σ and B_simple = tr Σ / |G|² (McCandlish et al. 2018)
        over all examples of ``batches`` (weighted per batch as for `sharp_minima.hessian`; a
        ragged last batch is padded with a ``mask`` and weighted by its real examples), per
        group and in total, with standard errors.

        Args:
          params: pytree at which the gradients are taken.
          batches: batch pytree with a leading axis over batches.
          weights: optional per-batch weights.
          num_probes: 0 (default): exact, by the layer identities where they apply (about
            one gradient; `NoiseScale.routes`) and per-example gradients ``chunk`` at a time
            for the other leaves (time grows with their size). K > 0: each |gᵢ|² and gᵢ·Ḡ
            estimated from K Rademacher projections per group, one jvp of the per-example
            losses each — no per-example gradient is formed, so it costs about K·(groups)
            forward passes (pass
            ``groups={"all": ""}`` for the total alone: with K = 2, about 2.3 gradients on
            an MLP); unbiased, and the standard errors include the projections' noise
            (K >= 2, so that it can be measured).
          key: the projections' key (needed when ``num_probes > 0``).

        Returns:
          `NoiseScale`: ``total`` and per-group ``layers`` (`NoiseEstimate` each: the unbiased
          |G|² = |Ḡ|² − tr Σ/N and tr Σ = N/(N−1)·(mean|gᵢ|² − |Ḡ|²), B_simple, standard
          errors), the mean gradient, N, and each leaf's route.

        Raises:
          ValueError: no batches, bad weights, fewer than 2 examples, ``num_probes`` of 1,
            or no ``key`` with probes.
          FloatingPointError: NaN or Inf in the per-example gradients.
        """
        if batches is None:
            raise ValueError("gradient noise is a statistic of examples: batches must not be None")
        if num_probes < 0 or num_probes == 1:
            raise ValueError(
                f"num_probes must be 0 (exact) or >= 2 (the projections' noise is measured "
                f"from their spread), got {num_probes}"
            )
        if num_probes and key is None:
            raise ValueError("num_probes > 0 needs key= for the projections")
        prep = self.objective.prepare(params, batches, weights)
        names, ids, paths = self._group_of_leaves(params)
        key = jax.random.key(0) if key is None else key
        sq, dot, pi, mean_sq, vector, units, codes = self._moments_jit(
            prep.params,
            batches,
            prep.weights,
            key,
            num_probes=num_probes,
            group_of=tuple(int(g) for g in ids),
            serial=_split_over_devices(batches),
        )
        sq, dot = tu.host(sq, np.float64), tu.host(dot, np.float64)
        pi, mean_sq = tu.host(pi, np.float64).ravel(), tu.host(mean_sq, np.float64)
        objective.check_finite("per-example gradients (noise scale)", sq, dot, mean_sq)
        sq, dot = sq.reshape(-1, len(names)), dot.reshape(-1, len(names))
        real = pi > 0
        sq, dot, pi = sq[real], dot[real], pi[real] / pi[real].sum()
        n = int(real.sum())
        if n < 2:
            raise ValueError(f"the noise scale needs at least 2 examples, got {n}")
        # The projections' variance of each leaf's Σ|gᵢ − Ḡ|² part: the spread over the
        # probes of each batch (independent across batches and leaves), scaled like tr Σ.
        # The projections' variance of each group's part of tr Σ: the spread over the
        # probes (shared by all examples) of each probe's estimate.
        units = tu.host(units, np.float64)  # (groups, K)
        probe_var = np.zeros(len(names))
        if num_probes > 1:
            probe_var = units.var(axis=1, ddof=1) / num_probes * (n / (n - 1)) ** 2
        layers = {
            name: _noise_estimate(sq[:, g], dot[:, g], mean_sq[g], pi, probe_var[g])
            for g, name in enumerate(names)
        }
        total = _noise_estimate(sq.sum(1), dot.sum(1), mean_sq.sum(), pi, probe_var.sum())
        routes = {
            path: per_example.ROUTES[c] if c >= 0 else "projected"
            for path, c in zip(paths, np.asarray(codes).tolist())
        }
        return NoiseScale(total, layers, vector, n, routes)

    def memory_bytes(self, params, batches, *, weights=None) -> int:
        """XLA's peak memory (arguments, outputs and temporaries, in bytes, per device) of the
        exact `measure` kernel for these shapes: compiles it ahead of time, without running
        it. Compare with a gradient's to see what the per-example moments cost.

        Args:
          params: pytree at which `measure` would run.
          batches: batch pytree with a leading axis over batches.
          weights: optional per-batch weights.

        Returns:
          The peak in bytes (per device, as XLA's ``memory_analysis`` reports it).
        """
        prep = self.objective.prepare(params, batches, weights)
        _, ids, _ = self._group_of_leaves(params)
        mem = (
            self._moments_jit.lower(
                prep.params,
                batches,
                prep.weights,
                jax.random.key(0),
                num_probes=0,
                group_of=tuple(int(g) for g in ids),
            )
            .compile()
            .memory_analysis()
        )
        return int(
            mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes
        )

    def b_noise(
        self, params, batches, *, key: jax.Array, num_examples: int = 32, weights=None
    ) -> hessian.Estimate:
        """B_noise = tr(HΣ) / (GᵀHG) (McCandlish et al. 2018, eq. 2.7), H the Hessian of the
        mean loss over ``batches``: tr(HΣ) is the mean of (gᵢ − Ḡ)ᵀH(gᵢ − Ḡ)·N/(N−1) (one
        HVP per example) over ``num_examples`` examples drawn at random (over all N examples,
        exactly, when ``num_examples >= N``), and GᵀHG = ḠᵀHḠ − tr(HΣ)/N. Equal to B_simple
        when H ∝ I.

        Args:
          params: pytree at which it is measured.
          batches: batch pytree with a leading axis over batches.
          key: key of the drawn examples.
          num_examples: examples drawn for tr(HΣ).
          weights: optional per-batch weights.

        Returns:
          `sharp_minima.hessian.Estimate`; the standard error is that of tr(HΣ) over the
          drawn examples (0 when exact).

        Raises:
          ValueError: ``batches`` None or masked, or ``num_examples < 2``.
        """
        if batches is None:
            raise ValueError("gradient noise is a statistic of examples: batches must not be None")
        if num_examples < 2:
            raise ValueError(f"num_examples must be >= 2, got {num_examples}")
        if "mask" in (batches if isinstance(batches, dict) else {}):
            raise ValueError("b_noise does not support masked batches yet; drop the padding")
        prep = self.objective.prepare(params, batches, weights)
        nb = objective.num_batches(batches)
        size = jax.tree.leaves(batches)[0].shape[1]
        pi = np.asarray(prep.weights, np.float64)[:, None] * np.full((nb, size), 1.0 / size)
        pi = pi.ravel()
        n = int((pi > 0).sum())
        exact = num_examples >= n
        if exact:  # every example once, weighted: no sampling error
            flat = np.flatnonzero(pi > 0)
        else:
            flat = np.asarray(jax.random.choice(key, nb * size, (num_examples,), p=pi))
        examples = jax.tree.map(lambda x: x.reshape((nb * size,) + x.shape[2:])[flat], batches)
        q, ghg = self._b_noise_jit(prep.params, batches, prep.weights, examples)
        q = np.asarray(q, np.float64) * n / (n - 1)
        objective.check_finite("Hessian-vector products (B_noise)", q, ghg)
        if exact:
            tr_hs, se = float(pi[flat] @ q), 0.0
        else:
            tr_hs, se = float(q.mean()), float(q.std(ddof=1) / math.sqrt(len(q)))
        value = tr_hs / (float(ghg) - tr_hs / n)
        stderr = abs(value) * se / abs(tr_hs) if tr_hs else float("nan")
        return hessian.Estimate(value, stderr, len(flat) + 1)


def _split_over_devices(batches) -> bool:
    """Whether any batch leaf is split (not replicated) over several devices."""
    for x in jax.tree.leaves(batches):
        sharding = getattr(x, "sharding", None)
        if sharding is not None and len(sharding.device_set) > 1:
            if not sharding.is_fully_replicated:
                return True
    return False


def _noise_estimate(sq, dot, mean_sq, pi, probe_var=0.0) -> NoiseEstimate:
    """Unbiased |G|², tr Σ and B_simple from per-example |gᵢ|² (``sq``), gᵢ·Ḡ (``dot``),
    |Ḡ|² and weights πᵢ (summing to one), with standard errors from the influence of each
    example (float64, numpy), plus ``probe_var``, the variance of tr Σ from random
    projections (independent of the examples' sampling)."""
    n = len(sq)
    mean_sq = float(mean_sq)
    dev = sq - 2 * dot + mean_sq  # |gᵢ − Ḡ|²
    tr = n / (n - 1) * float(pi @ dev)
    g2 = mean_sq - tr / n
    infl_tr = n / (n - 1) * dev - tr
    infl_g2 = 2 * (dot - mean_sq) - infl_tr / n
    b = tr / g2 if g2 != 0 else float("inf")
    infl_b = (infl_tr - b * infl_g2) / g2 if g2 != 0 else np.full(n, np.nan)

    def se(infl, extra=0.0):
        return float(np.sqrt(pi @ (infl - pi @ infl) ** 2 / (n - 1) + extra))

    return NoiseEstimate(
        g2,
        se(infl_g2, probe_var / n**2),
        tr,
        se(infl_tr, probe_var),
        b,
        se(infl_b, probe_var * ((1 + b / n) / g2) ** 2 if g2 else 0.0),
    )
