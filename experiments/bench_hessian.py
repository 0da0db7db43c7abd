r"""Benchmark of sharp_minima.hessian: ratios measured side by side in one run.

    python -m experiments.bench_hessian                 # F1-sized MLP, 1024 examples
    python -m experiments.bench_hessian --pyhessian_python=/path/to/venv/bin/python

Prints, for a ReLU MLP 784-512x5-10 (1.46M parameters) on 1024 examples:
  * HVP time / gradient time                                   (target <= 2.5)
  * Lanczos time / (m x HVP time) for m in --steps              (target <= 1.25)
  * compile time of Lanczos vs m                                (flat)
  * XLA's peak-memory estimate of Lanczos / (m*D*4 + model + data)   (target <= 1.3)
  * top-5 largest-magnitude eigenvalues of a trained MLP 784-128-128-10 on 2048 examples
    (Fashion-MNIST when Debian's dataset-fashion-mnist is installed, else a random teacher):
    `Curvature.eigenpairs(k=5, which="LM", restart=False)` at its default tolerance vs matfree's
    `eigh_partial(tridiag_sym(m))` with the smallest m reaching the same 1e-4 relative
    accuracy against a float64 ARPACK reference                 (target <= 1.0; needs matfree:
    pip install -e ".[bench]")
  * curvature tracking (`sharp_minima.tracking.EigenTracker`, K = 10 on a 5% subset once per
    epoch, warm-started) on the same MLP trained by SGD on 20,000 examples: time per call /
    time per epoch (target <= 0.3), and HVPs per call, cold vs warm
  * with --pyhessian_python (a Python that has torch and pyhessian): top-5 largest-magnitude
    eigenvalues, PyHessian's deflated power iteration vs `eigenpairs(which="LM")`, time
    ratio and errors against a float64 scipy `eigsh` reference.
Absolute times on a shared CPU are noisy; the ratios are what to read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from experiments.quiet import quiet

FLAGS = flags.FLAGS


def define_flags():
    """The benchmark's flags, defined only when it runs as a script (so every module of
    ``experiments/`` can be imported together)."""
    flags.DEFINE_integer("examples", 1024, "Number of examples.")
    flags.DEFINE_list("steps", ["20", "50", "100"], "Lanczos step counts m.")
    flags.DEFINE_integer("repeats", 3, "Timing repeats (the minimum is reported).")
    flags.DEFINE_string("pyhessian_python", None, "Python interpreter with torch and pyhessian.")
    flags.DEFINE_integer("width", 512, "Hidden width (512 for F1).")
    flags.DEFINE_list(
        "sections", ["core", "matfree", "tracking"], "Which parts to run (core matfree tracking)."
    )


WIDTHS = (784, 512, 512, 512, 512, 512, 10)


def timeit(fn, repeats):
    """The best of ``repeats`` timed calls of ``fn`` after a warm-up (which compiles)."""
    import jax

    jax.block_until_ready(fn())  # warm-up (and compile)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def make_problem(examples, width, seed=0):
    """F1-sized ReLU MLP (no BN) and a data set of `examples` points: numpy arrays."""
    rng = np.random.default_rng(seed)
    widths = (784,) + (width,) * 5 + (10,)
    layers = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        w = rng.normal(size=(fan_in, fan_out)) * np.sqrt(2.0 / fan_in)
        layers.append({"w": w.astype(np.float32), "b": np.zeros(fan_out, np.float32)})
    x = rng.normal(size=(examples, 784)).astype(np.float32)
    # Labels from a random linear teacher, so the loss is not flat noise.
    y = np.argmax(x @ rng.normal(size=(784, 10)), axis=1).astype(np.int32)
    return layers, x, y


def mlp_loss(params, batch):
    import jax
    import jax.numpy as jnp

    h = batch["x"]
    for i, layer in enumerate(params):
        h = h @ layer["w"] + layer["b"]
        if i < len(params) - 1:
            h = jax.nn.relu(h)
    logp = jax.nn.log_softmax(h)
    return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))


def bench_core(params, batches, steps, repeats):
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from sharp_minima import hessian

    flat, _ = ravel_pytree(params)
    dim = flat.size
    weights = jnp.ones((1,), jnp.float32)
    print(f"model: ReLU MLP {WIDTHS}, D = {dim:,} parameters, {FLAGS.examples} examples")

    grad_fn = jax.jit(lambda p, b: jax.grad(mlp_loss)(p, jax.tree.map(lambda x: x[0], b)))

    @jax.jit
    def hvp_fn(p, b, w, v):
        _, matvec = hessian.Curvature(mlp_loss).flat_matvec(p, b, w)
        return matvec(v)

    v = jax.random.normal(jax.random.key(0), (dim,))
    t_grad = timeit(lambda: grad_fn(params, batches), repeats)
    t_hvp = timeit(lambda: hvp_fn(params, batches, weights, v), repeats)
    print(f"gradient {t_grad * 1e3:8.1f} ms   HVP {t_hvp * 1e3:8.1f} ms")
    print(f"RATIO hvp/grad = {t_hvp / t_grad:.2f}   (target <= 2.5)")

    def lanczos_fn(p, b, w, v0, m):
        _, matvec = hessian.Curvature(mlp_loss).flat_matvec(p, b, w)
        res = hessian.lanczos(matvec, v0, m, key=jax.random.key(1))
        return res.alphas, res.betas, res.basis

    rows = []
    for m in steps:
        jitted = jax.jit(lanczos_fn, static_argnums=(4,))
        t0 = time.perf_counter()
        compiled = jitted.lower(params, batches, weights, v, m).compile()
        t_compile = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        peak = None
        if mem is not None:
            peak = (
                mem.argument_size_in_bytes
                + mem.output_size_in_bytes
                + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes
            )
        t_lanczos = timeit(lambda c=compiled: c(params, batches, weights, v), 1)
        model_bytes = dim * 4
        data_bytes = sum(x.nbytes for x in jax.tree.leaves(batches))
        budget = m * dim * 4 + model_bytes + data_bytes
        rows.append((m, t_lanczos, t_lanczos / (m * t_hvp), t_compile, peak, budget))
    print(" m   lanczos[s]  lanczos/(m*HVP)  compile[s]  peak/(m*D*4+model+data)")
    for m, t, r, tc, peak, budget in rows:
        mem_ratio = f"{peak / budget:.2f}" if peak is not None else "n/a"
        print(f"{m:3d}  {t:9.2f}  {r:15.2f}  {tc:10.2f}  {mem_ratio:>10}")
    print(
        "RATIO lanczos/(m*HVP) max = "
        f"{max(r for _, _, r, *_ in rows):.2f} (target <= 1.25); compile time max/min = "
        f"{max(r[3] for r in rows) / min(r[3] for r in rows):.2f} (flat ~ 1)"
    )
    mem_rows = [r for r in rows if r[4] is not None]
    if mem_rows:
        print(f"RATIO peak memory max = {max(r[4] / r[5] for r in mem_rows):.2f} (target <= 1.3)")
    return t_hvp


# The F1-sized MLP in PyTorch, from the arrays `run_torch` writes: a script's first part.
TORCH_MLP = r"""
import json, sys, time
import numpy as np, torch
torch.set_num_threads(int(sys.argv[2]))
z = np.load(sys.argv[1])
n_layers = int(z["n_layers"])
mods = []
for i in range(n_layers):
    w, b = z[f"w{i}"], z[f"b{i}"]
    lin = torch.nn.Linear(w.shape[0], w.shape[1])
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w.T)); lin.bias.copy_(torch.from_numpy(b))
    mods.append(lin)
    if i < n_layers - 1:
        mods.append(torch.nn.ReLU())
