"""1. Toy sharpness (the lecture's Table 1): Keskar's φ of 100x², x⁸, 100(x² + y²) and
100x² + y⁸ at their minimum for ε ∈ {1e-3, 5e-4}, A the identity or random (float64)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sharp_minima import sharpness
from sharp_minima.studies import claims as claims_lib
from sharp_minima.studies.claims import Claim, all_of, verdict, within_tolerance
from sharp_minima.studies.common import markdown_table
from sharp_minima.studies.sections import Section
from sharp_minima.studies.sgd_noise import kit

# The lecture's Table 1: (function, A, ε) -> φ at the minimum.
LECTURE_TABLE1 = {
    ("100x²", "identity", 1e-3): 1.0e-02,
    ("x⁸", "identity", 1e-3): 1.0e-22,
    ("100x²", "identity", 5e-4): 2.5e-03,
    ("x⁸", "identity", 5e-4): 3.9e-25,
    ("100x²", "random", 1e-3): 2.8e-03,
    ("x⁸", "random", 1e-3): 6.5e-25,
    ("100x²", "random", 5e-4): 7.1e-04,
    ("x⁸", "random", 5e-4): 2.5e-27,
    ("100(x²+y²)", "identity", 1e-3): 2.0e-02,
    ("100x²+y⁸", "identity", 1e-3): 1.0e-02,
    ("100(x²+y²)", "identity", 5e-4): 5.0e-03,
    ("100x²+y⁸", "identity", 5e-4): 2.5e-03,
    ("100(x²+y²)", "random", 1e-3): 2.1e-02,
    ("100x²+y⁸", "random", 1e-3): 1.9e-02,
    ("100(x²+y²)", "random", 5e-4): 5.3e-03,
    ("100x²+y⁸", "random", 5e-4): 4.8e-03,
}
# name -> (f, dimension, φ at the minimum for A = I: the box |y_i| ≤ ε, f(0) = 0)
TOYS = {
    "100x²": (lambda p, b: 100.0 * p[0] ** 2, 1, lambda e: 100 * e**2 * 100),
    "x⁸": (lambda p, b: p[0] ** 8, 1, lambda e: e**8 * 100),
    "100(x²+y²)": (lambda p, b: 100.0 * (p[0] ** 2 + p[1] ** 2), 2, lambda e: 200 * e**2 * 100),
    "100x²+y⁸": (
        lambda p, b: 100.0 * p[0] ** 2 + p[1] ** 8,
        2,
        lambda e: (100 * e**2 + e**8) * 100,
    ),
}
# Solver tolerances (the noise of these deterministic checks): L-BFGS-B in float64 finds the
# box maximum of a convex toy to near machine precision; a random A changes only the
# constant, not the power of ε, which L-BFGS-B resolves to 0.1 %.
CLOSED_FORM_RTOL = 1e-9
SCALING_RTOL = 1e-3
# The lecture prints 2 significant digits: its values are rounded by up to 3 %.
PRINTED_RTOL = 0.03
TABLE = "lecture notes 'Towards Understanding SGD', Sec. 2, Table 1 and Definition 2"
CLOSED_FORM = Claim(
    statement="the identity rows of Table 1 equal their closed forms (φ = 100·max f over the "
    "box |y_i| ≤ ε)",
    source=TABLE,
    quantity="|φ / closed form − 1| below the solver's tolerance",
    noise=claims_lib.SOLVER,
)
PRINTED = Claim(
    statement="our identity rows match the lecture's printed values",
    source=TABLE,
    quantity="|φ / printed − 1| within the printing's rounding (2 significant digits)",
    noise=claims_lib.SOLVER,
)
SCALING = Claim(
    statement="with a random A, φ scales as ε² for the quadratics and ε⁸ for x⁸",
    source=TABLE + " (the lecture's A is unstated: its random rows are compared by these laws)",
    quantity="|φ(ε₁)/φ(ε₀) / (ε₁/ε₀)^p − 1| below the solver's tolerance",
    noise=claims_lib.SOLVER,
)
DEFINITION_2 = Claim(
    statement="Definition 2 calls 100x² + y⁸ sharp although it is flat in y: its φ is close "
    "to 100(x² + y²)'s and many orders above x⁸'s",
    source=TABLE,
    quantity="φ(100(x²+y²))/φ(100x²+y⁸) ≤ sharp_within and φ(100x²+y⁸)/φ(x⁸) > flat_below",
    noise=claims_lib.SOLVER,
    threshold="sgd_noise.toy.claims.sharp_within",
    origin="Table 1: the two quadratics' φ agree within 2×, x⁸'s is 10⁶× below or more",
)


def validate(config) -> None:
    """Checks ``sgd_noise.toy``."""
    kit.check_fields(
        config,
        (
            ("sgd_noise.toy.epsilons", dict(low=0, low_open=True)),
            ("sgd_noise.toy.claims.sharp_within", dict(low=1)),
            ("sgd_noise.toy.claims.flat_below", dict(low=1)),
        ),
    )


def run(ctx) -> dict:
    config, log = ctx.config, ctx.log
    key = {
        "epsilons": list(config.sgd_noise.toy.epsilons),
        "seed": config.seed,
        "version": sharpness.VERSION,
    }
    return ctx.cache.get("toy", key, lambda: measure(config, log))


def measure(config, log=print) -> dict:
    """φ of every toy function, A and ε (the rows of Table 1)."""
    log("[toy] measuring the lecture's Table 1")
    rows = []
    with jax.enable_x64(True):
        for name, (f, n, closed) in TOYS.items():
            meter = sharpness.SharpnessMeter(f)
            a = sharpness.random_subspace(jax.random.key(config.seed + n), n, n, jnp.float64)
            for kind in ("identity", "random"):
                for eps in config.sgd_noise.toy.epsilons:
                    r = meter.epsilon_sharpness(
                        jnp.zeros(n, jnp.float64),
                        None,
                        epsilon=float(eps),
                        key=jax.random.key(config.seed),
                        subspace=None if kind == "identity" else a,
                    )
                    rows.append(
                        {
                            "function": name,
                            "dim": n,
                            "A": kind,
                            "epsilon": float(eps),
                            "phi": r.value,
                            "closed_form": closed(float(eps)) if kind == "identity" else None,
                            "lecture": LECTURE_TABLE1.get((name, kind, float(eps))),
                        }
                    )
    return {"rows": rows}


def claims(config, res) -> list:
    t = config.sgd_noise.toy.claims
    rows = res["rows"]
    ident = [r for r in rows if r["A"] == "identity"]
    err = max(abs(r["phi"] / r["closed_form"] - 1) for r in ident)
    eps = sorted({r["epsilon"] for r in rows})
    out = [
        CLOSED_FORM.given(
            within_tolerance(err, CLOSED_FORM_RTOL),
            f"largest relative error {err:.2g} over {len(ident)} rows (tolerance "
            f"{CLOSED_FORM_RTOL:g})",
        )
    ]
    lect = [r for r in ident if r["lecture"]]
    lerr = max(abs(r["phi"] / r["lecture"] - 1) for r in lect)
    out.append(
        PRINTED.given(
            within_tolerance(lerr, PRINTED_RTOL),
            f"largest relative difference {lerr:.2g} (rounding up to {PRINTED_RTOL:g}; the "
            "lecture rounds x⁸ at ε = 5e-4: 3.9e-25 for 100·(5e-4)⁸ = 3.906e-25)",
        )
    )
    if len(eps) >= 2:
        out.append(_scaling_claim(rows, eps[0], eps[-1]))
    e = max(eps)
    ph = {r["function"]: r["phi"] for r in ident if r["epsilon"] == e}
    close = ph["100(x²+y²)"] / ph["100x²+y⁸"]
    above = ph["100x²+y⁸"] / ph["x⁸"]
    out.append(
        DEFINITION_2.given(
            all_of(
                [
                    verdict(math.log(t.sharp_within / close)),
                    verdict(math.log(above / t.flat_below)),
                ]
            ),
            f"ε = {e:g}: {ph['100x²+y⁸']:.3g} vs {ph['100(x²+y²)']:.3g} (ratio {close:.3g}, "
            f"threshold {t.sharp_within:g}) and {ph['x⁸']:.3g} (ratio {above:.3g}, threshold "
            f"{t.flat_below:g})",
        )
    )
    return out


def _scaling_claim(rows, e0, e1):
    parts, nums = [], []
    for name in TOYS:
        power = 8 if name == "x⁸" else 2
        get = {r["epsilon"]: r["phi"] for r in rows if r["function"] == name and r["A"] == "random"}
        ratio = get[e1] / get[e0]
        expect = (e1 / e0) ** power
        parts.append(within_tolerance(abs(ratio / expect - 1), SCALING_RTOL))
        nums.append(f"{name}: {ratio:.4g} (expected {expect:.4g})")
    return SCALING.given(
        all_of(parts),
        f"φ(ε={e1:g})/φ(ε={e0:g}): " + "; ".join(nums) + f" (tolerance {SCALING_RTOL:g})",
    )


def report(config, res) -> list:
    rows = [
        (
            r["dim"],
            r["A"],
            f"{r['epsilon']:g}",
            r["function"],
            f"{r['phi']:.3e}",
            "—" if r["closed_form"] is None else f"{r['closed_form']:.3e}",
            "—" if r["lecture"] is None else f"{r['lecture']:.1e}",
        )
        for r in res["rows"]
    ]
    return [
        "φ at the minimum x = 0 (float64, L-BFGS-B as for networks). Random A: an n×n matrix "
        "of N(0, 1) entries (the lecture does not say how its A was drawn, so its random "
        "rows are compared through the scaling laws in the claims).",
        "",
        *markdown_table(("dim", "A", "ε", "function", "φ here", "closed form", "lecture"), rows),
    ]


SECTION = Section(
    name="toy",
    title="Toy sharpness (the lecture's Table 1)",
    run=run,
    report=report,
    claims=claims,
    validate=validate,
    needs_data=False,
)
