"""The README (a front page) and the guide (``docs/guide/``): the two commands, the table of
studies, and every Python example, run here."""

import json
import os
import re

import numpy as np
from helpers import run_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name):
    with open(name if os.path.isabs(name) else os.path.join(ROOT, name)) as f:
        return f.read()


GUIDE = os.path.join(ROOT, "docs", "guide")


def guide_blocks() -> list[str]:
    """The Python code blocks of every guide page, in page order."""
    blocks = []
    for name in sorted(os.listdir(GUIDE)):
        if name.endswith(".md"):
            blocks += re.findall(r"```python\n(.*?)```", read(os.path.join(GUIDE, name)), re.S)
    return blocks


def guide_block(marker: str) -> str:
    return next(b for b in guide_blocks() if marker in b)


_HESSIAN_EXAMPLE = {}


def hessian_example():
    """The namespace of the guide's first (hessian) example, run once per module."""
    if not _HESSIAN_EXAMPLE:
        block = guide_block("hessian.eigenpairs(loss_fn, params, batches, k=5")
        exec(compile(block, "docs/guide/03-hessian.md", "exec"), _HESSIAN_EXAMPLE)
    return _HESSIAN_EXAMPLE


def run_after_hessian_example(marker):
    """Runs the block containing ``marker`` after the guide's first (hessian) example, in a
    copy of its namespace (later examples use its loss_fn, params and batches)."""
    namespace = dict(hessian_example())
    exec(compile(guide_block(marker), "docs/guide", "exec"), namespace)
    return namespace


def test_ci_runs_exactly_the_readme_test_command():
    readme = read("README.md")
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2, commands
    ci_lines = [line.strip() for line in read(".ci/run").splitlines()]
    assert commands[1] in ci_lines
    # The main job is the Keskar quickstart (its tiny variant runs in test_keskar.py).
    assert "python -m experiments.keskar --config=configs/quickstart.py" in commands[0]


def test_readme_python_example_runs_and_agrees_with_the_guide():
    block = re.search(r"```python\n(.*?)```", read("README.md"), re.S).group(1)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    top, tr = namespace["top"], namespace["tr"]
    assert top.values.shape == (5,) and top.converged.all() and tr.stderr >= 0
    guide = hessian_example()
    np.testing.assert_allclose(top.values, guide["top"].values, rtol=1e-4)
    assert guide["top"].converged.all() and guide["tr"].stderr >= 0


def test_readme_curvature_object_example_runs():
    namespace = run_after_hessian_example("hessian.Curvature(")
    assert namespace["curv"].num_traces == 1 and namespace["top"].converged.all()


def test_readme_custom_loss_example_runs():
    block = guide_block("loss_fn=flooded_loss")
    namespace = {}
    exec(compile(block, "docs/guide", "exec"), namespace)
    result = namespace["result"]
    assert int(result.state.step) > 0 and "train/loss" in result.history[-1]


def test_readme_sharpness_example_runs():
    namespace = run_after_hessian_example("sharpness.epsilon_sharpness(")
    assert namespace["r"].value >= 0 and namespace["avg"].stderr >= 0


def test_readme_training_example_runs():
    block = guide_block("train.Hook")
    first, second = {}, {}
    exec(compile(block, "docs/guide/07-training.md", "exec"), first)
    exec(compile(block, "docs/guide/07-training.md", "exec"), second)  # a second run trains again
    for namespace in (first, second):
        result = namespace["result"]
        assert int(result.state.step) == result.final["step"] > 0 and result.resumed_from == 0
        logged = open(os.path.join(namespace["workdir"], "metrics.jsonl")).read()
        assert "train/param_norm" in logged


