r"""Benchmark of the curvature operators and gradient-noise statistics: ratios from one run.

    python -m experiments.bench_operators                    # F1-sized MLP, 1024 examples
    python -m experiments.bench_operators --torch_python=/tmp/torchenv/bin/python

Prints, for a ReLU MLP 784-512x5-10 (1.46M parameters) on 1024 examples:
  * GGN-vector product time / HVP time                          (target <= 0.8)
  * our GGN matvec / laplax's GGN matvec (same process, same operator up to the mean/sum
    convention; needs laplax: pip install -e ".[bench]")         (target <= 1.0)
  * with --torch_python (a Python with torch and curvlinops-for-pytorch): our GGN matvec /
    curvlinops' `GGNLinearOperator` matvec on the same MLP and data (target <= 0.5)
  * exact per-example tr Σ (`gradients.GradientNoise.measure`: the layer identities of
    `per_example`, and the chunked path) / one mini-batch gradient of the same 1024
    examples, on F1 and on Keskar's C1 (CIFAR-shaped)   (goal <= 1.5 on F1, <= 2 on C1;
    peak memory <= 1.5x the gradient's); with 2 random projections (report)
  * an SGD step that also yields the two-batch estimate (`gradients.two_batch_grad`, a small
    batch of B/8) / the plain step                              (target <= 1.1)
  * Lanczos (m = 50, 100) with the parameters and the basis split over 4 simulated CPU
    devices (FSDP-style; D padded to a multiple of 4): XLA's peak per-device memory / the
    same with parameters and basis replicated; the examples split over the devices in both
    (target <= 0.3; run in a subprocess with 4 simulated devices)
Absolute times on a shared CPU are noisy; the ratios are what to read.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

from experiments.bench_hessian import TORCH_MLP, make_problem, run_torch, timeit
from experiments.quiet import quiet

FLAGS = flags.FLAGS


def define_flags():
    """The benchmark's flags, defined only when it runs as a script."""
    flags.DEFINE_integer("examples", 1024, "Number of examples.")
    flags.DEFINE_integer("width", 512, "Hidden width (512 for F1).")
    flags.DEFINE_integer("repeats", 5, "Timing repeats (the minimum is reported).")
    flags.DEFINE_string("torch_python", None, "Python with torch and curvlinops-for-pytorch.")
    flags.DEFINE_list(
        "sections", ["ggn", "noise", "sharded"], "Which parts to run (ggn noise sharded)."
    )
    flags.DEFINE_bool("sharded_child", False, "Internal: run the sharded section here.")


def alternate(fns, rounds):
    """Median times of ``fns`` called in alternation, ``rounds`` times each (after a warm-up):
    side by side, so the machine's drift hits them alike."""
    import jax

    for fn in fns:
        jax.block_until_ready(fn())
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            out.append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in times]


def model_fn(params, batch):
    import jax

    h = batch["x"]
    for i, layer in enumerate(params):
        h = h @ layer["w"] + layer.get("b", 0.0)
        if i < len(params) - 1:
            h = jax.nn.relu(h)
    return h


def mean_loss(params, batch):
    from sharp_minima import operators

    return operators.cross_entropy().per_example(model_fn(params, batch), batch).mean()


CURVLINOPS_SCRIPT = (
    TORCH_MLP
    + r"""
from curvlinops import GGNLinearOperator
params = [p for p in model.parameters()]
op = GGNLinearOperator(model, torch.nn.CrossEntropyLoss(), params, [(x, y)],
                       check_deterministic=False)
def grad():
    model.zero_grad(); torch.nn.functional.cross_entropy(model(x), y).backward()
grad()
t_grad = float("inf")
for _ in range(int(sys.argv[3])):
    t0 = time.perf_counter(); grad(); t_grad = min(t_grad, time.perf_counter() - t0)
torch.manual_seed(0)
v = torch.randn(sum(p.numel() for p in params))
def mv():
    return op @ v
mv()
best = float("inf")
for _ in range(int(sys.argv[3])):
    t0 = time.perf_counter(); mv(); best = min(best, time.perf_counter() - t0)
import importlib.metadata as md
print(json.dumps({"time": best, "grad": t_grad, "version": md.version("curvlinops-for-pytorch"),
                  "torch": torch.__version__}))
"""
)


