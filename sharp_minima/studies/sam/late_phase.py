"""Section ``late_phase``: SGD, then SAM for the last ``late_phase.fraction`` of the epochs.

Zhou et al. (ICLR 2025) find that "even a few epochs of SAM applied at the end of training
yield nearly the same generalization and solution sharpness as full SAM training". Three
arms on the clean data: SGD and SAM for all the epochs (the runs the ``curvature`` section
trains, shared), and SGD for the first (1 − fraction) of the epochs followed by SAM from its
parameters for the rest (a fresh momentum buffer at the switch). Each is scored by its test
accuracy at its best validation epoch (the late arm's over its SAM epochs).
"""

from __future__ import annotations

import dataclasses

from sharp_minima import plotting, train
from sharp_minima.studies import claims as claims_lib
from sharp_minima.studies import runs
from sharp_minima.studies.claims import Claim
from sharp_minima.studies.common import markdown_table
from sharp_minima.studies.sam import kit
from sharp_minima.studies.sections import Section

MOST = Claim(
    statement="SAM for the last epochs only gets most of full SAM's gain over SGD",
    source="Zhou et al. (ICLR 2025), abstract and Sec. 4",
    quantity="(late − SGD) − share × (SAM − SGD) in early-stopped test accuracy (paired by "
    "seed), predicted > 0",
    noise=claims_lib.SEEDS,
    threshold="sam_study.late_phase.claims.share",
    origin='"most of": more than half, fixed before the run',
    min_seeds=3,
)


def epochs(config) -> tuple[int, int]:
    """(SGD epochs, SAM epochs) of the late arm."""
    late = max(1, round(config.sam_study.late_phase.fraction * config.num_epochs))
    return config.num_epochs - late, late


def arms(config):
    first, late = epochs(config)
    sam = kit.sam(config.sam_study.rho)
    prefix = kit.Arm(f"sgd_first{first}", f"SGD, {first} epochs", (("num_epochs", first),))
    late_arm = kit.Arm(
        f"late_{sam.name}_last{late}",
        f"SGD → SAM ρ={config.sam_study.rho:g} (last {late} epochs)",
        sam.changes + (("num_epochs", late),),
    )
    full = dataclasses.replace(sam, label=f"SAM ρ={config.sam_study.rho:g} (all epochs)")
    return kit.sgd(), full, prefix, late_arm


def validate(config) -> None:
    p = "sam_study.late_phase."
    train.check_numbers(config, p + "fraction", low=0, low_open=True, high=1, high_open=True)
    train.check_numbers(config, p + "claims.share", low=0, high=1)
    if config.num_epochs < 2:
        raise train.ConfigError("late_phase needs num_epochs >= 2 (an SGD part and a SAM part)")


def run(ctx) -> dict:
    config, data, model = ctx.config, ctx.data, ctx.shared
    bench = kit.Runs(ctx, data, model)
    sgd, sam, prefix, late = arms(config)
    out = bench.train_all((sgd, sam))
    first, n_late = epochs(config)
    # λ_max at the end of the late arm too: the largest divisor of its epochs up to the rest's
    every = max(d for d in range(1, config.sam_study.curvature.every_epochs + 1) if n_late % d == 0)
    per_seed = {}
    for seed in kit.seeds(config):
        result, _ = bench.train(prefix, seed)
        if isinstance(result, runs.Diverged):
            per_seed[str(seed)] = None
            continue
        result, folder = bench.train(
            late, seed, every_epochs=every, init_variables=result.state.variables()
        )
        diverged = isinstance(result, runs.Diverged)
        per_seed[str(seed)] = None if diverged else kit.summarize(folder, epoch_offset=first)
    out[late.name] = {"label": late.label, "seeds": per_seed}
    return {"arms": out}


def claims(config, results) -> list:
    a = results["arms"]
    sgd_name, sam_name, _, late_name = (x.name for x in arms(config))
    share = MOST.threshold_of(config)
    sgd, sam, late = a[sgd_name], a[sam_name], a[late_name]
    fs, fm, fl = (kit.per_seed(x, "test_accuracy") for x in (sgd, sam, late))
    margins = [(fl[s] - fs[s]) - share * (fm[s] - fs[s]) for s in fs if s in fm and s in fl]
    st = claims_lib.seed_stat(margins)
    full, _, _ = kit.paired(sam, sgd, "test_accuracy")
    part, _, n = kit.paired(late, sgd, "test_accuracy")
    got = f"{part / full:.0%} of it" if full else "—"
    return [
        MOST.test(
            float("nan") if st is None else st["mean"],
            claims_lib.seed_noise(st),
            f"gain over SGD ({kit.mean_pm(sgd, 'test_accuracy')} %): full SAM {100 * full:+.1f} "
            f"points, late SAM {100 * part:+.1f} points ({got}; the claim needs > {share:.0%})",
            seeds=None if st is None else st["n"],
        )
    ]


def report(config, results) -> list[str]:
    rows = [
        (
            arm["label"],
            kit.mean_pm(arm, "test_accuracy"),
            kit.mean_pm(arm, "final_lambda_max", 1, 2),
        )
        for arm in results["arms"].values()
    ]
    first, late = epochs(config)
    lines = [
        f"{config.num_epochs} epochs in all; the late arm trains SGD for {first} and SAM for "
        f"the last {late} (a fresh momentum buffer at the switch). Test accuracy (%) at the "
        "best validation epoch and the final λ_max (mean ± standard error over seeds).",
        "",
        *markdown_table(("arm", "early-stopped test acc.", "final λ_max"), rows),
    ]
    late_arm = results["arms"][arms(config)[3].name]
    curve = kit.mean_curve(late_arm, "curve", "test_accuracy")
    if curve is not None:
        acc = 100 * curve[1]
        last = f" ({acc[-1] - acc[-2]:+.1f} points in the last epoch)" if len(acc) > 1 else ""
        lines += [
            "",
            f"After the switch the late arm's test accuracy (mean over seeds) is {acc[0]:.1f} % "
            f"after its first SAM epoch, {acc.min():.1f} % at its lowest and {acc[-1]:.1f} % at "
            f"the end{last}.",
        ]
    return lines


def figures(config, results) -> dict:
    fig = plotting.figure((11, 4))
    ax_acc, ax_lam = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, arm in enumerate(results["arms"].values()):
        acc = kit.mean_curve(arm, "curve", "test_accuracy")
        lam = kit.mean_curve(arm, "lambda_curve", "value")
        if acc is not None:
            ax_acc.plot(acc[0], 100 * acc[1], color=f"C{i}", label=arm["label"])
        if lam is not None:
            ax_lam.plot(*lam, color=f"C{i}", marker=".")
    first, _ = epochs(config)
    for ax in (ax_acc, ax_lam):
        ax.axvline(first, color="k", ls=":", lw=0.8)
        ax.set_xlabel("epoch")
    ax_acc.set_title("test accuracy (%, mean over seeds)")
    ax_lam.set_title("λ_max (mean over seeds)")
    ax_lam.set_yscale("log")
    ax_acc.legend(fontsize=8)
    return {"late_phase": fig}


SECTION = Section(
    name="late_phase",
    title="Late-phase SAM",
    run=run,
    report=report,
    claims=claims,
    figures=figures,
    validate=validate,
)
