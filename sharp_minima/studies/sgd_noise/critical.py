"""6. The critical batch size (McCandlish et al. 2018; Shallue et al. 2019): steps to a target
training loss against B with η tuned per B, the fit (S/S_min − 1)(E/E_min − 1) = 1 against the
measured B_simple, and the noisy quadratic model's curve."""

from __future__ import annotations

import math

import numpy as np

from sharp_minima import dynamics, gradients, plotting, train
from sharp_minima.studies import claims as claims_lib
from sharp_minima.studies.claims import (
    Claim,
    all_of,
    seed_noise,
    seed_stat,
    verdict,
    within_tolerance,
)
from sharp_minima.studies.common import markdown_table
from sharp_minima.studies.sections import Section
from sharp_minima.studies.sgd_noise import kit

NQM_RESIDUAL = 0.1  # the closed-form model follows the hyperbola within 10 % (rms)
MCCANDLISH = "McCandlish et al. 2018, Sec. 2.2 and Fig. 4"
B_CRIT = Claim(
    statement="B_crit = E_min/S_min from the fit (S/S_min − 1)(E/E_min − 1) = 1 agrees with "
    "the gradient noise scale B_simple measured at the target loss",
    source=MCCANDLISH + " ('within an order of magnitude')",
    quantity="log(factor) − |log(B_crit/B_simple)|",
    noise=claims_lib.SEEDS,
    threshold="sgd_noise.critical.claims.b_crit_factor",
    origin="McCandlish et al.: within an order of magnitude; we ask a factor of 3",
    min_seeds=3,
)
REGIMES = Claim(
    statement="three regimes: perfect scaling at small B (steps ∝ 1/B, local slope ≈ −1), "
    "diminishing returns, no gain at large B (slope ≈ 0)",
    source="Shallue et al. 2019, Sec. 4.1 and Fig. 1; " + MCCANDLISH,
    quantity="perfect_slope − first local slope > 0 and last local slope − no_gain_slope > 0",
    noise=claims_lib.SEEDS,
    threshold="sgd_noise.critical.claims.perfect_slope",
    origin="Shallue et al.: slope −1 then 0; we ask < −0.7 at the smallest B and > −0.3 at "
    "the largest (critical.claims.no_gain_slope)",
    min_seeds=3,
)
NQM_HYPERBOLA = Claim(
    statement="the noisy quadratic model's steps-to-target (closed form, η tuned per B) follow "
    "S = S_min(1 + B_crit/B)",
    source="Zhang et al. 2019 (noisy quadratic model); " + MCCANDLISH,
    quantity="rms relative residual below the tolerance",
    noise=claims_lib.SOLVER,
)
NQM_BATCH_SIZES = tuple(2.0**i for i in range(15))
NQM_RATES = (1e-3, 1.999, 80)  # geomspace: η tuned per B on this grid


def validate(config) -> None:
    """Checks ``sgd_noise.critical``."""
    pos, count = dict(low=0, low_open=True), dict(low=1, integer=True)
    kit.check_fields(
        config,
        (
            ("sgd_noise.critical.batch_sizes", count),
            ("sgd_noise.critical.learning_rates", pos),
            ("sgd_noise.critical.target_loss", pos),
            ("sgd_noise.critical.max_steps", count),
            ("sgd_noise.critical.evals_per_epoch", count),
            ("sgd_noise.critical.nqm_dim", count),
            ("sgd_noise.critical.nqm_target", dict(low=0, low_open=True, high=1, high_open=True)),
            ("sgd_noise.critical.claims.b_crit_factor", dict(low=1, low_open=True)),
            ("sgd_noise.critical.claims.perfect_slope", dict(high=0)),
            ("sgd_noise.critical.claims.no_gain_slope", dict(high=0)),
        ),
    )
    if len(config.sgd_noise.critical.batch_sizes) < 3:
        raise train.ConfigError("sgd_noise.critical.batch_sizes: need >= 3")


def prepare(ctx) -> None:
    k = ctx.config.sgd_noise.critical
    kit.check_sizes([("sgd_noise.critical.batch_sizes", max(k.batch_sizes))], ctx.shared.num_train)


def steps_to_target(steps, loss, target) -> float:
    """The step at which the training loss first reaches ``target``, interpolating log loss
    linearly between evaluations; inf if it never does."""
    loss = np.asarray(loss, np.float64)
    hit = np.nonzero(np.isfinite(loss) & (loss <= target))[0]
    if len(hit) == 0:
        return float("inf")
    i = int(hit[0])
    if i == 0:
        return 0.0
    l0, l1 = math.log(loss[i - 1]), math.log(loss[i])
    frac = (l0 - math.log(target)) / (l0 - l1) if l0 > l1 else 1.0
    return float(steps[i - 1] + frac * (steps[i] - steps[i - 1]))


