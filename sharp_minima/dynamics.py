"""SGD, noisy gradient descent and the SDE of the lecture notes' picture, thousands of runs in
one compiled call; and populations of small models trained in one vmapped step.

**Simulators** (`Simulator`) run R independent copies of an iteration on a potential
L: ℝᵈ → ℝ (or on a finite data set's per-example losses) in one ``jit(vmap(scan))`` call, keys
explicit:

- SGD with true mini-batch sampling: ``x ← x − η·mean_{i∈batch} ∇ℓᵢ(x)``, B examples drawn
  without replacement from N at every step (`minibatch_noise`);
- gradient descent with Gaussian gradient noise ``x ← x − η(∇L(x) + ξ)``, ξ ~ N(0, C) with C
  isotropic σ²I (`isotropic_noise`), diagonal (`diagonal_noise`), a given covariance
  (`covariance_noise`) or proportional to the curvature, C = s·H(x)₊ (`curvature_noise`:
  the SGD-like noise of Zhu et al. 2019 and Xie et al. 2021, under which flat minima are
  exponentially preferred);
- the Euler–Maruyama discretisation of the SDE ``dx = −∇L dt + √(2T) dW``
  (`langevin_noise`): the same update with η = dt and ξ ~ N(0, 2T/dt·I), whose stationary
  density is ∝ exp(−L/T).

A mean-loss SGD step with batch size B has gradient noise of covariance Σ/B (times the
finite-N factor (N − B)/(N − 1) without replacement): `isotropic_noise(σ/√B)` models it with
Σ = σ²I, and its temperature is T = ησ²/(2B) (the lecture's eq. 25; `gradients.temperature`,
which is `gradients.noise_scale` η(1 − B/N)/(B(1 − μ)) times σ²/2). Each run records its final
position and the first step at which ``escaped(x)`` holds (−1 if never), for escape-time
statistics.

**Potentials**: `quadratic`, `double_well` (two minima of chosen depths and curvatures,
with `Potential.minima` and `Potential.curvatures` for the Laplace prediction), and
`laplace_ratio` (P_A/P_B → √(H_B/H_A)·exp(−(L_A − L_B)/T) as T → 0), and
`mean_first_passage_time` (the exact escape time of which Kramers' law is the limit).

**Populations** (`PopulationTrainer`): one training step ``vmap``ped over P members' parameters,
optimizer states (learning rates travel in the state, `optax.inject_hyperparams`) and data
order, with the steps of an epoch fused in one ``lax.scan`` and the data on the device, so a
sweep over learning rates and seeds is one compiled program whatever its size.

Only jax, numpy and optax are imported here.

References:
  Mandt, Hoffman & Blei (2017); Jastrzębski et al. (2017); Smith & Le (2018); Zhu et al.
  (2019); Xie, Sato & Sugiyama (2021); Zhang et al. (2019, the noisy quadratic model).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

__all__ = [
    "NoisyQuadratic",
    "Noise",
    "PopulationTrainer",
    "Potential",
    "SimulationResult",
    "Simulator",
    "boltzmann_ratio",
    "covariance_noise",
    "curvature_noise",
    "diagonal_noise",
    "double_well",
    "isotropic_noise",
    "langevin_noise",
    "laplace_ratio",
    "mean_first_passage_time",
    "escape_time_slope",
    "first_passage_slope",
    "minibatch_noise",
    "noisy_quadratic",
    "quadratic",
]


# ------------------------------------------------------------------------------- potentials


class Potential(NamedTuple):
    """A potential L(x) on ℝᵈ.

    Attributes:
      value: ``value(x) -> scalar`` for x of shape (d,).
      dim: d.
      minima: (k, d) local minima (when known, for predictions), else None.
      curvatures: (k,) Hessian determinants det H at ``minima`` (1-D: L''), else None.
      name: for reports.
    """

    value: Callable[[jax.Array], jax.Array]
    dim: int
    minima: np.ndarray | None = None
    curvatures: np.ndarray | None = None
    name: str = "potential"

    def grad(self, x):
        """∇L(x).

        Args:
          x: a point (d,).

        Returns:
          The gradient (d,).
        """
        return jax.grad(self.value)(x)


def quadratic(h) -> Potential:
    """L(x) = ½ Σ hᵢ xᵢ² (a diagonal quadratic; the noisy quadratic model's loss).

    Args:
      h: the curvatures (d,).

    Returns:
      A `Potential` with its minimum at 0.

    >>> float(quadratic([2.0, 4.0]).value(jnp.array([1.0, 1.0])))
    3.0
    """
    h = np.asarray(h, np.float64)
    hj = jnp.asarray(h)
    return Potential(
        lambda x: 0.5 * jnp.sum(hj.astype(x.dtype) * x**2),
        len(h),
        np.zeros((1, len(h))),
        np.array([np.prod(h)]),
        "quadratic",
    )


def double_well(
    depth_a: float = 1.0, depth_b: float = 0.8, curv_a: float = 8.0, curv_b: float = 2.0
) -> Potential:
    """A 1-D asymmetric double well: minimum A at x < 0 with value −``depth_a`` and curvature
    L'' = ``curv_a``, minimum B at x > 0 with −``depth_b`` and ``curv_b``, the barrier at 0
    (L(0) = 0): the lecture notes' picture of a deep sharp and a shallow flat minimum.

    Each side is the quartic well d·((s/w)⁴ − 2(s/w)²) in s = |x| (minimum −d at s = w,
    curvature 8d/w², so w = √(8d/curvature)): confining, with L'(0) = 0 on both sides (L''
    jumps at the barrier, which does not matter for escapes).

    Args:
      depth_a: depth of minimum A.
      depth_b: depth of minimum B.
      curv_a: curvature at A.
      curv_b: curvature at B.

    Returns:
      A `Potential` with its two ``minima`` and ``curvatures``.

    Raises:
      ValueError: a non-positive depth or curvature.

    >>> w = double_well()
    >>> [round(float(w.value(jnp.asarray(m))), 6) for m in w.minima], w.minima[0].tolist()
    ([-1.0, -0.8], [-1.0])
    """
    if min(depth_a, depth_b, curv_a, curv_b) <= 0:
        raise ValueError("depths and curvatures must be positive")
    w_a, w_b = np.sqrt(8 * depth_a / curv_a), np.sqrt(8 * depth_b / curv_b)

    def value(x):
        s = x[0]
        side = jnp.where(s < 0, -s / w_a, s / w_b)
        depth = jnp.where(s < 0, depth_a, depth_b)
        return depth * (side**4 - 2 * side**2)

    return Potential(
        value,
        1,
        np.array([[-w_a], [w_b]]),
        np.array([curv_a, curv_b]),
        "double_well",
    )


def laplace_ratio(potential: Potential, temperature: float) -> float:
    """P_A/P_B of the density ∝ exp(−L/T) in the wells around ``potential.minima[0]`` (A) and
    ``[1]`` (B) by Laplace's method: √(det H_B/det H_A)·exp(−(L_A − L_B)/T) (the lecture's
    eq. 26 with its factor 2 restored: T = ησ²/(2B) in eq. 25).

    Args:
      potential: a `Potential` with two known ``minima`` and ``curvatures``.
      temperature: T.

    Returns:
      The ratio as a float.

    Raises:
      ValueError: the potential lacks two minima with curvatures.

    >>> round(laplace_ratio(double_well(1.0, 1.0, 8.0, 2.0), 0.1), 6)  # same depth: √(2/8)
    0.5
    """
    if potential.minima is None or potential.curvatures is None or len(potential.minima) < 2:
        raise ValueError("laplace_ratio needs a potential with two known minima and curvatures")
    la, lb = (float(potential.value(jnp.asarray(m))) for m in potential.minima[:2])
    ha, hb = potential.curvatures[:2]
    return float(np.sqrt(hb / ha) * np.exp(-(la - lb) / temperature))


def boltzmann_ratio(potential: Potential, temperature: float, *, lim: float = 6.0,
                    num_points: int = 240_001) -> float:  # fmt: skip
    """P(x < 0)/P(x > 0) of the density ∝ exp(−L/T) of a 1-D potential (the stationary law of
    the Langevin SDE), by the trapezoid rule on [−lim, lim] in float64: the exact ratio that
    `laplace_ratio` approximates.

    Args:
      potential: a 1-D `Potential` with its barrier at 0.
      temperature: T.
      lim: the integration interval's half-width.
      num_points: quadrature points.

    Returns:
      The ratio as a float.

    Raises:
      ValueError: a potential of dimension other than 1.

    >>> round(boltzmann_ratio(double_well(1.0, 1.0, 8.0, 8.0), 0.3), 6)  # a symmetric well
    1.0
    """
    if potential.dim != 1:
        raise ValueError(f"boltzmann_ratio needs a 1-D potential, got dimension {potential.dim}")
    with jax.enable_x64(True):
        x = np.linspace(-lim, lim, num_points)
        values = np.asarray(jax.vmap(potential.value)(jnp.asarray(x)[:, None]))
    f = np.exp(-(values - values.min()) / temperature)
    left, right = x <= 0, x >= 0
    return float(np.trapezoid(f[left], x[left]) / np.trapezoid(f[right], x[right]))


def mean_first_passage_time(potential: Potential, temperature: float, start: float, *,
                            barrier: float = 0.0, lim: float = 6.0,
                            num_points: int = 240_001) -> float:  # fmt: skip
    """The exact mean first-passage time of the Langevin SDE dx = −L′(x)dt + √(2T)dW from
    ``start`` to ``barrier`` (reflected at ±``lim`` on the far side), by quadrature in
    float64:

        τ = (1/T) ∫_{start}^{barrier} e^{L(y)/T} ∫_{−lim}^{y} e^{−L(z)/T} dz dy

    (mirrored for ``start > barrier``). Kramers' formula, τ ∝ exp(ΔL/T), is its T → 0
    limit; away from it, slopes of log τ against 1/T are not ΔL.

    Args:
      potential: a 1-D `Potential`.
      temperature: T.
      start: the starting point.
      barrier: where the passage ends.
      lim: the reflecting wall's distance from 0.
      num_points: quadrature points.

    Returns:
      τ in units of time (steps × dt for `Simulator`).

    Raises:
      ValueError: a potential of dimension other than 1, or ``start`` outside (−lim, lim).

    >>> t = mean_first_passage_time(quadratic([0.0]), 0.5, -1.0)  # free diffusion
    >>> round(t, 3)  # ((0 + 6)² − (−1 + 6)²)/(2T)
    11.0
    """
    if potential.dim != 1:
        raise ValueError(f"the first-passage time needs a 1-D potential, got {potential.dim}")
    if not -lim < start < lim:
        raise ValueError(f"start={start} must lie inside (−{lim}, {lim})")
    sign = 1.0 if start <= barrier else -1.0  # mirror x → −x for a passage leftwards
    with jax.enable_x64(True):
        x = np.linspace(-lim, lim, num_points)
        values = np.asarray(jax.vmap(potential.value)(jnp.asarray(sign * x)[:, None]))
    a, b = sign * start, sign * barrier
    shift = values.min()  # both exponentials shifted by it: their product cancels it
    inner = np.exp(-(values - shift) / temperature)  # ≤ 1
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (inner[1:] + inner[:-1]) * np.diff(x))])
    keep = (x >= a) & (x <= b)  # only the path's values enter e^{+L/T}
    outer = np.exp((values[keep] - shift) / temperature) * cum[keep]
    return float(np.trapezoid(outer, x[keep]) / temperature)


def escape_time_slope(xs, median_times, num_escaped) -> tuple[float, float]:
    """The least-squares slope of log(median escape time) against ``xs`` (e.g. B/η) and its
    standard error: the median of n first-passage times (exponential law) has a relative
    error ≈ 1.44/√n, propagated through the fit.

    Args:
      xs: the abscissae.
      median_times: the median escape time at each.
      num_escaped: how many runs escaped at each (the medians' n).

    Returns:
      ``(slope, standard error)``.

    >>> s, se = escape_time_slope([1.0, 2.0], [np.e, np.e**3], [10_000, 10_000])
    >>> round(s, 6), round(se, 4)
    (2.0, 0.0204)
    """
    x = np.asarray(xs, np.float64)
    y = np.log(np.asarray(median_times, np.float64))
    se_y = 1.44 / np.sqrt(np.maximum(np.asarray(num_escaped, np.float64), 1.0))
    dx = x - x.mean()
    se = float(np.sqrt(np.sum((dx / np.sum(dx**2)) ** 2 * se_y**2)))
    return float(np.polyfit(x, y, 1)[0]), se


def first_passage_slope(potential: Potential, start: float, xs, temperatures) -> float:
    """The exact slope of log τ against ``xs`` when each x sets the temperature
    ``temperatures[i]``: τ from `mean_first_passage_time` (escape across 0), the prediction
    that `escape_time_slope` measures. Kramers' ΔL·d(1/T)/dx is its low-temperature limit.

    Args:
      potential: a 1-D `Potential` with its barrier at 0.
      start: the starting point (a minimum).
      xs: the abscissae.
      temperatures: T at each.

    Returns:
      The slope.
    """
    taus = [mean_first_passage_time(potential, float(t), start) for t in temperatures]
    return float(np.polyfit(np.asarray(xs, np.float64), np.log(taus), 1)[0])


# ----------------------------------------------------------------------------------- noise


class Noise(NamedTuple):
    """A gradient-noise model for `Simulator`.

    Attributes:
      name: for reports.
      sample: ``sample(z, x, params, grad) -> (d,)`` noise added to ∇L(x) from a standard
        normal draw z (d,) (the simulator draws one block for all runs per step, the cheap
        way), or, with ``needs_key``, ``sample(key, x, params, grad)``.
      params: the noise's arrays (passed to the compiled call as arguments, never closed
        over; `Simulator.run` can replace them).
      replaces_gradient: ``sample`` returns the whole stochastic gradient
        (`minibatch_noise`).
      needs_key: ``sample`` takes a key instead of z.
    """

    name: str
    sample: Callable
    params: Any
    replaces_gradient: bool = False
    needs_key: bool = False


def isotropic_noise(sigma) -> Noise:
    """ξ ~ N(0, σ²I).

    Args:
      sigma: σ.

    Returns:
      A `Noise`.
    """
    return Noise(
        "isotropic",
        lambda z, x, s, g: s.astype(x.dtype) * z,
        jnp.asarray(sigma),
    )


def diagonal_noise(sigmas) -> Noise:
    """ξ ~ N(0, diag(σ²)).

    Args:
      sigmas: σ (d,).

    Returns:
      A `Noise`.
    """
    return Noise(
        "diagonal",
        lambda z, x, s, g: s.astype(x.dtype) * z,
        jnp.asarray(sigmas),
    )


def covariance_noise(cov) -> Noise:
    """ξ ~ N(0, C) for a given symmetric positive semi-definite C.

    Args:
      cov: C (d, d).

    Returns:
      A `Noise` (its factor of C precomputed).

    Raises:
      ValueError: C not positive semi-definite.
    """
    cov = np.asarray(cov, np.float64)
    w, v = np.linalg.eigh(cov)
    if w.min() < -1e-10 * max(abs(w).max(), 1e-300):
        raise ValueError("the covariance must be positive semi-definite")
    root = jnp.asarray(v * np.sqrt(np.clip(w, 0, None)))
    return Noise(
        "covariance",
        lambda z, x, r, g: r.astype(x.dtype) @ z,
        root,
    )


def curvature_noise(scale, potential: Potential) -> Noise:
    """ξ ~ N(0, s·H(x)₊): noise shaped like the curvature at the current point (negative
    curvature clipped to 0), the covariance SGD's noise has near a minimum (Σ ≈ F ≈ H).

    Args:
      scale: s.
      potential: the `Potential` whose Hessian shapes the noise.

    Returns:
      A `Noise`.
    """

    def sample(z, x, s, g):
        h = jax.hessian(potential.value)(x)
        w, v = jnp.linalg.eigh(h)
        root = v * jnp.sqrt(jnp.clip(w, 0, None) * s)
        return root @ z

    return Noise("curvature", sample, jnp.asarray(scale))


def langevin_noise(temperature, dt) -> Noise:
    """The Euler–Maruyama step of dx = −∇L dt + √(2T) dW with step η = ``dt``: ξ ~
    N(0, 2T/dt·I), so that η·ξ has variance 2T·dt (stationary density ∝ exp(−L/T)).

    Args:
      temperature: T.
      dt: the step η the simulator will use.

    Returns:
      A `Noise`.
    """
    return isotropic_noise(jnp.sqrt(2.0 * jnp.asarray(temperature) / jnp.asarray(dt)))


def minibatch_noise(per_example_grad, data, batch_size: int) -> Noise:
    """SGD on a finite data set: the gradient is the mean of ``per_example_grad(x, example)``
    over ``batch_size`` examples drawn without replacement from ``data`` at every step,
    replacing ∇L(x).

    Args:
      per_example_grad: ``(x, example) -> (d,)``.
      data: a pytree with a leading example axis N.
      batch_size: B, in [1, N].

    Returns:
      A `Noise` that replaces the gradient (``replaces_gradient``).

    Raises:
      ValueError: B outside [1, N].
    """
    n = jax.tree.leaves(data)[0].shape[0]
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}] (the data set), got {batch_size}")

    def sample(key, x, data, g):
        idx = jax.random.choice(key, n, (batch_size,), replace=False)
        batch = jax.tree.map(lambda a: a[idx], data)
        return jnp.mean(jax.vmap(per_example_grad, in_axes=(None, 0))(x, batch), axis=0)

    return Noise(f"minibatch(B={batch_size})", sample, data, replaces_gradient=True, needs_key=True)


# ------------------------------------------------------------------------------- simulator


class SimulationResult(NamedTuple):
    """Output of `Simulator.run`.

    Attributes:
      final: (R, d) positions after the last step.
      escape_step: (R,) the first step (1-based) after which ``escaped(x)`` held, −1 if
        never (only with ``escaped``).
      mean, var: (num_records, d) mean and variance over runs at the recorded steps (with
        ``record_every``), else empty.
    """

    final: np.ndarray
    escape_step: np.ndarray
    mean: np.ndarray
    var: np.ndarray


class Simulator:
    """R runs of ``x ← x − η(∇L(x) + ξ)`` (or ``x ← x − η g_B(x)`` for mini-batch noise) in one
    compiled call (a loop over steps of a ``vmap`` over runs), owned by the object: compiled
    once for any number of steps, or once per number of steps when the runs' moments are
    recorded along the way.

    Args:
      potential: a `Potential` (its gradient is used unless the noise replaces it).
      noise: a `Noise` model.
      escaped: optional ``escaped(x) -> bool``: the first step at which it holds is recorded.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> sim = Simulator(quadratic([1.0]), isotropic_noise(1.0))
      >>> out = sim.run(jnp.zeros((4000, 1)), key=jax.random.key(0), learning_rate=0.1,
      ...               num_steps=500)
      >>> round(float(out.final.var()), 1)  # η σ² / (h (2 − η h)) = 0.1 / 1.9
      0.1
    """

    def __init__(self, potential: Potential, noise: Noise, *, escaped=None):
        self.potential, self.noise, self.escaped = potential, noise, escaped
        self.num_traces = 0
        self._run_jit = jax.jit(self._kernel, static_argnames=("num_steps", "record_every"))

    def _kernel(self, x0, key, lr, noise_params, steps, *, num_steps, record_every):
        self.num_traces += 1
        noise, grad = self.noise, self.potential.grad
        escaped = self.escaped
        runs = x0.shape[0]

        def one(x, draw):  # one run's step; draw: its normal block row or its key
            g = None if noise.replaces_gradient else grad(x)
            xi = noise.sample(draw, x, noise_params, g)
            return x - lr * (xi if noise.replaces_gradient else g + xi)

        def step(carry, t):
            x, first = carry
            k = jax.random.fold_in(key, t)
            if noise.needs_key:
                draws = jax.random.split(k, runs)
            else:  # one block of standard normals for all runs
                draws = jax.random.normal(k, x.shape, x.dtype)
            x = jax.vmap(one)(x, draws)
            if escaped is not None:
                first = jnp.where((first < 0) & jax.vmap(escaped)(x), t + 1, first)
            if record_every:
                return (x, first), (x.mean(0), x.var(0))
            return (x, first), None

        init = (x0, jnp.full((runs,), -1, jnp.int32))
        if not record_every:  # nothing recorded: one compiled loop for any number of steps
            x, first = lax.fori_loop(0, steps, lambda t, carry: step(carry, t)[0], init)
            empty = jnp.zeros((0, x0.shape[1]), x0.dtype)
            return x, first, empty, empty
        (x, first), records = lax.scan(step, init, jnp.arange(num_steps))
        mean, var = (r[record_every - 1 :: record_every] for r in records)
        return x, first, mean, var

    def run(
        self,
        x0,
        *,
        key: jax.Array,
        learning_rate: float,
        num_steps: int,
        record_every: int = 0,
        noise_params=None,
    ) -> SimulationResult:
        """Runs ``num_steps`` steps x ← x − η(∇L(x) + ξ) from each row of ``x0``, step t drawing
        its noise for all runs from ``fold_in(key, t)`` (a compiled loop over steps of a ``vmap``
        over runs; without records it serves any ``num_steps``).

        Args:
          x0: (R, d) starting points, one per run.
          key: PRNG key.
          learning_rate: η.
          num_steps: steps.
          record_every: record the across-run mean and variance every that many steps (0:
            never).
          noise_params: replaces the noise's arrays (e.g. another σ or temperature, shaped
            like ``noise.params``) without recompiling.

        Returns:
          `SimulationResult`.

        Raises:
          ValueError: ``x0`` not (R, d), ``num_steps < 1``, ``record_every < 0``, or
            ``noise_params`` of other shapes.
        """
        x0 = jnp.asarray(x0)
        if x0.ndim != 2 or x0.shape[1] != self.potential.dim:
            raise ValueError(
                f"x0 must have shape (runs, {self.potential.dim}), got {tuple(x0.shape)}"
            )
        if num_steps < 1 or record_every < 0:
            raise ValueError(
                f"need num_steps >= 1 and record_every >= 0, got {num_steps}, {record_every}"
            )
        final, first, mean, var = self._run_jit(
            x0,
            key,
            jnp.asarray(learning_rate, x0.dtype),
            self.noise.params if noise_params is None else _like(noise_params, self.noise.params),
            jnp.int32(num_steps),
            num_steps=num_steps if record_every else None,  # static only for the records
            record_every=record_every,
        )
        return SimulationResult(*(np.asarray(a) for a in (final, first, mean, var)))


def _like(new, old):
    """``new`` as arrays of the shapes and dtypes of ``old`` (so the compiled call is reused)."""
    out = jax.tree.map(lambda n, o: jnp.asarray(n, jnp.asarray(o).dtype), new, old)
    for n, o in zip(jax.tree.leaves(out), jax.tree.leaves(old)):
        if n.shape != jnp.shape(o):
            raise ValueError(
                f"noise_params must be shaped like the noise's: {n.shape} vs {jnp.shape(o)}"
            )
    return out


# ----------------------------------------------------------------------------- populations


class PopulationTrainer:
    """P small models trained at once: one step ``vmap``ped over the members' parameters,
    optimizer states (each member's learning rate inside it) and batches; an epoch is one
    ``lax.scan`` over its steps with the data on the device.

    The member axis is sharded over ``devices`` (default: every device of every process; a
    TPU's 8 cores train 8 groups of members at once): every call places its member-axis
    inputs with ``NamedSharding(mesh, P("members"))`` and the shared data replicated, so each
    device holds and trains P/d members, with no communication between them. A member count
    that d does not divide is padded (copies of the last member, dropped from the results),
    never refused. The numbers are those of one device. In a multi-process run (the mesh
    spans processes) every process passes the same inputs, trains its devices' members, and
    gets every member's results back (one all-gather per call).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` (mean over the batch).
      optimizer: ``optimizer(learning_rate) -> optax.GradientTransformation``, e.g.
        ``optax.sgd``; wrapped in `optax.inject_hyperparams`, so the rate is per member. Its
        ``update`` also gets ``value=`` and ``value_fn=`` (the member's mini-batch objective),
        so ``lambda learning_rate: optax.chain(optim.sam(0.05), optax.sgd(learning_rate))``
        trains a population with SAM.
      metrics_fn: ``metrics_fn(params, data) -> dict`` of scalars (for `evaluate`).
      devices: the devices to shard the members over (default: ``jax.devices()``, all
        processes' devices).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> loss = lambda w, b: jnp.mean((b["x"] @ w - b["y"]) ** 2)
      >>> trainer = PopulationTrainer(loss, optax.sgd)
      >>> params = jnp.zeros((3, 2))  # 3 members
      >>> state = trainer.init(params, learning_rates=jnp.array([0.0, 0.1, 0.2]))
      >>> batch = {"x": jnp.ones((3, 4, 2)), "y": jnp.ones((3, 4))}  # one batch per member
      >>> params, state, losses = trainer.step(params, state, batch)
      >>> [round(float(v), 4) for v in params[:, 0]]  # w − η·2(x·w − y)x = 2η
      [0.0, 0.2, 0.4]
    """

    def __init__(
        self,
        loss_fn,
        optimizer: Callable[..., optax.GradientTransformation],
        *,
        metrics_fn=None,
        devices=None,
    ):
        devices = list(jax.devices() if devices is None else devices)
        self.mesh = jax.sharding.Mesh(np.asarray(devices), ("members",))
        self.spans_processes = len({d.process_index for d in devices}) > 1
        self.loss_fn = loss_fn
        self.metrics_fn = metrics_fn
        self.tx = optax.inject_hyperparams(optimizer)(learning_rate=0.0)
        self._optimizer = optimizer
        self.num_traces = 0
        self._step_jit = jax.jit(jax.vmap(self._step))
        self._epoch_jit = jax.jit(self._epoch)
        self._metrics_jit = jax.jit(jax.vmap(self._metrics, in_axes=(0, None)))
        self._replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self._members = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("members"))
        # Padding and un-padding in one compiled call each (op by op, every leaf's
        # concatenation and slice would be a program of its own); the take also gathers a
        # mesh across processes, so that every process can read every member.
        self._pad_jit = jax.jit(_pad_members, static_argnums=1, out_shardings=self._members)
        take_to = self._replicated if self.spans_processes else None
        self._take_jit = jax.jit(_first_members, static_argnums=1, out_shardings=take_to)
        self._init_jit = jax.jit(jax.vmap(self._init_member))

    def _place(self, tree, count: int):
        """``tree``'s leaves (leading axis ``count``) padded to a multiple of the devices with
        copies of the last member, and sharded along that axis."""
        pad = -count % self.mesh.size
        if not pad:
            return jax.device_put(tree, self._members)
        mesh_devices = set(self.mesh.devices.flat)

        def on_mesh(a):  # host arrays and arrays committed elsewhere join the mesh first
            if isinstance(a, jax.Array) and (not a.committed or a.devices() <= mesh_devices):
                return a
            return jax.device_put(a, self._replicated)

        return self._pad_jit(jax.tree.map(on_mesh, tree), pad)

    def _shared(self, tree):
        """``tree`` replicated on every device of the mesh."""
        return jax.device_put(tree, self._replicated)

    def _take(self, tree, count: int):
        """The first ``count`` members of ``tree`` (the padding dropped); on a mesh across
        processes gathered first, so that every process can read every member."""
        if count % self.mesh.size == 0 and not self.spans_processes:
            return tree
        return self._take_jit(tree, count)

    @staticmethod
    def _count(params) -> int:
        return int(jax.tree.leaves(params)[0].shape[0])

    def _metrics(self, params, data):
        self.num_traces += 1
        return self.metrics_fn(params, data)

    def _step(self, params, opt_state, batch):
        self.num_traces += 1
        loss, grads = jax.value_and_grad(self.loss_fn)(params, batch)
        updates, opt_state = self.tx.update(  # value_fn: SAM's second gradient, line searches
            grads, opt_state, params, value=loss, value_fn=lambda p: self.loss_fn(p, batch)
        )
        return optax.apply_updates(params, updates), opt_state, loss

    def _epoch(self, params, opt_state, data, order):
        """``order`` (P, steps, B): each member's example indices per step into ``data``
        (shared by all members, on the device)."""

        def body(carry, idx):  # idx: (P, B)
            params, opt_state = carry
            batch = jax.vmap(lambda i: jax.tree.map(lambda a: a[i], data))(idx)
            params, opt_state, loss = jax.vmap(self._step)(params, opt_state, batch)
            return (params, opt_state), loss

        (params, opt_state), losses = lax.scan(body, (params, opt_state), jnp.swapaxes(order, 0, 1))
        return params, opt_state, losses.T  # losses (P, steps)

    def init(self, params, *, learning_rates):
        """Optimizer states of the members.

        Args:
          params: the members' parameters, every leaf with a leading axis P.
          learning_rates: (P,) member p's learning rate.

        Returns:
          The optimizer states (leading axis P), the learning rates inside
          (`learning_rates`, `set_learning_rates`).
        """
        count = self._count(params)
        lrs = jnp.asarray(learning_rates)
        return self._take(self._init_jit(*self._place((params, lrs), count)), count)

    def _init_member(self, params, learning_rate):
        state = self.tx.init(params)
        return optax.tree_utils.tree_set(state, learning_rate=learning_rate)

    @staticmethod
    def learning_rates(opt_state) -> jax.Array:
        """The members' current learning rates, (P,)."""
        return opt_state.hyperparams["learning_rate"]

    @staticmethod
    def set_learning_rates(opt_state, learning_rates):
        """The states with member p's learning rate set to ``learning_rates[p]`` (a schedule
        between calls of `epoch`: warm-up, decay), the rest of each state kept."""
        lrs = jnp.asarray(learning_rates, PopulationTrainer.learning_rates(opt_state).dtype)
        return optax.tree_utils.tree_set(opt_state, learning_rate=lrs)

    def evaluate(self, params, data) -> dict:
        """``metrics_fn(params_p, data)`` for every member p (data shared, on the device), in one
        compiled call.

        Args:
          params: the members' parameters (leading axis P).
          data: the evaluation data, shared by all members.

        Returns:
          A dict of (P,) arrays.

        Raises:
          ValueError: the trainer was built without ``metrics_fn``.
        """
        if self.metrics_fn is None:
            raise ValueError("PopulationTrainer(..., metrics_fn=...) is needed to evaluate")
        count = self._count(params)
        return self._take(self._metrics_jit(self._place(params, count), self._shared(data)), count)

    def step(self, params, opt_state, batch):
        """One step of every member on its own batch.

        Args:
          params: the members' parameters (leading axis P).
          opt_state: their optimizer states (from `init`).
          batch: every leaf with a leading axis P (one batch per member).

        Returns:
          ``(params, opt_state, losses)``, losses (P,) before the step.
        """
        count = self._count(params)
        out = self._step_jit(*self._place((params, opt_state, batch), count))
        return self._take(out, count)

    def epoch(self, params, opt_state, data, order):
        """The steps of ``order`` in one compiled call (a ``lax.scan`` over steps of a ``vmap``
        over members): member p's step s trains on ``data[order[p, s]]``.

        Args:
          params: the members' parameters (leading axis P).
          opt_state: their optimizer states.
          data: the training data, shared by all members (on the device).
          order: (P, steps, B) example indices per member and step.

        Returns:
          ``(params, opt_state, losses)``, losses (P, steps).
        """
        count = self._count(params)
        placed = self._place((params, opt_state, jnp.asarray(order)), count)
        return self._take(self._epoch_jit(*placed[:2], self._shared(data), placed[2]), count)


def _pad_members(tree, pad: int):
    """Every leaf's leading (member) axis extended by ``pad`` copies of the last member."""
    return jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)]), tree)


