"""3. The noise scale and the optimal batch size (Smith & Le 2018; Smith et al. 2018): test
accuracy against B at a constant rate for several η and several training-set sizes N; and
decaying η against growing B by the same factors."""

from __future__ import annotations

import numpy as np
from matplotlib import ticker

from sharp_minima import plotting, train
from sharp_minima.studies import claims as claims_lib
from sharp_minima.studies.claims import (
    NO,
    YES,
    Claim,
    accuracy_noise,
    all_of,
    seed_noise,
    seed_stat,
)
from sharp_minima.studies.common import markdown_table
from sharp_minima.studies.sections import Section
from sharp_minima.studies.sgd_noise import kit

ARMS = ("decay", "grow", "hybrid")
SMITH_LE = "Smith & Le 2018, Sec. 4–5 (B_opt ∝ ηN); lecture notes, Sec. 4"
B_OPT_GROWS = {
    what: Claim(
        statement=f"at a constant rate the best batch size grows with the {name} (the "
        f"lecture: B_opt ∝ {what})",
        source=SMITH_LE,
        quantity=f"slope of log B_opt on log {what}, predicted > 0 (Smith & Le: 1)",
        noise=claims_lib.SEEDS,
        min_seeds=3,
    )
    for what, name in (("η", "learning rate"), ("N", "training-set size"))
}
GROW_B = Claim(
    statement="growing B by the factors η would decay by (and the hybrid) reaches the test "
    "accuracy of decaying η, with fewer updates",
    source="Smith et al. 2018 (Don't decay the learning rate, increase the batch size), "
    "Sec. 5, Fig. 2",
    quantity="|accuracy(arm) − accuracy(decay)| within the margin (TOST); updates(grow) < "
    "updates(decay)",
    noise=claims_lib.SEEDS,
    min_seeds=3,
    equivalence="sgd_noise.noise_scale.claims.accuracy_margin",
)


def validate(config) -> None:
    """Checks ``sgd_noise.noise_scale``."""
    pos, count = dict(low=0, low_open=True), dict(low=1, integer=True)
    kit.check_fields(
        config,
        (
            ("sgd_noise.noise_scale.batch_sizes", count),
            ("sgd_noise.noise_scale.learning_rates", pos),
            ("sgd_noise.noise_scale.train_sizes", dict(low=2, integer=True)),
            ("sgd_noise.noise_scale.size_learning_rate", pos),
            ("sgd_noise.noise_scale.num_epochs", count),
            ("sgd_noise.noise_scale.schedule_batch_size", count),
            ("sgd_noise.noise_scale.schedule_learning_rate", pos),
            ("sgd_noise.noise_scale.schedule_factor", dict(low=2, integer=True)),
            ("sgd_noise.noise_scale.schedule_epochs", count),
            ("sgd_noise.noise_scale.claims.accuracy_margin", dict(low=0, low_open=True)),
            ("sgd_noise.noise_scale.schedule_num_epochs", count),
        ),
    )
    n = config.sgd_noise.noise_scale
    if len(n.batch_sizes) < 3:
        raise train.ConfigError("sgd_noise.noise_scale.batch_sizes: need >= 3")
    at = list(n.schedule_epochs)
    if at != sorted(at) or max(at) > n.schedule_num_epochs:
        raise train.ConfigError(
            "sgd_noise.noise_scale.schedule_epochs must increase and end before schedule_num_epochs"
        )


def prepare(ctx) -> None:
    n = ctx.config.sgd_noise.noise_scale
    grown = n.schedule_batch_size * n.schedule_factor ** len(n.schedule_epochs)
    kit.check_sizes(
        [
            ("sgd_noise.noise_scale.batch_sizes", max(n.batch_sizes)),
            ("sgd_noise.noise_scale schedule (grown B)", grown),
            ("sgd_noise.noise_scale.train_sizes", max(n.train_sizes)),
        ],
        ctx.shared.num_train,
    )
    if min(n.train_sizes) < max(n.batch_sizes):
        raise train.ConfigError(
            "sgd_noise.noise_scale.train_sizes: every size must hold the largest batch "
            f"({max(n.batch_sizes)})"
        )


def best_batch(batch_sizes, accuracy) -> tuple[float, bool]:
    """The batch size of the highest accuracy, refined by a parabola through the best point
    and its neighbours in log₂ B; and whether it sits at the edge of the grid."""
    b = np.log2(np.asarray(batch_sizes, np.float64))
    a = np.asarray(accuracy, np.float64)
    i = int(np.nanargmax(a))
    if i == 0 or i == len(a) - 1:
        return float(2 ** b[i]), True
    c2, c1, _ = np.polyfit(b[i - 1 : i + 2], a[i - 1 : i + 2], 2)
    x = -c1 / (2 * c2) if c2 < 0 else b[i]
    return float(2 ** np.clip(x, b[i - 1], b[i + 1])), False


