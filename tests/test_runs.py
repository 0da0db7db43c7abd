"""Runs that survive real use: extendable studies, damaged checkpoints, workdir locks, fixing a
failed run, validation before any work, one-line Ctrl-C, and the smaller guarantees."""

import asyncio
import glob
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_config, run_experiment

from configs import quickstart
from sharp_minima import files, hessian, sharpness, train
from sharp_minima.studies import keskar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**overrides):
    """The swiss-roll MLP on 64 examples, batch 16: 4 steps (one checkpoint) per epoch."""
    base = {"data.max_train": 64, "batch_size": 16, "progress": False, "log_every_steps": 1}
    return load_config("swissroll.py:tiny", **{**base, **overrides})


def cli(module, *args, timeout=300):
    return run_experiment(module, *args, timeout=timeout)


def one_clear_line(out):
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr + out.stdout, out.stderr[-3000:]
    return lines[0]


# 1. ----------------------------------------------------------------- extending a finished study


def test_a_finished_study_takes_more_seeds_and_epsilons_measuring_only_what_is_new(
    tmp_path, tiny_study
):
    first = tiny_study("keskar")  # the quickstart's tiny config, finished
    measured = [line for line in first.lines if line.strip().startswith("sharpness ")]
    assert len(measured) == 2 * 4  # sb, lb x (full, sub) x 2 ε
    first.copy(tmp_path)
    config = quickstart.get_config("tiny")
    config.unlock()
    config.keskar.seeds = 2
    config.keskar.epsilons = (1e-3, 5e-4, 2e-3)
    config.lock()
    with pytest.raises(train.ConfigError, match=r"keskar.seeds: 1 → 2.*--extend"):
        keskar.run(config, str(tmp_path), log=lambda s: None)  # finished work: refused
    more = []
    out = keskar.run(config, str(tmp_path), log=more.append, extend=True)
    measured = [line for line in more if line.strip().startswith("sharpness ")]
    # seed 0 (sb, lb): only ε = 2e-3, full and subspace; seed 1 (sb, lb): all 3 ε x 2 spaces.
    assert len(measured) == 2 * 2 + 2 * 6
    assert sum("ε=0.002" in line for line in measured) == 4 + 4  # every run has the new ε
    assert sum("already trained" in line for line in more) == 2  # seed 0 is not retrained
    assert {(r["regime"], r["seed"]) for r in out["runs"]} == {
        ("sb", 0),
        ("sb", 1),
        ("lb", 0),
        ("lb", 1),
    }
    assert all("sharpness_full_0.002" in r for r in out["runs"])


def test_measurements_done_before_an_interrupt_are_kept(tmp_path, monkeypatch, tiny_study):
    tiny_study("keskar").copy(tmp_path)  # trained; the measurements are taken again below
    for path in glob.glob(str(tmp_path / "runs" / "*" / "*" / "sharpness.json")):
        os.remove(path)
    calls, interrupted = [], []
    real = keskar.measure

    def flaky(config, meter, spec, *args):
        calls.append(spec["name"])
        if len(calls) == 3 and not interrupted:  # Ctrl-C during the third measurement
            interrupted.append(True)
            raise KeyboardInterrupt
        return real(config, meter, spec, *args)

    monkeypatch.setattr(keskar, "measure", flaky)
    with pytest.raises(KeyboardInterrupt):
        keskar.run(quickstart.get_config("tiny"), str(tmp_path), log=lambda s: None)
    assert len(calls) == 3
    calls.clear()
    keskar.run(quickstart.get_config("tiny"), str(tmp_path), log=lambda s: None)
    # 5 measurements per run (2 ε x full/subspace + average), 2 runs; the two that finished
    # before the interrupt (sb seed 0) are not redone.
    assert len(calls) == 2 * 5 - 2 and calls[0] == "sharpness_full_0.0005"


# 2. ----------------------------------------------------------------- damaged checkpoints


def _largest_file(folder):
    paths = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]
    return max(paths, key=os.path.getsize)


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    args = ["--config=configs/base.py:tiny", f"--workdir={tmp_path}"]
    assert cli("train", *args, "--config.num_epochs=3").returncode == 0
    assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["8", "16", "24"]
    with open(_largest_file(tmp_path / "checkpoints" / "24"), "r+b") as f:
        f.truncate(100)
    os.remove(tmp_path / "checkpoints" / "16" / "default" / "_METADATA")
    out = cli("train", *args, "--config.num_epochs=4")
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "checkpoint at step 24 is damaged" in text
    assert "checkpoint at step 16 is damaged (its _METADATA file is missing)" in text
    assert "resumed from step 8" in text
    assert "Traceback" not in text and "Exception ignored" not in text
    assert len(text.splitlines()) < 20
    assert sorted(os.listdir(tmp_path / "checkpoints_damaged")) == ["16", "24"]  # kept aside


