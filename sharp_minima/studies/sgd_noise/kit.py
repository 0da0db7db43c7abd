"""What the sections of the lecture-notes study share: the population of small models (the
study's model on its data, `sharp_minima.train.Population`), the seeds, the curvature subset,
the checks of a setting against the data, and small helpers of the tables and figures."""

from __future__ import annotations

import numpy as np
from matplotlib import ticker

from sharp_minima import train
from sharp_minima.studies.common import key_streams


def prepare(config, data) -> train.Population:
    """The population every training section trains: the config's model on ``data``,
    members initialised from the ``sgd_noise/init`` key stream (the same seed, the same
    start in every section)."""
    model = train.build_model(config, data)
    key = key_streams(config.seed, "sgd_noise/init")["sgd_noise/init"]
    return train.Population(model, data, key)


def describe(ctx) -> dict:
    """The data set and model size, for the results (when a section trained)."""
    pop = ctx.shared
    if pop is None:
        return {}
    return {
        "data": {
            "name": ctx.data.name,
            "source": ctx.data.source,
            "num_train": pop.num_train,
            "num_test": pop.num_test,
            "num_params": int(pop.dim),
        }
    }


def seeds(config) -> list[int]:
    """The seeds of every setting: ``seed, seed + 1, ...`` (``sgd_noise.seeds`` of them)."""
    return list(range(config.seed, config.seed + config.sgd_noise.seeds))


def curvature_batches(config, pop):
    """The first ``curvature_examples`` training examples as stacked batches."""
    s = config.sgd_noise
    bs = min(s.curvature_batch_size, s.curvature_examples)
    nb = s.curvature_examples // bs
    return {k: a[: nb * bs].reshape(nb, bs, *a.shape[1:]) for k, a in pop.train_data.items()}


def check_fields(config, fields) -> None:
    """`train.check_numbers` of every ``(dotted path, bounds)`` in ``fields``."""
    for path, bounds in fields:
        train.check_numbers(config, path, **bounds)


def check_sizes(sizes, num_train: int) -> None:
    """Raises `train.ConfigError` naming the first ``(field, value)`` above ``num_train``."""
    for name, value in sizes:
        if value > num_train:
            raise train.ConfigError(f"{name}: {value} exceeds the {num_train} training examples")


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error over the finite values (NaN when none)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def unit(se: float, seeds: int) -> float:
    """One noise unit of a mean over ``seeds`` with standard error ``se``: widened by the
    t-quantile (`sharp_minima.studies.claims.t_factor`); NaN below two seeds."""
    from sharp_minima.studies import claims as claims_lib  # noqa: PLC0415 - no cycle at import

    return float(se) * claims_lib.t_factor(seeds - 1) if seeds >= 2 else float("nan")


def fmt(v, spec=".3g") -> str:
    """A table cell: ``v`` formatted, "—" when missing or not finite."""
    return "—" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def fingerprint(out) -> float:
    """A fingerprint of a trained population (its final parameters), so measurements are
    redone when the training they measure was."""
    return float(np.round(np.nansum(np.abs(out["params"])), 3))


def log_span_ticks(ax, axis: str, values, num: int = 4) -> None:
    """Labelled major ticks of a log axis over the data's span (``num`` values evenly spaced
    in log, to 2 significant digits): a span of less than a decade otherwise gets no major
    tick, hence no label at all."""
    v = np.asarray([x for x in values if np.isfinite(x) and x > 0], float)
    if len(v) == 0:
        return
    lo, hi = v.min(), v.max()
    if hi / lo >= 10:  # matplotlib's own decades label it
        return
    ticks = sorted({float(f"{t:.2g}") for t in np.geomspace(lo, hi, num)})
    log_ticks(ax, axis, ticks)


def log_ticks(ax, axis: str, values) -> None:
    """Major ticks of a log axis at ``values`` with plain labels, no minor labels (which
    crowd a log axis spanning less than a decade)."""
    a = ax.xaxis if axis == "x" else ax.yaxis
    a.set_major_locator(ticker.FixedLocator(list(values)))
    a.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    a.set_minor_formatter(ticker.NullFormatter())