def _slope(x, y) -> tuple[float, float]:
    """Least-squares slope of log y on log x and its standard error."""
    lx, ly = np.log(np.asarray(x, np.float64)), np.log(np.asarray(y, np.float64))
    if len(lx) < 2:
        return float("nan"), float("nan")
    coef, cov = np.polyfit(lx, ly, 1, cov=True) if len(lx) > 3 else (np.polyfit(lx, ly, 1), None)
    if cov is None:
        res = ly - np.polyval(coef, lx)
        dof = max(len(lx) - 2, 1)
        se = np.sqrt((res @ res / dof) / ((lx - lx.mean()) ** 2).sum())
    else:
        se = np.sqrt(cov[0, 0])
    return float(coef[0]), float(se)


def _optimum(batch_sizes, acc_by_seed) -> dict:
    """B_opt from the mean over seeds, and per seed (for the spread)."""
    mean = np.nanmean(acc_by_seed, axis=0)
    b, edge = best_batch(batch_sizes, mean)
    per_seed = [best_batch(batch_sizes, a)[0] for a in acc_by_seed]
    return {"b_opt": b, "edge": edge, "b_opt_seeds": per_seed, "accuracy": mean.tolist()}


def _fit_optimum(xs, optima) -> dict:
    """Slope of log B_opt on log x, with its error: the regression's, combined with the
    spread of the per-seed slopes."""
    slope, se = _slope(xs, [o["b_opt"] for o in optima])
    per_seed = [
        _slope(xs, [o["b_opt_seeds"][s] for o in optima])[0]
        for s in range(len(optima[0]["b_opt_seeds"]))
    ]
    spread = float(np.std(per_seed, ddof=1) / np.sqrt(len(per_seed))) if len(per_seed) > 1 else 0.0
    return {"slope": slope, "stderr": float(np.hypot(se, spread)), "seed_slopes": per_seed}


def _final_accuracy(out) -> np.ndarray:
    """Each member's final test accuracy; 0 for a diverged one."""
    return np.where(np.isfinite(out["train_loss"][-1]), out["test_accuracy"][-1], 0.0)


def _sweep(ctx, name: str, key: dict, members, batch_size, *, num_train=None, label=""):
    """One population at constant rates (``members``: (rate, seed) pairs), cached."""
    n = ctx.config.sgd_noise.noise_scale
    return ctx.cache.arrays(
        name,
        key,
        lambda: ctx.shared.train(
            seeds=[s for _, s in members],
            learning_rates=[train.epoch_schedule(lr) for lr, _ in members],
            batch_size=batch_size,
            num_epochs=n.num_epochs,
            num_train=num_train,
            log=ctx.log,
            label=label,
        ),
    )


def run(ctx) -> dict:
    n, seeds = ctx.config.sgd_noise.noise_scale, kit.seeds(ctx.config)
    bs, lrs, sizes = list(n.batch_sizes), list(n.learning_rates), list(n.train_sizes)
    # (a) η × B at constant η
    acc = np.zeros((len(lrs), len(seeds), len(bs)))
    for j, b in enumerate(bs):
        members = [(lr, s) for lr in lrs for s in seeds]
        key = {"B": b, "lrs": lrs, "epochs": n.num_epochs, "seeds": seeds}
        out = _sweep(ctx, f"noise_scale/B{b}", key, members, b, label=f"[noise scale B={b}] ")
        acc[:, :, j] = _final_accuracy(out).reshape(len(lrs), len(seeds))
    by_lr = [_optimum(bs, acc[i]) for i in range(len(lrs))]
    # (b) training-set size N at one η
    acc_n = np.zeros((len(sizes), len(seeds), len(bs)))
    for i, size in enumerate(sizes):
        for j, b in enumerate(bs):
            key = {"N": size, "B": b, "lr": n.size_learning_rate, "epochs": n.num_epochs}
            out = _sweep(
                ctx,
                f"noise_scale/N{size}_B{b}",
                {**key, "seeds": seeds},
                [(n.size_learning_rate, s) for s in seeds],
                b,
                num_train=size,
                label=f"[noise scale N={size} B={b}] ",
            )
            acc_n[i, :, j] = _final_accuracy(out)
    by_n = [_optimum(bs, acc_n[i]) for i in range(len(sizes))]
    return {
        "batch_sizes": bs,
        "learning_rates": lrs,
        "by_lr": by_lr,
        "lr_fit": _fit_optimum(lrs, by_lr),
        "train_sizes": sizes,
        "by_size": by_n,
        "size_fit": _fit_optimum(sizes, by_n),
        "schedules": {arm: _schedule(ctx, arm, seeds) for arm in ARMS},
        "num_test": ctx.shared.num_test,
    }


