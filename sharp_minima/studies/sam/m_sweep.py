"""Section ``m_sweep``: SAM's test accuracy against m, the size of the groups that take their
own perturbation (m-sharpness).

Andriushchenko & Flammarion (ICML 2022) find m-sharpness essential to SAM's generalisation:
at one ρ, smaller groups generalise better (Foret et al. saw it in their per-device
perturbation). Each arm is SAM with ``m_sweep.rho`` and ``sam.group_size = m`` on the clean
data (m = the batch is plain SAM), scored by the early-stopped test accuracy; SGD alongside.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sharp_minima import plotting, train
from sharp_minima.studies import claims as claims_lib
from sharp_minima.studies.claims import Claim
from sharp_minima.studies.common import markdown_table
from sharp_minima.studies.sam import kit
from sharp_minima.studies.sections import Section

SMALL_M = Claim(
    statement="at one ρ, SAM with the smallest m generalises better than SAM with m = the batch",
    source="Andriushchenko & Flammarion (ICML 2022), Sec. 3 and Fig. 1; Foret et al. (ICLR "
    "2021), Sec. 4.1",
    quantity="test accuracy at the best validation epoch, smallest m − (m = batch) (paired by "
    "seed), predicted > the threshold",
    noise=claims_lib.SEEDS,
    threshold="sam_study.m_sweep.claims.gain",
    origin="the source's direction (any gain), fixed before the run",
    min_seeds=3,
)


def arms(config) -> list[kit.Arm]:
    m = config.sam_study.m_sweep
    sizes = sorted(m.group_sizes, reverse=True)
    return [
        dataclasses.replace(
            kit.sam(m.rho, group_size=0 if g == config.batch_size else g),
            label=f"SAM ρ={m.rho:g}, m={g}",
        )
        for g in sizes
    ]


def validate(config) -> None:
    m = config.sam_study.m_sweep
    train.check_numbers(config, "sam_study.m_sweep.group_sizes", low=1, integer=True)
    train.check_numbers(config, "sam_study.m_sweep.rho", low=0, low_open=True)
    bad = [g for g in m.group_sizes if config.batch_size % g]
    if bad:
        raise train.ConfigError(
            f"sam_study.m_sweep.group_sizes: {bad} do not divide batch_size={config.batch_size}"
        )
    if len(m.group_sizes) < 2:
        raise train.ConfigError("sam_study.m_sweep.group_sizes: need at least two group sizes")


def run(ctx) -> dict:
    return {"arms": kit.Runs(ctx, ctx.data, ctx.shared).train_all([kit.sgd()] + arms(ctx.config))}


def _m(config, arm_name: str) -> int:
    return int(arm_name.split("_m")[1]) if "_m" in arm_name else config.batch_size


def claims(config, results) -> list:
    a = results["arms"]
    names = [x.name for x in arms(config)]  # largest m first
    big, small = a[names[0]], a[names[-1]]
    gain, noise, n = kit.paired(small, big, "test_accuracy")
    return [
        SMALL_M.test(
            gain - SMALL_M.threshold_of(config),
            noise,
            f"m={_m(config, names[-1])}: {kit.mean_pm(small, 'test_accuracy')} % vs "
            f"m={_m(config, names[0])}: {kit.mean_pm(big, 'test_accuracy')} %: gain "
            f"{100 * gain:+.1f} points, noise unit {100 * noise:.1f}",
            seeds=n,
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
    return [
        f"SAM at ρ = {config.sam_study.m_sweep.rho:g} with groups of m examples, batch "
        f"{config.batch_size}, clean labels; test accuracy (%) at the best validation epoch "
        "and the final λ_max (mean ± standard error over seeds).",
        "",
        *markdown_table(("arm", "early-stopped test acc.", "final λ_max"), rows),
    ]


def figures(config, results) -> dict:
    a = results["arms"]
    names = [x.name for x in arms(config)]
    ms = np.asarray([_m(config, n) for n in names], float)
    fig = plotting.figure((5.5, 4))
    ax = fig.add_subplot(1, 1, 1)
    stats = [kit.stat(a[n], "test_accuracy") for n in names]
    mean = np.asarray([np.nan if s is None else 100 * s["mean"] for s in stats])
    se = np.asarray(
        [np.nan if s is None or s["n"] < 2 else 100 * s["std"] / np.sqrt(s["n"]) for s in stats]
    )
    ax.errorbar(
        ms, mean, yerr=se, marker="o", capsize=3, label=f"SAM ρ={config.sam_study.m_sweep.rho:g}"
    )
    sgd = kit.stat(a["sgd"], "test_accuracy")
    if sgd is not None:
        ax.axhline(100 * sgd["mean"], color="k", ls=":", label="SGD")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("m (examples per perturbation group)")
    ax.set_ylabel("early-stopped test accuracy (%)")
    ax.set_title("m-sharpness (mean ± s.e. over seeds)")
    ax.legend(fontsize=8)
    return {"m_sweep": fig}


SECTION = Section(
    name="m_sweep",
    title="m-sharpness: test accuracy against m",
    run=run,
    report=report,
    claims=claims,
    figures=figures,
    validate=validate,
)
