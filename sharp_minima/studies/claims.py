"""Claims and their verdicts: one rule for every study.

A claim is declared before the run (`Claim`): the source's statement and where it is, the
measured quantity and the direction the source predicts, the threshold (a config field, set
before the run, with its origin), the noise model (`NOISE_MODELS`), the seeds it needs and,
for "the same / does not depend" claims, an equivalence margin. Its test gives a margin
(how far the claim holds, > 0 in the source's direction) and the margin's noise unit; one
rule (`RULE`, `verdict`) turns them into *yes*, *no*, *within noise* or *not tested*.

Noise units: `seed_noise` (standard error over seeds, widened by the t-quantile so that two
units are the t-test's critical value), `accuracy_noise` (a test set's binomial error),
`paired_accuracy` (two models on one test set: McNemar's paired difference),
`block_bootstrap_se` (autocorrelated series), `equivalence` (TOST for "the same" claims).
`all_of` joins the parts of a compound claim, `ordered` tests an ordering step by step;
`claims_table` renders the report's ``## Claims`` section (no verdicts for a smoke test).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import NamedTuple

import numpy as np
from scipy import stats

from sharp_minima.studies import common

YES, NO, WITHIN_NOISE, NOT_TESTED = "yes", "no", "within noise", "not tested"
VERDICTS = (YES, NO, WITHIN_NOISE, NOT_TESTED)
UNITS = 2.0  # a claim holds or fails only beyond this many noise units
RULE = (
    "One rule for every claim: *yes* when it holds by more than 2 noise units in the "
    "source's direction, *no* when it fails by more than 2 units, *within noise* otherwise; "
    '*not tested* when a run, a seed or half of a compound claim is missing. For "the '
    'same" claims the margin is the equivalence margin minus the difference (a TOST test).'
)
SMOKE_TEST = (
    "**Smoke test.** This is a tiny config: it checks that every section runs, not what "
    "the sources claim; its claims are listed without verdict counts and say nothing."
)
# The noise models a claim can declare (what one noise unit is).
SEEDS = "standard error over seeds (t-quantile)"
TEST_SET = "binomial sampling error of the test set"
PAIRED = "paired difference on one test set (McNemar)"
BLOCK_BOOTSTRAP = "block bootstrap over the autocorrelated series"
SOLVER = "solver tolerance"
SIMULATION = "simulation standard error"
CLUSTERS = "bootstrap over clusters of runs"
NOISE_MODELS = (SEEDS, TEST_SET, PAIRED, BLOCK_BOOTSTRAP, SOLVER, SIMULATION, CLUSTERS)
_Z = 0.5 * (1.0 + math.erf(UNITS / math.sqrt(2.0)))  # the normal's quantile at 2 units


class Finding(NamedTuple):
    """A tested claim: what it says, its verdict, the numbers behind it, and its source.

    Args:
      claim: the claim in words.
      verdict: one of `VERDICTS`.
      numbers: the evidence in words.
      source: where the claim is (paper, section / figure / equation).
    """

    claim: str
    verdict: str
    numbers: str
    source: str = ""


@dataclasses.dataclass(frozen=True)
class Claim:
    """A claim of a source, declared before the run.

    Attributes:
      statement: the source's claim, in words.
      source: where it is (paper, section / figure / equation).
      quantity: the measured quantity and the direction the source predicts (the margin).
      noise: the noise model, one of `NOISE_MODELS`.
      threshold: the config field (dotted, e.g. ``"keskar.sharpness_ratio"``) holding the
        threshold, or None when the claim compares with 0.
      origin: where the threshold comes from.
      min_seeds: the seeds the claim needs (fewer: *not tested*).
      equivalence: the config field holding the equivalence margin of a "the same" claim.
    """

    statement: str
    source: str
    quantity: str
    noise: str
    threshold: str | None = None
    origin: str = ""
    min_seeds: int = 1
    equivalence: str | None = None

    def __post_init__(self):
        if self.noise not in NOISE_MODELS:
            raise ValueError(f"unknown noise model {self.noise!r}; one of {NOISE_MODELS}")
        if self.threshold and not self.origin:
            raise ValueError(f"claim {self.statement!r}: its threshold needs an origin")

    def threshold_of(self, config) -> float:
        """The threshold's value in ``config``.

        Args:
          config: the study's config.

        Returns:
          The value of the declared field (0 without a threshold).
        """
        return float(_field(config, self.threshold)) if self.threshold else 0.0

    def margin_of(self, config) -> float:
        """The equivalence margin's value in ``config``.

        Args:
          config: the study's config.

        Returns:
          The value of the declared field.

        Raises:
          ValueError: the claim declares no equivalence margin.
        """
        if not self.equivalence:
            raise ValueError(f"claim {self.statement!r} declares no equivalence margin")
        return float(_field(config, self.equivalence))

    def test(self, margin, noise, numbers: str, *, seeds: int | None = None) -> Finding:
        """The finding for a margin (> 0 in the source's direction) and its noise unit.

        Args:
          margin: how far the claim holds (NaN when a run is missing).
          noise: one noise unit of ``margin`` (NaN when unknown).
          numbers: the evidence in words.
          seeds: how many seeds the numbers rest on (fewer than ``min_seeds``: not tested).

        Returns:
          A `Finding` naming this claim's source.
        """
        if seeds is not None and seeds < self.min_seeds:
            v = NOT_TESTED
            numbers = f"{numbers} (needs ≥ {self.min_seeds} seeds, ran {seeds})"
        else:
            v = verdict(margin, noise)
        return Finding(self.statement, v, numbers, self.source)

    def given(self, verdict_: str, numbers: str, *, seeds: int | None = None) -> Finding:
        """The finding of a compound claim from its parts' verdict (`all_of`, `ordered`:
        each part already judged by the rule), with the seeds check of `test`.

        Args:
          verdict_: the parts' joint verdict (a string or a bool).
          numbers: the evidence in words.
          seeds: how many seeds the numbers rest on.

        Returns:
          A `Finding`.
        """
        margin = {YES: 1.0, NO: -1.0, WITHIN_NOISE: 0.0}.get(as_verdict(verdict_), math.nan)
        return self.test(margin, 0.0, numbers, seeds=seeds)

    def same(self, difference, noise, margin: float, numbers: str, **kw) -> Finding:
        """The finding of a "the same" claim: `equivalence` of ``difference`` within
        ``margin`` (the declared equivalence margin's value).

        Args:
          difference: the measured difference (the source predicts 0).
          noise: its noise unit.
          margin: the equivalence margin's value (`margin_of`).
          numbers: the evidence in words.
          **kw: as for `test` (``seeds``).

        Returns:
          A `Finding`.
        """
        return self.test(float(margin) - abs(float(difference)), noise, numbers, **kw)

    def untested(self, why: str) -> Finding:
        """The finding when the claim could not be tested, saying why.

        Args:
          why: the reason, in words.

        Returns:
          A `Finding` reading *not tested*.
        """
        return Finding(self.statement, NOT_TESTED, why, self.source)


def _field(config, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def verdict(margin: float, noise: float = 0.0) -> str:
    """`YES` when ``margin`` (how far the claim holds: > 0 in its favour) exceeds `UNITS`
    noise units, `NO` when it falls short by more than that, else `WITHIN_NOISE`;
    `NOT_TESTED` when the margin or the noise is not a number (a run or a seed is missing).

    Args:
      margin: how far the claim holds (> 0 in its favour; NaN when untested).
      noise: one noise unit of the margin (≥ 0; NaN when unknown).

    Returns:
      A verdict string.

    >>> verdict(0.5, 0.1), verdict(-0.5, 0.1), verdict(0.15, 0.1), verdict(float("nan"))
    ('yes', 'no', 'within noise', 'not tested')
    """
    margin, noise = float(margin), abs(float(noise))
    if not (np.isfinite(margin) and np.isfinite(noise)):
        return NOT_TESTED
    if margin > UNITS * noise:
        return YES
    if margin < -UNITS * noise:
        return NO
    return WITHIN_NOISE


def within_tolerance(error: float, tol: float) -> str:
    """A deterministic check against a tolerance fixed before the run (closed forms, float
    rounding, a fit's residual: no sampling noise): *yes* below ``tol``, *no* beyond
    2 × ``tol``, *within noise* between — the rule's 2 units, with a unit of ``tol``/4
    about 1.5 × ``tol``.

    Args:
      error: the measured error (≥ 0).
      tol: the tolerance fixed before the run.

    Returns:
      The verdict.

    >>> within_tolerance(1e-16, 1e-9), within_tolerance(1.5e-9, 1e-9), within_tolerance(3e-9, 1e-9)
    ('yes', 'within noise', 'no')
    """
    return verdict(1.5 * tol - error, tol / 4)


def equivalence(difference: float, noise: float, margin: float) -> str:
    """A "the same" claim by two one-sided tests: `YES` when ``|difference|`` is below the
    equivalence ``margin`` by more than 2 noise units, `NO` when it exceeds it by more.

    Args:
      difference: the measured difference.
      noise: its noise unit.
      margin: the equivalence margin (fixed before the run).

    Returns:
      A verdict string.

    >>> equivalence(0.1, 0.1, 0.5), equivalence(0.9, 0.1, 0.5), equivalence(0.1, 0.3, 0.5)
    ('yes', 'no', 'within noise')
    """
    return verdict(float(margin) - abs(float(difference)), noise)


def all_of(verdicts) -> str:
    """The verdict of a claim made of parts: `NOT_TESTED` if any part lacks its runs (half
    a compound claim is no test of it), else `NO` if any part fails, else `YES` if every part
    holds, else `WITHIN_NOISE`.

    Args:
      verdicts: the parts' verdicts (strings or bools, `as_verdict`).

    Returns:
      A verdict string.

    >>> all_of(["yes", "no", "not tested"]), all_of(["yes", "no"]), all_of([])
    ('not tested', 'no', 'not tested')
    """
    verdicts = [as_verdict(v) for v in verdicts]
    if not verdicts:
        return NOT_TESTED
    for v in (NOT_TESTED, NO):
        if v in verdicts:
            return v
    return YES if all(v == YES for v in verdicts) else WITHIN_NOISE


def ordered(values, noises, *, decreasing: bool) -> str:
    """Whether ``values`` decrease (increase) step by step, each step beyond the noise of
    its pair (the two values' noise units in quadrature).

    Args:
      values: the values in the claimed order.
      noises: each value's noise unit (NaN when unknown: not tested).
      decreasing: the claimed direction.

    Returns:
      A verdict (`all_of` the steps' `verdict`).
    """
    sign = -1.0 if decreasing else 1.0
    return all_of(
        verdict(sign * (b - a), combined(na, nb))
        for a, b, na, nb in zip(values, values[1:], noises, noises[1:])
    )


def seed_stat(values) -> dict | None:
    """The ``{"mean", "std", "n"}`` of the finite ``values`` (one per seed; std with
    ddof = 1), as `seed_noise` takes it; None when no value is finite.

    Args:
      values: one number per seed (NaN and infinities are left out).

    Returns:
      The statistics (std NaN for one value), or None.

    >>> seed_stat([1.0, 2.0, float("nan"), 3.0])
    {'mean': 2.0, 'std': 1.0, 'n': 3}
    """
    v = np.asarray([x for x in values if np.isfinite(x)], np.float64)
    if not len(v):
        return None
    std = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
    return {"mean": float(v.mean()), "std": std, "n": len(v)}


def seed_noise(stat: dict | None) -> float:
    """One noise unit of a mean over seeds (`sharp_minima.studies.runs.aggregate`'s
    ``{"mean", "std", "n"}``): the standard error std/√n widened by the t-quantile, so that
    `UNITS` units are the two-sided t-test's critical value at the normal's 2σ level (n = 3:
    2.26 standard errors per unit). NaN with fewer than two seeds, whose spread is unknown:
    the claim reads *not tested*.

    Args:
      stat: a field's statistics from `aggregate`, or None.

    Returns:
      The noise unit (NaN with one seed or none).

    >>> round(seed_noise({"mean": 1.0, "std": 0.3, "n": 3}), 4)
    0.392
    """
    if not isinstance(stat, dict) or stat.get("n", 1) < 2:
        return float("nan")
    n = int(stat["n"])
    return float(stat["std"]) / math.sqrt(n) * t_factor(n - 1)


def t_factor(dof: int) -> float:
    """How much wider a t-distributed unit is than a normal one.

    Args:
      dof: degrees of freedom.

    Returns:
      The t-quantile over the normal quantile at 2σ.
    """
    return float(stats.t.ppf(_Z, dof)) / UNITS


def combined(*noises: float) -> float:
    """The noise unit of a sum or difference of independent estimates.

    Args:
      *noises: the estimates' noise units.

    Returns:
      Their root sum of squares (NaN if any is NaN).
    """
    return float(math.sqrt(sum(float(n) ** 2 for n in noises)))


def accuracy_noise(accuracy: float, num_examples: int) -> float:
    """The sampling standard error of an accuracy measured on ``num_examples`` examples.

    Args:
      accuracy: a fraction in [0, 1].
      num_examples: the test-set size n.

    Returns:
      √(a(1 − a)/n) as a fraction (at least √(1/n)/√n, for an accuracy of 0 or 1).
    """
    p = min(max(float(accuracy), 0.0), 1.0)
    return float(np.sqrt(max(p * (1 - p), 1.0 / num_examples) / num_examples))


def paired_accuracy(correct_a, correct_b) -> tuple[float, float]:
    """The accuracy difference of two models on one test set and its paired standard error
    (McNemar): with n₁₀ examples only ``a`` gets right and n₀₁ only ``b``, the difference is
    (n₁₀ − n₀₁)/n and its variance ((n₁₀ + n₀₁)/n − d²)/n; examples both get right or both
    get wrong carry no noise, which an unpaired binomial error would count twice.

    Args:
      correct_a: per-example correctness of model a (bools, shape (n,) or (..., n): each
        row a seed, the differences averaged over seeds).
      correct_b: the same for model b, on the same examples.

    Returns:
      ``(difference, standard error)`` as fractions (a − b).

    Raises:
      ValueError: the two do not cover the same examples.

    >>> paired_accuracy([1, 1, 0, 1, 0], [1, 0, 0, 0, 1])
    (0.2, 0.3346640106136302)
    """
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    if a.shape != b.shape or a.ndim == 0:
        raise ValueError(f"paired accuracies need the same examples: {a.shape} vs {b.shape}")
    d = a.astype(float) - b.astype(float)  # per example: +1, 0 or −1
    d = d.reshape(-1, d.shape[-1]).mean(axis=0)
    n = d.shape[0]
    mean = float(d.mean())
    return mean, float(math.sqrt(max(float((d**2).mean()) - mean**2, 0.0) / n))


def block_bootstrap_se(series, block: int, *, num_resamples: int = 2000, seed: int = 0):
    """The standard error of the mean of an autocorrelated ``series`` by a moving-block
    bootstrap (blocks of ``block`` consecutive values keep the correlation within them).

    Args:
      series: 1-D values in order.
      block: the block length (≥ 1; 1 is the ordinary bootstrap).
      num_resamples: bootstrap resamples.
      seed: the resampling seed.

    Returns:
      The standard error of the mean (NaN for fewer than two values).
    """
    x = np.asarray(series, float).ravel()
    n = x.size
    if n < 2:
        return float("nan")
    block = int(min(max(block, 1), n))
    starts = np.random.default_rng(seed).integers(0, n - block + 1, (num_resamples, -(-n // block)))
    idx = (starts[..., None] + np.arange(block)).reshape(num_resamples, -1)[:, :n]
    return float(x[idx].mean(axis=1).std(ddof=1))


def cluster_bootstrap(stat, clusters, *, num_resamples: int = 2000, seed: int = 0) -> float:
    """The standard error of ``stat(indices)`` when runs come in clusters (e.g. seeds of one
    setting): whole clusters are resampled with replacement, so runs that share a setting
    are not counted as independent.

    Args:
      stat: a function of an index array into the runs, returning a number.
      clusters: each run's cluster label.
      num_resamples: bootstrap resamples.
      seed: the resampling seed.

    Returns:
      The bootstrap standard error (NaN for fewer than three clusters).
    """
    labels = np.asarray(clusters)
    groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    if len(groups) < 3:
        return float("nan")
    rng = np.random.default_rng(seed)
    values = []
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample of one cluster: NaN
        for _ in range(num_resamples):
            pick = rng.integers(0, len(groups), len(groups))
            values.append(stat(np.concatenate([groups[i] for i in pick])))
    values = np.asarray(values, float)
    return float(np.nanstd(values, ddof=1))


def as_verdict(v) -> str:
    """A verdict from a verdict string or a bool (True: `YES`, False: `NO`, None: `NOT_TESTED`).

    Args:
      v: a verdict string, a bool or None.

    Returns:
      A verdict string of `VERDICTS`.

    Raises:
      ValueError: an unknown verdict string.
    """
    if v is None:
        return NOT_TESTED
    if isinstance(v, bool | np.bool_):
        return YES if v else NO
    if v not in VERDICTS:
        raise ValueError(f"a claim's verdict must be one of {VERDICTS}, got {v!r}")
    return v


def _finding(c) -> Finding:
    if isinstance(c, dict):
        return Finding(c["claim"], as_verdict(c["verdict"]), c["numbers"], c.get("source", ""))
    return Finding(c[0], as_verdict(c[1]), *c[2:])


def findings(claims) -> list[Finding]:
    """Claims as `Finding` tuples.

    Args:
      claims: ``(claim, verdict, numbers[, source])`` tuples or the dicts of
        ``results["claims"]`` (a bool verdict becomes yes / no).

    Returns:
      A list of `Finding`.
    """
    return [_finding(c) for c in claims]


def count_verdicts(claims) -> str:
    """``"3 yes, 1 within noise"``: how many claims got each verdict.

    Args:
      claims: as for `claims_table`.

    Returns:
      The counts in words (``"no claims"`` when empty).
    """
    found = [f.verdict for f in findings(claims)]
    return ", ".join(f"{found.count(v)} {v}" for v in VERDICTS if v in found) or "no claims"


def claims_table(claims: list, *, smoke_test: bool = False) -> list[str]:
    """The report's ``## Claims`` section: each claim with its source, its verdict and its
    numbers, the count of each verdict and the `RULE`. A smoke test (a tiny config) lists
    its claims under `SMOKE_TEST` and counts no verdicts.

    Args:
      claims: ``[(claim, verdict, numbers[, source])]`` or ``results["claims"]``.
      smoke_test: the run is a tiny config's.

    Returns:
      The section's Markdown lines.
    """
    rows = [(f.claim, f.source, f.verdict, f.numbers) for f in findings(claims)]
    lead = SMOKE_TEST if smoke_test else f"Verdicts: {count_verdicts(claims)}. {RULE}"
    return [
        "## Claims",
        "",
        lead,
        "",
        *common.markdown_table(("claim", "source", "verdict", "numbers"), rows),
    ]
