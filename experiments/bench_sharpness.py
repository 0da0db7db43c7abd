r"""Benchmark: the cost of one ε-sharpness evaluation in full-batch loss-and-gradient units.

    python -m experiments.bench_sharpness        # F1 (1.46M parameters, BN), 8192 examples

Times one jitted full-batch loss-and-gradient evaluation (all batches, `lax.scan`) and one
`epsilon_sharpness` call (full space, then a 100-d subspace; ε = 1e-3, 10 L-BFGS-B iterations)
on the same model, point and batches, side by side; prints the ratio (target <= 25) and the
number of evaluations the call used. Compilation is excluded (one warm-up call each).
"""

from __future__ import annotations

import time

import numpy as np
from absl import app, flags

from experiments.quiet import quiet

FLAGS = flags.FLAGS


def define_flags():
    """The benchmark's flags, defined only when it runs as a script (so every module of
    ``experiments/`` can be imported together)."""
    flags.DEFINE_integer("examples", 8192, "Examples in f.")
    flags.DEFINE_integer("batch_size", 1024, "Batch size of the scan over batches.")
    flags.DEFINE_integer("repeats", 3, "Timing repeats (median).")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp

    from sharp_minima import losses, objective, sharpness
    from sharp_minima.models import get_model

    model = get_model("f1", num_classes=10)
    rng = np.random.default_rng(0)
    nb = FLAGS.examples // FLAGS.batch_size
    x = rng.normal(size=(nb, FLAGS.batch_size, 784)).astype(np.float32)
    y = rng.integers(0, 10, (nb, FLAGS.batch_size)).astype(np.int32)
    batches = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    variables = model.init(jax.random.key(0), batches["x"][0], train=False)

    def loss(v, batch):
        return losses.cross_entropy(model.apply(v, batch["x"], train=False), batch["y"])

    w = jnp.full((nb,), 1.0 / nb)

    @jax.jit
    def loss_and_grad(v, batches, w):
        return jax.value_and_grad(
            lambda p: objective.batch_mean(lambda b: loss({**v, "params": p}, b), batches, w)
        )(v["params"])

    def time_it(fn):
        fn()  # compile / warm up
        ts = []
        for _ in range(FLAGS.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts))

    n = sum(a.size for a in jax.tree.leaves(variables["params"]))
    print(f"F1 with BatchNorm, {n} parameters, {nb * FLAGS.batch_size} examples")
    t_eval = time_it(lambda: loss_and_grad(variables, batches, w))
    for dim in (None, 100):
        calls = []

        def one(dim=dim, calls=calls):
            r = sharpness.epsilon_sharpness(
                loss,
                variables,
                batches,
                epsilon=1e-3,
                key=jax.random.key(1),
                subspace_dim=dim,
                wrt="^params/",
            )
            calls.append(r)
            return r.value

        t = time_it(one)
        space = "full space" if dim is None else f"{dim}-d subspace"
        print(
            f"{space}: one sharpness evaluation {t:.2f} s = {t / t_eval:.1f} x one full-batch "
            f"loss-and-gradient ({t_eval * 1e3:.0f} ms); {calls[-1].num_evals} evaluations "
            f"used; target <= 25"
        )


if __name__ == "__main__":
    define_flags()
    app.run(quiet(main))
