"""Data sets that need no download: MNIST-1D and 2-D synthetic problems."""

from __future__ import annotations

import numpy as np


def mnist1d(seed: int = 0, num_samples: int = 5000):
    """MNIST-1D (Greydanus 2020), generated procedurally by the `mnist1d` package.

    Returns ``{"train": (x, y), "test": (x, y)}`` with x of shape (n, 40, 1).
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed, args.num_samples = seed, num_samples
    d = make_dataset(args)
    f = lambda a: np.asarray(a, np.float32)[..., None]  # noqa: E731
    return {
        "train": (f(d["x"]), np.asarray(d["y"], np.int32)),
        "test": (f(d["x_test"]), np.asarray(d["y_test"], np.int32)),
    }


def swiss_roll(n: int, *, seed: int = 0, noise: float = 0.0, turns: float = 2.0):
    """Two interleaved swiss-roll arms (Huang et al. 2020): class = arm.

    Points ``t (cos 2πt·turns, sin 2πt·turns)`` for ``t ~ U(0.2, 1)`` with the second arm
    rotated by π; ``noise`` is the std of added Gaussian noise.
    """
    rng = np.random.default_rng(seed)
    t = rng.uniform(0.2, 1.0, n)
    y = rng.integers(0, 2, n)
    angle = 2 * np.pi * turns * t + np.pi * y
    x = np.stack([t * np.cos(angle), t * np.sin(angle)], 1)
    x += noise * rng.normal(size=x.shape)
    return x.astype(np.float32), y.astype(np.int32)


def rings(n: int, *, seed: int = 0, gap: float = 0.1, num_rings: int = 2, noise: float = 0.0):
    """Concentric rings, class = ring; ``gap`` is the radial space between rings ("pinched
    rings" of Huang et al. with a small gap)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_rings, n)
    width = (1.0 - gap * (num_rings - 1)) / num_rings
    r = 0.2 + y * (width + gap) + rng.uniform(0, width, n)
    a = rng.uniform(0, 2 * np.pi, n)
    x = np.stack([r * np.cos(a), r * np.sin(a)], 1) + noise * rng.normal(size=(n, 2))
    return x.astype(np.float32), y.astype(np.int32)


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
