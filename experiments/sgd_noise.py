r"""The lecture notes "Towards Understanding SGD": parameterisation and flatness, toy
sharpness, linear scaling with warm-up, the noise scale and the optimal batch size, the three
factors, the SDE picture and the critical batch size.

    python -m experiments.sgd_noise --workdir=runs/sgd_noise
    python -m experiments.sgd_noise --config=configs/sgd_noise.py:fashion \
        --workdir=runs/sgd_noise_fashion

The study is `sharp_minima.studies.sgd_noise`; without ``--config`` it runs the CPU-sized
``configs/sgd_noise.py``. Re-running the same command resumes (sweep by sweep); choose
sections by name with ``--config.sections=toy,sde``.
"""

from __future__ import annotations

from experiments import cli


def main(argv):
    from configs import sgd_noise as default
    from sharp_minima.studies import sgd_noise

    config = cli.setup(argv, default_config=default.get_config)
    with cli.user_errors_exit_2():
        sgd_noise.run(config, cli.FLAGS.workdir, log=cli.log, extend=cli.FLAGS.extend)


if __name__ == "__main__":
    cli.run(main)
