"""Loss landscapes: paths between solutions (Keskar et al. 2017's parametric plots).

>>> import jax.numpy as jnp
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

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sharp_minima import tree_util as tu

PATHS = ("linear", "curved")
# BatchNorm running variances in Flax's variables ({"batch_stats": {...: {"mean", "var"}}}).
BATCHNORM_VARIANCES = r"(^|/)batch_stats/.*var$"


def path_coefficients(alpha: float, path: str = "linear") -> tuple[float, float]:
    """``(c_a, c_b)`` of the point ``c_a·a + c_b·b`` at ``alpha`` on ``path``.

    ``"linear"``: (1 − α, α) (Keskar et al. 2017, Fig. 3; Goodfellow et al. 2015), defined for
    any α (the paper plots α ∈ [−1, 2]). ``"curved"``: (cos(απ/2), sin(απ/2)) (their Fig. 13),
    which also passes through a at α = 0 and b at α = 1.
    """
    if path == "linear":
        return 1.0 - alpha, alpha
    if path == "curved":
        return float(np.cos(alpha * np.pi / 2)), float(np.sin(alpha * np.pi / 2))
    raise ValueError(f"path must be one of {PATHS}, got {path!r}")


def interpolate(a, b, alpha: float, *, path: str = "linear", geometric: str | None = None):
    """The point at ``alpha`` on the path from ``a`` (α = 0) to ``b`` (α = 1).

    Args:
      a, b: pytrees of one structure (e.g. Flax ``variables``).
      alpha: position on the path.
      path: ``"linear"`` or ``"curved"`` (`path_coefficients`).
      geometric: optional regex on leaf paths (e.g. `BATCHNORM_VARIANCES`): those (positive)
        leaves are interpolated in log space, ``exp(c_a log a + c_b log b)``.
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
    """``metrics_fn`` (e.g. train/test loss and accuracy) at each α of the path from a to b.

    Returns ``{"alpha": (m,), name: (m,) ...}``.
    """
    rows = [
        metrics_fn(interpolate(a, b, float(al), path=path, geometric=geometric)) for al in alphas
    ]
    out = {"alpha": np.asarray(alphas, np.float64)}
    for k in rows[0]:
        out[k] = np.asarray([r[k] for r in rows], np.float64)
    return out
