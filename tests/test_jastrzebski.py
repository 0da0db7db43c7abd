"""Jastrzębski et al. (2019): both studies end to end on their tiny configs (in-process), the
optimizer-steering tracker, the plateau hook, starting from another run, exit status 2."""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import load_config, read_jsonl, run_experiment
from jax.flatten_util import ravel_pytree

from sharp_minima import losses, optim, tracking, train
from sharp_minima.studies import claims as claims_lib
from sharp_minima.studies import nudged_sgd, sharpest_directions
from sharp_minima.studies import runs as study_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sharpest_directions_tiny_end_to_end(tiny_study):
    run = tiny_study("sharpest_directions")
    config, results, tmp_path = run.config, run.results, Path(run.workdir)
    runs = results["runs"]
    names = {s.name for s in sharpest_directions.plan(config)}
    assert names - {"variants/start"} == set(runs)
    # Every tracked run starts with a measurement at step 0 (before training).
    for name in ("lr0.1_bs32_mom0", "gd_lr0.1", "variants/top"):
        records = read_jsonl(tmp_path / "runs" / name / "metrics.jsonl")
        steps, values = study_runs.series(records, "hessian/lambda_")
        assert steps[0] == 0 and np.all(values[:, 0] >= values[:, -1])
    # The probe: cosines, the alpha-sweep and the loss along e_1 at every measurement.
    probed = read_jsonl(tmp_path / "runs" / "lr0.05_bs32_mom0" / "metrics.jsonl")
    probes = [r for r in probed if "probe/cos_top5" in r]
    assert len(probes) >= 3 and all(0 < r["probe/cos_top5"] <= 1 for r in probes)
    arrays = sorted(os.listdir(tmp_path / "runs" / "lr0.05_bs32_mom0" / "arrays" / "probe"))
    with np.load(tmp_path / "runs" / "lr0.05_bs32_mom0" / "arrays" / "probe" / arrays[-1]) as z:
        assert z["along_e1"].shape == (5,) and z["delta"].shape == (5,)
        assert z["along_e1"][2] == pytest.approx(float(z["loss"]), rel=1e-5)  # k = 0
    # "SGD top" moves only along e_1: its parameters differ from the start by a multiple of
    # one direction per refresh; here simply: it ends with a different loss than SGD.
    assert runs["variants/top"]["train_loss"] != runs["variants/sgd"]["train_loss"]
    report = (tmp_path / "report.md").read_text()
    assert "| claim | source | verdict | numbers |" in report and "2/η" in report
    assert len(results["claims"]) >= 6
    for claim in results["claims"]:
        assert claim["verdict"] in claims_lib.VERDICTS and claim["numbers"]
    for fig in ("eigenvalues", "full_batch", "step_vs_curvature", "variants", "schedule"):
        assert (tmp_path / f"{fig}.png").stat().st_size > 0
    assert json.load(open(tmp_path / "results.json"))["claims"] == results["claims"]


def test_nudged_sgd_tiny_end_to_end(tiny_study):
    run = tiny_study("nudged_sgd")
    config, results, tmp_path = run.config, run.results, Path(run.workdir)
    runs = results["runs"]
    assert set(runs) == {s.name for s in nudged_sgd.plan(config)}
    sgd = runs["sgd_lr0.05"]
    for row in runs.values():
        if row["diverged"]:
            continue
        assert row["fro_best"] > 0 and row["fro_final"] > 0 and row["distance_best"] > 0
        assert 0 <= row["test_accuracy_best"] <= 1 and row["val_accuracy_at"] is not None
    assert sgd["diverged"] == 0
    report = (tmp_path / "report.md").read_text()
    for cell in ("1,018/1,019", "423/429", "294/431", "1,315/1,544"):  # Tables 1, 2, 5, 6
        assert cell in report
    assert "| SGD(0.05) |" in report and "| γ=5 |" in report
    # NSGD's runs recomputed their directions at step 0 and after every epoch.
    records = read_jsonl(tmp_path / "runs" / "K2_gamma0.1" / "seed0" / "metrics.jsonl")
    assert [r["step"] for r in records if "directions/lambda_1" in r] == [0, 8, 16, 24]
    assert (tmp_path / "nsgd_curves.png").stat().st_size > 0


