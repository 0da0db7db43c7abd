r"""Benchmark: a SAM step of `sharp_minima.train` against a plain step of the same trainer.

    python -m experiments.bench_sam --models=f1,c1 --groups=8   # random data

All steps train the same model (same init, same batch, SGD) with the state donated: plain
SGD, SAM (``config.sam.rho``: one more gradient, at the perturbed point), and SAM with
m-sharpness over ``--groups`` groups (``config.sam.group_size = batch / groups``: by layers,
`sharp_minima.per_example.group_ascent`, each group's perturbation of a dense layer in low
rank), logging every 50 steps as the configs do; and the m-sharpness step on a log step (where
it also forms the clean gradient for SAM's diagnostics). They are timed in alternating rounds of
``--steps`` steps (machine noise hits all alike); the median round is used. Prints each SAM
step's time over the plain step's (targets: SAM <= 2.1, m-sharpness <= 2.3).
"""

from __future__ import annotations

import time

import numpy as np
from absl import app, flags

from experiments.quiet import quiet

FLAGS = flags.FLAGS
TARGETS = {"sam": 2.1, "m-sharpness": 2.3}
# m-sharpness on a log step, every step: the step forms the clean gradient g there for SAM's
# ‖g‖ and cos(g, g_SAM) diagnostics (`sharp_minima.train.log_step_metrics`); no target.
LOG_STEP = "m-sharpness on a log step"


def define_flags():
    """The benchmark's flags, defined only when it runs as a script."""
    flags.DEFINE_integer("batch_size", 256, "Batch size.")
    flags.DEFINE_integer("groups", 8, "m-sharpness groups (batch_size / m).")
    flags.DEFINE_integer("steps", 20, "Steps per timing round.")
    flags.DEFINE_integer("rounds", 7, "Alternating timing rounds (median reported).")
    flags.DEFINE_list("models", ["f1"], "Models: f1 (784 BN MLP), c1 (32x32x3 conv, slow).")


INPUTS = {"f1": (28, 28, 1), "c1": (32, 32, 3)}


def steps_of(name: str, batch_size: int, groups: int):
    """``{variant: (step, state)}`` for plain SGD, SAM and SAM over ``groups`` groups, and
    the batch they all take."""
    import jax
    import jax.numpy as jnp

    from configs import f1
    from sharp_minima import train

    config = f1.get_config()
    config.unlock()
    config.model.kwargs = {} if name != "f1" else config.model.kwargs
    config.optim.name, config.optim.learning_rate = "sgd", 0.01
    config.batch_size = batch_size
    model = train.get_model(name, num_classes=10, **dict(config.model.kwargs))
    mesh = train.make_mesh(1)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch_size, *INPUTS[name])), jnp.float32)
    batch = {"x": x, "y": jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)}
    loss = train.classification_loss(model)
    out = {}
    for variant, rho, m, log_every in (
        ("plain", 0.0, 0, 50),
        ("sam", 0.05, 0, 50),
        ("m-sharpness", 0.05, batch_size // groups, 50),
        (LOG_STEP, 0.05, batch_size // groups, 1),
    ):
        config.sam.rho, config.sam.group_size = rho, m
        tx, lr_fn = train.make_optimizer(config, steps_per_epoch=100)
        state = train.init_state(model, tx, x[:1], jax.random.key(0))
        step = train.make_train_step(
            loss, tx, mesh, lr_fn=lr_fn, log_every=log_every, groups=train.sam_groups(config)
        )
        out[variant] = (step, state)
    return out, batch


def bench(name: str, batch_size: int, groups: int, steps: int, rounds: int) -> dict:
    """Median seconds per step of each variant."""
    import jax

    variants, batch = steps_of(name, batch_size, groups)
    states = {k: s for k, (_, s) in variants.items()}

    def run(variant):
        step, state = variants[variant][0], states[variant]
        for _ in range(steps):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        states[variant] = state

    for v in variants:  # compile and warm up
        run(v)
    times = {v: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            t0 = time.perf_counter()
            run(v)
            times[v].append(time.perf_counter() - t0)
    return {v: float(np.median(t)) / steps for v, t in times.items()}


def main(argv):
    del argv
    if FLAGS.groups < 1 or FLAGS.batch_size % FLAGS.groups:
        raise app.UsageError(
            f"--groups ({FLAGS.groups}) must divide --batch_size ({FLAGS.batch_size})", exitcode=2
        )
    print(
        f"batch {FLAGS.batch_size}, m-sharpness over {FLAGS.groups} groups, "
        f"{FLAGS.steps} steps x {FLAGS.rounds} alternating rounds"
    )
    for name in FLAGS.models:
        if name not in INPUTS:
            raise app.UsageError(f"--models: {name!r} not in {sorted(INPUTS)}", exitcode=2)
        t = bench(name, FLAGS.batch_size, FLAGS.groups, FLAGS.steps, FLAGS.rounds)
        print(
            f"{name}: plain {1e3 * t['plain']:.2f} ms/step; "
            + "; ".join(
                f"{v} {1e3 * t[v]:.2f} ms/step, ratio {t[v] / t['plain']:.2f} "
                f"(target <= {TARGETS[v]})"
                for v in TARGETS
            )
            + f"; {LOG_STEP} {1e3 * t[LOG_STEP]:.2f} ms/step, ratio "
            f"{t[LOG_STEP] / t['plain']:.2f}"
        )


if __name__ == "__main__":
    define_flags()
    app.run(quiet(main))
