"""Tests of the gradient noise statistics (sharp_minima.gradients) against closed forms and
dense float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sharp_minima import gradients

D, SIGMA = 5, 0.7


def linreg_loss(params, batch):
    r = batch["x"] @ params["w"] + params["b"] - batch["y"]
    return jnp.mean(0.5 * r**2)


def linreg(n, seed=0):
    """y = x·w* + σε, x ~ N(0, I); parameters w = w* + δ (b = 0, b* = 0)."""
    rng = np.random.default_rng(seed)
    w_star = rng.normal(size=D)
    delta = np.linspace(0.2, -0.3, D)
    x = rng.normal(size=(n, D))
    y = x @ w_star + SIGMA * rng.normal(size=n)
    params = {"w": jnp.asarray(w_star + delta), "b": jnp.zeros(())}
    return params, {"x": jnp.asarray(x), "y": jnp.asarray(y)}, delta


@pytest.fixture(scope="module")
def measured():
    with jax.enable_x64(True):
        params, data, delta = linreg(4096)
        batches = jax.tree.map(lambda a: a.reshape((8, 512) + a.shape[1:]), data)
        noise = gradients.GradientNoise(linreg_loss, groups={"w": "w", "b": "b"}, chunk=64)
        yield params, batches, delta, noise, noise.measure(params, batches)


def test_b_simple_of_linear_regression_matches_its_closed_form(measured):
    # gᵢ = xᵢ(xᵢ·δ − σεᵢ) (for w) and (xᵢ·δ − σεᵢ) (for b). With Gaussian x (Isserlis):
    # G = (δ, 0), Σ_w = (|δ|² + σ²) I + δδᵀ, Var(g_b) = |δ|² + σ².
    _, _, delta, _, out = measured
    d2 = float(delta @ delta)
    tr = D * (d2 + SIGMA**2) + d2 + (d2 + SIGMA**2)
    t = out.total
    assert abs(t.trace_cov - tr) < 4 * t.trace_cov_stderr
    assert abs(t.grad_norm_sq - d2) < 4 * t.grad_norm_sq_stderr
    assert abs(t.b_simple - tr / d2) < 4 * t.b_simple_stderr
    assert t.b_simple_stderr < 0.1 * t.b_simple  # a real measurement, not a wide interval
    assert out.num_examples == 4096


def test_layers_add_up_to_the_total(measured):
    _, _, delta, _, out = measured
    layers = out.layers
    assert set(layers) == {"w", "b"}
    total = out.total
    np.testing.assert_allclose(sum(v.trace_cov for v in layers.values()), total.trace_cov)
    np.testing.assert_allclose(sum(v.grad_norm_sq for v in layers.values()), total.grad_norm_sq)
    d2 = float(delta @ delta)
    assert abs(layers["b"].trace_cov - (d2 + SIGMA**2)) < 4 * layers["b"].trace_cov_stderr
    # The mean gradient is G = (δ, 0) up to sampling error.
    np.testing.assert_allclose(out.mean_gradient["w"], delta, atol=0.05)


def test_the_two_batch_estimator_agrees_with_the_per_example_one(measured):
    params, batches, _, _, out = measured
    with jax.enable_x64(True):
        data = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), batches)
        fn = gradients.two_batch_grad(linreg_loss, small_size=8)
        loss, grads, stats = jax.jit(fn)(params, data)
        # The split gradient is the batch gradient.
        full = jax.value_and_grad(linreg_loss)(params, data)
        np.testing.assert_allclose(grads["w"], full[1]["w"], atol=1e-12)
        np.testing.assert_allclose(loss, full[0], rtol=1e-12)

        # 256 steps' worth of small batches: random orders of the same examples.
        def shuffled(key):
            perm = jax.random.permutation(key, 4096)
            return fn(params, jax.tree.map(lambda a: a[perm], data))[2]

        many = jax.jit(jax.vmap(shuffled))(jax.random.split(jax.random.key(0), 256))
        small_sq = np.asarray(many["small_sq"])
        g2, tr = gradients.two_batch(small_sq.mean(), float(stats["big_sq"]), 8, 4096)
    se_tr = small_sq.std(ddof=1) / np.sqrt(len(small_sq)) / (1 / 8 - 1 / 4096)
    noise = np.hypot(se_tr, out.total.trace_cov_stderr)
    assert abs(tr - out.total.trace_cov) < 4 * noise
    assert abs(g2 - out.total.grad_norm_sq) < 4 * np.hypot(
        se_tr / 4096 * 8 / 8, out.total.grad_norm_sq_stderr
    )
    # The biased estimate (a small batch's squared gradient norm) is |G|² + tr Σ / 8: far
    # outside the noise.
    assert small_sq.mean() - out.total.grad_norm_sq > 10 * se_tr / 8


def test_projected_per_example_norms_are_unbiased(measured):
    params, batches, delta, noise, out = measured
    with jax.enable_x64(True):
        proj = noise.measure(params, batches, num_probes=4, key=jax.random.key(3))
    d2 = float(delta @ delta)
    tr = D * (d2 + SIGMA**2) + d2 + (d2 + SIGMA**2)
    t = proj.total
    assert abs(t.trace_cov - tr) < 4 * t.trace_cov_stderr
    assert abs(t.b_simple - out.total.b_simple) < 4 * t.b_simple_stderr
    # The projections add noise: a wider interval than the exact per-example one.
    assert t.trace_cov_stderr > out.total.trace_cov_stderr
    assert t.trace_cov != out.total.trace_cov


def test_b_noise_matches_a_dense_reference():
    with jax.enable_x64(True):
        params, data, _ = linreg(64, seed=1)
        params = {"w": params["w"] * 1.0, "b": jnp.asarray(0.3)}
        # A loss with a non-identity Hessian: scaled inputs.
        data["x"] = data["x"] * jnp.linspace(0.3, 3.0, D)
        batches = jax.tree.map(lambda a: a[None], data)
        noise = gradients.GradientNoise(linreg_loss)
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        f = lambda w, x, y: linreg_loss(unravel(w), {"x": x[None], "y": y[None]})  # noqa: E731
        g = np.asarray(jax.vmap(jax.grad(f), (None, 0, 0))(flat, data["x"], data["y"]))
        h = np.asarray(jax.hessian(lambda w: linreg_loss(unravel(w), data))(flat))
        n = len(g)
        sigma = np.cov(g.T, bias=False)
        mean = g.mean(0)
        tr_hs = np.trace(h @ sigma)
        ref = tr_hs / (mean @ h @ mean - tr_hs / n)
        # Every example once: exact.
        exact = noise.b_noise(params, batches, key=jax.random.key(0), num_examples=n)
        np.testing.assert_allclose(exact.value, ref, rtol=1e-10)
        # A random draw of examples: within its standard error.
        est = noise.b_noise(params, batches, key=jax.random.key(0), num_examples=32)
        assert abs(est.value - ref) < 4 * est.stderr and est.stderr > 0
        b_simple = noise.measure(params, batches).total.b_simple
        assert abs(ref - b_simple) > 0.1 * ref  # H is not ∝ I: the two differ


def test_clear_errors():
    noise = gradients.GradientNoise(linreg_loss)
    with pytest.raises(ValueError, match="batches must not be None"):
        noise.measure({"w": jnp.zeros(D), "b": jnp.zeros(())}, None)
    with pytest.raises(ValueError, match="small_size must be >= 1"):
        gradients.two_batch_grad(linreg_loss, 0)
    with pytest.raises(ValueError, match="needs key="):
        noise.measure(
            {"w": jnp.zeros(D), "b": jnp.zeros(())}, {"x": jnp.ones((1, 2, D))}, num_probes=2
        )
    with pytest.raises(ValueError, match="small_size < big_size"):
        gradients.two_batch(1.0, 1.0, 8, 8)
