"""Huang et al. (2020), "Understanding Generalization Through Visualizations": bad minima on
purpose, and the geometry around good and bad minima.

``run(config, workdir)`` runs the sections named in ``config.sections``
(`sharp_minima.studies.sections`), one file each:

- ``swissroll`` (`swissroll`, Figs. 3, 5, 6): the authors' data and MLP trained naturally
  (β = 0) and with the anti-generalization loss (eq. 3) or label-flip poisoning for several
  β; accuracies, basin radii and log-volumes, decision boundaries, 2-D surfaces;
- ``tsne`` (`tsne`, Fig. 1): the natural run's iterates and the bad minima found from them,
  embedded with t-SNE;
- ``rings`` (`rings`, Fig. 8): two rings of classes with a wide or a pinched gap;
- ``optimizers`` (`optimizers`, Table 1): many optax optimizers against a linear model.

`training` holds what they share: the data with D_d, the runs' configs, training to a fit,
the landscapes of a minimum (`training.Geometry`). Every training run is a resumable
`sharp_minima.train.train` run under ``workdir/runs/``; measurements are cached next to it
(``measure.json``), so re-running continues where a killed run stopped. ``run`` writes
``report.md`` (the paper's numbers beside ours, a verdict per claim), ``results.json`` and
figures (PNG + PDF).
"""

from __future__ import annotations

from sharp_minima.studies.sections import Study, contract_functions
from sharp_minima.studies.visualize_generalization import (
    optimizers,
    rings,
    swissroll,
    training,
    tsne,
)
from sharp_minima.studies.visualize_generalization.optimizers import OPTIMIZERS, PAPER_TABLE1
from sharp_minima.studies.visualize_generalization.swissroll import PAPER
from sharp_minima.studies.visualize_generalization.training import POISONS, load_data, validate

__all__ = ["OPTIMIZERS", "PAPER", "PAPER_TABLE1", "POISONS", "SECTIONS", "STUDY", "claims",
           "figures", "load_data", "report_markdown", "run", "validate"]  # fmt: skip

STUDY = Study(
    name="visualize_generalization",
    title=lambda config: f"Huang et al. (2020) — {config.name}",
    sections=(swissroll.SECTION, tsne.SECTION, rings.SECTION, optimizers.SECTION),
    validate=training.validate,
    load_data=training.load_data,
    describe=lambda ctx: {"paper": PAPER},
)
SECTIONS = tuple(s.name for s in STUDY.sections)


run, claims, figures, report_markdown = contract_functions(
    STUDY,
    __name__,
    run="""Runs the sections of ``config.sections`` (resuming), writes ``report.md``,
    ``results.json`` and figures. ``data``, when given, is the swiss-roll (or SVHN) data with
    D_d in ``x_extra``.""",
    claims="""A verdict per claim of the paper this run tests, with the numbers, prefixed with its
    section's number. Accuracies differ only beyond their noise (the standard error over
    seeds plus the test set's sampling error), log-volumes beyond their standard error over
    seeds; claims whose runs diverged read "not tested".""",
    figures="""decision_boundaries, surfaces, volume (swiss roll), tsne, rings — each when its
    section ran (Figures, nothing saved).""",
    report_markdown="""``report.md``: the claims, then per section the setup and this run's
    table beside the
    paper's numbers.""",
)
