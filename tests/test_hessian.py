"""Tests of sharp_minima.hessian against closed forms and dense float64 references."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from sharp_minima import hessian


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def quadratic(a):
    """Loss 0.5 x^T A x (no data): Hessian A everywhere."""
    a = jnp.asarray(a)
    return lambda x, batch: 0.5 * x @ a @ x


def matrix_with_spectrum(values, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(len(values), len(values))))
    return (q * np.asarray(values)) @ q.T


# A 2-layer, 16-unit tanh MLP on 20 examples (98 parameters), shared by several tests.


def mlp_loss(params, batch):
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    out = h @ params["w2"] + params["b2"]
    per_example = jnp.sum((out - batch["y"]) ** 2, axis=-1)
    mask = batch.get("mask", jnp.ones(per_example.shape, per_example.dtype))
    return jnp.sum(per_example * mask) / jnp.sum(mask)


def mlp_problem(dtype=jnp.float64, n=20):
    keys = jax.random.split(jax.random.key(1), 6)
    params = {
        "w1": jax.random.normal(keys[0], (3, 16), dtype),
        "b1": 0.1 * jax.random.normal(keys[1], (16,), dtype),
        "w2": jax.random.normal(keys[2], (16, 2), dtype) / 4,
        "b2": jnp.zeros((2,), dtype),
    }
    data = {
        "x": jax.random.normal(keys[3], (n, 3), dtype),
        "y": jax.random.normal(keys[4], (n, 2), dtype),
    }
    return params, data


def dense_hessian(params, data):
    flat, unravel = ravel_pytree(params)
    h = jax.hessian(lambda x: mlp_loss(unravel(x), data))(flat)
    return np.asarray(h, np.float64)


def flat_vectors(vectors):
    return np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(vectors), np.float64)


def test_hvp_of_quadratic_is_a_times_v(x64):
    a = matrix_with_spectrum(np.linspace(-2, 3, 7))
    v = np.random.default_rng(1).normal(size=7)
    got = hessian.hvp(quadratic(a), jnp.ones(7), None, jnp.asarray(v))
    np.testing.assert_allclose(got, a @ v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("which", ["LA", "SA", "LM", "BE"])
def test_eigenpairs_prescribed_spectrum_with_repeats_and_zeros(x64, which):
    spectrum = np.array([7.0, 7.0, 7.0, 3.0, 1.0, 0.0, 0.0, 0.0, -0.5, -4.0, -4.0, -9.0])
    a = matrix_with_spectrum(spectrum)
    n, k = len(spectrum), 5
    out = hessian.eigenpairs(
        quadratic(a),
        jnp.zeros(n),
        None,
        k=k,
        key=jax.random.key(3),
        num_steps=n,
        which=which,
        tol=1e-8,
        restart=True,  # repeated eigenvalues
    )
    asc = np.sort(spectrum)
    expected = {
        "LA": asc[::-1][:k],
        "SA": asc[:k],
        "LM": spectrum[np.argsort(-np.abs(spectrum), kind="stable")][:k],
        "BE": np.concatenate([asc[::-1][:3], asc[:2][::-1]]),
    }[which]
    np.testing.assert_allclose(out.values, expected, atol=1e-10)
    v = np.asarray(out.vectors)
    np.testing.assert_allclose(v @ v.T, np.eye(k), atol=1e-10)
    np.testing.assert_allclose(v @ a, out.values[:, None] * v, atol=1e-9)
    assert out.residuals.max() < 1e-9 and out.converged.all()


def test_lanczos_breakdown_continues_without_nan(x64):
    # The start vector lies in a 2-dimensional invariant subspace: Lanczos breaks down after
    # two steps and must restart to find the remaining eigenvalues.
    a = jnp.diag(jnp.array([2.0, 2.0, 5.0, 1.0, -1.0]))
    v0 = jnp.array([1.0, 0.0, 1.0, 0.0, 0.0])
    res = hessian.lanczos(lambda v: a @ v, v0, 5, key=jax.random.key(0))
    assert np.all(np.isfinite(res.alphas)) and np.all(np.isfinite(res.betas))
    assert float(res.betas[1]) == 0.0
    values, _ = hessian.tridiagonal_eigh(res.alphas, res.betas)
    np.testing.assert_allclose(values, [-1.0, 1.0, 2.0, 2.0, 5.0], atol=1e-12)
    basis = np.asarray(res.basis)
    np.testing.assert_allclose(basis @ basis.T, np.eye(5), atol=1e-12)


def test_zero_hessian_gives_zeros_not_nan(x64):
    out = hessian.eigenpairs(lambda x, b: jnp.sum(x), jnp.ones(6), None, k=2, key=jax.random.key(0))
    np.testing.assert_array_equal(out.values, [0.0, 0.0])
    assert np.all(np.isfinite(np.asarray(out.vectors)))


def test_mlp_eigenpairs_trace_density_against_dense_float64(x64):
    params, data = mlp_problem()
    h = dense_hessian(params, data)
    lam, vec = np.linalg.eigh(h)
    batches = jax.tree.map(lambda x: x[None], data)
    n = h.shape[0]
    curv = hessian.Curvature(mlp_loss)  # one object: its kernels compile once for all calls

    # The default tolerance: eigenvalues within 1e-4 * max|lambda|, found in few steps.
    quick = curv.eigenpairs(params, batches, k=4, key=jax.random.key(0))
    assert quick.converged.all() and quick.num_steps < n
    assert np.abs(quick.values - lam[::-1][:4]).max() <= 1e-4 * lam.max()
    # A tight tolerance: eigenvalues and vectors match the dense float64 reference closely,
    # and the free Lanczos residual estimates match the measured residuals.
    out = curv.eigenpairs(params, batches, k=4, key=jax.random.key(0), tol=1e-10)
    np.testing.assert_allclose(out.values, lam[::-1][:4], rtol=1e-9)
    got = flat_vectors(out.vectors)
    overlap = np.abs(np.sum(got * vec[:, ::-1][:, :4].T, axis=1))
    np.testing.assert_allclose(overlap, 1.0, atol=1e-5)  # vectors up to sign
    exact = curv.eigenpairs(
        params, batches, k=4, key=jax.random.key(0), tol=1e-10, exact_residuals=True
    )
    assert out.converged.all() and out.num_steps < n  # stopped early
    np.testing.assert_allclose(out.residuals, exact.residuals, rtol=0.1, atol=1e-12 * lam.max())

    bottom = curv.eigenpairs(params, batches, k=2, key=jax.random.key(1), which="SA")
    np.testing.assert_allclose(bottom.values, lam[:2], rtol=0, atol=1e-4 * lam.max())  # tol

    # Hutch++ with a sketch as large as the dimension is exact.
    tr = curv.trace(params, batches, key=jax.random.key(2), num_matvecs=3 * n)
    np.testing.assert_allclose(tr.value, np.trace(h), rtol=1e-8)
    # Hutchinson is unbiased: within 4 standard errors.
    tr = curv.trace(params, batches, key=jax.random.key(2), num_matvecs=200, method="hutchinson")
    assert abs(tr.value - np.trace(h)) < 4 * tr.stderr

    fro = curv.frobenius_norm(params, batches, key=jax.random.key(4), num_matvecs=200)
    assert abs(fro.value - np.linalg.norm(h)) < 4 * fro.stderr
    topk = curv.frobenius_norm(params, batches, key=jax.random.key(4), method="top_k", k=n)
    np.testing.assert_allclose(topk.value, np.linalg.norm(h), rtol=1e-8)

    sd = curv.spectral_density(params, batches, key=jax.random.key(5), num_probes=3, num_steps=12)
    # Gauss quadrature is exact for polynomials of degree < 2m: check moments per probe.
    z = np.asarray(hessian._probes(jax.random.split(jax.random.key(5))[0], 3, n, jnp.float64))
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    for p in (1, 2, 5):
        exact = np.einsum("pi,ij,pj->p", z, np.linalg.matrix_power(h, p), z)
        np.testing.assert_allclose((sd.weights * sd.nodes**p).sum(1), exact, rtol=1e-7)
    np.testing.assert_allclose(sd.weights.sum(1), 1.0, rtol=1e-10)
    integral = np.sum(sd.density) * (sd.grid[1] - sd.grid[0])
    np.testing.assert_allclose(integral, 1.0, rtol=1e-3)


def test_float32_params_match_float64_reference():
    params, data = mlp_problem(jnp.float32)
    with jax.enable_x64(True):
        h = dense_hessian(
            jax.tree.map(lambda x: x.astype(jnp.float64), params),
            jax.tree.map(lambda x: x.astype(jnp.float64), data),
        )
    out = hessian.eigenpairs(
        mlp_loss, params, jax.tree.map(lambda x: x[None], data), k=3, key=jax.random.key(0)
    )
    assert jax.tree.leaves(out.vectors)[0].dtype == jnp.float32
    np.testing.assert_allclose(out.values, np.linalg.eigvalsh(h)[::-1][:3], rtol=1e-4)


def test_ragged_weighted_batches_equal_full_data_hessian(x64):
    params, data = mlp_problem(n=10)
    h = dense_hessian(params, data)
    # Batches of 4, 4 and 2 examples: the last one is padded to 4 and masked.
    pad = {k: jnp.concatenate([v, jnp.zeros((2,) + v.shape[1:])]) for k, v in data.items()}
    pad["mask"] = jnp.concatenate([jnp.ones(10), jnp.zeros(2)])
    batches = jax.tree.map(lambda x: x.reshape((3, 4) + x.shape[1:]), pad)
    v = jax.tree.map(lambda x: jnp.ones_like(x), params)
    got = hessian.hessian_matvec(mlp_loss, params, batches, weights=[4, 4, 2])(v)
    np.testing.assert_allclose(ravel_pytree(got)[0], h @ ravel_pytree(v)[0], rtol=1e-10)
    # Equal weights would weigh the short batch's examples twice: not the full Hessian.
    wrong = hessian.hessian_matvec(mlp_loss, params, batches)(v)
    assert not np.allclose(ravel_pytree(wrong)[0], h @ ravel_pytree(v)[0], rtol=1e-3)


def test_wrt_restricts_to_a_diagonal_block(x64):
    params, data = mlp_problem()
    h = dense_hessian(params, data)
    # Flattening order of the dict is b1, b2, w1, w2: w2 is the last 32 entries.
    block = h[-32:, -32:]
    expected = np.linalg.eigvalsh(block)[::-1][:2]
    assert expected[0] == pytest.approx(expected[1])  # the last layer's Kronecker repeat
    kwargs = dict(k=2, key=jax.random.key(0), wrt="w2")
    batches = jax.tree.map(lambda x: x[None], data)
    once = hessian.eigenpairs(mlp_loss, params, batches, restart=False, **kwargs)
    # One Krylov sequence sees one copy of the repeated eigenvalue (documented) ...
    assert once.values[0] == pytest.approx(expected[0], rel=1e-6)
    assert once.values[1] < expected[1] * 0.9
    # ... the default's verifying restart finds both.
    out = hessian.eigenpairs(mlp_loss, params, batches, **kwargs)
    np.testing.assert_allclose(out.values, expected, rtol=1e-6)
    assert np.all(np.asarray(out.vectors["w1"]) == 0)


def test_warm_start_needs_fewer_steps(x64):
    params, data = mlp_problem()
    batches = jax.tree.map(lambda x: x[None], data)
    cold = hessian.eigenpairs(mlp_loss, params, batches, k=3, key=jax.random.key(0), check_every=2)
    moved = jax.tree.map(lambda x: x * 1.001, params)
    warm = hessian.eigenpairs(
        mlp_loss,
        moved,
        batches,
        k=3,
        key=jax.random.key(1),
        check_every=2,
        init_vectors=cold.vectors,
    )
    assert warm.converged.all()
    assert warm.num_steps < cold.num_steps


def test_four_devices_give_the_same_numbers_as_one():
    assert jax.device_count() >= 4, "conftest sets 4 simulated CPU devices"
    params, data = mlp_problem(jnp.float32, n=16)
    batches = jax.tree.map(lambda x: x.reshape((2, 8) + x.shape[1:]), data)
    sharded = hessian.shard_batches(batches, devices=jax.devices()[:4])
    assert len(sharded["x"].sharding.device_set) == 4
    one = hessian.eigenpairs(mlp_loss, params, batches, k=3, key=jax.random.key(0))
    four = hessian.eigenpairs(mlp_loss, params, sharded, k=3, key=jax.random.key(0))
    np.testing.assert_allclose(four.values, one.values, rtol=1e-5)
    tr1 = hessian.trace(mlp_loss, params, batches, key=jax.random.key(0), num_matvecs=9)
    tr4 = hessian.trace(mlp_loss, params, sharded, key=jax.random.key(0), num_matvecs=9)
    np.testing.assert_allclose(tr4.value, tr1.value, rtol=1e-5)
    with pytest.raises(ValueError, match="divisible by the 3 devices"):
        hessian.shard_batches(batches, devices=jax.devices()[:3])


def test_clear_errors():
    loss = quadratic(jnp.eye(4))
    x = jnp.zeros(4)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="must return a scalar"):
        hessian.eigenpairs(lambda p, b: p * 2, x, None, k=1, key=key)
    with pytest.raises(ValueError, match="num_steps=2 must be at least k=3"):
        hessian.eigenpairs(loss, x, None, k=3, num_steps=2, key=key)
    with pytest.raises(ValueError, match="exceeds the dimension 4"):
        hessian.eigenpairs(loss, x, None, k=1, num_steps=5, key=key)
    with pytest.raises(ValueError, match="k=5 exceeds the dimension"):
        hessian.eigenpairs(loss, x, None, k=5, key=key)
    with pytest.raises(ValueError, match="which must be one of"):
        hessian.eigenpairs(loss, x, None, k=1, key=key, which="largest")
    with pytest.raises(ValueError, match="tangent must have the structure"):
        hessian.hvp(loss, x, None, {"a": x})
    with pytest.raises(ValueError, match="tangent must have the leaf shapes"):
        hessian.hvp(loss, x, None, jnp.zeros(3))
    with pytest.raises(ValueError, match="selects no parameter"):
        hessian.eigenpairs(loss, {"w": x}, None, k=1, key=key, wrt="kernel")
    with pytest.raises(ValueError, match=r"weights must have shape \(2,\)"):
        hessian.trace(lambda p, b: jnp.sum(b * p**2), x, jnp.ones((2, 4)), key=key, weights=[1.0])
    with pytest.raises(FloatingPointError, match="non-finite"):
        hessian.eigenpairs(lambda p, b: jnp.sum(jnp.log(p) ** 3), -jnp.ones(4), None, k=1, key=key)


def test_importing_hessian_does_not_import_flax_or_tensorflow():
    code = (
        "import sys, sharp_minima.hessian, sharp_minima.tree_util;"
        "bad = [m for m in ('flax', 'tensorflow', 'tensorflow_datasets') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_eigenpairs_basis_grows_until_converged(x64):
    # A slowly converging spectrum (a dense cluster under the top eigenvalue): more steps
    # than the default basis of max(2k + 20, 30) rows; the basis doubles and still converges.
    spectrum = np.concatenate([[1.0], np.linspace(0.0, 0.97, 299)])
    loss = quadratic(matrix_with_spectrum(spectrum))
    out = hessian.eigenpairs(loss, jnp.zeros(300), None, k=1, key=jax.random.key(0), tol=1e-10)
    assert out.num_steps > 30 and out.converged.all()
    np.testing.assert_allclose(out.values, [1.0], rtol=1e-9)
    capped = hessian.eigenpairs(
        loss, jnp.zeros(300), None, k=1, key=jax.random.key(0), tol=1e-10, num_steps=30
    )
    assert capped.num_steps == 30 and not capped.converged.all()  # a hard limit, flagged
