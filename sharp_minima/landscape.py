"""Loss landscapes: directions, 1-D/2-D slices, basin radii and volumes, interpolation.

Around a solution θ the loss is looked at along directions d: on lines θ + a·d₁ and planes
θ + a·d₁ + b·d₂ (Li et al. 2018, with filter-normalised directions so that minima of networks
with different weight scales compare), and by the radius r(φ) of the basin below a loss cutoff
along unit directions φ, whose n-th moment gives the basin volume V = ω_n E_φ[r(φ)ⁿ]
(Huang et al. 2020, Sec. 5). A `Landscape` holds the compiled kernels: every grid point of a
surface, and every direction of a volume, is evaluated with `vmap` in chunks (bounded memory),
spread over devices with `jax.shard_map`, and averaged over weighted batches with `lax.scan`.

>>> import jax, jax.numpy as jnp
>>> quad = lambda p, b: 0.5 * jnp.sum(p["w"] ** 2)  # L = ½‖w‖², cutoff c: radius √(2c)
>>> vol = basin_volume(quad, {"w": jnp.zeros(3)}, None, key=jax.random.key(0),
...                    num_directions=8, cutoff=2.0)
>>> [round(float(r), 2) for r in vol.radii[:3]]
[2.0, 2.0, 2.0]

Paths between two solutions (Keskar et al. 2017's parametric plots):

>>> a, b = {"w": jnp.zeros(2)}, {"w": jnp.ones(2)}
>>> interpolate(a, b, 0.25)["w"].tolist()
[0.25, 0.25]
>>> [round(float(v), 3) for v in interpolate(a, b, 1.0, path="curved")["w"]]
[1.0, 1.0]

Positive statistics such as BatchNorm running variances are interpolated geometrically
(``geometric=`` a regex on the leaf path), so that extrapolating beyond [0, 1] keeps them
positive:

>>> v = interpolate({"var": jnp.array([1.0])}, {"var": jnp.array([4.0])}, 2.0, geometric="var$")
>>> v["var"].tolist()  # 1^(1-2) * 4^2; a linear path would give 7
[16.0]
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sharp_minima import objective as obj_lib
from sharp_minima import tree_util as tu

PATHS = ("linear", "curved")
# BatchNorm running variances in Flax's variables ({"batch_stats": {...: {"mean", "var"}}}).
BATCHNORM_VARIANCES = r"(^|/)batch_stats/.*var$"


def path_coefficients(alpha: float, path: str = "linear") -> tuple[float, float]:
    """``(c_a, c_b)`` of the point ``c_a·a + c_b·b`` at ``alpha`` on ``path``.

    ``"linear"``: (1 − α, α) (Keskar et al. 2017, Fig. 3; Goodfellow et al. 2015), defined
    for any α (the paper plots α ∈ [−1, 2]). ``"curved"``: (cos(απ/2), sin(απ/2)) (their
    Fig. 13), which also passes through a at α = 0 and b at α = 1.

    Args:
      alpha: position on the path.
      path: ``"linear"`` or ``"curved"``.

    Returns:
      ``(c_a, c_b)`` floats.

    Raises:
      ValueError: unknown ``path``.
    """
    if path == "linear":
        return 1.0 - alpha, alpha
    if path == "curved":
        return float(np.cos(alpha * np.pi / 2)), float(np.sin(alpha * np.pi / 2))
    raise ValueError(f"path must be one of {PATHS}, got {path!r}")


def interpolate(a, b, alpha: float, *, path: str = "linear", geometric: str | None = None):
    """The point at ``alpha`` on the path from ``a`` (α = 0) to ``b`` (α = 1).

    Args:
      a: a pytree (e.g. Flax ``variables``).
      b: a pytree of the same structure.
      alpha: position on the path.
      path: ``"linear"`` or ``"curved"`` (`path_coefficients`).
      geometric: optional regex on leaf paths (e.g. `BATCHNORM_VARIANCES`): those (positive)
        leaves are interpolated in log space, ``exp(c_a log a + c_b log b)``.

    Returns:
      A pytree like ``a``.

    Raises:
      ValueError: unknown ``path``.
    """
    ca, cb = path_coefficients(alpha, path)
    pattern = re.compile(geometric) if geometric else None

    def point(p, x, y):
        if pattern is not None and pattern.search(tu.path_str(p)):
            return jnp.exp(ca * jnp.log(x) + cb * jnp.log(y)).astype(x.dtype)
        return (ca * x + cb * y).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(point, a, b)


def interpolation_curve(
    metrics_fn: Callable[[Any], dict[str, float]],
    a,
    b,
    alphas: Sequence[float],
    *,
    path: str = "linear",
    geometric: str | None = None,
) -> dict[str, np.ndarray]:
    """``metrics_fn`` (e.g. train/test loss and accuracy) at each α of the path from a to b:
    Keskar et al. (2017)'s parametric plots (Fig. 3).

    Args:
      metrics_fn: ``metrics_fn(params) -> {name: float}``.
      a: the path's start (α = 0).
      b: its end (α = 1).
      alphas: the positions.
      path: ``"linear"`` or ``"curved"`` (`path_coefficients`).
      geometric: leaves interpolated in log space (see `interpolate`).

    Returns:
      ``{"alpha": (m,), name: (m,) ...}`` numpy arrays.
    """
    rows = [
        metrics_fn(interpolate(a, b, float(al), path=path, geometric=geometric)) for al in alphas
    ]
    out = {"alpha": np.asarray(alphas, np.float64)}
    for k in rows[0]:
        out[k] = np.asarray([r[k] for r in rows], np.float64)
    return out


# ---------------------------------------------------------------------------------- directions

ONE_D = ("zero", "copy", "normalize")
DIRECTIONS = ("unit", "filter")


def gaussian_direction(key: jax.Array, params, *, wrt=None, unit: bool = True):
    """A Gaussian direction over the ``wrt`` leaves (zeros elsewhere).

    Args:
      key: PRNG key.
      params: the weights (any pytree).
      wrt: which leaves get a direction.
      unit: rescale to norm 1 (else i.i.d. N(0, 1) entries).

    Returns:
      A pytree like ``params``.
    """
    selected, merge = tu.select(params, wrt)
    return merge(_gaussian(key, selected, unit), tu.zeros_like(params))


@functools.partial(jax.jit, static_argnames="unit")
def _gaussian(key, selected, unit):
    d = tu.random_like(key, selected)
    return tu.scale(1.0 / tu.norm(d), d) if unit else d


def filter_normalized_direction(key: jax.Array, params, *, wrt=None, one_d: str = "zero"):
    """A random direction with each filter rescaled to the norm of the weight's filter.

    Li et al. (2018), "Visualizing the loss landscape of neural nets", Sec. 4: a filter is one
    output unit — the last axis of a Flax kernel (``(in, out)`` for Dense, ``(h, w, in, out)``
    for Conv) — so d[..., j] ← d[..., j] · ‖θ[..., j]‖ / ‖d[..., j]‖. Plots along such
    directions are unchanged when a layer's weights are rescaled (Dinh et al. 2017's
    objection to sharpness), which BatchNorm makes free.

    Args:
      key: PRNG key; the same key gives the same direction.
      params: the weights θ (any pytree).
      wrt: which leaves get a direction (see `sharp_minima.tree_util.select`); others are 0.
      one_d: leaves with fewer than 2 axes (biases, BatchNorm scales and offsets): ``"zero"``
        (Li et al.'s default), ``"copy"`` (d = θ) or ``"normalize"`` (the leaf as one
        filter).

    Returns:
      A pytree like ``params``.

    Raises:
      ValueError: unknown ``one_d``.
    """
    if one_d not in ONE_D:
        raise ValueError(f"one_d must be one of {ONE_D}, got {one_d!r}")
    selected, merge = tu.select(params, wrt)
    return merge(_filter_normalized(key, selected, one_d), tu.zeros_like(params))


@functools.partial(jax.jit, static_argnames="one_d")
def _filter_normalized(key, selected, one_d):
    """The directions of `filter_normalized_direction` for the selected leaves, in one
    compiled call (leaf by leaf, eager dispatch compiles each small op apart)."""
    keys = jax.random.split(key, len(selected))
    out = []
    for k, w in zip(keys, selected):
        d = jax.random.normal(k, jnp.shape(w), jnp.result_type(w))
        if jnp.ndim(w) >= 2:
            axes = tuple(range(jnp.ndim(w) - 1))
            wn = jnp.sqrt(jnp.sum(jnp.square(w), axis=axes, keepdims=True))
            dn = jnp.sqrt(jnp.sum(jnp.square(d), axis=axes, keepdims=True))
            d = d * (wn / jnp.maximum(dn, jnp.finfo(d.dtype).tiny))
        elif one_d == "zero":
            d = jnp.zeros_like(w)
        elif one_d == "copy":
            d = jnp.asarray(w)
        else:
            d = d * (jnp.linalg.norm(w) / jnp.maximum(jnp.linalg.norm(d), jnp.finfo(d.dtype).tiny))
        out.append(d)
    return out


def direction(key: jax.Array, params, kind: str = "filter", *, wrt=None, one_d: str = "zero"):
    """A random direction of ``kind``.

    Args:
      key: PRNG key.
      params: the weights θ (any pytree).
      kind: ``"filter"`` (`filter_normalized_direction`) or ``"unit"``
        (`gaussian_direction` of norm 1).
      wrt: which leaves get a direction; others are 0.
      one_d: for ``"filter"``: what leaves with fewer than 2 axes get.

    Returns:
      A pytree like ``params``.

    Raises:
      ValueError: unknown ``kind`` or ``one_d``.
    """
    if kind == "filter":
        return filter_normalized_direction(key, params, wrt=wrt, one_d=one_d)
    if kind == "unit":
        return gaussian_direction(key, params, wrt=wrt)
    raise ValueError(f"direction kind must be one of {DIRECTIONS}, got {kind!r}")


def orthogonal_pair(key: jax.Array, params, kind: str = "filter", *, wrt=None, one_d="zero"):
    """Two random directions for a 2-D plane, the second orthogonalised against the first.

    d₂ ← d₂ − (⟨d₁, d₂⟩/‖d₁‖²)·d₁, then rescaled to its former norm (random directions in
    high dimension are nearly orthogonal already, so filter norms barely change).

    Args:
      key: PRNG key.
      params: the weights θ.
      kind: ``"filter"`` or ``"unit"`` (see `direction`).
      wrt: which leaves get a direction.
      one_d: for ``"filter"``: what 1-D leaves get.

    Returns:
      ``(d1, d2)``, pytrees like ``params``.
    """
    k1, k2 = jax.random.split(key)
    d1 = direction(k1, params, kind, wrt=wrt, one_d=one_d)
    d2 = direction(k2, params, kind, wrt=wrt, one_d=one_d)
    return d1, _orthogonalize(d1, d2)


@jax.jit
def _orthogonalize(d1, d2):
    before = tu.norm(d2)
    d2 = tu.axpy(-tu.dot(d1, d2) / tu.dot(d1, d1), d1, d2)
    return tu.scale(before / tu.norm(d2), d2)


def eigen_directions(loss_fn, params, batches, *, key, k: int = 2, wrt=None, weights=None):
    """The top-``k`` Hessian eigenvectors at ``params`` as a list of directions (unit norm).

    Planes spanned by the two sharpest directions show the largest curvature a 2-D slice can
    show (`sharp_minima.hessian.eigenpairs`, Lanczos).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: θ.
      batches: batch pytree with a leading axis over batches, or None.
      key: Lanczos start key.
      k: how many directions.
      wrt: the parameters the Hessian is taken in.
      weights: optional per-batch weights.

    Returns:
      A list of ``k`` pytrees like ``params``, by decreasing eigenvalue.
    """
    from sharp_minima import hessian

    res = hessian.eigenpairs(loss_fn, params, batches, k=k, key=key, wrt=wrt, weights=weights)
    return [jax.tree.map(lambda v, i=i: v[i], res.vectors) for i in range(k)]


class Projection(NamedTuple):
    """A trajectory projected on its two principal directions (`trajectory_pca`).

    Attributes:
      directions: the principal directions (pytrees like params, unit norm, orthogonal).
      coords: (T, num_components) coordinates of every iterate relative to the centre.
      explained: fraction of the trajectory's variance along each direction.
    """

    directions: list
    coords: np.ndarray
    explained: np.ndarray


def trajectory_pca(iterates: Sequence[Any], *, center=None, wrt=None, num_components: int = 2):
    """PCA of an optimisation trajectory (Li et al. 2018, Sec. 7): the directions that explain
    most of θ_t − θ_center (default centre: the last iterate), and each iterate's
    coordinates.

    Iterates are e.g. the parameters a `sharp_minima.train.Hook` saved every few epochs.
    Computed in float64 on the host (T is small).

    Args:
      iterates: T pytrees of one structure.
      center: the origin of the projection (default: the last iterate).
      wrt: the parameters taken into account.
      num_components: how many principal directions.

    Returns:
      `Projection`: the directions (pytrees like the iterates), each iterate's
      coordinates (T, num_components) and the explained variance ratios.

    Raises:
      ValueError: fewer iterates than ``num_components + 1``.
    """
    if len(iterates) < num_components + 1:
        raise ValueError(
            f"trajectory_pca needs at least {num_components + 1} iterates, got {len(iterates)}"
        )
    template = iterates[-1] if center is None else center

    def flat(tree):
        return np.asarray(tu.ravel(tu.select(tree, wrt)[0])[0], np.float64)

    m = np.stack([flat(t) for t in iterates]) - flat(template)
    _, sv, vt = np.linalg.svd(m, full_matrices=False)
    vt = vt[:num_components]
    selected, merge = tu.select(template, wrt)
    unravel = tu.ravel(selected)[1]
    dirs = [
        merge(unravel(jnp.asarray(v, jnp.result_type(*selected))), tu.zeros_like(template))
        for v in vt
    ]
    total = float(np.sum(sv**2)) or 1.0
    return Projection(dirs, m @ vt.T, sv[:num_components] ** 2 / total)


# -------------------------------------------------------------------------- basin volume math


class BasinVolume(NamedTuple):
    """The basin below a loss threshold around θ (`Landscape.basin_volume`).

    log V = log ω_n + log E_φ[r(φ)ⁿ] (Huang et al. 2020, Sec. 5), ω_n = π^{n/2}/Γ(1 + n/2).

    With n in the thousands the largest radius decides E[rⁿ]: the effective number of
    directions 1/Σw² (w ∝ rⁿ) is about 1, and no error estimate means anything (the delta
    method saturates at exactly 1; the bootstrap over directions is bimodal, on whether a
    resample holds the largest radius). Below `MIN_EFFECTIVE_DIRECTIONS` the error is NaN and
    the volume prints as "undetermined (one direction dominates)". The estimator is also
    biased low: E[rⁿ] lives in the tail of directions longer than any sampled, so log V is,
    in expectation, below the true log-volume (Jensen's inequality adds to it).

    Attributes:
      log_volume: natural log of V.
      stderr: standard error of ``log_volume`` (delta method or bootstrap); NaN when
        ``effective_samples`` < `MIN_EFFECTIVE_DIRECTIONS` (undetermined).
      log_unit_ball: log ω_n.
      log_mean_rn: log E[rⁿ] (logsumexp of n·log r minus log N).
      effective_samples: 1/Σw², w ∝ rⁿ: how many directions carry the estimate (with n in the
        thousands, usually ≈ 1: the largest radius decides V).
      radii: (N,) r(φ) per direction.
      num_evals: (N,) loss evaluations each radius took.
      bounded: (N,) False where the loss stayed below the threshold up to ``max_radius``
        (then r = max_radius, a lower bound).
      threshold: the loss level that bounds the basin.
      loss0: the loss at θ.
      dim: n, the number of parameters.
    """

    log_volume: float
    stderr: float
    log_unit_ball: float
    log_mean_rn: float
    effective_samples: float
    radii: np.ndarray
    num_evals: np.ndarray
    bounded: np.ndarray
    threshold: float
    loss0: float
    dim: int

    @property
    def determined(self) -> bool:
        """Whether enough directions carry the estimate for an error bar."""
        return bool(self.effective_samples >= MIN_EFFECTIVE_DIRECTIONS)

    def __str__(self) -> str:
        return format_log_volume(self.log_volume, self.stderr, self.effective_samples, self.dim)

    def __repr__(self) -> str:
        return f"BasinVolume({self})"


# Fewer effective directions than this: the log-volume's error is undetermined.
MIN_EFFECTIVE_DIRECTIONS = 10.0
UNDETERMINED = "undetermined (one direction dominates)"


def format_log_volume(log_volume, stderr, effective_samples, dim=None, spec=".1f") -> str:
    """``"log V = −123.4 ± 0.5 (42 effective directions)"``, or with too few effective
    directions ``"log V = −16759.0, error undetermined (one direction dominates: 1.00
    effective directions)"``.

    Args:
      log_volume: log V.
      stderr: its error (NaN: undetermined).
      effective_samples: 1/Σw².
      dim: n, named when given.
      spec: the numbers' format.

    Returns:
      The text.
    """
    where = f" in {dim:,} dimensions" if dim else ""
    if effective_samples < MIN_EFFECTIVE_DIRECTIONS or not np.isfinite(stderr):
        return (
            f"log V = {log_volume:{spec}}{where}, error undetermined (one direction "
            f"dominates: {effective_samples:.2f} effective directions)"
        )
    return (
        f"log V = {log_volume:{spec}} ± {stderr:{spec}}{where} "
        f"({effective_samples:.0f} effective directions)"
    )


def log_unit_ball(n: int) -> float:
    """log ω_n, the log-volume of the unit n-ball: (n/2)·log π − log Γ(1 + n/2).

    Args:
      n: the dimension.

    Returns:
      log ω_n as a float.
    """
    return 0.5 * n * math.log(math.pi) - math.lgamma(1.0 + 0.5 * n)


def log_volume(
    radii, n: int, *, error: str = "delta", key: jax.Array | None = None, num_bootstrap=1000
):
    """The log-volume of a star-shaped region from its radii along uniform directions, in
    float64 log space (rⁿ over- or underflows for any realistic n):
    log V = log ω_n + log E[rⁿ] (Huang et al. 2020, Sec. 5).

    Args:
      radii: r(φ) per direction, shape (N,).
      n: the dimension.
      error: ``"delta"``: se(log m̂) = √((N·Σw² − 1)/(N − 1)), w_i = r_iⁿ/Σ r_jⁿ (the
        delta method for the log of a sample mean); ``"bootstrap"``: the std of log E[rⁿ]
        over ``num_bootstrap`` resamples of the directions (needs ``key``).
      key: the bootstrap's key.
      num_bootstrap: resamples for ``"bootstrap"``.

    Returns:
      ``(log V, stderr, log E[rⁿ], effective samples 1/Σw²)``; the stderr is NaN when the
      effective samples are fewer than `MIN_EFFECTIVE_DIRECTIONS` (undetermined).

    Raises:
      ValueError: unknown ``error``, or no ``key`` for the bootstrap.
    """
    r = np.asarray(radii, np.float64)
    big_n = r.size
    with np.errstate(divide="ignore"):
        a = n * np.log(r)
    top = np.max(a)
    if not np.isfinite(top):
        return -np.inf, np.nan, -np.inf, 0.0
    w = np.exp(a - top)
    log_mean = top + math.log(w.sum()) - math.log(big_n)
    w = w / w.sum()
    sum_w2 = float(np.sum(w**2))
    if error == "delta":
        se = math.sqrt(max(big_n * sum_w2 - 1.0, 0.0) / max(big_n - 1, 1))
    elif error == "bootstrap":
        if key is None:
            raise ValueError('error="bootstrap" needs a key')
        idx = np.asarray(jax.random.randint(key, (num_bootstrap, big_n), 0, big_n))
        s = a[idx]
        m = s.max(1, keepdims=True)
        boot = m[:, 0] + np.log(np.exp(s - m).sum(1)) - math.log(big_n)
        se = float(np.std(boot, ddof=1))
    else:
        raise ValueError(f'error must be "delta" or "bootstrap", got {error!r}')
    if 1.0 / sum_w2 < MIN_EFFECTIVE_DIRECTIONS:
        se = float("nan")  # no error estimate means anything: undetermined
    return log_unit_ball(n) + log_mean, se, log_mean, 1.0 / sum_w2


# ---------------------------------------------------------------------------- the evaluator


class Landscape:
    """Slices and basins of one loss, with the compiled kernels they need.

    Args:
      loss_fn: ``loss_fn(params, batch)``; a scalar, or a dict of scalars (e.g. loss and
        accuracy) for slices. Basin radii need a scalar (or name the entry with ``metric``).
      wrt: which parameter leaves move (see `sharp_minima.objective.Objective`).
      chunk_size: points (or directions) evaluated at once per device with `vmap`: the memory
        of ``chunk_size`` forward passes on one batch.
      devices: devices the points and directions are spread over (default: all local
        devices); the answers do not depend on how many.
      metric: for a dict-valued ``loss_fn``, the entry basin radii bound.

    Reused with other parameters, batches, directions or grids of the same shapes, a
    `Landscape` does not recompile.

    Raises:
      ValueError: ``loss_fn`` not callable or ``chunk_size < 1``.
    """

    def __init__(self, loss_fn, *, wrt=None, chunk_size: int = 64, devices=None, metric=None):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.objective = obj_lib.Objective(loss_fn, wrt=wrt)
        self.metric = metric
        self.chunk_size = int(chunk_size)
        self.mesh = Mesh(
            np.array(list(jax.local_devices() if devices is None else devices)), ("i",)
        )
        self._points = self._sharded(self._points_chunk, num_const=4)
        self._kernels = {}  # (solver, direction kind) -> compiled kernel, built on first use
        self._loss0 = jax.jit(self._loss_at_params)

    # -- plumbing -------------------------------------------------------------------------

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    def _sharded(self, chunk_fn, num_const: int):
        """jit(shard_map(lax.map over chunks of the per-device items)): the last argument has
        shape (num_chunks, items, ...), its items axis split over the devices; the first
        ``num_const`` arguments are replicated."""

        def per_device(*args):
            consts, items = args[:num_const], args[num_const]
            return lax.map(lambda chunk: chunk_fn(*consts, chunk), items)

        specs = (P(),) * num_const + (P(None, "i"),)
        # check_vma=False: the solvers' loop carries start replicated and become per-device.
        mapped = jax.shard_map(
            per_device, mesh=self.mesh, in_specs=specs, out_specs=P(None, "i"), check_vma=False
        )
        return jax.jit(mapped)

    def _replicate(self, tree):
        return jax.device_put(tree, NamedSharding(self.mesh, P()))

    def _pad(self, items: np.ndarray) -> tuple[jax.Array, int]:
        """(num_chunks, chunk_size·devices, ...) items, padded with copies of the first."""
        width = self.chunk_size * self.num_devices
        count = len(items)
        total = -(-count // width) * width
        padded = np.concatenate([items, np.repeat(items[:1], total - count, 0)])
        arr = padded.reshape((total // width, width) + items.shape[1:])
        return jax.device_put(arr, NamedSharding(self.mesh, P(None, "i"))), count

    def _prepare(self, params, batches, weights, scalar: bool):
        if scalar and self.metric is None:
            one = None if batches is None else jax.tree.map(lambda x: x[0], batches)
            obj_lib.check_scalar_loss(self.objective.loss_fn, params, one)
        selected, _ = tu.select(params, self.objective.wrt)
        dtype = jnp.result_type(*selected)
        w = obj_lib.normalized_weights(batches, weights, dtype)
        return self._replicate((params, batches, w))

    def _mean(self, params, batches, weights, scalar: bool):
        """``(x0, F)``: F(x) the weighted mean over batches at flat x (a dict, or the scalar
        the basin radii bound)."""
        x0, f = self.objective.flat_loss(params)

        def mean(x):
            out = obj_lib.batch_mean(lambda b: f(x, b), batches, weights)
            if scalar and self.metric is not None:
                out = out[self.metric]
            return out

        return x0, mean

    # -- slices ---------------------------------------------------------------------------

    def _points_chunk(self, params, batches, weights, basis, coeffs):
        x0, mean = self._mean(params, batches, weights, scalar=False)
        return jax.vmap(lambda c: mean(x0 + c.astype(x0.dtype) @ basis))(coeffs)

    def slice(
        self, params, batches, directions: Sequence[Any], grid: Sequence[Any], *, weights=None
    ):
        """The loss (and any other outputs of ``loss_fn``) on a grid of the plane (or line)
        θ + Σ_i a_i·d_i.

        Args:
          params: θ.
          batches: batch pytree with a leading axis over batches, or None.
          directions: 1 or 2 pytrees like params (e.g. `orthogonal_pair`).
          grid: one 1-D array of coefficients per direction.
          weights: per-batch weights (e.g. batch sizes, for a ragged last batch).

        Returns:
          ``{name: array of shape (len(grid[0]), len(grid[1]), ...)}`` (``"loss"`` for a
          scalar ``loss_fn``); entry ``[i, j]`` is at a = grid[0][i], b = grid[1][j].

        Raises:
          ValueError: directions and grid of different lengths, or a direction not like params.
        """
        if not 1 <= len(directions) == len(grid):
            raise ValueError(
                f"need one grid axis per direction, got {len(directions)} directions and "
                f"{len(grid)} grid axes"
            )
        for i, d in enumerate(directions):
            obj_lib.check_like(f"directions[{i}]", d, params)
        axes = [np.asarray(g, np.float64).reshape(-1) for g in grid]
        coords = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(axes))
        params, batches, w = self._prepare(params, batches, weights, scalar=False)
        basis = jnp.stack([self.objective.flatten(d) for d in directions])
        items, count = self._pad(coords.astype(np.float32))
        out = self._points(params, batches, w, self._replicate(basis), items)
        shape = tuple(len(a) for a in axes)
        out = jax.tree.map(lambda v: np.asarray(v).reshape(-1)[:count].reshape(shape), out)
        return out if isinstance(out, dict) else {"loss": out}

    # -- basin radii ----------------------------------------------------------------------

    def _kernel(self, name: str, kind: str):
        if (name, kind) not in self._kernels:
            solver = {"radii": self._radii_chunk, "grid": self._grid_chunk}[name]
            self._kernels[name, kind] = self._sharded(lambda *a: solver(kind, *a), num_const=5)
        return self._kernels[name, kind]

    def _direction(self, params, key_data, kind, index):
        key = jax.random.fold_in(jax.random.wrap_key_data(key_data), index)
        d = self.objective.flatten(direction(key, params, kind, wrt=self.objective.wrt))
        return d / jnp.linalg.norm(d) if kind == "unit" else d

    def _radii_chunk(self, kind, params, batches, weights, key_data, settings, indices):
        x0, mean = self._mean(params, batches, weights, scalar=True)
        max_evals = settings[4]
        dt = x0.dtype
        threshold, r0, rtol, max_radius = (jnp.asarray(v, dt) for v in settings[:4])

        def solve(index):
            d = self._direction(params, key_data, kind, index)

            def probe(lo, hi):
                grow = jnp.where(lo > 0, 2.0 * lo, r0)
                return jnp.where(jnp.isinf(hi), grow, jnp.where(lo > 0, 0.5 * (lo + hi), 0.5 * hi))

            def unfinished(state):
                lo, hi, n = state
                converged = (lo > 0) & jnp.isfinite(hi) & (hi - lo <= rtol * hi)
                return ~(converged | (lo >= max_radius) | (n >= max_evals))

            def body(state):
                lo, hi, n = state
                r = probe(lo, hi)
                below = mean(x0 + r * d) <= threshold  # NaN counts as above
                return jnp.where(below, r, lo), jnp.where(below, hi, r), n + 1

            start = (jnp.zeros((), dt), jnp.full((), jnp.inf, dt), jnp.zeros((), jnp.int32))
            lo, hi, n = lax.while_loop(unfinished, body, start)
            bounded = jnp.isfinite(hi)
            return jnp.where(bounded, 0.5 * (lo + hi), lo), n, bounded

        return jax.vmap(solve)(indices)

    def _grid_chunk(self, kind, params, batches, weights, key_data, settings, indices):
        x0, mean = self._mean(params, batches, weights, scalar=True)
        threshold, grid = settings

        def solve(index):
            d = self._direction(params, key_data, kind, index)
            grid_ = grid.astype(x0.dtype)
            losses = lax.map(lambda r: mean(x0 + r * d), grid_)
            above = ~(losses <= threshold)
            first = jnp.argmax(above)
            return jnp.where(jnp.any(above), grid_[first], grid_[-1]), jnp.any(above)

        return jax.vmap(solve)(indices)

    def _loss_at_params(self, params, batches, weights):
        x0, mean = self._mean(params, batches, weights, scalar=True)
        return mean(x0)

    def _threshold(self, params, batches, weights, cutoff, mode):
        loss0 = float(self._loss0(params, batches, weights))
        if mode == "absolute":
            threshold = float(cutoff)
        elif mode == "increase":
            threshold = loss0 + float(cutoff)
        else:
            raise ValueError(f'mode must be "absolute" or "increase", got {mode!r}')
        if not loss0 < threshold:
            raise ValueError(
                f"the loss at params ({loss0:.4g}) is not below the cutoff ({threshold:.4g}): "
                "there is no basin to measure; raise the cutoff or use mode='increase'"
            )
        return loss0, threshold

    def radii(
        self,
        params,
        batches,
        *,
        key: jax.Array,
        num_directions: int,
        cutoff: float,
        mode: str = "absolute",
        directions: str = "unit",
        rtol: float = 1e-3,
        initial_radius: float = 1.0,
        max_radius: float = 1e6,
        max_evals: int = 100,
        weights=None,
    ):
        """r(φ) for ``num_directions`` random directions: where the loss first crosses the
        threshold, by bracketing (doubling from ``initial_radius``, or halving when already
        above) then bisection until (hi − lo) ≤ rtol·hi (Huang et al. 2020, Sec. 5).

        Direction i comes from ``fold_in(key, i)``, so the radii do not depend on the number of
        devices or the chunk size.

        Args:
          params: θ (any pytree).
          batches: batch pytree with a leading axis over batches, or None.
          key: key of the directions.
          num_directions: how many directions.
          cutoff: the threshold: the loss level itself (``mode="absolute"``, the paper's 0.1 on
            the training loss) or the rise above the loss at θ (``mode="increase"``).
          mode: ``"absolute"`` or ``"increase"``.
          directions: ``"unit"`` (uniform on the sphere) or ``"filter"`` (filter-normalised).
          rtol: relative width of the final bracket.
          initial_radius: first radius tried.
          max_radius: radii stop here (``bounded`` False: a lower bound).
          max_evals: loss evaluations per direction at most.
          weights: optional per-batch weights.

        Returns:
          ``(radii, num_evals, bounded, loss0, threshold)`` as numpy arrays and floats (see
          `BasinVolume`).

        Raises:
          ValueError: bad arguments, or the loss at params not below the threshold.
        """
        if num_directions < 1 or not 0 < rtol < 1 or initial_radius <= 0:
            raise ValueError(
                "need num_directions >= 1, 0 < rtol < 1 and initial_radius > 0; got "
                f"{num_directions}, {rtol}, {initial_radius}"
            )
        kernel = self._kernel("radii", _check_kind(directions))
        params, batches, w = self._prepare(params, batches, weights, scalar=True)
        loss0, threshold = self._threshold(params, batches, w, cutoff, mode)
        settings = (threshold, initial_radius, rtol, max_radius)
        settings = self._replicate(tuple(np.float64(v) for v in settings) + (np.int32(max_evals),))
        r, n, ok = self._run_directions(kernel, params, batches, w, key, settings, num_directions)
        return r, n, ok, loss0, threshold

    def grid_radii(
        self,
        params,
        batches,
        *,
        key: jax.Array,
        num_directions: int,
        cutoff: float = 1.0,
        max_radius: float = 1.0,
        num_points: int = 100,
        power: float = 5.0,
        directions: str = "filter",
        weights=None,
    ):
        """The gen-viz radius (Huang et al.'s code), for comparison with theirs: the first point
        of the grid ``max_radius·(i/num_points)^power`` (dense near θ) where the loss exceeds
        ``cutoff`` (cross-entropy 1 there), along filter-normalised directions by default.
        Radii are grid values, so their precision is the grid spacing there (`radii` bisects
        instead).

        Args:
          params: θ (any pytree).
          batches: batch pytree with a leading axis over batches, or None.
          key: key of the directions.
          num_directions: how many directions.
          cutoff: the loss level.
          max_radius: the grid's last point.
          num_points: grid points.
          power: the grid's exponent.
          directions: ``"filter"`` or ``"unit"``.
          weights: optional per-batch weights.

        Returns:
          ``(radii, crossed)``: numpy arrays (N,); ``crossed`` False where the loss stayed
          below ``cutoff`` on the whole grid.
        """
        kernel = self._kernel("grid", _check_kind(directions))
        grid = max_radius * (np.arange(1, num_points + 1) / num_points) ** power
        params, batches, w = self._prepare(params, batches, weights, scalar=True)
        self._threshold(params, batches, w, cutoff, "absolute")
        settings = self._replicate((np.float64(cutoff), grid))
        return self._run_directions(kernel, params, batches, w, key, settings, num_directions)

    def _run_directions(self, kernel, params, batches, w, key, settings, num_directions):
        items, count = self._pad(np.arange(num_directions, dtype=np.int32))
        key_data = self._replicate(jax.random.key_data(key))
        out = kernel(params, batches, w, key_data, settings, items)
        return tuple(np.asarray(o).reshape(-1)[:count] for o in out)

    def basin_volume(
        self,
        params,
        batches,
        *,
        key: jax.Array,
        num_directions: int = 3000,
        cutoff: float = 0.1,
        mode: str = "absolute",
        error: str = "delta",
        **radius_options,
    ) -> BasinVolume:
        """The log-volume of the basin below ``cutoff`` around θ (Huang et al. 2020, Sec. 5).

        V = ω_n E_φ[r(φ)ⁿ] over ``num_directions`` uniform unit directions φ in the n ``wrt``
        parameters (`radii`), computed in log space (`log_volume`); the paper uses 3000
        directions and an absolute cutoff of 0.1 on the training loss.

        Args:
          params: θ (any pytree).
          batches: batch pytree with a leading axis over batches, or None.
          key: key of the directions.
          num_directions: how many directions.
          cutoff: the threshold (see `radii`).
          mode: ``"absolute"`` or ``"increase"`` (the rise above the loss at θ).
          error: ``"delta"`` or ``"bootstrap"`` standard error (`log_volume`).
          **radius_options: passed to `radii` (``rtol``, ``initial_radius``, ``max_radius``,
            ``max_evals``, ``weights``).

        Returns:
          `BasinVolume`.

        Raises:
          ValueError: bad arguments, or the loss at params not below the threshold.
        """
        kd, ke = jax.random.split(key)
        radii, evals, bounded, loss0, threshold = self.radii(
            params,
            batches,
            key=kd,
            num_directions=num_directions,
            cutoff=cutoff,
            mode=mode,
            directions="unit",
            **radius_options,
        )
        n = int(sum(np.prod(jnp.shape(x)) for x in tu.select(params, self.objective.wrt)[0]))
        logv, se, log_mean, ess = log_volume(radii, n, error=error, key=ke)
        return BasinVolume(
            float(logv),
            float(se),
            log_unit_ball(n),
            float(log_mean),
            float(ess),
            radii,
            evals,
            bounded,
            threshold,
            loss0,
            n,
        )


def _check_kind(kind: str) -> int:
    if kind not in DIRECTIONS:
        raise ValueError(f"directions must be one of {DIRECTIONS}, got {kind!r}")
    return kind


# ------------------------------------------------------------------------- one-call helpers


def slice_1d(loss_fn, params, batches, direction_, grid, *, wrt=None, weights=None, **kw):
    """`Landscape.slice` along one direction (a fresh `Landscape`: compiles once per call).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` or a dict of scalars.
      params: θ.
      batches: batch pytree with a leading axis over batches, or None.
      direction_: a pytree like params.
      grid: 1-D coefficients a (points θ + a·d).
      wrt: the parameters the direction moves.
      weights: optional per-batch weights.
      **kw: passed to `Landscape` (``chunk_size``, ``devices``).

    Returns:
      ``{name: (len(grid),) array}``.
    """
    return Landscape(loss_fn, wrt=wrt, **kw).slice(
        params, batches, [direction_], [grid], weights=weights
    )


def surface_2d(
    loss_fn, params, batches, directions, grid_x, grid_y, *, wrt=None, weights=None, **kw
):
    """`Landscape.slice` on the plane of two directions (Li et al. 2018's surface plots).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` or a dict of scalars.
      params: θ.
      batches: batch pytree with a leading axis over batches, or None.
      directions: two pytrees like params (e.g. `orthogonal_pair`).
      grid_x: coefficients along the first.
      grid_y: coefficients along the second.
      wrt: the parameters the directions move.
      weights: optional per-batch weights.
      **kw: passed to `Landscape` (``chunk_size``, ``devices``).

    Returns:
      ``{name: (len(grid_x), len(grid_y)) array}``.
    """
    return Landscape(loss_fn, wrt=wrt, **kw).slice(
        params, batches, list(directions), [grid_x, grid_y], weights=weights
    )


def basin_volume(
    loss_fn,
    params,
    batch,
    *,
    key,
    num_directions: int = 3000,
    cutoff: float = 0.1,
    wrt=None,
    chunk_size: int = 64,
    devices=None,
    **kw,
) -> BasinVolume:
    """`Landscape.basin_volume` with a fresh `Landscape` (hold one to measure many minima
    without recompiling).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` (or a dict with ``"loss"``).
      params: θ.
      batch: batch pytree with a leading axis over batches, or None.
      key: key of the directions.
      num_directions: how many directions (the paper: 3000).
      cutoff: the threshold (the paper: 0.1 on the training loss).
      wrt: the parameters the directions move (see `sharp_minima.tree_util.select`).
      chunk_size: directions evaluated at once with ``vmap``.
      devices: devices to spread them over (default: all local devices).
      **kw: passed to `Landscape.basin_volume` (``mode``, ``error``, radius options).

    Returns:
      `BasinVolume`.
    """
    land = Landscape(loss_fn, wrt=wrt, chunk_size=chunk_size, devices=devices)
    return land.basin_volume(
        params, batch, key=key, num_directions=num_directions, cutoff=cutoff, **kw
    )