def test_when_no_checkpoint_restores_one_error_names_them(tmp_path):
    train.train(tiny(num_epochs=2), str(tmp_path))
    for step in ("4", "8"):
        os.remove(tmp_path / "checkpoints" / step / "default" / "_METADATA")
    with pytest.raises(
        train.CheckpointError, match=r"step 8: its _METADATA.*step 4: its _METADATA"
    ):
        train.train(tiny(num_epochs=3), str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "8"]  # nothing moved


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_after_a_failed_read_only_the_abandoned_readers_complaints_are_dropped(monkeypatch, capsys):
    """A TensorStore read finishing after orbax closed its event loop prints "Event loop is
    closed" through sys.excepthook or sys.unraisablehook (seen once in a CI run of the test
    above); that is dropped, an unrelated error with the same message is not."""
    from sharp_minima.train import checkpoint

    monkeypatch.setattr(checkpoint, "_noise_dropped", False)
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    checkpoint._drop_orbax_read_noise()
    loop = asyncio.new_event_loop()
    loop.close()

    def finished_read():
        loop.call_soon_threadsafe(print)

    def unrelated():
        raise RuntimeError("Event loop is closed")

    class Reader:
        def __del__(self):
            finished_read()

    for fn in (finished_read, unrelated):
        try:
            fn()
        except RuntimeError as e:
            sys.excepthook(type(e), e, e.__traceback__)
    Reader()  # its __del__ raises: sys.unraisablehook
    err = capsys.readouterr().err
    assert err.count("Traceback") == 1 and "in unrelated" in err, err


# 3. ----------------------------------------------------------------- the workdir lock


def test_a_second_process_on_a_busy_workdir_exits_2_naming_the_first(tmp_path):
    with files.workdir_lock(str(tmp_path)):
        out = cli("train", "--config=configs/base.py:tiny", f"--workdir={tmp_path}")
    assert out.returncode == 2
    line = one_clear_line(out)
    assert f"is in use by process {os.getpid()}" in line and "training" not in out.stdout
    assert line.endswith(
        f"(command: {shlex.join(sys.argv)}); wait for it to finish or use another --workdir"
    )  # the whole command, not cut mid-path
    assert not (tmp_path / "metrics.jsonl").exists()


def test_the_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(f'{{"pid": {dead.pid}, "host": "{os.uname().nodename}"}}')
    lines = []
    result = train.train(tiny(), str(tmp_path), log=lines.append)
    assert int(result.state.step) == 4
    assert any(f"taking over the lock of process {dead.pid}" in line for line in lines)
    # A clean exit leaves nothing to take over: a rerun says nothing about locks (issue 17).
    again = []
    train.train(tiny(), str(tmp_path), log=again.append)
    assert not any("taking over" in line for line in again), again


# 4. ----------------------------------------------------------------- a failed run can be fixed


def test_a_run_that_failed_before_its_first_checkpoint_accepts_a_new_config(tmp_path):
    ds = train.load_data(tiny())
    ds.x_train[:] = np.nan
    with pytest.raises(train.NonFiniteError, match="at step 1"):
        train.train(tiny(), str(tmp_path), data=ds)
    fixed = train.train(tiny(**{"optim.learning_rate": 1e-4}), str(tmp_path))
    assert fixed.resumed_from == 0 and int(fixed.state.step) == 4
    with pytest.raises(train.ConfigError, match="fields differ: optim"):  # now it has one
        train.train(tiny(**{"optim.learning_rate": 1e-2}), str(tmp_path))


# 5. ----------------------------------------------------------------- validation before any work


@pytest.mark.parametrize(
    "module,args,message",
    [
        ("train", ["--config.eval_every_epochs=0"], "config.eval_every_epochs must be >= 1"),
        ("train", ["--config.log_every_steps=0"], "config.log_every_steps must be >= 1"),
        ("train", ["--config.checkpoint.keep=0"], "config.checkpoint.keep must be >= 1"),
        ("train", ["--config.checkpoint.best_metric=val/acc"], "best_metric must be 'auto'"),
        ("train", ["--workdir=/proc/x"], "cannot create workdir /proc/x"),
        ("train", ["--workdir=FILE"], "exists and is not a folder"),
        ("keskar", ["--config.keskar.epsilons=(0.0,)"], "config.keskar.epsilons must be finite"),
    ],
)
def test_bad_values_exit_2_with_one_line_before_any_work(tmp_path, module, args, message):
    (tmp_path / "file").write_text("")
    config = "configs/quickstart.py:tiny" if module == "keskar" else "configs/base.py:tiny"
    workdir = [a for a in args if a.startswith("--workdir")] or [f"--workdir={tmp_path}/w"]
    args = [a for a in args if not a.startswith("--workdir")]
    workdir = [w.replace("FILE", str(tmp_path / "file")) for w in workdir]
    t0 = time.time()
    out = cli(module, f"--config={config}", *args, *workdir)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in one_clear_line(out)
    assert "training" not in out.stdout and not os.path.exists(tmp_path / "w" / "checkpoints")
    assert time.time() - t0 < 60


