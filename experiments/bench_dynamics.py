r"""Benchmark of sharp_minima.dynamics: ratios measured side by side in one run.

    python -m experiments.bench_dynamics

Prints:
  * a population of 24 MLPs trained in one vmapped step (`PopulationTrainer.step`) vs the
    same 24 steps as 24 jitted calls, for a compute-bound 40-256-256-10 MLP, the sgd_noise
    study's 40-64-64-10 and a dispatch-bound 40-64-10 MLP at batch 32 (targets: >= 0.95,
    >= 0.95 and >= 3), and the steps of an
    epoch fused in one `lax.scan` (`PopulationTrainer.epoch`) vs one vmapped call per step;
  * 10^4 Langevin runs x 10^4 steps on the double well in one `Simulator.run` call vs the same
    simulation in NumPy, vectorised over runs (target >= 5);
  * a population's member axis sharded over d devices (``--devices``, simulated CPU devices:
    they share the cores, so the ratio is an overhead, target >= 0.8 of one device's members
    per second) and the parameters and optimizer states one device holds (target <= 1.2/d of
    the whole population's).
Absolute times on a shared CPU are noisy; the ratios are what to read.
"""

from __future__ import annotations

import sys
import time

import numpy as np
from absl import app, flags

from experiments.bench_hessian import mlp_loss
from experiments.quiet import quiet

FLAGS = flags.FLAGS


def define_flags():
    """The benchmark's flags, defined only when it runs as a script."""
    flags.DEFINE_integer("members", 24, "Population size.")
    flags.DEFINE_integer("steps", 50, "Training steps per timing.")
    flags.DEFINE_integer("runs", 10_000, "SDE runs.")
    flags.DEFINE_integer("sde_steps", 10_000, "SDE steps.")
    flags.DEFINE_integer("devices", 4, "Simulated CPU devices for the sharded population.")


def _timed(fn):
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def bench_population(widths, members, steps):
    import jax
    import jax.numpy as jnp
    import optax

    from sharp_minima import dynamics

    rng = np.random.default_rng(0)

    def init(key):
        keys = jax.random.split(key, len(widths) - 1)
        return [
            {"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
            for k, a, b in zip(keys, widths[:-1], widths[1:])
        ]

    loss = mlp_loss  # the ReLU MLP of bench_hessian: a list of {"w", "b"} layers

    n, batch_size = 4096, 32
    data = {
        "x": jnp.asarray(rng.normal(size=(n, widths[0])).astype(np.float32)),
        "y": jnp.asarray(rng.integers(0, widths[-1], size=n)),
    }
    params = jax.vmap(init)(jax.random.split(jax.random.key(0), members))
    lrs = jnp.asarray(np.geomspace(1e-3, 1e-1, members).astype(np.float32))
    trainer = dynamics.PopulationTrainer(loss, optax.sgd)
    state = trainer.init(params, learning_rates=lrs)
    order = jnp.asarray(rng.integers(0, n, size=(members, steps, batch_size)))

    # One member at a time: a jitted step per member and step (the loop a sweep replaces),
    # the batch gathered inside the call, as in the vmapped and fused versions.
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.0)

    @jax.jit
    def single(p, s, data, idx):
        batch = jax.tree.map(lambda a: a[idx], data)
        value, g = jax.value_and_grad(loss)(p, batch)
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s, value

    @jax.jit
    def vmapped_step(p, s, data, idx):  # idx: (members, B)
        batch = jax.vmap(lambda i: jax.tree.map(lambda a: a[i], data))(idx)
        return trainer.step(p, s, batch)

    singles = [jax.tree.map(lambda a, m=m: a[m], (params, state)) for m in range(members)]

    def sequential():
        out = None
        for m in range(members):
            p, s = singles[m]
            for t in range(steps):
                p, s, out = single(p, s, data, order[m, t])
        return out

    def vmapped():
        p, s, out = params, state, None
        for t in range(steps):
            p, s, out = vmapped_step(p, s, data, order[:, t])
        return out

    def fused():
        return trainer.epoch(params, state, data, order)[2]

    for fn in (sequential, vmapped, fused):
        fn()  # compile
    t_seq = min(_timed(sequential) for _ in range(2))
    t_vmap = min(_timed(vmapped) for _ in range(3))
    t_fused = min(_timed(fused) for _ in range(3))
    name = "-".join(map(str, widths))
    print(
        f"MLP {name}, {members} members x {steps} steps at batch {batch_size}: sequential "
        f"{t_seq:.3f} s, one vmapped call per step {t_vmap:.3f} s, fused epoch {t_fused:.3f} s"
    )
    return t_seq / t_vmap, t_seq / t_fused