def _schedule(ctx, arm: str, seeds) -> dict:
    """(c) Decay η, grow B, or both (the hybrid grows B at the first boundary and decays η
    at the later ones), by the same factor at the same epochs (Smith et al. 2018)."""
    n = ctx.config.sgd_noise.noise_scale
    f, at = n.schedule_factor, list(n.schedule_epochs)
    decay_at = {"decay": at, "grow": [], "hybrid": at[1:]}[arm]
    grow_at = {"decay": [], "grow": at, "hybrid": at[:1]}[arm]
    rate = train.epoch_schedule(n.schedule_learning_rate, boundaries_epochs=decay_at, factor=1 / f)
    batch = train.epoch_schedule(n.schedule_batch_size, boundaries_epochs=grow_at, factor=f)
    key = {
        "arm": arm,
        "B0": n.schedule_batch_size,
        "eta0": n.schedule_learning_rate,
        "f": f,
        "at": at,
        "epochs": n.schedule_num_epochs,
        "seeds": seeds,
    }
    out = ctx.cache.arrays(
        f"noise_scale/schedule_{arm}",
        key,
        lambda: ctx.shared.train(
            seeds=seeds,
            learning_rates=[rate] * len(seeds),
            batch_size=batch,
            num_epochs=n.schedule_num_epochs,
            log=ctx.log,
            label=f"[schedule {arm}] ",
        ),
    )
    ok = np.isfinite(out["train_loss"][-1])
    return {
        "epochs": out["epochs"].tolist(),
        "steps": out["steps"].tolist(),
        "test_accuracy": np.nanmean(out["test_accuracy"], 1).tolist(),
        "train_loss": np.nanmean(out["train_loss"], 1).tolist(),
        "final": kit.mean_se(np.where(ok, out["test_accuracy"][-1], np.nan)),
        "updates": int(out["steps"][-1]),
        "diverged": int((~ok).sum()),
    }


def claims(config, res) -> list:
    """`B_OPT_GROWS` (noise unit: the per-seed slopes' standard error, t-quantile) and
    `GROW_B` (an equivalence within ``noise_scale.claims.accuracy_margin``)."""
    seeds = config.sgd_noise.seeds
    out = []
    for what, fit, opts, xs in (
        ("η", res["lr_fit"], res["by_lr"], res["learning_rates"]),
        ("N", res["size_fit"], res["by_size"], res["train_sizes"]),
    ):
        edges = sum(o["edge"] for o in opts)
        b = ", ".join(f"{x:g}: {o['b_opt']:.3g}" for x, o in zip(xs, opts))
        per = np.asarray(fit["seed_slopes"], float)
        stat = seed_stat(per)
        out.append(
            B_OPT_GROWS[what].test(
                fit["slope"],
                seed_noise(stat),
                f"slope {fit['slope']:.2f} (per seed "
                + ", ".join(f"{s:.2f}" for s in fit["seed_slopes"])
                + f"; Smith & Le: 1); B_opt at {what} = {b}"
                + (f"; {edges} optimum(s) at the edge of the B grid" if edges else ""),
                seeds=len(per),
            )
        )
    sch = res["schedules"]
    d = sch["decay"]
    margin = config.sgd_noise.noise_scale.claims.accuracy_margin
    parts, nums = [], []
    for arm in ("grow", "hybrid"):
        a = sch[arm]
        diff = a["final"][0] - d["final"][0]
        noise = claims_lib.combined(
            kit.unit(a["final"][1], seeds),
            kit.unit(d["final"][1], seeds),
            accuracy_noise(d["final"][0], res["num_test"]),
        )
        parts.append(claims_lib.equivalence(diff, noise, margin))
        nums.append(
            f"{arm}: {100 * a['final'][0]:.2f}% in {a['updates']} updates ({100 * diff:+.2f}, "
            f"noise unit {100 * noise:.2f} pts)"
        )
    fewer = YES if sch["grow"]["updates"] < d["updates"] else NO
    out.append(
        GROW_B.given(
            all_of(parts + [fewer]),
            f"decay: {100 * d['final'][0]:.2f}% in {d['updates']} updates; "
            + "; ".join(nums)
            + f" (equivalence margin {100 * margin:g} points)",
            seeds=seeds,
        )
    )
    return out