model = torch.nn.Sequential(*mods)
x, y = torch.from_numpy(z["x"]), torch.from_numpy(z["y"]).long()
"""

PYHESSIAN_SCRIPT = (
    TORCH_MLP
    + r"""
from pyhessian import hessian as pyh
comp = pyh(model, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False)
torch.manual_seed(0)
t0 = time.perf_counter()
vals, _ = comp.eigenvalues(top_n=5, maxIter=100, tol=1e-4)
t = time.perf_counter() - t0
print(json.dumps({"time": t, "values": [float(v) for v in vals]}))
"""
)


def run_torch(python, script, layers, x, y, *args):
    """Runs ``script`` (`TORCH_MLP` + a measurement printing one JSON line) with the
    interpreter ``python`` on the MLP ``layers`` and data; its JSON, or None (with the
    error printed) when it failed. Extra ``args`` follow the data path and the thread count."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "problem.npz")
        arrays = {f"w{i}": layer["w"] for i, layer in enumerate(layers)}
        arrays.update({f"b{i}": layer["b"] for i, layer in enumerate(layers)})
        np.savez(path, x=x, y=y, n_layers=len(layers), **arrays)
        file = os.path.join(tmp, "run.py")
        with open(file, "w") as f:
            f.write(script)
        out = subprocess.run(
            [python, file, path, str(os.cpu_count()), *map(str, args)],
            capture_output=True,
            text=True,
        )
    if out.returncode:
        print("the PyTorch run failed:\n" + out.stderr[-2000:])
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_vs_pyhessian(layers, x, y, params, batches, python):
    import jax
    import jax.numpy as jnp
    import scipy.sparse.linalg as sla
    from jax.flatten_util import ravel_pytree

    from sharp_minima import hessian

    pyh = run_torch(python, PYHESSIAN_SCRIPT, layers, x, y)
    if pyh is None:
        return

    t0 = time.perf_counter()
    first = hessian.eigenpairs(mlp_loss, params, batches, k=5, key=jax.random.key(0), which="LM")
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = hessian.eigenpairs(mlp_loss, params, batches, k=5, key=jax.random.key(1), which="LM")
    t_ours = time.perf_counter() - t0
    del first

    # Independent float64 reference: ARPACK (scipy eigsh) on float64 HVPs.
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        b64 = jax.tree.map(
            lambda a: jnp.asarray(a, jnp.float64) if a.dtype.kind == "f" else a, batches
        )
        flat, unravel = ravel_pytree(p64)
        w64 = jnp.ones((1,), jnp.float64)

        @jax.jit
        def hvp64(p, b, w, v):
            _, matvec = hessian.Curvature(mlp_loss).flat_matvec(p, b, w)
            return matvec(v)

        op = sla.LinearOperator(
            (flat.size, flat.size),
            matvec=lambda v: np.asarray(hvp64(p64, b64, w64, jnp.asarray(v.ravel()))),
            dtype=np.float64,
        )
        t0 = time.perf_counter()
        ref = sla.eigsh(op, k=5, which="LM", tol=1e-10, return_eigenvectors=False)
        t_ref = time.perf_counter() - t0
    ref = ref[np.argsort(-np.abs(ref))]
    ours_v = np.asarray(ours.values)
    pyh_v = np.asarray(sorted(pyh["values"], key=lambda v: -abs(v)))
    err_ours = np.max(np.abs(ours_v - ref) / np.abs(ref))
    err_pyh = np.max(np.abs(pyh_v - ref) / np.abs(ref))
    print(f"reference (scipy eigsh, float64, {t_ref:.1f} s): {np.round(ref, 6).tolist()}")
    print(f"sharp_minima LM top-5: {np.round(ours_v, 6).tolist()}  max rel. error {err_ours:.2e}")
    print(f"PyHessian   top-5:    {np.round(pyh_v, 6).tolist()}  max rel. error {err_pyh:.2e}")
    print(
        f"time: sharp_minima {t_ours:.2f} s ({t_first:.2f} s with compilation, "
        f"{ours.num_steps + 5} HVPs), PyHessian {pyh['time']:.2f} s"
    )
    print(
        f"RATIO pyhessian_time/sharp_minima_time = {pyh['time'] / t_ours:.1f} "
        f"(with compilation {pyh['time'] / t_first:.1f}; target >= 3); "
        f"error ratio pyhessian/sharp_minima = {err_pyh / max(err_ours, 1e-16):.1f} "
        "(target >= 10)"
    )


