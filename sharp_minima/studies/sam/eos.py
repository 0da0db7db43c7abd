"""Section ``eos``: SAM's edge of stability.

Along an eigenvector of curvature λ, with ‖g‖ the norm of the whole gradient, normalised
SAM's step multiplies the component by 1 − ηλ − ηρλ²/‖g‖ (the gradient at w + ρg/‖g‖ is
g + ρλ²x/‖g‖ along it), so the step is stable while ηλ + ηρλ²/‖g‖ ≤ 2:

    λ_SAM = (‖g‖ / 2ρ)(√(1 + 8ρ / (η‖g‖)) − 1)  →  2/η as ρ → 0

(`sharp_minima.optim.sam_stability_threshold`; Agarwala & Dauphin 2023 predict SAM's λ_max
from η and ρ, Long & Bartlett 2024 find its dependence on ‖g‖). Tested twice:

1. on a quadratic ½λx₁² + c·x₂, whose linear direction holds ‖g‖ ≈ c: SAM from x₁ = 10⁻³
   for ``quadratic_steps`` steps on a grid of λ around λ_SAM
   (`sharp_minima.optim.sam_quadratic_growth`); the measured edge is where x₁ stops
   shrinking;
2. in full-batch training of a small MLP on the first ``eos.examples`` training examples:
   GD's λ_max settles at 2/η (Cohen et al. 2021's edge of stability) and SAM's at λ_SAM of
   the ‖g‖ it has at that time (the trainer's ``sam/grad_norm``, averaged over the
   ``every_steps`` steps before each measurement of λ_max).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sharp_minima import optim, plotting, tracking, train
from sharp_minima.studies import claims as claims_lib
from sharp_minima.studies import runs
from sharp_minima.studies.claims import Claim
from sharp_minima.studies.common import key_streams, markdown_table
from sharp_minima.studies.sam import kit
from sharp_minima.studies.sections import Section

LB = "Long & Bartlett (2024), abstract; Agarwala & Dauphin (ICML 2023), abstract"
QUADRATIC = Claim(
    statement="on a quadratic, SAM's step is stable exactly up to λ_SAM(η, ρ, ‖g‖)",
    source=f"{LB}; the linearised step (this section's docstring)",
    quantity="the measured edge's largest relative distance from λ_SAM over the ‖g‖ tested",
    noise=claims_lib.SOLVER,
    threshold="sam_study.eos.claims.quadratic_tol",
    origin="the λ grid's spacing (0.5 %) with room for float32 rounding, fixed before the run",
)
GD_EDGE = Claim(
    statement="full-batch GD's λ_max settles at 2/η (the edge of stability)",
    source="Cohen et al. (ICLR 2021), Sec. 3",
    quantity="median of λ_max / (2/η) over the second half of training, minus 1 (the same: 0)",
    noise=claims_lib.SEEDS,
    min_seeds=3,
    equivalence="sam_study.eos.claims.margin",
)
SAM_EDGE = Claim(
    statement="full-batch SAM's λ_max settles at λ_SAM(η, ρ, ‖g‖), below GD's 2/η",
    source=LB,
    quantity="median of λ_max / λ_SAM(η, ρ, ‖g‖_t) over the second half of training, minus 1 "
    "(the same: 0); and GD's settled λ_max − SAM's > 0",
    noise=claims_lib.SEEDS,
    min_seeds=3,
    equivalence="sam_study.eos.claims.margin",
)


def validate(config) -> None:
    e = "sam_study.eos."
    for name, kw in (
        ("widths", dict(low=1, integer=True, unique=False)),
        ("examples", dict(low=2, integer=True)),
        ("learning_rate", dict(low=0, low_open=True)),
        ("rho", dict(low=0, low_open=True)),
        ("steps", dict(low=2, integer=True)),
        ("every_steps", dict(low=1, integer=True)),
        ("quadratic_lambdas", dict(low=3, integer=True)),
        ("quadratic_steps", dict(low=1, integer=True)),
        ("quadratic_grad_norms", dict(low=0, low_open=True)),
        ("claims.quadratic_tol", dict(low=0, low_open=True)),
        ("claims.margin", dict(low=0, low_open=True)),
    ):
        train.check_numbers(config, e + name, **kw)


def arms(config) -> list[kit.Arm]:
    e = config.sam_study.eos
    full = (
        ("model.kwargs.widths", tuple(e.widths)),
        ("batch_size", e.examples),
        ("optim.name", "sgd"),
        ("optim.learning_rate", e.learning_rate),
        ("num_epochs", e.steps),  # full batch: one step per epoch
        ("eval_every_epochs", max(1, e.steps // 4)),
        ("checkpoint.every_epochs", max(1, e.steps // 4)),
        ("log_every_steps", e.every_steps),
        ("eval_train_examples", e.examples),
    )
    sam = kit.sam(e.rho, prefix="eos_")
    return [
        kit.Arm("eos_gd", "GD", full),
        kit.Arm(sam.name, f"SAM ρ={e.rho:g}", full + sam.changes),
    ]


def quadratic(config) -> list[dict]:
    """The measured edge against λ_SAM for each ‖g‖ of ``quadratic_grad_norms``."""
    e = config.sam_study.eos
    out = []
    for c in e.quadratic_grad_norms:
        edge = float(optim.sam_stability_threshold(e.learning_rate, e.rho, c))
        lambdas = edge * np.linspace(0.9, 1.1, e.quadratic_lambdas)
        growth = optim.sam_quadratic_growth(e.learning_rate, e.rho, c, lambdas, e.quadratic_steps)
        stable = growth < 1
        if stable.all() or not stable.any():
            measured = float("nan")  # the edge is off the grid
        else:
            i = int(np.argmin(stable))  # the first unstable λ
            measured = float(np.sqrt(lambdas[i - 1] * lambdas[i])) if i else float("nan")
        out.append(
            {
                "grad_norm": float(c),
                "lambda_sam": edge,
                "measured": measured,
                "lambdas": lambdas.tolist(),
                "growth": growth.tolist(),
            }  # fmt: skip
        )
    return out


def trajectory(config, folder: str, sam: bool) -> dict:
    """λ_max, ‖g‖ and the threshold at each measurement of a run (step > 0)."""
    e = config.sam_study.eos
    records = runs.read_metrics(folder)
    lam = {r["step"]: r["hessian/lambda_1"] for r in records if "hessian/lambda_1" in r}
    gn = {r["step"]: r["sam/grad_norm"] for r in records if "sam/grad_norm" in r}
    steps = sorted(s for s in lam if s > 0 and (s in gn or not sam))
    thr = [
        float(optim.sam_stability_threshold(e.learning_rate, e.rho, gn[s]))
        if sam
        else 2.0 / e.learning_rate
        for s in steps
    ]
    return {
        "step": steps,
        "lambda_max": [lam[s] for s in steps],
        "grad_norm": [gn.get(s) for s in steps],
        "threshold": thr,
    }


def settled(t: dict, steps: int, margin: float) -> dict:
    """The medians over the second half of training (λ_max and λ_max / threshold), the peak
    ratio, and the fraction of all measurements within ``margin`` of the threshold."""
    lam, thr = np.asarray(t["lambda_max"], float), np.asarray(t["threshold"], float)
    ratio = lam / thr if len(lam) else np.zeros(0)
    late = np.asarray([s > steps / 2 for s in t["step"]], bool)
    if not late.any():
        return {"lambda_max": None, "ratio": None, "peak_ratio": None, "at_edge": None}
    return {
        "lambda_max": float(np.median(lam[late])),
        "ratio": float(np.median(ratio[late])),
        "peak_ratio": float(ratio.max()),
        "at_edge": float(np.mean(np.abs(ratio - 1) <= margin)),
    }


def run(ctx) -> dict:
    config, e = ctx.config, ctx.config.sam_study.eos
    data = ctx.data
    if e.examples > len(data.x_train):
        raise train.ConfigError(
            f"sam_study.eos.examples={e.examples} exceeds the {len(data.x_train)} training examples"
        )
    quad = ctx.cache.get("eos/quadratic", {"eos": e.to_dict(), "v": 1}, lambda: quadratic(config))
    sub = dataclasses.replace(data, x_train=data.x_train[: e.examples],
                              y_train=data.y_train[: e.examples])  # fmt: skip
    the_arms = arms(config)
    model = train.build_model(the_arms[0].config(config, config.seed), sub)
    subset = tracking.Subset(
        key_streams(config.seed, "sam/subset")["sam/subset"],
        sub.x_train,
        sub.y_train,
        num_examples=e.examples,
        batch_size=e.examples,
    )  # every example: the full-batch loss
    bench = kit.Runs(ctx, sub, model, subset=subset, every_epochs=e.every_steps)
    out = {}
    for arm in the_arms:
        per_seed = {}
        for seed in kit.seeds(config):
            result, folder = bench.train(arm, seed)
            if isinstance(result, runs.Diverged):
                per_seed[str(seed)] = None
                continue
            t = trajectory(config, folder, sam=arm.name != "eos_gd")
            per_seed[str(seed)] = {**settled(t, e.steps, e.claims.margin), "trajectory": t}
        out[arm.name] = {"label": arm.label, "seeds": per_seed}
    return {"quadratic": quad, "arms": out}


def claims(config, results) -> list:
    e = config.sam_study.eos
    quad = results["quadratic"]
    errors = [abs(q["measured"] / q["lambda_sam"] - 1) for q in quad]
    error = max(errors) if all(np.isfinite(errors)) else float("nan")
    tol = QUADRATIC.threshold_of(config)
    out = [
        QUADRATIC.given(
            claims_lib.within_tolerance(error, tol) if np.isfinite(error) else None,
            "; ".join(
                f"‖g‖={q['grad_norm']:g}: edge {q['measured']:.4g} vs λ_SAM {q['lambda_sam']:.4g}"
                for q in quad
            )
            + f" (largest relative error {error:.2%}, tolerance {tol:.0%})",
        )
    ]
    gd, sam = (results["arms"][a.name] for a in arms(config))
    margin = GD_EDGE.margin_of(config)
    for claim, arm, what in ((GD_EDGE, gd, "2/η"), (SAM_EDGE, sam, "λ_SAM")):
        st = kit.stat(arm, "ratio")
        mean = float("nan") if st is None else st["mean"]
        noise = claims_lib.seed_noise(st)
        text = (
            f"λ_max / {what} over the second half: {mean:.3f} (noise unit {noise:.3f}, "
            f"margin ±{margin:g}); peak {kit.mean_pm(arm, 'peak_ratio', 1, 2)}, within the "
            f"margin at {kit.mean_pm(arm, 'at_edge', 100, 0)} % of the measurements"
        )
        if claim is GD_EDGE:
            out.append(
                claim.same(mean - 1, noise, margin, text, seeds=None if st is None else st["n"])
            )
            continue
        same = claims_lib.equivalence(mean - 1, noise, margin)
        below, below_noise, n = kit.paired(gd, sam, "lambda_max")
        lower = claims_lib.verdict(below, below_noise)
        out.append(
            claim.given(
                claims_lib.all_of([same, lower]),
                f"{text}; settled λ_max GD {kit.mean_pm(gd, 'lambda_max', 1, 2)} vs SAM "
                f"{kit.mean_pm(sam, 'lambda_max', 1, 2)} (2/η = {2 / e.learning_rate:g})",
                seeds=n,
            )
        )
    return out


def report(config, results) -> list[str]:
    e = config.sam_study.eos
    q_rows = [
        (
            f"{q['grad_norm']:g}",
            f"{q['lambda_sam']:.4g}",
            f"{q['measured']:.4g}",
            f"{q['measured'] / q['lambda_sam'] - 1:+.2%}",
        )  # fmt: skip
        for q in results["quadratic"]
    ]
    rows = [
        (
            arm["label"],
            kit.mean_pm(arm, "lambda_max", 1, 2),
            kit.mean_pm(arm, "ratio", 1, 3),
            kit.mean_pm(arm, "peak_ratio", 1, 2),
            kit.mean_pm(arm, "at_edge", 100, 0),
        )
        for arm in results["arms"].values()
    ]
    return [
        f"η = {e.learning_rate:g} (2/η = {2 / e.learning_rate:g}), ρ = {e.rho:g}. The "
        f"quadratic: {e.quadratic_steps} steps on a grid of {e.quadratic_lambdas} values of λ "
        "over λ_SAM × [0.9, 1.1].",
        "",
        *markdown_table(("‖g‖", "λ_SAM (formula)", "measured edge", "difference"), q_rows),
        "",
        f"Full-batch training: an MLP {tuple(e.widths)} on the first {e.examples} training "
        f"examples, {e.steps} steps, λ_max every {e.every_steps}; settled values are medians "
        "over the second half of training (mean ± standard error over seeds).",
        "",
        *markdown_table(
            (
                "arm",
                "settled λ_max",
                "settled λ_max / threshold",
                "peak λ_max / threshold",
                f"% of measurements within ±{e.claims.margin:g}",
            ),
            rows,
        ),
        "",
        "The threshold is 2/η for GD and λ_SAM(η, ρ, ‖g‖_t) for SAM. With cross-entropy, "
        "λ_max falls once the fit nears completion (Cohen et al. 2021, Sec. 3, and the "
        "figure): a run can sit at its edge early and leave it before the second half.",
    ]


def figures(config, results) -> dict:
    e = config.sam_study.eos
    fig = plotting.figure((12, 4))
    ax_q, ax_t = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, q in enumerate(results["quadratic"]):
        x = np.asarray(q["lambdas"]) / q["lambda_sam"]
        ax_q.plot(x, q["growth"], marker=".", color=f"C{i}", label=f"‖g‖ = {q['grad_norm']:g}")
    ax_q.axvline(1.0, color="k", ls=":", lw=0.8)
    ax_q.axhline(1.0, color="k", lw=0.5)
    ax_q.set_yscale("log")
    ax_q.set_ylim(1e-8, 1e3)
    ax_q.set_xlabel("λ / λ_SAM(η, ρ, ‖g‖)")
    ax_q.set_ylabel("|x₁| after / before")
    ax_q.set_title("quadratic: SAM's stability edge")
    ax_q.legend(fontsize=8)
    for i, arm in enumerate(results["arms"].values()):
        first = next((v for v in arm["seeds"].values() if v is not None), None)
        if first is None:
            continue
        t = first["trajectory"]
        ax_t.plot(t["step"], t["lambda_max"], color=f"C{i}", label=f"{arm['label']}: λ_max")
        ax_t.plot(t["step"], t["threshold"], color=f"C{i}", ls="--", lw=1,
                  label=f"{arm['label']}: threshold")  # fmt: skip
    ax_t.set_xlabel("step")
    ax_t.set_title(f"full batch, η = {e.learning_rate:g}, first seed (dashed: 2/η, λ_SAM)")
    ax_t.legend(fontsize=8)
    return {"eos": fig}


SECTION = Section(
    name="eos",
    title="SAM's edge of stability",
    run=run,
    report=report,
    claims=claims,
    figures=figures,
    validate=validate,
)
