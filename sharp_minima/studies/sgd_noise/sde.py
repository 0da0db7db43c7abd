"""5. The SDE picture (`sharp_minima.dynamics`): the stationary spread against η/B,
double-well occupation against the Boltzmann and Laplace ratios, escape times under isotropic
and Σ ∝ H noise, the noisy quadratic model against its closed form."""

from __future__ import annotations

import math

import numpy as np

from sharp_minima import dynamics, plotting
from sharp_minima.studies import claims as claims_lib
from sharp_minima.studies.claims import Claim, all_of, ordered, verdict
from sharp_minima.studies.common import key_streams, markdown_table
from sharp_minima.studies.sections import Section
from sharp_minima.studies.sgd_noise import kit, sde_runs

LECTURE = "lecture notes 'Towards Understanding SGD', Sec. 5"
KRAMERS = "Kramers 1940; Gardiner, Handbook of Stochastic Methods, Sec. 5.2.7"


def _sim(statement, source, quantity, margin=None) -> Claim:
    """A claim on a simulation (noise: its standard error), ``margin`` its equivalence."""
    field = f"sgd_noise.sde.claims.{margin}" if margin else None
    return Claim(statement, source, quantity, claims_lib.SIMULATION, equivalence=field)


SPREAD = _sim(
    "the stationary spread of mini-batch SGD grows with η/B and matches the discrete "
    "closed form ηs₀²(N − B)/(B(N − 1)(2 − η)) (s₀² the ddof-0 variance; the (1 − B/N) factor "
    "included)",
    f"{LECTURE} (eq. 25); Mandt et al. 2017",
    "Var x increasing in η/B; |Var x / closed form − 1| within the margin",
    "match_margin",
)
BOLTZMANN = _sim(
    "double-well occupation follows exp(−L/T) at every temperature, and the "
    "curvature prefactor √(H_B/H_A) matters (depths alone mispredict it)",
    f"{LECTURE} (eq. 26)",
    "|P_A − Boltzmann| within the margin; |P_A − depth-only| > 0",
    "occupation_margin",
)
LAPLACE = _sim(
    "the occupation ratio matches the Laplace prediction √(H_B/H_A)·exp(−(L_A − "
    "L_B)/T), whose error vanishes as T → 0",
    f"{LECTURE} (eq. 26)",
    "|P_A − Laplace| within the margin; |exact/Laplace − 1| falling with T",
    "occupation_margin",
)
ESCAPE_ISOTROPIC = _sim(
    "under isotropic noise curvature enters only the prefactor: a sharp and "
    "a flat well of one depth have the same slope of log τ against B/η",
    f"{KRAMERS}; {LECTURE}",
    "|log(slope ratio flat/sharp)| within log(1 + margin)",
    "slope_margin",
)
ESCAPE_CURVATURE = _sim(
    "under Σ ∝ H the flat well's slope is larger: flat minima are exponentially preferred",
    f"Xie et al. 2021, Sec. 3; {LECTURE}",
    "slope ratio flat/sharp − 1, predicted > 0",
)
ESCAPE_EXACT = _sim(
    "the Σ ∝ H slope ratio is the exact first-passage prediction for the "
    "simulated barriers (Kramers' ×4 holds only as ΔL/T → ∞)",
    KRAMERS,
    "|measured / exact slope ratio − 1| within the margin",
    "slope_margin",
)
NQM = _sim("the noisy quadratic model's simulated mean loss equals its closed form",
    "Zhang et al. 2019; McCandlish et al. 2018, App. A",
    "|simulated / closed form − 1| within the margin at every step", "match_margin")  # fmt: skip
SIGMA2 = sde_runs.SIGMA2
LAPLACE_TEMPERATURES = (0.2, 0.1, 0.05, 0.025)  # below the simulated ones: quadrature only
DOUBLE_WELL = dict(depth_a=1.0, depth_b=0.8, curv_a=8.0, curv_b=2.0)


def validate(config) -> None:
    """Checks ``sgd_noise.sde``."""
    pos, count = dict(low=0, low_open=True), dict(low=1, integer=True)
    kit.check_fields(
        config,
        (
            ("sgd_noise.sde.runs", dict(low=10, integer=True)),
            ("sgd_noise.sde.ratios", pos),
            ("sgd_noise.sde.temperatures", pos),
            ("sgd_noise.sde.dt", pos),
            ("sgd_noise.sde.occupation_time", pos),
            ("sgd_noise.sde.escape_depth", pos),
            ("sgd_noise.sde.escape_ratios", pos),
            ("sgd_noise.sde.escape_steps", count),
            ("sgd_noise.sde.nqm_dim", count),
            ("sgd_noise.sde.claims.match_margin", pos),
            ("sgd_noise.sde.claims.occupation_margin", pos),
            ("sgd_noise.sde.claims.slope_margin", pos),
        ),
    )


