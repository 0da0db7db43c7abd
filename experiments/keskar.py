r"""Keskar et al. (2017): the large-batch generalization gap and ε-sharpness.

    python -m experiments.keskar --config=configs/quickstart.py --workdir=runs/quickstart
    python -m experiments.keskar --config=configs/f1.py:fashion --workdir=runs/keskar_f1
    python -m experiments.keskar --config=configs/c2.py --workdir=runs/keskar_c2

The study is `sharp_minima.studies.keskar` (importable from a notebook); this entry point
parses the flags, runs it and prints the report. Re-running the same command resumes.
"""

from __future__ import annotations

import os

from experiments import cli


def main(argv):
    config = cli.setup(argv)
    from sharp_minima.studies import keskar

    with cli.user_errors_exit_2():
        keskar.run(config, cli.FLAGS.workdir, log=cli.log, extend=cli.FLAGS.extend)
    import jax

    if jax.process_index() == 0:  # it alone wrote the report
        print(open(os.path.join(cli.FLAGS.workdir, "report.md")).read(), flush=True)


if __name__ == "__main__":
    cli.run(main)
