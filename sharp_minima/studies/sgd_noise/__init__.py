"""The lecture notes "Towards Understanding SGD" (lecture 6): parameterisation and flatness,
toy sharpness, linear scaling with warm-up, the SGD noise scale and the optimal batch size,
the three factors, the SDE picture and the critical batch size.

``run(config, workdir)`` runs the sections named in ``config.sections``
(`sharp_minima.studies.sections`); every training sweep is a population of small models
trained in one vmapped, compiled program (`sharp_minima.train.Population`), cached in
``workdir/sgd_noise.json`` (+ .npz) as soon as it ends, so an interrupted study resumes sweep
by sweep and measurement by measurement. One file per section:

- ``rescaling`` (`rescaling`): a ReLU network rescaled layer by layer (Dinh et al. 2017)
  against λ_max, tr H, Keskar's φ, a filter-normalised slice and adaptive sharpness;
- ``toy`` (`toy`): the lecture's Table 1, φ of four toy functions (float64);
- ``scaling`` (`scaling`): linear scaling with no, constant or gradual warm-up (Goyal et al.);
- ``noise_scale`` (`noise_scale`): B_opt against η and N, decaying η against growing B
  (Smith & Le 2018; Smith et al. 2018);
- ``factors`` (`factors`): endpoints on lines of constant η/B (Jastrzębski et al. 2017);
- ``sde`` (`sde`): spread, double-well occupation, escape times, the noisy quadratic model;
- ``critical`` (`critical`): steps to a target against B, the critical batch size against
  B_simple (McCandlish et al. 2018; Shallue et al. 2019).

`kit` holds what they share (the population, seeds, the curvature subset, table helpers).

Conventions (stated in the report): the lecture sums the loss over N (its eq. 6), so its
noise scale g = η(N/B − 1) carries a factor N; with the mean loss used here the SDE
noise scale is (η/B)(1 − B/N) (× 1/(1 − μ) with momentum μ; `gradients.noise_scale`) and the
temperature T = ησ²(1 − B/N)/(2B) (`gradients.temperature`), the T of exp(−L/T); the lecture's
eq. (26) drops the factor 2 of its eq. (25).
"""

from __future__ import annotations

from sharp_minima import train
from sharp_minima.studies.sections import Study, contract_functions
from sharp_minima.studies.sgd_noise import (
    critical,
    factors,
    kit,
    noise_scale,
    rescaling,
    scaling,
    sde,
    toy,
)
from sharp_minima.studies.sgd_noise.critical import steps_to_target
from sharp_minima.studies.sgd_noise.noise_scale import best_batch
from sharp_minima.studies.sgd_noise.scaling import ARMS, GOYAL_8K, warmup_schedule
from sharp_minima.studies.sgd_noise.toy import LECTURE_TABLE1, TOYS

__all__ = ["ARMS", "GOYAL_8K", "LECTURE_TABLE1", "SECTIONS", "STUDY", "TOYS", "best_batch",
           "claims", "figures", "report_markdown", "run", "steps_to_target", "validate",
           "warmup_schedule"]  # fmt: skip


def validate(config) -> None:
    """The study's own fields (each section checks its own before any work).

    Raises:
      sharp_minima.train.ConfigError: naming the field.
    """
    if "sgd_noise" not in config:
        raise train.ConfigError(f"config {config.name!r} has no 'sgd_noise' section")
    kit.check_fields(
        config,
        (
            ("sgd_noise.seeds", dict(low=1, integer=True)),
            ("sgd_noise.curvature_examples", dict(low=2, integer=True)),
            ("sgd_noise.curvature_batch_size", dict(low=1, integer=True)),
        ),
    )


def header(config, results) -> list:
    s, d = config.sgd_noise, results.get("data")
    if d is None:
        scale = "**Scale.** Toy functions and simulations only (no network trained)."
    else:
        scale = (
            f"**Scale.** {config.model.name} {dict(config.model.kwargs)} ({d['num_params']:,} "
            f"parameters) on {d['num_train']:,} {d['name']} training examples ({d['source']}), "
            f"{d['num_test']:,} test examples; plain SGD; {train.plural(s.seeds, 'seed')} per "
            "setting (mean), every sweep a population trained in one vmapped program. λ_max, "
            f"traces, φ and log det on the first {s.curvature_examples:,} training examples. "
            "The sources: ResNet-50 on ImageNet (Goyal), MNIST (Smith & Le), Wide-ResNet on "
            "CIFAR-10 (Smith et al.), MLPs/ResNets on Fashion-MNIST/CIFAR-10 (Jastrzębski), "
            "language models and image classifiers (McCandlish, Shallue)."
        )
    return [
        scale,
        "",
        "**Conventions.** The lecture sums the loss over the N examples (its eq. 6), so its "
        "noise scale g = η(N/B − 1) carries a factor N; with the mean loss used here the SDE "
        "noise scale is (η/B)(1 − B/N), × 1/(1 − μ) with momentum μ "
        "(`gradients.noise_scale`), and the temperature, the T of the stationary density "
        "∝ exp(−L/T), is T = ησ²(1 − B/N)/(2B) for per-example gradient variance σ² "
        "(`gradients.temperature`): the noise scale × σ²/2. The lecture's eq. (26) drops the "
        "factor 2 of its eq. (25).",
    ]


STUDY = Study(
    name="sgd_noise",
    title=lambda config: f'The lecture notes "Towards Understanding SGD" — {config.name}',
    sections=(
        rescaling.SECTION,
        toy.SECTION,
        scaling.SECTION,
        noise_scale.SECTION,
        factors.SECTION,
        sde.SECTION,
        critical.SECTION,
    ),
    validate=validate,
    prepare=kit.prepare,
    header=header,
    describe=kit.describe,
)
SECTIONS = tuple(s.name for s in STUDY.sections)


run, claims, figures, report_markdown = contract_functions(
    STUDY,
    __name__,
    run="""Runs the sections of ``config.sections`` (resuming), writes ``report.md``,
    ``results.json`` and the figures.""",
    claims="""Every section's claims, each prefixed with its section number.""",
    figures="""One or two figures per section that has them (Figures, nothing saved).""",
    report_markdown="""``report.md``: the scale of this run, the claims, the sources' numbers
    beside ours.""",
)