def bench_ggn(layers, x, y, repeats):
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from sharp_minima import hessian, operators

    params = jax.tree.map(jnp.asarray, layers)
    batches = {"x": jnp.asarray(x)[None], "y": jnp.asarray(y)[None]}
    weights = jnp.ones((1,), jnp.float32)
    flat, unravel = ravel_pytree(params)
    dim = flat.size
    print(f"model: ReLU MLP 784-{FLAGS.width}x5-10, D = {dim:,} parameters, {len(x)} examples")
    v = jax.random.normal(jax.random.key(0), (dim,))
    ggn, curv = operators.GGN(model_fn, "cross_entropy"), hessian.Curvature(mean_loss)

    def product(op):
        @jax.jit
        def fn(p, b, w, v):
            return op.flat_matvec(p, b, w)[1](v)

        return fn

    ggn_fn, hvp_fn = product(ggn), product(curv)
    grad_fn = jax.jit(lambda p, b: jax.grad(mean_loss)(p, jax.tree.map(lambda a: a[0], b)))
    t_grad = timeit(lambda: grad_fn(params, batches), repeats)
    t_ggn = timeit(lambda: ggn_fn(params, batches, weights, v), repeats)
    t_hvp = timeit(lambda: hvp_fn(params, batches, weights, v), repeats)
    print(
        f"gradient {t_grad * 1e3:7.1f} ms   GGN-vector {t_ggn * 1e3:7.1f} ms   "
        f"HVP {t_hvp * 1e3:7.1f} ms"
    )
    print(f"RATIO ggn/hvp = {t_ggn / t_hvp:.2f} (target <= 0.8); ggn/grad = {t_ggn / t_grad:.2f}")

    try:
        from laplax.curv.ggn import create_ggn_mv
    except ImportError:
        print("(laplax comparison skipped: pip install -e '.[bench]')")
    else:

        def laplax_model(input, params):  # noqa: A002  (laplax's keyword names)
            return model_fn(params, {"x": input})

        @jax.jit
        def laplax_fn(p, xs, ys, vec):
            mv = create_ggn_mv(laplax_model, p, {"input": xs, "target": ys}, "cross_entropy")
            return mv(vec)

        vtree = unravel(v)
        xs, ys = jnp.asarray(x), jnp.asarray(y)
        ours = np.asarray(ggn_fn(params, batches, weights, v))
        theirs = np.asarray(ravel_pytree(laplax_fn(params, xs, ys, vtree))[0]) / len(x)
        agree = np.abs(ours - theirs).max() / np.abs(theirs).max()
        # Alternating rounds, medians: the two differ by less than this CPU's drift.
        t_ours, t_laplax = alternate(
            [lambda: ggn_fn(params, batches, weights, v), lambda: laplax_fn(params, xs, ys, vtree)],
            max(repeats, 7),
        )
        print(
            f"laplax GGN-vector {t_laplax * 1e3:7.1f} ms (same product: max rel. "
            f"difference {agree:.1e}, theirs summed over examples, ours their mean)"
        )
        print(
            f"RATIO ours/laplax = {t_ours / t_laplax:.2f} (target <= 1.0; medians of "
            f"alternating rounds: {t_ours * 1e3:.1f} vs {t_laplax * 1e3:.1f} ms)"
        )

    if FLAGS.torch_python:
        res = run_torch(FLAGS.torch_python, CURVLINOPS_SCRIPT, layers, x, y, repeats)
        if res is not None:
            print(
                f"curvlinops {res['version']} (torch {res['torch']}) GGN-vector "
                f"{res['time'] * 1e3:7.1f} ms; torch's gradient {res['grad'] * 1e3:7.1f} ms "
                f"(GGN/gradient {res['time'] / res['grad']:.2f} there, "
                f"{t_ggn / t_grad:.2f} here)"
            )
            print(f"RATIO ours/curvlinops = {t_ggn / res['time']:.2f} (target <= 0.5)")
    else:
        print("(curvlinops comparison skipped: pass --torch_python)")


def peak_bytes(jitted, *args):
    """XLA's peak memory of a jitted function at these arguments (compiled, not run)."""
    mem = jitted.lower(*args).compile().memory_analysis()
    return (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )


def c1_problem(examples, seed=0):
    """Keskar's C1 (conv64 5x5 -> BN -> pool, twice; dense 384, 192; BN in evaluation mode) on
    CIFAR-shaped random images with teacher labels: variables, loss and data."""
    import jax
    import jax.numpy as jnp

    from sharp_minima import losses
    from sharp_minima.models import get_model

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(examples, 32, 32, 3)).astype(np.float32)
    y = np.argmax(x.reshape(examples, -1) @ rng.normal(size=(3072, 10)), axis=1).astype(np.int32)
    model = get_model("c1", num_classes=10)
    variables = model.init(jax.random.key(seed), jnp.asarray(x[:2]), train=False)
    return variables, losses.evaluation_loss(model), x, y


