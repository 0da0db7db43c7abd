"""The run kit of the studies (`sharp_minima.studies.runs`, `common.write_outputs`) and the
library pieces the studies compose: `gradients.DirectionProbe`, `tracking`'s builders, the
trainer's modules (hooks without the loop, TensorBoard)."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import load_config, read_jsonl
from matplotlib.figure import Figure
from scipy import stats

from sharp_minima import files, gradients, train
from sharp_minima.studies import claims as claims_lib
from sharp_minima.studies import common, runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_derive_changes_dotted_fields_of_a_copy_and_refuses_unknown_ones():
    config = load_config("swissroll.py:tiny")
    d = runs.derive(config, {"optim.learning_rate": 0.5, "model.kwargs": {"widths": (3,)}}, seed=7)
    assert (d.seed, d.optim.learning_rate, tuple(d.model.kwargs.widths)) == (7, 0.5, (3,))
    assert config.seed == 0 and config.optim.learning_rate != 0.5  # the original is untouched
    with pytest.raises(train.ConfigError, match="optim.learning_rat"):
        runs.derive(config, {"optim.learning_rat": 1.0})
    with pytest.raises(AttributeError):  # locked: a misspelt field is an error
        d.batch_sizes = 3


def test_cache_recomputes_only_values_whose_key_changed(tmp_path):
    path = str(tmp_path / "m.json")
    calls = []

    def compute(v):
        calls.append(v)
        return {"value": v, "t": (1, 2)}

    cache = runs.Cache(path)
    first = cache.get("a", {"eps": 1e-3}, lambda: compute(1.0))
    assert first == {"value": 1.0, "t": [1, 2]}  # as JSON gives it back
    again = runs.Cache(path)  # a new process reading the file
    assert again.get("a", {"eps": 1e-3}, lambda: compute(2.0)) == first
    assert again.get("a", {"eps": 5e-4}, lambda: compute(3.0))["value"] == 3.0
    assert calls == [1.0, 3.0]
    arrays = again.arrays("grid", {"n": 3}, lambda: {"x": np.arange(3.0)})
    assert runs.Cache(path).arrays("grid", {"n": 3}, lambda: 1 / 0)["x"].tolist() == [0, 1, 2]
    assert os.path.exists(tmp_path / "m.grid.npz") and arrays["x"].dtype == np.float64
    assert runs.Cache(path).names() == ["a", "grid"]


def test_aggregate_series_and_diverged_runs(tmp_path):
    recs = [
        {"run": "a", "seed": 0, "acc": 0.5, "loss": None},
        {"run": "a", "seed": 1, "acc": 0.7, "loss": 2.0},
        {"run": "b", "seed": 0, "diverged": True, "message": "nan"},
    ]
    out = runs.aggregate(recs, "run")
    assert out["a"]["acc"] == {
        "mean": 0.6,
        "std": pytest.approx(0.1),
        "min": 0.5,
        "max": 0.7,
        "n": 2,
    }
    assert out["a"]["loss"]["n"] == 1 and "seed" not in out["a"]
    assert out["b"] == {"runs": 1, "diverged": 1}
    logged = [
        {"step": 8, "t/l_1": 3.0, "t/l_2": 2.0, "x": 1.0},
        {"step": 0, "t/l_1": 1.0, "t/l_2": 0.0},
    ]
    steps, values = runs.series(logged, "t/l_")
    assert steps.tolist() == [0, 8] and values.tolist() == [[1.0, 0.0], [3.0, 2.0]]
    assert runs.series(logged, "x")[1].tolist() == [1.0]
    assert runs.series([], "t/l_")[0].size == 0


def test_a_diverged_run_is_recorded_with_its_step_and_never_retried(tmp_path):
    config = load_config(
        "swissroll.py:tiny",
        **{"data.max_train": 64, "batch_size": 16, "progress": False, "log_every_steps": 1},
    )
    config = runs.derive(config, {"optim.learning_rate": 1e12})
    lines = []
    out = runs.train_run(config, str(tmp_path), log=lines.append, label="[x] ")
    assert isinstance(out, runs.Diverged) and out.step >= 1 and "step" in out.message
    assert any(line.startswith("[x] diverged") for line in lines)
    again = runs.train_run(config, str(tmp_path), log=lines.append)
    assert again == out and json.load(open(tmp_path / "diverged.json"))["step"] == out.step


def test_write_outputs_saves_everything_in_one_place_with_large_arrays_beside(tmp_path):
    def figures(config, results):
        fig = Figure()
        fig.add_subplot().plot(results["curve"])
        return {"curve": fig}

    results = {"curve": np.arange(1000.0), "small": np.arange(3.0), "n": 2}
    lines = []
    out = common.write_outputs(
        None,
        results,
        str(tmp_path),
        lines.append,
        claims=lambda c, r: [("a | b", True, "1 vs 2")],
        figures=figures,
        report=lambda c, r, names: f"{len(r['claims'])} claim, figures {names}\n",
    )
    saved = json.load(open(tmp_path / "results.json"))
    assert saved["curve"] == "results.npz:curve" and saved["small"] == [0.0, 1.0, 2.0]
    assert np.load(tmp_path / "results.npz")["curve"].shape == (1000,)
    claim = {"claim": "a | b", "verdict": "yes", "numbers": "1 vs 2", "source": ""}
    assert out["claims"] == saved["claims"] == [claim] and saved["diverged"] == []
    assert (tmp_path / "report.md").read_text() == "1 claim, figures ['curve']\n"
    assert (tmp_path / "curve.png").stat().st_size > 0 and (tmp_path / "curve.pdf").exists()
    assert lines[0].startswith("[yes") and "] a | b: 1 vs 2" in lines[0]
    assert lines[1] == "verdicts: 1 yes"


def _parse_markdown_table(lines):
    """The cells of a Markdown table as GitHub renders them: split on unescaped ``|``."""
    rows = []
    for line in lines:
        if line.startswith("|") and not set(line) <= set("|- "):
            cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
            rows.append([c.strip().replace("\\|", "|") for c in cells])
    return rows


def test_a_claim_holds_only_beyond_two_noise_units_and_renders_as_one_row():
    # Issue 17: two eigenvalues equal to 1e-7, from an eigensolver accurate to 1e-4, tie.
    a, b, tol = 1.7460952161952408, 1.7460951744849194, 1e-4
    assert claims_lib.verdict(a - b, tol * (a + b)) == claims_lib.WITHIN_NOISE
    assert claims_lib.verdict(a - b) == claims_lib.YES  # what a strict ">" said
    # Issue 29: one rule, 2 noise units (1 unit was a one-sided p of 0.16)
    assert claims_lib.verdict(1.9, 1.0) == claims_lib.verdict(-1.9, 1.0) == claims_lib.WITHIN_NOISE
    assert (claims_lib.verdict(2.1, 1.0), claims_lib.verdict(-2.1, 1.0)) == ("yes", "no")
    assert claims_lib.verdict(1.0, float("nan")) == claims_lib.NOT_TESTED  # unknown noise
    assert claims_lib.ordered([1.41, 1.41 + 1e-6, 2.0], [1e-4] * 3, decreasing=False) == (
        claims_lib.WITHIN_NOISE
    )
    assert claims_lib.ordered([3.0, 2.0, 1.0], [0.1] * 3, decreasing=True) == claims_lib.YES
    assert claims_lib.ordered([3.0, 2.0, 2.5], [0.1] * 3, decreasing=True) == claims_lib.NO
    assert (
        claims_lib.ordered([3.0, float("nan")], [0.1] * 2, decreasing=True) == claims_lib.NOT_TESTED
    )
    assert claims_lib.all_of([claims_lib.YES, claims_lib.WITHIN_NOISE]) == claims_lib.WITHIN_NOISE
    assert claims_lib.all_of([claims_lib.WITHIN_NOISE, claims_lib.NO]) == claims_lib.NO
    # half of a compound claim missing: not tested, whatever the other half says
    assert claims_lib.all_of([claims_lib.NO, None]) == claims_lib.NOT_TESTED
    assert claims_lib.all_of([]) == claims_lib.NOT_TESTED
    # seed spread, widened by the t-quantile: 4 seeds, std 6 → SE 3, t₃(0.977)/2 = 1.65 per unit
    se = claims_lib.seed_noise({"mean": 70.0, "std": 6.0, "n": 4})
    assert se == pytest.approx(3.0 * stats.t.ppf(stats.norm.cdf(2.0), 3) / 2)
    assert claims_lib.verdict(9.0, se) == claims_lib.WITHIN_NOISE  # 3 SE, short of t's 9.9
    assert np.isnan(claims_lib.seed_noise({"mean": 70.0, "std": 0.0, "n": 1}))
    assert claims_lib.verdict(5.0, claims_lib.seed_noise({"n": 1})) == claims_lib.NOT_TESTED
    assert claims_lib.accuracy_noise(0.5, 100) == pytest.approx(0.05)

    claims = [
        ("mean |cos| with top 5 ≥ 5× random", claims_lib.YES, "0.2 | 0.01", "Jastrzębski §4"),
        ("K grows", claims_lib.verdict(a - b, tol * (a + b)), "K=1: 1.75, K=2: 1.75"),
        ("lost", None, "not tested: run x diverged"),
    ]
    lines = claims_lib.claims_table(claims)
    rows = _parse_markdown_table(lines)
    assert rows[0] == ["claim", "source", "verdict", "numbers"]
    assert rows[1] == ["mean |cos| with top 5 ≥ 5× random", "Jastrzębski §4", "yes", "0.2 | 0.01"]
    assert [r[2] for r in rows[1:]] == ["yes", "within noise", "not tested"]
    assert all(len(r) == 4 for r in rows)
    text = "\n".join(lines)
    assert "Verdicts: 1 yes, 1 within noise, 1 not tested" in text and "2 noise units" in text
    smoke = "\n".join(claims_lib.claims_table(claims, smoke_test=True))
    assert "Smoke test" in smoke and "Verdicts:" not in smoke and "1 yes" not in smoke


def _claim(**kw):
    return claims_lib.Claim(
        **{
            "statement": "LB sharper than SB",
            "source": "Keskar et al. 2017, Table 3",
            "quantity": "φ(LB) − φ(SB) > 0",
            "noise": claims_lib.SEEDS,
            "min_seeds": 3,
            **kw,
        }
    )


def test_a_declared_claim_reads_no_against_the_sources_direction_and_needs_its_seeds():
    claim = _claim()
    # synthetic results: LB flatter than SB by 4 SE — against the source
    lb, sb = {"mean": 10.0, "std": 0.5, "n": 5}, {"mean": 12.0, "std": 0.5, "n": 5}
    noise = claims_lib.combined(claims_lib.seed_noise(lb), claims_lib.seed_noise(sb))
    found = claim.test(lb["mean"] - sb["mean"], noise, "10 vs 12", seeds=5)
    assert found == ("LB sharper than SB", "no", "10 vs 12", "Keskar et al. 2017, Table 3")
    assert claim.test(2.0, noise, "12 vs 10", seeds=5).verdict == "yes"
    short = claim.test(2.0, noise, "12 vs 10", seeds=2)
    assert short.verdict == "not tested" and "needs ≥ 3 seeds" in short.numbers
    assert claim.untested("run lb diverged").verdict == "not tested"
    with pytest.raises(ValueError, match="noise model"):
        _claim(noise="a hunch")
    with pytest.raises(ValueError, match="origin"):
        _claim(threshold="keskar.ratio")
    config = ml_collections.ConfigDict({"keskar": {"ratio": 1.5, "same": 0.02}})
    assert _claim(threshold="keskar.ratio", origin="Table 3").threshold_of(config) == 1.5
    assert _claim().threshold_of(config) == 0.0


def test_an_equivalence_claim_is_a_tost_within_its_declared_margin():
    claim = _claim(statement="c does not differ from 0", equivalence="keskar.same")
    config = ml_collections.ConfigDict({"keskar": {"same": 0.5}})
    margin = claim.margin_of(config)
    assert claim.same(0.1, 0.1, margin, "c = 0.1 ± 0.1").verdict == "yes"  # 0.1 + 2·0.1 < 0.5
    assert claim.same(-0.9, 0.1, margin, "c = −0.9").verdict == "no"  # beyond the margin
    # not significant is not the same: a 0.3 ± 0.3 difference reads within noise
    assert claim.same(0.3, 0.3, margin, "c = 0.3 ± 0.3").verdict == "within noise"
    with pytest.raises(ValueError, match="equivalence"):
        _claim().margin_of(config)


def test_the_paired_accuracy_test_against_a_hand_computation():
    # 10 examples: both right on 5, a alone on 3, b alone on 1, both wrong on 1
    a = np.array([1] * 5 + [1, 1, 1] + [0] + [0], bool)
    b = np.array([1] * 5 + [0, 0, 0] + [1] + [0], bool)
    d, se = claims_lib.paired_accuracy(a, b)
    # d = (3 − 1)/10; Var(dᵢ) = (3 + 1)/10 − 0.2² = 0.36; SE = √(0.36/10)
    assert d == pytest.approx(0.2) and se == pytest.approx(0.6 / np.sqrt(10))
    # McNemar's z is (n₁₀ − n₀₁)/√(n₁₀ + n₀₁) = 1; the paired SE gives nearly the same
    assert d / se == pytest.approx(2 / np.sqrt(4), rel=0.1)
    # the unpaired binomial SE counts the shared examples' noise: larger
    unpaired = np.hypot(claims_lib.accuracy_noise(0.8, 10), claims_lib.accuracy_noise(0.6, 10))
    assert unpaired > se
    with pytest.raises(ValueError, match="same examples"):
        claims_lib.paired_accuracy(a, b[:5])


def test_bootstraps_widen_the_error_of_correlated_samples():
    rng = np.random.default_rng(0)
    walk = np.cumsum(rng.normal(size=400)) * 0.1 + rng.normal(size=400)  # autocorrelated
    naive = walk.std(ddof=1) / np.sqrt(walk.size)
    assert claims_lib.block_bootstrap_se(walk, 40) > 2 * naive
    white = rng.normal(size=400)
    assert claims_lib.block_bootstrap_se(white, 1) == pytest.approx(1 / 20, rel=0.2)
    # 16 runs in 4 clusters of identical values: the clusters, not the runs, are the samples
    values = np.repeat([0.0, 1.0, 2.0, 3.0], 4)
    per_cluster = claims_lib.cluster_bootstrap(lambda i: values[i].mean(), np.repeat(range(4), 4))
    assert per_cluster == pytest.approx(values[::4].std() / np.sqrt(4), rel=0.2)
    assert per_cluster > values.std(ddof=1) / np.sqrt(16)


def test_a_study_whose_runs_all_diverged_names_them_and_has_nothing_to_report(tmp_path):
    for name, step in (("a/seed0", 3), ("b/seed0", None)):
        files.write_json(
            os.path.join(runs.run_dir(str(tmp_path), *name.split("/")), "diverged.json"),
            {"message": f"training loss became nan at step {step}", "step": step},
        )
    drawn, lines = [], []
    kwargs = dict(
        figures=lambda c, r: drawn.append(1) or {},
        report=lambda c, r, names: "# report\n",
    )
    with pytest.raises(runs.NothingToReport, match=r"2 runs diverged \(a/seed0 at step 3, b/"):
        common.write_outputs(
            None, {}, str(tmp_path), lines.append, claims=lambda c, r: [("x", None, "-")], **kwargs
        )
    assert not drawn  # no empty figures
    report = (tmp_path / "report.md").read_text()
    assert "## Diverged runs" in report and "| a/seed0 | 3 |" in report
    assert "diverged: run a/seed0 at step 3 (not retried; see report.md)" in lines
    # One tested claim is something to report; the diverged runs are still named.
    out = common.write_outputs(
        None, {}, str(tmp_path), lines.append, claims=lambda c, r: [("x", True, "-")], **kwargs
    )
    assert [d["run"] for d in out["diverged"]] == ["a/seed0", "b/seed0"] and drawn


def test_direction_probe_matches_a_dense_float64_reference():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(40, 3)), rng.normal(size=(40,))
        params = {"w": jnp.asarray(rng.normal(size=3)), "c": jnp.ones(())}

        def loss(p, b):  # only w is a variable (wrt); c is held fixed
            return 0.5 * jnp.mean((b["x"] @ p["w"] * p["c"] - b["y"]) ** 2)

        e = np.linalg.qr(rng.normal(size=(3, 2)))[0].T  # two orthonormal directions
        directions = {"w": jnp.asarray(e), "c": jnp.zeros(2)}
        idx = np.arange(40).reshape(4, 10)
        data = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
        batches = jax.tree.map(lambda a: a.reshape((2, 20) + a.shape[1:]), data)
        probe = gradients.DirectionProbe(loss, wrt="w", top=2)
        out = probe(
            params, directions, data, idx, batches, None,
            step_size=0.1, alphas=[0.5, 2.0], ks=[-1.0, 1.0], key=jax.random.key(0),
        )  # fmt: skip
        w = np.asarray(params["w"])
        full = lambda v: 0.5 * np.mean((x @ v - y) ** 2)  # noqa: E731
        g = np.stack([x[i].T @ (x[i] @ w - y[i]) / len(i) for i in idx])
        cos = np.abs(g @ e.T) / np.linalg.norm(g, axis=1, keepdims=True)
        g1 = g @ e[0]
        delta = [np.mean([full(w - a * 0.1 * c * e[0]) for c in g1]) - full(w) for a in (0.5, 2)]
        step = 0.1 * np.mean(np.abs(g1))
        np.testing.assert_allclose(out["cos_top"], cos.mean(), rtol=1e-12)
        np.testing.assert_allclose(out["loss"], full(w), rtol=1e-12)
        np.testing.assert_allclose(out["delta"], delta, rtol=1e-10)
        np.testing.assert_allclose(out["along"], [full(w - step * e[0]), full(w + step * e[0])])
        assert 0 < float(out["cos_random"]) < 1


def test_tracking_imports_the_hook_protocol_but_not_the_loop_or_flax():
    code = (
        "import sys, sharp_minima.tracking, sharp_minima.gradients; "
        "print(sorted(m for m in ('flax', 'sharp_minima.train.loop', 'orbax.checkpoint', "
        "'tensorflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


def test_trainer_modules_are_small_and_offer_every_name():
    folder = os.path.join(ROOT, "sharp_minima", "train")
    sizes = {f: len(open(os.path.join(folder, f)).readlines()) for f in os.listdir(folder)}
    assert all(n <= 400 for f, n in sizes.items() if f.endswith(".py")), sizes
    for name in train.__all__:
        assert getattr(train, name) is not None, name
    with pytest.raises(AttributeError):
        train.no_such_name  # noqa: B018


def test_tensorboard_writer_when_the_config_asks(tmp_path):
    pytest.importorskip("tensorboardX")
    config = load_config(
        "swissroll.py:tiny",
        **{"data.max_train": 32, "batch_size": 16, "progress": False, "tensorboard": True},
    )
    train.train(config, str(tmp_path))
    events = os.listdir(tmp_path / "tensorboard")
    assert events and events[0].startswith("events.out.tfevents")
    assert os.path.getsize(tmp_path / "tensorboard" / events[0]) > 100
    assert read_jsonl(tmp_path / "metrics.jsonl")  # metrics.jsonl is always written


def test_nothing_to_report_is_one_line_and_exit_status_1(capsys):
    from experiments import cli

    with pytest.raises(SystemExit) as e:
        with cli.user_errors_exit_2():
            raise runs.NothingToReport("nothing to report: 1 run diverged (a/seed0 at step 3)")
    assert e.value.code.endswith("error: nothing to report: 1 run diverged (a/seed0 at step 3)")
    assert "\n" not in e.value.code  # SystemExit(str) prints it on stderr, exit status 1


def test_work_recorded_before_sams_settings_existed_is_still_this_configs(tmp_path):
    """With SAM off (sam.rho = 0) the sam.* fields change nothing: a study's record and a
    run's checkpointed config.json written before they existed still match; with SAM on,
    they do not."""
    from sharp_minima.studies import sections

    config = load_config("quickstart.py:tiny")
    fields = sections.compared_fields(config)
    assert not [k for k in fields if k.startswith("sam.")] and "optim.name" in fields
    on = load_config("quickstart.py:tiny", **{"sam.rho": 0.05})
    assert sections.compared_fields(on)["sam.rho"] == 0.05
    run = load_config("swissroll.py:tiny")
    old = train.config_dict(run)
    del old["sam"]
    os.makedirs(tmp_path / "checkpoints" / "4")
    files.write_json(str(tmp_path / "config.json"), old)
    train.check_resumable(str(tmp_path), run)  # no error
    with pytest.raises(train.ConfigError, match="fields differ: sam"):
        train.check_resumable(str(tmp_path), load_config("swissroll.py:tiny", **{"sam.rho": 0.1}))