def test_curvature_demo_runs_and_rewrites_its_outputs(tmp_path, tiny_study):

    def demo(*args):
        return run_experiment("curvature_demo", *args, env={"JAX_PLATFORMS": "cpu"})

    run = tiny_study("curvature_demo")  # trained and measured once per session
    assert run.results["tracking"]["steps"] == [4, 8]  # every 4 steps, warm-started
    assert len(os.listdir(os.path.join(run.workdir, "arrays", "hessian"))) == 2
    workdir = run.copy(tmp_path / "w")
    os.remove(os.path.join(workdir, "tracking.png"))
    out = demo("--config=configs/curvature_demo.py:tiny", f"--workdir={workdir}")
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("results.json", "report.md", "tracking.png", "spectrum.png"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert json.load(open(os.path.join(workdir, "results.json")))["tracking"]["steps"] == [4, 8]


def test_curvature_demo_rejects_bad_flags_in_one_line(tmp_path):
    """Not in the tiny-study group: these stop before any work."""

    def demo(*args):
        return run_experiment("curvature_demo", *args, env={"JAX_PLATFORMS": "cpu"})

    bad = demo("--stepz=3", f"--workdir={tmp_path}")
    assert bad.returncode == 2 and "stepz" in bad.stderr and "Traceback" not in bad.stderr
    bad = demo(
        "--config=configs/curvature_demo.py:tiny",
        "--config.curvature.k=0",
        f"--workdir={tmp_path}/b",
    )
    assert bad.returncode == 2 and "config.curvature.k must be a finite integer >= 1" in bad.stderr
    # An override without --config= says what to add (issue 17).
    bad = demo("--config.curvature.k=0", f"--workdir={tmp_path}/c")
    assert bad.returncode == 2 and "add --config=configs/curvature_demo.py" in bad.stderr


def test_readme_optim_example_runs():
    import jax

    namespace = run_after_hessian_example("optim.nsgd(")
    tx, params = namespace["tx"], namespace["params"]
    updates, _ = tx.update(params, tx.init(params), params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)


def test_the_guide_sam_example_runs():

    ns = run_after_hessian_example("optim.sam(0.05)")
    loss_fn, batch = ns["loss_fn"], ns["batch"]
    assert float(loss_fn(ns["sam_params"], batch)) < float(loss_fn(ns["params"], batch))
    d = ns["diagnostics"]
    assert d["grad_norm"] > 0 and -1 <= d["cos"] <= 1 and np.isfinite(d["sharpness"])
    # m-sharpness: a step of its own, not the whole batch's perturbation
    one, _ = ns["sam_step"](ns["params"], ns["tx"].init(ns["params"]), batch)
    diff = ns["tree_util"].norm(ns["tree_util"].sub(one, ns["m_params"]))
    assert float(diff) > 0 and np.isfinite(float(diff))
    assert set(ns["m_state"][0].sam_metrics) == {"sharpness", "grad_norm", "cos"}


def test_readme_landscape_example_runs():
    block = guide_block("basin_volume")
    namespace = {}
    exec(compile(block, "docs/guide/10-landscape.md", "exec"), namespace)
    vol, surface = namespace["vol"], namespace["surface"]
    import numpy as np

    exact = -0.5 * np.log(36.0) + np.log(4 * np.pi / 3)  # ω_3 ∏ √(2c/h_i), c = 0.5
    assert abs(vol.log_volume - exact) < 5 * vol.stderr + 0.01
    assert surface.shape == (51, 51) and surface[25, 25] == 0.0


def test_readme_study_contract_example_runs(tmp_path, tiny_study):
    block = guide_block("keskar.figures(config, results)")
    workdir = tiny_study("keskar").copy(tmp_path / "w")  # trained once per session
    assert '"runs/keskar_tiny"' in block
    namespace = {}
    exec(
        compile(block.replace('"runs/keskar_tiny"', repr(workdir)), "docs/guide", "exec"), namespace
    )
    assert namespace["results"]["runs"] and "sharpness" in namespace["figures"]


def test_readme_operators_and_noise_example_runs():
    ns = run_after_hessian_example("operators.GGN(")
    assert ns["top_ggn"].converged.all() and ns["top_ggn"].values[0] > 0
    assert ns["top_cov"].values[0] > 0 and ns["tr_fisher"].value > 0
    # Σ = F_emp − ḡḡᵀ ≤ F_emp, for the same loss (the example's loss_fn has no ½: 4× Σ).
    same = ns["operators"].GradientCovariance(ns["model_fn"], "squared_error")
    top = same.eigenpairs(ns["params"], ns["batches"], k=1, key=ns["jax"].random.key(0))
    assert top.values[0] <= ns["top_ef"].values[0]
    np.testing.assert_allclose(4 * top.values[0], ns["top_cov"].values[0], rtol=1e-3)
    total = ns["est"].total
    parts = ns["est"].layers
    assert abs(sum(p.trace_cov for p in parts.values()) - total.trace_cov) < 1e-4 * total.trace_cov
    assert total.b_simple > 0 and total.b_simple_stderr > 0 and ns["est"].num_examples == 512
    assert ns["b_noise"].value > 0


def test_readme_dynamics_example_runs():
    ns = run_after_hessian_example("dynamics.double_well(")
    assert 0.4 < ns["in_a"] < 0.55  # the runs left the deep well: occupation, not depth
    assert abs(ns["ratio"] - 0.88) < 0.01
    assert (ns["runs"].escape_step >= 0).mean() > 0.9


def test_readme_noisy_quadratic_example_runs():
    ns = run_after_hessian_example("dynamics.noisy_quadratic(")
    fit = ns["fit"]
    assert abs(fit.b_crit - 193) < 2 and fit.residual < 0.07  # the numbers the README quotes
    steps = ns["steps"]
    assert steps[0] / steps[1] > 1.9 and steps[-2] / steps[-1] < 1.05  # the two regimes


def test_the_guide_tracking_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it writes runs/tracked
    namespace = {}
    exec(
        compile(guide_block("tracking.EigenTracker("), "docs/guide/08-tracking.md", "exec"),
        namespace,
    )
    steps = [step for step, *_ in namespace["tracker"].history]
    assert steps[0] == 0 and len(steps) >= 2
    logged = open(tmp_path / "runs" / "tracked" / "metrics.jsonl").read()
    assert "hessian/lambda_1" in logged


def test_the_guide_models_and_data_example_runs():
    namespace = {}
    block = guide_block("get_model(")
    exec(compile(block, "docs/guide/06-models-and-data.md", "exec"), namespace)
    ds = namespace["ds"]
    assert ds.num_classes == 10 and ds.x_train.shape[1:] == (40, 1) and len(ds.x_val) > 0
    assert namespace["model"].__class__.__name__ == "MLP"  # f1: Keskar's MNIST network


# Every Python block of the guide is run by one of the tests above: the marker each finds it by.
MARKERS = (
    "hessian.eigenpairs(loss_fn, params, batches, k=5",
    "hessian.Curvature(",
    "loss_fn=flooded_loss",
    "sharpness.epsilon_sharpness(",
    "train.Hook(param_norm",
    "optim.nsgd(",
    "optim.sam(0.05)",
    "basin_volume",
    "keskar.figures(config, results)",
    "operators.GGN(",
    "dynamics.double_well(",
    "dynamics.noisy_quadratic(",
    "tracking.EigenTracker(",
    "get_model(",
)


def test_every_python_block_of_the_guide_is_run_by_a_test():
    for block in guide_blocks():
        found = [m for m in MARKERS if m in block]
        assert found, f"no test runs this guide block:\n{block[:300]}"


def test_the_readme_is_a_front_page_whose_verdicts_are_the_notebooks():
    import nbformat

    readme = read("README.md")
    assert len(readme.splitlines()) <= 250
    rows = {}
    for line in readme.splitlines():
        if line.startswith("| ") and "experiments." in line:
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            module = re.search(r"experiments\.(\w+)", cells[1]).group(1)
            rows[module] = cells[-1]
    notebook_of = {"nudged_sgd": "sharpest_directions"}
    for module, verdicts in rows.items():
        nb = nbformat.read(
            os.path.join(
                ROOT, "experiments", "notebooks", f"{notebook_of.get(module, module)}.ipynb"
            ),
            as_version=4,
        )
        text = json.dumps(nb.dict(), ensure_ascii=False)
        found = list(dict.fromkeys(re.findall(r"Verdicts: ([^.]*)\.", text)))  # in order, once
        # Sec. 3 and Sec. 4 share one notebook: its first table is Sec. 3's, its second Sec. 4's.
        index = 1 if module == "nudged_sgd" else 0
        assert found and found[index] == verdicts, (module, found, verdicts)


QUOTES = re.compile(r"<!-- quotes (\S+) -->(.*?)<!-- /quotes -->", re.S)
# A number worth checking: a decimal or at least three digits (small counts such as "3
# seeds" or "K = 5" are the config's, and the config is the run's).
NUMBER = re.compile(r"(?<![\w.,])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def _normal(text: str) -> str:
    return text.replace("−", "-").replace("\u2009", "").replace("\u202f", "")


def quoted_numbers(text: str) -> list[tuple[str, str]]:
    """``(results file, number)`` for every number in the ``<!-- quotes docs/results/x.md
    -->`` … ``<!-- /quotes -->`` blocks of a page."""
    return [
        (path, n)
        for path, block in QUOTES.findall(text)
        for n in NUMBER.findall(_normal(block))
        if "." in n or sum(c.isdigit() for c in n) >= 3
    ]


def test_numbers_quoted_in_the_readme_and_the_guide_are_the_stored_results():
    """Every number the README or the guide quotes from a study's default run (inside a
    quotes block) is in that run's report, stored in docs/results by
    `experiments.execute_notebooks`; and those reports are the notebooks' runs (the same
    verdict lines)."""
    import nbformat

    from sharp_minima.studies.notebooks import STUDIES

    pages = {"README.md": read("README.md")}
    pages.update({f: read(os.path.join("docs", "guide", f)) for f in os.listdir(GUIDE)})
    quoted = {page: quoted_numbers(text) for page, text in pages.items()}
    assert sum(map(len, quoted.values())) >= 40  # the study pages quote their runs
    for page, numbers in quoted.items():
        for path, n in numbers:
            stored = _normal(read(path))
            assert re.search(rf"(?<![\d.]){re.escape(n)}(?![\d])", stored), (page, path, n)
    for notebook, studies in STUDIES.items():
        nb = nbformat.read(
            os.path.join(ROOT, "experiments", "notebooks", f"{notebook}.ipynb"), as_version=4
        )
        text = json.dumps(nb.dict(), ensure_ascii=False)
        shown = list(dict.fromkeys(re.findall(r"Verdicts: ([^.]*)\.", text)))
        stored = [
            re.findall(r"Verdicts: ([^.]*)\.", read(os.path.join("docs", "results", f"{s}.md")))
            for s in studies
        ]
        assert [v[0] for v in stored] == shown, (notebook, stored, shown)


def test_quoted_numbers_are_found_in_their_blocks():
    text = "a 1.5 b <!-- quotes r.md -->φ 6.53, −3,475 and 98.1 %; 3 seeds, K = 20, 1,000"
    text += "<!-- /quotes --> 7.25"
    assert quoted_numbers(text) == [
        ("r.md", "6.53"),
        ("r.md", "3,475"),
        ("r.md", "98.1"),
        ("r.md", "1,000"),
    ]
