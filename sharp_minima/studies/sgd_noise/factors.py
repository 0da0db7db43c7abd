"""4. Three factors: η/B sets the endpoint (Jastrzębski et al. 2017). Endpoints on lines of
constant η/B after the same number of epochs; λ_max, ε-sharpness, batch sharpness and
log det H₊ against log(η/B) and log B."""

from __future__ import annotations

import math

import numpy as np
from matplotlib import ticker

from sharp_minima import gradients, hessian, plotting, sharpness, train
from sharp_minima.studies.claims import ordered
from sharp_minima.studies.common import key_streams, markdown_table
from sharp_minima.studies.sections import Section
from sharp_minima.studies.sgd_noise import kit

MEASURES = {
    "lambda_max": "λ_max",
    "phi": "ε-sharpness φ",
    "batch_sharpness": "batch sharpness",
    "log_det": "log det H₊",
}
# A coefficient of the fit differs from 0 beyond 2 of its standard errors.
FIT_SE = 2.0
# Near chance (below 1.5/C test accuracy) a run is broken: past the corner.
BROKEN_ACCURACY = 1.5
# Gradient descent is unstable beyond λ_max = 2/η (the edge of stability).
EDGE = 2.0


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


def _broken(point, num_classes) -> bool:
    """A run past the corner where η is too large or B too small: diverged, or near chance."""
    return (
        not np.isfinite(point["train_loss"])
        or point["test_accuracy"] < BROKEN_ACCURACY / num_classes
    )


def corner(res) -> set:
    """The runs past the corner where η is too large or B too small, decided before looking at
    the measure under test: broken runs, and runs whose η exceeds 2/λ_max of the run with the
    smallest η on their line (same seed) — the sharpness that line reaches where the SDE
    picture holds is unstable at that step size (λ_max ≤ 2/η for gradient descent)."""
    out = set()
    for p in res["points"]:
        if _broken(p, res["num_classes"]):
            out.add((p["ratio"], p["batch_size"], p["seed"]))
            continue
        line = [q for q in res["points"] if q["ratio"] == p["ratio"] and q["seed"] == p["seed"]]
        ref = min(line, key=lambda q: q["learning_rate"])
        if "lambda_max" in ref and p["learning_rate"] * ref["lambda_max"] > EDGE:
            out.add((p["ratio"], p["batch_size"], p["seed"]))
    return out


def factor_fit(res, measure) -> dict | None:
    """Least squares y = a + b·log(η/B) + c·log B over the runs outside the corner (y = log of
    the measure, or log det itself): b is how the measure follows the noise scale η/B, c how
    it follows B (equivalently η) along a line of constant η/B; standard errors from the
    residuals (the seeds are the replicates)."""
    out_ = corner(res)
    pts = [
        p
        for p in res["points"]
        if (p["ratio"], p["batch_size"], p["seed"]) not in out_ and measure in p
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
        "runs": len(pts),
    }


def claims(config, res) -> list:
    left_out = sorted(corner(res))
    lrs = {(p["ratio"], p["batch_size"]): p["learning_rate"] for p in res["points"]}
    where = (
        "; the corner (left out): "
        + ", ".join(f"η/B={r:.3g} B={b} (η={lrs[(r, b)]:g}) seed {sd}" for r, b, sd in left_out)
        if left_out
        else "; no run in the corner"
    )
    out = []
    for m, name in MEASURES.items():
        fit = factor_fit(res, m)
        if fit is None:
            out.append((f"{name} depends on η/B, not on η or B alone", "not tested", where))
            continue
        if abs(fit["c"]) > FIT_SE * fit["c_se"]:
            v = "no"
        elif abs(fit["b"]) > FIT_SE * fit["b_se"]:
            v = "yes"
        else:
            v = "within noise"
        unit = "log det" if m == "log_det" else f"log {name}"
        out.append(
            (
                f"{name} at the end depends on η/B and not on η or B alone: in {unit} = a + "
                "b·log(η/B) + c·log B (outside the corner where η is too large or B too "
                "small), b differs from 0 and c does not (by 2 standard errors)",
                v,
                f"b = {fit['b']:.3g} ± {fit['b_se']:.2g}, c = {fit['c']:.3g} ± {fit['c_se']:.2g} "
                f"over {fit['runs']} runs" + where,
            )
        )
    keep = set(left_out)
    rows = [p for p in res["points"] if (p["ratio"], p["batch_size"], p["seed"]) not in keep]
    ratios = sorted({p["ratio"] for p in rows})
    means = [
        float(np.mean([math.log(p["lambda_max"]) for p in rows if p["ratio"] == r])) for r in ratios
    ]
    out.append(
        (
            "a larger η/B ends in a flatter region (λ_max falls as η/B grows)",
            ordered(means, [0.0] * len(means), decreasing=True) if len(means) > 1 else "not tested",
            ", ".join(f"η/B={r:.3g}: {math.exp(mu):.4g}" for r, mu in zip(ratios, means))
            + " (geometric means outside the corner)",
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
    ]


def figures(config, res) -> dict:
    fig = plotting.figure((15, 4))
    axes = [fig.add_subplot(1, 4, i + 1) for i in range(4)]
    bs = sorted({p["batch_size"] for p in res["points"]})
    marks = "osD^v"
    left_out = corner(res)
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
