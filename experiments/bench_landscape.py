r"""Benchmark: basin radii and 2-D surfaces batched with `vmap` vs Python loops.

    python -m experiments.bench_landscape     # the swiss-roll MLP (3.6k parameters), 200 points

On a swiss-roll minimum (the authors' MLP trained naturally for 2000 full-batch Adam steps)
it times, side by side in one run and with compilation excluded:

1. the radii of 3000 unit directions in one `Landscape.radii` call vs the same bracketing +
   bisection for one direction at a time in a Python loop (one jitted call per direction,
   timed on ``--loop_directions`` and scaled to 3000); goal >= 10x;
2. a 51x51 filter-normalised surface in one `Landscape.slice` call vs a Python loop of jitted
   per-point loss evaluations (timed on ``--loop_points`` points, scaled to 2601); goal >= 10x;
3. the loss evaluations per direction the bisection needs at several tolerances.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
from absl import app, flags

from experiments.quiet import quiet

FLAGS = flags.FLAGS


def define_flags():
    """The benchmark's flags, defined only when it runs as a script."""
    flags.DEFINE_integer("directions", 3000, "Directions of the batched radii.")
    flags.DEFINE_integer("loop_directions", 100, "Directions timed in the Python loop.")
    flags.DEFINE_integer("points", 51, "Surface grid points per axis.")
    flags.DEFINE_integer("loop_points", 400, "Surface points timed in the Python loop.")
    flags.DEFINE_integer("chunk_size", 250, "Directions / points per vmapped chunk.")
    flags.DEFINE_float("rtol", 1e-3, "Relative tolerance of the bisection.")


def trained_swissroll():
    """A natural swiss-roll minimum (variables, batches, model)."""
    from configs import visualize_generalization as vgc
    from sharp_minima import data as data_lib
    from sharp_minima import train
    from sharp_minima.studies import visualize_generalization as vg

    config = vgc.get_config()
    data = vg.load_data(config)
    cfg = vg.run_config(config, 0, epochs=2000, n_train=len(data.x_train))
    res = train.train(cfg, tempfile.mkdtemp(), data=data, log=lambda s: None)
    batches, _ = data_lib.all_batches(data.x_train, data.y_train)
    return res.state.variables(), batches, res.model


def best_of(fn, repeats=3):
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def main(argv):
    del argv
    import jax

    from sharp_minima import landscape, losses
    from sharp_minima.studies import visualize_generalization as vg

    variables, batches, model = trained_swissroll()
    loss = losses.evaluation_loss(model)
    land = landscape.Landscape(loss, wrt="^params/", chunk_size=FLAGS.chunk_size)
    key = jax.random.key(0)
    n = FLAGS.directions
    print(f"swiss-roll MLP, {jax.device_count()} device(s); cutoff 0.1 on the training loss")

    # 1. radii: all directions at once vs one direction per call.
    def batched():
        return land.radii(
            variables, batches, key=key, num_directions=n, cutoff=0.1, rtol=FLAGS.rtol
        )

    t_batched = best_of(batched, repeats=2)
    radii, evals, *_ = batched()
    one = landscape.Landscape(loss, wrt="^params/", chunk_size=1, devices=jax.devices()[:1])

    def loop():
        for i in range(FLAGS.loop_directions):
            one.radii(
                variables,
                batches,
                key=jax.random.fold_in(key, i),
                num_directions=1,
                cutoff=0.1,
                rtol=FLAGS.rtol,
            )

    t_loop = best_of(loop, repeats=1) * n / FLAGS.loop_directions
    print(
        f"radii of {n} directions: batched {t_batched:.2f} s, Python loop {t_loop:.1f} s "
        f"(from {FLAGS.loop_directions}) -> {t_loop / t_batched:.1f}x (goal >= 10x)"
    )

    # 2. a 51x51 surface in one call vs point by point.
    d1, d2 = landscape.orthogonal_pair(jax.random.key(1), variables, "filter", wrt="^params/")
    grid = np.linspace(-1, 1, FLAGS.points)
    surf = landscape.Landscape(
        vg.classifier_metrics(model), wrt="^params/", chunk_size=FLAGS.chunk_size
    )
    t_surface = best_of(lambda: surf.slice(variables, batches, [d1, d2], [grid, grid]))

    @jax.jit
    def point(v, b, a, c):
        moved = jax.tree.map(lambda w, u1, u2: w + a * u1 + c * u2, v, d1, d2)
        return loss(moved, jax.tree.map(lambda t: t[0], b))

    coords = [(a, c) for a in grid for c in grid][: FLAGS.loop_points]

    def per_point():
        for a, c in coords:
            point(variables, batches, a, c).block_until_ready()

    t_points = best_of(per_point, repeats=1) * len(grid) ** 2 / len(coords)
    print(
        f"{len(grid)}x{len(grid)} surface: one call {t_surface:.3f} s, per-point loop "
        f"{t_points:.2f} s (from {len(coords)}) -> {t_points / t_surface:.1f}x (goal >= 10x)"
    )

    # 3. evaluations per direction.
    print(
        f"loss evaluations per direction at rtol {FLAGS.rtol:g}: mean {evals.mean():.1f} "
        f"(min {evals.min()}, max {evals.max()}); radii {radii.min():.3f}-{radii.max():.3f}"
    )
    for rtol in (1e-2, 1e-4):
        e = land.radii(variables, batches, key=key, num_directions=300, cutoff=0.1, rtol=rtol)[1]
        print(f"  rtol {rtol:g}: {e.mean():.1f} evaluations per direction")


if __name__ == "__main__":
    define_flags()
    app.run(quiet(main))