def run(ctx) -> dict:
    k, seeds = ctx.config.sgd_noise.critical, kit.seeds(ctx.config)
    noise = gradients.GradientNoise(ctx.shared.loss)  # one for every B: compiled once
    per_b = [_batch(ctx, b, seeds, noise) for b in k.batch_sizes]
    fit, fit_seeds = None, []
    ok = [r for r in per_b if np.isfinite(r["steps"])]
    try:
        fit = gradients.critical_batch([r["batch_size"] for r in ok], [r["steps"] for r in ok])
        for s in range(len(seeds)):
            pts = [
                (r["batch_size"], r["steps_seeds"][s])
                for r in per_b
                if np.isfinite(r["steps_seeds"][s])
            ]
            try:
                fit_seeds.append(gradients.critical_batch(*zip(*pts)).b_crit)
            except ValueError:
                pass
    except ValueError as e:
        ctx.log(f"[critical] no fit: {e}")
    # the noisy quadratic model's curve (closed form, η tuned per B on a fine grid)
    q = dynamics.noisy_quadratic(k.nqm_dim)
    target = k.nqm_target * float(q.loss(1.0, 1.0, 0.0))
    grid = np.geomspace(*NQM_RATES)
    nb = list(NQM_BATCH_SIZES)
    ns = [q.best_steps(target, b, grid)[0] for b in nb]
    nfit = gradients.critical_batch(nb, ns)
    return {
        "per_batch": per_b,
        "fit": None if fit is None else fit._asdict(),
        "fit_seeds": fit_seeds,
        "nqm": {"batch_sizes": nb, "steps": ns, "fit": nfit._asdict(), "target": target},
        "target_loss": k.target_loss,
    }


def _batch(ctx, b: int, seeds, noise) -> dict:
    """Batch size ``b``: every rate and seed trained to the target; the fewest steps per seed
    and B_simple at the best member's parameters at the target."""
    pop, log, k = ctx.shared, ctx.log, ctx.config.sgd_noise.critical
    lrs = list(k.learning_rates)
    members = [(lr, s) for lr in lrs for s in seeds]
    key = {
        "B": b,
        "lrs": lrs,
        "target": k.target_loss,
        "max_steps": k.max_steps,
        "evals": k.evals_per_epoch,
        "seeds": seeds,
    }
    out = ctx.cache.arrays(
        f"critical/B{b}",
        key,
        lambda: pop.train(
            seeds=[s for _, s in members],
            learning_rates=[train.epoch_schedule(lr) for lr, _ in members],
            batch_size=b,
            max_steps=k.max_steps,
            evals_per_epoch=k.evals_per_epoch,
            target=k.target_loss,
            log=log,
            label=f"[critical B={b}] ",
        ),
    )
    steps = np.array(
        [
            steps_to_target(out["steps"], out["train_loss"][:, i], k.target_loss)
            for i in range(len(members))
        ]
    ).reshape(len(lrs), len(seeds))
    best = steps.min(0)  # per seed
    best_lr = [lrs[int(i)] for i in steps.argmin(0)]
    i0 = int(steps[:, 0].argmin()) * len(seeds)  # seed 0's best member
    row = {
        "batch_size": b,
        "steps_seeds": best.tolist(),
        "best_lr": best_lr,
        "steps": float(np.mean(best)) if np.isfinite(best).all() else float("inf"),
    }
    if np.isfinite(steps[:, 0]).any() and out["target_step"][i0] >= 0:
        p = pop.member(out["target_params"][i0])

        def b_simple():
            log(f"[critical] measuring B_simple (B={b})")
            full = {name: a[None] for name, a in pop.train_data.items()}
            return noise.measure(p, full).total.b_simple

        key = {"fingerprint": kit.fingerprint(out), "i": i0}
        row["b_simple"] = ctx.cache.get(f"critical/bsimple_B{b}", key, b_simple)
    log(
        f"[critical] B={b}: {row['steps']:.4g} steps to loss {k.target_loss:g} "
        f"(best η {best_lr}), B_simple {row.get('b_simple', float('nan')):.4g}"
    )
    return row


