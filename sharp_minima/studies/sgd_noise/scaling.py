"""2. Linear scaling with warm-up (Goyal et al. 2017): batch kB₀ at rate kη₀, with no,
constant or gradual warm-up, against the baseline k = 1."""

from __future__ import annotations

import numpy as np
from matplotlib import ticker

from sharp_minima import plotting, train
from sharp_minima.studies import claims as claims_lib
from sharp_minima.studies.claims import (
    NO,
    NOT_TESTED,
    YES,
    Claim,
    accuracy_noise,
    all_of,
    verdict,
)
from sharp_minima.studies.common import markdown_table
from sharp_minima.studies.sections import Section
from sharp_minima.studies.sgd_noise import kit

# Goyal et al. (2017), Table 1 (ResNet-50, ImageNet, kn = 8k): top-1 error (%).
GOYAL_8K = {
    "baseline (kn = 256)": "23.60 ± 0.12",
    "no warm-up": "24.84 ± 0.37",
    "constant warm-up": "25.88 ± 0.56",
    "gradual warm-up": "23.74 ± 0.09",
}
ARMS = ("none", "constant", "gradual")
GOYAL = "Goyal et al. 2017, Sec. 2 and Table 1"
LINEAR_SCALING = Claim(
    statement="linear scaling (B = kB₀, η = kη₀, gradual warm-up) keeps the baseline's final "
    "test error up to some k* > 1 and not beyond",
    source=GOYAL + " (kept to 8k on ImageNet; breaks beyond)",
    quantity="k = 2's error within error_margin of the baseline's (TOST), and the largest k's "
    "beyond it",
    noise=claims_lib.SEEDS,
    min_seeds=3,
    equivalence="sgd_noise.scaling.claims.error_margin",
)
CURVES_MATCH = Claim(
    statement="training curves against epochs (after warm-up) match the baseline's up to k*",
    source=GOYAL + ", Fig. 2",
    quantity="median |Δ log loss| of the mean curves below curve_margin for every 1 < k ≤ k*",
    noise=claims_lib.SEEDS,
    min_seeds=3,
    equivalence="sgd_noise.scaling.claims.curve_margin",
)
WARMUP_SPIKE = Claim(
    statement="gradual warm-up removes the early loss spike that no warm-up shows",
    source=GOYAL + ", Sec. 2.2",
    quantity="log peak early loss, no warm-up − gradual, predicted > 0",
    noise=claims_lib.SEEDS,
    min_seeds=3,
)
WARMUP_ERROR = Claim(
    statement="gradual warm-up beats no warm-up at large k (final test error)",
    source=GOYAL + " (8k: 24.84 % without, 23.74 % with gradual warm-up)",
    quantity="test error, no warm-up − gradual, predicted > 0",
    noise=claims_lib.SEEDS,
    min_seeds=3,
)


def warmup_schedule(arm: str, k: int, base_rate: float, warmup_epochs: float):
    """The learning rate by epoch of Goyal et al.'s arms for batch kB₀
    (`sharp_minima.train.optimizer.epoch_schedule`): ``none`` kη₀ from the start;
    ``constant`` η₀ for the warm-up epochs, then kη₀; ``gradual`` η₀ growing linearly to
    kη₀ over the warm-up epochs (changed at every evaluation chunk here, every iteration in
    the paper). k = 1 needs no warm-up.

    Raises:
      ValueError: an unknown arm.
    """
    if arm not in ARMS:
        raise ValueError(f"unknown warm-up arm {arm!r}; valid: {', '.join(ARMS)}")
    top = k * base_rate
    if arm == "none" or k == 1:
        return train.epoch_schedule(top)
    return train.epoch_schedule(
        top,
        warmup_epochs=warmup_epochs,
        warmup_from=base_rate,
        warmup=arm.replace("gradual", "linear"),
    )


def validate(config) -> None:
    """Checks ``sgd_noise.scaling``."""
    count = dict(low=1, integer=True)
    kit.check_fields(
        config,
        (
            ("sgd_noise.scaling.base_batch_size", count),
            ("sgd_noise.scaling.base_learning_rate", dict(low=0, low_open=True)),
            ("sgd_noise.scaling.ks", count),
            ("sgd_noise.scaling.warmup_epochs", count),
            ("sgd_noise.scaling.num_epochs", count),
            ("sgd_noise.scaling.evals_per_epoch", count),
            ("sgd_noise.scaling.claims.error_margin", dict(low=0, low_open=True)),
            ("sgd_noise.scaling.claims.curve_margin", dict(low=0, low_open=True)),
        ),
    )
    if 1 not in tuple(config.sgd_noise.scaling.ks):
        raise train.ConfigError("sgd_noise.scaling.ks must include 1 (the baseline)")


