"""The sections driver (`sharp_minima.studies.sections`) on a study made of plain Python
sections, and the structure every study keeps: sections as files, no registries beside the
sections tuple, no study importing another, short files and functions."""

import ast
import glob
import importlib
import json
import os
import re

import ml_collections
import pytest
from helpers import ROOT
from matplotlib.figure import Figure

from sharp_minima import train
from sharp_minima.studies import sections
from sharp_minima.studies.sections import Section, Study

STUDIES = ("keskar", "sharpest_directions", "nudged_sgd", "visualize_generalization",
           "sgd_noise", "curvature_demo")  # fmt: skip
PACKAGES = ("sgd_noise", "visualize_generalization")


# ------------------------------------------------------------------- a study of toy sections


def _figure():
    fig = Figure()
    fig.add_subplot().plot([0, 1])
    return fig


def _toy_study(ran):
    def make(name, *, figures=True, claims=True):
        def run(ctx):
            ran.append(name)
            return {"value": ctx.config.toy[name], "data": ctx.data}

        return Section(
            name=name,
            title=f"Section {name}",
            run=run,
            report=lambda config, res: [f"{name} = {res['value']}"],
            claims=(lambda c, r: [(f"{name} holds", r["value"] > 0, str(r["value"]))])
            if claims
            else sections._no_claims,
            # A figure only when the value is positive: like a fit that may fail.
            figures=(lambda c, r: {f"fig_{name}": _figure()} if r["value"] > 0 else {})
            if figures
            else sections._no_figures,
            needs_data=name != "c",
        )

    return Study(
        name="toy",
        title=lambda config: f"Toy — {config.name}",
        sections=(make("a"), make("b"), make("c", figures=False, claims=False)),
        load_data=lambda config: "the data",
        header=lambda config, results: ["header line"],
    )


def _config(**values):
    c = ml_collections.ConfigDict()
    c.name = "toy"
    c.seed = 0
    c.sections = ("a", "b", "c")
    c.toy = ml_collections.ConfigDict({"a": 1.0, "b": -1.0, "c": 2.0})
    for k, v in values.items():
        node, *rest = k.split(".")
        if rest:
            c[node][rest[0]] = v
        else:
            c[k] = v
    c.lock()
    return c


def _files(folder):
    return {
        os.path.relpath(os.path.join(d, f), folder): (
            os.stat(os.path.join(d, f)).st_mtime_ns,
            open(os.path.join(d, f), "rb").read(),
        )
        for d, _, fs in os.walk(folder)
        for f in fs
        if f != ".lock"
    }


def test_the_report_names_exactly_the_figures_drawn_and_claims_carry_their_section(tmp_path):
    ran, lines = [], []
    study = _toy_study(ran)
    results = study.run(_config(), str(tmp_path), log=lines.append)
    assert ran == ["a", "b", "c"] and "== section 0. Section a" in lines
    assert results["sections"]["a"]["data"] == "the data"  # loaded once, for a and b
    assert [c["claim"] for c in results["claims"]] == ["[0] a holds", "[1] b holds"]
    report = (tmp_path / "report.md").read_text()
    # b's value is negative: no figure, and the report does not name one.
    assert report.endswith("Figures (PNG and PDF): fig_a.\n")
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["fig_a.png"]
    assert report.index("header line") < report.index("## Claims") < report.index("## 0.")
    assert "## 2. Section c\n\nc = 2.0" in report
    assert report == study.report_markdown(_config(), results)  # the same text, standalone
    record = json.loads((tmp_path / "study.json").read_text())
    assert record["finished"] == ["a", "b", "c"] and record["config"]["toy.b"] == -1.0


def test_sections_are_chosen_by_name_also_as_a_comma_list(tmp_path):
    ran = []
    study = _toy_study(ran)
    results = study.run(_config(sections=("c,a",)), str(tmp_path), log=lambda s: None)
    assert ran == ["a", "c"] and list(results["sections"]) == ["a", "c"]  # the study's order
    with pytest.raises(train.ConfigError, match="no section 'x'; the sections are a, b, c"):
        study.run(_config(sections=("a", "x")), str(tmp_path / "bad"))
    with pytest.raises(train.ConfigError, match="a named twice"):
        study.check(_config(sections=("a,a",)))
    assert not (tmp_path / "bad").exists()  # refused before any work
    assert sections.section_names(" toy , sde,") == ("toy", "sde")


