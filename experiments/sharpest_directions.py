r"""Jastrzębski et al. (2019), Sec. 3: the top Hessian eigenvalues along SGD training, the SGD
step against the sharpest directions, full-batch GD at the edge of stability, the SGD
variants of Fig. 7 and the learning-rate schedule of Fig. 12.

    python -m experiments.sharpest_directions --workdir=runs/sharpest
    python -m experiments.sharpest_directions --config=configs/sharpest_directions.py:paper \
        --workdir=runs/sharpest_simplecnn

The study is `sharp_minima.studies.sharpest_directions`; without ``--config`` it runs the
CPU-sized ``configs/sharpest_directions.py``. Re-running the same command resumes.
"""

from __future__ import annotations

from experiments import cli


def main(argv):
    from configs import sharpest_directions as default
    from sharp_minima.studies import sharpest_directions

    config = cli.setup(argv, default_config=default.get_config)
    with cli.user_errors_exit_2():
        sharpest_directions.run(config, cli.FLAGS.workdir, log=cli.log, extend=cli.FLAGS.extend)


if __name__ == "__main__":
    cli.run(main)
