"""Tests of sharp_minima.curvature (the solvers' base) and sharp_minima.operators (GGN,
Fisher, gradient covariance) against dense float64 references built with jax.jacobian."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharp_minima import curvature, hessian, losses, operators
from sharp_minima.models import get_model

# A 2-layer tanh MLP (3 -> 5 -> 3, 38 parameters) on 8 examples in 2 batches of 4.


def model_fn(params, batch):
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def problem(labels="class"):
    keys = jax.random.split(jax.random.key(3), 6)
    params = {
        "w1": jax.random.normal(keys[0], (3, 5)),
        "b1": 0.1 * jax.random.normal(keys[1], (5,)),
        "w2": jax.random.normal(keys[2], (5, 3)),
        "b2": 0.1 * jax.random.normal(keys[3], (3,)),
    }
    x = jax.random.normal(keys[4], (8, 3))
    if labels == "class":
        y = jax.random.randint(keys[5], (8,), 0, 3)
    else:
        y = jax.random.normal(keys[5], (8, 3))
    batches = jax.tree.map(lambda a: a.reshape((2, 4) + a.shape[1:]), {"x": x, "y": y})
    return params, {"x": x, "y": y}, batches


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def flat_fn(params, fn):
    flat, unravel = ravel_pytree(params)
    return flat, lambda w, *args: fn(unravel(w), *args)


def per_example_jacobians(params, data):
    """(N, C, D) Jacobians of the outputs of each example."""
    flat, f = flat_fn(params, model_fn)
    return jax.vmap(lambda x: jax.jacobian(lambda w: f(w, {"x": x[None]})[0])(flat))(data["x"])


def per_example_gradients(params, data, output_loss):
    flat, f = flat_fn(params, model_fn)

    def loss(w, x, y):
        batch = {"x": x[None], "y": y[None]}
        return output_loss.per_example(f(w, batch), batch)[0]

    return np.asarray(jax.vmap(jax.grad(loss), (None, 0, 0))(flat, data["x"], data["y"]))


def dense(op, params, batches):
    """The operator as a dense matrix, one product per unit vector."""
    flat, unravel = ravel_pytree(params)
    matvec = op.operator(params, batches)
    cols = [ravel_pytree(matvec(unravel(e)))[0] for e in np.eye(flat.size)]
    return np.stack([np.asarray(c) for c in cols], axis=1)


@pytest.fixture(scope="module")
def refs():
    """Dense float64 references for cross-entropy and squared error."""
    with jax.enable_x64(True):
        out = {}
        for name, labels in (("cross_entropy", "class"), ("squared_error", "real")):
            params, data, batches = problem(labels)
            loss = getattr(operators, name)()
            jac = np.asarray(per_example_jacobians(params, data))
            logits = np.asarray(model_fn(params, data))
            if name == "cross_entropy":
                p = np.exp(logits - logits.max(1, keepdims=True))
                p /= p.sum(1, keepdims=True)
                h_out = np.stack([np.diag(q) - np.outer(q, q) for q in p])
            else:
                h_out = np.stack([np.eye(3)] * 8)
            ggn = np.einsum("ncd,nce,nef->df", jac, h_out, jac) / 8
            g = per_example_gradients(params, data, loss)
            ef = g.T @ g / 8
            mean = g.mean(0)
            out[name] = dict(
                params=params,
                batches=batches,
                loss=loss,
                ggn=ggn,
                ef=ef,
                cov=ef - np.outer(mean, mean),
            )
        yield out


@pytest.mark.parametrize("name", ["cross_entropy", "squared_error"])
def test_operators_equal_their_dense_definitions(refs, name):
    r = refs[name]
    with jax.enable_x64(True):
        ggn = operators.GGN(model_fn, r["loss"])
        np.testing.assert_allclose(dense(ggn, r["params"], r["batches"]), r["ggn"], atol=1e-12)
        fisher = operators.Fisher(model_fn, r["loss"])
        np.testing.assert_allclose(dense(fisher, r["params"], r["batches"]), r["ef"], atol=1e-12)
        cov = operators.GradientCovariance(model_fn, r["loss"])
        got = dense(cov, r["params"], r["batches"])
        np.testing.assert_allclose(got, r["cov"], atol=1e-12)
        # The same Σ from a plain mean loss (per-example gradients by vmap over examples).
        mean_loss = lambda p, b: jnp.mean(r["loss"].per_example(model_fn(p, b), b))  # noqa: E731
        cov_loss = operators.GradientCovariance(mean_loss)
        np.testing.assert_allclose(dense(cov_loss, r["params"], r["batches"]), got, atol=1e-12)
        assert not np.allclose(r["ggn"], r["ef"], atol=1e-3)  # the three are distinct


def test_ggn_of_a_linear_model_with_squared_error_is_the_hessian():
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(0), (2, 5, 4))
        batches = {"x": x, "y": jax.random.normal(jax.random.key(1), (2, 5, 3))}
        w = jax.random.normal(jax.random.key(2), (4, 3))
        linear = lambda w, b: b["x"] @ w  # noqa: E731
        mse = lambda w, b: jnp.mean(operators.squared_error().per_example(linear(w, b), b))  # noqa: E731
        ggn = dense(operators.GGN(linear, "squared_error"), w, batches)
        hess = dense(hessian.Curvature(mse), w, batches)
        np.testing.assert_allclose(ggn, hess, atol=1e-12)
        assert np.abs(hess).max() > 0.1


def test_mc_fisher_approaches_the_ggn_within_its_standard_error(refs):
    r = refs["cross_entropy"]
    with jax.enable_x64(True):
        fisher = operators.Fisher(
            model_fn, r["loss"], kind="mc", key=jax.random.key(0), num_samples=16
        )
        draws = []
        for seed in range(8):  # new draws, same compiled kernels
            fisher.key = jax.random.key(seed)
            draws.append(dense(fisher, r["params"], r["batches"]))
        assert fisher.num_traces == 1
        draws = np.stack(draws)
        mean, se = draws.mean(0), draws.std(0, ddof=1) / np.sqrt(len(draws))
        # Unbiased: the squared error is of the size of the summed variances, not larger.
        err = np.sum((mean - r["ggn"]) ** 2) / np.sum(se**2)
        assert 0.2 < err < 3.0, err
        assert np.abs(draws[0] - r["ggn"]).max() > 1e-3  # one draw is not the GGN
        # A biased operator (the empirical Fisher) fails the same test.
        assert np.sum((r["ef"] - r["ggn"]) ** 2) / np.sum(se**2) > 10


def test_mc_fisher_trace_error_covers_the_label_sampling(refs):
    """Issue 29: one label draw's trace carried only the probes' error (4.014 ± 0.00018
    while label keys spread it by 0.69). Each probe now draws its own labels: the reported
    error matches the spread of the estimates over label keys, and the mean is tr(GGN)."""
    r = refs["cross_entropy"]
    with jax.enable_x64(True):
        fisher = operators.Fisher(model_fn, r["loss"], kind="mc", key=jax.random.key(0))
        est = []
        for seed in range(12):  # new label keys and probes, the same compiled kernel
            fisher.key = jax.random.key(100 + seed)
            est.append(
                fisher.trace(r["params"], r["batches"], key=jax.random.key(seed), num_matvecs=48)
            )
        values = np.array([e.value for e in est])
        reported = np.sqrt(np.mean([e.stderr**2 for e in est]))
        assert 0.5 < values.std(ddof=1) / reported < 2.0, (values.std(ddof=1), reported)
        exact = np.trace(r["ggn"])  # E over labels of the MC Fisher
        assert abs(values.mean() - exact) < 4 * reported / np.sqrt(len(values))
        # The empirical Fisher is not random: its trace keeps the probes' error only.
        ef = operators.Fisher(model_fn, r["loss"]).trace(
            r["params"], r["batches"], key=jax.random.key(0), num_matvecs=48
        )
        assert abs(ef.value - np.trace(r["ef"])) < 4 * ef.stderr + 1e-9


@pytest.mark.parametrize("which", ["ggn", "ef", "cov"])
def test_solvers_on_each_operator_match_numpy_eigh(refs, which):
    r = refs["cross_entropy"]
    with jax.enable_x64(True):
        op = {
            "ggn": operators.GGN(model_fn, r["loss"]),
            "ef": operators.Fisher(model_fn, r["loss"]),
            "cov": operators.GradientCovariance(model_fn, r["loss"]),
        }[which]
        m = r[which]
        lam = np.linalg.eigvalsh(m)
        params, batches = r["params"], r["batches"]
        top = op.eigenpairs(params, batches, k=3, key=jax.random.key(0), tol=1e-10)
        np.testing.assert_allclose(top.values, lam[::-1][:3], rtol=1e-8)
        assert top.converged.all()
        d = m.shape[0]
        tr = op.trace(params, batches, key=jax.random.key(1), num_matvecs=3 * d)
        np.testing.assert_allclose(tr.value, np.trace(m), rtol=1e-8)
        sld = op.spectral_density(params, batches, key=jax.random.key(2), num_probes=2, num_steps=d)
        np.testing.assert_allclose(np.sort(sld.nodes[0]), lam, atol=1e-8 * lam.max())
        fro = op.frobenius_norm(params, batches, key=jax.random.key(3), method="top_k", k=d)
        np.testing.assert_allclose(fro.value, np.linalg.norm(m), rtol=1e-8)
        # Reused at new parameters: no new compilation of the eigenpairs kernel.
        traces = op.num_traces
        moved = jax.tree.map(lambda a: 1.01 * a, params)
        op.eigenpairs(moved, batches, k=3, key=jax.random.key(0), tol=1e-10)
        assert op.num_traces == traces


def test_four_devices_give_the_same_numbers_as_one(refs):
    assert jax.device_count() >= 4
    r = refs["cross_entropy"]
    params = jax.tree.map(lambda a: a.astype(jnp.float32), r["params"])
    batches = r["batches"]
    batches = {"x": batches["x"].astype(jnp.float32), "y": batches["y"]}
    sharded = curvature.shard_batches(batches, devices=jax.devices()[:4])
    for op in (
        operators.GGN(model_fn, "cross_entropy"),
        operators.Fisher(model_fn, "cross_entropy", kind="mc", key=jax.random.key(0)),
        operators.GradientCovariance(model_fn, "cross_entropy"),
    ):
        one = op.eigenpairs(params, batches, k=2, key=jax.random.key(0))
        four = op.eigenpairs(params, sharded, k=2, key=jax.random.key(0))
        np.testing.assert_allclose(four.values, one.values, rtol=1e-4)
    # Hutch++ feeds the product kernel its own output (the sketch Q, on the batches' mesh) after
    # fresh probes: one program serves both (the probes are placed on that mesh too).
    ggn = operators.GGN(model_fn, "cross_entropy")
    ggn.trace(params, sharded, key=jax.random.key(1), num_matvecs=9)
    assert ggn.num_traces == 1


def test_a_repeated_eigenvalue_is_not_dropped_by_default(x64):
    # The spectrum starts 9, 9, 4 (full rank, D = 60): one Krylov sequence returns 9, 4, ...
    # with every pair flagged converged; the default's verifying restart finds the copy.
    rng = np.random.default_rng(0)
    spectrum = np.concatenate([[9.0, 9.0, 4.0], rng.uniform(0.1, 2.0, 57)])
    q, _ = np.linalg.qr(rng.normal(size=(60, 60)))
    a = jnp.asarray((q * spectrum) @ q.T)
    quad = lambda x, batch: 0.5 * x @ a @ x  # noqa: E731
    x0 = jnp.zeros(60)
    missed = 0
    for seed in range(3):
        key = jax.random.key(seed)
        safe = hessian.eigenpairs(quad, x0, None, k=3, key=key)
        np.testing.assert_allclose(safe.values, [9.0, 9.0, 4.0], rtol=1e-4)
        assert safe.converged.all()
        fast = hessian.eigenpairs(quad, x0, None, k=3, key=key, restart=False)
        assert fast.converged.all()
        missed += fast.values[1] < 8.9  # the documented opt-out: a copy may be dropped
    assert missed >= 2


def test_a_sharded_basis_follows_sharded_parameters():
    assert jax.device_count() >= 4
    mesh = Mesh(np.array(jax.devices()[:4]), ("fsdp",))
    rng = np.random.default_rng(1)
    # D = 259: not a multiple of the 4 devices (the basis is padded to 260 columns).
    spectrum = np.concatenate([rng.uniform(0.5, 1.0, 256), [3.0, 2.5, 0.2]])  # > 0
    a = jnp.asarray(np.diag(spectrum).astype(np.float32))
    params = {"w": jnp.zeros((64, 4)), "b": jnp.zeros(3)}

    def loss(p, batch):
        x = jnp.concatenate([p["b"], p["w"].reshape(-1)])
        return 0.5 * x @ a @ x

    sharded = {
        "w": jax.device_put(params["w"], NamedSharding(mesh, PartitionSpec("fsdp", None))),
        "b": jax.device_put(params["b"], NamedSharding(mesh, PartitionSpec())),
    }
    curv = hessian.Curvature(loss)
    one = curv.lanczos(params, None, num_steps=40, key=jax.random.key(0))
    four = curv.lanczos(sharded, None, num_steps=40, key=jax.random.key(0))
    shard = four.basis.addressable_shards[0].data
    assert shard.shape == (40, 65) and len(four.basis.sharding.device_set) == 4
    assert shard.nbytes <= 1.01 * one.basis.nbytes / 4  # each device holds a quarter
    np.testing.assert_array_equal(np.asarray(four.basis)[:, 259:], 0)  # the padding
    np.testing.assert_allclose(
        hessian.tridiagonal_eigh(four.alphas, four.betas)[0],
        hessian.tridiagonal_eigh(one.alphas, one.betas)[0],
        rtol=1e-4,
        atol=1e-5,
    )
    ordered = np.sort(spectrum)
    for which, expected in (("LA", ordered[::-1][:2]), ("SA", ordered[:2])):
        top = curv.eigenpairs(sharded, None, k=2, key=jax.random.key(0), which=which, tol=1e-6)
        # The padding is not an eigenvector: no spurious 0 among the smallest.
        np.testing.assert_allclose(top.values, expected, atol=1e-4)
        assert top.vectors["w"].shape == (2, 64, 4)
    sld = curv.spectral_density(sharded, None, key=jax.random.key(1), num_probes=2)
    assert sld.nodes.max() == pytest.approx(3.0, rel=1e-3)


def test_zoo_model_operators_are_one_line():
    model = get_model("mlp", num_classes=3, widths=(4,))
    x = jax.random.normal(jax.random.key(0), (6, 5))
    variables = model.init(jax.random.key(1), x)
    batches = {"x": x.reshape(2, 3, 5), "y": jnp.array([[0, 1, 2], [2, 1, 0]])}
    ggn = operators.GGN(losses.evaluation_model_fn(model), "cross_entropy", wrt="^params/")
    cov = operators.GradientCovariance(losses.evaluation_loss(model), wrt="^params/")
    top = ggn.eigenpairs(variables, batches, k=1, key=jax.random.key(0))
    tr = cov.trace(variables, batches, key=jax.random.key(0), num_matvecs=9)
    assert top.values[0] > 0 and tr.value > 0


def test_clear_errors(refs):
    r = refs["cross_entropy"]
    with pytest.raises(ValueError, match="output_loss must be an OutputLoss or one of"):
        operators.GGN(model_fn, "hinge")
    with pytest.raises(ValueError, match="needs key="):
        operators.Fisher(model_fn, "cross_entropy", kind="mc")
    with pytest.raises(ValueError, match="kind must be"):
        operators.Fisher(model_fn, kind="true")
    with pytest.raises(ValueError, match="batches must not be None"):
        operators.GradientCovariance(lambda p, b: jnp.sum(p)).trace(
            jnp.ones(3), None, key=jax.random.key(0)
        )
    bad = operators.OutputLoss("sum", lambda o, b: jnp.sum(o))
    with pytest.raises(ValueError, match="must return one loss per example"):
        operators.GGN(model_fn, bad).matvec(r["params"], r["batches"], r["params"])


def test_importing_the_solvers_operators_and_noise_statistics_does_not_import_flax():
    code = (
        "import sys, sharp_minima.curvature, sharp_minima.operators, sharp_minima.gradients;"
        "bad = [m for m in ('flax', 'tensorflow', 'tensorflow_datasets') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_log_det_of_the_positive_part_by_slq(x64):
    # A spectrum with a positive part (log det known), zeros and negative eigenvalues.
    rng = np.random.default_rng(2)
    positive = rng.uniform(0.5, 4.0, 30)
    spectrum = np.concatenate([positive, np.zeros(10), -rng.uniform(0.1, 1.0, 20)])
    q, _ = np.linalg.qr(rng.normal(size=(60, 60)))
    a = jnp.asarray((q * spectrum) @ q.T)
    curv = hessian.Curvature(lambda x, batch: 0.5 * x @ a @ x)
    est = curv.log_det(jnp.zeros(60), None, key=jax.random.key(0), num_probes=64, floor=1e-3)
    expected = np.log(positive).sum()
    assert abs(est.value - expected) < 4 * est.stderr and est.stderr < 0.2 * abs(expected)
    # Counting the negative part's |λ| would be far off.
    assert abs(np.log(np.abs(spectrum[spectrum != 0])).sum() - expected) > 8 * est.stderr