def test_a_changed_config_over_finished_work_is_refused_untouched_or_extended(tmp_path):
    ran = []
    study = _toy_study(ran)
    study.run(_config(), str(tmp_path), log=lambda s: None)
    before = _files(tmp_path)
    changed = _config(**{"toy.b": 3.0, "seed": 1})
    with pytest.raises(train.ConfigError) as e:
        study.run(changed, str(tmp_path), log=lambda s: None)
    message = str(e.value)
    assert "\n" not in message and "finished work (a, b, c)" in message
    assert "seed: 0 → 1" in message and "toy.b: -1.0 → 3.0" in message
    assert "another workdir" in message and "--extend" in message
    assert _files(tmp_path) == before and ran == ["a", "b", "c"]  # nothing ran or changed
    # Fields that change nothing a study computes are never refused; neither is a new section
    # selection (extending a workdir with more sections).
    study.run(_config(sections=("b",), num_devices=4), str(tmp_path), log=lambda s: None)
    # --extend keeps the workdir and records the new config.
    results = study.run(changed, str(tmp_path), log=lambda s: None, extend=True)
    assert results["sections"]["b"]["value"] == 3.0
    assert json.loads((tmp_path / "study.json").read_text())["config"]["seed"] == 1
    other = Study("other", lambda c: "", (Section("a", "", lambda ctx: {}, lambda c, r: []),))
    with pytest.raises(train.ConfigError, match="holds the study 'toy'"):
        other.run(_config(), str(tmp_path))


def test_a_workdir_without_finished_work_accepts_any_config(tmp_path):
    files = {"study": "toy", "config": {"seed": 5}, "finished": []}
    (tmp_path / "study.json").write_text(json.dumps(files))
    record = sections.check_config("toy", _config(), str(tmp_path))
    assert record["finished"] == [] and record["config"]["seed"] == 0


# ------------------------------------------------------------------------------ structure


def _python_files(folder):
    return sorted(
        glob.glob(os.path.join(ROOT, "sharp_minima", folder, "**", "*.py"), recursive=True)
    )


def _imports(path):
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            for alias in node.names:
                yield f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_no_study_imports_another_and_nothing_below_imports_the_studies():
    studies_dir = os.path.join(ROOT, "sharp_minima", "studies")
    for path in _python_files("studies"):
        rel = os.path.relpath(path, studies_dir)
        me = rel.split(os.sep)[0].removesuffix(".py")
        for module in _imports(path):
            if module.startswith("sharp_minima.studies."):
                other = module.split(".")[2]
                assert other == me or other in ("common", "runs", "sections", "claims"), (
                    rel,
                    module,
                )
    for path in glob.glob(os.path.join(ROOT, "sharp_minima", "**", "*.py"), recursive=True):
        rel = os.path.relpath(path, os.path.join(ROOT, "sharp_minima"))
        if rel.startswith("studies") or rel == "notebook.py":
            continue
        assert not [m for m in _imports(path) if m.startswith("sharp_minima.studies")], rel


@pytest.mark.parametrize("name", STUDIES)
def test_every_study_offers_the_contract_on_the_driver(name):
    import inspect

    module = importlib.import_module(f"sharp_minima.studies.{name}")
    assert isinstance(module.STUDY, Study)
    for fn in ("run", "figures", "claims", "report_markdown"):
        assert callable(getattr(module, fn)), (name, fn)
    params = inspect.signature(module.run).parameters
    assert list(params)[:2] == ["config", "workdir"] and {"data", "log", "extend"} <= set(params)
    assert "figure_names" in inspect.signature(module.report_markdown).parameters


def test_studies_with_sections_are_packages_of_small_files_and_short_functions():
    checked = [os.path.join(ROOT, "sharp_minima", "studies", "sections.py"),
               os.path.join(ROOT, "sharp_minima", "train", "population.py")]  # fmt: skip
    for package in PACKAGES:
        files = _python_files(os.path.join("studies", package))
        module = importlib.import_module(f"sharp_minima.studies.{package}")
        names = {os.path.basename(f)[:-3] for f in files}
        sections = {s.name for s in module.STUDY.sections}
        # one file per section, besides __init__ and one shared module; a long section keeps
        # its simulations or figures in a companion named after it (sde_runs.py)
        companions = {n for n in names - sections if any(n.startswith(f"{s}_") for s in sections)}
        assert sections <= names and len(names - companions) == len(sections) + 2, (
            package,
            names,
        )
        for f in files:
            lines = len(open(f).read().splitlines())
            limit = 150 if f.endswith("__init__.py") else 450
            assert lines <= limit, (f, lines)
        checked += files
    for f in checked:
        for node in ast.walk(ast.parse(open(f).read())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                assert length <= 80, (os.path.relpath(f, ROOT), node.name, length)


def test_studies_keep_no_registries_beside_the_sections_and_no_kernels_or_loops():
    registry = re.compile(r"^_?(TITLES|_CLAIMS|_FIGURES|_SECTION_REPORT) *=", re.M)
    kernel = re.compile(r"jax\.(jit|vmap)\(|\blax\.|def _train\b")
    for path in _python_files("studies"):
        text = open(path).read()
        assert not registry.search(text), path
        assert not kernel.search(text), path
