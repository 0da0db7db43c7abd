"""Sharpness-aware minimisation: what SAM, ASAM and m-sharpness do to generalisation and to
curvature (Foret et al. 2021; Kwon et al. 2021; Andriushchenko & Flammarion 2022; Baek,
Kolter & Raghunathan 2024; Zhou et al. 2025; Agarwala & Dauphin 2023; Long & Bartlett 2024).

``run(config, workdir)`` runs the sections named in ``config.sections``
(`sharp_minima.studies.sections`); every run trains with the trainer (`sharp_minima.train`,
SAM through ``config.sam``: `sharp_minima.optim.sam`) into ``workdir/runs/<arm>/seed<s>/``,
resumable, with λ_max tracked along the way; an arm two sections use trains once. One file
per section:

- ``label_noise`` (`label_noise`): SGD, SAM and ASAM with symmetric label noise;
- ``m_sweep`` (`m_sweep`): test accuracy against the group size m of m-sharpness;
- ``curvature`` (`curvature`): λ_max, tr H and adaptive sharpness of SGD's and SAM's minima;
- ``eos`` (`eos`): SAM's edge of stability on a quadratic and in full-batch training;
- ``late_phase`` (`late_phase`): SAM for the last epochs only.

`kit` holds what they share (arms, training one arm, early-stopped accuracies, paired gains).
"""

from __future__ import annotations

from sharp_minima import train
from sharp_minima.studies.sam import curvature, eos, kit, label_noise, late_phase, m_sweep
from sharp_minima.studies.sections import Study, contract_functions

__all__ = ["SECTIONS", "STUDY", "claims", "figures", "report_markdown", "run", "validate"]


def validate(config) -> None:
    """The study's own fields (each section checks its own before any work).

    Raises:
      sharp_minima.train.ConfigError: naming the field.
    """
    if "sam_study" not in config:
        raise train.ConfigError(f"config {config.name!r} has no 'sam_study' section")
    train.validate_config(config)
    for path, kw in (
        ("sam_study.seeds", dict(low=1, integer=True)),
        ("sam_study.rho", dict(low=0, low_open=True)),
        ("sam_study.asam_rho", dict(low=0, low_open=True)),
        ("sam_study.curvature_examples", dict(low=1, integer=True)),
        ("sam_study.curvature_batch_size", dict(low=1, integer=True)),
    ):
        train.check_numbers(config, path, **kw)
    if config.sam.rho:
        raise train.ConfigError(
            "config.sam.rho must be 0 in the SAM study: each arm sets its own "
            "(sam_study.rho, sam_study.asam_rho, sam_study.m_sweep.rho)"
        )
    if not config.data.validation_fraction:
        raise train.ConfigError(
            "the SAM study stops early on validation accuracy: set "
            "config.data.validation_fraction > 0"
        )


def header(config, results) -> list:
    s, d = config.sam_study, results.get("data")
    data = (
        f"{d['num_train']:,} {d['name']} training examples ({d['source']}), {d['num_val']:,} "
        f"for validation, {d['num_test']:,} test examples"
        if d
        else config.data.name
    )
    return [
        f"**Scale.** {config.model.name} {dict(config.model.kwargs)} on {data}; "
        f"{config.optim.name} η = {config.optim.learning_rate:g}"
        + (f", μ = {config.optim.momentum:g}" if config.optim.name == "momentum" else "")
        + f", batch {config.batch_size}, {train.plural(config.num_epochs, 'epoch')}, "
        f"{train.plural(s.seeds, 'seed')} per arm (each seed: the same initialisation and data "
        "order in every arm, so differences are paired by seed). SAM ρ = "
        f"{s.rho:g} ({s.rho_origin}; the m-sweep's ρ = {s.m_sweep.rho:g}), ASAM ρ = "
        f"{s.asam_rho:g} (davda54's CIFAR-10 value, η = {config.sam.eta:g}). Accuracies are "
        "test accuracies at the epoch of the best validation accuracy. The sources train "
        "WRN-28-10 / WRN-16-8 / ResNets on CIFAR-10/100 and ImageNet for 200 epochs "
        "(`configs/sam.py:cifar10` is the nearest config the model zoo allows).",
    ]


def describe(ctx) -> dict:
    """The data set, for the header."""
    d = ctx.data
    if d is None:
        return {}
    return {
        "data": {
            "name": d.name,
            "source": d.source,
            "num_train": len(d.x_train),
            "num_val": 0 if d.x_val is None else len(d.x_val),
            "num_test": len(d.x_test),
        }
    }


STUDY = Study(
    name="sam",
    title=lambda config: f"Sharpness-aware minimisation — {config.name}",
    sections=(
        label_noise.SECTION,
        m_sweep.SECTION,
        curvature.SECTION,
        eos.SECTION,
        late_phase.SECTION,
    ),
    validate=validate,
    prepare=kit.prepare,
    header=header,
    describe=describe,
)
SECTIONS = tuple(s.name for s in STUDY.sections)


run, claims, figures, report_markdown = contract_functions(
    STUDY,
    __name__,
    run="""Runs the sections of ``config.sections`` (resuming), writes ``report.md``,
    ``results.json`` and the figures.""",
    claims="""Every section's claims, each prefixed with its section number.""",
    figures="""One figure per section (Figures, nothing saved).""",
    report_markdown="""``report.md``: the scale of this run, the claims, the sources' numbers
    beside ours.""",
)
