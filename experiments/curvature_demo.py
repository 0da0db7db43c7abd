r"""Curvature demo: train a small MLP on MNIST-1D and measure its Hessian.

    python -m experiments.curvature_demo --workdir=runs/curvature_demo

MNIST-1D is generated procedurally by the `mnist1d` package (no download). The run trains a
40-128-128-10 tanh MLP with Adam, tracks the top Hessian eigenvalues along training (warm-started
Lanczos, as in Jastrzębski et al. 2019), and at the end measures the top and bottom eigenpairs,
the trace (Hutch++), the Frobenius norm (Hutchinson and top-k) and the spectral density (SLQ).
Writes `results.json`, `tracking.{png,pdf}` and `spectrum.{png,pdf}` into the workdir.

The curvature loss is the mean cross-entropy over a fixed 1024-example subset of the training
set (no regulariser; the model has no BatchNorm or dropout).
"""

from __future__ import annotations

import os
import time

from absl import flags

from experiments import cli

flags.DEFINE_string("workdir", "runs/curvature_demo", "Output folder.")
flags.DEFINE_integer("steps", 3000, "Training steps.")
flags.DEFINE_integer("batch_size", 128, "Training batch size.")
flags.DEFINE_float("lr", 1e-3, "Adam learning rate.")
flags.DEFINE_integer("seed", 0, "Root random seed.")
flags.DEFINE_integer("track_every", 500, "Steps between eigenvalue measurements.")
flags.DEFINE_integer("k", 5, "Number of top eigenvalues to track.")
flags.DEFINE_integer("curvature_examples", 1024, "Training examples in the curvature loss.")
FLAGS = flags.FLAGS


def load_mnist1d(seed):
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    d = make_dataset(args)
    return (
        d["x"].astype("float32"),
        d["y"].astype("int32"),
        d["x_test"].astype("float32"),
        d["y_test"].astype("int32"),
    )


def init_mlp(key, sizes):
    import jax
    import jax.numpy as jnp

    params = []
    for k, (i, o) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
        params.append({"w": jax.random.normal(k, (i, o)) / jnp.sqrt(i), "b": jnp.zeros(o)})
    return params


def apply_mlp(params, x):
    import jax.numpy as jnp

    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def loss_fn(params, batch):
    """Mean cross-entropy of the MLP on ``batch = {"x", "y"}``."""
    import jax
    import jax.numpy as jnp

    logp = jax.nn.log_softmax(apply_mlp(params, batch["x"]))
    return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))


