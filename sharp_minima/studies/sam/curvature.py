"""Section ``curvature``: what SAM does to the curvature of the minimum it finds.

SGD and SAM (ρ = ``sam_study.rho``) on the clean data; λ_max is tracked along training
(`sharp_minima.tracking.EigenTracker`, every ``curvature.every_epochs`` epochs) and, at the
end of training, λ_max, tr H (Hutch++) and the adaptive sharpness (Kwon et al.: the largest
loss rise in the box |δ_i| ≤ ε|w_i|, found by L-BFGS-B; `sharp_minima.sharpness`) are
measured on the first ``curvature_examples`` training examples (a fixed random draw).
Foret et al. (ICLR 2021, Fig. 3) show SAM's final Hessian spectrum with a far smaller
λ_max than SGD's.
"""

from __future__ import annotations

import jax
import numpy as np

from sharp_minima import losses, plotting, sharpness, train
from sharp_minima.studies import claims as claims_lib
from sharp_minima.studies.claims import Claim, all_of, verdict
from sharp_minima.studies.common import key_streams, markdown_table
from sharp_minima.studies.sam import kit
from sharp_minima.studies.sections import Section

FLATTER = Claim(
    statement="SAM ends in a flatter minimum than SGD: lower λ_max, tr H and adaptive sharpness",
    source="Foret et al. (ICLR 2021), Sec. 4.2 and Fig. 3; Kwon et al. (ICML 2021), Sec. 3",
    quantity="log(SGD's value / SAM's) for each of the three (paired by seed), predicted > "
    "log(threshold)",
    noise=claims_lib.SEEDS,
    threshold="sam_study.curvature.claims.ratio",
    origin="the source's direction (any reduction), fixed before the run",
    min_seeds=3,
)
MEASURES = (
    ("lambda_max", "λ_max"),
    ("trace", "tr H"),
    ("adaptive_sharpness", "adaptive sharpness (%)"),
)


def arms(config) -> list[kit.Arm]:
    return [kit.sgd(), kit.sam(config.sam_study.rho)]


def validate(config) -> None:
    v = "sam_study.curvature."
    train.check_numbers(config, v + "every_epochs", low=1, integer=True)
    train.check_numbers(config, v + "trace_matvecs", low=3, integer=True)
    train.check_numbers(config, v + "adaptive_epsilon", low=0, low_open=True)
    train.check_numbers(config, v + "tol", low=0, low_open=True, high=1, high_open=True)
    train.check_numbers(config, v + "claims.ratio", low=0, low_open=True)


def run(ctx) -> dict:
    config, data, model = ctx.config, ctx.data, ctx.shared
    v = config.sam_study.curvature
    bench = kit.Runs(ctx, data, model)
    subset, curv = bench.subset, bench.curvature  # one Curvature for tracking and measuring
    batches, weights = subset(0)
    meter = sharpness.SharpnessMeter(losses.evaluation_loss(model), wrt="^params/")
    keys = key_streams(config.seed, "sam/final")

    def measure(arm, seed, result):
        step = int(result.state.step)
        params = result.state.variables()

        def compute():
            ctx.log(f"[{arm.name} s{seed}] measuring the final λ_max, tr H, adaptive sharpness")
            k1, k2, k3 = jax.random.split(jax.random.fold_in(keys["sam/final"], seed), 3)
            top = curv.eigenpairs(params, batches, k=1, key=k1, weights=weights, tol=v.tol)
            tr = curv.trace(params, batches, key=k2, num_matvecs=v.trace_matvecs, weights=weights)
            phi = meter.epsilon_sharpness(
                params, batches, epsilon=v.adaptive_epsilon, key=k3, weights=weights, adaptive=True
            )
            return {
                "lambda_max": float(top.values[0]),
                "trace": float(tr.value),
                "trace_se": float(tr.stderr),
                "adaptive_sharpness": float(phi.value),
            }

        key = {"step": step, "examples": subset.size, "settings": v.to_dict(), "v": 1}
        return ctx.cache.get(f"curvature/{arm.name}/seed{seed}", key, compute)

    return {
        "examples": subset.size,
        "arms": bench.train_all(arms(config), measure=measure),
    }


