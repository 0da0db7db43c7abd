"""The training harness: configs, schedules, resume, multi-device, NaN stop, command line."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import load_config, read_jsonl, run_experiment

from sharp_minima import data, losses, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    f[:-3]
    for f in os.listdir(os.path.join(ROOT, "configs"))
    if f.endswith(".py") and f != "__init__.py" and not f.endswith("_common.py")
)


def tiny(**overrides):
    """The swiss-roll MLP on 64 examples, batch 16: 4 steps per epoch, quiet."""
    base = {"data.max_train": 64, "batch_size": 16, "progress": False, "log_every_steps": 1}
    return load_config("swissroll.py:tiny", **{**base, **overrides})


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads_and_validates(name):
    config = load_config(f"{name}.py")
    assert config.name and config.model.name in train.MODELS
    if "optim" not in config:  # a study that trains its own way (populations): its checks
        from sharp_minima.studies import sgd_noise

        assert name == "sgd_noise" and sgd_noise.STUDY.check(config)
        with pytest.raises(AttributeError):  # locked: a misspelt field is an error
            config.sgd_noise.seedz = 1
        return
    train.validate_config(config, num_devices=1)
    with pytest.raises(AttributeError):  # locked: a misspelt field is an error
        config.optim.lrr = 1.0


def test_config_variants_and_errors():
    assert load_config("f1.py:lb,fashion").batch_size == 6000
    assert load_config("f1.py:lb,fashion").data.name == "fashion_mnist"
    assert load_config("f1.py:sb").batch_size == 256
    assert load_config("c2.py:augment").data.augment
    with pytest.raises(ValueError, match="unknown config variant 'xl'.*valid: tiny"):
        load_config("f1.py:xl")
    bad = [
        ({"model.name": "f3"}, "unknown model 'f3'.*f1"),
        ({"data.name": "mnist2"}, "unknown data set 'mnist2'"),
        ({"optim.name": "lion"}, "unknown optimizer 'lion'"),
        ({"schedule.name": "step"}, "needs config.schedule.boundaries_epochs"),
        ({"schedule.warmup_epochs": 100.0}, "warmup_epochs .* shorter"),
        ({"data.augment": True}, "augment .* image data"),
        ({"early_stop.patience": 2, "early_stop.metric": "val/loss"}, "validation_fraction is 0"),
        ({"early_stop.targets": ("train/accuracy=0.9",)}, "early_stop.targets"),
        ({"early_stop.targets": ("train/speed>=1",)}, "early_stop.targets"),
        ({"early_stop.targets": ("val/accuracy>=0.9",)}, "validation_fraction is 0"),
    ]
    for overrides, message in bad:
        with pytest.raises(train.ConfigError, match=message):
            train.validate_config(load_config("swissroll.py", **overrides), num_devices=1)
    with pytest.raises(train.ConfigError, match=r"batch_size=30 is not divisible .*\(4\)"):
        train.validate_config(load_config("swissroll.py", batch_size=30), num_devices=4)


def test_a_batch_that_does_not_divide_over_every_device_trains_on_fewer():
    """``num_devices = 0`` on one host: the most devices the batch divides over (so a config
    runs unchanged on a TPU's 8 cores); an explicit count the batch does not divide fails."""
    assert jax.device_count() == 4  # conftest
    assert [train.dividing_devices(b) for b in (32, 30, 7, 100)] == [4, 3, 1, 4]
    assert train.setup(load_config("swissroll.py", batch_size=30)).mesh.size == 3
    with pytest.raises(train.ConfigError, match=r"batch_size=30 is not divisible .*\(4\)"):
        train.setup(load_config("swissroll.py", batch_size=30, num_devices=4))


def test_schedules_closed_form():
    # Goyal et al.: base lr 0.1 at batch 256, batch 1024 -> peak 0.4, ramp from 0.1 over 2 epochs.
    c = load_config(
        "simplecnn.py",
        **{
            "optim.learning_rate": 0.1,
            "batch_size": 1024,
            "schedule.base_batch_size": 256,
            "schedule.warmup_epochs": 2.0,
            "schedule.name": "step",
            "schedule.boundaries_epochs": (5, 8),
            "num_epochs": 10,
        },
    )
    lr = train.learning_rate_schedule(c, steps_per_epoch=10)
    np.testing.assert_allclose(
        [lr(0), lr(10), lr(20), lr(49), lr(50), lr(80)],
        [0.1, 0.25, 0.4, 0.4, 0.04, 0.004],
        rtol=1e-6,
    )
    c = load_config("simplecnn.py", **{"schedule.name": "cosine", "num_epochs": 4})
    lr = train.learning_rate_schedule(c, steps_per_epoch=10)
    np.testing.assert_allclose([lr(0), lr(20), lr(40)], [0.01, 0.005, 0.0], atol=1e-9)


def test_reduce_on_plateau_counts_epochs():
    c = load_config(
        "swissroll.py",
        **{
            "schedule.name": "plateau",
            "schedule.plateau_patience": 2,
            "schedule.plateau_factor": 0.5,
        },
    )
    tx, lr_fn = train.make_optimizer(c, steps_per_epoch=3)
    params = {"w": jnp.ones(2)}
    state = tx.init(params)
    lrs = []
    for _ in range(5 * 3):  # 5 epochs of a flat loss: no improvement after the first epoch
        _, state = tx.update(params, state, params, value=jnp.array(1.0))
        lrs.append(float(lr_fn(0, state)))
    # Epoch 1 sets the best; epochs 2 and 3 do not improve -> halved at the end of epoch 3.
    assert lrs[8] == pytest.approx(5e-4) and lrs[7] == pytest.approx(1e-3)


def test_weight_decay_is_l2_on_kernels_only():
    params = {"Dense_0": {"kernel": jnp.array([[1.0, -2.0]]), "bias": jnp.array([3.0, 4.0])}}
    assert float(losses.l2_penalty(params)) == pytest.approx(2.5)
    grad = jax.grad(losses.l2_penalty)(params)
    np.testing.assert_array_equal(grad["Dense_0"]["kernel"], params["Dense_0"]["kernel"])
    np.testing.assert_array_equal(grad["Dense_0"]["bias"], 0.0)


def test_cross_entropy_and_accuracy_sequence_shapes():
    logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1]]]))  # (batch 1, time 2, vocab 2)
    labels = jnp.array([[0, 1]])
    expect = -(np.log(0.5) + np.log(0.1)) / 2
    assert float(losses.cross_entropy(logits, labels)) == pytest.approx(expect, rel=1e-6)
    assert float(losses.accuracy(logits, labels)) == pytest.approx(0.5)


