"""4. Three factors: η/B sets the endpoint (Jastrzębski et al. 2017). Endpoints on lines of
constant η/B after the same number of epochs; λ_max, ε-sharpness, batch sharpness and
log det H₊ against log(η/B) and log B."""

from __future__ import annotations

import math

import numpy as np
from matplotlib import ticker

from sharp_minima import gradients, hessian, plotting, sharpness, train
from sharp_minima.studies import claims as claims_lib
from sharp_minima.studies.claims import (
    NO,
    NOT_TESTED,
    WITHIN_NOISE,
    YES,
    Claim,
    all_of,
    ordered,
    seed_noise,
    seed_stat,
    verdict,
)
from sharp_minima.studies.common import key_streams, markdown_table
from sharp_minima.studies.sections import Section
from sharp_minima.studies.sgd_noise import kit

MEASURES = {
    "lambda_max": "λ_max",
    "phi": "ε-sharpness φ",
    "batch_sharpness": "batch sharpness",
    "log_det": "log det H₊",
}
J17 = "Jastrzębski et al. 2017 (Three factors), Sec. 3–4; lecture notes, Sec. 4"
DEPENDS_ON_RATIO = {
    m: Claim(
        statement=f"{name} at the end depends on η/B — lower for a larger η/B (more noise, "
        "flatter) — and not on η or B alone",
        source=J17,
        quantity=f"in log {name} = a + b·log(η/B) + c·log B: −b > 0, and |c| within the "
        "equivalence margin",
        noise=claims_lib.SEEDS,
        min_seeds=3,
        equivalence="sgd_noise.factors.claims.c_margin",
    )
    for m, name in MEASURES.items()
}
FLATTER = Claim(
    statement="a larger η/B ends in a flatter region (λ_max falls as η/B grows)",
    source=J17,
    quantity="geometric mean λ_max per η/B line, predicted decreasing",
    noise=claims_lib.SEEDS,
    min_seeds=3,
)


def validate(config) -> None:
    """Checks ``sgd_noise.factors``."""
    pos, count = dict(low=0, low_open=True), dict(low=1, integer=True)
    kit.check_fields(
        config,
        (
            ("sgd_noise.factors.ratios", pos),
            ("sgd_noise.factors.batch_sizes", count),
            ("sgd_noise.factors.num_epochs", count),
            ("sgd_noise.factors.epsilon", pos),
            ("sgd_noise.factors.num_minibatches", dict(low=2, integer=True)),
            ("sgd_noise.factors.slq_probes", dict(low=2, integer=True)),
            ("sgd_noise.factors.slq_steps", dict(low=2, integer=True)),
            ("sgd_noise.factors.claims.max_learning_rate", pos),
            ("sgd_noise.factors.claims.c_margin", pos),
        ),
    )
    if len(config.sgd_noise.factors.ratios) < 2:
        raise train.ConfigError("sgd_noise.factors.ratios: need >= 2 lines")


def prepare(ctx) -> None:
    s = ctx.config.sgd_noise
    kit.check_sizes(
        [
            ("sgd_noise.factors.batch_sizes", max(s.factors.batch_sizes)),
            ("sgd_noise.curvature_examples", s.curvature_examples),
        ],
        ctx.shared.num_train,
    )