def claims(config, results) -> list:
    a = results["arms"]
    sgd, sam = (a[x.name] for x in arms(config))
    log_t = float(np.log(FLATTER.threshold_of(config)))
    parts, nums, n_min = [], [], None
    for field, label in MEASURES:
        gain, noise, n = kit.paired(sgd, sam, field, transform=np.log)
        parts.append(verdict(gain - log_t, noise))
        n_min = n if n_min is None else min(n_min, n)
        nums.append(
            f"{label}: SGD {kit.mean_pm(sgd, field, 1, 3)}, SAM {kit.mean_pm(sam, field, 1, 3)} "
            f"(ratio {np.exp(gain):.2f}, log-ratio noise unit {noise:.2f})"
        )
    return [FLATTER.given(all_of(parts), "; ".join(nums), seeds=n_min)]


def report(config, results) -> list[str]:
    v = config.sam_study.curvature
    rows = [
        (arm["label"], kit.mean_pm(arm, "test_accuracy"))
        + tuple(kit.mean_pm(arm, f, 1, 3) for f, _ in MEASURES)
        for arm in results["arms"].values()
    ]
    return [
        f"At the end of training, on {results['examples']} training examples (mean "
        "cross-entropy, no regulariser): λ_max (Lanczos, relative tolerance "
        f"{v.tol:g}), tr H (Hutch++, {v.trace_matvecs} products) and the adaptive sharpness "
        f"(ε = {v.adaptive_epsilon:g}, L-BFGS-B, 10 iterations, % of 1 + L); mean ± "
        "standard error over seeds. Foret et al. (Fig. 3, WRN on CIFAR-10) show a far "
        "smaller λ_max for SAM; their paper's text is not among our sources, so no number "
        "of theirs is quoted.",
        "",
        *markdown_table(
            ("arm", "early-stopped test acc. (%)", *(label for _, label in MEASURES)), rows
        ),
    ]


def figures(config, results) -> dict:
    a = results["arms"]
    fig = plotting.figure((11, 4))
    ax, bars = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, arm in enumerate(a.values()):
        for v in arm["seeds"].values():
            if v is not None:
                ax.plot(v["lambda_curve"]["epoch"], v["lambda_curve"]["value"], color=f"C{i}",
                        alpha=0.35, lw=0.8)  # fmt: skip
        curve = kit.mean_curve(arm, "lambda_curve", "value")
        if curve is not None:
            ax.plot(*curve, color=f"C{i}", lw=2, label=arm["label"])
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_title("λ_max along training (thin: seeds)")
    ax.legend(fontsize=8)
    sgd, sam = (a[x.name] for x in arms(config))
    ratios = []
    for field, _ in MEASURES:
        gain, noise, _ = kit.paired(sgd, sam, field, transform=np.log)
        ratios.append((np.exp(gain), noise))
    x = np.arange(len(MEASURES))
    bars.bar(x, [r for r, _ in ratios], color="C1")
    bars.errorbar(x, [r for r, _ in ratios],
                  yerr=[[r - r * np.exp(-2 * u) for r, u in ratios],
                        [r * np.exp(2 * u) - r for r, u in ratios]],
                  fmt="none", color="k", capsize=4)  # fmt: skip
    bars.axhline(1.0, color="k", lw=0.8, ls=":")
    bars.set_xticks(x, [label.split(" (")[0] for _, label in MEASURES])
    bars.set_title("SGD's value / SAM's at the end (bars: 2 noise units)")
    return {"curvature": fig}


SECTION = Section(
    name="curvature",
    title="What SAM does to curvature",
    run=run,
    report=report,
    claims=claims,
    figures=figures,
    validate=validate,
)