def test_train_writes_metrics_checkpoints_and_learns(tmp_path):
    result = train.train(tiny(num_epochs=3), str(tmp_path))
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "minibatch/loss" in r] == list(range(1, 13))
    evals = [r for r in records if "test/accuracy" in r]
    assert [r["epoch"] for r in evals] == [1, 2, 3] and evals == result.history
    # Two quantities, two names: train/ is the evaluation on the whole training set only.
    assert [r["step"] for r in records if "train/loss" in r] == [4, 8, 12]
    assert not any(k.startswith("minibatch/") for r in evals for k in r)
    prefixes = {k.split("/")[0] for r in records for k in r if "/" in k}
    assert prefixes == {"minibatch", "train", "test"}
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["12", "4", "8"]
    assert len(os.listdir(tmp_path / "checkpoint_best")) == 1
    assert evals[-1]["train/loss"] < evals[0]["train/loss"]
    assert int(result.state.step) == 12


SAM = {  # ASAM with m-sharpness (groups of 4), decay decoupled from the loss
    "sam.rho": 0.5,
    "sam.adaptive": True,
    "sam.group_size": 4,
    "optim.weight_decay": 1e-3,
    "optim.decoupled": True,
}


@pytest.mark.parametrize("extra", [{}, SAM], ids=["plain", "asam"])
def test_interrupted_run_resumes_bitwise(tmp_path, extra):
    config = tiny(num_epochs=2, **{"checkpoint.every_steps": 3, **extra})
    straight = train.train(config, str(tmp_path / "a"))

    def kill(ctx):  # a crash between checkpoints: step 7 is lost, step 6 was saved
        raise RuntimeError("simulated kill")

    with pytest.raises(RuntimeError, match="simulated kill"):
        train.train(config, str(tmp_path / "b"), hooks=[train.Hook(kill, every_steps=7)])
    assert max(r["step"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")) == 7
    resumed = train.train(config, str(tmp_path / "b"))
    assert resumed.resumed_from == 6
    for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    steps = [
        r["step"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if "test/loss" not in r
    ]
    assert steps == list(range(1, 9))  # records after the checkpoint were rewritten, not doubled
    records = [r for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if "test/loss" not in r]
    if extra:  # SAM's diagnostics logged; the decoupled decay is not in the objective
        for r in records:
            assert r["sam/grad_norm"] > 0 and -1 <= r["sam/cos"] <= 1
            assert r["minibatch/objective"] == r["minibatch/loss"]
        assert np.mean([r["sam/sharpness"] for r in records]) > 0  # ascent raises the loss
    else:
        assert not [k for k in records[0] if k.startswith("sam/")]


def test_resume_refuses_a_different_config(tmp_path):
    train.train(tiny(), str(tmp_path))
    with pytest.raises(train.ConfigError, match="different config .*optim"):
        train.train(tiny(**{"optim.learning_rate": 0.5}), str(tmp_path))
    more = train.train(tiny(num_epochs=2), str(tmp_path))  # more epochs may be added
    assert more.resumed_from == 4 and int(more.state.step) == 8


def test_four_devices_same_trajectory_as_one(tmp_path):
    assert len(jax.devices()) == 4
    losses_by_devices = {}
    for n in (1, 4):
        config = load_config(
            "f1.py:tiny",  # BatchNorm: batch statistics must be global, not per device
            **{
                "data.name": "swissroll",
                "data.max_train": 64,
                "batch_size": 16,
                "num_devices": n,
                "progress": False,
                "log_every_steps": 1,
                "num_epochs": 2,
            },
        )
        train.train(config, str(tmp_path / str(n)))
        recs = read_jsonl(tmp_path / str(n) / "metrics.jsonl")
        losses_by_devices[n] = [r["minibatch/loss"] for r in recs if "minibatch/loss" in r]
    assert len(losses_by_devices[1]) == 8
    np.testing.assert_allclose(losses_by_devices[4], losses_by_devices[1], rtol=1e-5, atol=1e-6)


def test_nan_stops_naming_the_step(tmp_path):
    ds = train.load_data(tiny())
    ds.x_train[16:32] = np.nan  # the batch of step 2 (or a later one) holds the NaNs
    config = tiny(**{"log_every_steps": 50})
    with pytest.raises(train.NonFiniteError, match=r"at step (\d+)") as err:
        train.train(config, str(tmp_path), data=ds)
    step = int(err.value.args[0].split("at step ")[1].split()[0])
    perm = np.asarray(
        data.epoch_permutation(
            jax.random.fold_in(jax.random.split(jax.random.key(0), 3)[1], 0), 64, 16
        )
    )
    first_bad = 1 + min(i for i, row in enumerate(perm) if np.any((row >= 16) & (row < 32)))
    assert step == first_bad


def test_early_stopped_run_stays_stopped_on_resume(tmp_path):
    config = tiny(num_epochs=30, **{"early_stop.patience": 1, "early_stop.min_delta": 10.0})
    first = train.train(config, str(tmp_path))  # no evaluation can improve by 10: stops at 2
    assert first.stopped_early and int(first.state.step) == 8
    again = train.train(config, str(tmp_path))
    assert again.stopped_early and int(again.state.step) == 8 and again.resumed_from == 8


def test_training_to_a_fit_stops_at_the_first_evaluation_meeting_every_target(tmp_path):
    # 4 steps per epoch; the training loss falls below 2.5 at once, never below 1e-6.
    targets = ("train/loss<2.5", "train/accuracy>=0.0")
    config = tiny(num_epochs=30, **{"early_stop.targets": targets})
    first = train.train(config, str(tmp_path / "fit"))
    assert first.stopped_early and int(first.state.step) == 4  # the first evaluation
    assert train.targets_met(config, first.final)
    again = train.train(config, str(tmp_path / "fit"))  # a resume stays stopped
    assert again.stopped_early and int(again.state.step) == 4
    never = tiny(num_epochs=3, **{"early_stop.targets": ("train/loss<1e-6",)})
    capped = train.train(never, str(tmp_path / "cap"))  # the cap: reported as not fitted
    assert not capped.stopped_early and int(capped.state.step) == 12
    assert not train.targets_met(never, capped.final)
    assert train.parse_target("val/accuracy>0.9") == ("val/accuracy", ">", 0.9)
    assert train.parse_target("train/loss=0.1") is None


def test_early_stop_from_history():
    config = tiny(**{"early_stop.patience": 2, "early_stop.metric": "train/loss"})
    hist = [{"train/loss": v} for v in (1.0, 0.5, 0.6, 0.55)]
    assert train.should_stop_early(config, hist)
    assert not train.should_stop_early(config, hist[:3])
    assert not train.should_stop_early(config, hist + [{"train/loss": 0.4}])


def _cli(tmp_path, *args):
    return run_experiment("train", f"--workdir={tmp_path}/run", *args)


def test_command_line_two_steps_and_resume(tmp_path):
    args = [
        "--config=configs/swissroll.py:tiny",
        "--config.data.max_train=64",
        "--config.batch_size=32",
    ]
    first = _cli(tmp_path, *args)
    assert first.returncode == 0, first.stderr
    assert "step 2/2" in first.stdout and "test/accuracy" in first.stdout
    final = json.load(open(tmp_path / "run" / "final.json"))
    assert final["step"] == 2 and 0.0 <= final["test/accuracy"] <= 1.0
    again = _cli(tmp_path, *args)
    assert again.returncode == 0 and "already trained: step 2 of 2" in again.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config=configs/swissroll.py", "--config.optim.lrr=1"], "no config field 'lrr'"),
        (["--config=configs/swissroll.py", "--config.model.name=f3"], "unknown model 'f3'"),
        (["--config=configs/swissroll.py:xl"], "unknown config variant 'xl'"),
        (["--config=configs/nope.py"], "No such file"),
        (
            [
                "--config=configs/c2.py",
                "--config.data.data_dir=/nonexistent",
                "--config.data.allow_download=False",
            ],
            "data set 'cifar10' is not available",
        ),
        (
            [
                "--config=configs/swissroll.py:tiny",
                "--multihost",
                "--num_processes=2",
                "--process_id=2",
                "--coordinator_address=localhost:12355",
            ],
            "--process_id=2 is not in 0 … 1 (--num_processes=2)",
        ),  # fmt: skip
        (
            ["--config=configs/swissroll.py:tiny", "--multihost", "--peer_timeout=0"],
            "--peer_timeout=0.0 must be a positive number of seconds",
        ),
        (
            ["--config=configs/swissroll.py:tiny", "--process_id=1"],
            "--coordinator_address, --num_processes and --process_id need --multihost",
        ),
    ],
)
def test_command_line_errors_exit_2_with_one_line(tmp_path, args, message):
    out = _cli(tmp_path, *args)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_metrics_buffer_averages_and_names_the_first_nonfinite_step():
    buf = train.MetricsBuffer(steps_per_epoch=4, log_every=2)
    assert buf.flush(0, 1, None) is None
    for s, v in ((1, 1.0), (2, 3.0)):
        buf.add(
            s, {"minibatch/objective": jnp.float32(v), "minibatch/grad_norm": jnp.float32(10 * s)}
        )
    rec = buf.flush(2, 1, None)
    assert rec == {"step": 2, "epoch": 1, "minibatch/objective": 2.0, "minibatch/grad_norm": 20.0}
    for s, v in ((3, 1.0), (4, np.nan), (5, np.inf)):
        buf.add(s, {"minibatch/objective": jnp.float32(v), "minibatch/grad_norm": jnp.float32(0)})
    with pytest.raises(
        train.NonFiniteError, match=r"at step 4 \(epoch 1\); last checkpoint: step 2"
    ):
        buf.flush(5, 2, 2)
    # With m-sharpness SAM's ‖g‖ and cos are log-step values too; a record ending off a log
    # step (a run's end) has none.
    buf = train.MetricsBuffer(4, 2, sampled=train.log_step_metrics(groups=4))
    for s in (1, 2, 3):
        buf.add(s, {"minibatch/objective": jnp.float32(1), "minibatch/grad_norm": jnp.float32(s),
                    "sam/grad_norm": jnp.float32(s), "sam/cos": jnp.float32(s / 4),
                    "sam/sharpness": jnp.float32(s)})  # fmt: skip
        if s == 2:
            rec = buf.flush(2, 1, None)
    assert (rec["sam/grad_norm"], rec["sam/cos"], rec["sam/sharpness"]) == (2.0, 0.5, 1.5)
    assert not {"sam/grad_norm", "sam/cos", "minibatch/grad_norm"} & set(buf.flush(3, 1, None))


def test_checkpointer_keeps_last_and_best_and_restore_or_init_resumes(tmp_path):
    config = tiny(**{"checkpoint.keep": 2, "checkpoint.best_metric": "val/loss"})
    model = train.get_model("mlp", num_classes=2, widths=(4,))
    tx = optax.sgd(0.1)
    mesh = train.make_mesh(1)
    x = jnp.zeros((1, 2))
    ckpt = train.Checkpointer(str(tmp_path), config)
    state, resumed = train.restore_or_init(ckpt, model, tx, x, jax.random.key(0), mesh)
    assert resumed == 0 and int(state.step) == 0
    for step, val in ((1, 0.5), (2, 0.2), (3, 0.9)):
        state = state.replace(step=jnp.int32(step))
        ckpt.save(state, {"val/loss": val})
        ckpt.save(state)  # saving the same step again is a no-op
    ckpt.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3"]
    assert os.listdir(tmp_path / "checkpoint_best") == ["2"]  # lowest val/loss
    ckpt = train.Checkpointer(str(tmp_path), config)
    restored, resumed = train.restore_or_init(ckpt, model, tx, x, jax.random.key(1), mesh)
    ckpt.close()
    assert resumed == 3
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_lbfgs_with_its_line_search_trains(tmp_path):
    # The step hands optax.lbfgs the mini-batch objective (value_fn) and gradient its zoom
    # line search needs; every accepted step lowers that objective, so the loss falls.
    config = tiny(num_epochs=3, batch_size=64, **{"data.max_train": 64})
    result = train.train(config, str(tmp_path), tx=optax.lbfgs(memory_size=5))
    losses = [r["train/loss"] for r in result.history]
    assert losses[-1] < 0.9 * losses[0], losses


def test_a_manual_multihost_launch_takes_flags_or_the_environment_and_all_three():
    from experiments.cli import multihost_arguments

    env = {"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    want = {"coordinator_address": "h0:1234", "num_processes": 4, "process_id": 3}
    assert multihost_arguments({}, env) == want
    assert multihost_arguments({"process_id": 0}, env) == {**want, "process_id": 0}  # flag wins
    assert multihost_arguments({}, {}) == {}  # a cluster to detect (TPU, SLURM, Open MPI)
    for values, environ, message in (
        ({"process_id": 0}, {}, "missing --coordinator_address (or JAX_COORDINATOR_ADDRESS)"),
        ({}, {**env, "JAX_PROCESS_ID": "4"}, "--process_id=4 is not in 0 … 3"),
        ({}, {**env, "JAX_NUM_PROCESSES": "two"}, "must be integers"),
        ({}, {**env, "JAX_COORDINATOR_ADDRESS": "h0"}, "is not host:port"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            multihost_arguments(values, environ)


def test_the_peer_watcher_stops_a_process_whose_peer_went_silent_and_only_then(monkeypatch):
    """`cli.watch_peers` against an in-memory key-value store: process 1 keeps bumping its
    counter, process 2 stops after its first; process 0 names process 2 once ``timeout``
    has passed, not before, and its thread ends quietly when the store shuts down."""
    import threading
    import time

    from experiments import cli

    class Store:
        def __init__(self):
            self.values, self.closed = {}, False

        def key_value_set(self, key, value, allow_overwrite=False):
            if self.closed:
                raise RuntimeError("shut down")
            self.values[key] = value

        def key_value_try_get(self, key):
            return self.values[key]  # KeyError when not written yet, as NOT_FOUND

    store, lost = Store(), []
    monkeypatch.setattr(cli, "lost_peer", lambda what: lost.append((what, time.monotonic())))
    stop = threading.Event()

    def peer():
        for n in range(10**6):
            if stop.wait(0.02):
                return
            store.values["sharp_minima/alive/1"] = str(n)

    threading.Thread(target=peer, daemon=True).start()
    store.values["sharp_minima/alive/2"] = "0"
    start = time.monotonic()
    watcher = cli.watch_peers(0.4, every=0.05, client=store, process=0, count=3)
    watcher.join(5)
    stop.set()
    ((what, when),) = lost
    assert what.startswith("process 2 has shown no sign of life for 0 s"), what
    assert 0.4 <= when - start < 2.0
    assert not watcher.is_alive()
    # A finished run: the store shuts down and the thread ends without a word.
    store.closed, lost[:] = False, []
    quiet = cli.watch_peers(0.4, every=0.05, client=store, process=2, count=3)
    store.closed = True
    quiet.join(5)
    assert not quiet.is_alive() and lost == []
    assert cli.watch_peers(1.0, client=store, process=0, count=1) is None  # one process
