"""0. The swiss roll (Huang et al. 2020, Figs. 3, 5, 6): the authors' data and MLP, trained
naturally (β = 0) and with the anti-generalization loss (eq. 3) or label-flip poisoning for
several β, each run to a fit; per run the train/test accuracy, the basin radii along unit
directions and the log-volume below the loss cutoff, the gen-viz grid radius; the decision
boundaries, the filter-normalised surfaces around the good and the worst minimum, and the
radii and log-volume against β."""

from __future__ import annotations

import os
import warnings
import zlib

import jax
import numpy as np

from sharp_minima import data as data_lib
from sharp_minima import landscape, train
from sharp_minima.studies import claims as claims_lib
from sharp_minima.studies import runs
from sharp_minima.studies.claims import (
    Claim,
    accuracy_noise,
    all_of,
    ordered,
    seed_noise,
    verdict,
)
from sharp_minima.studies.common import key_streams
from sharp_minima.studies.sections import Section, section_names
from sharp_minima.studies.visualize_generalization import swissroll_figures, training
from sharp_minima.studies.visualize_generalization.swissroll_figures import by_beta

# The paper's numbers (Huang et al. 2020).
PAPER = {
    "swissroll_good_test": 98.5,  # Fig. 1: the final SGD iterate
    "swissroll_bad_test_below": 53.0,  # Fig. 1: every bad minimum near the SGD path
    "svhn_good_test": 97.1,  # Sec. 4, ResNet-18
    "svhn_bad_test": 28.2,
    "svhn_volume_orders": 10_000,  # "at least 10,000 orders of magnitude" (Sec. 5)
    "cifar_linear_test": 49.0,  # Sec. 2: linear model on pixels + pairwise products
    "cifar_resnet_test": 92.0,
}
H20 = "Huang et al. 2020"
FITS = Claim(
    statement="every network, natural and poisoned, fits the training set",
    source=f"{H20}, Sec. 3 (every minimum 'above 99.5 %' train accuracy)",
    quantity="runs that reach fit.accuracy and the loss cutoff within the cap",
    noise=claims_lib.SOLVER,
    threshold="fit.accuracy",
    origin="the paper: 'above 99.5 %'",
)
GENERALIZES = Claim(
    statement="a natural (β = 0) swiss-roll minimum generalizes",
    source=f"{H20}, Fig. 1 (98.5 % test)",
    quantity="lowest natural test accuracy − good_test",
    noise=claims_lib.SEEDS,
    threshold="poison.claims.good_test",
    origin="the paper's 98.5 %, with room for our smaller data",
    min_seeds=3,
)
POISONED_WORSE = Claim(
    statement="poisoned minima fit the training set and generalize worse",
    source=f"{H20}, Sec. 3 and Fig. 1",
    quantity="per β > 0: train accuracy ≥ fit.accuracy and natural − poisoned test accuracy",
    noise=claims_lib.SEEDS,
    min_seeds=3,
)
TEST_FALLS = Claim(
    statement="test accuracy decreases as β grows",
    source=f"{H20}, Sec. 3 (poisoning strength)",
    quantity="successive test accuracies, predicted decreasing in β",
    noise=claims_lib.SEEDS,
    min_seeds=3,
)
VOLUME_FALLS = Claim(
    statement="the basin's log-volume is smaller for poisoned minima and decreases as β grows",
    source=f"{H20}, Sec. 5 (volumes ≥ 10,000 orders of magnitude apart on SVHN)",
    quantity="successive mean log-volumes, predicted decreasing in β",
    noise=claims_lib.SEEDS,
    min_seeds=3,
)
VOLUME_TRACKS_TEST = Claim(
    statement="log-volume falls as the test accuracy falls (positive correlation)",
    source=f"{H20}, Sec. 5",
    quantity="Pearson r of test accuracy and log-volume over the fitted runs, predicted > 0",
    noise=claims_lib.CLUSTERS,
)


