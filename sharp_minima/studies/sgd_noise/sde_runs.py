"""The simulations of section 5 (`sde`): the stationary spread, the double-well occupation,
the escape times and the noisy quadratic model, each a function of the config and a key
(`sde.run` caches them), and the escape-time slopes fitted from their rows."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from sharp_minima import dynamics, gradients

SIGMA2 = 10.0  # gradient-noise variance per example at the flat minimum


def spread(config, key, log) -> list:
    """(a) The stationary spread of mini-batch SGD on N = 64 examples, ℓᵢ = ½(x − cᵢ)²,
    against η/B and the discrete closed form."""
    d = config.sgd_noise.sde
    log("[sde] measuring spread")
    rng = np.random.default_rng(config.seed)
    c = rng.standard_normal(64)
    c = (c - c.mean()) / c.std()  # s² = 1 around the minimum c̄ = 0
    num = len(c)
    rows = []
    for b in (2, 8):
        sim = dynamics.Simulator(
            dynamics.quadratic([1.0]),
            dynamics.minibatch_noise(lambda x, ci: x - ci, jnp.asarray(c)[:, None], b),
        )
        for r in d.ratios:
            lr = r * b
            steps = int(8 / lr)
            x0 = jnp.zeros((d.runs, 1))
            fin = sim.run(x0, key=key, learning_rate=lr, num_steps=steps).final
            var = float(fin.var())
            # Var ξ = s₀² (N − B)/(B (N − 1)) with s₀² = 1 the ddof-0 variance of the cᵢ;
            # x ← x − η(hx + ξ) is stationary at Var x = η Var ξ / (h (2 − ηh)), h = 1
            expect = lr * (num - b) / (b * (num - 1)) / (2 - lr)
            rows.append(
                {
                    "B": b,
                    "ratio": r,
                    "learning_rate": lr,
                    "var": var,
                    "var_se": var * math.sqrt(2 / d.runs),
                    "expected": expect,
                    "noise_scale": gradients.noise_scale(lr, b, num),
                    # σ² = N/(N − 1): the unbiased per-example variance of the cᵢ
                    "temperature": gradients.temperature(
                        lr, b, num, gradient_variance=num / (num - 1)
                    ),
                }
            )
    return rows


def occupation(config, pot, key, log) -> list:
    """(b) Double-well occupation (Euler–Maruyama, half the runs starting in each well)."""
    d = config.sgd_noise.sde
    log("[sde] measuring occupation")
    rows = []
    half = d.runs // 2
    x0 = jnp.concatenate(
        [
            jnp.full((half, 1), float(pot.minima[0, 0])),
            jnp.full((d.runs - half, 1), float(pot.minima[1, 0])),
        ]
    )
    t_min = min(d.temperatures)
    for t in d.temperatures:
        sim = dynamics.Simulator(pot, dynamics.langevin_noise(t, d.dt))
        time_ = d.occupation_time * math.exp(0.8 / t - 0.8 / t_min)
        fin = sim.run(
            x0,
            key=jax.random.fold_in(key, int(1000 * t)),
            learning_rate=d.dt,
            num_steps=int(time_ / d.dt),
        ).final
        p = float((fin[:, 0] < 0).mean())
        rows.append(
            {
                "temperature": t,
                "p_a": p,
                "p_a_se": math.sqrt(p * (1 - p) / d.runs),
                "boltzmann": dynamics.boltzmann_ratio(pot, t),
                "laplace": dynamics.laplace_ratio(pot, t),
                "depth_only": math.exp(0.2 / t),
                "time": time_,
            }
        )
    return rows


def escapes(config, key, log) -> list:
    """(c) Escape times from a sharp and a flat well of the same depth."""
    d = config.sgd_noise.sde
    log("[sde] measuring escapes")
    well = dynamics.double_well(d.escape_depth, d.escape_depth, 8.0, 2.0)
    rows = []
    lr = d.dt
    starts = {
        "sharp": (float(well.minima[0, 0]), lambda x: x[0] > 0),
        "flat": (float(well.minima[1, 0]), lambda x: x[0] < 0),
    }
    # One simulator per well, reused for every noise level (only σ changes).
    sims = {
        side: dynamics.Simulator(well, dynamics.isotropic_noise(1.0), escaped=esc)
        for side, (_, esc) in starts.items()
    }
    for noise_kind in ("isotropic", "curvature"):
        for side, (x_start, _) in starts.items():
            for ratio in d.escape_ratios:
                b = ratio * lr
                # Σ ∝ H at the well's minimum (Xie et al. 2021), with s·h_flat = σ²: s·H(x)₊
                # taken along the path would vanish near the barrier, where H < 0, and
                # trap every run.
                h = float(well.curvatures[0 if side == "sharp" else 1])
                var = SIGMA2 if noise_kind == "isotropic" else SIGMA2 * h / 2.0
                res = sims[side].run(
                    jnp.full((d.runs // 4, 1), x_start),
                    key=key,
                    learning_rate=lr,
                    num_steps=d.escape_steps,
                    noise_params=math.sqrt(var / b),
                )
                steps = res.escape_step
                frac = float((steps > 0).mean())
                med = float(np.median(np.where(steps > 0, steps, np.inf)) * lr)
                rows.append(
                    {
                        "noise": noise_kind,
                        "well": side,
                        "ratio": ratio,
                        "escaped": frac,
                        "median_time": med,
                    }
                )
    return rows


def nqm(config, key, log) -> dict:
    """(d) The noisy quadratic model: simulated mean loss against the closed form."""
    d = config.sgd_noise.sde
    log("[sde] measuring nqm")
    q = dynamics.noisy_quadratic(d.nqm_dim)
    lr, b, steps = 0.5, 4, 200
    sim = dynamics.Simulator(
        dynamics.quadratic(q.curvatures), dynamics.diagonal_noise(np.sqrt(q.noise / b))
    )
    res = sim.run(
        jnp.asarray(np.random.default_rng(0).standard_normal((d.runs, d.nqm_dim)), jnp.float32),
        key=key,
        learning_rate=lr,
        num_steps=steps,
        record_every=steps // 4,
    )
    sim_loss = 0.5 * ((res.mean**2 + res.var) * q.curvatures).sum(1)
    t = np.arange(1, 5) * (steps // 4)
    closed = q.loss(lr, b, t)
    return {
        "steps": t.tolist(),
        "simulated": sim_loss.tolist(),
        "closed_form": closed.tolist(),
        "runs": d.runs,
        "learning_rate": lr,
        "batch_size": b,
    }


def slopes(config, rows, noise) -> dict:
    """Measured (slope, SE) and exact slope of log τ against B/η per well (T = var/(2·B/η),
    var = σ² isotropic or σ²·h/2 for Σ ∝ H)."""
    d = config.sgd_noise.sde
    well = dynamics.double_well(d.escape_depth, d.escape_depth, 8.0, 2.0)
    out = {}
    for i, side in enumerate(("sharp", "flat")):
        pts = [r for r in rows if r["noise"] == noise and r["well"] == side
               and r["escaped"] > 0.5 and np.isfinite(r["median_time"])]  # fmt: skip
        var = SIGMA2 if noise == "isotropic" else SIGMA2 * float(well.curvatures[i]) / 2.0
        temps = [var / (2 * r) for r in d.escape_ratios]
        exact = dynamics.first_passage_slope(well, float(well.minima[i, 0]), d.escape_ratios, temps)
        if len(pts) >= 2:
            xs, times = [p["ratio"] for p in pts], [p["median_time"] for p in pts]
            counts = [p["escaped"] * d.runs // 4 for p in pts]
            measured = dynamics.escape_time_slope(xs, times, counts)
            out[side] = (*measured, exact)
    return out


def ratio(slopes) -> tuple[float, float, float]:
    """flat/sharp: measured slope ratio, its standard error (delta method), exact ratio."""
    (f, sf, ef), (s_, ss, es) = slopes["flat"], slopes["sharp"]
    r = f / s_
    return r, abs(r) * math.hypot(sf / f, ss / s_), ef / es