@pytest.mark.parametrize(
    "study,field,value,message",
    [  # the values as the command line hands them over (text it cannot parse stays text)
        ("nudged_sgd", "nsgd.gammas", ("(0.1,abc)",), "config.nsgd.gammas must be finite numbers"),
        ("nudged_sgd", "nsgd.gammas", (), "config.nsgd.gammas is empty; list at least one"),
        ("nudged_sgd", "nsgd.curvature.tol", -1.0, "config.nsgd.curvature.tol must be a finite"),
        ("sharpest_directions", "sharpest.learning_rates", ("(0.05,nan)",), "learning_rates must"),
        ("sharpest_directions", "sharpest.learning_rates", (0.05, float("nan")), "got nan in"),
        ("sharpest_directions", "sharpest.learning_rates", (0.1, 0.1), "lists 0.1 twice"),
        ("sharpest_directions", "sharpest.learning_rates", (), "learning_rates is empty"),
        ("visualize_generalization", "tsne.perplexity", 0.0, "config.tsne.perplexity must be"),
        ("curvature_demo", "curvature.k", 0, "config.curvature.k must be a finite integer >= 1"),
        ("keskar", "keskar.epsilons", (1e-3, 1e-3), "config.keskar.epsilons lists 0.001 twice"),
    ],
)
def test_bad_study_values_are_refused_naming_the_field(study, field, value, message):
    """Issue 17: each study validates its section before any work (the command lines turn
    the ConfigError into one line and exit 2, as the keskar case above checks)."""
    import importlib

    module = importlib.import_module(f"sharp_minima.studies.{study}")
    config = load_config(f"{'quickstart' if study == 'keskar' else study}.py:tiny")
    config.unlock()
    section = config
    *parents, leaf = field.split(".")
    for part in parents:
        section = section[part]
    section[leaf] = value
    with pytest.raises(train.ConfigError, match=re.escape(message)):
        module.STUDY.check(config)


# 6. ----------------------------------------------------------------- Ctrl-C


def test_ctrl_c_prints_one_line_exits_130_and_the_run_resumes(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "experiments.train",
        "--config=configs/base.py",
        "--config.num_epochs=500",
        "--config.eval_every_epochs=100",
        f"--workdir={tmp_path}",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for line in proc.stdout:  # wait until the training loop runs
        if line.startswith("step "):
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr + stdout, stderr[-3000:]
    assert lines[0].startswith("interrupted at step ")
    assert lines[0].endswith("; rerun the same command to resume")
    step = lines[0].split("interrupted at step ")[1].split(";")[0]
    assert step in os.listdir(tmp_path / "checkpoints")  # the last completed step is kept


def test_ctrl_c_anywhere_in_a_study_is_one_line_and_exit_130(capsys):
    from experiments import cli as cli_lib

    def main(argv):
        raise KeyboardInterrupt  # e.g. inside scipy's L-BFGS-B during the sharpness phase

    with pytest.raises(SystemExit) as exit_info:
        cli_lib._interruptible(main)(["prog"])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "interrupted; rerun the same command to resume\n"


# 7. ----------------------------------------------------------------- smaller guarantees


def test_results_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        files.write_json(str(tmp_path / "r.json"), {"a": 1})
        files.write_atomic(str(tmp_path / "r.md"), "x")
    finally:
        os.umask(old)
    for name in ("r.json", "r.md"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644


def test_leftover_orbax_tmp_folders_are_removed(tmp_path):
    train.train(tiny(), str(tmp_path))
    stale = tmp_path / "checkpoint_best" / "8.orbax-checkpoint-tmp-1234"
    stale.mkdir()
    (stale / "junk").write_text("x")
    train.train(tiny(num_epochs=2), str(tmp_path))
    assert not stale.exists()


def test_average_sharpness_raises_for_nan_parameters():
    loss = lambda p, batch: jnp.sum(p**2)  # noqa: E731
    with pytest.raises(FloatingPointError, match="average sharpness"):
        sharpness.average_sharpness(
            loss, jnp.array([jnp.nan, 1.0]), None, sigma=0.1, key=jax.random.key(0)
        )


def test_a_batch_without_the_batches_axis_warns():
    loss = lambda w, b: jnp.mean((b["x"] @ w - b["y"]) ** 2)  # noqa: E731
    one_batch = {"x": jnp.ones((8, 3)), "y": jnp.ones(8)}
    with pytest.warns(UserWarning, match="add the leading batches axis"):
        hessian.hessian_matvec(loss, jnp.zeros(3), one_batch)
    with_axis = jax.tree.map(lambda x: x[None], one_batch)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hessian.hessian_matvec(loss, jnp.zeros(3), with_axis)
