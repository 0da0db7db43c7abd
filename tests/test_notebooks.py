"""The notebooks in ``experiments/notebooks``: each one executes with its ``tiny`` parameters
(papermill injects them after the cell tagged ``parameters``; the install cell, tagged
``skip-execution``, is left out), and each is committed ready to read and to open in Colab.

A study notebook reads the study's tiny run of this session (``tiny_study``, copied into its
workdir): the study is trained once per test run, and the notebook's own cells — the config it
builds, ``run`` resuming from the saved work, the claims table and the figures — all execute.
"""

import os
import re

import nbformat
import pytest
from helpers import ROOT

from sharp_minima.studies.notebooks import FOLDER, STUDIES, names

# notebook -> the studies it runs (each writes into workdir/<setup>/<study>)
NOTEBOOKS = STUDIES
MAX_BYTES = 2_000_000
MACHINE_PATHS = re.compile(r"(/tmp/|/work/|/home/|/root/|/Users/|C:\\\\)")


def repository() -> str:
    """``[project.urls] Repository`` of pyproject.toml."""
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        return re.search(r'^Repository = "(.+)"$', f.read(), re.M).group(1)


def colab_link(name: str) -> str:
    path = repository().removeprefix("https://github.com/")
    return f"https://colab.research.google.com/github/{path}/blob/main/experiments/notebooks/{name}.ipynb"


def load(name: str):
    return nbformat.read(os.path.join(FOLDER, f"{name}.ipynb"), as_version=4)


def tagged(nb, tag: str) -> list:
    return [c for c in nb.cells if tag in c.metadata.get("tags", [])]


def test_every_notebook_is_listed_here_and_linked_from_the_readme_with_its_badge():
    assert names() == sorted(NOTEBOOKS)
    for page in ("README.md", os.path.join("docs", "guide", "02-notebooks.md")):
        with open(os.path.join(ROOT, page)) as f:
            text = f.read()
        for name in NOTEBOOKS:
            assert colab_link(name) in text, (page, name)
            assert f"experiments/notebooks/{name}.ipynb" in text, (page, name)
        # every badge on the page points at the repository of pyproject.toml
        for link in re.findall(r"https://colab\.research\.google\.com/github/[^)\s]+", text):
            assert link.startswith(colab_link("x").rsplit("/", 1)[0] + "/"), link


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_is_committed_ready_to_read_and_to_open_in_colab(name):
    path = os.path.join(FOLDER, f"{name}.ipynb")
    assert os.path.getsize(path) < MAX_BYTES
    nb = load(name)
    nbformat.validate(nb)
    intro = nb.cells[0]
    assert intro.cell_type == "markdown" and intro.source.startswith("# ")
    assert colab_link(name) in intro.source and "colab-badge.svg" in intro.source
    (install,) = tagged(nb, "skip-execution")
    assert f'REPOSITORY = "{repository()}"' in install.source and "%pip install" in install.source
    assert "import sharp_minima" in install.source and not install.outputs
    (parameters,) = tagged(nb, "parameters")
    assert re.search(r'^setup = "cpu"$', parameters.source, re.M), parameters.source
    assert '"tiny"' in parameters.source
    code = [c for c in nb.cells if c.cell_type == "code" and c is not install]
    assert "jax.devices()" in "".join(c.source for c in code)
    # The outputs of one CPU run: figures drawn as images, no error, counts in order.
    outputs = [o for c in code for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure drawn"
    assert not [o for o in outputs if o.output_type == "error"]
    counts = [c.execution_count for c in code if c is not parameters]
    assert counts == sorted(counts) and None not in counts
    # Stripped of execution metadata; no path of one machine anywhere.
    assert set(nb.metadata) <= {"kernelspec", "language_info", "colab"}
    for c in nb.cells:
        assert not set(c.metadata) - {"tags"}, (c.metadata, c.source[:60])
    text = nbformat.writes(nb)
    assert not MACHINE_PATHS.search(text), MACHINE_PATHS.search(text)


def execute(name: str, parameters: dict, cwd) -> object:
    """Runs the notebook as CI does (`sharp_minima.studies.notebooks.execute`: papermill
    injects ``parameters``; the install cell is left out), its kernel on one simulated CPU
    device (the suite's four are for the data-parallel tests)."""
    from sharp_minima.studies.notebooks import execute as run

    flags = os.environ.get("XLA_FLAGS", "")
    old = flags
    os.environ["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
    try:  # the kernel inherits the environment when it starts
        return run(name, parameters, str(cwd))
    finally:
        os.environ["XLA_FLAGS"] = old


def images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


@pytest.mark.parametrize("name", sorted(n for n, studies in NOTEBOOKS.items() if studies))
def test_study_notebook_executes_with_the_tiny_parameters(name, tmp_path, tiny_study):
    for study in NOTEBOOKS[name]:
        tiny_study(study).copy(tmp_path / "runs" / "tiny" / study)
    out = execute(name, {"setup": "tiny", "workdir": "runs"}, cwd=tmp_path)
    for study in NOTEBOOKS[name]:
        assert (tmp_path / "runs" / "tiny" / study / "report.md").exists()
    assert images(out) >= len(NOTEBOOKS[name])
    for cell in (c for c in out.cells if c.cell_type == "code" and ".run(" in c.source):
        shown = [o for o in cell.outputs if o.output_type in ("display_data", "stream")]
        assert len(shown) == 1, shown  # the run's progress: one line, updated in place
        assert shown[0]["data"]["text/plain"].startswith("["), shown
    markdown = [
        o for c in out.cells for o in c.get("outputs", []) if "text/markdown" in o.get("data", {})
    ]
    assert any("## Claims" in o["data"]["text/markdown"] for o in markdown)


def test_your_model_notebook_executes_with_the_tiny_parameters(tmp_path):
    out = execute("your_model", {"setup": "tiny"}, cwd=tmp_path)
    text = "".join(o.get("text", "") for c in out.cells for o in c.get("outputs", []))
    assert "plain JAX, Linen and NNX agree" in text
    assert images(out) == 2  # the spectral density and the loss surface


def test_notebook_helpers_print_outside_ipython(capsys):
    """`sharp_minima.notebook` in a script: every progress line printed (and kept), figures
    named, the claims as the report's table; inside a kernel the executions above check it."""
    import numpy as np
    from helpers import figure_overlaps

    from sharp_minima import notebook, plotting

    progress = notebook.ProgressLine()
    progress("step 1")
    progress("run diverged: step 3")
    assert progress.lines == ["step 1", "run diverged: step 3"]
    assert capsys.readouterr().out == "step 1\nrun diverged: step 3\n"
    grid = np.linspace(-1, 1, 9)
    loss = 0.5 * (grid[:, None] ** 2 + 4 * grid[None, :] ** 2) + 0.01
    fig = plotting.surface_figure(grid, grid, loss, contours=(0.1, 99.0))
    assert not figure_overlaps(fig)
    assert len(fig.axes[0].collections) >= 2  # filled contours and the cutoff's line
    assert notebook.png(fig).startswith(b"\x89PNG")
    notebook.show({"surface": fig})
    assert "figure 'surface'" in capsys.readouterr().out
    notebook.show_claims([("a | b", True, "1 vs 2")])
    assert "| a \\| b |  | yes | 1 vs 2 |" in capsys.readouterr().out
