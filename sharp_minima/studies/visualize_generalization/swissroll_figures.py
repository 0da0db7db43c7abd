"""The figures of section 1 (`swissroll`): decision boundaries, loss surfaces and the basin
volumes against β (and `by_beta`, the runs' statistics per β that the section's claims and
report read too)."""

from __future__ import annotations

import numpy as np

from sharp_minima import plotting
from sharp_minima.studies import runs


def by_beta(records: list[dict], key: str) -> dict[float, dict]:
    """``{β: {"mean", "std", "min", "max", "n"}}`` of ``key`` over the runs of each β that
    have it (`runs.aggregate`), by increasing β."""
    stats = runs.aggregate(records, "beta")
    return {b: v[key] for b, v in sorted(stats.items()) if key in v}


def boundary_figure(boundaries, records, data, seed: int = 0):
    """Fig. 6: decision boundaries, one panel per β (the run of ``seed``), titled with its
    generalization gap."""
    fig = plotting.figure((3.2 * len(boundaries), 3.2))
    first = {r["beta"]: r for r in records if r["seed"] == seed and "test_accuracy" in r}
    for i, (beta, (gx, gy, prob)) in enumerate(sorted(boundaries.items())):
        ax = fig.add_subplot(1, len(boundaries), i + 1)
        ax.contourf(gx, gy, prob, levels=[0, 0.5, 1], colors=["#9ecae1", "#fcae91"], alpha=0.8)
        x, y = data
        ax.scatter(x[y == 0, 0], x[y == 0, 1], s=4, c="C0")
        ax.scatter(x[y == 1, 0], x[y == 1, 1], s=4, c="C3")
        r = first.get(beta)
        gap = 100 * (r["train_accuracy"] - r["test_accuracy"]) if r else float("nan")
        ax.set_title(f"β = {beta:g}: gap {gap:.1f} %", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def surface_figure(surfaces):
    """Fig. 3 (bottom): filter-normalised 2-D loss surfaces on one colour scale — log₁₀ of the
    training loss (from 10⁻³), one colourbar, clipped at the 95th percentile of all surfaces —
    so that the basins compare; white contours at loss 0.1 and 1."""
    fig = plotting.figure((4.2 * len(surfaces) + 0.8, 3.6))
    logs = {b: np.log10(np.maximum(np.asarray(s["loss"]), 1e-3)) for b, s in surfaces.items()}
    vmax = max(float(np.percentile(z, 95)) for z in logs.values())
    vmin = min(float(z.min()) for z in logs.values())
    levels = np.linspace(vmin, max(vmax, vmin + 1e-6), 21)
    axes = []
    for i, (beta, s) in enumerate(sorted(surfaces.items())):
        ax = fig.add_subplot(1, len(surfaces), i + 1)
        axes.append(ax)
        g = s["grid"]
        cs = ax.contourf(g, g, np.minimum(logs[beta], levels[-1]).T, levels=levels)
        ax.contour(g, g, np.asarray(s["loss"]).T, levels=[0.1, 1.0], colors="w", linewidths=0.8)
        ax.set_title(("good" if beta == 0 else "bad") + f" minimum (β = {beta:g})", fontsize=9)
        ax.set_xlabel("filter-normalised direction 1")
        if i == 0:
            ax.set_ylabel("filter-normalised direction 2")
    fig.colorbar(cs, ax=axes, label="log₁₀ training loss (one scale)")
    return fig


def volume_figure(records, config):
    """Fig. 5: test accuracy, mean radius and log-volume against β; dashed lines the mean,
    bands min/max over runs."""
    c = config.volume.cutoffs[0]
    panels = [
        ("test_accuracy", "test accuracy"),
        (f"radius_mean_{c:g}", f"mean radius (loss < {c:g})"),
        (f"log_volume_{c:g}", "log-volume (nats)"),
    ]
    fig = plotting.figure((11, 3.2))
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        vals = by_beta(records, key)
        if not vals:
            continue
        b = np.asarray(list(vals))
        ax.plot(b, [v["mean"] for v in vals.values()], "k--o", ms=3, label="mean over runs")
        lo, hi = [v["min"] for v in vals.values()], [v["max"] for v in vals.values()]
        ax.fill_between(b, lo, hi, alpha=0.3, label="min–max over runs")
        ax.set_xlabel("β (anti-generalization)")
        ax.set_ylabel(label)
        if i == 0:
            ax.legend(fontsize=7)
    return fig
