"""Curvature tracking: the hook's numbers are eigenpairs' numbers; warm starts save HVPs."""

import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import load_config, read_jsonl

from sharp_minima import data, hessian, losses, operators, optim, tracking, train
from sharp_minima.models import get_model
from sharp_minima.train import loop as train_loop


def _problem():
    ds = data.load("mnist1d", seed=0, max_train=512)
    model = get_model("mlp", num_classes=10, widths=(32, 32), activation="tanh")
    params = model.init(jax.random.key(0), jnp.asarray(ds.x_train[:1]))
    batches, weights = data.curvature_batches(
        jax.random.key(1), ds.x_train, ds.y_train, num_examples=256, batch_size=128
    )
    return model, params, ds, batches, weights


def test_tracking_equals_a_direct_eigenpairs_call_and_warm_starts_save_hvps():
    model, variables, ds, batches, weights = _problem()
    loss = losses.evaluation_loss(model)
    tracker = tracking.EigenTracker(loss, batches, key=jax.random.key(2), k=3, weights=weights)
    tx = optax.adam(1e-2)
    opt_state = tx.init(variables)
    x, y = jnp.asarray(ds.x_train[:128]), jnp.asarray(ds.y_train[:128])
    warm, cold = [], []
    for step in range(4):
        m = tracker.measure(variables, step)
        direct = hessian.eigenpairs(
            loss,
            variables,
            batches,
            k=3,
            key=jax.random.fold_in(jax.random.key(2), step),
            weights=weights,
            init_vectors=tracker.history and None,
        )
        cold.append(direct.num_steps)
        if step:
            warm.append(m["hessian/num_hvps"])
        np.testing.assert_allclose(
            [m[f"hessian/lambda_{i + 1}"] for i in range(3)], direct.values, rtol=1e-3
        )
        np.testing.assert_allclose(
            m["hessian/frobenius_top3"], np.linalg.norm(direct.values), rtol=1e-3
        )
        for _ in range(5):  # a few training steps between measurements
            g = jax.grad(lambda v: loss(v, {"x": x, "y": y}))(variables)
            updates, opt_state = tx.update(g, opt_state)
            variables = optax.apply_updates(variables, updates)
    assert tracker.curvature.num_traces == 1  # compiled once, reused at every call
    print(f"HVPs per call: warm {warm}, cold {cold[1:]}")
    assert np.mean(warm) < np.mean(cold[1:]), (warm, cold)


