"""0. Flatness depends on the parameterisation (the lecture's Sec. 2; Dinh et al. 2017).

One trained ReLU network, with layer 1 × α and layer 2 × 1/α (`models.mlp.rescale_layers`) —
the same function — against λ_max, the Hessian's trace, Keskar's φ, the filter-normalised 1-D
slice (Li et al. 2018) and adaptive sharpness (Kwon et al. 2021).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from sharp_minima import hessian, landscape, plotting, sharpness, train
from sharp_minima.models import mlp
from sharp_minima.studies import claims as claims_lib
from sharp_minima.studies.claims import Claim, all_of, verdict, within_tolerance
from sharp_minima.studies.common import key_streams, markdown_table
from sharp_minima.studies.sections import Section
from sharp_minima.studies.sgd_noise import kit

MEASURES = {
    "lambda_max": "λ_max",
    "trace": "tr H",
    "phi": "Keskar φ",
    "slice_rise": "filter-normalised slice rise",
    "adaptive": "adaptive sharpness",
}
# The same function: the training loss within float32's rounding of a rescaled network
# (relative) — a numerical tolerance, the noise of the check.
SAME_LOSS = 1e-4
DINH = "Dinh et al. 2017, Sec. 4 (reparametrization); lecture notes, Sec. 2"
SAME_FUNCTION = Claim(
    statement="rescaling layer 1 by α and layer 2 by 1/α keeps the function: the same test "
    "accuracy and training loss",
    source=DINH,
    quantity="test accuracy within one example; |training loss ratio − 1| below float32 rounding",
    noise=claims_lib.SOLVER,
)
HESSIAN_MOVES = Claim(
    statement="λ_max and the trace of the Hessian change with α by orders of magnitude",
    source=DINH + " (the Hessian's measures can be made arbitrarily large)",
    quantity="log10(max/min over α) − orders",
    noise=claims_lib.SOLVER,
    threshold="sgd_noise.rescaling.claims.orders",
    origin="Dinh et al.: 'arbitrarily'; over α ∈ [0.1, 10] we ask ≥ 10×",
)
PHI_MOVES = Claim(
    statement="Keskar's φ changes with α",
    source=DINH + " (Keskar's box ε(|x| + 1) is only partly scale-aware)",
    quantity="max/min of φ over α − phi_spread",
    noise=claims_lib.SOLVER,
    threshold="sgd_noise.rescaling.claims.phi_spread",
    origin="far above the float64 L-BFGS-B optimiser's run-to-run noise",
)
INVARIANT = Claim(
    statement="the filter-normalised slice and adaptive sharpness stay put",
    source="Li et al. 2018 (filter normalisation); Kwon et al. 2021 (adaptive sharpness)",
    quantity="invariant_spread − (max/min − 1)",
    noise=claims_lib.SOLVER,
    threshold="sgd_noise.rescaling.claims.invariant_spread",
    origin="scale-invariant by construction: within 1 %",
)


def validate(config) -> None:
    """Checks ``sgd_noise.rescaling``."""
    pos, count = dict(low=0, low_open=True), dict(low=1, integer=True)
    kit.check_fields(
        config,
        (
            ("sgd_noise.rescaling.alphas", pos),
            ("sgd_noise.rescaling.batch_size", count),
            ("sgd_noise.rescaling.learning_rate", pos),
            ("sgd_noise.rescaling.num_epochs", count),
            ("sgd_noise.rescaling.epsilon", pos),
            ("sgd_noise.rescaling.adaptive_epsilon", pos),
            ("sgd_noise.rescaling.slice_radius", pos),
            ("sgd_noise.rescaling.slice_points", dict(low=3, integer=True)),
            ("sgd_noise.rescaling.trace_matvecs", dict(low=3, integer=True)),
            ("sgd_noise.rescaling.claims.orders", pos),
            ("sgd_noise.rescaling.claims.phi_spread", dict(low=1)),
            ("sgd_noise.rescaling.claims.invariant_spread", pos),
        ),
    )
    if 1.0 not in tuple(config.sgd_noise.rescaling.alphas):
        raise train.ConfigError("sgd_noise.rescaling.alphas must include 1.0")


def prepare(ctx) -> None:
    s = ctx.config.sgd_noise
    kit.check_sizes(
        [
            ("sgd_noise.rescaling.batch_size", s.rescaling.batch_size),
            ("sgd_noise.curvature_examples", s.curvature_examples),
        ],
        ctx.shared.num_train,
    )


def _as_float64(a):
    a = jnp.asarray(a)
    return a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a


def run(ctx) -> dict:
    config, pop, cache, log = ctx.config, ctx.shared, ctx.cache, ctx.log
    r, seed = config.sgd_noise.rescaling, config.seed
    key = {"lr": r.learning_rate, "B": r.batch_size, "epochs": r.num_epochs, "seed": seed}
    out = cache.arrays(
        "rescaling/train",
        key,
        lambda: pop.train(
            seeds=[seed],
            learning_rates=[train.epoch_schedule(r.learning_rate)],
            batch_size=r.batch_size,
            num_epochs=r.num_epochs,
            log=log,
            label="[rescaling] ",
        ),
    )
    params = pop.member(out["params"][0])
    grid = np.linspace(-r.slice_radius, r.slice_radius, r.slice_points)
    alphas = [float(a) for a in r.alphas]
    scaled = [mlp.rescale_layers(params, a) for a in alphas]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *scaled)
    test = pop.evaluate(stacked, pop.test_data)
    trn = pop.evaluate(stacked, pop.train_data)
    measure = _measurer(config, pop, params, grid, log)
    rows = {}
    for a, acc, loss in zip(alphas, test["accuracy"], trn["loss"]):
        m = cache.get(
            f"rescaling/alpha{a:g}",
            {
                **key,
                "alpha": a,
                "r": {k: v for k, v in r.items() if k != "claims"},  # not the thresholds
                "float64_phi": 2,
            },
            lambda a=a: measure(a),
        )
        sl = np.asarray(m["slice"])
        mid = len(grid) // 2
        rows[f"{a:g}"] = {
            **m,
            "alpha": a,
            "test_accuracy": float(acc),
            "train_loss": float(loss),
            "slice_rise": float(0.5 * (sl[0] + sl[-1]) - sl[mid]),
        }
        log(
            f"[rescaling] α={a:g}: test acc {float(acc):.4f}, λ_max {m['lambda_max']:.4g}, "
            f"trace {m['trace']:.4g}, φ {m['phi']:.4g}, adaptive {m['adaptive']:.4g}, "
            f"slice rise {rows[f'{a:g}']['slice_rise']:.4g}"
        )
    return {"alphas": alphas, "rows": rows, "grid": grid.tolist(), "num_test": pop.num_test}


def _measurer(config, pop, params, grid, log):
    """``measure(α) -> {λ_max, trace, φ, adaptive, slice}`` of the network rescaled by α."""
    r = config.sgd_noise.rescaling
    batches = kit.curvature_batches(config, pop)
    keys = key_streams(
        config.seed, "rescaling/lanczos", "rescaling/trace", "rescaling/phi", "rescaling/slice"
    )
    curv = hessian.Curvature(pop.loss)
    meter = sharpness.SharpnessMeter(pop.loss)
    land = landscape.Landscape(pop.loss)

    def measure(a):
        log(f"[rescaling] measuring α={a:g}")
        p = mlp.rescale_layers(params, a)
        lam = curv.eigenpairs(p, batches, k=1, key=keys["rescaling/lanczos"], tol=1e-5)
        tr = curv.trace(p, batches, key=keys["rescaling/trace"], num_matvecs=r.trace_matvecs)
        # φ in float64: the optimiser's path is then the same for every α up to rounding
        # (in float32 the signs of tiny gradient components can flip its start and lead
        # L-BFGS-B to another local maximum: 6% apart here).
        with jax.enable_x64(True):  # rescaled in float64 too: no float32 rounding
            p64 = mlp.rescale_layers(jax.tree.map(_as_float64, params), a)
            b64 = jax.tree.map(_as_float64, batches)
            phi = meter.epsilon_sharpness(p64, b64, epsilon=r.epsilon, key=keys["rescaling/phi"])
            ada = meter.epsilon_sharpness(
                p64, b64, epsilon=r.adaptive_epsilon, key=keys["rescaling/phi"], adaptive=True
            )
        d = landscape.filter_normalized_direction(keys["rescaling/slice"], p)
        sl = np.asarray(land.slice(p, batches, [d], [grid])["loss"], np.float64)
        return {
            "lambda_max": float(lam.values[0]),
            "trace": tr.value,
            "trace_se": tr.stderr,
            "phi": phi.value,
            "adaptive": ada.value,
            "slice": sl.tolist(),
        }

    return measure


def _spread(values) -> float:
    """max/min of positive values (inf if one is not positive)."""
    v = np.asarray(values, np.float64)
    return float(v.max() / v.min()) if (v > 0).all() else float("inf")


def claims(config, res) -> list:
    t = config.sgd_noise.rescaling.claims
    rows = [res["rows"][f"{a:g}"] for a in res["alphas"]]
    ref = res["rows"]["1"]
    acc = max(abs(x["test_accuracy"] - ref["test_accuracy"]) for x in rows)
    loss = max(abs(x["train_loss"] / ref["train_loss"] - 1) for x in rows)
    spreads = {m: _spread([x[m] for x in rows]) for m in MEASURES}
    fixed = ("slice_rise", "adaptive")
    lo, hi = min(res["alphas"]), max(res["alphas"])
    nums = lambda ms: "; ".join(f"{MEASURES[m]} max/min {spreads[m]:.4g}" for m in ms)  # noqa
    return [
        SAME_FUNCTION.given(
            all_of(
                [
                    within_tolerance(acc, 1.0 / res["num_test"]),  # under one test example
                    within_tolerance(loss, SAME_LOSS),
                ]
            ),
            f"α ∈ [{lo:g}, {hi:g}]; largest change: test accuracy {acc:.2g}, training loss "
            f"{loss:.2g} (relative; float32 rounding {SAME_LOSS:g})",
        ),
        HESSIAN_MOVES.given(
            all_of(verdict(math.log10(spreads[m]) - t.orders) for m in ("lambda_max", "trace")),
            nums(("lambda_max", "trace")) + f" (threshold 10^{t.orders:g}×)",
        ),
        PHI_MOVES.given(
            verdict(spreads["phi"] - t.phi_spread),
            nums(("phi",)) + f" (threshold {t.phi_spread:g}×)",
        ),
        INVARIANT.given(
            all_of(verdict(t.invariant_spread - (spreads[m] - 1.0)) for m in fixed),
            nums(fixed) + f" (within {100 * t.invariant_spread:g} %)",
        ),
    ]


def report(config, res) -> list:
    r = config.sgd_noise.rescaling
    rows = []
    for a in res["alphas"]:
        x = res["rows"][f"{a:g}"]
        rows.append(
            (
                f"{a:g}",
                f"{100 * x['test_accuracy']:.2f}%",
                f"{x['train_loss']:.5f}",
                f"{x['lambda_max']:.4g}",
                f"{x['trace']:.4g}",
                f"{x['phi']:.4g}",
                f"{x['slice_rise']:.5g}",
                f"{x['adaptive']:.5g}",
            )
        )
    head = ("α", "test acc.", "train loss", "λ_max", "tr H", "φ (%)", "slice rise", "adaptive (%)")
    return [
        f"One network trained for {r.num_epochs} epochs (η = {r.learning_rate:g}, B = "
        f"{r.batch_size}); layer 1 (kernel and bias) × α, layer 2 × 1/α. φ: Keskar's box "
        f"ε(|x| + 1), ε = {r.epsilon:g}; adaptive sharpness: the box ε|x|, ε = "
        f"{r.adaptive_epsilon:g} (Kwon et al. 2021); slice rise: the mean loss at t = ±"
        f"{r.slice_radius:g} along one filter-normalised direction minus the loss at 0. "
        "Only the last two can be compared across networks.",
        "",
        *markdown_table(head, rows),
        "",
        "**The sources** (Dinh et al. 2017, Sec. 4; the lecture notes, Sec. 2) give no table: "
        "their numbers are the exact predictions. The function — hence test accuracy and "
        "training loss — is unchanged to rounding; the Hessian's block of layer 1 scales by "
        "1/α² and that of layer 2 by α², so λ_max and tr H grow at least as max(α², 1/α²) "
        f"(×{max(a * a for a in res['alphas']):g} at the grid's end α = "
        f"{max(res['alphas']):g}) and without bound as α → 0 or ∞.",
    ]


def figures(config, res) -> dict:
    fig = plotting.figure((11, 4))
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    a = np.asarray(res["alphas"])
    for i, (m, name) in enumerate(MEASURES.items()):
        v = np.array([res["rows"][f"{x:g}"][m] for x in a])
        ax.plot(a, v / res["rows"]["1"][m], "o-", color=f"C{i}", label=name)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="α (layer 1 × α, layer 2 × 1/α)",
        ylabel="measure / its value at α = 1",
        title="the same function, rescaled",
    )
    kit.log_ticks(ax, "x", a)
    ax.legend(fontsize=8)
    grid = np.asarray(res["grid"])
    for i, x in enumerate(a):
        ax2.plot(
            grid,
            np.asarray(res["rows"][f"{x:g}"]["slice"]).ravel(),
            color=f"C{i}",
            lw=2.5 - 0.4 * i,
            label=f"α = {x:g}",
        )
    ax2.set(
        xlabel="t (filter-normalised direction)",
        ylabel="training loss",
        title="filter-normalised 1-D slices, one per α",
    )
    ax2.legend(fontsize=8)
    return {"rescaling": fig}


SECTION = Section(
    name="rescaling",
    title="Flatness depends on the parameterisation (Dinh et al. 2017)",
    run=run,
    report=report,
    claims=claims,
    figures=figures,
    validate=validate,
    prepare=prepare,
)
