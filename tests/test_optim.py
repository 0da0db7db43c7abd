"""optax transforms of sharp_minima.optim: invariants, exact projections, NSGD = Newton on the
paper's quadratic, directions refreshed by a hook during training (and after a resume)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import load_config, read_jsonl

from sharp_minima import optim, train, tree_util


def _params():
    return {"a": jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3), "b": jnp.ones(4, jnp.float16)}


def _orthonormal(params, k, seed=0):
    """k orthonormal params-shaped directions (leading axis k), from a QR of random vectors."""
    flat, unravel = jax.flatten_util.ravel_pytree(
        jax.tree.map(lambda x: x.astype(jnp.float32), params)
    )
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(flat.size, k)))
    return jax.vmap(unravel)(jnp.asarray(q.T, jnp.float32))


TRANSFORMS = {
    "nudge": lambda d: optim.nudge(d, 0.1),
    "project_onto": optim.project_onto,
    "project_out": optim.project_out,
    "nsgd": lambda d: optim.nsgd(0.1, d, 0.1),
    "nsgd_momentum": lambda d: optim.nsgd(0.1, d, 0.1, momentum=0.9),
    "nsgd_momentum_nudged_grads": lambda d: optim.nsgd(
        0.1, d, 0.1, momentum=0.9, nudge_velocity=False
    ),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_generic_invariants(name):
    params = _params()
    tx = TRANSFORMS[name](_orthonormal(params, 2))
    state = jax.jit(tx.init)(params)
    grads = jax.tree.map(lambda p: (p * 0.5 - 1).astype(p.dtype), params)
    updates, new_state = jax.jit(tx.update)(grads, state, params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
        assert u.shape == p.shape and u.dtype == p.dtype and bool(jnp.all(jnp.isfinite(u)))
    zero = optim.nudge(None, 0.5, num_directions=3).init(params)  # zeros until refreshed
    assert jax.tree.leaves(zero.directions)[0].shape == (3, 2, 3)


def test_projections_are_exact():
    params = _params()
    params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    dirs = _orthonormal(params, 3, seed=1)
    u = jax.tree.map(lambda x: jnp.sin(x + 1.0), params)
    onto, _ = optim.project_onto(dirs).update(u, optim.project_onto(dirs).init(params))
    out, _ = optim.project_out(dirs).update(u, optim.project_out(dirs).init(params))
    coeff = lambda t: np.asarray(jax.vmap(lambda d: tree_util.dot(d, t))(dirs))  # noqa: E731
    np.testing.assert_allclose(coeff(out), 0.0, atol=1e-6)  # nothing left along e_k
    np.testing.assert_allclose(coeff(onto), coeff(u), rtol=1e-5)  # all of it kept
    for a, b, c in zip(jax.tree.leaves(onto), jax.tree.leaves(out), jax.tree.leaves(u)):
        np.testing.assert_allclose(a + b, c, rtol=1e-5, atol=1e-6)
    # onto lies in the span: projecting it again changes nothing
    again, _ = optim.project_onto(dirs).update(onto, optim.project_onto(dirs).init(params))
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(onto)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_nsgd_is_a_newton_step_on_the_papers_quadratic():
    """Jastrzębski et al., App. E: diag(H) = [100 x 5, 1, 1], NSGD(γ = 0.01, K = 5) = Newton."""
    with jax.enable_x64(True):
        h = jnp.asarray([100.0] * 5 + [1.0, 1.0], jnp.float64)
        x = jnp.asarray(np.random.default_rng(0).normal(size=7))
        grad = jax.grad(lambda x: 0.5 * jnp.sum(h * x**2))(x)
        eta = 0.7
        tx = optim.nsgd(eta, jnp.eye(7, dtype=jnp.float64)[:5], gamma=0.01)
        updates, _ = tx.update(grad, tx.init(x), x)
        np.testing.assert_allclose(updates, -eta * grad / h, rtol=1e-12)


def test_velocity_buffer_keeps_the_uncorrected_velocity():
    e = jnp.eye(3)[:1]
    tx = optim.nsgd(1.0, e, gamma=0.0, momentum=0.5)
    state = tx.init(jnp.zeros(3))
    g = jnp.ones(3)
    u1, state = tx.update(g, state)
    u2, state = tx.update(g, state)
    np.testing.assert_allclose(state[0].trace, [1.5, 1.5, 1.5])  # v = 0.5 v + g, not nudged
    np.testing.assert_allclose(u2, [0.0, -1.5, -1.5])
    other = optim.nsgd(1.0, e, gamma=0.0, momentum=0.5, nudge_velocity=False)
    s2 = other.init(jnp.zeros(3))
    _, s2 = other.update(g, s2)
    _, s2 = other.update(g, s2)
    np.testing.assert_allclose(s2[1][0].trace, [0.0, 1.5, 1.5])  # nudged gradients accumulate


def test_bad_directions_are_refused():
    with pytest.raises(ValueError, match="orthonormal"):
        optim.nudge(jnp.ones((2, 3)), 0.1)
    with pytest.raises(ValueError, match="num_directions"):
        optim.project_out()
    with pytest.raises(ValueError, match="params-shaped"):
        optim.project_out(jnp.eye(3)[:1]).init(jnp.zeros(4))
    with pytest.raises(ValueError, match="gamma"):
        optim.nudge(jnp.eye(3)[:1], -1.0)


def test_directions_refreshed_by_a_hook_take_effect_next_step_and_survive_resume(tmp_path):
    config = load_config(
        "swissroll.py:tiny",
        **{
            "data.max_train": 64,
            "batch_size": 16,
            "progress": False,
            "num_epochs": 2,
            "checkpoint.every_steps": 4,
        },
    )
    tx = optax.chain(optim.project_out(num_directions=1), optax.sgd(0.1))
    seen = {}

    def first_kernel(params):
        return np.asarray(params["Dense_0"]["kernel"])

    def refresh(ctx):  # at step 2: freeze entry [0, 0] of the first kernel from step 3 on
        if ctx.step != 2:
            return None
        seen["kernel"] = first_kernel(ctx.state.params)
        e = jax.tree.map(jnp.zeros_like, ctx.state.params)
        e["Dense_0"]["kernel"] = e["Dense_0"]["kernel"].at[0, 0].set(1.0)
        new = jax.tree.map(lambda x: x[None], e)
        return ctx.state.replace(
            opt_state=optax.tree_utils.tree_set(ctx.state.opt_state, directions=new)
        )

    def kill(ctx):
        raise RuntimeError("simulated kill")

    with pytest.raises(RuntimeError, match="simulated kill"):
        train.train(
            config,
            str(tmp_path),
            tx=tx,
            hooks=[train.Hook(refresh, every_steps=1), train.Hook(kill, every_steps=6)],
        )
    assert max(r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")) >= 6
    resumed = train.train(config, str(tmp_path), tx=tx)  # no hook: directions from the checkpoint
    assert resumed.resumed_from == 4 and int(resumed.state.step) == 8
    final = first_kernel(resumed.state.params)
    assert final[0, 0] == seen["kernel"][0, 0]  # frozen since step 2, across the resume
    assert np.abs(final - seen["kernel"]).max() > 0  # the other entries moved


# ------------------------------------------------------------------------------------- SAM


def _mlp_loss(params, batch):
    h = jnp.tanh(batch["x"] @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    logits = h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def _mlp(seed=0, din=5, width=6, classes=3):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "Dense_0": {
            "kernel": jax.random.normal(k1, (din, width)) / 2,
            "bias": jnp.full(width, 0.1),
        },
        "Dense_1": {"kernel": jax.random.normal(k2, (width, classes)) / 2, "bias": jnp.zeros(3)},
    }


def _batches(steps, size=16, din=5, seed=1):
    rng = np.random.default_rng(seed)
    return {
        "x": jnp.asarray(rng.normal(size=(steps, size, din)), jnp.float32),
        "y": jnp.asarray(rng.integers(0, 3, (steps, size))),
    }


def _run(step, params, state, batches):
    """``step(params, state, batch)`` over the batches in one scan (one compiled program)."""

    def body(carry, batch):
        return step(*carry, batch), None

    return jax.jit(lambda p, s, b: jax.lax.scan(body, (p, s), b)[0])(params, state, batches)


RHO, LR = 0.05, 0.5


def test_sam_is_the_two_pass_step_and_optax_contrib_sam_in_opaque_mode():
    """10 steps, each on a new mini-batch: ours, the published algorithm written out, and
    optax.contrib.sam in opaque mode (its adversarial step ρ g/‖g‖, the same batch through
    ``grad_fn``) agree to 1e-6; so do the metrics a step leaves in its state."""
    params, batches = _mlp(), _batches(10)
    tx = optax.chain(optim.sam(RHO), optax.sgd(LR))

    def ours(p, s, batch):
        value, g = jax.value_and_grad(_mlp_loss)(p, batch)
        u, s = tx.update(g, s, p, value=value, value_fn=lambda q: _mlp_loss(q, batch))
        return optax.apply_updates(p, u), s

    def by_hand(p, s, batch):
        g = jax.grad(_mlp_loss)(p, batch)
        n = tree_util.norm(g)
        e = jax.tree.map(lambda x: RHO * x / n, g)
        g_sam = jax.grad(_mlp_loss)(jax.tree.map(jnp.add, p, e), batch)
        return jax.tree.map(lambda q, x: q - LR * x, p, g_sam), s

    ref = optax.contrib.sam(
        optax.sgd(LR),
        optax.chain(optax.contrib.normalize(), optax.sgd(RHO)),
        sync_period=2,
        opaque_mode=True,
    )

    def contrib(p, s, batch):
        g = jax.grad(_mlp_loss)(p, batch)
        u, s = ref.update(g, s, p, grad_fn=lambda q, _: jax.grad(_mlp_loss)(q, batch))
        return optax.apply_updates(p, u), s

    got, state = _run(ours, params, tx.init(params), batches)
    for other, init in ((by_hand, None), (contrib, ref.init(params))):
        want, _ = _run(other, params, init, batches)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert float(tree_util.norm(tree_util.sub(got, params))) > 0.1  # it moved
    # The last step's diagnostics, recomputed by hand from its own batch.
    last = {k: v[-1] for k, v in batches.items()}
    before, _ = _run(by_hand, params, None, {k: v[:-1] for k, v in batches.items()})

    @jax.jit
    def diagnostics(p, batch):
        g = jax.grad(_mlp_loss)(p, batch)
        point = jax.tree.map(lambda q, x: q + RHO * x / tree_util.norm(g), p, g)
        g_sam = jax.grad(_mlp_loss)(point, batch)
        return {
            "sharpness": _mlp_loss(point, batch) - _mlp_loss(p, batch),
            "grad_norm": tree_util.norm(g),
            "cos": tree_util.dot(g, g_sam) / (tree_util.norm(g) * tree_util.norm(g_sam)),
        }

    want = diagnostics(before, last)
    for k, v in state[0].sam_metrics.items():
        np.testing.assert_allclose(v, want[k], rtol=1e-4 if k == "sharpness" else 1e-6)
    assert float(want["sharpness"]) > 0  # the ascent step raises the loss


def test_asam_scales_weights_by_their_magnitude_and_leaves_biases_alone():
    """ε = ρ T² g / ‖T g‖ with T = |w| + η on kernels, 1 on biases, computed in numpy."""
    params, batch = _mlp(), {k: v[0] for k, v in _batches(1).items()}
    rho, eta = 0.5, 0.01
    grad = jax.jit(jax.grad(_mlp_loss))
    g = grad(params, batch)
    t = {
        layer: {"kernel": np.abs(np.asarray(p["kernel"])) + eta, "bias": np.ones(p["bias"].shape)}
        for layer, p in params.items()
    }
    tg = jax.tree.map(lambda a, b: a * np.asarray(b, np.float64), t, g)
    n = np.sqrt(sum(float(np.sum(x**2)) for x in jax.tree.leaves(tg)))
    point = jax.tree.map(lambda p, a, b: np.asarray(p) + rho * a * b / n, params, t, tg)
    want = grad(
        jax.tree.map(jnp.asarray, point, is_leaf=lambda x: isinstance(x, np.ndarray)), batch
    )
    tx = optim.sam(rho, adaptive=True, eta=eta)
    got = jax.jit(
        lambda g, p, b: tx.update(g, tx.init(p), p, value_fn=lambda q: _mlp_loss(q, b))[0]
    )(g, params, batch)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert optim.asam_mask(params) == {
        "Dense_0": {"kernel": True, "bias": False},
        "Dense_1": {"kernel": True, "bias": False},
    }


def test_m_sharpness_is_the_mean_over_groups_each_perturbed_by_its_own_gradient():
    params, batch = _mlp(), {k: v[0] for k, v in _batches(1).items()}
    groups = 4
    split = jax.tree.map(lambda a: a.reshape((groups, -1) + a.shape[1:]), batch)

    @jax.jit
    def one_group(p, b):  # SAM on one group, by hand
        g = jax.grad(_mlp_loss)(p, b)
        point = jax.tree.map(lambda q, x: q + RHO * x / tree_util.norm(g), p, g)
        return jax.grad(_mlp_loss)(point, b), _mlp_loss(point, b) - _mlp_loss(p, b)

    want, sharp = [], []
    for i in range(groups):  # a Python loop over the groups
        g, s = one_group(params, {k: v[i] for k, v in split.items()})
        want.append(g)
        sharp.append(s)
    want = jax.tree.map(lambda *a: np.mean(a, 0), *want)
    tx = optim.sam(RHO)

    @jax.jit
    def ours(p, split):
        group_grads = jax.vmap(jax.grad(_mlp_loss), (None, 0))(p, split)
        whole = {k: v.reshape((-1,) + v.shape[2:]) for k, v in split.items()}
        m_sharp = tx.update(
            jax.tree.map(lambda a: a.mean(0), group_grads),
            tx.init(p),
            p,
            value=jax.vmap(_mlp_loss, (None, 0))(p, split).mean(),
            value_fn=lambda q: _mlp_loss(q, whole),
            group_grads=group_grads,
            group_value_fn=lambda q, i: _mlp_loss(q, jax.tree.map(lambda a: a[i], split)),
        )
        plain = tx.update(  # one perturbation of the whole batch (m = batch)
            jax.grad(_mlp_loss)(p, whole), tx.init(p), p, value_fn=lambda q: _mlp_loss(q, whole)
        )
        return m_sharp, plain[0]

    (got, state), whole = ours(params, split)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(state.sam_metrics["sharpness"], np.mean(sharp), rtol=1e-4)
    assert float(tree_util.norm(tree_util.sub(whole, got))) > 1e-3  # m matters


def test_sam_is_finite_at_a_zero_gradient_where_optax_contrib_sam_is_not():
    value_fn = lambda p: jnp.sum(p["w"] ** 2)  # noqa: E731 - its minimum: g = 0
    for dtype in (jnp.float32, jnp.float16):  # float16: the epsilon is added in float32
        params = {"w": jnp.zeros(3, dtype)}
        zero = jax.grad(value_fn)(params)
        for tx in (optim.sam(RHO), optim.sam(RHO, adaptive=True)):
            u, s = tx.update(zero, tx.init(params), params, value_fn=value_fn)
            assert np.all(np.asarray(u["w"]) == 0) and u["w"].dtype == dtype
            assert all(np.isfinite(float(v)) for v in s.sam_metrics.values())
    ref = optax.contrib.sam(
        optax.sgd(LR), optax.chain(optax.contrib.normalize(), optax.sgd(RHO)), opaque_mode=True
    )
    u, _ = ref.update(zero, ref.init(params), params, grad_fn=lambda q, _: jax.grad(value_fn)(q))
    assert np.isnan(np.asarray(u["w"])).all()  # no epsilon in its normalisation
    with pytest.raises(ValueError, match="value_fn"):
        optim.sam(RHO).update(zero, optim.sam(RHO).init(params), params)
    with pytest.raises(ValueError, match="rho"):
        optim.sam(0.0)
    config = load_config("swissroll.py:tiny", **{"sam.rho": 0.05})
    with pytest.raises(train.ConfigError, match="config.sam.rho > 0 builds SAM"):
        train.resolve_optimizer(config, 4, optax.sgd(0.1))
    with pytest.raises(train.ConfigError, match="sam.group_size"):
        train.validate_config(load_config("swissroll.py:tiny", **{"sam.group_size": 3}))


def test_a_sam_step_of_the_trainer_takes_two_gradients_and_the_clean_passs_batchnorm_stats():
    """The compiled train step traces the loss twice with SAM (clean pass, perturbed pass),
    once without, and once with SAM's m-sharpness on this network of dense layers (both
    passes replay its program: `per_example.group_ascent`; ASAM's perturbed pass is traced
    again, vmapped over the groups); the BatchNorm statistics are the clean pass's: those of
    a plain step, and with 4 groups the mean of the groups' own. The m-sharpness steps equal
    a Python loop over the groups."""
    config = load_config(
        "f1.py:tiny",
        **{"data.name": "swissroll", "data.max_train": 64, "batch_size": 16, "num_devices": 1,
           "model.kwargs.width": 8, "model.kwargs.depth": 2},
    )  # fmt: skip
    run = train.setup(config)
    base = train.classification_loss(run.model)
    traced = []

    def loss(*args):
        traced.append(1)
        return base(*args)

    x, y = run.data.x_train[:16], run.data.y_train[:16]
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    sam = optax.chain(optim.sam(0.05), optax.sgd(0.1))
    asam = optax.chain(optim.sam(0.05, adaptive=True), optax.sgd(0.1))
    out = {}
    start = train.init_state(run.model, sam, batch["x"][:1], jax.random.key(0))
    variants = (("plain", optax.sgd(0.1), 1, 1), ("sam", sam, 1, 2), ("m=4", sam, 4, 1),
                ("asam m=4", asam, 4, 2))  # fmt: skip
    for name, tx, groups, traces in variants:
        state = train.steps.fresh_copy(start.replace(opt_state=tx.init(start.params)))
        traced.clear()
        step = train.make_train_step(loss, tx, run.mesh, groups=groups)
        out[name] = step(state, batch)
        assert len(traced) == traces, (name, len(traced))
    stats = {k: v[0].batch_stats for k, v in out.items()}
    for a, b in zip(jax.tree.leaves(stats["plain"]), jax.tree.leaves(stats["sam"])):
        np.testing.assert_array_equal(a, b)
    assert "sam/sharpness" in out["sam"][1] and "sam/sharpness" not in out["plain"][1]
    # m = 4: each group of 4 normalised by its own statistics, the running ones averaged.
    state = start
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), 0)
    split = jax.tree.map(lambda a: a.reshape(4, 4, *a.shape[1:]), batch)
    own = jax.jit(
        jax.vmap(lambda b, k: base(state.params, state.batch_stats, b, k)[1]["model_state"])
    )(split, jax.random.split(key, 4))
    for a, b in zip(jax.tree.leaves(stats["m=4"]), jax.tree.leaves(own)):
        np.testing.assert_allclose(a, np.mean(b, 0), rtol=1e-6, atol=1e-7)
    pairs = zip(jax.tree.leaves(stats["m=4"]), jax.tree.leaves(stats["plain"]))
    assert not all(np.allclose(a, b) for a, b in pairs)  # the variances are the groups'
    # The m = 4 step's parameters, from a Python loop over the groups written out: each
    # group's gradient, its own ε, its gradient there (same batch statistics mode, same key).

    @functools.partial(jax.jit, static_argnames="adaptive")
    def group_sam_gradient(b, k, adaptive):
        def f(p):
            return base(p, state.batch_stats, b, k)[0]

        g = jax.grad(f)(state.params)
        t = jax.tree.map(  # ASAM: T = |w| + 0.01 on every leaf but biases
            lambda w, m: jnp.abs(w) + 0.01 if m and adaptive else jnp.ones_like(w),
            state.params,
            optim.asam_mask(state.params),
        )
        tg = jax.tree.map(jnp.multiply, t, g)
        point = jax.tree.map(
            lambda w, a, b: w + 0.05 * a * b / tree_util.norm(tg), state.params, t, tg
        )
        return jax.grad(f)(point)

    keys = jax.random.split(key, 4)
    for name, adaptive in (("m=4", False), ("asam m=4", True)):
        grads = [
            group_sam_gradient({k: v[i] for k, v in split.items()}, keys[i], adaptive)
            for i in range(4)
        ]
        want = jax.tree.map(lambda w, *g: w - 0.1 * np.mean(g, 0), state.params, *grads)
        for a, b in zip(jax.tree.leaves(out[name][0].params), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # SAM's ‖g‖ (g: the groups' mean clean gradient) is formed on log steps only: off one
    # (log_every=2, step 1) the same step moves the parameters alike and reports 0.
    clean = [
        jax.grad(lambda p, i=i: base(p, state.batch_stats, jax.tree.map(lambda a: a[i], split),
                                     keys[i])[0])(state.params)
        for i in range(4)
    ]  # fmt: skip
    mean = jax.tree.map(lambda *g: np.mean(g, 0), *clean)
    np.testing.assert_allclose(out["m=4"][1]["sam/grad_norm"], tree_util.norm(mean), rtol=1e-5)
    state = train.steps.fresh_copy(start.replace(opt_state=sam.init(start.params)))
    off, metrics = train.make_train_step(base, sam, run.mesh, groups=4, log_every=2)(state, batch)
    assert float(metrics["sam/grad_norm"]) == float(metrics["sam/cos"]) == 0.0
    assert float(metrics["minibatch/grad_norm"]) == 0.0
    for a, b in zip(jax.tree.leaves(off.params), jax.tree.leaves(out["m=4"][0].params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_sam_diverges_just_above_its_stability_threshold_and_settles_just_below():
    """L = ½λx² + c·y: the gradient's norm is ≈ c (held by y), and SAM's step multiplies x by
    1 − ηλ − ηρλ²/c: x grows when λ is 5% above `sam_stability_threshold(η, ρ, c)` and
    shrinks 5% below it — while plain gradient descent is stable at both (2/η is higher)."""
    lr, rho, c = 0.1, 0.05, 1.0
    threshold = float(optim.sam_stability_threshold(lr, rho, c))
    assert threshold < 2 / lr
    tx = optax.chain(optim.sam(rho), optax.sgd(lr))

    @jax.jit
    def final_x(lam):
        def value(p):
            return 0.5 * lam * p["x"] ** 2 + c * p["y"]

        def body(_, carry):
            p, s = carry
            u, s = tx.update(jax.grad(value)(p), s, p, value=value(p), value_fn=value)
            return optax.apply_updates(p, u), s

        p = {"x": jnp.float32(1e-3), "y": jnp.float32(0.0)}
        return jax.lax.fori_loop(0, 60, body, (p, tx.init(p)))[0]["x"]

    above, below = final_x(1.05 * threshold), final_x(0.95 * threshold)
    assert abs(float(above)) > 1e-2 > 1e-3 > abs(float(below)), (above, below)
