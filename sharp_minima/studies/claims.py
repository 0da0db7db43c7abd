"""Claims and their verdicts: one rule for every study.

A claim of a source is tested by a margin (how far it holds, > 0 in the source's direction)
against its noise (the standard error over seeds, the test set's sampling error, a solver's
tolerance): `verdict` says *yes* or *no* only beyond the noise, else *within noise*, and *not
tested* when a run is missing. `all_of` joins the parts of a compound claim, `ordered` tests
an ordering step by step; `claims_table` renders the report's ``## Claims`` section.
"""

from __future__ import annotations

import numpy as np

from sharp_minima.studies import common

YES, NO, WITHIN_NOISE, NOT_TESTED = "yes", "no", "within noise", "not tested"
VERDICTS = (YES, NO, WITHIN_NOISE, NOT_TESTED)
Claim = tuple[str, str, str]  # (the paper's claim, its verdict here, the numbers behind it)


def verdict(margin: float, noise: float = 0.0) -> str:
    """`YES` when ``margin`` (how far the claim holds: > 0 in its favour) exceeds ``noise``,
    `NO` when it falls short by more than ``noise``, else `WITHIN_NOISE`; `NOT_TESTED` when
    the margin is not a number (a run is missing).

    Args:
      margin: how far the claim holds (> 0 in its favour; NaN when untested).
      noise: the margin's noise (≥ 0).

    Returns:
      A verdict string.

    >>> verdict(0.5, 0.1), verdict(-0.5, 0.1), verdict(4e-8, 1.7e-4), verdict(float("nan"))
    ('yes', 'no', 'within noise', 'not tested')
    """
    margin, noise = float(margin), abs(float(noise))
    if not np.isfinite(margin):
        return NOT_TESTED
    if margin > noise:
        return YES
    if margin < -noise:
        return NO
    return WITHIN_NOISE


def all_of(verdicts) -> str:
    """The verdict of a claim made of parts: `NO` if any part fails, else `NOT_TESTED` if
    any part lacks its runs, else `YES` if every part holds, else `WITHIN_NOISE`.

    Args:
      verdicts: the parts' verdicts (strings or bools, `as_verdict`).

    Returns:
      A verdict string.
    """
    verdicts = [as_verdict(v) for v in verdicts]
    if not verdicts:
        return NOT_TESTED
    for v in (NO, NOT_TESTED):
        if v in verdicts:
            return v
    return YES if all(v == YES for v in verdicts) else WITHIN_NOISE


def ordered(values, noises, *, decreasing: bool) -> str:
    """Whether ``values`` decrease (increase) step by step, each step by more than the noise
    of its pair (``noises[i] + noises[i + 1]``, e.g. solver tolerance and seed spread of each
    value).

    Args:
      values: the values in the claimed order.
      noises: each value's noise.
      decreasing: the claimed direction.

    Returns:
      A verdict (`all_of` the steps' `verdict`).
    """
    sign = -1.0 if decreasing else 1.0
    return all_of(
        verdict(sign * (b - a), na + nb)
        for a, b, na, nb in zip(values, values[1:], noises, noises[1:])
    )


def seed_noise(stat: dict | None) -> float:
    """The standard error of a mean over seeds (`sharp_minima.studies.runs.aggregate`'s
    ``{"mean", "std", "n"}``; 0 for one seed, whose spread is unknown).

    Args:
      stat: a field's statistics from `aggregate`, or None.

    Returns:
      std/√n (0 with one seed or none).
    """
    if not isinstance(stat, dict) or stat.get("n", 1) < 2:
        return 0.0
    return float(stat["std"]) / float(np.sqrt(stat["n"]))


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


def count_verdicts(claims) -> str:
    """``"3 yes, 1 within noise"``: how many claims got each verdict.

    Args:
      claims: as for `claims_table`.

    Returns:
      The counts in words (``"no claims"`` when empty).
    """
    found = [as_verdict(c["verdict"] if isinstance(c, dict) else c[1]) for c in claims]
    return ", ".join(f"{found.count(v)} {v}" for v in VERDICTS if v in found) or "no claims"


def claims_table(claims: list) -> list[str]:
    """The report's ``## Claims`` section: a verdict per claim with its numbers (claims as
    ``(claim, verdict, numbers)`` or as the dicts of ``results["claims"]``), and the count of
    each verdict. A claim holds ("yes") or fails ("no") only by more than its noise (solver
    tolerance, seed spread, test-set sampling), else it reads "within noise"; "not tested"
    when its runs are missing (diverged).

    Args:
      claims: ``[(claim, verdict, numbers)]`` or ``results["claims"]``.

    Returns:
      The section's Markdown lines.
    """
    rows = []
    for c in claims:
        c = (c["claim"], c["verdict"], c["numbers"]) if isinstance(c, dict) else c
        rows.append((c[0], as_verdict(c[1]), c[2]))
    return [
        "## Claims",
        "",
        f"Verdicts: {count_verdicts(claims)}. A claim holds or fails only by more than its "
        "noise (eigensolver tolerance, standard error over seeds, test-set sampling); "
        "otherwise it reads *within noise*. With one seed the spread over seeds is unknown "
        "and not counted: such a verdict is weaker than its margin suggests.",
        "",
        *common.markdown_table(("claim", "verdict", "numbers"), rows),
    ]
