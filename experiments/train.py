r"""Train any config; re-running the same command resumes.

    python -m experiments.train --config=configs/f1.py:fashion --workdir=runs/f1
    python -m experiments.train --config=configs/c2.py --config.optim.learning_rate=3e-4 ...

Writes ``config.json``, ``metrics.jsonl`` (prefixed keys), ``checkpoints/`` (last few) and
``checkpoint_best/`` into ``--workdir``, and ``final.json`` with the last evaluation.
Bad flags, config keys or missing data exit with status 2 and one line.
"""

from __future__ import annotations

import os

import jax

from experiments import cli


def main(argv):
    config = cli.setup(argv)
    from sharp_minima import files, train

    with cli.user_errors_exit_2():
        result = train.train(config, cli.FLAGS.workdir)
    if jax.process_index() == 0:
        files.write_json(os.path.join(cli.FLAGS.workdir, "final.json"), result.final)
        print(
            "final: "
            + "  ".join(f"{k} {v:.4f}" for k, v in result.final.items() if isinstance(v, float))
        )


if __name__ == "__main__":
    cli.run(main)
