r"""The notebooks of ``experiments/notebooks`` executed, and their outputs stored as committed
(the maintainers' tool behind ``python -m experiments.execute_notebooks``; it reads and
writes the source checkout, not an installed package).

`execute` runs a notebook as the tests do: papermill injects the parameters after the
``parameters`` cell; the install cell (tagged ``skip-execution``) is left out. After a run of
the ``cpu`` setup, `store_outputs` writes the outputs back into the notebook, stripped of
execution metadata, and `store_results` copies each study's report and the guide's figures
into ``docs/results`` and ``docs/figures`` (the numbers the README and the guide quote are
tested against those reports).
"""

from __future__ import annotations

import copy
import os
import shutil

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FOLDER = os.path.join(ROOT, "experiments", "notebooks")
DOCS = os.path.join(ROOT, "docs")
STUDIES = {  # the studies each notebook runs (their workdirs under runs/notebooks/<setup>/)
    "keskar": ("keskar",),
    "sharpest_directions": ("sharpest_directions", "nudged_sgd"),
    "visualize_generalization": ("visualize_generalization",),
    "sgd_noise": ("sgd_noise",),
    "sam": ("sam",),
    "your_model": (),
}
GUIDE_FIGURES = {  # docs/figures/<name> ← a study's figure in the default run
    "jastrzebski_eigenvalues.png": ("sharpest_directions", "eigenvalues.png"),
    "nsgd_curves.png": ("nudged_sgd", "nsgd_curves.png"),
    "huang_decision_boundaries.png": ("visualize_generalization", "decision_boundaries.png"),
    "huang_surfaces.png": ("visualize_generalization", "surfaces.png"),
    "sgd_noise_critical_batch.png": ("sgd_noise", "critical_batch.png"),
    "sgd_noise_noise_scale.png": ("sgd_noise", "noise_scale.png"),
    "sam_label_noise.png": ("sam", "label_noise.png"),
    "sam_eos.png": ("sam", "eos.png"),
}
SKIP = "skip-execution"


def names() -> list[str]:  # the notebooks, without .ipynb
    return sorted(f[:-6] for f in os.listdir(FOLDER) if f.endswith(".ipynb"))


def execute(name: str, parameters: dict, cwd: str):
    """The notebook executed with ``parameters`` injected, in ``cwd`` (a failing cell raises
    papermill's ``PapermillExecutionError``, naming the cell)."""
    import nbformat
    import papermill

    nb = nbformat.read(os.path.join(FOLDER, f"{name}.ipynb"), as_version=4)
    nb.cells = [c for c in nb.cells if SKIP not in c.metadata.get("tags", [])]
    return papermill.execute_notebook(
        nb, None, parameters=parameters, kernel_name="python3", cwd=cwd, progress_bar=False
    )


def store_outputs(name: str, executed) -> int:
    """``executed``'s outputs written into the committed notebook (counts from 1, no
    execution metadata, no injected cell); returns the file's size in bytes."""
    import nbformat

    path = os.path.join(FOLDER, f"{name}.ipynb")
    nb = nbformat.read(path, as_version=4)
    ran = iter(c for c in executed.cells if "injected-parameters" not in c.metadata.get("tags", []))
    count = 0
    for cell in (c for c in nb.cells if SKIP not in c.metadata.get("tags", [])):
        out = next(ran)
        if cell.cell_type == "code":
            count += 1
            cell.execution_count, cell.outputs = count, copy.deepcopy(out.outputs)
            for o in (o for o in cell.outputs if "execution_count" in o):
                o["execution_count"] = count
            cell.metadata = {k: v for k, v in cell.metadata.items() if k == "tags"}
    keep = {k: nb.metadata[k] for k in ("kernelspec", "colab") if k in nb.metadata}
    nb.metadata = {**keep, "language_info": {"name": "python"}}
    nbformat.write(nb, path)
    return os.path.getsize(path)


def store_results(name: str, rundir: str) -> None:
    """The reports of ``name``'s studies (default setup, run in ``rundir``) copied to
    ``docs/results/<study>.md``, and the guide's figures among them to ``docs/figures``."""
    os.makedirs(os.path.join(DOCS, "results"), exist_ok=True)
    for study in STUDIES[name]:
        workdir = os.path.join(rundir, "runs", "notebooks", "cpu", study)
        shutil.copyfile(
            os.path.join(workdir, "report.md"), os.path.join(DOCS, "results", f"{study}.md")
        )
        for dst, (owner, src) in GUIDE_FIGURES.items():
            if owner == study:
                shutil.copyfile(os.path.join(workdir, src), os.path.join(DOCS, "figures", dst))
