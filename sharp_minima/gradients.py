"""Gradient statistics at fixed parameters: mini-batch gradients against given directions.

`DirectionProbe` measures what Jastrzębski et al. (2019, Sec. 3.2, Figs. 5 and 6) measure
along the training trajectory: ``J`` mini-batch gradients g_j of a loss, their mean |cos|
with the top directions e_1..e_top (e.g. Hessian eigenvectors) and with random directions,
the mean change of the loss after a step along e_1 only,

    ΔL(α) = mean_j L(θ − α η ⟨g_j, e₁⟩ e₁) − L(θ),

and the loss on a line through θ along e₁ scaled by the expected step,
L(θ + k e₁ η mean_j |⟨g_j, e₁⟩|). L is the weighted mean over ``batches`` (the curvature
subset); the gradients are of single mini-batches drawn from ``examples``. The plumbing (the
``wrt`` subset, raveling at the edge, the batch mean) is `sharp_minima.objective.Objective`.

Only jax and numpy are imported here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from sharp_minima.objective import Objective, batch_mean

__all__ = ["DirectionProbe"]


class DirectionProbe:
    """Mini-batch gradients against directions, with one compiled kernel owned by the probe.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` (e.g.
        `sharp_minima.losses.evaluation_loss`).
      wrt: which parameters (`sharp_minima.objective.Objective`).
      top: how many of the directions the alignment averages over (the paper: 5).
      num_random: random unit directions of the baseline alignment.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> loss = lambda p, b: 0.5 * jnp.mean((b["x"] @ p["w"]) ** 2)
      >>> x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 3)))
      >>> probe = DirectionProbe(loss, top=1)
      >>> e = {"w": jnp.eye(3)[:1]}  # one direction: the first axis
      >>> out = probe({"w": jnp.ones(3)}, e, {"x": x}, jnp.arange(64).reshape(4, 16),
      ...             {"x": x[None]}, None, step_size=0.1, alphas=[0.5, 2.0],
      ...             ks=[-1.0, 0.0, 1.0], key=jax.random.key(0))
      >>> out["delta"].shape, bool(jnp.isclose(out["along"][1], out["loss"]))
      ((2,), True)
    """

    def __init__(self, loss_fn, *, wrt=None, top: int = 5, num_random: int = 8):
        if top < 1 or num_random < 1:
            raise ValueError(f"top and num_random must be >= 1, got {top}, {num_random}")
        self.objective = Objective(loss_fn, wrt)
        self.top, self.num_random = top, num_random
        self._kernel_jit = jax.jit(self._kernel)

    def _kernel(self, params, directions, examples, indices, batches, weights, lr, alphas, ks, key):
        obj = self.objective
        x0, f = obj.flat_loss(params)

        def full_loss(x):
            return batch_mean(lambda b: f(x, b), batches, weights)

        def grad(idx):
            batch = jax.tree.map(lambda a: a[idx], examples)
            return jax.grad(lambda x: f(x, batch))(x0)

        g = lax.map(grad, indices)  # (J, D)
        e = jax.vmap(obj.flatten)(directions)  # (K, D)
        gnorm = jnp.linalg.norm(g, axis=1, keepdims=True)
        cos_top = jnp.mean(jnp.abs(g @ e[: self.top].T) / gnorm)
        r = jax.random.normal(key, (self.num_random, x0.shape[0]), x0.dtype)
        r = r / jnp.linalg.norm(r, axis=1, keepdims=True)
        cos_random = jnp.mean(jnp.abs(g @ r.T) / gnorm)
        loss0 = full_loss(x0)
        g1 = g @ e[0]  # (J,) components along e_1

        def delta(alpha):
            return jnp.mean(lax.map(lambda c: full_loss(x0 - alpha * lr * c * e[0]), g1)) - loss0

        step = lr * jnp.mean(jnp.abs(g1))
        along = lax.map(lambda k: full_loss(x0 + k * step * e[0]), ks)
        return {
            "cos_top": cos_top,
            "cos_random": cos_random,
            "loss": loss0,
            "delta": lax.map(delta, alphas),
            "step_e1": step,
            "along": along,
        }

    def __call__(
        self,
        params: Any,
        directions: Any,
        examples: Any,
        indices,
        batches: Any,
        weights=None,
        *,
        step_size: float,
        alphas,
        ks,
        key: jax.Array,
    ) -> dict[str, jax.Array]:
        """Measures at ``params``.

        Args:
          params: the parameters (a pytree; ``wrt`` selects the variables).
          directions: a pytree like ``params`` with a leading axis K ≥ 1 (orthonormal, e.g.
            ``eigenpairs(...).vectors``); e₁ is the first.
          examples: the examples the mini-batches are drawn from (a batch pytree whose
            leaves have a leading example axis).
          indices: (J, B) integer indices into ``examples``: J mini-batches of B examples.
          batches, weights: where L is evaluated (stacked batches, as for `hessian`).
          step_size: η.
          alphas: the step multiples α of ΔL(α).
          ks: the grid of k of the line through θ along e₁.
          key: key of the random directions.

        Returns:
          ``{"cos_top", "cos_random", "loss" (L(θ)), "delta" (ΔL per α), "step_e1"
          (η mean|⟨g, e₁⟩|), "along" (L per k)}``.
        """
        prepared = self.objective.prepare(params, batches, weights)
        dtype = prepared.dtype
        return self._kernel_jit(
            prepared.params,
            directions,
            examples,
            jnp.asarray(indices),
            batches,
            prepared.weights,
            jnp.asarray(step_size, dtype),
            jnp.asarray(alphas, dtype),
            jnp.asarray(ks, dtype),
            key,
        )
