"""The architecture's promises: compiled code owned by the caller's objects (no cache keeps a
loss alive, no recompilation on reuse), importable entry points, a pluggable trainer."""

import gc
import glob
import os
import subprocess
import sys
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import load_config, read_jsonl

from sharp_minima import hessian, losses, sharpness, train
from sharp_minima.models import get_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Marker:
    """Stands for a large array a loss closure captures."""


def _make_loss():
    marker = _Marker()
    scale = jnp.arange(1.0, 6.0)

    def loss(params, batch):
        return 0.5 * jnp.sum(scale * params**2) * (1.0 + 0.0 * jnp.sum(batch))

    loss.marker = marker
    return loss, weakref.ref(loss), weakref.ref(marker)


CALLS = {
    "eigenpairs": lambda f, p, b: hessian.eigenpairs(f, p, b, k=2, key=jax.random.key(0)),
    "trace": lambda f, p, b: hessian.trace(f, p, b, key=jax.random.key(0), num_matvecs=6),
    "frobenius": lambda f, p, b: hessian.frobenius_norm(f, p, b, key=jax.random.key(0)),
    "density": lambda f, p, b: hessian.spectral_density(f, p, b, key=jax.random.key(0)),
    "matvec": lambda f, p, b: hessian.hessian_matvec(f, p, b)(jnp.ones(5)),
    "epsilon_sharpness": lambda f, p, b: sharpness.epsilon_sharpness(
        f, p, b, epsilon=1e-3, key=jax.random.key(0), max_iter=2
    ),
    "average_sharpness": lambda f, p, b: sharpness.average_sharpness(
        f, p, b, sigma=0.1, key=jax.random.key(0), num_samples=4
    ),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_loss_closure_is_garbage_collected_after_the_call(name):
    loss, loss_ref, marker_ref = _make_loss()
    out = CALLS[name](loss, jnp.ones(5), jnp.zeros((1, 3)))
    assert out is not None
    del loss, out
    gc.collect()
    assert loss_ref() is None and marker_ref() is None, f"{name} keeps the loss alive"


def _bn_problem(seed):
    """A BatchNorm MLP's variables after a few steps' worth of perturbation, and a batch."""
    model = get_model("mlp", num_classes=3, widths=(8,), batch_norm=True)
    x = jax.random.normal(jax.random.key(seed), (16, 4))
    variables = model.init(jax.random.key(seed + 1), x, train=False)
    # Different weights and different running statistics each time.
    variables = jax.tree.map(lambda v: v + 0.1 * (seed + 1), variables)
    batches = {"x": x[None], "y": jnp.arange(16)[None] % 3}
    return model, variables, batches


def test_curvature_object_reused_with_new_params_and_batchnorm_stats_does_not_recompile():
    model, v0, batches = _bn_problem(0)
    curv = hessian.Curvature(losses.evaluation_loss(model), wrt="^params/")
    meter = sharpness.SharpnessMeter(losses.evaluation_loss(model), wrt="^params/")
    first = curv.eigenpairs(v0, batches, k=2, key=jax.random.key(0))
    curv.trace(v0, batches, key=jax.random.key(1), num_matvecs=6)
    meter.epsilon_sharpness(v0, batches, epsilon=1e-3, key=jax.random.key(0), max_iter=2)
    traces, meter_traces = curv.num_traces, meter.num_traces
    assert traces >= 2 and meter_traces == 1
    for seed in (1, 2):
        _, v, _ = _bn_problem(seed)
        assert not np.allclose(
            v["batch_stats"]["BatchNorm_0"]["var"], v0["batch_stats"]["BatchNorm_0"]["var"]
        )
        again = curv.eigenpairs(v, batches, k=2, key=jax.random.key(0), init_vectors=first.vectors)
        curv.trace(v, batches, key=jax.random.key(1), num_matvecs=6)
        meter.epsilon_sharpness(v, batches, epsilon=1e-3, key=jax.random.key(0), max_iter=2)
        assert not np.allclose(again.values, first.values)  # the new state was used
    assert curv.num_traces == traces and meter.num_traces == meter_traces
    # The statistics really enter the loss: a dense float64-free check against jax.hessian.
    _, v, _ = _bn_problem(2)
    flat, unravel = jax.flatten_util.ravel_pytree(v["params"])
    loss = losses.evaluation_loss(model)
    dense = jax.hessian(
        lambda x: loss({**v, "params": unravel(x)}, jax.tree.map(lambda a: a[0], batches))
    )(flat)
    top = curv.eigenpairs(v, batches, k=1, key=jax.random.key(3))
    np.testing.assert_allclose(top.values[0], np.linalg.eigvalsh(np.asarray(dense))[-1], rtol=1e-3)


def test_every_experiments_module_imports_together_in_one_process():
    modules = sorted(
        "experiments." + os.path.basename(f)[:-3]
        for f in glob.glob(os.path.join(ROOT, "experiments", "*.py"))
        if not f.endswith("__init__.py")
    )
    assert {"experiments.keskar", "experiments.train", "experiments.curvature_demo"} <= set(modules)
    code = "import " + ", ".join(modules) + "; print('ok')"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_entry_points_are_thin():
    for f in glob.glob(os.path.join(ROOT, "experiments", "*.py")):
        name = os.path.basename(f)
        # benchmarks and the shared flag plumbing are not a study's entry point
        if name.startswith("bench_") or name in ("__init__.py", "cli.py"):
            continue
        assert len(open(f).read().splitlines()) <= 80, name


def test_importing_plotting_leaves_the_matplotlib_backend_alone():
    code = (
        "import matplotlib; before = matplotlib.get_backend(); "
        "import sharp_minima.plotting; print(before, matplotlib.get_backend())"
    )
    env = dict(os.environ, MPLBACKEND="svg")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["svg", "svg"]


# ----------------------------------------------------------------------- pluggable trainer


def _tiny(**overrides):
    base = {"data.max_train": 64, "batch_size": 16, "progress": False, "log_every_steps": 1}
    return load_config("swissroll.py:tiny", **{**base, **overrides})


def _records(workdir):
    return read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def test_custom_loss_and_custom_transform_reach_the_training_step(tmp_path):
    config = _tiny(num_epochs=1)
    frozen = train.train(config, str(tmp_path / "zero"), tx=optax.set_to_zero())
    p0 = frozen.state.params  # a transform that zeroes updates leaves params unchanged
    init = train.init_state(
        frozen.model,
        optax.set_to_zero(),
        jnp.asarray(frozen.data.x_train[:1]),
        jax.random.split(jax.random.key(config.seed), 3)[0],
    )
    for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(init.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def decay_loss(params, model_state, batch, key):  # ½‖θ‖²: SGD(lr) multiplies θ by 1 − lr
        del batch, key
        value = 0.5 * sum(jnp.sum(p**2) for p in jax.tree.leaves(params))
        return value, {"model_state": model_state, "half_norm_sq": value}

    out = train.train(config, str(tmp_path / "decay"), loss_fn=decay_loss, tx=optax.sgd(0.5))
    steps = int(out.state.step)
    assert steps == 4
    for a, b in zip(jax.tree.leaves(out.state.params), jax.tree.leaves(p0)):
        np.testing.assert_allclose(np.asarray(a), 0.5**steps * np.asarray(b), rtol=1e-6)
    logged = [r for r in _records(tmp_path / "decay") if "minibatch/half_norm_sq" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]


def test_hook_replacing_optimizer_state_takes_effect_next_step_and_survives_resume(tmp_path):
    config = _tiny(num_epochs=2, **{"checkpoint.every_steps": 4})
    seen = {}

    def freeze(ctx):  # at step 2: learning rate 0 from step 3 on, via the optimizer state
        seen["params"] = jax.tree.map(np.asarray, ctx.state.params)
        ctx.save_arrays("probe", first=jax.tree.leaves(ctx.state.params)[0])
        opt_state = optax.tree_utils.tree_set(ctx.state.opt_state, learning_rate=0.0)
        return train.HookResult({"hook/ran": 1.0}, ctx.state.replace(opt_state=opt_state))

    def kill(ctx):
        raise RuntimeError("simulated kill")

    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    freeze_once = train.Hook(lambda ctx: freeze(ctx) if ctx.step == 2 else None, every_steps=2)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train.train(
            config, str(tmp_path), tx=tx, hooks=[freeze_once, train.Hook(kill, every_steps=6)]
        )
    records = _records(tmp_path)
    lrs = {r["step"]: r["train/learning_rate"] for r in records if "train/learning_rate" in r}
    assert lrs[1] == lrs[2] == pytest.approx(0.1) and lrs[3] == lrs[4] == 0.0
    assert any(r.get("hook/ran") == 1.0 and r["step"] == 2 for r in records)
    saved = np.load(tmp_path / "arrays" / "probe" / "00000002.npz")["first"]
    np.testing.assert_array_equal(saved, jax.tree.leaves(seen["params"])[0])
    # Resume from the step-4 checkpoint with no hook: the learning rate stays 0.
    resumed = train.train(config, str(tmp_path), tx=tx)
    assert resumed.resumed_from == 4 and int(resumed.state.step) == 8
    for a, b in zip(jax.tree.leaves(resumed.state.params), jax.tree.leaves(seen["params"])):
        np.testing.assert_array_equal(np.asarray(a), b)
    with pytest.raises(ValueError, match="another structure"):
        bad = train.Hook(lambda ctx: ctx.state.replace(opt_state=()), every_steps=1, name="bad")
        train.train(config, str(tmp_path / "bad"), tx=tx, hooks=[bad])


def test_progress_prints_one_line_per_evaluation_and_few_progress_lines(tmp_path):
    lines = []
    config = _tiny(num_epochs=3, progress=True)
    train.train(config, str(tmp_path), log=lines.append, label="[run] ")
    evals = [line for line in lines if line.startswith("[run] epoch ")]
    progress = [line for line in lines if line.startswith("[run] step ")]
    assert len(evals) == 3 and all("steps/s" in line for line in evals)
    assert 1 <= len(progress) <= 3  # 12 log steps; printed at most once a minute off a terminal
    assert len(lines) <= 3 + 3 + 1