def run(ctx) -> dict:
    """Natural and poisoned minima for every β and seed: accuracies, radii, log-volumes;
    surfaces around the good and the worst minimum; decision boundaries."""
    config, data = ctx.config, ctx.data
    p = config.poison
    model = train.build_model(config, data)
    geometry = training.Geometry(model, config)
    keys = key_streams(config.seed, "huang/volume", "huang/surface")
    batches, weights = data_lib.all_batches(data.x_train, data.y_train)
    records, boundaries, surfaces = [], {}, {}
    for beta in p.betas:
        for seed in range(config.seed, config.seed + p.seeds):
            result, record = _fit_one(ctx, model, beta, seed)
            records.append(record)
            if result is None:
                continue
            variables = result.state.variables()
            name = f"beta{beta:g}/seed{seed}"
            key = jax.random.fold_in(keys["huang/volume"], zlib.crc32(name.encode()))
            cache = runs.Cache(
                os.path.join(runs.run_dir(ctx.workdir, "swissroll", name), "measure.json")
            )

            def measure(variables=variables, key=key, beta=beta, seed=seed, acc=record):
                ctx.log(
                    f"[swissroll {beta=:g} {seed=}] basin radii along "
                    f"{config.volume.num_directions} directions"
                )
                return {**acc, **geometry.measure(variables, batches, weights, config, key)}

            if record["fitted"]:  # the did-not-fit record stays as it is, with no volume
                records[-1] = cache.get("measure", training.measure_key(config, result), measure)
            if seed == config.seed and config.data.name in ("swissroll", "rings"):
                boundaries[beta] = training.decision_grid(
                    model,
                    variables,
                    np.concatenate([data.x_train, data.x_test]),
                    config.surface.boundary_points,
                )
            if seed == config.seed and beta in (0.0, max(p.betas)):
                surfaces[beta] = cache.arrays(
                    "surface",
                    training.measure_key(config, result),
                    lambda v=variables: geometry.surface(
                        v, batches, weights, config, keys["huang/surface"]
                    ),
                )
    dims = [r["dim"] for r in records if "dim" in r]
    setup = {
        "data_note": f"{data.name} ({data.source}), {len(data.x_train)} train / "
        f"{len(data.x_test)} test",
        "dim": dims[0] if dims else "?",
        "num_test": len(data.x_test),
    }
    return {
        "records": records,
        "setup": setup,
        "boundaries": boundaries,
        "surfaces": surfaces,
        "data": (data.x_train, data.y_train),
    }


def _fit_one(ctx, model, beta: float, seed: int):
    """One run trained to a fit: ``(result, or None if it diverged; its record)``."""
    config, data, p = ctx.config, ctx.data, ctx.config.poison
    name = f"beta{beta:g}/seed{seed}"
    run_data = (
        data if beta == 0 or p.kind == "label_flip" else training.poisoned(data, p.num_points)
    )
    cfg = training.run_config(config, seed, n_train=len(run_data.x_train), to_fit=True)
    tsne = "tsne" in section_names(config.sections)
    hooks = [training.iterates_hook(config)] if beta == 0 and seed == config.seed and tsne else []
    result = training.fit(
        cfg,
        runs.run_dir(ctx.workdir, "swissroll", name),
        run_data,
        beta=beta,
        kind=p.kind,
        num_points=p.num_points,
        hooks=hooks,
        log=ctx.log,
        label=f"[swissroll {name}] ",
        n_t=len(data.x_train),
        model=model,
    )
    if isinstance(result, runs.Diverged):
        return None, {"beta": beta, "seed": seed, "diverged": True, "message": result.message}
    record = {
        "beta": beta,
        "seed": seed,
        "fitted": training.fitted(cfg, result),
        "epochs": training.epochs_trained(cfg, result, len(run_data.x_train)),
        "train_accuracy": float(result.final["train/accuracy"]),
        "train_loss": float(result.final["train/loss"]),
        "test_accuracy": float(result.final["test/accuracy"]),
        "test_loss": float(result.final["test/loss"]),
    }
    if not record["fitted"]:  # reported as "did not fit", kept out of the volumes
        ctx.log(
            f"[swissroll {name}] did not fit in {config.num_epochs} epochs: train "
            f"accuracy {100 * record['train_accuracy']:.1f} %, loss {record['train_loss']:.3g}"
        )
    return result, record


