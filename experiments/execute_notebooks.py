r"""Executes the notebooks (``experiments/notebooks``) and stores their outputs, as committed.

    python -m experiments.execute_notebooks [keskar sgd_noise ...] [--notebook_setup=tiny]

As the tests do (`execute`): papermill injects the parameters after the ``parameters`` cell;
the install cell (tagged ``skip-execution``) is left out. The ``cpu`` setup's outputs are
written back, stripped of execution metadata. Runs go to ``--notebook_rundir``/runs/notebooks
(a rerun resumes: delete it to time a fresh run). Prints run times and file sizes.
"""

from __future__ import annotations

import copy
import os
import time

from absl import flags

from experiments import cli

FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "notebooks")
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


def main(argv):
    setup, wanted = cli.FLAGS.notebook_setup, argv[1:] or names()
    with cli.user_errors_exit_2():
        if set(wanted) - set(names()):
            raise ValueError(f"unknown notebook in {wanted}; the notebooks: {', '.join(names())}")
    for name in wanted:
        start = time.perf_counter()
        out = execute(name, {} if setup == "cpu" else {"setup": setup}, cli.FLAGS.notebook_rundir)
        size = f", stored: {store_outputs(name, out) / 1e6:.2f} MB" if setup == "cpu" else ""
        cli.log(f"{name}: {time.perf_counter() - start:.0f} s{size}")


if __name__ == "__main__":
    cli.run(main)
