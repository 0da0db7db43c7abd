"""Loss landscapes: paths between solutions (Keskar et al. 2017's parametric plots).

>>> import jax.numpy as jnp
>>> a, b = {"w": jnp.zeros(2)}, {"w": jnp.ones(2)}
>>> interpolate(a, b, 0.25)["w"].tolist()
[0.25, 0.25]
>>> [round(float(v), 3) for v in interpolate(a, b, 1.0, path="curved")["w"]]
[1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

PATHS = ("linear", "curved")


def interpolate(a, b, alpha: float, *, path: str = "linear"):
    """A point on the path from ``a`` (α = 0) to ``b`` (α = 1), any pytrees of one structure.

    ``"linear"``: (1 − α)a + αb (Keskar et al. 2017, Fig. 3; Goodfellow et al. 2015), defined
    for any α (the paper plots α ∈ [−1, 2]). ``"curved"``: cos(απ/2)a + sin(απ/2)b (their
    Fig. 13), which also passes through a at α = 0 and b at α = 1.
    """
    if path == "linear":
        ca, cb = 1.0 - alpha, alpha
    elif path == "curved":
        ca, cb = np.cos(alpha * np.pi / 2), np.sin(alpha * np.pi / 2)
    else:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    return jax.tree.map(lambda x, y: (ca * x + cb * y).astype(x.dtype), a, b)


def interpolation_curve(
    metrics_fn: Callable[[Any], dict[str, float]],
    a,
    b,
    alphas: Sequence[float],
    *,
    path: str = "linear",
) -> dict[str, np.ndarray]:
    """``metrics_fn`` (e.g. train/test loss and accuracy) at each α of the path from a to b.

    Returns ``{"alpha": (m,), name: (m,) ...}``.
    """
    rows = [metrics_fn(interpolate(a, b, float(al), path=path)) for al in alphas]
    out = {"alpha": np.asarray(alphas, np.float64)}
    for k in rows[0]:
        out[k] = np.asarray([r[k] for r in rows], np.float64)
    return out
