"""The lecture notes' study (`sharp_minima.studies.sgd_noise`) end to end on its tiny config
(in-process), its bookkeeping against hand computations, configs and exit status 2."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_config, run_experiment

from sharp_minima import dynamics, gradients
from sharp_minima.studies import sgd_noise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sgd_noise_tiny_end_to_end(tiny_study):
    run = tiny_study("sgd_noise")
    secs, config = run.results["sections"], run.config
    assert set(secs) == set(sgd_noise.SECTIONS)
    claims = {c["claim"]: c["verdict"] for c in run.results["claims"]}
    # Every section contributes its claims, each with a verdict.
    for i in range(len(sgd_noise.SECTIONS)):
        assert any(c.startswith(f"[{i}] ") for c in claims), i
    # 0: the rescaled network is the same function; the invariant measures do not move.
    rows = secs["rescaling"]["rows"]
    acc = {rows[k]["test_accuracy"] for k in rows}
    assert len(acc) == 1
    ref = rows["1"]
    for k, row in rows.items():
        assert row["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5)
        assert row["slice_rise"] == pytest.approx(ref["slice_rise"], rel=1e-4)
        assert row["adaptive"] == pytest.approx(ref["adaptive"], rel=1e-6)
        if k != "1":  # λ_max does move
            assert abs(np.log(row["lambda_max"] / ref["lambda_max"])) > 0.1
    # 1: the identity rows are the closed forms; all 16 rows of the lecture's table are there.
    toy = secs["toy"]["rows"]
    assert len(toy) == 16 and all(r["lecture"] for r in toy)
    for r in toy:
        if r["A"] == "identity":
            assert r["phi"] == pytest.approx(r["closed_form"], rel=1e-9)
    # 2: every k and arm ran, the baseline once.
    names = set(secs["scaling"]["runs"])
    assert "k1/none" in names and "k4/gradual" in names and "k1/gradual" not in names
    # 3: B_opt for every η and N, and the three schedules, growing B in fewer updates.
    ns = secs["noise_scale"]
    assert len(ns["by_lr"]) == len(config.sgd_noise.noise_scale.learning_rates)
    assert ns["schedules"]["grow"]["updates"] < ns["schedules"]["decay"]["updates"]
    # 4: every (η/B, B, seed) endpoint, η = (η/B)·B, and the SDE time the same along a line.
    pts = secs["factors"]["points"]
    f = config.sgd_noise.factors
    assert len(pts) == len(f.ratios) * len(f.batch_sizes) * config.sgd_noise.seeds
    for p in pts:
        assert p["learning_rate"] == pytest.approx(p["ratio"] * p["batch_size"])
    by_ratio = {}
    for p in pts:
        by_ratio.setdefault(p["ratio"], set()).add(round(p["sde_time"], 6))
    assert all(len(v) == 1 for v in by_ratio.values())
    # 5: the simulations' closed-form checks hold even at the tiny scale.
    # (64 runs cannot show a 5 % equivalence: the tiny scale can only fail to contradict)
    for head in ("[5] the stationary spread", "[5] the noisy quadratic"):
        assert claims[next(c for c in claims if c.startswith(head))] in ("yes", "within noise")
    # The spread's closed form is 2T/(2 − ηh) (h = 1) with T the temperature ησ²(1 − B/N)/(2B)
    # of σ² = N/(N − 1) (unbiased, for cᵢ of ddof-0 variance 1); issue 29 found an extra
    # N/(N − 1) in it, which 4,000 runs hid.
    for r in secs["sde"]["spread"]:
        eta = r["learning_rate"]
        assert r["expected"] == pytest.approx(2 * r["temperature"] / (2 - eta), rel=1e-12)
        assert r["temperature"] == pytest.approx(r["noise_scale"] * 64 / 63 / 2, rel=1e-12)
    # 6: steps to the target fall with B.
    steps = [r["steps"] for r in secs["critical"]["per_batch"]]
    assert np.isfinite(steps).all() and steps[0] > steps[-1]
    report = open(os.path.join(run.workdir, "report.md")).read()
    for i, section in enumerate(sgd_noise.STUDY.sections):
        assert f"## {i}. {section.title}" in report
    assert "23.74" in report and "T = ησ²(1 − B/N)/(2B)" in report


def test_warmup_schedules_by_hand():
    # k = 4, η₀ = 0.1, 2 warm-up epochs (Goyal et al.'s arms, by epoch).
    rate = lambda arm, k, epoch: sgd_noise.warmup_schedule(arm, k, 0.1, 2)(epoch)  # noqa: E731
    assert rate("none", 4, 0.0) == pytest.approx(0.4)
    assert rate("constant", 4, 1.9) == pytest.approx(0.1)
    assert rate("constant", 4, 2.0) == pytest.approx(0.4)
    assert rate("gradual", 4, 0.0) == pytest.approx(0.1)
    assert rate("gradual", 4, 1.0) == pytest.approx(0.25)
    assert rate("gradual", 4, 5.0) == pytest.approx(0.4)
    assert rate("gradual", 1, 0.0) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown warm-up"):
        sgd_noise.warmup_schedule("linear", 2, 0.1, 2)


def test_noise_scale_and_temperature_bookkeeping_by_hand():
    # noise scale η(1 − B/N)/(B(1 − μ)): η = 0.2, B = 50, N = 1000 → 0.2·0.95/50 = 0.0038.
    assert gradients.noise_scale(0.2, 50, 1000) == pytest.approx(0.0038)
    # With momentum 0.9 it is ten times larger.
    assert gradients.noise_scale(0.2, 50, 1000, momentum=0.9) == pytest.approx(0.038)
    # N → ∞: η/B. B = N: no noise at all.
    assert gradients.noise_scale(0.2, 50) == pytest.approx(0.004)
    assert gradients.noise_scale(0.2, 1000, 1000) == 0.0
    # The lecture sums the loss over N: its g = η(N/B − 1) is N times the noise scale.
    eta, b, n = 0.2, 50, 1000
    assert eta * (n / b - 1) == pytest.approx(n * gradients.noise_scale(eta, b, n))
    # The temperature is the noise scale × σ²/2 (the T of exp(−L/T)); σ² is required.
    t = gradients.temperature(eta, b, n, gradient_variance=3.0)
    assert t == pytest.approx(0.0038 * 3.0 / 2)
    with pytest.raises(TypeError, match="gradient_variance"):
        gradients.temperature(eta, b, n)  # the old call, which returned the noise scale


def test_sgd_at_the_temperature_samples_exp_of_minus_loss_over_t():
    """A mean-loss SGD step with isotropic per-example variance σ² and the Langevin SDE at
    `gradients.temperature` have the same stationary spread T/h on a quadratic (small η):
    the noise scale, half as large per unit σ², would simulate at the wrong T."""
    h, eta, b, sigma2, runs = 1.0, 0.01, 4, 4.0, 4000
    pot = dynamics.quadratic([h])
    sgd = dynamics.Simulator(pot, dynamics.isotropic_noise(np.sqrt(sigma2 / b)))
    x = sgd.run(jnp.zeros((runs, 1)), key=jax.random.key(0), learning_rate=eta, num_steps=800)
    temp = gradients.temperature(eta, b, gradient_variance=sigma2)
    lang = dynamics.Simulator(pot, dynamics.langevin_noise(temp, eta))
    y = lang.run(jnp.zeros((runs, 1)), key=jax.random.key(1), learning_rate=eta, num_steps=800)
    exact = temp / (h * (1 - eta * h / 2))  # both discrete chains have this variance
    se = exact * np.sqrt(2 / runs)
    for v in (float(x.final.var()), float(y.final.var())):
        assert abs(v - exact) < 4 * se
    wrong = gradients.noise_scale(eta, b) / (h * (1 - eta * h / 2))  # 2/σ² × too small
    assert abs(float(x.final.var()) - wrong) > 10 * se


def test_steps_to_target_and_best_batch():
    steps, loss = [0, 10, 20, 30], [2.0, 1.0, 0.5, 0.25]
    # log-linear between evaluations: 0.7 lies between 1.0 (step 10) and 0.5 (step 20).
    expect = 10 + 10 * np.log(1.0 / 0.7) / np.log(2.0)
    assert sgd_noise.steps_to_target(steps, loss, 0.7) == pytest.approx(expect)
    assert sgd_noise.steps_to_target(steps, loss, 0.1) == np.inf
    assert sgd_noise.steps_to_target(steps, [3.0, np.nan, 0.2, 0.1], 0.5) == 20.0
    # A parabola in log₂ B peaking at 2^4.5 between grid points 16 and 32.
    bs = [4, 8, 16, 32, 64]
    acc = [-((np.log2(b) - 4.5) ** 2) for b in bs]
    b_opt, edge = sgd_noise.best_batch(bs, acc)
    assert b_opt == pytest.approx(2**4.5) and not edge
    assert sgd_noise.best_batch(bs, [5, 4, 3, 2, 1]) == (4.0, True)


@pytest.mark.parametrize("spec", ["sgd_noise.py", "sgd_noise.py:fashion", "sgd_noise.py:paper"])
def test_configs_validate(spec):
    assert sgd_noise.STUDY.check(load_config(spec)) == sgd_noise.STUDY.sections


def test_bad_config_exits_2(tmp_path):
    out = run_experiment(
        "sgd_noise",
        "--config=configs/sgd_noise.py:tiny",
        "--config.sgd_noise.scaling.ks=2,4",
        f"--workdir={tmp_path}",
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "ks must include 1" in out.stderr


def _snapshot(folder):
    return {
        os.path.join(d, f): (
            os.stat(os.path.join(d, f)).st_mtime_ns,
            os.path.getsize(os.path.join(d, f)),
        )
        for d, _, fs in os.walk(folder)
        for f in fs
    }


def test_the_report_names_only_the_figures_drawn(tiny_study):
    run = tiny_study("sgd_noise")
    config, results = run.config, run.results
    assert "critical_batch" in sgd_noise.figures(config, results)
    # Too few batch sizes reached the target: no fit, no figure, and the report names none.
    critical = {**results["sections"]["critical"], "fit": None}
    nofit = {**results, "sections": {**results["sections"], "critical": critical}}
    drawn = sgd_noise.figures(config, nofit)
    assert "critical_batch" not in drawn
    report = sgd_noise.report_markdown(config, nofit)
    assert report.rstrip().endswith(f"Figures (PNG and PDF): {', '.join(drawn)}.")
    assert "critical_batch" not in report.splitlines()[-1]


def test_a_changed_config_is_refused_in_one_line_and_the_workdir_left_alone(tiny_study, tmp_path):
    workdir = tiny_study("sgd_noise").copy(tmp_path / "w")
    before = _snapshot(workdir)
    out = run_experiment(
        "sgd_noise",
        "--config=configs/sgd_noise.py:tiny",
        "--config.sgd_noise.sde.runs=300",
        f"--workdir={workdir}",
    )
    assert out.returncode == 2, out.stderr[-2000:]
    (line,) = out.stderr.strip().splitlines()
    assert "sgd_noise.sde.runs: 64 → 300" in line and "--extend" in line
    assert _snapshot(workdir) == before
    # A field the study does not read is not in its config.
    out = run_experiment(
        "sgd_noise",
        "--config=configs/sgd_noise.py:tiny",
        "--config.optim.learning_rate=1",
        f"--workdir={tmp_path / 'x'}",
    )
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "no config field 'optim'" in out.stderr


def test_sections_by_name_from_the_command_line_reuse_the_finished_work(tiny_study, tmp_path):
    workdir = tiny_study("sgd_noise").copy(tmp_path / "w")
    out = run_experiment(
        "sgd_noise", "--config=configs/sgd_noise.py:tiny", "--config.sections=sde,toy",
        f"--workdir={workdir}",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "measuring" not in out.stdout  # both sections read back from the cache
    assert "== section 1. Toy sharpness" in out.stdout and "== section 5. The SDE" in out.stdout
    report = open(os.path.join(workdir, "report.md")).read()
    assert "## 1. Toy" in report and "## 5. The SDE" in report and "## 6." not in report
