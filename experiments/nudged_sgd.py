r"""Jastrzębski et al. (2019), Sec. 4: Nudged-SGD against SGD — NSGD for several K and γ,
SGD baselines, the Table 1 columns beside the paper's Tables 1, 2, 5 and 6.

    python -m experiments.nudged_sgd --workdir=runs/nsgd
    python -m experiments.nudged_sgd --config=configs/nudged_sgd.py:paper \
        --workdir=runs/nsgd_resnet32

The study is `sharp_minima.studies.nudged_sgd`; without ``--config`` it runs the CPU-sized
``configs/nudged_sgd.py``. Re-running the same command resumes.
"""

from __future__ import annotations

from experiments import cli


def main(argv):
    from configs import nudged_sgd as default
    from sharp_minima.studies import nudged_sgd

    config = cli.setup(argv, default_config=default.get_config)
    with cli.user_errors_exit_2():
        nudged_sgd.run(config, cli.FLAGS.workdir, log=cli.log, extend=cli.FLAGS.extend)


if __name__ == "__main__":
    cli.run(main)
