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

`sam` is sharpness-aware minimisation (Foret et al. 2021), ASAM (Kwon et al. 2021) and
m-sharpness (Andriushchenko & Flammarion 2022) as the first link of a chain;
`sam_stability_threshold` is the curvature up to which SAM's step is stable and
`sam_quadratic_growth` measures it on a quadratic.
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


# ------------------------------------------------------------- sharpness-aware minimisation

# Added to ‖T g‖ (computed in float32 at least) in the ascent step: a zero gradient gives
# ε = 0, not NaN.
SAM_EPS = 1e-12
SAM_METRICS = ("sharpness", "grad_norm", "cos")


class SamState(NamedTuple):
    """The state of `sam`: the last step's diagnostics, which the trainer logs as
    ``sam/<name>`` (`SAM_METRICS`).

    Attributes:
      sam_metrics: ``{"sharpness": L(w + ε) − L(w)`` (SAM's own sharpness, averaged over the
        m-groups), ``"grad_norm": ‖g‖`` (the clean mini-batch gradient), ``"cos": cos(g,
        g_SAM)}`` (g_SAM: the gradient the step descends along), float32 scalars.
    """

    sam_metrics: dict


def asam_mask(params) -> Any:
    """ASAM's default choice of the parameters whose ascent step is scaled by |w| + η: every
    leaf but biases (SamsungLabs' ASAM scales the PyTorch parameters named ``weight``: the
    kernels of dense and convolutional layers and BatchNorm's scale).

    Args:
      params: the parameters.

    Returns:
      A pytree of bools like ``params``.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not tu.path_str(path).split("/")[-1].startswith("bias"), params
    )


def _wide(x):  # float32 at least: in float16 eps vanishes and a squared norm overflows
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _wide_norm(tree):
    return tu.norm(jax.tree.map(_wide, tree))


def _sam_diagnostics(g, adv, eps, diagnose=None):
    """``(‖g‖, cos(g, adv))`` in float32 at least; with ``diagnose`` (a traced bool: the
    trainer's m-sharpness step forms g on its log steps only) computed only where it is
    true, ``(0, 0)`` elsewhere."""

    def diagnostics():
        g_norm, a_norm = _wide_norm(g), _wide_norm(adv)
        cos = tu.dot(*(jax.tree.map(_wide, t) for t in (g, adv)))
        return g_norm, cos / (g_norm * a_norm + eps)

    if diagnose is None:
        return diagnostics()
    shapes = jax.eval_shape(diagnostics)
    zeros = tuple(jnp.zeros(a.shape, a.dtype) for a in shapes)
    return jax.lax.cond(diagnose, diagnostics, lambda: zeros)


def sam(
    rho: float = 0.05,
    *,
    adaptive: bool = False,
    eta: float = 0.01,
    mask=None,
    eps: float = SAM_EPS,
) -> optax.GradientTransformationExtraArgs:
    """Sharpness-aware minimisation (Foret et al. 2021) and its scale-invariant form ASAM
    (Kwon et al. 2021), as the first link of a chain: the clean gradient g in, the gradient
    at the perturbed point w + ε on the same mini-batch out.

    ``optax.chain(sam(0.05), optax.sgd(0.1, momentum=0.9))`` is SAM with heavy-ball SGD.
    ``tx.update`` needs the params and, as extra arguments (the trainer passes them),
    ``value_fn(params) -> objective`` on the step's mini-batch (same examples, same dropout
    key, BatchNorm in training mode: its statistics are those of the clean pass, the
    perturbed pass's are dropped) and ``value=`` the clean objective. One more gradient per
    step: two in all.

    - SAM: ε = ρ g / (‖g‖ + eps).
    - ASAM (``adaptive=True``): ε = ρ T² g / (‖T g‖ + eps), T = |w| + η on the leaves of
      ``mask`` (default `asam_mask`: all but biases), T = 1 elsewhere (SamsungLabs' ASAM:
      η = 0.01, ρ = 0.5 on CIFAR-10, 1.0 on CIFAR-100).
    - m-sharpness (Andriushchenko & Flammarion 2022): pass ``group_grads`` (the clean
      gradients of G groups of m examples, stacked on a leading axis) and
      ``group_value_fn(params, i)`` (group i's objective); each group ascends along its own
      gradient and the step descends along the mean of the groups' gradients at their own
      perturbed points (one gradient, vmapped over the groups). The trainer does this with
      ``config.sam.group_size = m``; G = the number of devices is the official code's
      per-device perturbation. A network of dense layers and small leaves (biases,
      normalisation scales) takes the faster path of
      `sharp_minima.per_example.group_ascent` when the trainer passes it as
      ``group_ascent(scale_fn) -> (value, gradient)`` (SAM only: ASAM's ascent is not low
      rank).
    - Diagnostics: ``diagnose=`` (an extra argument, a traced bool) computes ‖g‖ and cos(g,
      g_SAM) only where it is true (0 elsewhere). The trainer's m-sharpness step passes its
      log steps: there g, the mean of the groups' clean gradients, is not needed by the step
      and is formed on log steps only (a third of a gradient's products).

    Weight decay: inside the loss it is part of g and of the perturbed gradient (the official
    code); decoupled, chain ``optax.add_decayed_weights`` after `sam` (``optim.decoupled``).

    Args:
      rho: the radius ρ > 0.
      adaptive: ASAM's scale-invariant ascent.
      eta: ASAM's η.
      mask: ASAM's scaled leaves (a pytree of bools, or a function of the params).
      eps: added to the norm of the ascent direction (`SAM_EPS`).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a `SamState`.

    Raises:
      ValueError: ρ ≤ 0 or η < 0; at ``update``, no params or no ``value_fn``.

    >>> import jax.numpy as jnp, optax
    >>> loss = lambda p: 0.5 * (p["w"] ** 2 * jnp.array([1.0, 4.0])).sum()
    >>> p = {"w": jnp.array([1.0, 1.0])}
    >>> tx = sam(0.1)
    >>> g, state = tx.update(jax.grad(loss)(p), tx.init(p), p, value=loss(p), value_fn=loss)
    >>> [round(v, 4) for v in g["w"].tolist()]  # the gradient at w + 0.1 g/|g|
    [1.0243, 4.3881]
    """
    if rho <= 0 or eta < 0:
        raise ValueError(f"sam: need rho > 0 and eta >= 0, got rho={rho}, eta={eta}")

    def init(params):
        del params
        return SamState({k: jnp.zeros((), jnp.float32) for k in SAM_METRICS})

    norm, wide = _wide_norm, _wide

    def scale(n):  # ρ / (‖·‖ + eps)
        return rho / (n + eps)

    def perturbation(g, params):
        if not adaptive:
            s = scale(norm(g))
            return jax.tree.map(lambda x: (s * x).astype(x.dtype), g)
        which = mask(params) if callable(mask) else mask if mask is not None else asam_mask(params)
        t = jax.tree.map(lambda p, m: jnp.abs(p) + eta if m else jnp.ones_like(p), params, which)
        tg = jax.tree.map(jnp.multiply, t, g)
        s = scale(norm(tg))
        return jax.tree.map(lambda a, b: (s * a * b).astype(b.dtype), t, tg)

    def update(updates, state, params=None, *, value=None, value_fn=None, **extra):
        if params is None or value_fn is None:
            raise ValueError(
                "sam needs the params and value_fn (the mini-batch objective as a function of "
                "the params): tx.update(grads, state, params, value=loss, value_fn=fn)"
            )
        del state
        group_grads, group_value_fn = extra.get("group_grads"), extra.get("group_value_fn")
        if group_grads is None:
            point = jax.tree.map(jnp.add, params, perturbation(updates, params))
            adv_value, adv = jax.value_and_grad(value_fn)(point)
        elif extra.get("group_ascent") is not None and not adaptive:  # by layers
            adv_value, adv = extra["group_ascent"](scale)
        else:  # m-sharpness: each group at its own w + ε_i

            def group(i):
                g = jax.tree.map(lambda a: a[i], group_grads)
                point = jax.tree.map(jnp.add, params, perturbation(g, params))
                return jax.value_and_grad(group_value_fn)(point, i)

            groups = jax.tree.leaves(group_grads)[0].shape[0]
            values, stacked = jax.vmap(group)(jnp.arange(groups))
            adv_value, adv = tu.mean_over_leading_axis((values, stacked))
        adv = jax.tree.map(lambda a, u: a.astype(u.dtype), adv, updates)
        clean = value_fn(params) if value is None else value
        g_norm, cos = _sam_diagnostics(updates, adv, eps, extra.get("diagnose"))
        metrics = {"sharpness": wide(adv_value) - wide(clean), "grad_norm": g_norm, "cos": cos}
        return adv, SamState({k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()})

    return optax.GradientTransformationExtraArgs(init, update)


def sam_stability_threshold(learning_rate, rho, grad_norm):
    """The largest curvature λ along which SGD with SAM's ascent step stays stable:
    λ_SAM = (‖g‖ / 2ρ)(√(1 + 8ρ / (η‖g‖)) − 1), which tends to GD's 2/η as ρ → 0.

    Along an eigenvector of curvature λ, with ‖g‖ the norm of the whole gradient (held by the
    other directions), SAM's step multiplies the component by 1 − ηλ − ηρλ²/‖g‖ (the gradient
    at w + ρg/‖g‖ is g + ρλ²x/‖g‖ along it); it is stable while ηλ + ηρλ²/‖g‖ ≤ 2 (the
    linear-stability view of SAM's edge of stability: Agarwala & Dauphin 2023; Long &
    Bartlett 2024 find the threshold's dependence on ‖g‖).

    Args:
      learning_rate: η > 0.
      rho: ρ ≥ 0 (0: gradient descent).
      grad_norm: ‖g‖ > 0.

    Returns:
      λ_SAM (numpy broadcasting over the arguments).

    >>> round(float(sam_stability_threshold(0.1, 0.0, 1.0)), 6)  # 2/η
    20.0
    >>> round(float(sam_stability_threshold(0.1, 0.05, 1.0)), 3)  # ηλ + ηρλ² = 2
    12.361
    """
    lr, rho, g = (np.asarray(a, np.float64) for a in (learning_rate, rho, grad_norm))
    with np.errstate(divide="ignore", invalid="ignore"):
        sam = g / (2 * rho) * (np.sqrt(1 + 8 * rho / (lr * g)) - 1)
    return np.where(rho > 0, sam, 2 / lr)


def sam_quadratic_growth(learning_rate, rho, grad_norm, curvatures, steps: int = 400):
    """How SAM's step treats a direction of curvature λ: |x₁| after ``steps`` steps of
    ``chain(sam(rho), sgd(learning_rate))`` on ½λx₁² + ‖g‖·x₂ from x₁ = 10⁻³, divided by
    10⁻³, for each λ of ``curvatures`` (one compiled program, vmapped over them). The linear
    direction x₂ holds the gradient's norm at ``grad_norm``, so the ratio falls below 1 for
    λ below `sam_stability_threshold` and grows above it: the threshold measured.

    Args:
      learning_rate: η > 0.
      rho: SAM's ρ > 0.
      grad_norm: ‖g‖ > 0, held by the linear direction.
      curvatures: the λ to try (1-D).
      steps: SAM steps.

    Returns:
      A numpy array of |x₁(steps)| / |x₁(0)|, one per λ.

    >>> edge = float(sam_stability_threshold(0.2, 0.05, 1.0))
    >>> growth = sam_quadratic_growth(0.2, 0.05, 1.0, [0.97 * edge, 1.03 * edge], steps=300)
    >>> bool(growth[0] < 1 < growth[1])
    True
    """
    tx = optax.chain(sam(rho), optax.sgd(learning_rate))

    def one(lam):
        def loss(p):
            return 0.5 * lam * p[0] ** 2 + grad_norm * p[1]

        def step(carry, _):
            p, state = carry
            value, g = jax.value_and_grad(loss)(p)
            u, state = tx.update(g, state, p, value=value, value_fn=loss)
            return (optax.apply_updates(p, u), state), None

        p0 = jnp.array([1e-3, 0.0])
        (p, _), _ = jax.lax.scan(step, (p0, tx.init(p0)), None, length=steps)
        return jnp.abs(p[0]) / 1e-3

    return np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(curvatures, jnp.float32)))
