r"""Benchmark: `sharp_minima.train`'s training step vs a minimal hand-written Flax+optax step.

    python -m experiments.bench_train --models=f1,c1   # F1 (BN MLP), C1 (conv); random data

Both steps train the same model (same init, same batch, Adam) with the state donated. Ours
also computes accuracy, gradient norm and learning rate, keeps the dropout key in the state and
takes the optimizer's ``value=`` argument. The two are timed in alternating rounds of
``--steps`` steps each (so machine noise hits both alike); the median round time is used.
Prints ``ours / hand-written`` per model (target <= 1.05), and the ratio of a whole loop
iteration (on-device batch gather + step) to the step alone.
"""

from __future__ import annotations

import functools
import time

import numpy as np
from absl import app, flags

from experiments.quiet import quiet

FLAGS = flags.FLAGS


def define_flags():
    """The benchmark's flags, defined only when it runs as a script (so every module of
    ``experiments/`` can be imported together)."""
    flags.DEFINE_integer("batch_size", 256, "Batch size.")
    flags.DEFINE_integer("steps", 30, "Steps per timing round.")
    flags.DEFINE_integer("rounds", 7, "Alternating timing rounds (median reported).")
    flags.DEFINE_list(
        "models", ["f1"], "Models to time: f1 (784 MLP), c1 (32x32x3 conv, ~1 s/step on a CPU)."
    )


INPUTS = {"f1": (28, 28, 1), "c1": (32, 32, 3)}


def hand_written_step(model, tx):
    import jax
    import optax

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, batch_stats, opt_state, x, y, key):
        def loss_fn(p):
            logits, upd = model.apply(
                {"params": p, "batch_stats": batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": key},
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

        (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), upd["batch_stats"], opt_state, loss

    return step


def bench(name, batch_size, steps, rounds):
    import jax
    import jax.numpy as jnp
    import optax

    from configs import f1
    from sharp_minima import train

    config = f1.get_config()
    config.unlock()
    config.model.name = name
    config.model.kwargs = {} if name != "f1" else config.model.kwargs
    config.batch_size = batch_size
    mesh = train.make_mesh(1)
    model = train.get_model(name, num_classes=10, **dict(config.model.kwargs))
    rng = np.random.default_rng(0)
    n = batch_size * 4
    x = rng.normal(size=(n, *INPUTS[name])).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    tx, lr_fn = train.make_optimizer(config, steps_per_epoch=100)
    state = train.init_state(model, tx, jnp.asarray(x[:1]), jax.random.key(0))
    loss = train.classification_loss(model)
    ours = train.make_train_step(loss, tx, mesh, lr_fn=lr_fn, log_every=50)
    get_batch = train.make_get_batch(mesh, augment=False)
    xs, ys = train.replicate(x, mesh), train.replicate(y, mesh)
    perm = jnp.arange(n).reshape(4, batch_size)
    batch = get_batch(xs, ys, perm, 0, jax.random.key(1), 0)

    hw_tx = optax.adam(1e-3)
    hw = hand_written_step(model, hw_tx)
    hw_state = [jax.tree.map(jnp.copy, state.params), jax.tree.map(jnp.copy, state.batch_stats)]
    hw_state.append(hw_tx.init(hw_state[0]))
    key = jax.random.key(2)

    def run_ours(state):
        for _ in range(steps):
            state, m = ours(state, batch)
        jax.block_until_ready(m)
        return state

    def run_loop(state):
        for i in range(steps):
            b = get_batch(xs, ys, perm, i % 4, key, i)
            state, m = ours(state, b)
        jax.block_until_ready(m)
        return state

    def run_hw(s):
        p, bs, o = s
        for _ in range(steps):
            p, bs, o, loss = hw(p, bs, o, batch["x"], batch["y"], key)
        jax.block_until_ready(loss)
        return [p, bs, o]

    state, hw_state = run_ours(state), run_hw(hw_state)  # compile and warm up
    state = run_loop(state)
    t_ours, t_hw, t_loop = [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        state = run_ours(state)
        t_ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        hw_state = run_hw(hw_state)
        t_hw.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        state = run_loop(state)
        t_loop.append(time.perf_counter() - t0)
    med = lambda t: float(np.median(t)) / steps  # noqa: E731
    return med(t_ours), med(t_hw), med(t_loop)


def main(argv):
    del argv
    print(f"batch {FLAGS.batch_size}, {FLAGS.steps} steps x {FLAGS.rounds} alternating rounds")
    for name in FLAGS.models:
        if name not in INPUTS:
            raise app.UsageError(f"--models: {name!r} not in {sorted(INPUTS)}", exitcode=2)
        ours, hw, loop = bench(name, FLAGS.batch_size, FLAGS.steps, FLAGS.rounds)
        print(
            f"{name}: ours {1e3 * ours:.2f} ms/step, hand-written {1e3 * hw:.2f} ms/step, "
            f"ratio {ours / hw:.3f} (target <= 1.05); loop iteration incl. batch gather / "
            f"step {loop / ours:.3f}"
        )


if __name__ == "__main__":
    define_flags()
    app.run(quiet(main))
