"""The SAM study (`sharp_minima.studies.sam`) end to end on its tiny config (in-process), its
bookkeeping against hand computations (the quadratic edge: `optim.sam_quadratic_growth`'s
doctest), configs
and exit status 2."""

import json
import os

import numpy as np
import pytest
from helpers import load_config, run_experiment

from sharp_minima import optim
from sharp_minima.studies import claims as claims_lib
from sharp_minima.studies import runs
from sharp_minima.studies.sam import kit, late_phase, m_sweep


def test_sam_tiny_end_to_end(tiny_study):
    run = tiny_study("sam")
    secs, config = run.results["sections"], run.config
    from sharp_minima.studies import sam

    assert set(secs) == set(sam.SECTIONS)
    found = run.results["claims"]
    for i in range(len(sam.SECTIONS)):  # every section states its claims
        assert any(c["claim"].startswith(f"[{i}] ") for c in found), i
    # Two seeds: every claim over seeds reads "not tested", saying why.
    for c in found:
        if "quadratic" not in c["claim"]:
            assert c["verdict"] == claims_lib.NOT_TESTED and "needs ≥ 3 seeds" in c["numbers"], c
    # Arms that several sections use trained once, in one folder each; nothing else.
    folders = set(os.listdir(os.path.join(run.workdir, "runs")))
    expected = {a.name for a in m_sweep.arms(config)} | {a.name for a in late_phase.arms(config)}
    expected |= {"noisy_sgd", "noisy_sam_rho0.5", "noisy_asam_rho2", "eos_gd", "eos_sam_rho0.05"}
    assert folders == expected
    # Label noise: about the configured fraction of the training labels changed.
    assert secs["label_noise"]["noisy_fraction"] == pytest.approx(0.4, abs=0.1)
    # Curvature: λ_max, tr H, adaptive sharpness measured for every arm and seed.
    for arm in secs["curvature"]["arms"].values():
        for v in arm["seeds"].values():
            assert v["lambda_max"] > 0 and v["trace"] > 0 and v["adaptive_sharpness"] > 0


def test_summarize_picks_the_best_validation_epoch(tmp_path):
    rows = [
        {"step": 0, "epoch": 0, "hessian/lambda_1": 3.0},
        {"step": 9, "epoch": 1, "val/accuracy": 0.5, "test/accuracy": 0.40, "train/accuracy": 0.5},
        {"step": 18, "epoch": 2, "val/accuracy": 0.7, "test/accuracy": 0.45, "train/accuracy": 0.8},
        {"step": 27, "epoch": 3, "val/accuracy": 0.7, "test/accuracy": 0.50, "train/accuracy": 0.9},
        {"step": 27, "epoch": 3, "hessian/lambda_1": 5.0},
    ]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    s = kit.summarize(str(tmp_path), epoch_offset=10)
    # the first of the tied best validation accuracies, its test accuracy; epochs offset
    assert (s["test_accuracy"], s["best_epoch"]) == (0.45, 12)
    assert (s["final_test_accuracy"], s["final_lambda_max"]) == (0.50, 5.0)
    assert s["lambda_curve"] == {"epoch": [10, 13], "value": [3.0, 5.0]}


def test_paired_gain_is_the_mean_of_per_seed_differences():
    a = {"seeds": {"0": {"x": 0.5}, "1": {"x": 0.7}, "2": {"x": 0.9}, "3": None}}
    b = {"seeds": {"0": {"x": 0.4}, "1": {"x": 0.5}, "2": {"x": 0.6}, "3": {"x": 0.1}}}
    gain, noise, n = kit.paired(a, b, "x")
    diffs = np.array([0.1, 0.2, 0.3])  # seed 3 diverged in a: left out
    assert n == 3 and gain == pytest.approx(diffs.mean())
    st = claims_lib.seed_stat(diffs)
    assert noise == pytest.approx(claims_lib.seed_noise(st))


def test_the_eos_threshold_follows_the_logged_gradient_norm(tiny_study):
    run = tiny_study("sam")
    e = run.config.sam_study.eos
    arms = run.results["sections"]["eos"]["arms"]
    for seed, v in arms[f"eos_sam_rho{e.rho:g}"]["seeds"].items():
        t = v["trajectory"]
        assert t["step"] and all(s > 0 for s in t["step"])
        want = optim.sam_stability_threshold(e.learning_rate, e.rho, np.array(t["grad_norm"]))
        np.testing.assert_allclose(t["threshold"], want, rtol=1e-12)
        # ‖g‖ is the trainer's sam/grad_norm at those steps
        folder = runs.run_dir(run.workdir, f"eos_sam_rho{e.rho:g}", f"seed{seed}")
        logged = {
            r["step"]: r["sam/grad_norm"] for r in runs.read_metrics(folder) if "sam/grad_norm" in r
        }
        assert t["grad_norm"] == [logged[s] for s in t["step"]]
    for v in arms["eos_gd"]["seeds"].values():
        assert set(v["trajectory"]["threshold"]) == {2 / e.learning_rate}


def test_late_phase_sam_starts_from_the_sgd_run(tiny_study):
    """The late arm's first λ_max (step 0) is the SGD prefix's last one: the same parameters."""
    run = tiny_study("sam")
    first, late = late_phase.epochs(run.config)
    _, _, prefix, late_arm = late_phase.arms(run.config)
    for seed in kit.seeds(run.config):
        ends = kit.summarize(runs.run_dir(run.workdir, prefix.name, f"seed{seed}"))
        starts = kit.summarize(runs.run_dir(run.workdir, late_arm.name, f"seed{seed}"))
        assert starts["lambda_curve"]["epoch"][0] == 0
        tol = 2 * run.config.sam_study.curvature.tol
        assert starts["lambda_curve"]["value"][0] == pytest.approx(
            ends["lambda_curve"]["value"][-1], rel=tol
        )
    cfg = json.load(open(os.path.join(run.workdir, "runs", late_arm.name, "seed0", "config.json")))
    assert cfg["num_epochs"] == late and cfg["sam"]["rho"] == run.config.sam_study.rho


@pytest.mark.parametrize("spec", ["sam.py", "sam.py:fashion", "sam.py:cifar10"])
def test_configs_validate(spec):
    from sharp_minima.studies import sam

    assert sam.STUDY.check(load_config(spec)) == sam.STUDY.sections


def test_bad_config_exits_2(tmp_path):
    out = run_experiment(
        "sam",
        "--config=configs/sam.py:tiny",
        "--config.sam_study.m_sweep.group_sizes=32,6",
        f"--workdir={tmp_path}",
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "[6] do not divide batch_size=32" in out.stderr
