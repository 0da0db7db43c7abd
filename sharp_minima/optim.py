"""optax transformations that change how a model is optimized.

`proximal` is Keskar et al. (2017)'s "conservative training" (their Sec. 4.2, after Li et al.
2014): each outer iterate x_k is improved by approximately solving the proximal sub-problem
min_x f(x) + λ/2 ‖x − x_k‖² with a few inner steps of the base optimizer.

>>> import jax.numpy as jnp, optax
>>> tx = optax.chain(proximal(0.5, inner_steps=3), optax.sgd(1.0))
>>> zero = {"w": jnp.array([0.0])}
>>> state = tx.init(zero)
>>> _, state = tx.update(zero, state, {"w": jnp.array([2.0])})  # step 0: x_k := x = 2
>>> updates, state = tx.update(zero, state, {"w": jnp.array([4.0])})
>>> updates["w"].tolist()  # -lr * (grad + λ (x - x_k)) = -(0 + 0.5 * (4 - 2))
[-1.0]
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class ProximalState(NamedTuple):
    anchor: optax.Params  # x_k
    count: jax.Array  # inner steps taken since the anchor was set


def proximal(lam: float, inner_steps: int = 3) -> optax.GradientTransformation:
    """Adds λ(x − x_k) to the gradient; x_k is reset to the current x every ``inner_steps``.

    Chain it before the base optimizer: ``optax.chain(proximal(λ, 3), optax.adam(lr))``.

    Raises:
      ValueError: λ < 0 or inner_steps < 1.
    """
    if lam < 0 or inner_steps < 1:
        raise ValueError(f"need lam >= 0 and inner_steps >= 1, got {lam}, {inner_steps}")

    def init(params):
        return ProximalState(jax.tree.map(jnp.copy, params), jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("proximal needs params: call tx.update(grads, state, params)")
        # A new outer iterate every inner_steps steps: the anchor moves to the current point.
        renew = state.count % inner_steps == 0
        anchor = jax.tree.map(lambda a, p: jnp.where(renew, p, a), state.anchor, params)
        updates = jax.tree.map(lambda g, p, a: g + lam * (p - a), updates, params, anchor)
        return updates, ProximalState(anchor, state.count + 1)

    return optax.GradientTransformation(init, update)
