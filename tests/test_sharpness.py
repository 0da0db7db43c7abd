"""ε-sharpness against closed forms (the lecture notes' toy functions), the box, subspaces, BN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sharp_minima import landscape, losses, optim, sharpness
from sharp_minima.models import get_model


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


# (loss, dimension, box maximum of f at the exact minimum 0 for ε): the box is |y_i| <= ε.
TOYS = {
    "100x^2": (lambda p, b: 100.0 * p[0] ** 2, 1, lambda e: 100 * e**2),
    "x^8": (lambda p, b: p[0] ** 8, 1, lambda e: e**8),
    "100(x^2+y^2)": (lambda p, b: 100.0 * (p[0] ** 2 + p[1] ** 2), 2, lambda e: 200 * e**2),
    "100x^2+y^8": (lambda p, b: 100.0 * p[0] ** 2 + p[1] ** 8, 2, lambda e: 100 * e**2 + e**8),
    "x^8 in 5-d": (lambda p, b: jnp.sum(p**8), 5, lambda e: 5 * e**8),
}


@pytest.mark.parametrize("name", sorted(TOYS))
@pytest.mark.parametrize("epsilon", [1e-3, 5e-4])
def test_closed_form_at_exact_minimum(x64, name, epsilon):
    f, n, box_max = TOYS[name]
    for seed in range(3):
        r = sharpness.epsilon_sharpness(
            f, jnp.zeros(n), None, epsilon=epsilon, key=jax.random.key(seed)
        )
        # φ = (max f − f(0)) / (1 + f(0)) × 100 with f(0) = 0.
        assert r.value == pytest.approx(box_max(epsilon) * 100, rel=1e-9), (seed, r)
        assert r.loss == 0.0 and r.num_evals <= 24


def test_away_from_the_minimum_box_scales_with_the_coordinates(x64):
    # f = 100 x² at x = 1: the box is |y| <= ε(|x| + 1) = 2ε, maximum at y = +2ε.
    f = TOYS["100x^2"][0]
    eps = 1e-3
    r = sharpness.epsilon_sharpness(f, jnp.ones(1), None, epsilon=eps, key=jax.random.key(0))
    expect = (100 * (1 + 2 * eps) ** 2 - 100) / (1 + 100) * 100
    assert r.value == pytest.approx(expect, rel=1e-9)
    assert float(r.perturbation[0]) == pytest.approx(2 * eps, rel=1e-12)


def test_scale_of_the_loss_does_not_matter(x64):
    for scale in (1e-12, 1.0, 1e8):
        f = lambda p, b, s=scale: s * jnp.sum((p - 3.0) ** 2 * jnp.arange(1.0, 5.0))  # noqa: E731
        r = sharpness.epsilon_sharpness(
            f, jnp.full(4, 3.0), None, epsilon=1e-3, key=jax.random.key(1)
        )
        expect = scale * 10 * (1e-3 * 4) ** 2 * 100  # Σ_i i · (ε(3 + 1))², f(x) = 0
        assert r.value == pytest.approx(expect, rel=1e-9)


def test_box_is_respected_in_full_space_and_subspace(x64):
    key = jax.random.key(3)
    w = jax.random.normal(key, (30,))
    f = lambda p, b: jnp.sum(jnp.sin(3 * p) * w) + jnp.sum(p**4)  # noqa: E731
    x = jax.random.normal(jax.random.key(4), (30,))
    eps = 1e-2
    full = sharpness.epsilon_sharpness(f, x, None, epsilon=eps, key=key)
    assert np.all(np.abs(full.perturbation) <= eps * (np.abs(x) + 1) * (1 + 1e-12))
    assert full.max_loss >= float(f(x, None))
    a = sharpness.random_subspace(jax.random.key(5), 30, 6, jnp.float64)
    sub = sharpness.epsilon_sharpness(f, x, None, epsilon=eps, key=key, subspace=a)
    y = np.linalg.lstsq(np.asarray(a), np.asarray(sub.perturbation), rcond=None)[0]
    coords = np.linalg.lstsq(np.asarray(a), np.asarray(x), rcond=None)[0]  # A⁺x
    assert np.all(np.abs(y) <= eps * (np.abs(coords) + 1) * (1 + 1e-9))
    np.testing.assert_allclose(np.asarray(a) @ y, sub.perturbation, atol=1e-12)
    assert sub.subspace_dim == 6 and 0 < sub.value <= full.value + 1e-9


def test_identity_subspace_equals_full_space(x64):
    f = lambda p, b: jnp.sum((p - 0.5) ** 2 * jnp.arange(1.0, 4.0)) + p[0] * p[1]  # noqa: E731
    x = jnp.array([0.2, -1.0, 2.0])
    kw = dict(epsilon=1e-2, key=jax.random.key(0))
    full = sharpness.epsilon_sharpness(f, x, None, **kw)
    ident = sharpness.epsilon_sharpness(f, x, None, subspace=jnp.eye(3), **kw)
    assert ident.value == pytest.approx(full.value, rel=1e-9)


def test_batchnorm_model_and_batches():
    model = get_model("f1", num_classes=3, width=8, depth=2)
    x = jax.random.normal(jax.random.key(0), (32, 5))
    y = jnp.arange(32) % 3
    variables = model.init(jax.random.key(1), x, train=False)

    def loss(v, batch):
        return losses.cross_entropy(model.apply(v, batch["x"], train=False), batch["y"])

    batches = {"x": x.reshape(4, 8, 5), "y": y.reshape(4, 8)}
    r = sharpness.epsilon_sharpness(
        loss,
        variables,
        batches,
        epsilon=1e-3,
        key=jax.random.key(2),
        wrt="^params/",
        subspace_dim=5,
    )
    assert r.value > 0 and r.loss == pytest.approx(
        float(loss(variables, {"x": x, "y": y})), rel=1e-5
    )
    # Only weights are perturbed: the BatchNorm statistics' perturbation is exactly zero.
    for leaf in jax.tree.leaves(r.perturbation["batch_stats"]):
        assert not np.any(np.asarray(leaf))
    assert any(np.any(np.asarray(v)) for v in jax.tree.leaves(r.perturbation["params"]))


def test_average_sharpness_is_half_sigma_squared_trace(x64):
    h = jnp.array([1.0, 4.0, 10.0])
    f = lambda p, b: 0.5 * jnp.sum(h * p**2)  # noqa: E731
    e = sharpness.average_sharpness(
        f, jnp.zeros(3), None, sigma=0.1, key=jax.random.key(0), num_samples=2000, chunk_size=100
    )
    expect = 0.5 * 0.01 * float(jnp.sum(h))
    assert abs(e.value - expect) < 4 * e.stderr and e.stderr < 0.1 * expect


def test_errors():
    f = TOYS["100x^2"][0]
    with pytest.raises(ValueError, match="epsilon"):
        sharpness.epsilon_sharpness(f, jnp.zeros(1), None, epsilon=0.0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="subspace must have shape"):
        sharpness.epsilon_sharpness(
            f, jnp.zeros(1), None, epsilon=1e-3, key=jax.random.key(0), subspace=jnp.eye(2)
        )


def test_interpolation_paths():
    a, b = {"w": jnp.zeros(2)}, {"w": jnp.ones(2)}
    curve = landscape.interpolation_curve(
        lambda p: {"m": float(jnp.sum(p["w"]))}, a, b, [-1.0, 0.0, 0.5, 2.0]
    )
    np.testing.assert_allclose(curve["m"], [-2.0, 0.0, 1.0, 4.0])
    half = landscape.interpolate(a, b, 0.5, path="curved")["w"]
    np.testing.assert_allclose(half, np.sin(np.pi / 4), rtol=1e-6)
    with pytest.raises(ValueError, match="path"):
        landscape.interpolate(a, b, 0.5, path="spline")


def test_proximal_pulls_towards_the_anchor():
    import optax

    tx = optax.chain(optim.proximal(1.0, inner_steps=2), optax.sgd(0.5))
    params = jnp.array([0.0])
    state = tx.init(params)
    grad = jnp.array([-1.0])  # the loss pushes +; the proximal term pulls back to x_k
    trajectory = []
    for _ in range(4):
        upd, state = tx.update(grad, state, params)
        params = params + upd
        trajectory.append(float(params[0]))
    # Anchor 0 at step 0 (update 0.5), pull at step 1: 0.5 + 0.5(1 − 0.5) = 0.75, new anchor…
    np.testing.assert_allclose(trajectory, [0.5, 0.75, 1.25, 1.5])


def test_direct_lbfgsb_driver_matches_scipy_minimize():
    import scipy.optimize

    rng = np.random.default_rng(0)
    q = rng.normal(size=(6, 6))
    h = q @ q.T + np.eye(6)
    c = rng.normal(size=6) * 3

    def fg(u):
        return 0.5 * u @ h @ u - c @ u, h @ u - c

    seen = []

    def recorded(u):
        seen.append(u.copy())
        return fg(u)

    x0 = np.zeros(6)
    sharpness._lbfgsb_unit_box(recorded, x0, max_iter=5)
    ref = scipy.optimize.minimize(
        fg,
        x0,
        jac=True,
        method="L-BFGS-B",
        bounds=[(-1.0, 1.0)] * 6,
        options={"maxiter": 5, "ftol": 0.0, "gtol": 0.0},
    )
    assert len(seen) == ref.nfev
    np.testing.assert_allclose(seen[-1], ref.x, atol=1e-12)
    assert np.all(np.abs(ref.x) <= 1.0)


def test_adaptive_sharpness_is_invariant_under_relu_rescaling_and_keskar_phi_is_not(x64):
    from sharp_minima.models import mlp

    model = mlp.MLP(widths=(6,), num_classes=3)
    x = jax.random.normal(jax.random.key(0), (16, 4), jnp.float64)
    y = jnp.arange(16) % 3
    params = jax.tree.map(
        lambda a: a.astype(jnp.float64), model.init(jax.random.key(1), x)
    )  # float64 weights
    loss = lambda p, b: losses.cross_entropy(model.apply(p, b["x"]), b["y"])  # noqa: E731
    batches = {"x": x[None], "y": y[None]}
    meter = sharpness.SharpnessMeter(loss)
    adaptive, phi = [], []
    for alpha in (0.2, 1.0, 5.0):
        p = mlp.rescale_layers(params, alpha)
        assert float(loss(p, {"x": x, "y": y})) == pytest.approx(
            float(loss(params, {"x": x, "y": y})), rel=1e-12
        )
        kw = dict(epsilon=1e-2, key=jax.random.key(2))
        adaptive.append(meter.epsilon_sharpness(p, batches, adaptive=True, **kw))
        phi.append(meter.epsilon_sharpness(p, batches, **kw).value)
        # The adaptive box is ε|x_i|: a zero-width box for every weight at exactly 0.
        flat = np.concatenate([np.ravel(a) for a in jax.tree.leaves(p)])
        pert = np.concatenate([np.ravel(a) for a in jax.tree.leaves(adaptive[-1].perturbation)])
        assert np.all(np.abs(pert) <= 1e-2 * np.abs(flat) * (1 + 1e-12))
    values = [a.value for a in adaptive]
    assert max(values) / min(values) - 1 < 1e-9  # the same function: the same number
    assert max(phi) / min(phi) > 1.5  # Keskar's box ε(|x| + 1) is not scale-invariant
    with pytest.raises(ValueError, match="alpha must be > 0"):
        mlp.rescale_layers(params, 0.0)
    with pytest.raises(ValueError, match="no layer 'Dense_5'"):
        mlp.rescale_layers(params, 2.0, second="Dense_5")