def small_problem(num_train, seed=0):
    """An MLP 784-128-128-10 (list of dense layers) and (x, y) for the matfree and tracking
    sections: Fashion-MNIST when installed, else a random linear teacher on Gaussian inputs."""
    from sharp_minima import data

    try:
        ds = data.load("fashion_mnist", seed=seed, max_train=num_train, allow_download=False)
        x, y, source = ds.x_train.reshape(len(ds.x_train), -1), ds.y_train, "Fashion-MNIST"
    except Exception:  # noqa: BLE001 - any failure: fall back to generated data
        _, x, y = make_problem(num_train, 8, seed)
        source = "random teacher"
    rng = np.random.default_rng(seed)
    layers = []
    for fan_in, fan_out in zip((784, 128, 128), (128, 128, 10)):
        w = rng.normal(size=(fan_in, fan_out)) * np.sqrt(2.0 / fan_in)
        layers.append({"w": w.astype(np.float32), "b": np.zeros(fan_out, np.float32)})
    return layers, np.asarray(x, np.float32), np.asarray(y, np.int32), source


def _sgd_epoch_fn(learning_rate, batch_size):
    import jax

    @jax.jit
    def epoch(params, x, y, key):
        n = (x.shape[0] // batch_size) * batch_size
        idx = jax.random.permutation(key, x.shape[0])[:n].reshape(-1, batch_size)

        def step(p, i):
            g = jax.grad(mlp_loss)(p, {"x": x[i], "y": y[i]})
            return jax.tree.map(lambda a, b: a - learning_rate * b, p, g), None

        return jax.lax.scan(step, params, idx)[0]

    return epoch


def bench_vs_matfree(repeats):
    """Top-5 LM eigenvalues: ours at the default tolerance vs matfree at the smallest m that
    is as accurate, on a trained 784-128-128-10 MLP (2048 examples)."""
    import jax
    import jax.numpy as jnp
    import scipy.sparse.linalg as sla
    from jax.flatten_util import ravel_pytree

    from sharp_minima import hessian

    try:
        from matfree import decomp, eig
    except ImportError:
        print("(matfree comparison skipped: pip install matfree, or -e '.[bench]')")
        return
    layers, x, y, source = small_problem(2048)
    params = jax.tree.map(jnp.asarray, layers)
    epoch = _sgd_epoch_fn(0.05, 128)
    for e in range(10):
        params = epoch(params, jnp.asarray(x), jnp.asarray(y), jax.random.key(e))
    batches = {"x": jnp.asarray(x)[None], "y": jnp.asarray(y)[None]}
    weights = jnp.ones((1,), jnp.float32)
    dim = ravel_pytree(params)[0].size
    print(f"\nmatfree: MLP 784-128-128-10 (D = {dim:,}) trained 10 SGD epochs on 2048 {source}")

    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        b64 = {"x": jnp.asarray(batches["x"], jnp.float64), "y": batches["y"]}

        @jax.jit
        def hvp64(p, b, v):
            _, matvec = hessian.Curvature(mlp_loss).flat_matvec(p, b, jnp.ones((1,)))
            return matvec(v)

        op = sla.LinearOperator(
            (dim, dim),
            matvec=lambda v: np.asarray(hvp64(p64, b64, jnp.asarray(v.ravel()))),
            dtype=np.float64,
        )
        ref = sla.eigsh(op, k=5, which="LM", tol=1e-12, return_eigenvectors=False)
    ref = ref[np.argsort(-np.abs(ref))]

    def error(values):
        values = np.asarray(sorted(np.asarray(values, np.float64), key=lambda v: -abs(v))[:5])
        return float(np.max(np.abs(values - ref) / np.abs(ref)))

    curv = hessian.Curvature(mlp_loss)
    # restart=False: one Krylov sequence, the guarantee matfree's Lanczos gives too.
    run = lambda: curv.eigenpairs(  # noqa: E731
        params, batches, k=5, key=jax.random.key(1), which="LM", restart=False
    )
    out = run()
    t_ours = min(_timed(run) for _ in range(repeats))
    err_ours = error(out.values)

    v0 = jax.random.normal(jax.random.key(2), (dim,))

    def matfree_fn(m):
        @jax.jit
        def f(p, b, w, v):
            _, matvec = hessian.Curvature(mlp_loss).flat_matvec(p, b, w)
            vals, _ = eig.eigh_partial(decomp.tridiag_sym(m))(matvec, v)
            return vals

        return lambda: f(params, batches, weights, v0)

    chosen = None
    for m in range(10, 61, 2):
        fn = matfree_fn(m)
        vals = np.asarray(fn())
        if error(vals) <= max(err_ours, 1e-4):
            chosen = (m, fn, error(vals))
            break
    print(f"reference top-5 (ARPACK, float64): {np.round(ref, 5).tolist()}")
    print(
        f"sharp_minima eigenpairs: {out.num_steps} HVPs, {t_ours:.3f} s, "
        f"max rel. error {err_ours:.1e}"
    )
    if chosen is None:
        print("matfree did not reach that accuracy with m <= 60")
        return
    m, fn, err_m = chosen
    t_m = min(_timed(fn) for _ in range(repeats))
    print(
        f"matfree eigh_partial(tridiag_sym({m})): {m} HVPs, {t_m:.3f} s, max rel. error {err_m:.1e}"
    )
    print(f"RATIO eigenpairs/matfree time = {t_ours / t_m:.2f} (target <= 1.0)")


def _timed(fn):
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def bench_tracking(num_epochs=6):
    """Tracking K = 10 on a 5% subset, once per epoch, warm-started: seconds per call / seconds
    per SGD epoch, and HVPs per call cold vs warm."""
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from sharp_minima import data, tracking

    layers, x, y, source = small_problem(20_000)
    params = jax.tree.map(jnp.asarray, layers)
    xs, ys = jnp.asarray(x), jnp.asarray(y)
    batches, weights = data.curvature_batches(jax.random.key(0), x, y, fraction=0.05)
    n_sub = batches["y"].size
    warm = tracking.EigenTracker(mlp_loss, batches, key=jax.random.key(1), k=10, weights=weights)
    cold = tracking.EigenTracker(mlp_loss, batches, key=jax.random.key(1), k=10, weights=weights)
    epoch = _sgd_epoch_fn(0.05, 128)
    jax.block_until_ready(epoch(params, xs, ys, jax.random.key(99)))  # compile
    warm.measure(params, 0), cold.measure(params, 0)  # compile both
    cold.vectors = None
    dim = ravel_pytree(params)[0].size
    print(
        f"\ntracking: MLP 784-128-128-10 (D = {dim:,}), SGD 0.05 batch 128 on 20,000 {source}; "
        f"K = 10 on {n_sub} examples (5%) after each epoch"
    )
    rows = []
    for e in range(1, num_epochs + 1):
        t0 = time.perf_counter()
        params = jax.block_until_ready(epoch(params, xs, ys, jax.random.key(e)))
        t_epoch = time.perf_counter() - t0
        mw = warm.measure(params, e)
        cold.vectors = None  # a cold start every time
        mc = cold.measure(params, e)
        rows.append(
            (t_epoch, mw["hessian/seconds"], mw["hessian/num_hvps"], mc["hessian/num_hvps"])
        )
        print(
            f"epoch {e}: epoch {t_epoch:.2f} s, tracking {mw['hessian/seconds']:.2f} s "
            f"(warm {mw['hessian/num_hvps']} HVPs, cold {mc['hessian/num_hvps']}), "
            f"lambda_1 {mw['hessian/lambda_1']:.3f}"
        )
    rows = np.asarray(rows)
    print(
        f"RATIO tracking/epoch time = {rows[:, 1].mean() / rows[:, 0].mean():.2f} (target <= 0.3);"
        f" HVPs per call warm {rows[:, 2].mean():.1f} vs cold {rows[:, 3].mean():.1f}"
    )


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp

    global WIDTHS
    WIDTHS = (784,) + (FLAGS.width,) * 5 + (10,)
    print(f"devices: {jax.devices()}")
    layers, x, y = make_problem(FLAGS.examples, FLAGS.width)
    params = jax.tree.map(jnp.asarray, layers)
    batches = {"x": jnp.asarray(x)[None], "y": jnp.asarray(y)[None]}
    if "core" in FLAGS.sections:
        bench_core(params, batches, [int(s) for s in FLAGS.steps], FLAGS.repeats)
    if "matfree" in FLAGS.sections:
        bench_vs_matfree(FLAGS.repeats)
    if "tracking" in FLAGS.sections:
        bench_tracking()
    if FLAGS.pyhessian_python:
        bench_vs_pyhessian(layers, x, y, params, batches, FLAGS.pyhessian_python)
    else:
        print("(PyHessian comparison skipped: pass --pyhessian_python)")
    sys.stdout.flush()


if __name__ == "__main__":
    define_flags()
    app.run(quiet(main))