def run(ctx) -> dict:
    config, cache, log = ctx.config, ctx.cache, ctx.log
    d = config.sgd_noise.sde
    keys = key_streams(config.seed, "sde/spread", "sde/occupation", "sde/escape", "sde/nqm")
    out: dict = {}
    out["spread"] = cache.get(
        "sde/spread",
        {"runs": d.runs, "ratios": list(d.ratios)},
        lambda: sde_runs.spread(config, keys["sde/spread"], log),
    )
    log("[sde] stationary spread done")
    pot = dynamics.double_well(**DOUBLE_WELL)
    out["occupation"] = cache.get(
        "sde/occupation",
        {"runs": d.runs, "T": list(d.temperatures), "dt": d.dt, "time": d.occupation_time},
        lambda: sde_runs.occupation(config, pot, keys["sde/occupation"], log),
    )
    # Below the simulated temperatures runs cannot mix in affordable time: the Laplace
    # ratio against the exact Boltzmann ratio by quadrature.
    error = lambda t: dynamics.boltzmann_ratio(pot, t) / dynamics.laplace_ratio(pot, t) - 1  # noqa: E731
    out["laplace_error"] = [{"temperature": t, "error": error(t)} for t in LAPLACE_TEMPERATURES]
    log("[sde] double-well occupation done")
    key = {"runs": d.runs, "ratios": list(d.escape_ratios), "steps": d.escape_steps}
    key.update(depth=d.escape_depth, dt=d.dt)
    out["escape"] = cache.get(
        "sde/escape", key, lambda: sde_runs.escapes(config, keys["sde/escape"], log)
    )
    log("[sde] escape times done")
    out["nqm"] = cache.get(
        "sde/nqm",
        {"runs": d.runs, "dim": d.nqm_dim},
        lambda: sde_runs.nqm(config, keys["sde/nqm"], log),
    )
    log("[sde] noisy quadratic model done")
    out["escape_sigma2"] = SIGMA2
    return out


def claims(config, res) -> list:
    """Every claim of the SDE section, each declared above; "matches" claims are TOST
    equivalences within ``sgd_noise.sde.claims`` margins, noise units the simulations'
    standard errors."""
    t = config.sgd_noise.sde.claims
    sp = res["spread"]
    parts = []
    for b in sorted({r["B"] for r in sp}):
        rows = sorted((r for r in sp if r["B"] == b), key=lambda r: r["ratio"])
        parts.append(
            ordered([r["var"] for r in rows], [r["var_se"] for r in rows], decreasing=False)
        )
    rel = [(r["var"] / r["expected"] - 1, r["var_se"] / r["expected"]) for r in sp]
    parts += [claims_lib.equivalence(d, se, t.match_margin) for d, se in rel]
    worst = max(rel, key=lambda x: abs(x[0]))
    out = [
        SPREAD.given(
            all_of(parts),
            f"largest relative deviation from the closed form {worst[0]:+.3f} ± {worst[1]:.3f} "
            f"(margin {t.match_margin:g}) over {len(sp)} (η, B) pairs; "
            + ", ".join(f"B={r['B']} η/B={r['ratio']:g}: {r['var']:.4g}" for r in sp[:4]),
        )
    ]
    out += _occupation_claims(config, res)
    out += _escape_claims(config, res)
    q = res["nqm"]
    se = math.sqrt(2 / q["runs"])  # relative error of a mean of squares over the runs
    rels = [s_ / c - 1 for s_, c in zip(q["simulated"], q["closed_form"])]
    out.append(
        NQM.given(
            all_of([claims_lib.equivalence(x, se, t.match_margin) for x in rels]),
            f"largest relative difference {max(map(abs, rels)):.3g} (noise unit {se:.2g}, "
            f"margin {t.match_margin:g}) at steps " + ", ".join(map(str, q["steps"])),
        )
    )
    return out


