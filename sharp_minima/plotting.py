"""Figures of the library's measurements, which any study or notebook can draw: a spectral
density, tracked eigenvalues, an interpolation curve, a 2-D loss surface; and `save` (PNG +
PDF), which `sharp_minima.studies.common.write_outputs` calls for every study. A figure that
belongs to one study lives in that study's module, beside its ``figures(config, results)``.

Every function returns a `matplotlib.figure.Figure` built without pyplot: nothing here picks a
backend or registers figures with pyplot's global state, so a script on a headless server needs
no display. A bare `Figure` as a notebook cell's value is drawn only where an inline backend
registered its formatter; `sharp_minima.notebook.show` always draws it.
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib.figure import Figure

FORMATS = ("png", "pdf")  # what `save` writes: an image to look at and one to print


def figure(figsize) -> Figure:
    """A new `Figure` with matplotlib's constrained layout, which every figure of the library
    and the studies uses: labels, tick labels, titles and colourbars are kept clear of the
    neighbouring panels (no ``tight_layout`` afterwards).

    Args:
      figsize: (width, height) in inches.

    Returns:
      A `matplotlib.figure.Figure` (not registered with pyplot).
    """
    return Figure(figsize=figsize, layout="constrained")


def _subplots(figsize):
    fig = figure(figsize)
    return fig, fig.add_subplot()


def save(fig: Figure, workdir: str, name: str, formats=FORMATS) -> list[str]:
    """Saves ``fig`` as ``workdir/name.png`` and ``.pdf`` (``formats``), each written to a
    temporary file and renamed, so a killed run never leaves half a figure.

    Args:
      fig: the figure.
      workdir: the folder (created if missing).
      name: the file name without extension.
      formats: the file formats (extensions matplotlib knows).

    Returns:
      The paths, one per format.
    """
    os.makedirs(workdir, exist_ok=True)
    paths = []
    for ext in formats:
        path = os.path.join(workdir, f"{name}.{ext}")
        tmp = os.path.join(workdir, f".tmp-{name}.{ext}")
        fig.savefig(tmp, dpi=150, bbox_inches="tight", format=ext)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def spectrum_figure(density, top_values=None, title="Hessian spectral density"):
    """SLQ density (log scale) with the Lanczos top eigenvalues marked.

    Args:
      density: a `sharp_minima.hessian.SpectralDensity` (or its ``_asdict()``).
      top_values: optional eigenvalues to mark as vertical lines.
      title: figure title.

    Returns:
      A `matplotlib.figure.Figure`.
    """
    fig, ax = _subplots(figsize=(6, 3.5))
    if not isinstance(density, dict):
        density = density._asdict()
    grid, values = np.asarray(density["grid"]), np.asarray(density["density"])
    floor = max(values.max() * 1e-8, 1e-12)
    ax.semilogy(grid, np.maximum(values, floor), color="C0", label="SLQ density")
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
    """Curvature tracked along training: one line per tracked eigenvalue.

    Args:
      steps: (T,) training steps.
      values: (T, k) eigenvalues at those steps.
      ylabel: the y axis' label.
      title: optional title.

    Returns:
      A `matplotlib.figure.Figure`.
    """
    fig, ax = _subplots(figsize=(6, 3.5))
    values = np.asarray(values)
    for j in range(values.shape[1]):
        ax.plot(steps, values[:, j], lw=1.2, label=f"λ{j + 1}" if j < 5 else None)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(loc="best")
    return fig


def parametric_figure(curve, title="Parametric plot"):
    """Keskar et al. (2017)'s Fig. 3: loss (log scale, left) and accuracy (right) along α.

    Args:
      curve: `sharp_minima.landscape.interpolation_curve`'s output with ``alpha``,
        ``train_loss``, ``test_loss``, ``train_accuracy`` and ``test_accuracy`` (%).
      title: figure title.

    Returns:
      A `matplotlib.figure.Figure`.
    """
    fig, ax = _subplots(figsize=(6.4, 4))
    a = np.asarray(curve["alpha"])
    ax.semilogy(a, curve["train_loss"], "b-", label="train loss")
    ax.semilogy(a, curve["test_loss"], "b--", label="test loss")
    ax.set_xlabel("α  (0: small-batch minimizer, 1: large-batch minimizer)")
    ax.set_ylabel("cross-entropy", color="b")
    ax2 = ax.twinx()
    ax2.plot(a, curve["train_accuracy"], "r-", label="train accuracy")
    ax2.plot(a, curve["test_accuracy"], "r--", label="test accuracy")
    ax2.set_ylabel("accuracy (%)", color="r")
    for x in (0.0, 1.0):
        ax.axvline(x, color="0.7", lw=0.8)
    lines = ax.get_lines()[:2] + ax2.get_lines()
    # below the axes: inside, a legend covers the curves it names
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, ncol=4,
              loc="upper center", bbox_to_anchor=(0.5, -0.16))  # fmt: skip
    ax.set_title(title, fontsize=10)
    return fig


def surface_figure(grid_x, grid_y, values, title="Loss surface", contours=(), label="loss"):
    """A 2-D slice of the loss (`sharp_minima.landscape.Landscape.slice` over a plane) as
    filled contours of log10(loss), the solution marked at the origin (Li et al. 2018,
    Fig. 1).

    Args:
      grid_x: the coefficients along the first direction (length nx).
      grid_y: the coefficients along the second direction (length ny).
      values: the loss on the grid, shape (nx, ny) as ``slice`` returns it.
      title: figure title.
      contours: loss levels drawn as white lines (e.g. a basin cutoff).
      label: what ``values`` is (the colour bar's label).

    Returns:
      A `matplotlib.figure.Figure`.
    """
    fig, ax = _subplots(figsize=(5, 4.2))
    v = np.asarray(values, dtype=float)
    logv = np.log10(np.maximum(v, np.finfo(float).tiny))
    cs = ax.contourf(grid_x, grid_y, logv.T, levels=20, cmap="viridis")
    fig.colorbar(cs, ax=ax, label=f"log10 {label}")
    levels = sorted(c for c in contours if v.min() < c < v.max())
    if levels:
        ax.contour(grid_x, grid_y, v.T, levels=levels, colors="w", linewidths=0.8)
    ax.plot([0], [0], "r*", ms=10)
    ax.set_xlabel("direction 1")
    ax.set_ylabel("direction 2")
    ax.set_title(title, fontsize=10)
    return fig