def test_subset_fixed_resampled_augmented_and_bad_sizes():
    x = np.arange(200.0, dtype=np.float32).reshape(50, 2, 2, 1)
    y = np.arange(50) % 3
    key = jax.random.key(0)
    fixed = tracking.Subset(key, x, y, fraction=0.2, batch_size=4)
    (b0, w0), (b1, _) = fixed(0), fixed(7)
    assert b0["x"].shape == (2, 4, 2, 2, 1) and fixed.size == 8 and w0.tolist() == [1.0, 1.0]
    np.testing.assert_array_equal(b0["x"], b1["x"])  # the same examples at every call
    # Each row of the subset is one training example with its own label.
    flat = np.asarray(b0["x"]).reshape(8, -1)
    np.testing.assert_array_equal(np.asarray(b0["y"]).ravel(), (flat[:, 0] // 4).astype(int) % 3)
    fresh = tracking.Subset(key, x, y, num_examples=8, batch_size=4, resample=True)
    assert not np.array_equal(fresh(0)[0]["x"], fresh(1)[0]["x"])
    np.testing.assert_array_equal(fresh(3)[0]["x"], fresh(3)[0]["x"])  # a draw per step
    flip = lambda k, imgs: imgs[:, :, ::-1]  # noqa: E731 - a deterministic "augmentation"
    aug = tracking.Subset(key, x, y, fraction=0.2, batch_size=4, augment=flip)
    np.testing.assert_array_equal(aug(0)[0]["x"], b0["x"][:, :, :, ::-1])
    assert "augmented" in aug.describe() and "fresh" in fresh.describe()
    with pytest.raises(ValueError, match="1..50 examples"):
        tracking.Subset(key, x, y, num_examples=51)
    with pytest.raises(ValueError, match="1..50 examples"):
        tracking.Subset(key, x, y, fraction=0.001)


def test_stochastic_norms_match_direct_calls_and_hook_schedule(tmp_path):
    model, variables, ds, batches, weights = _problem()
    loss = losses.evaluation_loss(model)
    tracker = tracking.EigenTracker(
        loss, batches, key=jax.random.key(2), k=2, weights=weights, stochastic=6
    )
    m = tracker.measure(variables, 5)
    curv = hessian.Curvature(loss)
    k1, k2 = jax.random.split(jax.random.fold_in(jax.random.fold_in(jax.random.key(2), 5), 1))
    fro = curv.frobenius_norm(variables, batches, key=k1, num_matvecs=6, weights=weights)
    tr = curv.trace(variables, batches, key=k2, num_matvecs=6, weights=weights)
    np.testing.assert_allclose(
        [m["hessian/frobenius"], m["hessian/frobenius_stderr"], m["hessian/trace"]],
        [fro.value, fro.stderr, tr.value],
        rtol=1e-5,
    )
    assert m["hessian/frobenius"] >= m["hessian/frobenius_top2"] * 0.5
    assert m["hessian/num_hvps"] > 12

    # The schedule: every 2 steps up to step 4, then at each epoch's end (8 steps/epoch).
    hook = train.Hook(tracker, every_steps=2, until_step=4, every_epochs=1)
    fired = [s for s in range(1, 25) if hook.due("step", s, 0)]
    assert fired == [2, 4]
    assert hook.due("epoch", 8, 1) and hook.due("epoch", 16, 2)


class _CtrlC:
    """Stands in for the loop's Ctrl-C flag (`console.deferred_interrupt`): a hook raises it,
    and the loop stops after the next step exactly as after a real Ctrl-C."""

    requested = False

    @contextlib.contextmanager
    def __call__(self):
        yield self


def _nsgd_run(workdir, ctrl_c=None):
    """NSGD on the nudged_sgd study's tiny setup (MNIST-1D, MLP 16): the directions tracker
    sets the optimizer's directions at the start of every epoch, a second tracker logs the
    top 3 and a noise tracker keeps moving averages; with ``ctrl_c``, Ctrl-C during step 11
    (after a hook at step 10, which both runs have, so they log at the same steps)."""
    config = load_config("nudged_sgd.py:tiny", progress=False, num_devices=1)
    run = train.setup(config)
    t = config.nsgd.curvature
    sub = jax.random.key(7)
    trackers = [
        tracking.make_tracker(
            config,
            t,
            run.data,
            run.model,
            sub,
            jax.random.key(8),
            k=2,
            name="directions",
            set_directions=True,
        ),
        tracking.make_tracker(config, t, run.data, run.model, sub, jax.random.key(9), k=3),
    ]
    trackers.append(
        tracking.NoiseTracker(
            losses.evaluation_loss(run.model, config.optim.weight_decay),
            tracking.curvature_subset(config, t, run.data, sub),
            key=jax.random.key(10),
            batch_size=config.batch_size,
            learning_rate=0.05,
            num_examples=len(run.data.x_train),
            num_minibatches=2,
        )
    )
    hooks = [train.Hook(tr, every_epochs=1, at_start=True, name=tr.name) for tr in trackers]

    def press(ctx):
        if ctrl_c is not None:
            ctrl_c.requested = True

    hooks.append(train.Hook(press, every_steps=10, until_step=10, name="ctrl_c"))
    tx = optim.nsgd(0.05, gamma=0.1, num_directions=2)
    return train.train(run, str(workdir), tx=tx, hooks=hooks)


def test_a_tracker_driven_run_resumes_bit_for_bit(tmp_path, monkeypatch):
    """Issue 17: the trackers' warm-start vectors are checkpointed with the run, so NSGD
    interrupted mid-epoch and resumed measures the same directions and ends bit-identical; the
    steps not yet logged (step 11 of the interval 9–12) are kept too, so the logged averages
    match."""
    straight = _nsgd_run(tmp_path / "a")
    ctrl_c = _CtrlC()
    monkeypatch.setattr(train_loop, "deferred_interrupt", ctrl_c)
    with pytest.raises(train.Interrupted, match="interrupted at step 11"):
        _nsgd_run(tmp_path / "b", ctrl_c)  # in epoch 2, after one tracker call
    assert sorted(os.listdir(tmp_path / "b" / "hook_state")) == ["11.npz", "8.npz"]
    ctrl_c.requested = False
    resumed = _nsgd_run(tmp_path / "b")
    assert resumed.resumed_from == 11
    for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # directions included

    def records(w):
        timing = ("seconds", "steps_per_sec")
        out = read_jsonl(w / "metrics.jsonl")
        return [{k: v for k, v in r.items() if not k.endswith(timing)} for r in out]

    assert records(tmp_path / "a") == records(tmp_path / "b")
    assert any("directions/lambda_1" in r for r in records(tmp_path / "b"))
    # The noise tracker's moving averages resume too (the records above are equal).
    assert sum("noise/b_simple" in r for r in records(tmp_path / "b")) >= 3
    for name in ("directions", "hessian"):
        saved = sorted(os.listdir(tmp_path / "a" / "arrays" / name))
        assert saved == sorted(os.listdir(tmp_path / "b" / "arrays" / name))
        for f in saved:
            with np.load(tmp_path / "a" / "arrays" / name / f) as x:
                with np.load(tmp_path / "b" / "arrays" / name / f) as y:
                    for k in x.files:
                        np.testing.assert_array_equal(x[k], y[k])


def test_noise_tracker_smooths_without_bias_and_measures_batch_sharpness():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        a = jnp.asarray(np.diag([3.0, 1.0, 0.5]))
        # Constant Hessian A, gradient noise from the data: g_B = A w − mean_B(c).
        loss = lambda w, b: 0.5 * w @ a @ w - jnp.mean(b["c"] @ w)  # noqa: E731
        batches = {"c": jnp.asarray(rng.normal(size=(2, 32, 3)))}
        tracker = tracking.NoiseTracker(
            loss, batches, key=jax.random.key(0), batch_size=4, learning_rate=0.1, ema=0.5
        )
        w = jnp.ones(3)
        m0 = tracker.measure(w, 0)
        assert m0["noise/trace_cov"] == m0["noise/trace_cov_raw"]  # bias-corrected: no pull to 0
        m1 = tracker.measure(2 * w, 1)
        expected = (0.5 * m0["noise/trace_cov_raw"] + m1["noise/trace_cov_raw"]) / 1.5
        np.testing.assert_allclose(m1["noise/trace_cov"], expected, rtol=1e-12)
        # Batch sharpness against a dense computation on the same mini-batches.
        mini = tracker.minibatches(batches, 1)
        g = np.asarray(2 * w @ a)[None] - np.asarray(mini["c"]).mean(1)
        ratio = np.einsum("jd,de,je->j", g, np.asarray(a), g) / (g**2).sum(1)
        np.testing.assert_allclose(m1["noise/batch_sharpness"], ratio.mean(), rtol=1e-10)
        assert m1["noise/two_over_lr"] == 20.0
        # A resumed tracker continues the averages exactly.
        again = tracking.NoiseTracker(
            loss, batches, key=jax.random.key(0), batch_size=4, learning_rate=0.1, ema=0.5
        )
        again.load_state_dict(tracker.state_dict())
        assert again.measure(w, 2) | {"noise/seconds": 0} == tracker.measure(w, 2) | {
            "noise/seconds": 0
        }


def test_eigen_tracker_takes_any_operator():
    model, variables, ds, batches, weights = _problem()
    ggn = operators.GGN(losses.evaluation_model_fn(model), "cross_entropy")
    tracker = tracking.EigenTracker(ggn, batches, key=jax.random.key(2), k=2, weights=weights)
    m = tracker.measure(variables, 0)
    direct = ggn.eigenpairs(variables, batches, k=2, key=jax.random.key(2), weights=weights)
    np.testing.assert_allclose([m["ggn/lambda_1"], m["ggn/lambda_2"]], direct.values, rtol=1e-3)
    with pytest.raises(ValueError, match="wrt belongs to the operator"):
        tracking.EigenTracker(ggn, batches, key=jax.random.key(2), wrt="^params/")