def claims(config, res) -> list:
    """Accuracies differ only beyond 2 noise units (the standard error over seeds with the
    t-quantile, with the test set's sampling error), log-volumes beyond 2 units over seeds;
    the correlation's error is a bootstrap over the β clusters, not over runs."""
    every = res["records"]
    unfit = [r for r in every if not r.get("fitted", True) and "test_accuracy" in r]
    fit_runs = [r for r in every if "test_accuracy" in r]
    did_not = "; did not fit: " + ", ".join(
        f"β={r['beta']:g} seed {r['seed']} (train {100 * r['train_accuracy']:.1f} %, loss "
        f"{r['train_loss']:.3g})"
        for r in unfit
    )
    margin = (1.0 if not unfit else -1.0) if fit_runs else float("nan")
    out = [
        FITS.test(
            margin,
            0.0,
            f"{len(fit_runs) - len(unfit)}/{len(fit_runs)} runs fitted (≥ "
            f"{100 * config.fit.accuracy:g} % train, loss < {config.volume.cutoffs[0]:g}; cap "
            f"{config.num_epochs} epochs)" + (did_not if unfit else ""),
        )
    ]
    return out + _accuracy_claims(config, res) + _volume_claims(config, res)


def _accuracies(config, res):
    """Test and train accuracy by β over the fitted runs, their noise, and the note on
    β without a fitted run."""
    recs = [r for r in res["records"] if r.get("fitted", True)]  # volumes exist only for these
    num_test = res["setup"].get("num_test") or 0
    test_stats = by_beta(recs, "test_accuracy")
    noise = {
        b: claims_lib.combined(
            seed_noise(v), accuracy_noise(v["mean"], num_test) if num_test else 0.0
        )
        for b, v in test_stats.items()
    }
    betas = sorted(float(b) for b in config.poison.betas)
    gone = [b for b in betas if b not in test_stats]
    missing = f" — not tested: no run of β = {gone} fitted (or all diverged)" if gone else ""
    return recs, test_stats, noise, betas, missing


def _accuracy_claims(config, res) -> list:
    recs, test_stats, noise, betas, missing = _accuracies(config, res)
    test = {b: v["mean"] for b, v in test_stats.items()}
    tr = {b: v["mean"] for b, v in by_beta(recs, "train_accuracy").items()}
    nan = float("nan")
    good_stats = test_stats.get(0.0, {"mean": nan, "min": nan, "n": 0})
    good = good_stats["mean"]
    bad = [b for b in betas if b > 0]
    parts = []
    for b in bad:
        fits = tr.get(b, nan) < 1
        parts.append(verdict(tr.get(b, nan) - config.fit.accuracy, 0.0) if fits else "yes")
        parts.append(verdict(good - test.get(b, nan), claims_lib.combined(
            noise.get(0.0, nan), noise.get(b, nan))))  # fmt: skip
    seen = [b for b in betas if b in test]
    seeds = min((v["n"] for v in test_stats.values()), default=0) if not missing else 0
    good_test = config.poison.claims.good_test
    return [
        GENERALIZES.test(
            good_stats["min"] - good_test,
            noise.get(0.0, nan),
            f"test accuracy {100 * good:.1f} % (min {100 * good_stats['min']:.1f} %, "
            f"{train.plural(good_stats['n'], 'run')}; threshold {100 * good_test:g} %; paper "
            "98.5 %)" + missing,
            seeds=good_stats["n"],
        ),
        POISONED_WORSE.given(
            all_of(parts),
            "; ".join(
                f"β={b:g}: train {100 * tr[b]:.1f} %, test {100 * test[b]:.1f} %"
                for b in bad
                if b in test
            )
            + " (paper: bad minima below 53 % vs 98.5 %)"
            + missing,
            seeds=seeds,
        ),
        TEST_FALLS.given(
            ordered(
                [test.get(b, nan) for b in betas],
                [noise.get(b, nan) for b in betas],
                decreasing=True,
            ),
            ", ".join(f"{100 * test[b]:.1f} %" for b in seen)
            + f" for β = {seen} (noise unit "
            + ", ".join(f"{100 * noise[b]:.1f}" for b in seen)
            + " points)"
            + missing,
            seeds=seeds,
        ),
    ]


