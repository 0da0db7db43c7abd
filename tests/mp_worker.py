"""One process of a multi-process test (`tests/mp_harness.py`): joins the launch named by
the environment (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``; a
launch of one process does not initialise the runtime), runs a scenario and prints its
numbers as ``RESULT {json}`` (process 0's numbers and every process's, compared by the test
with a one-process launch on as many devices).

    python tests/mp_worker.py library
    python tests/mp_worker.py module experiments.keskar --config=... --multihost

``module`` runs an entry point as ``python -m`` would, and prints ``WROTE [paths]``: every
file the process opened for writing or moved into place from Python (results, reports,
figures, metrics; orbax writes its checkpoints from C++ and is not listed).
"""

from __future__ import annotations

import json
import os
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def join() -> tuple[int, int]:
    n = int(os.environ.get("JAX_NUM_PROCESSES", "1"))
    if n > 1:
        from experiments.cli import multihost_arguments

        jax.distributed.initialize(**multihost_arguments({}, os.environ))
    return jax.process_index(), jax.process_count()


def emit(**values) -> None:
    print("RESULT " + json.dumps(values), flush=True)


def library() -> None:
    """Curvature, GGN and gradient noise of a small float64 MLP with the example axis of the
    batches split across processes (each process holds its half: a global array from
    ``make_array_from_process_local_data``), then with the parameters sharded along D."""

    jax.config.update("jax_enable_x64", True)
    pid, count = join()
    emit(**numbers(pid, count))


def numbers(pid: int, count: int) -> dict:
    """`library`'s numbers, as process ``pid`` of ``count`` (float64 must be on)."""
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from sharp_minima import gradients, hessian, operators, tracking

    rng = np.random.default_rng(0)
    nb, bs, din, width, classes = 2, 16, 8, 8, 3
    x = rng.standard_normal((nb, bs, din))
    y = rng.integers(0, classes, (nb, bs))
    params = {
        "w1": rng.standard_normal((din, width)) / np.sqrt(din),
        "b1": np.zeros(width),
        "w2": rng.standard_normal((width, classes)) / np.sqrt(width),
    }

    def model(p, batch):
        return jnp.tanh(batch["x"] @ p["w1"] + p["b1"]) @ p["w2"]

    def loss(p, batch):
        logits = model(p, batch)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], 1))

    mesh = Mesh(np.array(jax.devices()), ("data",))
    split = NamedSharding(mesh, P(None, "data"))  # the example axis of every batch
    per = bs // count
    mine = slice(pid * per, (pid + 1) * per)
    batches = {
        "x": jax.make_array_from_process_local_data(split, x[:, mine], x.shape),
        "y": jax.make_array_from_process_local_data(split, y[:, mine], y.shape),
    }
    out = {}
    key = jax.random.key(1)
    for name, op in (("hessian", hessian.Curvature(loss)), ("ggn", operators.GGN(model))):
        top = op.eigenpairs(params, batches, k=3, key=key, tol=1e-10)
        tr = op.trace(params, batches, key=key, num_matvecs=30)
        dens = op.spectral_density(
            params, batches, key=key, num_probes=2, num_steps=8, num_points=50
        )
        out[name] = {
            "eigenvalues": np.asarray(top.values).tolist(),
            "trace": float(tr.value),
            "trace_se": float(tr.stderr),
            "density": np.asarray(dens.density).tolist(),
        }
    noise = gradients.GradientNoise(loss).measure(params, batches)
    out["noise"] = {
        "b_simple": float(noise.total.b_simple),
        "trace_cov": float(noise.total.trace_cov),
        "grad_norm_sq": float(noise.total.grad_norm_sq),
        "layers": {k: float(v.trace_cov) for k, v in noise.layers.items()},
    }
    tracker = tracking.NoiseTracker(
        loss, batches, key=jax.random.key(2), batch_size=4, learning_rate=0.1, num_examples=nb * bs
    )
    out["tracker"] = {k: float(v) for k, v in tracker.measure(params, 0).items()}
    # The parameters sharded along D over every device of every process (FSDP-style).
    rows = NamedSharding(mesh, P("data"))
    sharded = dict(
        params, w1=jax.make_array_from_callback((din, width), rows, lambda i: params["w1"][i])
    )
    curv = hessian.Curvature(loss)
    top = curv.eigenpairs(sharded, batches, k=3, key=key, tol=1e-10)
    out["sharded_eigenvalues"] = np.asarray(top.values).tolist()
    basis = curv.lanczos(sharded, batches, num_steps=8, key=key).basis  # its columns split too
    out["sharded_basis"] = {
        "devices": len(basis.sharding.device_set),
        "columns_here": [s.data.shape[1] for s in basis.addressable_shards],
    }
    out["population"] = population(x, y, params, model, loss)
    return dict(process=pid, processes=count, devices=jax.device_count(), **out)


def population(x, y, params, model, loss) -> dict:
    """6 members (learning rates 0.05 … 0.3) trained for an epoch of 4 steps by a
    `dynamics.PopulationTrainer` on every device of every process (padded to a multiple of
    them), then evaluated: each member's losses and final accuracy."""
    import jax.numpy as jnp
    import numpy as np
    import optax

    from sharp_minima import dynamics

    def accuracy(p, data):
        return {"accuracy": jnp.mean(jnp.argmax(model(p, data), -1) == data["y"])}

    members = 6
    trainer = dynamics.PopulationTrainer(loss, optax.sgd, metrics_fn=accuracy)
    stacked = jax.tree.map(lambda a: np.repeat(a[None], members, 0), params)
    state = trainer.init(stacked, learning_rates=np.linspace(0.05, 0.3, members))
    data = {"x": x.reshape(-1, x.shape[-1]), "y": y.reshape(-1)}
    order = np.random.default_rng(3).integers(0, len(data["y"]), (members, 4, 8))
    stacked, state, losses = trainer.epoch(stacked, state, data, order)
    return {
        "devices": trainer.mesh.size,
        "losses": np.asarray(losses).tolist(),
        "accuracy": np.asarray(trainer.evaluate(stacked, data)["accuracy"]).tolist(),
        "lr": np.asarray(trainer.learning_rates(state)).tolist(),
    }


def module() -> None:
    import atexit
    import builtins
    import runpy

    wrote, real_open = [], builtins.open

    def watched(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and isinstance(file, str | os.PathLike):
            wrote.append(os.fspath(file))
        return real_open(file, mode, *args, **kwargs)

    builtins.open = watched
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):  # atomic writes: mkstemp, then os.replace
        wrote.append(os.fspath(dst))
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace
    atexit.register(lambda: print("WROTE " + json.dumps(sorted(set(wrote))), flush=True))
    name = sys.argv[2]
    sys.argv = [name.replace(".", "/") + ".py", *sys.argv[3:]]
    runpy.run_module(name, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    {"library": library, "module": module}[sys.argv[1]]()
