"""2. Pinched rings (Huang et al. 2020, Fig. 8): two thin rings of classes with a wide or a
pinched gap; test accuracy and the inner (red) ring's recall."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sharp_minima import plotting, train
from sharp_minima.data import Dataset, embedded
from sharp_minima.studies import runs
from sharp_minima.studies.claims import accuracy_noise, all_of, verdict
from sharp_minima.studies.sections import Section
from sharp_minima.studies.visualize_generalization import training

# Fig. 8: the wide-gap rings are solved (we ask ≥ 95 % inner-ring recall), the pinched ones
# are not (we ask ≥ 10 points lower).
SOLVED, DEFEATED_BY = 0.95, 0.10


def validate(config) -> None:
    """Checks ``rings``."""
    for path, kw in (
        ("rings.gaps", dict(low=0, low_open=True)),
        ("rings.weights", dict(low=0, low_open=True, unique=False)),
        ("rings.epochs", dict(low=1, integer=True)),
        ("rings.seeds", dict(low=1, integer=True)),
        ("rings.num_test", dict(low=1, integer=True)),
    ):
        train.check_numbers(config, path, **kw)
    r = config.rings
    if not (len(r.gaps) == 2 and r.gaps[0] > r.gaps[1]):
        raise train.ConfigError(
            f"config.rings.gaps must be (wide, pinched) with wide > pinched > 0, got {r.gaps}"
        )
    if len(r.weights) != 2:
        raise train.ConfigError(f"config.rings.weights must be two numbers, got {r.weights}")


def rings_data(config, gap: float, seed: int) -> Dataset:
    """The two rings with ``gap`` between them (training and test points)."""
    r = config.rings
    kw = dict(
        gap=gap,
        num_rings=2,
        width=r.width,
        weights=tuple(r.weights),
        inner_radius=0.5,
        noise=r.noise,
    )
    x, y = embedded.rings(r.num_train, seed=seed, **kw)
    xt, yt = embedded.rings(r.num_test, seed=seed + 10_000, **kw)
    return Dataset("rings", "generated", x, y, xt, yt, 2)


def run(ctx) -> dict:
    """Wide-gap and pinched rings: test accuracy and the inner ring's recall per run."""
    config, log = ctx.config, ctx.log
    r = config.rings
    records, boundaries = [], {}
    for gap in r.gaps:
        for seed in range(config.seed, config.seed + r.seeds):
            data = rings_data(config, gap, seed)
            cfg = training.run_config(config, seed, epochs=r.epochs, n_train=len(data.x_train))
            folder = runs.run_dir(ctx.workdir, "rings", f"gap{gap:g}", f"seed{seed}")
            res = training.fit(cfg, folder, data, log=log, label=f"[rings gap={gap:g} s{seed}] ")
            if isinstance(res, runs.Diverged):
                continue
            logits = res.model.apply(res.state.variables(), jnp.asarray(data.x_test), train=False)
            pred = np.asarray(jnp.argmax(logits, -1))
            inner = data.y_test == 0
            records.append(
                {
                    "gap": gap,
                    "seed": seed,
                    "train_accuracy": float(res.final["train/accuracy"]),
                    "test_accuracy": float(np.mean(pred == data.y_test)),
                    "inner_recall": float(np.mean(pred[inner] == 0)),
                    "outer_recall": float(np.mean(pred[~inner] == 1)),
                }
            )
            if seed == config.seed:
                grid = training.decision_grid(
                    res.model, res.state.variables(), data.x_test, config.surface.boundary_points
                )
                boundaries[gap] = (grid, data.x_train, data.y_train)
    return {"records": records, "boundaries": boundaries}


def claims(config, res) -> list:
    recs = res["records"]
    wide, pinched = config.rings.gaps
    num = config.rings.num_test
    w = [r["inner_recall"] for r in recs if r["gap"] == wide]
    pn = [r["inner_recall"] for r in recs if r["gap"] == pinched]
    wa = [r["test_accuracy"] for r in recs if r["gap"] == wide]
    pa = [r["test_accuracy"] for r in recs if r["gap"] == pinched]
    claim = (
        "wide-gap rings are solved (inner-ring recall ≥ 95 %) while pinched rings defeat "
        "the network (recall ≥ 10 points lower)"
    )
    if not (w and pn):
        return [(claim, None, "not tested: every run of a gap diverged")]

    def noise(xs):  # recall is measured on the inner ring: about half the test set
        se = float(np.std(xs, ddof=1) / np.sqrt(len(xs))) if len(xs) > 1 else 0.0
        return se + accuracy_noise(float(np.mean(xs)), max(num // 2, 1))

    return [
        (
            claim,
            all_of(
                [
                    verdict(np.mean(w) - SOLVED, noise(w)),
                    verdict(np.mean(w) - DEFEATED_BY - np.mean(pn), noise(w) + noise(pn)),
                ]
            ),
            f"inner-ring recall {100 * np.mean(w):.1f} % (wide) vs "
            f"{100 * np.mean(pn):.1f} % (pinched); test accuracy {100 * np.mean(wa):.1f}"
            f" % vs {100 * np.mean(pa):.1f} %",
        )
    ]


def report(config, res) -> list:
    r = config.rings
    lines = [
        f"Two thin rings (width {r.width:g}; inner = class 0, "
        f"{r.weights[0]:g}:{r.weights[1]:g} points), {r.num_train} training points, "
        f"{train.plural(r.seeds, 'run')} per gap.",
        "",
        "| gap | train acc % | test acc % | inner-ring recall % |",
        "| --- | --- | --- | --- |",
    ]
    for gap in r.gaps:
        rs = [x for x in res["records"] if x["gap"] == gap]
        if rs:
            mean = lambda k, rs=rs: 100 * np.mean([x[k] for x in rs])  # noqa: E731
            lines.append(
                f"| {gap:g} | {mean('train_accuracy'):.1f} | {mean('test_accuracy'):.1f} | "
                f"{mean('inner_recall'):.1f} |"
            )
    return lines


def figures(config, res) -> dict:
    if not res["boundaries"]:
        return {}
    fig = plotting.figure((7, 3.4))
    for i, (gap, ((gx, gy, prob), x, y)) in enumerate(
        sorted(res["boundaries"].items(), reverse=True)
    ):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.contourf(gx, gy, prob, levels=[0, 0.5, 1], colors=["#fcae91", "#9ecae1"], alpha=0.8)
        ax.scatter(x[y == 0, 0], x[y == 0, 1], s=4, c="C3")
        ax.scatter(x[y == 1, 0], x[y == 1, 1], s=4, c="C0")
        ax.set_title(f"{'wide' if i == 0 else 'pinched'} gap {gap:g}", fontsize=9)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    return {"rings": fig}


SECTION = Section(
    name="rings",
    title="Pinched rings (Fig. 8)",
    run=run,
    report=report,
    claims=claims,
    figures=figures,
    validate=validate,
    needs_data=False,
)