def _first_members(tree, count: int):
    """Every leaf's first ``count`` members."""
    return jax.tree.map(lambda a: a[:count], tree)


# -------------------------------------------------------------- the noisy quadratic model


class NoisyQuadratic(NamedTuple):
    """The noisy quadratic model of Zhang et al. (2019): L(x) = ½ Σᵢ hᵢxᵢ², SGD with batch
    size B sees the gradient plus noise of covariance diag(c)/B (an infinite stream of
    examples), ``x ← x − η(Hx + ξ)``. Every coordinate's second moment then follows
    mᵢ(t+1) = (1 − ηhᵢ)² mᵢ(t) + η²cᵢ/B, so the expected loss has the closed form

        E L(t) = ½ Σᵢ hᵢ [(1 − ηhᵢ)^(2t) (mᵢ(0) − mᵢ(∞)) + mᵢ(∞)],  mᵢ(∞) = ηcᵢ / (Bhᵢ(2 − ηhᵢ))

    (η < 2/max h). Steps to a target loss against B, with η tuned per B, trace the three
    regimes of Shallue et al. (2019) in milliseconds: the closed-form check of the critical
    batch size.

    Attributes:
      curvatures: h (d,), > 0.
      noise: c (d,), the per-example gradient variance along each axis.
      init_sq: m(0) (d,), E[xᵢ²] at the start.
    """

    curvatures: np.ndarray
    noise: np.ndarray
    init_sq: np.ndarray

    def loss(self, learning_rate: float, batch_size: float, steps) -> np.ndarray:
        """E L(t) in closed form (the class docstring's formula).

        Args:
          learning_rate: η.
          batch_size: B.
          steps: t, any shape.

        Returns:
          An array shaped like ``steps``; inf where η ≥ 2/max h (the iteration diverges).
        """
        h, c, m0 = (np.asarray(a, np.float64) for a in self)
        t = np.asarray(steps, np.float64)[..., None]
        eta = float(learning_rate)
        if not 0 < eta < 2.0 / h.max():
            return np.full(t.shape[:-1], np.inf)
        m_inf = eta * c / (batch_size * h * (2.0 - eta * h))
        m = (1.0 - eta * h) ** (2.0 * t) * (m0 - m_inf) + m_inf
        return 0.5 * (h * m).sum(-1)

    def steps_to_target(self, target: float, learning_rate: float, batch_size: float) -> float:
        """The first step t with E L(t) ≤ ``target`` (E L(t) is monotone in t), by bisection.

        Args:
          target: the loss to reach.
          learning_rate: η.
          batch_size: B.

        Returns:
          t as a float; inf if the loss never gets there (its floor lies above the target, or
          η diverges).
        """
        if self.loss(learning_rate, batch_size, 0.0) <= target:
            return 0.0
        floor = self.loss(learning_rate, batch_size, np.inf)
        if not floor < target:
            return float("inf")
        hi = 1.0
        while self.loss(learning_rate, batch_size, hi) > target:
            hi *= 2.0
        lo = hi / 2.0 if hi > 1 else 0.0
        while hi - lo > 0.5:  # integer steps: stop at a bracket of one step
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if self.loss(learning_rate, batch_size, mid) > target else (lo, mid)
        return float(np.ceil(hi))

    def best_steps(self, target: float, batch_size: float, learning_rates) -> tuple[float, float]:
        """The fewest steps to ``target`` at batch size B over ``learning_rates`` (the per-B
        tuning of Shallue et al. 2019).

        Args:
          target: the loss to reach.
          batch_size: B.
          learning_rates: the η to try.

        Returns:
          ``(steps, learning_rate)``: the fewest steps and the η that achieves them (inf and
          the first η when none reaches the target).
        """
        steps = [self.steps_to_target(target, lr, batch_size) for lr in learning_rates]
        i = int(np.argmin(steps))
        return steps[i], float(learning_rates[i])


def noisy_quadratic(dim: int = 1000, *, noise_scale: float = 1.0) -> NoisyQuadratic:
    """Zhang et al. (2019)'s NQM: hᵢ = 1/i, gradient noise c = ``noise_scale``·h (Σ ∝ H, the
    Fisher ≈ Hessian picture), started from mᵢ(0) = 1.

    Args:
      dim: d.
      noise_scale: c/h.

    Returns:
      A `NoisyQuadratic`.
    """
    h = 1.0 / np.arange(1, dim + 1, dtype=np.float64)
    return NoisyQuadratic(h, noise_scale * h, np.ones(dim))
