"""optax transformations that change how a model is optimized.

Subspace transforms (Jastrzębski et al. 2019), for directions ``e_1..e_K`` given as a pytree
like the params with a leading axis K (orthonormal, e.g. ``hessian.Eigenpairs.vectors``) and
P the projection onto their span:

- `nudge` ``(directions, gamma)``: u -> γ P u + (I − P) u — Nudged-SGD's update (their Sec. 4):
  the step along the sharpest directions is scaled by γ, elsewhere it is unchanged;
- `project_onto`: u -> P u ("SGD top", their Fig. 7, and "SGD constant top" with directions
  that are never refreshed);
- `project_out`: u -> (I − P) u ("SGD no top");
- `nsgd`: SGD (optionally with momentum) with the nudge, the way the authors' optimizer
  applies it to the velocity while keeping the uncorrected velocity in the buffer.

Each keeps the directions in its state (`SubspaceState`), so a training hook can refresh them
(``optax.tree_utils.tree_set(opt_state, directions=new)``); they are checkpointed with the rest
of the optimizer state. With ``directions=None`` and ``num_directions=K`` the state starts with
K zero directions (no effect) until the first refresh.

>>> import jax.numpy as jnp, optax
>>> e = {"w": jnp.array([[1.0, 0.0, 0.0]])}          # K = 1: the first coordinate
>>> tx = optax.chain(nudge(e, gamma=0.1), optax.sgd(1.0))
>>> grads = {"w": jnp.array([2.0, 3.0, 4.0])}
>>> updates, _ = tx.update(grads, tx.init(grads))
>>> updates["w"].tolist()  # -(0.1 * 2, 3, 4)
[-0.2..., -3.0, -4.0]

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

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sharp_minima import tree_util as tu


class ProximalState(NamedTuple):
    """The state of `proximal`.

    Attributes:
      anchor: x_k, the parameters at the last reset.
      count: inner steps taken since the anchor was set.
    """

    anchor: optax.Params  # x_k
    count: jax.Array  # inner steps taken since the anchor was set


def proximal(lam: float, inner_steps: int = 3) -> optax.GradientTransformation:
    """Adds λ(x − x_k) to the gradient; x_k is reset to the current x every ``inner_steps``
    (Keskar et al. 2017's "conservative training", Sec. 4.2).

    Chain it before the base optimizer: ``optax.chain(proximal(λ, 3), optax.adam(lr))``.

    Args:
      lam: λ ≥ 0.
      inner_steps: steps between anchor resets.

    Returns:
      An ``optax.GradientTransformation``.

    Raises:
      ValueError: λ < 0 or inner_steps < 1; at ``update``, no ``params`` passed.
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


# --------------------------------------------------------------------------- subspace transforms


class SubspaceState(NamedTuple):
    """The state of a subspace transform (`nudge`, `project_onto`, `project_out`).

    Attributes:
      directions: a pytree like the params with a leading axis K; replace them with
        ``optax.tree_utils.tree_set(opt_state, directions=new)``.
    """

    directions: Any


def project(directions, tree):
    """``P tree = Σ_k <tree, e_k> e_k``, the projection onto orthonormal directions.

    Args:
      directions: a pytree like ``tree`` with a leading axis K (orthonormal).
      tree: the pytree to project.

    Returns:
      A pytree like ``tree``.
    """
    coeffs = jax.vmap(lambda d: tu.dot(d, tree))(directions)  # (K,)
    return jax.tree.map(
        lambda d, t: jnp.tensordot(coeffs.astype(d.dtype), d, axes=1).astype(t.dtype),
        directions,
        tree,
    )


def _check_orthonormal(directions, name: str) -> None:
    flat = np.asarray(jax.vmap(lambda d: tu.ravel(d)[0])(directions), np.float64)
    gram = flat @ flat.T
    if not np.allclose(gram, np.eye(len(gram)), atol=1e-3):
        raise ValueError(
            f"{name}: the directions must be orthonormal (e.g. Hessian eigenvectors); their Gram "
            f"matrix is off the identity by {np.abs(gram - np.eye(len(gram))).max():.3g}"
        )


def _subspace_transform(name, along: float, across: float, directions, num_directions):
    """u -> along · P u + across · (I − P) u, with P the projection onto ``directions``."""
    if directions is None and (num_directions is None or num_directions < 1):
        raise ValueError(f"{name}: pass directions, or num_directions >= 1 to start with zeros")
    if directions is not None:
        _check_orthonormal(directions, name)

    def init(params):
        if directions is not None:
            for d, p in zip(jax.tree.leaves(directions), jax.tree.leaves(params)):
                if d.shape[1:] != p.shape:
                    raise ValueError(
                        f"{name}: directions must be params-shaped with a leading axis K; got a "
                        f"leaf {d.shape} for a parameter {p.shape}"
                    )
            return SubspaceState(jax.tree.map(lambda d, p: d.astype(p.dtype), directions, params))
        return SubspaceState(
            jax.tree.map(lambda p: jnp.zeros((num_directions,) + p.shape, p.dtype), params)
        )

    def update(updates, state, params=None):
        del params
        proj = project(state.directions, updates)
        new = jax.tree.map(
            lambda u, q: (across * u + (along - across) * q).astype(u.dtype), updates, proj
        )
        return new, state

    return optax.GradientTransformation(init, update)


def nudge(directions=None, gamma: float = 0.01, *, num_directions: int | None = None):
    """Nudged-SGD's transform: the update's component along the directions scaled by γ.

    ``u -> γ P u + (I − P) u`` (Jastrzębski et al. 2019, Sec. 4: a learning rate γη along the
    top-K Hessian eigenvectors, η elsewhere). Chain it before the optimizer, e.g.
    ``optax.chain(nudge(vectors, 0.01), optax.sgd(eta))``; see `nsgd` for momentum.

    Args:
      directions: orthonormal directions (params-like pytree with a leading axis K), or None.
      gamma: the factor γ along the directions (the paper: 0.01, 0.1, 1, 5).
      num_directions: K when ``directions`` is None (zero directions until refreshed).

    Returns:
      An ``optax.GradientTransformation`` whose state holds the directions (a hook may
      replace them).

    Raises:
      ValueError: γ < 0, directions not orthonormal or not params-shaped, or neither
        directions nor num_directions.
    """
    if gamma < 0:
        raise ValueError(f"nudge: gamma must be >= 0, got {gamma}")
    return _subspace_transform("nudge", gamma, 1.0, directions, num_directions)


def project_onto(directions=None, *, num_directions: int | None = None):
    """Keeps only the update's component along the directions: ``u -> P u`` ("SGD top" of
    Jastrzębski et al. 2019, Sec. 3).

    Args:
      directions: orthonormal directions (leading axis K), or None.
      num_directions: K when ``directions`` is None (a hook writes them).

    Returns:
      An ``optax.GradientTransformation``.

    Raises:
      ValueError: directions not orthonormal, or neither argument.
    """
    return _subspace_transform("project_onto", 1.0, 0.0, directions, num_directions)


def project_out(directions=None, *, num_directions: int | None = None):
    """Removes the update's component along the directions: ``u -> (I − P) u`` ("SGD no
    top" of Jastrzębski et al. 2019, Sec. 3).

    Args:
      directions: orthonormal directions (leading axis K), or None.
      num_directions: K when ``directions`` is None (a hook writes them).

    Returns:
      An ``optax.GradientTransformation``.

    Raises:
      ValueError: directions not orthonormal, or neither argument.
    """
    return _subspace_transform("project_out", 0.0, 1.0, directions, num_directions)


def nsgd(
    learning_rate,
    directions=None,
    gamma: float = 0.01,
    *,
    num_directions: int | None = None,
    momentum: float = 0.0,
    nudge_velocity: bool = True,
    inject_learning_rate: bool = False,
) -> optax.GradientTransformation:
    """Nudged-SGD (Jastrzębski et al. 2019, Sec. 4): SGD with learning rate γη along the
    directions and η elsewhere.

    With ``inject_learning_rate`` the SGD step is ``optax.inject_hyperparams(optax.sgd)``, so
    its ``learning_rate`` lives in the optimizer state where a hook can lower it (e.g.
    `sharp_minima.train.ValidationPlateau`).

    With momentum, ``nudge_velocity=True`` nudges the velocity when it is applied and keeps
    the uncorrected velocity in the buffer (as the authors' Keras optimizer does):
    ``v = μ v + g``, ``Δθ = −η (γ P v + (I − P) v)``; ``False`` accumulates nudged gradients
    instead.

    Args:
      learning_rate: η (a float or an optax schedule).
      directions: orthonormal directions (params-like pytree with a leading axis K), or
        None (then ``num_directions``; a hook writes them, e.g.
        `sharp_minima.tracking.EigenTracker` with ``set_directions=True``).
      gamma: γ (the paper: 0.01, 0.1, 1, 5).
      num_directions: K when ``directions`` is None.
      momentum: μ (0: plain SGD).
      nudge_velocity: with momentum, nudge the applied velocity (True) or the gradients.
      inject_learning_rate: keep η in the state, where a hook can change it.

    Returns:
      An ``optax.GradientTransformation``.

    Raises:
      ValueError: momentum outside [0, 1), or as `nudge`.

    >>> import jax.numpy as jnp
    >>> e = {"w": jnp.eye(3)[:1]}
    >>> tx = nsgd(0.5, e, gamma=0.0)
    >>> updates, _ = tx.update({"w": jnp.ones(3)}, tx.init({"w": jnp.zeros(3)}))
    >>> [abs(v) for v in updates["w"].tolist()]  # γ = 0: nothing along e_1
    [0.0, 0.5, 0.5]
    """
    if not 0 <= momentum < 1:
        raise ValueError(f"nsgd: momentum must be in [0, 1), got {momentum}")
    nudged = nudge(directions, gamma, num_directions=num_directions)
    sgd = optax.inject_hyperparams(optax.sgd) if inject_learning_rate else optax.sgd
    if not momentum:
        return optax.chain(nudged, sgd(learning_rate))
    if nudge_velocity:
        return optax.chain(optax.trace(momentum), nudged, sgd(learning_rate))
    return optax.chain(nudged, sgd(learning_rate, momentum=momentum))