def bench_sharded_population(widths, members, steps):
    """Members per second of one fused epoch on all devices vs on the first one, and the
    bytes of parameters and optimizer states on device 0 / the whole population's."""
    import jax
    import jax.numpy as jnp
    import optax

    from sharp_minima import dynamics

    rng = np.random.default_rng(0)
    n, batch_size = 4096, 32
    data = {
        "x": jnp.asarray(rng.normal(size=(n, widths[0])).astype(np.float32)),
        "y": jnp.asarray(rng.integers(0, widths[-1], size=n)),
    }
    shapes = list(zip(widths[:-1], widths[1:]))
    params = [
        {"w": jnp.asarray(rng.normal(size=(members, a, b)).astype(np.float32) / np.sqrt(a)),
         "b": jnp.zeros((members, b))}
        for a, b in shapes
    ]  # fmt: skip
    lrs = jnp.asarray(np.geomspace(1e-3, 1e-1, members).astype(np.float32))
    order = jnp.asarray(rng.integers(0, n, size=(members, steps, batch_size)))
    rates, share = {}, None
    for name, devices in (("one", jax.devices()[:1]), ("all", jax.devices())):
        trainer = dynamics.PopulationTrainer(mlp_loss, optax.adam, devices=devices)
        state = trainer.init(params, learning_rates=lrs)
        run = lambda t=trainer, s=state: t.epoch(params, s, data, order)[2]  # noqa: E731
        run()  # compile
        rates[name] = members * steps / min(_timed(run) for _ in range(3))
        if name == "all":
            placed = jax.tree.leaves(trainer._place((params, state), members))
            on0 = sum(
                s.data.nbytes for a in placed for s in a.addressable_shards
                if s.device == devices[0]
            )  # fmt: skip
            whole = sum(a.nbytes for a in jax.tree.leaves((params, state)))
            share = on0 / whole
    d = jax.device_count()
    print(
        f"MLP {'-'.join(map(str, widths))}, {members} members x {steps} steps (Adam): "
        f"{rates['one']:.0f} member-steps/s on 1 device, {rates['all']:.0f} on {d} simulated "
        f"devices; device 0 holds {share:.3f} of the population's parameters and Adam states "
        f"(1/d = {1 / d:.3f})"
    )
    return rates["all"] / rates["one"], share * d


def bench_sde(runs, steps):
    import jax
    import jax.numpy as jnp

    from sharp_minima import dynamics

    temp, dt = 0.35, 0.01
    pot = dynamics.double_well()
    sim = dynamics.Simulator(pot, dynamics.langevin_noise(temp, dt), escaped=lambda x: x[0] > 0)
    x0 = jnp.full((runs, 1), -1.0, jnp.float32)
    sim.run(x0, key=jax.random.key(0), learning_rate=dt, num_steps=steps)  # compile
    t0 = time.perf_counter()
    out = sim.run(x0, key=jax.random.key(1), learning_rate=dt, num_steps=steps)
    t_jax = time.perf_counter() - t0

    # NumPy, vectorised over runs: the same potential's gradient in closed form.
    w_a, w_b = np.sqrt(8 * 1.0 / 8.0), np.sqrt(8 * 0.8 / 2.0)
    rng = np.random.default_rng(0)
    x = np.full(runs, -1.0, np.float32)
    first = np.full(runs, -1)
    scale = np.float32(np.sqrt(2 * temp * dt))
    t0 = time.perf_counter()
    for t in range(steps):
        left = x < 0
        w = np.where(left, w_a, w_b)
        d = np.where(left, 1.0, 0.8)
        s = x / w
        grad = d * (4 * s**3 - 4 * s) / w
        x = x - dt * grad + scale * rng.standard_normal(runs, np.float32)
        first = np.where((first < 0) & (x > 0), t + 1, first)
    t_np = time.perf_counter() - t0
    print(
        f"{runs} Langevin runs x {steps} steps on the double well: one Simulator.run "
        f"{t_jax:.2f} s, NumPy {t_np:.2f} s; escaped by the end: "
        f"{(out.escape_step >= 0).mean():.3f} (JAX) vs {(first >= 0).mean():.3f} (NumPy)"
    )
    return t_np / t_jax


def main(argv):
    del argv
    import os

    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={FLAGS.devices}"
    )
    import jax

    print(f"devices: {jax.devices()}")
    # compute-bound; the sgd_noise study's MLP; dispatch-bound
    for widths, target in (
        ((40, 256, 256, 10), 0.95),
        ((40, 64, 64, 10), 0.95),
        ((40, 64, 10), 3.0),
    ):
        r_vmap, r_fused = bench_population(widths, FLAGS.members, FLAGS.steps)
        print(
            f"RATIO sequential/vmapped = {r_vmap:.2f}, sequential/fused = {r_fused:.2f} "
            f"(target >= {target})"
        )
    r = bench_sde(FLAGS.runs, FLAGS.sde_steps)
    print(f"RATIO numpy/jax SDE = {r:.1f} (target >= 5)")
    if jax.device_count() > 1:
        for widths in ((40, 64, 64, 10), (40, 256, 256, 10)):
            speed, memory = bench_sharded_population(widths, FLAGS.members, FLAGS.steps)
            print(
                f"RATIO sharded/one-device members per second = {speed:.2f} (target >= 0.8); "
                f"memory per device x d = {memory:.2f} (target <= 1.2)"
            )
    sys.stdout.flush()


if __name__ == "__main__":
    define_flags()
    app.run(quiet(main))