def prepare(ctx) -> None:
    g = ctx.config.sgd_noise.scaling
    kit.check_sizes(
        [("sgd_noise.scaling (k·B₀)", max(g.ks) * g.base_batch_size)], ctx.shared.num_train
    )


def _final_error(out, num_classes) -> np.ndarray:
    """1 − final test accuracy per member; a diverged member counts at chance."""
    acc = out["test_accuracy"][-1]
    return np.where(np.isfinite(out["train_loss"][-1]), 1.0 - acc, 1.0 - 1.0 / num_classes)


def run(ctx) -> dict:
    config, pop, log = ctx.config, ctx.shared, ctx.log
    g, seeds = config.sgd_noise.scaling, kit.seeds(config)
    res = {}
    for k in g.ks:
        arms = ("none",) if k == 1 else ARMS
        members = [(a, s) for a in arms for s in seeds]
        key = {
            "k": k,
            "B0": g.base_batch_size,
            "eta0": g.base_learning_rate,
            "w": g.warmup_epochs,
            "epochs": g.num_epochs,
            "evals": g.evals_per_epoch,
            "seeds": seeds,
        }
        schedules = [
            warmup_schedule(a, k, g.base_learning_rate, g.warmup_epochs) for a, _ in members
        ]
        out = ctx.cache.arrays(
            f"scaling/k{k}",
            key,
            lambda k=k, members=members, schedules=schedules: pop.train(
                seeds=[s for _, s in members],
                learning_rates=schedules,
                batch_size=k * g.base_batch_size,
                num_epochs=g.num_epochs,
                evals_per_epoch=g.evals_per_epoch,
                log=log,
                label=f"[scaling k={k}] ",
            ),
        )
        for arm in arms:
            idx = [i for i, (a, _) in enumerate(members) if a == arm]
            res[f"k{k}/{arm}"] = _arm(config, k, arm, out, idx, pop.num_classes)
    base = res["k1/none"]
    for r in res.values():  # the training-curve gap to the baseline after warm-up
        e, l1 = np.asarray(base["epochs"]), np.log(np.asarray(base["train_loss"]))
        ek, lk = np.asarray(r["epochs"]), np.log(np.asarray(r["train_loss"]))
        after = ek >= g.warmup_epochs
        gap = np.abs(lk[after] - np.interp(ek[after], e, l1))
        r["curve_gap"] = float(np.median(gap)) if np.isfinite(gap).all() else float("inf")
    return {"runs": res, "num_test": pop.num_test}


def _arm(config, k, arm, out, idx, num_classes) -> dict:
    """One arm's summary over its members ``idx`` of the population ``out``."""
    g = config.sgd_noise.scaling
    err = _final_error(out, num_classes)
    early = out["epochs"][1:] <= g.warmup_epochs + 1 + 1e-9
    loss = out["train_loss"][:, idx]
    return {
        "k": k,
        "arm": arm,
        "batch_size": k * g.base_batch_size,
        "learning_rate": k * g.base_learning_rate,
        "error": kit.mean_se(err[idx]),
        "diverged": int((~np.isfinite(np.asarray(loss[-1]))).sum()),
        "peak": kit.mean_se(np.log(out["peak_loss"][early][:, idx].max(0))),
        "initial_loss": float(out["train_loss"][0, idx].mean()),
        "epochs": out["epochs"].tolist(),
        "train_loss": np.nanmean(np.where(np.isfinite(loss), loss, np.nan), 1).tolist(),
    }


