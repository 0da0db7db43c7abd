r"""Executes the notebooks (``experiments/notebooks``) and stores their outputs, as committed.

    python -m experiments.execute_notebooks [keskar sgd_noise ...] [--notebook_setup=tiny]

As the tests do (`execute`): papermill injects the parameters after the ``parameters`` cell;
the install cell (tagged ``skip-execution``) is left out. The ``cpu`` setup's outputs are
written back, stripped of execution metadata, and each study's report and the guide's
figures are copied into ``docs/results`` and ``docs/figures`` (the numbers the README and the
guide quote are tested against those reports). Runs go to
``--notebook_rundir``/runs/notebooks (a rerun resumes: delete it to time a fresh run). Prints
run times and file sizes.
"""

from __future__ import annotations

import copy
import os
import shutil
import time

from absl import flags

from experiments import cli

FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "notebooks")
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
STUDIES = {  # the studies each notebook runs (their workdirs under runs/notebooks/<setup>/)
    "keskar": ("keskar",),
    "sharpest_directions": ("sharpest_directions", "nudged_sgd"),
    "visualize_generalization": ("visualize_generalization",),
    "sgd_noise": ("sgd_noise",),
    "your_model": (),
}
GUIDE_FIGURES = {  # docs/figures/<name> ← a study's figure in the default run
    "jastrzebski_eigenvalues.png": ("sharpest_directions", "eigenvalues.png"),
    "nsgd_curves.png": ("nudged_sgd", "nsgd_curves.png"),
    "huang_decision_boundaries.png": ("visualize_generalization", "decision_boundaries.png"),
    "huang_surfaces.png": ("visualize_generalization", "surfaces.png"),
    "sgd_noise_critical_batch.png": ("sgd_noise", "critical_batch.png"),
    "sgd_noise_noise_scale.png": ("sgd_noise", "noise_scale.png"),
}
SKIP = "skip-execution"
flags.DEFINE_string("notebook_setup", "cpu", "The notebooks' setup: cpu, tiny or paper.")
flags.DEFINE_string("notebook_rundir", ".", "The kernel's working directory (runs go there).")


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


def main(argv):
    setup, wanted = cli.FLAGS.notebook_setup, argv[1:] or names()
    with cli.user_errors_exit_2():
        if set(wanted) - set(names()):
            raise ValueError(f"unknown notebook in {wanted}; the notebooks: {', '.join(names())}")
    for name in wanted:
        start = time.perf_counter()
        out = execute(name, {} if setup == "cpu" else {"setup": setup}, cli.FLAGS.notebook_rundir)
        size = ""
        if setup == "cpu":
            size = f", stored: {store_outputs(name, out) / 1e6:.2f} MB"
            store_results(name, cli.FLAGS.notebook_rundir)
        cli.log(f"{name}: {time.perf_counter() - start:.0f} s{size}")


if __name__ == "__main__":
    cli.run(main)