def claims(config, res) -> list:
    """`B_CRIT`: the noise of log(B_crit/B_simple) is the spread of the per-seed fits'
    log B_crit and of log B_simple over the batch sizes it was measured at (each a standard
    error with the t-quantile), not the one fit's lack of fit. `REGIMES`: the local slopes per
    seed. `NQM_HYPERBOLA`: a closed form, within its tolerance."""
    t = config.sgd_noise.critical.claims
    fit, per_b = res["fit"], res["per_batch"]
    if fit is None:
        out = [c.untested("too few batch sizes reached the target") for c in (B_CRIT, REGIMES)]
    else:
        bs_simple = [r["b_simple"] for r in per_b if "b_simple" in r]
        b_simple = float(np.exp(np.mean(np.log(bs_simple)))) if bs_simple else float("nan")
        noise = claims_lib.combined(
            seed_noise(seed_stat(np.log(res["fit_seeds"]))),
            seed_noise(seed_stat(np.log(bs_simple))),
        )
        ratio = fit["b_crit"] / b_simple
        out = [
            B_CRIT.test(
                math.log(t.b_crit_factor) - abs(math.log(ratio)),
                noise,
                f"B_crit {fit['b_crit']:.3g} (per seed "
                + ", ".join(f"{b:.3g}" for b in res["fit_seeds"])
                + f"), B_simple {b_simple:.3g} (geometric mean over {len(bs_simple)} B; range "
                + (f"{min(bs_simple):.3g}–{max(bs_simple):.3g}" if bs_simple else "—")
                + f"); ratio {ratio:.3g} (threshold {t.b_crit_factor:g}×; noise unit of the log "
                f"ratio {noise:.2g}); S_min {fit['s_min']:.4g}, E_min {fit['e_min']:.4g}, fit "
                f"residual {100 * fit['residual']:.1f}%",
                seeds=len(res["fit_seeds"]),
            )
        ]
        out += _regimes(config, per_b, fit)
    nq = res["nqm"]["fit"]
    out.append(
        NQM_HYPERBOLA.given(
            within_tolerance(nq["residual"], NQM_RESIDUAL),
            f"rms relative residual {100 * nq['residual']:.1f}% (tolerance "
            f"{100 * NQM_RESIDUAL:g}%), B_crit {nq['b_crit']:.4g}",
        )
    )
    return out


def _regimes(config, per_b, fit) -> list:
    t = config.sgd_noise.critical.claims
    ok = [r for r in per_b if np.isfinite(r["steps"])]
    if len(ok) < 4:
        return [REGIMES.untested("fewer than 4 batch sizes reached the target")]
    b = np.array([r["batch_size"] for r in ok], np.float64)
    per_seed = np.array([r["steps_seeds"] for r in ok], np.float64)  # (B, seeds)

    def local(i, j):
        return np.log(per_seed[j] / per_seed[i]) / math.log(b[j] / b[i])

    first, last = seed_stat(local(0, 1)), seed_stat(local(-2, -1))
    if first is None or last is None or min(first["n"], last["n"]) < 2:
        return [REGIMES.untested("fewer than 2 seeds reached the target at every B")]
    parts = [
        verdict(t.perfect_slope - first["mean"], seed_noise(first)),
        verdict(last["mean"] - t.no_gain_slope, seed_noise(last)),
    ]
    return [
        REGIMES.given(
            all_of(parts),
            f"local slope d log S/d log B (mean over seeds): {first['mean']:.2f} at B = "
            f"{b[0]:g}–{b[1]:g} (threshold < {t.perfect_slope:g}), {last['mean']:.2f} at B = "
            f"{b[-2]:g}–{b[-1]:g} (threshold > {t.no_gain_slope:g}); B_crit {fit['b_crit']:.3g}",
            seeds=first["n"],
        )
    ]