def report(config, res) -> list:
    n = config.sgd_noise.noise_scale
    head = ("", *[f"B={b}" for b in res["batch_sizes"]], "B_opt")
    rows = [
        (f"η={lr:g}", *[f"{100 * a:.1f}" for a in o["accuracy"]], f"{o['b_opt']:.3g}")
        for lr, o in zip(res["learning_rates"], res["by_lr"])
    ]
    rows_n = [
        (f"N={size}", *[f"{100 * a:.1f}" for a in o["accuracy"]], f"{o['b_opt']:.3g}")
        for size, o in zip(res["train_sizes"], res["by_size"])
    ]
    rows_s = [
        (arm, f"{100 * x['final'][0]:.2f} ± {100 * x['final'][1]:.2f}", x["updates"], x["diverged"])
        for arm, x in res["schedules"].items()
    ]
    lf, sf = res["lr_fit"], res["size_fit"]
    return [
        f"Test accuracy (%) after {n.num_epochs} epochs at a constant rate (mean over seeds); "
        "B_opt refined by a parabola in log B through the best point and its neighbours. "
        f"Fitted slope of log B_opt on log η: {lf['slope']:.2f} ± {lf['stderr']:.2f} (Smith & "
        "Le: 1).",
        "",
        *markdown_table(head, rows),
        "",
        f"Training-set size N at η = {n.size_learning_rate:g} (the first N examples): slope of "
        f"log B_opt on log N {sf['slope']:.2f} ± {sf['stderr']:.2f} (Smith & Le: 1 for "
        "N ≳ 20,000).",
        "",
        *markdown_table(head, rows_n),
        "",
        f"Decay η or grow B (Smith et al. 2018): B₀ = {n.schedule_batch_size}, η₀ = "
        f"{n.schedule_learning_rate:g}, × or ÷ {n.schedule_factor} at epochs "
        f"{', '.join(map(str, n.schedule_epochs))} of {n.schedule_num_epochs}; the hybrid grows "
        "B at the first and decays η at the later ones.",
        "",
        *markdown_table(("arm", "final test acc. (%)", "updates", "diverged"), rows_s),
    ]


def _optimum_figure(res):
    fig = plotting.figure((11, 8))
    axes = [fig.add_subplot(2, 2, i + 1) for i in range(4)]
    bs = np.asarray(res["batch_sizes"])
    for key, xs, fit_key, name, row in (
        ("by_lr", res["learning_rates"], "lr_fit", "η", 0),
        ("by_size", res["train_sizes"], "size_fit", "N", 1),
    ):
        ax, ax2 = axes[2 * row], axes[2 * row + 1]
        for i, (x, o) in enumerate(zip(xs, res[key])):
            ax.plot(bs, 100 * np.asarray(o["accuracy"]), "o-", color=f"C{i}", label=f"{name}={x:g}")
            ax.axvline(o["b_opt"], color=f"C{i}", lw=0.6, ls=":")
        ax.set(
            xscale="log",
            xlabel="batch size B",
            ylabel="test accuracy (%)",
            title=f"constant rate: test accuracy against B, several {name}",
        )
        ax.legend(fontsize=8)
        b_opt = np.array([o["b_opt"] for o in res[key]])
        ax2.plot(xs, b_opt, "ko")
        fit = res[fit_key]
        x = np.asarray(xs, np.float64)
        c = np.exp(np.mean(np.log(b_opt) - fit["slope"] * np.log(x)))
        label = f"slope {fit['slope']:.2f} ± {fit['stderr']:.2f}"
        ax2.plot(x, c * x ** fit["slope"], "k-", label=label)
        ax2.plot(x, b_opt[0] * x / x[0], "C3--", lw=0.8, label="∝ " + name + " (slope 1)")
        ax2.set(
            xscale="log",
            yscale="log",
            xlabel=name,
            ylabel="B_opt",
            title=f"optimal batch size against {name}",
        )
        kit.log_ticks(ax2, "x", xs)
        ax2.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax2.legend(fontsize=8)
    return fig


def _schedules_figure(res):
    fig = plotting.figure((11, 4))
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, (arm, x) in enumerate(res["schedules"].items()):
        ax.plot(x["epochs"], 100 * np.asarray(x["test_accuracy"]), color=f"C{i}", label=arm)
        label = f"{arm} ({x['updates']} updates)"
        ax2.plot(x["steps"], x["train_loss"], color=f"C{i}", label=label)
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy against epochs")
    ax.legend(fontsize=8)
    ax2.set(
        xlabel="updates (steps)",
        ylabel="training loss",
        yscale="log",
        title="test accuracy against parameter updates",
    )
    ax2.legend(fontsize=8)
    return fig


def figures(config, res) -> dict:
    return {"noise_scale": _optimum_figure(res), "schedules": _schedules_figure(res)}


SECTION = Section(
    name="noise_scale",
    title="Noise scale and the optimal batch size (Smith & Le 2018; Smith et al. 2018)",
    run=run,
    report=report,
    claims=claims,
    figures=figures,
    validate=validate,
    prepare=prepare,
)