def main(argv):
    if len(argv) > 1:
        cli.usage_error(f"unexpected arguments: {argv[1:]}")
    for name in ("steps", "batch_size", "track_every", "k", "curvature_examples"):
        if getattr(FLAGS, name) < 1:
            cli.usage_error(f"--{name} must be positive, got {getattr(FLAGS, name)}")
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from sharp_minima import files, hessian, plotting

    print(f"devices: {jax.devices()}", flush=True)
    os.makedirs(FLAGS.workdir, exist_ok=True)
    x, y, x_test, y_test = load_mnist1d(FLAGS.seed)
    if FLAGS.curvature_examples > len(x):
        cli.usage_error(f"--curvature_examples must be <= {len(x)} (the training set size)")
    key = jax.random.key(FLAGS.seed)
    init_key, data_key, hess_key = jax.random.split(key, 3)
    params = init_mlp(init_key, (x.shape[1], 128, 128, 10))
    opt = optax.adam(FLAGS.lr)
    opt_state = opt.init(params)
    x, y = jnp.asarray(x), jnp.asarray(y)
    curv = jax.random.choice(data_key, len(x), (FLAGS.curvature_examples,), replace=False)
    curv_batches = {"x": x[curv][None], "y": y[curv][None]}

    @jax.jit
    def train_step(params, opt_state, x, y, step):
        idx = jax.random.randint(
            jax.random.fold_in(data_key, step), (FLAGS.batch_size,), 0, x.shape[0]
        )
        loss, grads = jax.value_and_grad(loss_fn)(params, {"x": x[idx], "y": y[idx]})
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def accuracy(params, x, y):
        return jnp.mean(jnp.argmax(apply_mlp(params, x), -1) == y)

    tracked_steps, tracked, vectors = [], [], None
    t0 = time.perf_counter()
    for step in range(FLAGS.steps + 1):
        if step % FLAGS.track_every == 0 or step == FLAGS.steps:
            out = hessian.eigenpairs(
                loss_fn,
                params,
                curv_batches,
                k=FLAGS.k,
                key=jax.random.fold_in(hess_key, step),
                init_vectors=vectors,
            )
            vectors = out.vectors
            tracked_steps.append(step)
            tracked.append(out.values)
            rate = step / max(time.perf_counter() - t0, 1e-9)
            eta = (FLAGS.steps - step) / rate if step else float("nan")
            train_loss = float(loss_fn(params, {"x": x, "y": y}))
            print(
                f"step {step:5d}/{FLAGS.steps}  train/loss {train_loss:.4f}"
                f"  hessian/lambda_max {out.values[0]:9.4f}  ({out.num_steps} Lanczos steps)"
                f"  {rate:6.1f} steps/s  ETA {eta:5.0f} s",
                flush=True,
            )
        if step < FLAGS.steps:
            params, opt_state, _ = train_step(params, opt_state, x, y, step)

    print("measuring the final Hessian ...", flush=True)
    top = hessian.eigenpairs(loss_fn, params, curv_batches, k=10, key=hess_key)
    bottom = hessian.eigenpairs(loss_fn, params, curv_batches, k=3, key=hess_key, which="SA")
    tr = hessian.trace(loss_fn, params, curv_batches, key=hess_key, num_matvecs=150)
    fro = hessian.frobenius_norm(loss_fn, params, curv_batches, key=hess_key, num_matvecs=100)
    fro_top = hessian.frobenius_norm(
        loss_fn, params, curv_batches, key=hess_key, method="top_k", k=20
    )
    density = hessian.spectral_density(
        loss_fn, params, curv_batches, key=hess_key, num_probes=8, num_steps=60
    )
    results = {
        "train/accuracy": float(accuracy(params, x, y)),
        "eval/accuracy": float(accuracy(params, jnp.asarray(x_test), jnp.asarray(y_test))),
        "curvature_loss": f"mean cross-entropy on {FLAGS.curvature_examples} training examples",
        "num_params": int(sum(p.size for p in jax.tree.leaves(params))),
        "hessian/top_eigenvalues": top.values,
        "hessian/top_residuals": top.residuals,
        "hessian/bottom_eigenvalues": bottom.values,
        "hessian/trace": tr._asdict(),
        "hessian/frobenius_hutchinson": fro._asdict(),
        "hessian/frobenius_top20": fro_top._asdict(),
        "tracking": {"steps": tracked_steps, "top_eigenvalues": np.stack(tracked)},
    }
    files.write_json(os.path.join(FLAGS.workdir, "results.json"), results)
    plotting.save(
        plotting.tracking_figure(
            tracked_steps, np.stack(tracked), title="MNIST-1D MLP: top Hessian eigenvalues"
        ),
        FLAGS.workdir,
        "tracking",
    )
    plotting.save(plotting.spectrum_figure(density, top.values), FLAGS.workdir, "spectrum")
    print(f"train acc {results['train/accuracy']:.3f}  test acc {results['eval/accuracy']:.3f}")
    print(f"top eigenvalues {np.round(top.values, 4).tolist()}")
    print(f"bottom eigenvalues {np.round(bottom.values, 5).tolist()}")
    print(
        f"trace {tr.value:.3f} ± {tr.stderr:.3f}   ||H||_F {fro.value:.3f} ± {fro.stderr:.3f}"
        f" (top-20: {fro_top.value:.3f})"
    )
    print(f"wrote {FLAGS.workdir}/results.json, tracking.png/pdf, spectrum.png/pdf")


if __name__ == "__main__":
    cli.run(main)
