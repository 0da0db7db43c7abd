"""Curvature demo: train a small MLP on MNIST-1D and watch its Hessian (``configs/curvature_demo``).

The run is `sharp_minima.train.train` with a `sharp_minima.tracking.EigenTracker` hook: the
top ``curvature.k`` eigenvalues every ``curvature.every_steps`` steps (warm-started Lanczos,
as in Jastrzębski et al. 2019). At the end, with the same `sharp_minima.hessian.Curvature`:
the top and bottom eigenpairs, the trace (Hutch++), the Frobenius norm (Hutchinson and
top-k) and the spectral density (SLQ), cached in ``measure.json``. Writes ``report.md``,
``results.json``, ``tracking.{png,pdf}`` and ``spectrum.{png,pdf}`` into the workdir;
re-running resumes the training and recomputes nothing that is done.

The curvature loss: mean cross-entropy on a fixed subset of ``curvature.examples`` training
examples, evaluation mode (this model has no BatchNorm or dropout), no regulariser.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from sharp_minima import data as data_lib
from sharp_minima import losses, plotting, tracking, train
from sharp_minima.studies import runs
from sharp_minima.studies.common import key_streams
from sharp_minima.studies.sections import Section, Study, contract_functions


def validate(config) -> None:
    """Raises train.ConfigError for a config without a sensible ``curvature`` section."""
    if "curvature" not in config:
        raise train.ConfigError(f"config {config.name!r} has no 'curvature' section")
    train.validate_config(config)
    for name in ("k", "every_steps", "examples", "final_k"):
        train.check_numbers(config, f"curvature.{name}", low=1, integer=True)


def section_run(ctx) -> dict:
    """Trains with the tracking hook, then measures the final Hessian."""
    config, workdir, data, log = ctx.config, ctx.workdir, ctx.data, ctx.log
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
    model = train.build_model(config, data)
    loss = losses.evaluation_loss(model)
    tracker = tracking.EigenTracker(
        loss, batches, key=keys["curvature/lanczos"], k=c.k, weights=weights, wrt="^params/"
    )
    result = train.train(
        train.setup(config, data=data, model=model),
        workdir,
        log=log,
        hooks=[train.Hook(tracker, every_steps=c.every_steps, name=tracker.name)],
    )
    # The tracked values come from metrics.jsonl, so a resumed run keeps the earlier ones.
    steps, tracked = runs.series(runs.read_metrics(workdir), "hessian/lambda_")
    tracked = dict(zip(steps.tolist(), tracked.tolist()))
    final_step = int(result.state.step)
    params, curv = result.state.variables(), tracker.curvature
    cache = runs.Cache(os.path.join(workdir, "measure.json"))
    key = {"step": final_step, "curvature": c.to_dict()}
    if final_step not in tracked:

        def final_tracked():
            m = tracker.measure(params, final_step)
            return [m[f"hessian/lambda_{i + 1}"] for i in range(c.k)]

        tracked[final_step] = cache.get("final_tracked", key, final_tracked)

    done = []  # the final measurements, computed at most once (numbers and density)

    def final_hessian():
        if done:
            return done[0]
        log("measuring the final Hessian ...")
        k1, k2, k3, k4 = jax.random.split(keys["curvature/final"], 4)
        top = curv.eigenpairs(params, batches, k=c.final_k, key=k1, weights=weights)
        bottom = curv.eigenpairs(params, batches, k=3, key=k1, which="SA", weights=weights)
        tr = curv.trace(params, batches, key=k2, num_matvecs=150, weights=weights)
        fro = curv.frobenius_norm(params, batches, key=k3, num_matvecs=100, weights=weights)
        fro_top = curv.frobenius_norm(
            params, batches, key=k3, method="top_k", k=20, weights=weights
        )
        density = curv.spectral_density(
            params, batches, key=k4, num_probes=8, num_steps=60, weights=weights
        )
        out = (
            {
                "hessian/top_eigenvalues": top.values,
                "hessian/top_residuals": top.residuals,
                "hessian/bottom_eigenvalues": bottom.values,
                "hessian/trace": tr._asdict(),
                "hessian/frobenius_hutchinson": fro._asdict(),
                "hessian/frobenius_top20": fro_top._asdict(),
            },
            {"grid": density.grid, "density": density.density},
        )
        done.append(out)
        return out

    steps = sorted(tracked)
    results = {
        "train/accuracy": result.final["train/accuracy"],
        "test/accuracy": result.final["test/accuracy"],
        "curvature_loss": f"mean cross-entropy on {c.examples} training examples, eval mode",
        "num_params": int(sum(p.size for p in jax.tree.leaves(result.state.params))),
        **cache.get("final_hessian", key, lambda: final_hessian()[0]),
        "hessian/density": cache.arrays("density", key, lambda: final_hessian()[1]),
        "tracking": {"steps": steps, "top_eigenvalues": [tracked[s] for s in steps]},
    }
    top, bottom = results["hessian/top_eigenvalues"], results["hessian/bottom_eigenvalues"]
    tr, fro = results["hessian/trace"], results["hessian/frobenius_hutchinson"]
    log(f"train acc {results['train/accuracy']:.3f}  test acc {results['test/accuracy']:.3f}")
    log(f"top eigenvalues {np.round(top, 4).tolist()}")
    log(f"bottom eigenvalues {np.round(bottom, 5).tolist()}")
    log(
        f"trace {tr['value']:.3f} ± {tr['stderr']:.3f}   ||H||_F {fro['value']:.3f} ± "
        f"{fro['stderr']:.3f} (top-20: {results['hessian/frobenius_top20']['value']:.3f})"
    )
    return results


def section_figures(config, results: dict) -> dict:
    """``tracking`` and ``spectrum``."""
    t = results["tracking"]
    return {
        "tracking": plotting.tracking_figure(
            t["steps"], t["top_eigenvalues"], title=f"{config.name}: top Hessian eigenvalues"
        ),
        "spectrum": plotting.spectrum_figure(
            results["hessian/density"], results["hessian/top_eigenvalues"]
        ),
    }


def report(config, results: dict) -> list[str]:
    """The run, the curvature loss and the final Hessian's numbers."""
    tr, fro = results["hessian/trace"], results["hessian/frobenius_hutchinson"]
    top = ", ".join(f"{v:.4g}" for v in results["hessian/top_eigenvalues"])
    bottom = ", ".join(f"{v:.3g}" for v in results["hessian/bottom_eigenvalues"])
    return [
        f"{config.model.name} {dict(config.model.kwargs)} ({results['num_params']} "
        f"parameters) on {config.data.name}, {train.plural(config.num_epochs, 'epoch')}: "
        "train accuracy "
        f"{100 * results['train/accuracy']:.2f}%, test {100 * results['test/accuracy']:.2f}%. "
        f"Curvature loss: {results['curvature_loss']}.",
        "",
        "| quantity | value |",
        "| --- | --- |",
        f"| top eigenvalues | {top} |",
        f"| bottom eigenvalues | {bottom} |",
        f"| trace (Hutch++) | {tr['value']:.4g} ± {tr['stderr']:.2g} |",
        f"| ‖H‖_F (Hutchinson) | {fro['value']:.4g} ± {fro['stderr']:.2g} |",
        f"| ‖H‖_F (top 20) | {results['hessian/frobenius_top20']['value']:.4g} |",
    ]


STUDY = Study(
    name="curvature_demo",
    title=lambda config: f"Curvature demo — {config.name}",
    sections=(
        Section(
            name="curvature_demo",
            title="The Hessian along training",
            run=section_run,
            report=report,
            figures=section_figures,
        ),
    ),
    validate=validate,
)


run, claims, figures, report_markdown = contract_functions(
    STUDY,
    __name__,
    run="""Trains with the tracking hook, measures the final Hessian, writes results and
    figures.""",
    claims="""None: the demo reproduces no paper's claim.""",
    figures="""``tracking`` (the top eigenvalues along training) and ``spectrum`` (the final SLQ
    density with the top eigenvalues marked).""",
    report_markdown="""``report.md``: the run, the curvature loss and the final Hessian's
    numbers.""",
)