def bench_noise_exact(name, loss, params, x, y, repeats, wrt=None, time_chunked=True):
    """Exact per-example tr Σ by the layer identities and by the chunked path against one
    mini-batch gradient of the same examples, timed side by side; XLA's peak memory."""
    import jax
    import jax.numpy as jnp

    from sharp_minima import gradients

    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    batches = jax.tree.map(lambda a: a[None], batch)
    grad_fn = jax.jit(jax.grad(loss))
    layers = gradients.GradientNoise(loss, wrt=wrt, chunk=32)
    chunked = gradients.GradientNoise(loss, wrt=wrt, chunk=32, method="chunked")
    a = layers.measure(params, batches)
    b = chunked.measure(params, batches) if time_chunked else a
    t_grad, t_layers = alternate(
        [lambda: grad_fn(params, batch), lambda: layers.measure(params, batches).total.trace_cov],
        max(repeats, 7),
    )
    t_chunked = float("nan")
    if time_chunked:
        t_chunked = timeit(lambda: chunked.measure(params, batches).total.trace_cov, 1)
    mem_grad = peak_bytes(grad_fn, params, batch)
    mem_layers = layers.memory_bytes(params, batches)
    rel = abs(a.total.trace_cov - b.total.trace_cov) / abs(b.total.trace_cov)
    agree = (
        f"B_simple {a.total.b_simple:.2f} vs {b.total.b_simple:.2f} (tr Σ rel. difference "
        f"{rel:.1e})"
        if time_chunked
        else f"B_simple {a.total.b_simple:.2f} (the chunked path not run: minutes here)"
    )
    routes = {}
    for route in a.routes.values():
        routes[route] = routes.get(route, 0) + 1
    print(f"{name}: mini-batch gradient ({len(x)} examples) {t_grad * 1e3:8.1f} ms")
    print(
        f"  exact tr Σ, layer identities {t_layers * 1e3:8.1f} ms; chunked path "
        f"{t_chunked * 1e3:8.1f} ms; {agree}; leaves by route {routes}"
    )
    print(
        f"RATIO {name} exact tr Σ / gradient = {t_layers / t_grad:.2f} layer identities, "
        f"{t_chunked / t_grad:.1f} chunked (medians of alternating rounds; chunked: one call)"
    )
    print(
        f"RATIO {name} peak memory, layer identities / gradient = {mem_layers / mem_grad:.2f} "
        f"({mem_layers / 2**20:.0f} vs {mem_grad / 2**20:.0f} MiB; goal <= 1.5)"
    )
    return t_layers / t_grad


def bench_noise(layers, x, y, repeats):
    import jax
    import jax.numpy as jnp
    import optax

    from sharp_minima import gradients

    params = jax.tree.map(jnp.asarray, layers)
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    r = bench_noise_exact("F1", mean_loss, params, x, y, repeats)
    print(f"  (goal <= 1.5 on F1: {'met' if r <= 1.5 else 'NOT met'})")
    variables, c1_loss, cx, cy = c1_problem(len(x))
    # The chunked path on C1 takes many minutes here (per-example convolutions): not timed.
    r = bench_noise_exact(
        "C1", c1_loss, variables, cx, cy, repeats, wrt="^params/", time_chunked=False
    )
    print(f"  (goal <= 2 on C1: {'met' if r <= 2 else 'NOT met'})")
    batches = jax.tree.map(lambda a: a[None], batch)
    grad_fn = jax.jit(jax.grad(mean_loss))
    t_grad = timeit(lambda: grad_fn(params, batch), repeats)
    key = jax.random.key(0)
    noise = gradients.GradientNoise(mean_loss)
    total = gradients.GradientNoise(mean_loss, groups={"all": ""})
    rows = []
    for name, est, k in (("per layer", noise, 2), ("total only", total, 2)):
        t = timeit(
            lambda est=est, k=k: est.measure(params, batches, num_probes=k, key=key).total, repeats
        )
        rows.append((name, k, t, est.measure(params, batches, num_probes=k, key=key).total))
    for name, k, t, est in rows:
        print(
            f"  per-example tr Σ, {k} projections, {name:10s} {t * 1e3:8.1f} ms: "
            f"B_simple = {est.b_simple:.1f} ± {est.b_simple_stderr:.1f}"
        )
    print(
        "RATIO projected tr Σ / gradient = "
        + ", ".join(f"{t / t_grad:.1f} ({name})" for name, _, t, _ in rows)
    )

    tx = optax.sgd(0.01)
    opt_state = tx.init(params)
    small = len(x) // 8
    split = gradients.two_batch_grad(mean_loss, small_size=small)

    @jax.jit
    def plain(p, s, b):
        loss, g = jax.value_and_grad(mean_loss)(p, b)
        updates, s = tx.update(g, s)
        return optax.apply_updates(p, updates), s, loss

    @jax.jit
    def with_noise(p, s, b):
        loss, g, stats = split(p, b)
        updates, s = tx.update(g, s)
        g2, tr = gradients.two_batch(stats["small_sq"], stats["big_sq"], small, len(x))
        return optax.apply_updates(p, updates), s, loss, g2, tr

    t_plain = timeit(lambda: plain(params, opt_state, batch), repeats)
    t_two = timeit(lambda: with_noise(params, opt_state, batch), repeats)
    *_, g2, tr = with_noise(params, opt_state, batch)
    print(
        f"SGD step {t_plain * 1e3:7.1f} ms   with the two-batch estimate {t_two * 1e3:7.1f} ms "
        f"(one step's B_simple = {float(tr) / float(g2):.1f}: one sample, noisy)"
    )
    print(f"RATIO two-batch step / plain step = {t_two / t_plain:.2f} (target <= 1.1)")


