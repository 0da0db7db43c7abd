r"""Executes the notebooks (``experiments/notebooks``) and stores their outputs, as committed
(`sharp_minima.studies.notebooks`).

    python -m experiments.execute_notebooks [keskar sgd_noise ...] [--notebook_setup=tiny]

The ``cpu`` setup's outputs are written back into the notebooks, and each study's report and
the guide's figures are copied into ``docs/results`` and ``docs/figures``. Runs go to
``--notebook_rundir``/runs/notebooks (a rerun resumes: delete it to time a fresh run). Prints
run times and file sizes.
"""

from __future__ import annotations

import time

from absl import flags

from experiments import cli
from sharp_minima.studies import notebooks
from sharp_minima.studies.notebooks import execute, names

flags.DEFINE_string("notebook_setup", "cpu", "The notebooks' setup: cpu, tiny or paper.")
flags.DEFINE_string("notebook_rundir", ".", "The kernel's working directory (runs go there).")


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
            size = f", stored: {notebooks.store_outputs(name, out) / 1e6:.2f} MB"
            notebooks.store_results(name, cli.FLAGS.notebook_rundir)
        cli.log(f"{name}: {time.perf_counter() - start:.0f} s{size}")


if __name__ == "__main__":
    cli.run(main)
