"""Data sets that need no download: MNIST-1D and 2-D synthetic problems."""

from __future__ import annotations

import numpy as np

_MNIST1D: dict = {}  # (seed, num_samples) -> the generated arrays, for this process


def mnist1d(seed: int = 0, num_samples: int = 5000):
    """MNIST-1D (Greydanus 2020), generated procedurally by the `mnist1d` package.

    Generating 5000 examples takes seconds, so the arrays are kept for the process and on disk
    (``$XDG_CACHE_HOME/sharp_minima`` or ``~/.cache/sharp_minima``, keyed by the package
    version, seed and size; skipped when the folder is not writable). The arrays depend on
    nothing else.

    Returns ``{"train": (x, y), "test": (x, y)}`` with x of shape (n, 40, 1).
    """
    key = (seed, num_samples)
    if key not in _MNIST1D:
        _MNIST1D[key] = _mnist1d_cached(seed, num_samples)
    arrays = _MNIST1D[key]
    return {
        "train": (arrays["x"].copy(), arrays["y"].copy()),
        "test": (arrays["x_test"].copy(), arrays["y_test"].copy()),
    }


def _mnist1d_cached(seed: int, num_samples: int) -> dict:
    import importlib.metadata
    import io
    import os

    from sharp_minima import files

    version = importlib.metadata.version("mnist1d")
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(root, "sharp_minima", f"mnist1d-{version}-seed{seed}-n{num_samples}.npz")
    try:
        with np.load(path) as z:
            return {k: z[k] for k in ("x", "y", "x_test", "y_test")}
    except (OSError, KeyError, ValueError):
        pass
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed, args.num_samples = seed, num_samples
    d = make_dataset(args)
    f = lambda a: np.asarray(a, np.float32)[..., None]  # noqa: E731
    arrays = {
        "x": f(d["x"]),
        "y": np.asarray(d["y"], np.int32),
        "x_test": f(d["x_test"]),
        "y_test": np.asarray(d["y_test"], np.int32),
    }
    try:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        files.write_atomic(path, buf.getvalue())
    except OSError:  # a read-only home: generate each time
        pass
    return arrays


def swiss_roll_jax(key, n: int, noise: float = 0.5):
    """Huang et al.'s swiss roll (their gen-viz code), as a pure JAX function of a key.

    ``t = √U · 600 · 2π/360`` with U uniform on [0, 1]; class 0 is
    ``(−1.5 t cos t, 1.5 t sin t)``, class 1 the same arm rotated by π, ``(−x, −y)``; Gaussian
    noise of std ``noise`` is added. The first ``n // 2`` points are class 0, the rest class 1.
    Usable inside `jit` (e.g. to draw fresh poison points at every step,
    `sharp_minima.losses.label_flip_loss`).
    """
    import jax
    import jax.numpy as jnp

    k_t, k_noise = jax.random.split(key)
    t = jnp.sqrt(jax.random.uniform(k_t, (n,))) * (600.0 * 2.0 * jnp.pi / 360.0)
    y = (jnp.arange(n) >= n // 2).astype(jnp.int32)
    sign = 1.0 - 2.0 * y
    x = sign[:, None] * jnp.stack([-1.5 * t * jnp.cos(t), 1.5 * t * jnp.sin(t)], 1)
    x = x + noise * jax.random.normal(k_noise, x.shape)
    return x.astype(jnp.float32), y


def swiss_roll(n: int, *, seed: int = 0, noise: float = 0.5):
    """`swiss_roll_jax` as numpy arrays, shuffled, from an integer seed."""
    import jax

    x, y = swiss_roll_jax(jax.random.key(seed), n, noise)
    order = np.random.default_rng(seed).permutation(n)
    return np.asarray(x)[order], np.asarray(y)[order]


def rings(
    n: int,
    *,
    seed: int = 0,
    gap: float = 0.1,
    num_rings: int = 2,
    noise: float = 0.0,
    inner_radius: float = 0.2,
    width: float | None = None,
    weights=None,
):
    """Concentric rings, class = ring index mod 2; ``gap`` is the radial space between rings.

    Huang et al.'s counterfactual (their Fig. 8): with a wide gap a network finds a circular
    boundary; with the gap between two rings pinched it cherry-picks points instead.

    Args:
      n: number of points.
      gap: radial gap between consecutive rings.
      num_rings: number of rings (alternating classes from the centre).
      noise: std of Gaussian noise added to the points.
      inner_radius: inner radius of the first ring.
      width: radial width of each ring (default: the rings fill radius 0.2 … 1.2).
      weights: relative number of points per ring (default equal).
    """
    rng = np.random.default_rng(seed)
    p = np.ones(num_rings) if weights is None else np.asarray(weights, np.float64)
    ring = rng.choice(num_rings, size=n, p=p / p.sum())
    if width is None:
        width = (1.0 - gap * (num_rings - 1)) / num_rings
    r = inner_radius + ring * (width + gap) + rng.uniform(0, width, n)
    a = rng.uniform(0, 2 * np.pi, n)
    x = np.stack([r * np.cos(a), r * np.sin(a)], 1) + noise * rng.normal(size=(n, 2))
    return x.astype(np.float32), (ring % 2).astype(np.int32)


def spirals(n: int, *, seed: int = 0, num_classes: int = 3, noise: float = 0.2):
    """``num_classes`` interleaved spirals (the classic CS231n toy problem)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n)
    r = rng.uniform(0, 1, n)
    a = 4 * r + 2 * np.pi * y / num_classes + noise * rng.normal(size=n)
    x = np.stack([r * np.sin(a), r * np.cos(a)], 1)
    return x.astype(np.float32), y.astype(np.int32)


SYNTHETIC = {"swissroll": swiss_roll, "rings": rings, "spirals": spirals}


def synthetic(name: str, *, seed: int = 0, num_train: int = 2000, num_test: int = 2000, **kw):
    gen = SYNTHETIC[name]
    return {
        "train": gen(num_train, seed=seed, **kw),
        "test": gen(num_test, seed=seed + 10_000, **kw),
    }
