"""optax transforms of sharp_minima.optim: invariants, exact projections, NSGD = Newton on the
paper's quadratic, directions refreshed by a hook during training (and after a resume)."""

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