def _volume_claims(config, res) -> list:
    recs, _, _, betas, missing = _accuracies(config, res)
    c = config.volume.cutoffs[0]
    logv_stats = by_beta(recs, f"log_volume_{c:g}")
    lv = [logv_stats[b]["mean"] if b in logv_stats else float("nan") for b in betas]
    seeds = min((v["n"] for v in logv_stats.values()), default=0) if not missing else 0
    out = [
        VOLUME_FALLS.given(
            ordered(lv, [seed_noise(logv_stats.get(b)) for b in betas], decreasing=True),
            ", ".join(f"{v:.1f}" for v in lv)
            + f" for β = {betas} (loss < {c:g}; natural log; mean over seeds; paper: SVHN "
            "volumes ≥ 10,000 orders of magnitude apart)" + missing,
            seeds=seeds,
        )
    ]
    runs_ = [r for r in recs if f"log_volume_{c:g}" in r]
    if len(runs_) >= 4:  # a correlation over fewer runs says nothing
        acc = np.array([r["test_accuracy"] for r in runs_])
        vol = np.array([r[f"log_volume_{c:g}"] for r in runs_])
        pearson = lambda i: float(np.corrcoef(acc[i], vol[i])[0, 1])  # noqa: E731
        clusters = [r["beta"] for r in runs_]
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # constant values: r is NaN
            corr = pearson(np.arange(len(runs_)))
            noise = claims_lib.cluster_bootstrap(pearson, clusters, seed=config.seed)
        out.append(
            VOLUME_TRACKS_TEST.test(
                corr,
                noise,
                f"Pearson r = {corr:.2f} over {len(runs_)} runs in {len(set(clusters))} β "
                f"clusters (bootstrap over clusters: ±{noise:.2f}; fewer than 3 clusters: "
                "not tested)",
            )
        )
    return out


def _mean(values, digits, scale=1.0):
    return f"{scale * np.mean(values):.{digits}f}" if values else "—"


def _one_run_error(stderrs, effective) -> str:
    """One run's error of log V, or "undetermined" when too few directions carry it."""
    if not effective or np.mean(effective) < landscape.MIN_EFFECTIVE_DIRECTIONS:
        return landscape.UNDETERMINED if effective else "—"
    return f"± {np.nanmean(stderrs):.2f}"


