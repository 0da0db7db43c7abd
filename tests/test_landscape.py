"""Landscape: directions, slices, basin radii and volumes, trajectory PCA (closed forms)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sharp_minima import landscape as L
from sharp_minima.models import get_model


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def quadratic(h):
    return lambda p, b: 0.5 * jnp.sum(h * p["w"] ** 2)


def test_basin_volume_of_a_quadratic_is_the_ellipsoid(x64):
    # L = ½ tᵀHt below c is an ellipsoid with semi-axes √(2c/h_i): V = ω_n ∏ √(2c/h_i).
    h = jnp.array([0.5, 1.0, 4.0, 9.0])
    c = 0.3
    vol = L.basin_volume(
        quadratic(h),
        {"w": jnp.zeros(4)},
        None,
        key=jax.random.key(1),
        num_directions=6000,
        cutoff=c,
        rtol=1e-6,
        chunk_size=512,
    )
    exact = L.log_unit_ball(4) + float(np.sum(0.5 * np.log(2 * c / np.asarray(h))))
    assert vol.dim == 4 and vol.bounded.all()
    assert abs(vol.log_volume - exact) < 4 * vol.stderr + 1e-4, (vol.log_volume, exact)
    assert 0 < vol.stderr < 0.05
    # Each radius is exact along its own direction: ½ r² φᵀHφ = c.
    key = jax.random.fold_in(jax.random.split(jax.random.key(1))[0], 7)
    phi = L.gaussian_direction(key, {"w": jnp.zeros(4)})["w"]
    assert vol.radii[7] == pytest.approx(float(np.sqrt(2 * c / jnp.sum(h * phi**2))), rel=1e-5)
    # "increase" mode measures the rise above the loss at θ (here the same, L(0) = 0).
    r2 = L.Landscape(quadratic(h)).radii(
        {"w": jnp.zeros(4)},
        None,
        key=jax.random.key(1),
        num_directions=4,
        cutoff=c,
        mode="increase",
        rtol=1e-6,
    )[0]
    assert np.allclose(
        r2,
        L.Landscape(quadratic(h)).radii(
            {"w": jnp.zeros(4)}, None, key=jax.random.key(1), num_directions=4, cutoff=c, rtol=1e-6
        )[0],
    )


def test_log_volume_in_log_space_for_huge_n():
    # n = 10⁶ with radii 1 and 2: rⁿ overflows, the log space does not.
    logv, se, log_mean, ess = L.log_volume([1.0, 2.0], 10**6)
    assert log_mean == pytest.approx(10**6 * np.log(2) - np.log(2))
    assert ess == pytest.approx(1.0) and np.isfinite(logv)
    assert np.isnan(se)  # one direction carries it: undetermined
    boot = L.log_volume(np.linspace(1, 1.001, 50), 100, error="bootstrap", key=jax.random.key(0))
    assert 0 < boot[1] < 0.1
    with pytest.raises(ValueError, match="bootstrap"):
        L.log_volume([1.0], 3, error="bootstrap")


def test_a_log_volume_in_high_dimension_is_undetermined_and_in_low_dimension_covers_the_exact():
    """Exact ellipsoid radii r(φ) = (Σ φᵢ²/aᵢ²)^(−1/2) along uniform directions: in 4
    dimensions many directions share the weight and the bar covers the exact log-volume; in
    400 with spread axes one direction carries it, and the error is undetermined (the delta
    method's ±1 would not cover the exact value, which lies hundreds of nats above)."""
    rng = np.random.default_rng(0)

    def ellipsoid(axes, num):
        phi = rng.standard_normal((num, axes.size))
        phi /= np.linalg.norm(phi, axis=1, keepdims=True)
        radii = 1 / np.sqrt(np.sum(phi**2 / axes**2, axis=1))
        return radii, L.log_unit_ball(axes.size) + float(np.sum(np.log(axes)))

    radii, exact = ellipsoid(np.array([0.5, 1.0, 2.0, 3.0]), 4000)
    logv, se, _, ess = L.log_volume(radii, 4)
    assert ess > L.MIN_EFFECTIVE_DIRECTIONS and abs(logv - exact) < 3 * se
    radii, exact = ellipsoid(np.exp(rng.normal(0.0, 0.5, 400)), 3000)
    logv, se, _, ess = L.log_volume(radii, 400)
    assert ess < L.MIN_EFFECTIVE_DIRECTIONS and np.isnan(se)
    assert exact - logv > 10  # biased low, far beyond the ±1 the delta method would print
    vol = L.BasinVolume(logv, se, 0.0, 0.0, ess, radii, radii, radii > 0, 0.1, 0.0, 400)
    assert not vol.determined and L.UNDETERMINED.split(" (")[0] in repr(vol)
    assert "±" not in str(vol) and "400 dimensions" in str(vol)


def test_radii_count_evaluations_and_reject_a_point_above_the_cutoff():
    land = L.Landscape(quadratic(jnp.ones(3)), chunk_size=4)
    r, evals, bounded, loss0, thr = land.radii(
        {"w": jnp.zeros(3)}, None, key=jax.random.key(0), num_directions=5, cutoff=2.0, rtol=1e-3
    )
    assert np.allclose(r, 2.0, rtol=1e-3) and bounded.all() and loss0 == 0.0 and thr == 2.0
    # r0 = 1: 2 doublings (1, 2, 4 → crossed) then bisection to 1e-3: about 2 + log2(2/1e-3).
    assert 8 <= evals.min() and evals.max() <= 14
    with pytest.raises(ValueError, match="not below the cutoff"):
        land.radii(
            {"w": jnp.full(3, 3.0)}, None, key=jax.random.key(0), num_directions=2, cutoff=1.0
        )
    # A flat direction is reported unbounded at max_radius.
    flat = L.Landscape(lambda p, b: 0.5 * p["w"][0] ** 2)
    r, _, bounded, *_ = flat.radii(
        {"w": jnp.zeros(2)},
        None,
        key=jax.random.key(0),
        num_directions=3,
        cutoff=1e9,
        max_radius=64.0,
    )
    assert not bounded.any() and np.all(r >= 64.0)


def mlp_and_params():
    model = get_model("mlp", num_classes=3, widths=(5,))
    x = jax.random.normal(jax.random.key(0), (16, 4))
    y = jnp.arange(16) % 3
    params = model.init(jax.random.key(1), x)
    return model, params, {"x": x, "y": y}


def test_filter_normalized_directions():
    model, params, _ = mlp_and_params()
    d = L.filter_normalized_direction(jax.random.key(3), params)
    for (path, w), dw in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(d)):
        if w.ndim >= 2:  # each output filter (last axis) has the weight's filter norm
            np.testing.assert_allclose(
                np.linalg.norm(dw, axis=0), np.linalg.norm(w, axis=0), rtol=1e-5
            )
        else:
            assert not np.any(dw), path  # biases are zero by default
    again = L.filter_normalized_direction(jax.random.key(3), params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(d), jax.tree.leaves(again)))
    other = L.filter_normalized_direction(jax.random.key(4), params)
    assert not np.allclose(jax.tree.leaves(d)[1], jax.tree.leaves(other)[1])
    copy = L.filter_normalized_direction(jax.random.key(3), params, one_d="copy")
    bias = params["params"]["Dense_0"]["bias"]
    np.testing.assert_array_equal(copy["params"]["Dense_0"]["bias"], bias)
    norm = L.filter_normalized_direction(jax.random.key(3), params, one_d="normalize")
    b2 = norm["params"]["Dense_1"]["bias"]
    w2 = params["params"]["Dense_1"]["bias"]
    assert float(jnp.linalg.norm(b2)) == pytest.approx(float(jnp.linalg.norm(w2)), rel=1e-5)
    with pytest.raises(ValueError, match="one_d"):
        L.filter_normalized_direction(jax.random.key(3), params, one_d="keep")
    d1, d2 = L.orthogonal_pair(jax.random.key(5), params)
    assert abs(float(jax.tree.reduce(jnp.add, jax.tree.map(jnp.vdot, d1, d2)))) < 1e-4


