"""Curvature tracking along training: the top Hessian eigenvalues as a trainer hook.

`EigenTracker` holds one `sharp_minima.hessian.Curvature` (its compiled Lanczos kernels are
reused at every call) and the previous eigenvectors (each call is warm-started from them, as
Jastrzębski et al. (2019) recompute theirs every epoch). Use it

- as a hook of `sharp_minima.train.train`:
  ``train.Hook(tracker, every_steps=500)`` — it reads ``ctx.state.variables()`` and writes
  eigenvalues and tridiagonals to ``workdir/arrays/<name>/``;
- from any JAX loop: ``tracker.measure(params, step)``.

Only jax, numpy (and `sharp_minima.hessian`) are imported.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from sharp_minima import hessian


class EigenTracker:
    """Top-k Hessian eigenpairs of ``loss_fn`` on fixed ``batches``, warm-started call to call.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``; for a Flax model
        `sharp_minima.losses.evaluation_loss` (BatchNorm statistics travel in ``params``).
      batches: the curvature subset, stacked (`sharp_minima.data.curvature_batches`).
      key: key for the Lanczos start vectors (folded with the step).
      k: number of eigenpairs.
      weights: per-batch weights (ragged last batch).
      wrt: which parameters (e.g. ``"^params/"`` for a Flax model's weights).
      name: metric prefix and folder name under ``arrays/``.
      tol: Lanczos tolerance (`Curvature.eigenpairs`).

    Attributes:
      curvature: the `sharp_minima.hessian.Curvature` (``curvature.num_traces`` stays constant
        after the first call).
      history: ``[(step, values), ...]`` of the calls so far.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> loss = lambda p, batch: 0.5 * jnp.sum(p["scale"] * p["w"] ** 2)
      >>> tracker = EigenTracker(loss, None, key=jax.random.key(0), k=2, wrt="w")
      >>> for step in (0, 100):  # e.g. the curvature grows along training
      ...     m = tracker.measure({"w": jnp.zeros(6), "scale": (1 + step / 100) *
      ...                          jnp.arange(1.0, 7.0)}, step)
      >>> round(m["hessian/lambda_1"], 4), round(m["hessian/lambda_2"], 4)
      (12.0, 10.0)
      >>> tracker.curvature.num_traces  # compiled once, warm-started the second time
      1
    """

    def __init__(
        self,
        loss_fn,
        batches,
        *,
        key: jax.Array,
        k: int = 5,
        weights=None,
        wrt=None,
        name: str = "hessian",
        tol: float = 1e-4,
    ):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.curvature = hessian.Curvature(loss_fn, wrt=wrt)
        self.batches, self.weights, self.key = batches, weights, key
        self.k, self.name, self.tol = k, name, tol
        self.vectors = None
        self.history: list[tuple[int, np.ndarray]] = []
        self.last: hessian.Eigenpairs | None = None

    def measure(self, params: Any, step: int) -> dict[str, float]:
        """Measures at ``params``; returns ``{"<name>/lambda_1".."lambda_k", "<name>/frobenius_topk"
        (‖H‖_F from the top k), "<name>/num_hvps", "<name>/seconds"}`` and remembers the vectors
        for the next call."""
        t0 = time.perf_counter()
        out = self.curvature.eigenpairs(
            params,
            self.batches,
            k=self.k,
            key=jax.random.fold_in(self.key, step),
            weights=self.weights,
            init_vectors=self.vectors,
            tol=self.tol,
        )
        self.vectors, self.last = out.vectors, out
        self.history.append((step, out.values))
        metrics = {f"{self.name}/lambda_{i + 1}": float(v) for i, v in enumerate(out.values)}
        # ||H||_F from the top K (Jastrzebski et al.'s approximation: a lower bound).
        metrics[f"{self.name}/frobenius_top{self.k}"] = float(np.sqrt(np.sum(out.values**2)))
        metrics[f"{self.name}/num_hvps"] = out.num_steps
        metrics[f"{self.name}/seconds"] = time.perf_counter() - t0
        return metrics

    def __call__(self, ctx) -> dict[str, float]:
        """The trainer hook: measures at ``ctx.state.variables()`` and saves the eigenvalues,
        residuals and tridiagonal to ``arrays/<name>/<step>.npz``."""
        metrics = self.measure(ctx.state.variables(), ctx.step)
        out = self.last
        ctx.save_arrays(
            self.name,
            values=out.values,
            residuals=out.residuals,
            alphas=out.tridiagonal[0],
            betas=out.tridiagonal[1],
        )
        return metrics