def kstar(config, res) -> tuple[int, dict]:
    """k*: the largest k up to which every k's gradual-warm-up error is *the same* as the
    baseline's — equivalent within ``scaling.claims.error_margin`` (a TOST, fixed before the
    run), not merely not significantly different. Noise unit: the two standard errors over
    seeds (t-quantile) with the test set's sampling error."""
    g, runs_ = config.sgd_noise.scaling, res["runs"]
    seeds = config.sgd_noise.seeds
    (b, bse) = runs_["k1/none"]["error"]
    diffs, best = {}, 1
    ok = True
    for k in sorted(g.ks):
        if k == 1:
            continue
        e, se = runs_[f"k{k}/gradual"]["error"]
        noise = claims_lib.combined(
            kit.unit(se, seeds), kit.unit(bse, seeds), accuracy_noise(1 - b, res["num_test"])
        )
        diffs[k] = (e - b, noise)
        if ok and claims_lib.equivalence(e - b, noise, g.claims.error_margin) == YES:
            best = k
        else:
            ok = False
    return best, diffs


def claims(config, res) -> list:
    g, r = config.sgd_noise.scaling, res["runs"]
    seeds, margin = config.sgd_noise.seeds, g.claims.error_margin
    k_star, diffs = kstar(config, res)
    ks = sorted(g.ks)
    beyond = [k for k in ks if k > k_star]
    nums = "; ".join(f"k={k}: {100 * d:+.2f} ± {100 * n:.2f} pts" for k, (d, n) in diffs.items())
    holds = claims_lib.equivalence(*diffs[ks[1]], margin) if len(ks) > 1 else NOT_TESTED
    # "and not beyond": the largest k's error exceeds the margin; a run whose largest k is
    # still within it saw no breakdown: that half is not tested.
    last = diffs.get(ks[-1])
    breaks = verdict(last[0] - margin, last[1]) if last else NOT_TESTED
    breaks = NOT_TESTED if breaks == NO else breaks
    out = [
        LINEAR_SCALING.given(
            all_of([holds, breaks]),
            f"k* = {k_star} (equivalence margin {100 * margin:g} points); error − baseline: "
            + nums
            + ("" if breaks != NOT_TESTED else "; no breakdown within the ks run"),
            seeds=seeds,
        )
    ]
    within = [k for k in ks if 1 < k <= k_star]
    gaps = {k: r[f"k{k}/gradual"]["curve_gap"] for k in ks if k > 1}
    curve = g.claims.curve_margin
    out.append(
        CURVES_MATCH.given(
            all_of([verdict(curve - gaps[k]) for k in within]) if within else NOT_TESTED,
            "; ".join(f"k={k}: {v:.3f}" for k, v in gaps.items())
            + f" (margin {curve:g}; the gaps are of the seeds' mean curves: their spread over "
            "seeds is not estimated)",
            seeds=seeds,
        )
    )
    if ks[-1] > 1:
        out += _warmup_claims(config, res, beyond)
    return out


def _warmup_claims(config, res, beyond) -> list:
    g, r = config.sgd_noise.scaling, res["runs"]
    seeds = config.sgd_noise.seeds
    k = max(g.ks)
    none, grad = r[f"k{k}/none"], r[f"k{k}/gradual"]
    out = [
        WARMUP_SPIKE.test(
            none["peak"][0] - grad["peak"][0],
            claims_lib.combined(kit.unit(none["peak"][1], seeds), kit.unit(grad["peak"][1], seeds)),
            f"k={k}, largest mini-batch loss in the first {g.warmup_epochs + 1} epochs: no "
            f"warm-up {np.exp(none['peak'][0]):.3g}, constant "
            f"{np.exp(r[f'k{k}/constant']['peak'][0]):.3g}, gradual "
            f"{np.exp(grad['peak'][0]):.3g}; initial loss {grad['initial_loss']:.3g}",
            seeds=seeds,
        )
    ]
    kbig = max(beyond) if beyond else k
    none, grad = r[f"k{kbig}/none"], r[f"k{kbig}/gradual"]
    noise = claims_lib.combined(
        kit.unit(none["error"][1], seeds),
        kit.unit(grad["error"][1], seeds),
        accuracy_noise(1 - grad["error"][0], res["num_test"]),
    )
    out.append(
        WARMUP_ERROR.test(
            none["error"][0] - grad["error"][0],
            noise,
            f"k={kbig}: no warm-up {100 * none['error'][0]:.2f}% ({none['diverged']} diverged), "
            f"constant {100 * r[f'k{kbig}/constant']['error'][0]:.2f}%, gradual "
            f"{100 * grad['error'][0]:.2f}%; Goyal (8k): 24.84 / 25.88 / 23.74 %",
            seeds=seeds,
        )
    )
    return out


