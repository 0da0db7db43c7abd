"""The Keskar study end to end: quickstart (in-process), C2 on TFDS mock data, exit status 2."""

import importlib
import json
import os
from pathlib import Path
from unittest import mock

import pytest
from helpers import run_experiment

from sharp_minima import train
from sharp_minima.studies import keskar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, env=None, tmp_path=None):
    return run_experiment("keskar", *args, timeout=600, env=env)


def test_quickstart_tiny_end_to_end(tiny_study):
    run = tiny_study("keskar")
    results, tmp_path = run.results, Path(run.workdir)
    assert any("sharpness full" in line for line in run.lines)
    assert json.load(open(tmp_path / "results.json"))["summary"] == results["summary"]
    assert {r["regime"] for r in results["runs"]} == {"sb", "lb"}
    for r in results["runs"]:
        assert r["sharpness_full_0.001"] > 0 and r["sharpness_subspace_0.0005"] >= 0
        assert r["evals_full_0.001"] <= 2 * 2 + 4  # max_iter = 2 in the tiny variant
    curve = results["parametric"]["linear"]
    assert len(curve["alpha"]) == 4 and curve["alpha"][0] == -1.0 and curve["alpha"][-1] == 2.0
    for name in ("parametric_linear", "parametric_curved", "sharpness"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    report = (tmp_path / "report.md").read_text()
    assert "| 0.001 |" in report and "LB sharper than SB" in report


def test_quickstart_command_line_resumes_and_prints_the_report(tiny_study, tmp_path):
    workdir = tiny_study("keskar").copy(tmp_path / "w")  # a finished run: nothing to train
    out = _run(["--config=configs/quickstart.py:tiny", f"--workdir={workdir}"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Table 3" in out.stdout and "already trained: step" in out.stdout
    # A finished run says so, and nothing about training it again (issue 17).
    assert "resumed from step" not in out.stdout and "steps/epoch" not in out.stdout
    assert "taking over the lock" not in out.stdout + out.stderr


def test_c2_without_cifar_exits_2_saying_how_to_get_it(tmp_path):
    out = _run(
        ["--config=configs/c2.py", f"--workdir={tmp_path}/w"],
        env={"TFDS_DATA_DIR": str(tmp_path / "tfds"), "HOME": str(tmp_path)},
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "data set 'cifar10' is not available" in out.stderr and "To fix" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_train_config_is_refused_by_keskar(tmp_path):
    out = _run(["--config=configs/swissroll.py", f"--workdir={tmp_path}"])
    assert out.returncode == 2 and "no 'keskar' section" in out.stderr


def test_tiny_c1_on_tfds_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    from configs import c1  # the conv net of C1/C3 (C2's VGG-16 forward: test_models)

    config = c1.get_config("tiny")
    config.unlock()
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.allow_download = False
    config.progress = False
    config.keskar.curved_path = False
    config.keskar.batch_sweep = (16,)
    config.keskar.epsilons = (1e-3,)
    config.keskar.subspace_dim = 0
    config.keskar.average_sigma = 0.0
    config.keskar.max_iter = 1
    config.num_devices = 1
    config.lock()
    with (
        tfds.testing.mock_data(num_examples=64),
        mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True),
    ):
        data = train.load_data(config)
    assert data.x_train.shape == (64, 32, 32, 3)
    out = keskar.run(config, str(tmp_path / "w"), data=data, log=lambda s: None)
    regimes = {r["regime"]: r for r in out["runs"]}
    assert set(regimes) == {"sb", "lb", "batch16"} and regimes["lb"]["batch_size"] == 6
    assert all(r["sharpness_full_0.001"] >= 0 for r in out["runs"])
    assert (tmp_path / "w" / "sharpness_vs_batch.png").exists()
    assert "Batch-size sweep" in (tmp_path / "w" / "report.md").read_text()


def test_regimes_from_config():
    from configs import f1

    config = f1.get_config()
    config.unlock()
    config.keskar.augment = True
    config.keskar.conservative = 0.01
    config.keskar.batch_sweep = (256, 1024)
    plan = {r["name"]: r for r in keskar.regimes(config, 60_000)}
    assert plan["lb"]["batch_size"] == 6000 and plan["sb"]["batch_size"] == 256
    assert plan["lb_aug"]["augment"] and plan["lb_conservative"]["proximal"] == 0.01
    assert "batch1024" in plan and "batch256" not in plan  # the SB size is not run twice
    assert keskar.regimes(config, 64, num_devices=4)[1]["batch_size"] == 4  # 6 -> 4 devices
    c = keskar.run_config(config, plan["lb_conservative"], seed=3)
    assert c.seed == config.seed + 3 and c.data.seed == config.seed and c.batch_size == 6000


@pytest.mark.parametrize("net", ["f1", "f2", "c1", "c2", "c3", "c4"])
def test_report_shows_every_paper_cell(net):
    """Every number of the paper's Tables 2, 3, 4, 6, 7 for this network is in its report."""
    config = importlib.import_module(f"configs.{net}").get_config()
    stat = {"mean": 1.0, "std": 0.1, "min": 0.9, "max": 1.1, "n": 2}
    row = {"train_accuracy": {**stat, "mean": 99.0}, "test_accuracy": {**stat, "mean": 90.0}}
    row.update(
        {f"sharpness_{s}_{e}": stat for s in ("full", "subspace") for e in ("0.001", "0.0005")}
    )
    summary = {"sb": row, "lb": row}
    results = {"summary": summary, "data": {"num_train": 50_000}, "runs": []}
    report = keskar.report_markdown(config, {**results, "claims": []}, figure_names=[])
    paper = keskar.PAPER[net]
    cells = [c for key in paper if not isinstance(paper[key], dict) for c in paper[key]]
    for table in ("augment", "conservative"):
        if table in paper:
            cells += list(paper[table]["test_acc"])
            cells += [paper[table][k] for k in paper[table] if k.startswith("sharpness")]
    assert len([c for c in cells if c is not None]) >= 12
    for cell in cells:
        if cell is not None:
            assert f"{cell[0]:.2f} ± {cell[1]:.2f}" in report, (net, cell)
    assert ("n/a¹" in report) == (None in cells)
    assert keskar.PAPER["f1"]["test_acc"] == ((98.03, 0.07), (97.81, 0.07))
    assert keskar.PAPER["c2"]["sharpness_full_0.001"] == ((8.68, 1.32), (925.32, 38.29))