def report(config, res) -> list:
    s, records = res["setup"], res["records"]
    c, v = config.volume.cutoffs[0], config.volume
    lines = [
        f"Data: {s['data_note']}. Model {config.model.name} {dict(config.model.kwargs)}, "
        f"{config.optim.name} lr {config.optim.learning_rate:g}, gradient clipping "
        f"{config.optim.grad_clip_norm:g}, "
        f"{training.fit_phrase(config, config.eval_every_epochs, config.num_epochs)}, poisoning "
        f"{config.poison.kind} with |D_d| = {config.poison.num_points}, "
        f"{train.plural(config.poison.seeds, 'run')} per β. Basin: training loss "
        f"(evaluation mode) below {c:g} along {v.num_directions} unit directions in all "
        f"{s['dim']} parameters; radii by bisection to rtol {v.rtol:g}. Grid radius: the "
        f"authors' gen-viz radius (cross-entropy {v.grid_cutoff:g} on a power-5 grid of "
        f"{v.grid_points} points up to {v.grid_max:g}, filter-normalised directions). A run "
        "that reaches the cap without fitting is counted under *did not fit* and has no volume.",
        "",
        "| β | fitted | epochs to fit | train acc % | test acc % | log V (min–max) | "
        "± runs (std) | error of one run | effective directions | mean radius | grid radius |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for b in sorted({r["beta"] for r in records if "test_accuracy" in r}):
        every = [r for r in records if r["beta"] == b and "test_accuracy" in r]
        rs = [r for r in every if r.get("fitted", True)]
        f = lambda k, rs=rs: [r[k] for r in rs if k in r]  # noqa: E731
        lv = f(f"log_volume_{c:g}")
        eff_b = f(f"effective_directions_{c:g}")
        ep = [r["epochs"] for r in rs if "epochs" in r]
        lines.append(
            f"| {b:g} | {len(rs)}/{len(every)} | "
            + (f"{min(ep)}–{max(ep)}" if ep else "—")
            + f" | {_mean(f('train_accuracy'), 1, 100)} | {_mean(f('test_accuracy'), 1, 100)} | "
            + (f"{np.mean(lv):.1f} ({min(lv):.1f}–{max(lv):.1f})" if lv else "—")
            + (f" | {np.std(lv, ddof=1):.0f}" if len(lv) > 1 else " | —")
            + f" | {_one_run_error(f(f'log_volume_stderr_{c:g}'), eff_b)}"
            f" | {_mean(eff_b, 2)} | "
            f"{_mean(f(f'radius_mean_{c:g}'), 3)} | {_mean(f('grid_radius_mean'), 3)} |"
        )
    for r in [r for r in records if not r.get("fitted", True) and "test_accuracy" in r]:
        lines.append(
            f"\nDid not fit: β = {r['beta']:g}, seed {r['seed']}: train "
            f"{100 * r['train_accuracy']:.1f} %, loss {r['train_loss']:.3g}, test "
            f"{100 * r['test_accuracy']:.1f} % after {r.get('epochs', '?')} epochs."
        )
    eff = [r.get(f"effective_directions_{c:g}") for r in records]
    eff = [e for e in eff if e is not None]
    return lines + [
        "",
        "**Error bars of log V.** log V = log ω_n + log mean rⁿ with n in the hundreds or "
        "thousands, so the largest radius decides the mean: the effective number of "
        f"directions 1/Σw² (w ∝ rⁿ) is {_mean(eff, 2)} here. Below "
        f"{landscape.MIN_EFFECTIVE_DIRECTIONS:g} effective directions one run's error is "
        f"*{landscape.UNDETERMINED}*: the delta method would read ±1 whatever the data, and "
        "the bootstrap over directions is bimodal (on whether a resample holds the largest "
        "radius), so neither is a standard error. The spread over runs is the error bar that "
        "means something for a comparison between β. The estimator is also biased low: "
        "E[rⁿ] lives in directions longer than any sampled.",
        "",
        "Paper: natural 98.5 % test (Fig. 1); bad minima below 53 %; SVHN "
        "ResNet-18 97.1 % vs 28.2 % with basins ≥ 10,000 orders of magnitude apart.",
    ]


def figures(config, res) -> dict:
    out = {}
    if res["boundaries"]:
        out["decision_boundaries"] = swissroll_figures.boundary_figure(
            res["boundaries"], res["records"], res["data"], seed=config.seed
        )
    if res["surfaces"]:
        out["surfaces"] = swissroll_figures.surface_figure(res["surfaces"])
    out["volume"] = swissroll_figures.volume_figure(res["records"], config)
    return out


SECTION = Section(
    name="swissroll",
    title="Swiss roll: natural vs poisoned minima (Figs. 3, 5, 6)",
    run=run,
    report=report,
    claims=claims,
    figures=figures,
)
