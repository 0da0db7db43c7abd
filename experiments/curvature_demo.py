r"""Curvature demo: the top Hessian eigenvalues of a small MLP tracked along training.

    python -m experiments.curvature_demo --workdir=runs/curvature_demo
    python -m experiments.curvature_demo --config=configs/curvature_demo.py:tiny --workdir=/tmp/c

The study is `sharp_minima.studies.curvature_demo`; without ``--config`` it runs
``configs/curvature_demo.py``. Re-running the same command resumes the training.
"""

from __future__ import annotations

from experiments import cli


def main(argv):
    from configs import curvature_demo as default
    from sharp_minima.studies import curvature_demo

    config = cli.setup(argv, default_config=default.get_config)
    with cli.user_errors_exit_2():
        curvature_demo.run(config, cli.FLAGS.workdir, log=cli.log, extend=cli.FLAGS.extend)


if __name__ == "__main__":
    cli.run(main)
