"""Curvature demo: train a small MLP on MNIST-1D and watch its Hessian (``configs/curvature_demo``).

The run is `sharp_minima.train.train` with a `sharp_minima.tracking.EigenTracker` hook: the
top ``curvature.k`` eigenvalues every ``curvature.every_steps`` steps (warm-started Lanczos,
as in Jastrzębski et al. 2019). At the end, with the same `sharp_minima.hessian.Curvature`:
the top and bottom eigenpairs, the trace (Hutch++), the Frobenius norm (Hutchinson and
top-k) and the spectral density (SLQ). Writes ``results.json``, ``tracking.{png,pdf}`` and
``spectrum.{png,pdf}`` into the workdir; re-running resumes the training.

The curvature loss: mean cross-entropy on a fixed subset of ``curvature.examples`` training
examples, evaluation mode (this model has no BatchNorm or dropout), no regulariser.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from sharp_minima import data as data_lib
from sharp_minima import files, losses, plotting, tracking, train
from sharp_minima.studies.common import key_streams


def validate(config) -> None:
    """Raises train.ConfigError for a config without a sensible ``curvature`` section."""
    if "curvature" not in config:
        raise train.ConfigError(f"config {config.name!r} has no 'curvature' section")
    train.validate_config(config)
    for name in ("k", "every_steps", "examples", "final_k"):
        if config.curvature[name] < 1:
            raise train.ConfigError(
                f"config.curvature.{name} must be >= 1, got {config.curvature[name]}"
            )


def run(config, workdir: str, *, data=None, log=print) -> dict:
    """Trains with the tracking hook, measures the final Hessian, writes results and figures."""
    validate(config)
    with files.workdir_lock(workdir, log=log):
        return _run_locked(config, workdir, data, log)


def _run_locked(config, workdir, data, log) -> dict:
    data = train.load_data(config) if data is None else data
    c = config.curvature
    if c.examples > len(data.x_train):
        raise train.ConfigError(
            f"config.curvature.examples={c.examples} exceeds the {len(data.x_train)} training "
            "examples"
        )
    keys = key_streams(config.seed, "curvature/subset", "curvature/lanczos", "curvature/final")
    batches, weights = data_lib.curvature_batches(
        keys["curvature/subset"],
        data.x_train,
        data.y_train,
        num_examples=c.examples,
        batch_size=c.examples,
    )
    loss = losses.evaluation_loss(train.build_model(config, data))
    tracker = tracking.EigenTracker(
        loss, batches, key=keys["curvature/lanczos"], k=c.k, weights=weights, wrt="^params/"
    )
    result = train.train(
        config, workdir, data=data, log=log, hooks=[train.Hook(tracker, every_steps=c.every_steps)]
    )
    # The tracked values come from metrics.jsonl, so a resumed run keeps the earlier ones.
    records = train.MetricsLog(os.path.join(workdir, "metrics.jsonl")).records()
    tracked = {
        r["step"]: [r[f"hessian/lambda_{i + 1}"] for i in range(c.k)]
        for r in records
        if "hessian/lambda_1" in r
    }
    final_step = int(result.state.step)
    if final_step not in tracked:
        m = tracker.measure(result.state.variables(), final_step)
        tracked[final_step] = [m[f"hessian/lambda_{i + 1}"] for i in range(c.k)]
    log("measuring the final Hessian ...")
    params, curv, key = result.state.variables(), tracker.curvature, keys["curvature/final"]
    k1, k2, k3, k4 = jax.random.split(key, 4)
    top = curv.eigenpairs(params, batches, k=c.final_k, key=k1, weights=weights)
    bottom = curv.eigenpairs(params, batches, k=3, key=k1, which="SA", weights=weights)
    tr = curv.trace(params, batches, key=k2, num_matvecs=150, weights=weights)
    fro = curv.frobenius_norm(params, batches, key=k3, num_matvecs=100, weights=weights)
    fro_top = curv.frobenius_norm(params, batches, key=k3, method="top_k", k=20, weights=weights)
    density = curv.spectral_density(
        params, batches, key=k4, num_probes=8, num_steps=60, weights=weights
    )
    steps = sorted(tracked)
    tracked = np.asarray([tracked[s] for s in steps])
    results = {
        "train/accuracy": result.final["train/accuracy"],
        "test/accuracy": result.final["test/accuracy"],
        "curvature_loss": f"mean cross-entropy on {c.examples} training examples, eval mode",
        "num_params": int(sum(p.size for p in jax.tree.leaves(result.state.params))),
        "hessian/top_eigenvalues": top.values,
        "hessian/top_residuals": top.residuals,
        "hessian/bottom_eigenvalues": bottom.values,
        "hessian/trace": tr._asdict(),
        "hessian/frobenius_hutchinson": fro._asdict(),
        "hessian/frobenius_top20": fro_top._asdict(),
        "hessian/num_traces": curv.num_traces,
        "tracking": {"steps": steps, "top_eigenvalues": tracked},
    }
    if jax.process_index() == 0:
        files.write_json(os.path.join(workdir, "results.json"), results)
        plotting.save(
            plotting.tracking_figure(
                steps, tracked, title=f"{config.name}: top Hessian eigenvalues"
            ),
            workdir,
            "tracking",
        )
        plotting.save(plotting.spectrum_figure(density, top.values), workdir, "spectrum")
    log(f"train acc {results['train/accuracy']:.3f}  test acc {results['test/accuracy']:.3f}")
    log(f"top eigenvalues {np.round(top.values, 4).tolist()}")
    log(f"bottom eigenvalues {np.round(bottom.values, 5).tolist()}")
    log(
        f"trace {tr.value:.3f} ± {tr.stderr:.3f}   ||H||_F {fro.value:.3f} ± {fro.stderr:.3f}"
        f" (top-20: {fro_top.value:.3f})"
    )
    log(f"wrote {workdir}/results.json, tracking.png/pdf, spectrum.png/pdf")
    return results