def _occupation_claims(config, res) -> list:
    t = config.sgd_noise.sde.claims
    occ = res["occupation"]
    frac = lambda r: r / (1 + r)  # noqa: E731 - P_A from P_A/P_B
    boltz, lap, depth = [], [], []
    for r in occ:
        p, se = r["p_a"], r["p_a_se"]
        boltz.append(claims_lib.equivalence(p - frac(r["boltzmann"]), se, t.occupation_margin))
        lap.append(claims_lib.equivalence(p - frac(r["laplace"]), se, t.occupation_margin))
        depth.append(verdict(abs(p - frac(r["depth_only"])), se))
    errs = [abs(e["error"]) for e in res["laplace_error"]]  # quadrature: no noise
    dev = lambda key: max(abs(r["p_a"] - frac(r[key])) for r in occ)  # noqa: E731
    least_depth = min(abs(r["p_a"] - frac(r["depth_only"])) for r in occ)
    return [
        BOLTZMANN.given(
            all_of(boltz + depth),
            f"largest |P_A − Boltzmann| {dev('boltzmann'):.3f} (margin {t.occupation_margin:g}"
            f"); smallest |P_A − depth-only| {least_depth:.3f}; P_A ± SE at T = "
            + ", ".join(f"{r['temperature']:g}: {r['p_a']:.3f} ± {r['p_a_se']:.3f}" for r in occ),
        ),
        LAPLACE.given(
            all_of([*lap, ordered(errs, [0.0] * len(errs), decreasing=True)]),
            f"largest |P_A − Laplace| {dev('laplace'):.3f} (margin {t.occupation_margin:g}); "
            "|exact/Laplace − 1| (quadrature) at T = "
            + ", ".join(
                f"{e['temperature']:g}: {abs(e['error']):.2g}" for e in res["laplace_error"]
            ),
        ),
    ]


def _escape_claims(config, res) -> list:
    t, d = config.sgd_noise.sde.claims, config.sgd_noise.sde
    iso, cur = (sde_runs.slopes(config, res["escape"], n) for n in ("isotropic", "curvature"))
    if not (len(iso) == 2 and len(cur) == 2):
        why = "fewer than half the runs escaped at two B/η"
        return [c.untested(why) for c in (ESCAPE_ISOTROPIC, ESCAPE_CURVATURE, ESCAPE_EXACT)]
    (r_iso, se_iso, e_iso), (r_cur, se_cur, e_cur) = sde_runs.ratio(iso), sde_runs.ratio(cur)
    kramers = 2 * d.escape_depth / res["escape_sigma2"]
    dl_t = ", ".join(f"{d.escape_depth * r / (2 * SIGMA2):.2g}" for r in d.escape_ratios)
    slopes = lambda s: f"slopes (sharp, flat) {s['sharp'][0]:.3f}, {s['flat'][0]:.3f}"  # noqa
    return [
        ESCAPE_ISOTROPIC.same(math.log(r_iso), se_iso / r_iso, math.log1p(t.slope_margin),
            f"{slopes(iso)}: ratio {r_iso:.2f} ± {se_iso:.2f} (exact first passage {e_iso:.2f}"
            f"; Kramers: 1, slope 2ΔL/σ² = {kramers:.3g}; margin ×{1 + t.slope_margin:g})"),
        ESCAPE_CURVATURE.test(r_cur - 1.0, se_cur, f"Σ ∝ H {slopes(cur)}: ratio {r_cur:.2f} ± "
            f"{se_cur:.2f} (exact first passage {e_cur:.2f}; Kramers limit 4)"),
        ESCAPE_EXACT.same(r_cur / e_cur - 1.0, se_cur / e_cur, t.slope_margin,
            f"measured {r_cur:.2f} ± {se_cur:.2f} vs exact {e_cur:.2f} at ΔL/T = {dl_t} (sharp "
            f"well; margin {t.slope_margin:g} relative; Kramers' ×4 is the ΔL/T → ∞ limit)"),
    ]  # fmt: skip