def report(config, res) -> list:
    g = config.sgd_noise.scaling
    k_star, _ = kstar(config, res)
    rows = []
    for k in sorted(g.ks):
        for arm in ("none",) if k == 1 else ARMS:
            x = res["runs"][f"k{k}/{arm}"]
            e, se = x["error"]
            rows.append(
                (
                    k,
                    x["batch_size"],
                    f"{x['learning_rate']:g}",
                    arm,
                    f"{100 * e:.2f} ± {100 * se:.2f}",
                    f"{np.exp(x['peak'][0]):.3g}",
                    f"{x['curve_gap']:.3f}",
                    x["diverged"],
                )
            )
    head = ("k", "B", "η", "warm-up", "test error (%)", "peak early loss", "curve gap", "diverged")
    return [
        f"B = k·{g.base_batch_size}, η = k·{g.base_learning_rate:g}, {g.num_epochs} epochs; "
        f"warm-up over the first {g.warmup_epochs} epochs (the rate is updated "
        f"{g.evals_per_epoch}× per epoch; Goyal et al.: every iteration over 5 epochs). "
        f"Here k* = {k_star}.",
        "",
        *markdown_table(head, rows),
        "",
        "Goyal et al. (2017), Table 1, ResNet-50 on ImageNet at kn = 8k (top-1 error, %):",
        "",
        *markdown_table(("setting", "error"), list(GOYAL_8K.items())),
    ]


def figures(config, res) -> dict:
    ks = sorted(config.sgd_noise.scaling.ks)
    fig = plotting.figure((15, 4))
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    run = lambda k, arm: res["runs"].get(f"k{k}/{arm if k > 1 else 'none'}")  # noqa: E731
    for i, k in enumerate(ks):
        for arm, ls in (("gradual", "-"), ("none", ":")):
            x = run(k, arm)
            if x is None or (k == 1 and arm == "none"):
                continue
            label = f"k={k}" if arm == "gradual" else None
            axes[0].plot(x["epochs"], x["train_loss"], ls, color=f"C{i}", label=label)
    axes[0].set(
        yscale="log",
        xlabel="epoch",
        ylabel="training loss",
        title="gradual warm-up (solid), none (dotted)",
    )
    axes[0].legend(fontsize=8)
    for j, arm in enumerate(ARMS):
        e = [run(k, arm)["error"] for k in ks]
        axes[1].errorbar(
            ks,
            [100 * m for m, _ in e],
            [100 * s for _, s in e],
            marker="o",
            color=f"C{j}",
            label=arm,
            capsize=3,
        )
        axes[2].plot(
            ks, [np.exp(run(k, arm)["peak"][0]) for k in ks], "o-", color=f"C{j}", label=arm
        )
    base = res["runs"]["k1/none"]
    axes[1].axhline(100 * base["error"][0], color="k", ls="--", lw=0.8, label="baseline k=1")
    axes[1].set(
        xscale="log",
        xlabel="k (B = kB₀, η = kη₀)",
        ylabel="final test error (%)",
        title="final test error",
    )
    axes[1].legend(fontsize=8)
    axes[2].axhline(base["initial_loss"], color="k", ls="--", lw=0.8, label="initial loss")
    axes[2].set(
        xscale="log",
        yscale="log",
        xlabel="k",
        ylabel="largest mini-batch loss, early epochs",
        title="the early loss spike",
    )
    axes[2].legend(fontsize=8)
    # plain tick labels: the spans are under a decade ("2.62×10⁰" otherwise)
    losses = [v for k in ks for arm in ARMS if run(k, arm) for v in run(k, arm)["train_loss"]]
    kit.log_span_ticks(axes[0], "y", losses)
    axes[0].yaxis.set_minor_formatter(ticker.NullFormatter())
    peaks = [np.exp(run(k, arm)["peak"][0]) for k in ks for arm in ARMS]
    kit.log_span_ticks(axes[2], "y", [*peaks, base["initial_loss"]])
    axes[2].yaxis.set_minor_formatter(ticker.NullFormatter())
    for ax in axes[1:]:
        kit.log_ticks(ax, "x", ks)
    return {"linear_scaling": fig}


SECTION = Section(
    name="scaling",
    title="Linear scaling with warm-up (Goyal et al. 2017)",
    run=run,
    report=report,
    claims=claims,
    figures=figures,
    validate=validate,
    prepare=prepare,
)
