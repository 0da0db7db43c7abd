r"""Huang et al. (2020): bad minima on purpose, filter-normalised surfaces, basin volumes,
t-SNE of the SGD path, pinched rings and the optimizer table.

    python -m experiments.visualize_generalization --workdir=runs/huang
    python -m experiments.visualize_generalization \
        --config=configs/visualize_generalization.py:svhn --workdir=runs/huang_svhn

The study is `sharp_minima.studies.visualize_generalization`; without ``--config`` it runs the
CPU-sized ``configs/visualize_generalization.py``. Re-running the same command resumes.
"""

from __future__ import annotations

from experiments import cli


def main(argv):
    from configs import visualize_generalization as default
    from sharp_minima.studies import visualize_generalization

    config = cli.setup(argv, default_config=default.get_config)
    with cli.user_errors_exit_2():
        visualize_generalization.run(
            config, cli.FLAGS.workdir, log=cli.log, extend=cli.FLAGS.extend
        )


if __name__ == "__main__":
    cli.run(main)