def test_tracker_writes_directions_into_the_optimizer_and_they_survive_resume(tmp_path):
    config = load_config(
        "swissroll.py:tiny",
        **{"data.max_train": 64, "batch_size": 16, "num_epochs": 2, "progress": False},
    )
    data = train.load_data(config)
    model = train.build_model(config, data)
    subset = tracking.Subset(jax.random.key(0), data.x_train, data.y_train, num_examples=32)
    tracker = tracking.EigenTracker(
        losses.evaluation_loss(model),
        subset,
        key=jax.random.key(1),
        k=2,
        wrt="^params/",
        set_directions=True,
    )
    tx = optax.chain(optim.nudge(gamma=0.0, num_directions=2), optax.sgd(0.1))
    hook = train.Hook(tracker, every_epochs=1, at_start=True)
    result = train.train(config, str(tmp_path), tx=tx, hooks=[hook], data=data)
    got = optax.tree_utils.tree_get(result.state.opt_state, "directions")
    want = tracker.vectors["params"]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b)
    assert [s for s, _ in tracker.history] == [0, 4, 8]
    # The directions are orthonormal, and the checkpoint keeps them.
    flat = np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(got))
    np.testing.assert_allclose(flat @ flat.T, np.eye(2), atol=1e-4)
    resumed = train.train(config, str(tmp_path), tx=tx, data=data)
    again = optax.tree_utils.tree_get(resumed.state.opt_state, "directions")
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(got)):
        np.testing.assert_allclose(a, b)


def test_validation_plateau_drops_at_the_same_epochs_after_a_resume():
    plateau = train.ValidationPlateau(patience=2, factor=0.1)
    losses_ = [1.0, 0.9, 0.95, 0.92, 0.91, 0.8, 0.85, 0.86, 0.87]
    history = [{"val/loss": v, "epoch": i + 1} for i, v in enumerate(losses_)]
    # Best 0.9 at epoch 2; no better at 3, 4 -> drop after epoch 4; 0.91 not better, 0.8 is;
    # 0.85, 0.86 -> drop after epoch 8.
    assert plateau.drops(history) == [3, 7]
    assert plateau.drops(history[:6]) == [3]  # a resumed run replays the same rule

    class Ctx:
        pass

    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.5)
    state = train.TrainState(
        step=jnp.zeros((), jnp.int32),
        params={"w": jnp.ones(2)},
        batch_stats={},
        opt_state=tx.init({"w": jnp.ones(2)}),
        key=jax.random.key_data(jax.random.key(0)),
    )
    ctx = Ctx()
    ctx.state, ctx.history = state, history[:4]
    out = plateau(ctx)
    assert out.metrics["plateau/learning_rate"] == pytest.approx(0.05)
    assert float(optax.tree_utils.tree_get(out.state.opt_state, "learning_rate")) == (
        pytest.approx(0.05)
    )
    ctx.history = history[:5]
    assert plateau(ctx) is None


def test_init_variables_start_a_run_from_other_parameters(tmp_path):
    config = load_config(
        "swissroll.py:tiny", **{"data.max_train": 64, "batch_size": 16, "progress": False}
    )
    data = train.load_data(config)
    first = train.train(config, str(tmp_path / "a"), data=data)
    start = jax.tree.map(np.asarray, first.state.variables())
    zero = optax.set_to_zero()
    second = train.train(config, str(tmp_path / "b"), data=data, tx=zero, init_variables=start)
    for a, b in zip(jax.tree.leaves(second.state.params), jax.tree.leaves(start["params"])):
        np.testing.assert_array_equal(a, b)
    assert int(second.state.step) == int(first.state.step)  # counted from 0 in the new run


@pytest.mark.parametrize(
    "module,override",
    [
        ("sharpest_directions", "--config.sharpest.curvature.k=0"),
        ("nudged_sgd", "--config.data.validation_fraction=0.0"),
    ],
)
def test_bad_configs_exit_2(tmp_path, module, override):
    out = run_experiment(
        module,
        f"--config=configs/{module}.py:tiny",
        override,
        f"--workdir={tmp_path}",
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert ("curvature.k" if module == "sharpest_directions" else "validation_fraction") in (
        out.stderr
    )


@pytest.mark.parametrize(
    "spec",
    [
        "sharpest_directions.py",
        "sharpest_directions.py:paper",
        "sharpest_directions.py:resnet32",
        "sharpest_directions.py:resnet32_bn",
        "sharpest_directions.py:vgg11",
        "sharpest_directions.py:ptb",
        "sharpest_directions.py:mnist1d",
        "nudged_sgd.py",
        "nudged_sgd.py:paper",
        "nudged_sgd.py:simplecnn",
        "nudged_sgd.py:paper,lr01",
        "nudged_sgd.py:paper,momentum",
        "nudged_sgd.py:simplecnn,fashion",
        "nudged_sgd.py:paper,cifar100",
        "nudged_sgd.py:imdb",
        "nudged_sgd.py:mnist1d",
    ],
)
def test_paper_and_cpu_configs_validate(spec):
    config = load_config(spec)
    study = sharpest_directions if spec.startswith("sharpest") else nudged_sgd
    study.validate(config)
    if spec == "nudged_sgd.py:simplecnn":  # the "medium" SimpleCNN: f = 100, k = 5
        assert config.model.kwargs.widths[0] == 100 and config.model.kwargs.kernel_size == 5
    if spec.endswith(":resnet32_bn"):
        assert config.model.name == "resnet32_bn"