def test_every_grid_value_equals_a_direct_evaluation_on_1_and_4_devices():
    model, params, batch = mlp_and_params()
    batches = jax.tree.map(lambda a: a.reshape((2, 8) + a.shape[1:]), batch)
    batches["y"] = batches["y"].at[1, 6:].set(0)

    def metrics(p, b):
        logits = model.apply(p, b["x"])
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), b["y"][:, None], 1).mean()
        return {"loss": ce, "accuracy": jnp.mean(jnp.argmax(logits, -1) == b["y"])}

    d1, d2 = L.orthogonal_pair(jax.random.key(2), params)
    xs, ys = np.linspace(-1, 1, 5), np.linspace(-0.5, 0.5, 3)
    weights = [8.0, 6.0]
    surfaces = [
        L.Landscape(metrics, chunk_size=2, devices=jax.devices()[:n]).slice(
            params, batches, [d1, d2], [xs, ys], weights=weights
        )
        for n in (1, 4)
    ]
    for i, a in enumerate(xs):
        for j, b in enumerate(ys):
            p = jax.tree.map(lambda w, u, v, a=a, b=b: w + a * u + b * v, params, d1, d2)
            per = [metrics(p, jax.tree.map(lambda t, k=k: t[k], batches)) for k in range(2)]
            direct = {k: (8 * per[0][k] + 6 * per[1][k]) / 14 for k in per[0]}
            for s in surfaces:
                assert s["loss"][i, j] == pytest.approx(float(direct["loss"]), rel=1e-5)
                assert s["accuracy"][i, j] == pytest.approx(float(direct["accuracy"]), abs=1e-6)
    line = L.slice_1d(metrics, params, batches, d1, xs, weights=weights)
    np.testing.assert_allclose(line["loss"], surfaces[0]["loss"][:, 1], rtol=1e-5)
    # Radii of a network's loss: the same on 1 and 4 devices, and for any chunk size.
    ce = lambda p, b: metrics(p, b)["loss"]  # noqa: E731
    radii = [
        L.Landscape(ce, chunk_size=c, devices=jax.devices()[:n]).radii(
            params, batches, key=jax.random.key(0), num_directions=6, cutoff=0.5, mode="increase"
        )[0]
        for n, c in ((1, 3), (4, 1))
    ]
    np.testing.assert_allclose(radii[0], radii[1], rtol=1e-6)
    grid_r, crossed = L.Landscape(ce, devices=jax.devices()[:4]).grid_radii(
        params, batches, key=jax.random.key(0), num_directions=4, cutoff=5.0, max_radius=50.0
    )
    assert crossed.any() and np.all(grid_r > 0)


