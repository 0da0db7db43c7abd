r"""Sharpness-aware minimisation: SAM, ASAM and m-sharpness against SGD — label noise, the
m-sweep, curvature, SAM's edge of stability and late-phase SAM.

    python -m experiments.sam --workdir=runs/sam
    python -m experiments.sam --config=configs/sam.py --config.sections=eos --workdir=runs/sam_eos
    python -m experiments.sam --config=configs/sam.py:cifar10 --workdir=runs/sam_cifar10

The study is `sharp_minima.studies.sam`; without ``--config`` it runs the CPU-sized
``configs/sam.py``. Re-running the same command resumes.
"""

from __future__ import annotations

from experiments import cli


def main(argv):
    from configs import sam as default
    from sharp_minima.studies import sam

    config = cli.setup(argv, default_config=default.get_config)
    with cli.user_errors_exit_2():
        sam.run(config, cli.FLAGS.workdir, log=cli.log, extend=cli.FLAGS.extend)


if __name__ == "__main__":
    cli.run(main)