def run(ctx) -> dict:
    config, pop, log = ctx.config, ctx.shared, ctx.log
    f, seeds = config.sgd_noise.factors, kit.seeds(config)
    measure = _measurer(config, pop, log)
    points = []
    for b in f.batch_sizes:
        members = [(r, sd) for r in f.ratios for sd in seeds]
        out = ctx.cache.arrays(
            f"factors/B{b}",
            {"B": b, "ratios": list(f.ratios), "epochs": f.num_epochs, "seeds": seeds},
            lambda b=b, members=members: pop.train(
                seeds=[sd for _, sd in members],
                learning_rates=[train.epoch_schedule(r * b) for r, _ in members],
                batch_size=b,
                num_epochs=f.num_epochs,
                log=log,
                label=f"[three factors B={b}] ",
            ),
        )
        j = min(f.num_minibatches, pop.num_train // b)
        mini = {k: a[: j * b].reshape(j, b, *a.shape[1:]) for k, a in pop.train_data.items()}
        for i, (r, sd) in enumerate(members):
            point = {
                "ratio": r,
                "batch_size": b,
                "learning_rate": r * b,
                "seed": sd,
                "sde_time": r * b * float(out["steps"][-1]),
                "test_accuracy": float(out["test_accuracy"][-1, i]),
                "train_loss": float(out["train_loss"][-1, i]),
            }
            if np.isfinite(point["train_loss"]):
                key = {
                    "eps": f.epsilon,
                    "examples": config.sgd_noise.curvature_examples,
                    "slq": [f.slq_probes, f.slq_steps],
                    "J": j,
                    "train": kit.fingerprint(out),
                }
                p = pop.member(out["params"][i])
                point.update(
                    ctx.cache.get(
                        f"factors/r{r:g}_B{b}_s{sd}",
                        key,
                        lambda p=p, mini=mini, r=r, b=b, sd=sd: measure(p, mini, r, b, sd),
                    )
                )
                log(
                    f"[three factors] η/B={r:.3g} B={b} seed {sd}: λ_max "
                    f"{point['lambda_max']:.4g}, φ {point['phi']:.4g}, batch sharpness "
                    f"{point['batch_sharpness']:.4g}, log det {point['log_det']:.4g}"
                )
            points.append(point)
    return {"points": points, "num_classes": pop.num_classes}


def _measurer(config, pop, log):
    """``measure(params, minibatches, η/B, B, seed)``: λ_max, φ, batch sharpness, log det."""
    f = config.sgd_noise.factors
    batches = kit.curvature_batches(config, pop)
    keys = key_streams(config.seed, "factors/lanczos", "factors/phi", "factors/slq")
    curv = hessian.Curvature(pop.loss)
    meter = sharpness.SharpnessMeter(pop.loss)
    noise = gradients.GradientNoise(pop.loss)

    def measure(p, mini, r, b, sd):
        log(f"[three factors] measuring η/B={r:.3g} B={b} seed {sd}")
        lam = curv.eigenpairs(p, batches, k=1, key=keys["factors/lanczos"])
        phi = meter.epsilon_sharpness(p, batches, epsilon=f.epsilon, key=keys["factors/phi"])
        bsh = noise.batch_sharpness(p, mini)
        ld = curv.log_det(
            p, batches, key=keys["factors/slq"], num_probes=f.slq_probes, num_steps=f.slq_steps
        )
        return {
            "lambda_max": float(lam.values[0]),
            "phi": phi.value,
            "batch_sharpness": bsh.value,
            "log_det": ld.value,
            "log_det_se": ld.stderr,
        }

    return measure


def corner(config, res) -> set:
    """The runs past the corner where η is too large, fixed by the config before the run
    (η > ``factors.claims.max_learning_rate``), never by a measured quantity."""
    top = config.sgd_noise.factors.claims.max_learning_rate
    return {
        (p["ratio"], p["batch_size"], p["seed"]) for p in res["points"] if p["learning_rate"] > top
    }


def factor_fit(config, res, measure) -> dict | None:
    """Least squares y = a + b·log(η/B) + c·log B over the runs outside the corner (y = log of
    the measure, or log det itself): b is how the measure follows the noise scale η/B, c how
    it follows B (equivalently η) along a line of constant η/B; standard errors from the
    residuals (the seeds are the replicates), with their degrees of freedom."""
    out_ = corner(config, res)
    pts = [
        p
        for p in res["points"]
        if (p["ratio"], p["batch_size"], p["seed"]) not in out_
        and measure in p
        and np.isfinite(p[measure])
    ]
    if (
        len(pts) < 4
        or len({p["ratio"] for p in pts}) < 2
        or len({p["batch_size"] for p in pts}) < 2
    ):
        return None
    y = np.array(
        [p[measure] if measure == "log_det" else math.log(max(p[measure], 1e-30)) for p in pts]
    )
    x = np.array([[1.0, math.log(p["ratio"]), math.log(p["batch_size"])] for p in pts])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    res_ = y - x @ coef
    dof = max(len(y) - 3, 1)
    cov = (res_ @ res_ / dof) * np.linalg.pinv(x.T @ x)
    se = np.sqrt(np.clip(np.diag(cov), 0, None))
    return {
        "b": float(coef[1]),
        "b_se": float(se[1]),
        "c": float(coef[2]),
        "c_se": float(se[2]),
        "dof": dof,
        "runs": len(pts),
    }


def claims(config, res) -> list:
    """`DEPENDS_ON_RATIO` per measure (the source's direction: more noise, flatter, so b < 0;
    c equivalent to 0 within ``c_margin``, a TOST) and `FLATTER`; noise units are the fit's
    standard errors × the t-quantile of its degrees of freedom, or over seeds."""
    f = config.sgd_noise.factors
    left_out = sorted(corner(config, res))
    seeds = config.sgd_noise.seeds
    lrs = {(p["ratio"], p["batch_size"]): p["learning_rate"] for p in res["points"]}
    where = (
        f"; the corner (η > {f.claims.max_learning_rate:g}, fixed before the run; left out): "
        + ", ".join(f"η/B={r:.3g} B={b} (η={lrs[(r, b)]:g}) seed {sd}" for r, b, sd in left_out)
        if left_out
        else "; no run in the corner"
    )
    steps = sorted({p["sde_time"] for p in res["points"]})
    progress = (
        f"; η·steps differs {steps[-1] / steps[0]:.3g}× between the lines, so b also holds how "
        "far training got"
        if len(steps) > 1 and steps[0] > 0
        else ""
    )
    out = []
    for m, claim in DEPENDS_ON_RATIO.items():
        fit = factor_fit(config, res, m)
        if fit is None:
            out.append(claim.untested("fewer than 4 runs on 2 lines and 2 batch sizes" + where))
            continue
        unit = claims_lib.t_factor(fit["dof"])
        falls = verdict(-fit["b"], fit["b_se"] * unit)
        same = claims_lib.equivalence(fit["c"], fit["c_se"] * unit, f.claims.c_margin)
        v = all_of([falls, same])
        out.append(
            claim.test(
                {YES: 1.0, NO: -1.0, WITHIN_NOISE: 0.0}.get(v, float("nan")),
                0.0,
                f"b = {fit['b']:.3g} ± {fit['b_se']:.2g} (predicted < 0: {falls}), c = "
                f"{fit['c']:.3g} ± {fit['c_se']:.2g} (|c| < {f.claims.c_margin:g}: {same}) "
                f"over {fit['runs']} runs" + where + progress,
                seeds=seeds,
            )
        )
    keep = set(left_out)
    rows = [
        p
        for p in res["points"]
        if (p["ratio"], p["batch_size"], p["seed"]) not in keep and np.isfinite(p["lambda_max"])
    ]
    ratios = sorted({p["ratio"] for p in rows})
    logs = {r: [math.log(p["lambda_max"]) for p in rows if p["ratio"] == r] for r in ratios}
    stats = {r: seed_stat(v) for r, v in logs.items()}
    v = (
        ordered(
            [stats[r]["mean"] for r in ratios],
            [seed_noise(stats[r]) for r in ratios],
            decreasing=True,
        )
        if len(ratios) > 1
        else NOT_TESTED
    )
    out.append(
        FLATTER.test(
            {YES: 1.0, NO: -1.0, WITHIN_NOISE: 0.0}.get(v, float("nan")),
            0.0,
            ", ".join(f"η/B={r:.3g}: {math.exp(stats[r]['mean']):.4g}" for r in ratios)
            + " (geometric means over B and seeds outside the corner; noise: their spread)"
            + progress,
            seeds=seeds,
        )
    )
    return out


def report(config, res) -> list:
    f = config.sgd_noise.factors
    rows = []
    for p in sorted(res["points"], key=lambda p: (p["ratio"], p["batch_size"], p["seed"])):
        rows.append(
            (
                f"{p['ratio']:.3g}",
                p["batch_size"],
                f"{p['learning_rate']:g}",
                p["seed"],
                f"{p['sde_time']:.4g}",
                f"{100 * p['test_accuracy']:.1f}",
                *[kit.fmt(p.get(m), ".4g") for m in MEASURES],
            )
        )
    return [
        f"After {f.num_epochs} epochs for every (η, B): then η·steps = (η/B)·epochs·N, the SDE "
        "time, is the same along a line of constant η/B (after the same number of steps it "
        f"would not be). φ at ε = {f.epsilon:g}; batch sharpness E_B[g_BᵀH_Bg_B/|g_B|²] over "
        f"{f.num_minibatches} mini-batches of the run's own B; log det H₊ by SLQ "
        f"({f.slq_probes} probes × {f.slq_steps} steps).",
        "",
        *markdown_table(
            ("η/B", "B", "η", "seed", "η·steps", "test acc. (%)", *MEASURES.values()), rows
        ),
        "",
        "**The source** (Jastrzębski et al. 2017, Sec. 3–4) shows its result in figures "
        "(ResNet-32 / VGG-11 on CIFAR-10), without coefficients to set beside ours: in the fit "
        "log m = a + b·log(η/B) + c·log B it predicts b < 0 (a larger η/B, a flatter end) and "
        "c = 0 (η and B matter only through their ratio), until η is too large for the SDE "
        "approximation.",
    ]


def figures(config, res) -> dict:
    fig = plotting.figure((15, 4))
    axes = [fig.add_subplot(1, 4, i + 1) for i in range(4)]
    bs = sorted({p["batch_size"] for p in res["points"]})
    marks = "osD^v"
    left_out = corner(config, res)
    for ax, (m, name) in zip(axes, MEASURES.items()):
        for j, b in enumerate(bs):
            pts = [p for p in res["points"] if p["batch_size"] == b and m in p]
            broken = [(p["ratio"], p["batch_size"], p["seed"]) in left_out for p in pts]
            ax.scatter(
                [p["ratio"] for p in pts],
                [p[m] for p in pts],
                marker=marks[j % 5],
                facecolors=["none" if x else f"C{j}" for x in broken],
                edgecolors=f"C{j}",
                label=f"B={b}",
            )
        ax.set(xscale="log", xlabel="η/B", title=name)
        kit.log_ticks(ax, "x", sorted({p["ratio"] for p in res["points"]}))
        if m != "log_det":
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            kit.log_span_ticks(ax, "y", [p[m] for p in res["points"] if m in p])
    axes[0].legend(fontsize=8, title="open: in the corner")
    return {"three_factors": fig}


SECTION = Section(
    name="factors",
    title="Three factors: η/B sets the endpoint (Jastrzębski et al. 2017)",
    run=run,
    report=report,
    claims=claims,
    figures=figures,
    validate=validate,
    prepare=prepare,
)