def report(config, res) -> list:
    d = config.sgd_noise.sde
    sp = [(r["B"], f"{r['ratio']:g}", f"{r['learning_rate']:g}",
           kit.fmt(r.get("noise_scale"), ".4g"), f"{r['temperature']:.4g}",
           f"{r['var']:.4g} ± {r['var_se']:.2g}", f"{r['expected']:.4g}")
          for r in res["spread"]]  # fmt: skip
    oc = [(r["temperature"], f"{r['p_a']:.3f} ± {r['p_a_se']:.3f}",
           f"{r['boltzmann'] / (1 + r['boltzmann']):.3f}",
           f"{r['laplace'] / (1 + r['laplace']):.3f}", f"{r['time']:.0f}")
          for r in res["occupation"]]  # fmt: skip
    es = [
        (r["noise"], r["well"], f"{r['ratio']:g}", f"{100 * r['escaped']:.0f}%")
        + (kit.fmt(r["median_time"], ".4g"),)
        for r in res["escape"]
    ]
    q = res["nqm"]
    nq = [
        (t, f"{s:.5g}", f"{c:.5g}") for t, s, c in zip(q["steps"], q["simulated"], q["closed_form"])
    ]
    return [
        f"{d.runs:,} runs per setting in one `jit(vmap(scan))` call (`sharp_minima.dynamics`).",
        "",
        "**Stationary spread** of SGD with true mini-batch sampling on N = 64 examples, "
        "ℓᵢ = ½(x − cᵢ)², against the discrete closed form:",
        "",
        *markdown_table(
            (
                "B",
                "η/B",
                "η",
                "noise scale η(1 − B/N)/B",
                "T = ησ²(1 − B/N)/(2B)",
                "Var x",
                "closed form η Var ξ/(2 − η)",
            ),
            sp,
        ),  # fmt: skip
        "",
        "**Double-well occupation** (Euler–Maruyama, dt = "
        f"{d.dt:g}; L_A = −1, H_A = 8, L_B = −0.8, H_B = 2; half the runs start in each well):",
        "",
        *markdown_table(("T", "P_A measured", "P_A Boltzmann", "P_A Laplace", "time"), oc),
        "",
        f"**Escape times** from a sharp (H = 8) and a flat (H = 2) well of the same depth "
        f"{d.escape_depth:g}, η = {d.dt:g}: isotropic noise of variance σ²/B, σ² = "
        f"{res['escape_sigma2']:g}, or Σ ∝ H (at the well's minimum; the same variance as the "
        "isotropic noise at the flat one); median escape time (in units of η·steps):",
        "",
        *markdown_table(("noise", "well", "B/η", "escaped", "median time"), es),
        "",
        f"**Noisy quadratic model** (d = {d.nqm_dim}, hᵢ = 1/i, Σ = H/B, η = "
        f"{q['learning_rate']:g}, B = {q['batch_size']}): mean loss over the runs against the "
        "closed form",
        "",
        *markdown_table(("step", "simulated", "closed form"), nq),
        "",
        "**The sources' numbers** are the closed forms in the right-hand columns (the lecture "
        "notes, eqs. 25–26; Mandt et al. 2017) and, for escapes, Kramers' law: the slope of "
        "log τ against B/η is 2ΔL/σ² in both wells under isotropic noise, and 2ΔL/(σ²·H/2) "
        "under Σ ∝ H — a flat/sharp ratio of 8/2 = 4 only as ΔL/T → ∞ (Xie et al. 2021); "
        "the exact first passage at the simulated barriers predicts less (claims table).",
    ]


def figures(config, res) -> dict:
    fig = plotting.figure((15, 4))
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    for j, b in enumerate(sorted({r["B"] for r in res["spread"]})):
        rows = [r for r in res["spread"] if r["B"] == b]
        x = [r["ratio"] for r in rows]
        axes[0].errorbar(
            x, [r["var"] for r in rows], [r["var_se"] for r in rows], fmt="o", color=f"C{j}",
            label=f"B={b}",
        )  # fmt: skip
        axes[0].plot(x, [r["expected"] for r in rows], "-", color=f"C{j}", lw=0.8)
    axes[0].set(
        xscale="log",
        yscale="log",
        xlabel="η/B",
        ylabel="stationary Var x",
        title="mini-batch SGD: stationary spread against η/B (lines: closed form)",
    )
    kit.log_ticks(axes[0], "x", sorted({r["ratio"] for r in res["spread"]}))
    axes[0].legend(fontsize=8)
    occ = res["occupation"]
    inv_t = [1 / r["temperature"] for r in occ]
    meas = [r["p_a"] / (1 - r["p_a"]) for r in occ]
    err = [r["p_a_se"] / (1 - r["p_a"]) ** 2 for r in occ]  # of p/(1 − p)
    axes[1].errorbar(inv_t, meas, err, fmt="ko", capsize=3, label="measured (± 1 s.e.)")
    tt = np.linspace(min(inv_t), max(inv_t), 50)
    axes[1].plot(inv_t, [r["boltzmann"] for r in occ], "C0-", label="Boltzmann (exact)")
    axes[1].plot(tt, np.sqrt(2 / 8) * np.exp(0.2 * tt), "C3--", label="Laplace")
    axes[1].set(
        yscale="log", xlabel="1/T", ylabel="P_A / P_B", title="double well: occupation ratio"
    )
    axes[1].legend(fontsize=8)
    for noise, ls in (("isotropic", "-"), ("curvature", "--")):
        for side, c in (("sharp", "C3"), ("flat", "C0")):
            rows = [r for r in res["escape"] if r["noise"] == noise and r["well"] == side]
            label = f"{side}, {'Σ ∝ H' if noise == 'curvature' else 'isotropic'}"
            x, y = [r["ratio"] for r in rows], [r["median_time"] for r in rows]
            axes[2].plot(x, y, ls, color=c, marker="o", label=label)
    axes[2].set(
        yscale="log",
        xlabel="B/η",
        ylabel="median escape time",
        title="escape: isotropic (solid), Σ ∝ H (dashed; flat: the same)",
    )
    axes[2].legend(fontsize=8)
    return {"sde": fig}


SECTION = Section(
    name="sde",
    title="The SDE picture",
    run=run,
    report=report,
    claims=claims,
    figures=figures,
    validate=validate,
    needs_data=False,
)
