"""The study contract (`sharp_minima.studies`), for every study on its tiny config (run once
per session by the ``tiny_study`` fixture): ``figures`` returns Figures and writes nothing,
``write_outputs`` saved what they draw, and a second ``run`` recomputes nothing."""

import importlib
import os
import re

import numpy as np
import pytest
from conftest import TINY
from helpers import figure_overlaps
from matplotlib.figure import Figure
from matplotlib.layout_engine import ConstrainedLayoutEngine

from sharp_minima.studies import common

# Lines a study logs only when it trains (progress, evaluations) or measures something.
WORK = re.compile(
    r"step \d+/\d+ epoch|epoch \d+/\d+:|sharpness full|basin radii|measuring the final"
    r"|parametric plot|\] done: \d+ steps|\] measuring "
)


def _files(folder):
    return {
        os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
        for d, _, fs in os.walk(folder)
        for f in fs
    }


@pytest.mark.parametrize("name", sorted(TINY))
def test_figures_are_returned_not_saved_and_a_second_run_recomputes_nothing(
    name, tiny_study, tmp_path, monkeypatch
):
    study = importlib.import_module(f"sharp_minima.studies.{name}")
    run = tiny_study(name)
    assert any(WORK.search(line) for line in run.lines)  # the first run worked
    before = _files(run.workdir)
    monkeypatch.chdir(tmp_path)
    figures = study.figures(run.config, run.results)
    assert figures and all(isinstance(f, Figure) for f in figures.values())
    for fig_name, fig in figures.items():  # labels clear of the neighbouring panels
        assert isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine), fig_name
        assert not figure_overlaps(fig), (fig_name, figure_overlaps(fig))
    assert _files(run.workdir) == before and not os.listdir(tmp_path)  # nothing written
    for fig in figures:  # write_outputs saved each: a smoke test as PNG alone, not PDF too
        assert os.path.getsize(os.path.join(run.workdir, f"{fig}.png")) > 0
        assert not os.path.exists(os.path.join(run.workdir, f"{fig}.pdf"))
    assert common.figure_formats(run.config) == ("png",)
    report = study.report_markdown(run.config, run.results)
    assert report == open(os.path.join(run.workdir, "report.md")).read()
    # Issue 29: every claim names its source; a tiny run is a smoke test without counts.
    claims = run.results["claims"]
    assert all(c["source"] for c in claims) or not claims, [c for c in claims if not c["source"]]
    if claims:
        assert "Smoke test" in report and "Verdicts:" not in report

    again = []
    results = study.run(run.config, run.workdir, log=again.append)
    assert not [line for line in again if WORK.search(line)]
    np.testing.assert_equal(results, run.results)
    cached = {p: t for p, t in _files(run.workdir).items() if "checkpoint" in p}
    assert cached == {p: t for p, t in before.items() if "checkpoint" in p}  # none rewritten
    # The figures are not saved again: same results, same drawing code (.figures-stamp).
    drawn = lambda files: {p: t for p, t in files.items() if p.endswith((".png", ".pdf"))}  # noqa: E731
    assert drawn(_files(run.workdir)) == drawn(before) and drawn(before)


def test_run_folders_are_named_in_one_place():
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for dirpath, _, files in os.walk(os.path.join(root, "sharp_minima")):
        for f in files:
            if f.endswith(".py") and f != "runs.py":
                text = open(os.path.join(dirpath, f)).read()
                assert 'join(workdir, "runs"' not in text, f


# Trainer fields read only by the option that uses them: an optimizer's own hyperparameters,
# early stopping's details (patience > 0), a schedule's (its name), conservative training's
# (optim.proximal > 0), optim.decoupled (adamw with weight decay), SAM's (sam.rho > 0).
CONDITIONAL = {
    "early_stop.metric",
    "early_stop.min_delta",
    "optim.b1",
    "optim.b2",
    "optim.eps",
    "optim.momentum",
    "optim.nesterov",
    "optim.decoupled",
    "optim.proximal_inner_steps",
    "sam.adaptive",
    "sam.eta",
    "sam.group_size",
    "schedule.base_batch_size",
    "schedule.boundaries_epochs",
    "schedule.decay_factor",
    "schedule.plateau_factor",
    "schedule.plateau_patience",
    "schedule.warmup_epochs",
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_a_study_config_holds_only_fields_the_study_reads(name, tiny_study):
    """Every field of a study's config is read by its run (conftest records the reads of the
    tiny run, derived run configs included), but for the trainer options above: so an
    override of a field the study ignores cannot exist (the command line says ``no config
    field``)."""
    unread = set(tiny_study(name).unread)
    assert unread <= CONDITIONAL, sorted(unread - CONDITIONAL)