def report(config, res) -> list:
    rows = [
        (
            r["batch_size"],
            kit.fmt(r["steps"], ".4g"),
            kit.fmt(r["steps"] * r["batch_size"], ".4g") if np.isfinite(r["steps"]) else "—",
            ", ".join(f"{x:g}" for x in r["best_lr"]),
            kit.fmt(r.get("b_simple"), ".4g"),
        )
        for r in res["per_batch"]
    ]
    k = config.sgd_noise.critical
    fit = res["fit"]
    text = (
        f"B_crit = {fit['b_crit']:.4g} ± {fit['b_crit_stderr']:.2g}, S_min = {fit['s_min']:.4g}, "
        f"E_min = {fit['e_min']:.4g}"
        if fit
        else "no fit"
    )
    return [
        f"Steps S to a training loss of {k.target_loss:g} (full training set, interpolated "
        f"between {k.evals_per_epoch} evaluations per epoch), the rate tuned per B over "
        f"{', '.join(f'{x:g}' for x in k.learning_rates)}; E = S·B. Fit: {text}. B_simple = "
        "tr Σ/|G|² at the best run's first evaluation at the target (exact per-example "
        "gradients over the training set, `gradients.GradientNoise`).",
        "",
        *markdown_table(("B", "steps S", "examples E", "best η (per seed)", "B_simple"), rows),
        "",
        f"Noisy quadratic model (d = {k.nqm_dim}): B_crit = "
        f"{res['nqm']['fit']['b_crit']:.4g}, rms residual of the fit "
        f"{100 * res['nqm']['fit']['residual']:.1f}%.",
        "",
        "**The sources**: McCandlish et al. (2018, Sec. 2.2, Fig. 4) find B_crit and B_simple "
        "within an order of magnitude of each other across tasks (their B_simple understates "
        "B_noise when H is not ∝ I); Shallue et al. (2019, Fig. 1) find steps ∝ 1/B (local "
        "slope −1) below B_crit and no gain (slope 0) well above it. Neither trained this "
        "network on MNIST-1D, so there is no published B_crit to set beside ours.",
    ]


def figures(config, res) -> dict:
    """The critical-batch figure, when the fit exists (no figure to name otherwise)."""
    if not res["fit"]:
        return {}
    fig = plotting.figure((15, 4.2))
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    fit = gradients.CriticalBatch(**res["fit"])
    ok = [r for r in res["per_batch"] if np.isfinite(r["steps"])]
    b = np.array([r["batch_size"] for r in ok], np.float64)
    s = np.array([r["steps"] for r in ok])
    bb = np.geomspace(b.min() / 2, b.max() * 2, 200)
    ax = axes[0]
    ax.plot(b, s, "ko", label="measured (η tuned per B)")
    ax.plot(bb, fit.steps(bb), "C0-", label="S_min(1 + B_crit/B)")
    ax.axvline(fit.b_crit, color="C0", ls="--", lw=0.8, label=f"B_crit = {fit.b_crit:.3g}")
    bsim = [r["b_simple"] for r in res["per_batch"] if "b_simple" in r]
    if bsim:
        ax.axvspan(min(bsim), max(bsim), color="C2", alpha=0.15, label="B_simple at the target")
    ax.axvspan(bb[0], fit.b_crit / 4, color="C1", alpha=0.07)
    ax.axvspan(fit.b_crit * 4, bb[-1], color="C3", alpha=0.07)
    for x, y, label in ((0.3, 0.04, "perfect scaling"), (0.6, 0.04, "diminishing\nreturns"),
                        (0.94, 0.4, "no\ngain")):  # fmt: skip
        ax.text(x, y, label, transform=ax.transAxes, fontsize=8, ha="center")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="batch size B",
        ylabel=f"steps to training loss {res['target_loss']:g}",
        title="steps against B (η tuned per B)",
    )
    ax.legend(fontsize=7, loc="upper right")
    ax = axes[1]
    ax.plot(s * b, s, "ko")
    ax.plot(fit.steps(bb) * bb, fit.steps(bb), "C0-")
    ax.axhline(fit.s_min, color="C0", ls=":", lw=0.8, label="S_min")
    ax.axvline(fit.e_min, color="C0", ls="-.", lw=0.8, label="E_min")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="examples E = S·B",
        ylabel="steps S",
        title="(S/S_min − 1)(E/E_min − 1) = 1",
    )
    ax.legend(fontsize=8)
    ax = axes[2]
    q = res["nqm"]
    qf = gradients.CriticalBatch(**q["fit"])
    qb = np.asarray(q["batch_sizes"])
    ax.plot(qb / qf.b_crit, np.asarray(q["steps"]) / qf.s_min, "C2s", label="NQM (closed form)")
    ax.plot(b / fit.b_crit, s / fit.s_min, "ko", label="MLP (measured)")
    x = np.geomspace(min(qb.min() / qf.b_crit, b.min() / fit.b_crit), 300, 200)
    ax.plot(x, 1 + 1 / x, "C0-", label="1 + B_crit/B")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="B / B_crit",
        ylabel="S / S_min",
        title="the same curve, normalised",
    )
    ax.legend(fontsize=8)
    return {"critical_batch": fig}


SECTION = Section(
    name="critical",
    title="The critical batch size (McCandlish et al. 2018; Shallue et al. 2019)",
    run=run,
    report=report,
    claims=claims,
    figures=figures,
    validate=validate,
    prepare=prepare,
)
