"""Matplotlib figures used by the experiments (saved as PNG and PDF)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # headless: experiments run on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save(fig, workdir: str, name: str) -> list[str]:
    """Saves ``fig`` as ``workdir/name.png`` and ``.pdf``; returns the paths."""
    os.makedirs(workdir, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        path = os.path.join(workdir, f"{name}.{ext}")
        tmp = os.path.join(workdir, f".tmp-{name}.{ext}")
        fig.savefig(tmp, dpi=150, bbox_inches="tight", format=ext)
        os.replace(tmp, path)
        paths.append(path)
    plt.close(fig)
    return paths


def spectrum_figure(density, top_values=None, title="Hessian spectral density"):
    """SLQ density (log scale) with the Lanczos top eigenvalues marked.

    Args:
      density: a `sharp_minima.hessian.SpectralDensity`.
      top_values: optional eigenvalues to mark as vertical lines.
      title: figure title.
    """
    fig, ax = plt.subplots(figsize=(6, 3.5))
    floor = max(density.density.max() * 1e-8, 1e-12)
    ax.semilogy(density.grid, np.maximum(density.density, floor), color="C0", label="SLQ density")
    if top_values is not None:
        for i, v in enumerate(np.atleast_1d(top_values)):
            ax.axvline(
                v, color="C3", lw=0.8, alpha=0.6, label="top eigenvalues" if i == 0 else None
            )
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(loc="upper right")
    return fig


def tracking_figure(steps, values, ylabel="top Hessian eigenvalues", title=None):
    """Curvature tracked along training: one line per tracked eigenvalue."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    values = np.asarray(values)
    for j in range(values.shape[1]):
        ax.plot(steps, values[:, j], lw=1.2, label=f"λ{j + 1}" if j < 5 else None)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(loc="best")
    return fig