def bench_sharded(layers, x, y):
    """Run in a process with 4 simulated devices: XLA's per-device peak memory of Lanczos
    with the parameters (FSDP-style) and the basis split over the devices, against the
    parameters and basis replicated; the examples are split over the devices in both."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from sharp_minima import curvature, hessian

    d = 4
    mesh = Mesh(np.array(jax.devices()[:d]), ("fsdp",))
    curv = hessian.Curvature(mean_loss)
    params = jax.tree.map(jnp.asarray, layers)

    def spec(a):
        return PartitionSpec("fsdp") if a.shape[0] % d == 0 else PartitionSpec()

    sharded = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, spec(a))), params)
    replicated = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    batches = {"x": jnp.asarray(x)[None], "y": jnp.asarray(y)[None]}
    batches = curvature.shard_batches(batches, devices=jax.devices()[:d], axis_name="fsdp")
    weights = jnp.ones((1,), jnp.float32)
    dim = sum(a.size for a in jax.tree.leaves(params))
    width = -(-dim // d) * d  # D padded to a multiple of the devices, as the operators do
    for m in (50, 100):
        peaks = {}
        for name, p in (("sharded", sharded), ("replicated", replicated)):
            sharding = curvature.basis_sharding(p, None, dim)

            def fn(p, b, w, v0, sharding=sharding, m=m):
                matvec = curv.flat_matvec(p, b, w)[1]
                if sharding is not None:  # zero padding up to `width` columns
                    inner = matvec
                    matvec = lambda v: jnp.pad(inner(v[:dim]), (0, width - dim))  # noqa: E731
                res = curvature.lanczos(matvec, v0, m, key=jax.random.key(0), sharding=sharding)
                return res.alphas, res.betas

            v0 = jnp.ones((width if sharding is not None else dim,), jnp.float32)
            mem = jax.jit(fn).lower(p, batches, weights, v0).compile().memory_analysis()
            peaks[name] = (
                mem.argument_size_in_bytes
                + mem.output_size_in_bytes
                + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes
            )
        basis = m * dim * 4
        print(
            f"m = {m}: per-device peak {peaks['sharded'] / 2**20:6.1f} MiB sharded, "
            f"{peaks['replicated'] / 2**20:6.1f} MiB replicated (the basis: "
            f"{basis / 2**20:.0f} MiB, a quarter {basis / 4 / 2**20:.0f} MiB)"
        )
        print(
            f"RATIO m = {m} sharded/replicated per-device peak = "
            f"{peaks['sharded'] / peaks['replicated']:.2f} (target <= 0.3)"
        )


def main(argv):
    del argv
    import jax

    layers, x, y = make_problem(FLAGS.examples, FLAGS.width)
    if FLAGS.sharded_child:
        bench_sharded(layers, x, y)
        return
    print(f"devices: {jax.devices()}")
    if "ggn" in FLAGS.sections:
        bench_ggn(layers, x, y, FLAGS.repeats)
    if "noise" in FLAGS.sections:
        bench_noise(layers, x, y, FLAGS.repeats)
    if "sharded" in FLAGS.sections:
        env = dict(os.environ)
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
        ).strip()
        args = [
            sys.executable,
            "-m",
            "experiments.bench_operators",
            "--sharded_child",
            f"--examples={FLAGS.examples}",
            f"--width={FLAGS.width}",
        ]
        out = subprocess.run(args, env=env, capture_output=True, text=True)
        print(out.stdout.strip() or out.stderr[-2000:])
    sys.stdout.flush()


if __name__ == "__main__":
    define_flags()
    app.run(quiet(main))
