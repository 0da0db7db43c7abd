"""When a run stops before its last epoch: `should_stop_early` (no improvement for
``early_stop.patience`` evaluations, or every ``early_stop.targets`` met: training to a fit),
`targets_met` and `parse_target`. Computed from the logged history, so they survive a resume.
"""

from __future__ import annotations

_OPS = {">=": float.__ge__, "<=": float.__le__, ">": float.__gt__, "<": float.__lt__}


def parse_target(text: str):
    """A fit target parsed.

    Args:
      text: ``<metric><op><number>``, op one of ``>=``, ``<=``, ``>``, ``<``.

    Returns:
      ``(metric, op, value)``, e.g. ``"train/accuracy>=0.995"`` ->
      ``("train/accuracy", ">=", 0.995)``; None if malformed.

    >>> parse_target("train/loss<0.1")
    ('train/loss', '<', 0.1)
    """
    for op in (">=", "<=", ">", "<"):  # two-character operators first
        name, found, value = str(text).partition(op)
        if found:
            try:
                return name.strip(), op, float(value)
            except ValueError:
                return None
    return None


def targets_met(config, record: dict) -> bool:
    """Whether an evaluation ``record`` meets every ``config.early_stop.targets`` (False when
    there are none or a metric is missing).

    Args:
      config: the run's config.
      record: an evaluation record.

    Returns:
      A bool.
    """
    targets = [parse_target(t) for t in config.early_stop.get("targets", ()) or ()]
    if not targets:
        return False
    return all(
        name in record and _OPS[op](float(record[name]), value) for name, op, value in targets
    )


def should_stop_early(config, history) -> bool:
    """True when the last evaluation meets every ``early_stop.targets`` (training to a fit),
    or when ``early_stop.metric`` has not improved by ``min_delta`` for ``patience``
    evaluations (both computed from the logged history, so they survive a resume).

    Args:
      config: the run's config (its ``early_stop`` section).
      history: the evaluation records so far.

    Returns:
      A bool.
    """
    es = config.early_stop
    if history and targets_met(config, history[-1]):
        return True
    if not es.patience:
        return False
    values = [r[es.metric] for r in history if es.metric in r]
    if len(values) <= es.patience:
        return False
    sign = 1.0 if es.metric.endswith("loss") else -1.0  # minimise losses, maximise the rest
    best_before = min(sign * v for v in values[: -es.patience])
    recent = min(sign * v for v in values[-es.patience :])
    return recent > best_before - es.min_delta