def test_trajectory_pca_recovers_a_planar_path():
    rng = np.random.default_rng(0)
    u, v = np.linalg.qr(rng.normal(size=(20, 2)))[0].T
    t = np.linspace(0, 1, 8)
    iterates = [{"w": jnp.asarray(3 * s * u + np.sin(3 * s) * v)} for s in t]
    proj = L.trajectory_pca(iterates)
    assert proj.explained.sum() == pytest.approx(1.0, abs=1e-6)
    basis = np.stack([np.asarray(d["w"]) for d in proj.directions])
    np.testing.assert_allclose(np.abs(basis @ np.stack([u, v]).T).max(1), 1.0, atol=0.2)
    # Coordinates reconstruct every iterate relative to the last.
    last = np.asarray(iterates[-1]["w"])
    for k, it in enumerate(iterates):
        np.testing.assert_allclose(proj.coords[k] @ basis + last, it["w"], atol=1e-5)
    with pytest.raises(ValueError, match="at least 3"):
        L.trajectory_pca(iterates[:2])


def test_eigen_directions_are_the_hessian_axes(x64):
    h = jnp.array([1.0, 5.0, 3.0])
    d = L.eigen_directions(quadratic(h), {"w": jnp.ones(3)}, None, key=jax.random.key(0), k=2)
    np.testing.assert_allclose(np.abs(d[0]["w"]), [0, 1, 0], atol=1e-6)
    np.testing.assert_allclose(np.abs(d[1]["w"]), [0, 0, 1], atol=1e-6)
