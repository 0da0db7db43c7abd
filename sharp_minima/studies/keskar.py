r"""Keskar et al. (2017): the large-batch generalization gap and ε-sharpness.

For each regime (SB = batch 256, LB = 10% of the training set; plus the sweeps the config asks
for) and each seed: train with ADAM until the training loss stops improving (or
``num_epochs``), then measure ε-sharpness in the full space and in a random p-dimensional
subspace at each ε (`sharp_minima.sharpness`), on the training loss. Then the parametric plots
f(αx_LB + (1−α)x_SB), α ∈ [−1, 2] (train and test, loss and accuracy) and the curved path.

`run` writes into ``workdir``: ``runs/<regime>/seed<k>/`` (one resumable training run each,
with ``sharpness.json``), ``results.json``, ``report.md`` (Tables 2–4, 6, 7 with the paper's
numbers beside this run's), ``parametric_linear``/``parametric_curved``/``sharpness``/
``sharpness_vs_batch`` figures (PNG and PDF). Calling it again resumes.

The sharpness loss f (`sharp_minima.losses.evaluation_loss`): mean cross-entropy on the
training set (``keskar.sharpness_examples`` examples, 0 = all), BatchNorm in evaluation mode
(running statistics, not perturbed), dropout off, no weight decay; only the weights
("params") are perturbed. One `sharp_minima.sharpness.SharpnessMeter` serves every run.

From a notebook::

    from configs import quickstart
    from sharp_minima.studies import keskar
    results = keskar.run(quickstart.get_config(), "/tmp/keskar")
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from sharp_minima import data as data_lib
from sharp_minima import landscape, losses, plotting, sharpness, train
from sharp_minima.studies import claims as claims_lib
from sharp_minima.studies import runs
from sharp_minima.studies.claims import Claim, accuracy_noise, seed_noise
from sharp_minima.studies.common import key_streams, mean_std
from sharp_minima.studies.sections import Section, Study, contract_functions

# Keskar et al. (2017), mean and std over 5 seeds, as (SB, LB) pairs of (mean, std): Table 2
# (accuracy %), Table 3 (full space) and Table 4 (random 100-d subspace) at ε = 1e-3 and 5e-4;
# Table 6 (C1–C4 with data augmentation: baseline SB and augmented LB test accuracy, augmented
# LB sharpness); Table 7 (conservative training: baseline SB and conservative LB test accuracy,
# conservative LB sharpness). ``None``: a cell the source extract does not hold legibly.
PAPER = {
    "f1": {
        "train_acc": ((99.66, 0.05), (99.92, 0.01)),
        "test_acc": ((98.03, 0.07), (97.81, 0.07)),
        "sharpness_full_0.001": ((1.23, 0.83), (205.14, 69.52)),
        "sharpness_full_0.0005": ((0.61, 0.27), (42.90, 17.14)),
        "sharpness_subspace_0.001": ((0.11, 0.00), (9.22, 0.56)),
        "sharpness_subspace_0.0005": ((0.05, 0.00), (9.17, 0.14)),
        "conservative": {
            "test_acc": ((98.03, 0.07), (98.12, 0.01)),
            "sharpness_full_0.001": (232.25, 63.81),
            "sharpness_full_0.0005": (46.02, 12.58),
        },
    },
    "f2": {
        "train_acc": ((99.99, 0.03), (98.35, 2.08)),
        "test_acc": ((64.02, 0.2), (59.45, 1.05)),
        "sharpness_full_0.001": ((1.39, 0.02), (310.64, 38.46)),
        "sharpness_full_0.0005": ((0.90, 0.05), (93.15, 6.81)),
        "sharpness_subspace_0.001": ((0.29, 0.02), (23.63, 0.54)),
        "sharpness_subspace_0.0005": ((0.05, 0.00), (6.28, 0.19)),
        "conservative": {
            "test_acc": ((64.02, 0.2), (61.94, 1.10)),
            "sharpness_full_0.001": (928.40, 51.63),
            "sharpness_full_0.0005": (190.77, 25.33),
        },
    },
    "c1": {
        "train_acc": ((99.89, 0.02), (99.66, 0.2)),
        "test_acc": ((80.04, 0.12), (77.26, 0.42)),
        "sharpness_full_0.001": ((28.58, 3.13), (707.23, 43.04)),
        "sharpness_full_0.0005": ((7.08, 0.88), (227.31, 23.23)),
        "sharpness_subspace_0.001": ((2.18, 0.23), (137.25, 21.60)),
        "sharpness_subspace_0.0005": ((0.71, 0.15), (29.50, 7.48)),
        "augment": {
            "test_acc": ((83.63, 0.14), (82.50, 0.67)),
            "sharpness_full_0.001": (231.77, 30.50),
            "sharpness_full_0.0005": None,
        },
        "conservative": {
            "test_acc": ((80.04, 0.12), (78.41, 0.22)),
            "sharpness_full_0.001": (520.34, 34.91),
            "sharpness_full_0.0005": (171.19, 15.13),
        },
    },
    "c2": {
        "train_acc": ((99.99, 0.04), (99.99, 0.01)),
        "test_acc": ((89.24, 0.12), (87.26, 0.07)),
        "sharpness_full_0.001": ((8.68, 1.32), (925.32, 38.29)),
        "sharpness_full_0.0005": ((2.07, 0.86), (175.31, 18.28)),
        "sharpness_subspace_0.001": ((0.95, 0.34), (25.09, 2.61)),
        "sharpness_subspace_0.0005": ((0.31, 0.08), (5.82, 0.52)),
        "augment": {
            "test_acc": ((89.82, 0.12), (90.26, 1.15)),
            "sharpness_full_0.001": (468.65, 47.86),
            "sharpness_full_0.0005": None,
        },
        "conservative": {
            "test_acc": ((89.24, 0.05), (88.495, 0.63)),
            "sharpness_full_0.001": (632.01, 208.01),
            "sharpness_full_0.0005": (108.88, 47.36),
        },
    },
    "c3": {
        "train_acc": ((99.56, 0.44), (99.88, 0.30)),
        "test_acc": ((49.58, 0.39), (46.45, 0.43)),
        "sharpness_full_0.001": ((29.85, 5.98), (258.75, 8.96)),
        "sharpness_full_0.0005": ((8.56, 0.99), (105.11, 13.22)),
        "sharpness_subspace_0.001": ((17.02, 2.20), (236.03, 31.26)),
        "sharpness_subspace_0.0005": ((4.03, 1.45), (86.96, 27.39)),
        "augment": {
            "test_acc": ((54.55, 0.44), (53.03, 0.33)),
            "sharpness_full_0.001": (103.68, 11.93),
            "sharpness_full_0.0005": None,
        },
        "conservative": {
            "test_acc": ((49.58, 0.39), (45.98, 0.54)),
            "sharpness_full_0.001": (337.92, 33.09),
            "sharpness_full_0.0005": (110.69, 3.88),
        },
    },
    "c4": {
        "train_acc": ((99.10, 1.23), (99.57, 1.84)),
        "test_acc": ((63.08, 0.5), (57.81, 0.17)),
        "sharpness_full_0.001": ((12.83, 3.84), (421.84, 36.97)),
        "sharpness_full_0.0005": ((4.07, 0.87), (109.35, 16.57)),
        "sharpness_subspace_0.001": ((6.05, 1.13), (72.99, 10.96)),
        "sharpness_subspace_0.0005": ((1.89, 0.33), (19.85, 4.12)),
        "augment": {
            "test_acc": ((63.05, 0.5), (65.88, 0.13)),
            "sharpness_full_0.001": None,
            "sharpness_full_0.0005": None,
        },
        "conservative": {
            "test_acc": ((63.08, 0.10), (62.51, 0.67)),
            "sharpness_full_0.001": (354.94, 20.23),
            "sharpness_full_0.0005": (68.76, 16.29),
        },
    },
}
PAPER_DATA = {
    "f1": "mnist",
    "f2": "timit",
    "c1": "cifar10",
    "c2": "cifar10",
    "c3": "cifar100",
    "c4": "cifar100",
}

# The settings every sharpness number of a run depends on: changing one (or the sharpness code's
# VERSION) recomputes the run's measurements. ε, the subspace and the average-sharpness settings
# key each measurement on its own, so adding an ε or a seed measures only what is new.
SHARPNESS_BASIS = ("max_iter", "sharpness_examples", "sharpness_batch_size")


# ----------------------------------------------------------------------------- the regimes


def regimes(config, num_train: int, num_devices: int = 1) -> list[dict]:
    """The (name, batch size, augmentation, proximal λ, seeds) of every run the study needs.

    LB is ``large_batch_fraction`` of the training set, rounded down to a multiple of the
    number of devices (the batch is split evenly over them).
    """
    k = config.keskar
    lb = int(round(k.large_batch_fraction * num_train))
    lb = max(num_devices, lb - lb % num_devices)

    def regime(name, batch_size, *, augment=False, proximal=0.0, seeds=k.seeds):
        return {
            "name": name,
            "batch_size": int(batch_size),
            "augment": augment,
            "proximal": proximal,
            "seeds": seeds,
        }

    out = [regime("sb", k.small_batch), regime("lb", lb)]
    if k.augment:
        out += [regime(r["name"] + "_aug", r["batch_size"], augment=True) for r in out[:2]]
    if k.conservative:
        out.append(regime("lb_conservative", lb, proximal=k.conservative))
    out += [
        regime(f"batch{b}", b, seeds=k.sweep_seeds)
        for b in k.batch_sweep
        if b not in (k.small_batch, lb)
    ]
    return out


def run_config(config, regime: dict, seed: int):
    """The training config of one (regime, seed) run; the data split stays the base seed's."""
    return runs.derive(
        config,
        {
            "data.seed": config.seed if config.data.seed is None else config.data.seed,
            "data.augment": regime["augment"],
            "optim.proximal": regime["proximal"],
            "optim.proximal_inner_steps": config.keskar.conservative_inner_steps,
        },
        seed=config.seed + seed,
        batch_size=regime["batch_size"],
    )


# ----------------------------------------------------------------------------- measurements


def sharpness_batches(config, data, key):
    """The fixed training subset of f, as stacked batches (the same for every run)."""
    k = config.keskar
    m = k.sharpness_examples or len(data.x_train)
    return data_lib.curvature_batches(
        key,
        data.x_train,
        data.y_train,
        num_examples=m,
        batch_size=min(k.sharpness_batch_size, m),
    )


def measurement_plan(config) -> list[dict]:
    """The measurements a run needs, each with everything its value depends on (its cache
    key): ε-sharpness in the full space and the subspace at every ε, average sharpness."""
    k = config.keskar
    basis = {name: k[name] for name in SHARPNESS_BASIS}
    basis["sharpness_version"] = sharpness.VERSION
    plan = []
    for eps in k.epsilons:
        for space, dim in [("full", None)] + (
            [("subspace", k.subspace_dim)] if k.subspace_dim else []
        ):
            plan.append({"name": f"sharpness_{space}_{eps:g}", "epsilon": eps, "subspace_dim": dim})
    if k.average_sigma:
        plan.append(
            {"name": "average_sharpness", "sigma": k.average_sigma, "samples": k.average_samples}
        )
    return [json.loads(json.dumps({**m, **basis})) for m in plan]


def measure(config, meter, spec, variables, batches, weights, key, log) -> dict:
    """One measurement of `measurement_plan` at ``variables``."""
    k_eps, k_avg = jax.random.split(key)
    t0 = time.time()
    if spec["name"] == "average_sharpness":
        e = meter.average_sharpness(
            variables,
            batches,
            sigma=spec["sigma"],
            key=k_avg,
            num_samples=spec["samples"],
            weights=weights,
        )
        return {"value": e.value, "stderr": e.stderr}
    r = meter.epsilon_sharpness(
        variables,
        batches,
        epsilon=spec["epsilon"],
        key=k_eps,
        subspace_dim=spec["subspace_dim"],
        max_iter=config.keskar.max_iter,
        weights=weights,
    )
    space = "full" if spec["subspace_dim"] is None else "subspace"
    log(
        f"    sharpness {space:8s} ε={spec['epsilon']:g}: {r.value:10.4f}  (f={r.loss:.4g}, max "
        f"f={r.max_loss:.4g}, {r.num_evals} evals, {time.time() - t0:.1f}s)"
    )
    return {"value": r.value, "evals": r.num_evals, "loss": r.loss}


def _flatten(measurements: dict) -> dict:
    """The cached measurements as the flat fields of a run record (the report's keys)."""
    out = {}
    for name, m in measurements.items():
        out[name] = m["value"]
        if name == "average_sharpness":
            out["average_sharpness_stderr"] = m["stderr"]
        else:
            out[name.replace("sharpness_", "evals_")] = m["evals"]
            out["train_loss_f"] = m["loss"]
    return out


def train_and_measure(config, regime, seed, workdir, data, model, measurement, log):
    """One (regime, seed): train (resumable), then measure sharpness.

    ``sharpness.json`` (a `runs.Cache`) keeps each measurement as soon as it is done, keyed by
    the training step and by everything the value depends on (`measurement_plan`): an
    interrupted run keeps what it measured, and a study extended with a new ε or seed
    measures only what is new. ``measurement = (meter, batches, weights, key)``: the shared
    `SharpnessMeter`, the subset of f and the sharpness key stream (folded with the seed, so
    SB and LB of one seed share A). Returns ``(record, result)``; a run that diverged gives
    a record with ``"diverged": True`` and its message, and no result.
    """
    meter, batches, weights, key = measurement
    folder = runs.run_dir(workdir, regime["name"], f"seed{seed}")
    c = run_config(config, regime, seed)
    label = f"[{regime['name']} seed {seed}] "
    log(f"== {regime['name']} (batch {regime['batch_size']}) seed {seed}")
    result = runs.train_run(train.setup(c, data=data, model=model), folder, log=log, label=label)
    head = {"regime": regime["name"], "batch_size": regime["batch_size"], "seed": seed}
    if isinstance(result, runs.Diverged):
        return {**head, "diverged": True, "message": result.message}, None
    final = result.final
    record = {
        **head,
        "step": int(result.state.step),
        "epochs": final.get("epoch"),
        "train_accuracy": 100 * final["train/accuracy"],
        "test_accuracy": 100 * final["test/accuracy"],
        "train_loss": final["train/loss"],
        "test_loss": final["test/loss"],
    }
    cache = runs.Cache(os.path.join(folder, "sharpness.json"))
    key = jax.random.fold_in(key, seed)
    variables = result.state.variables()
    done = {}
    for spec in measurement_plan(config):
        done[spec["name"]] = cache.get(
            spec["name"],
            {**spec, "step": record["step"]},
            lambda spec=spec: measure(c, meter, spec, variables, batches, weights, key, log),
        )
    record.update(_flatten(done))
    return record, result


def parametric(config, workdir, data, sb, lb, paths, log) -> dict:
    """Train/test loss and accuracy along each path from x_SB (α=0) to x_LB (α=1), each
    path cached (`runs.Cache`) under the two runs' steps and the plot's settings.

    BatchNorm running variances are interpolated geometrically (`landscape.interpolate`'s
    ``geometric``): linear extrapolation beyond [0, 1] would make them negative. Means and
    weights: linearly.
    """
    k = config.keskar
    mesh = train.make_mesh(config.num_devices)
    ebs = max(mesh.size, config.eval_batch_size - config.eval_batch_size % mesh.size)
    step = train.make_eval_step(sb.model, mesh, ebs)
    m = min(k.interpolation_examples, len(data.x_train))
    ev = {
        "train": train.Evaluator(step, data.x_train[:m], data.y_train[:m], ebs, mesh),
        "test": train.Evaluator(step, data.x_test, data.y_test, ebs, mesh),
    }

    def metrics(v):
        s = sb.state.replace(params=v["params"], batch_stats=v.get("batch_stats", {}))
        out = {}
        for split, e in ev.items():
            r = e(s)
            out[f"{split}_loss"], out[f"{split}_accuracy"] = r["loss"], 100 * r["accuracy"]
        return out

    a, b = sb.state.variables(), lb.state.variables()
    alphas = np.linspace(-1.0, 2.0, k.interpolation_points)
    cache = runs.Cache(runs.run_dir(workdir, "parametric.json"))
    key = {
        "sb_step": int(sb.state.step),
        "lb_step": int(lb.state.step),
        "points": k.interpolation_points,
        "examples": m,
    }

    def curve(path):
        log(f"parametric plot ({path} path, {len(alphas)} points)")
        out = landscape.interpolation_curve(
            metrics, a, b, alphas, path=path, geometric=landscape.BATCHNORM_VARIANCES
        )
        return {name: v.tolist() for name, v in out.items()}

    return {path: cache.get(path, key, lambda path=path: curve(path)) for path in paths}


# ------------------------------------------------------------------------------- reporting


def _paper_cell(value) -> str:
    if value is None:
        return "n/a¹"
    mean, std = value
    return f"{mean:.2f} ± {std:.2f}"


SHARPER = Claim(
    statement="LB sharper than SB (ε-sharpness φ, full space, first ε)",
    source="Keskar et al. 2017, Sec. 4 and Tables 3–4",
    quantity="φ(LB) − φ(SB), predicted > 0",
    noise=claims_lib.SEEDS,
    min_seeds=3,
)
GENERALIZES = Claim(
    statement="SB generalizes better than LB (higher test accuracy)",
    source="Keskar et al. 2017, Sec. 2 and Table 2",
    quantity="test accuracy SB − LB, predicted > 0",
    noise=claims_lib.SEEDS,
    min_seeds=3,
)


def _paper_span(key: str, how: str) -> str:
    """The paper's LB/SB ratios (``how="ratio"``) or SB − LB gaps (``"gap"``) of ``key``
    over the six networks, as ``"min–max"`` ("n/a" when the paper has no such column)."""
    pairs = [v[key] for v in PAPER.values() if v.get(key) and None not in v[key]]
    if not pairs:
        return "n/a"
    vals = [lb[0] / sb[0] if how == "ratio" else sb[0] - lb[0] for sb, lb in pairs]
    return f"{min(vals):.3g}–{max(vals):.3g}"


def section_claims(config, results: dict) -> list:
    """The paper's two claims on this run (`SHARPER`, `GENERALIZES`): each holds only beyond
    2 units of the standard error over seeds (t-quantile; ≥ 3 seeds), the test-set sampling
    error added for accuracies."""
    summary = results["summary"]
    eps0 = f"{config.keskar.epsilons[0]:g}"
    stat = lambda r, key: summary.get(r, {}).get(key)  # noqa: E731
    mean = lambda st: st["mean"] if isinstance(st, dict) else float("nan")  # noqa: E731
    seeds = lambda key: min(  # noqa: E731
        (stat(r, key) or {}).get("n", 0) if isinstance(stat(r, key), dict) else 0
        for r in ("sb", "lb")
    )

    def missing(key):
        gone = [r.upper() for r in ("sb", "lb") if not isinstance(stat(r, key), dict)]
        return f" ({' and '.join(gone)}: no run finished — see the diverged runs)" if gone else ""

    key = f"sharpness_full_{eps0}"
    sb_s, lb_s = stat("sb", key), stat("lb", key)
    noise_s = claims_lib.combined(seed_noise(sb_s), seed_noise(lb_s))
    ratio = mean(lb_s) / mean(sb_s) if mean(sb_s) else float("nan")
    sb_t, lb_t = stat("sb", "test_accuracy"), stat("lb", "test_accuracy")
    num_test = results["data"].get("num_test", 0)
    noise_t = claims_lib.combined(seed_noise(sb_t), seed_noise(lb_t))
    if num_test:  # accuracies are in % here
        noise_t = claims_lib.combined(
            noise_t, *(100 * accuracy_noise(mean(t) / 100, num_test) for t in (sb_t, lb_t))
        )
    return [
        SHARPER.test(
            mean(lb_s) - mean(sb_s),
            noise_s,
            f"{mean(lb_s):.3g} vs {mean(sb_s):.3g} (ratio {ratio:.3g}; noise unit "
            f"{noise_s:.2g}; paper, F1–C4: LB/SB {_paper_span(key, 'ratio')})" + missing(key),
            seeds=seeds(key),
        ),
        GENERALIZES.test(
            mean(sb_t) - mean(lb_t),
            noise_t,
            f"{mean(sb_t):.2f}% vs {mean(lb_t):.2f}% (noise unit {noise_t:.2g} points; paper, "
            f"F1–C4: SB − LB {_paper_span('test_acc', 'gap')} points)" + missing("test_accuracy"),
            seeds=seeds("test_accuracy"),
        ),
    ]


def header(config, results: dict) -> list[str]:
    """The scale of this run and how f is measured (and a note when the data set is not
    the paper's)."""
    num_train, net, k = results["data"]["num_train"], config.model.name, config.keskar
    lines = [
        f"SB = batch {k.small_batch}, LB = batch "
        f"{int(round(k.large_batch_fraction * num_train))} ({100 * k.large_batch_fraction:g}% "
        f"of {num_train} training examples); ADAM lr {config.optim.learning_rate:g}; mean ± std "
        f"over {train.plural(k.seeds, 'seed')}. Sharpness: f = mean training cross-entropy on "
        f"{k.sharpness_examples or num_train} training examples, BatchNorm in evaluation mode "
        f"(running statistics, not perturbed), dropout off; {k.max_iter} L-BFGS-B iterations; "
        f"subspace A: random n×{k.subspace_dim} with N(0, 1) entries. Paper: mean ± std over "
        "5 seeds (— : no paper number for this network).",
    ]
    paper_data = PAPER_DATA.get(net)
    if PAPER.get(net) and paper_data != config.data.name:
        lines += [
            "",
            f"Note: the paper's numbers are for {net} on {paper_data}; this run uses "
            f"{config.data.name}, so compare the SB/LB pattern, not the values.",
        ]
    return lines


def report(config, results: dict) -> list[str]:
    """This run's Tables 2–4, 6, 7 beside the paper's (every cell of the paper for F1–C4),
    the sweeps and the average sharpness."""
    summary = results["summary"]
    paper = PAPER.get(config.model.name, {})
    pp = lambda key, i: _paper_cell(paper[key][i]) if key in paper else "—"  # noqa: E731
    ms = lambda key, regime: mean_std(summary, key, regime)  # noqa: E731
    k = config.keskar
    lines = [
        "## Table 2 — accuracy (%)",
        "",
        "| | train | test | paper train | paper test |",
        "|---|---|---|---|---|",
    ]
    for i, r in enumerate(("sb", "lb")):
        lines.append(
            f"| {r.upper()} | {ms('train_accuracy', r)} | {ms('test_accuracy', r)} | "
            f"{pp('train_acc', i)} | {pp('test_acc', i)} |"
        )
    lines.append("")
    for space, title in (
        ("full", "Table 3 — sharpness, full space"),
        ("subspace", f"Table 4 — sharpness, random {k.subspace_dim or 100}-d subspace"),
    ):
        if space == "subspace" and not k.subspace_dim:
            lines += [f"## {title}", "", "Not measured (keskar.subspace_dim = 0).", ""]
            continue
        lines += [
            f"## {title}",
            "",
            "| ε | SB | LB | paper SB | paper LB |",
            "|---|---|---|---|---|",
        ]
        for eps in k.epsilons:
            key = f"sharpness_{space}_{eps:g}"
            lines.append(
                f"| {eps:g} | {ms(key, 'sb')} | {ms(key, 'lb')} | {pp(key, 0)} | {pp(key, 1)} |"
            )
        lines.append("")
    lines += _sweep_tables(config, summary, paper)
    if k.average_sigma:
        lines += [
            f"## Average sharpness E f(x + σz) − f(x), σ = {k.average_sigma:g}",
            "",
            "| SB | LB |",
            "|---|---|",
            f"| {mean_std(summary, 'average_sharpness', 'sb', 4)} | "
            f"{mean_std(summary, 'average_sharpness', 'lb', 4)} |",
            "",
        ]
    if any(isinstance(v, dict) and None in v.values() for v in paper.values()):
        lines += [
            "¹ not legible in the text extract of the paper this project works from "
            "(`papers/000_…`: Table 6's ε = 5·10⁻⁴ column and C4's ε = 10⁻³ cell).",
        ]
    return lines


def _sweep_tables(config, summary, paper) -> list[str]:
    """Tables 6 (augmentation) and 7 (conservative training): the paper's cells always (for
    F1–C4), this run's where the sweep ran; then any batch-size sweep."""
    k = config.keskar
    eps = [f"{e:g}" for e in k.epsilons]
    lines = []
    for name, regime, flag, title in (
        ("augment", "lb_aug", "keskar.augment=True", "Table 6 — data augmentation"),
        ("conservative", "lb_conservative", "keskar.conservative=λ", "Table 7 — conservative"),
    ):
        if name not in paper and regime not in summary:
            continue
        p = paper.get(name, {})
        ran = regime in summary
        lines += [
            f"## {title} training (LB method)" if name == "conservative" else f"## {title}",
            "",
            "Test accuracy of the baseline SB and of the LB method, and the LB method's "
            "sharpness (full space)." + ("" if ran else f" Not run here (set {flag})."),
            "",
            "| | SB test | LB-method test | "
            + " | ".join(f"LB-method φ ε={e}" for e in eps)
            + " |",
            "|---|---|---|" + "---|" * len(eps),
        ]
        if ran:
            lines.append(
                f"| this run | {mean_std(summary, 'test_accuracy', 'sb')} | "
                f"{mean_std(summary, 'test_accuracy', regime)} | "
                + " | ".join(mean_std(summary, f"sharpness_full_{e}", regime) for e in eps)
                + " |"
            )
        if p:
            acc = p["test_acc"]
            lines.append(
                f"| paper | {_paper_cell(acc[0])} | {_paper_cell(acc[1])} | "
                + " | ".join(
                    _paper_cell(p[f"sharpness_full_{e}"]) if f"sharpness_full_{e}" in p else "—"
                    for e in eps
                )
                + " |"
            )
        lines.append("")
    extra = [r for r in summary if r.startswith("batch")]
    if extra:
        lines += [
            f"## Batch-size sweep (Fig. 4), sharpness full space ε={eps[0]}",
            "",
            f"| regime | batch | train acc | test acc | sharpness ε={eps[0]} |",
            "|---|---|---|---|---|",
        ]
        for r in ["sb", "lb"] + extra:
            lines.append(
                f"| {r} | {summary[r]['batch_size']['mean']:.0f} | "
                f"{mean_std(summary, 'train_accuracy', r)} | "
                f"{mean_std(summary, 'test_accuracy', r)} | "
                f"{mean_std(summary, f'sharpness_full_{eps[0]}', r)} |"
            )
        lines.append("")
    return lines


def section_figures(config, results: dict) -> dict:
    """``parametric_linear`` / ``parametric_curved`` (Figs. 3, 10), ``sharpness`` (SB vs
    LB) and, with a batch-size sweep, ``sharpness_vs_batch`` (Fig. 4)."""
    out = {}
    for path, curve in results["parametric"].items():
        out[f"parametric_{path}"] = plotting.parametric_figure(
            curve, title=f"{config.name}: {path} path x_SB (α=0) → x_LB (α=1)"
        )
    out["sharpness"] = sharpness_figure(results["summary"])
    eps = config.keskar.epsilons[0]
    sweep = sorted(
        (
            (r["batch_size"], r)
            for r in results["runs"]
            if not r["regime"].endswith(("_aug", "_conservative"))
            and f"sharpness_full_{eps:g}" in r
        ),
        key=lambda t: t[0],
    )
    if len({b for b, _ in sweep}) > 2:
        out["sharpness_vs_batch"] = batch_sweep_figure(
            [b for b, _ in sweep],
            [r[f"sharpness_full_{eps:g}"] for _, r in sweep],
            [r["test_accuracy"] for _, r in sweep],
            eps,
        )
    return out


def sharpness_figure(summary):
    """Bar chart of mean ± std sharpness per regime, one group per (space, ε); log scale."""
    keys = [k for k in next(iter(summary.values())) if k.startswith("sharpness_")]
    keys = [k for k in keys if k.count("_") == 2]  # sharpness_<space>_<eps>
    keys = sorted(keys, key=lambda k: (k.split("_")[1], -float(k.split("_")[2])))
    regimes = list(summary)
    fig = plotting.figure((1.6 + 1.3 * len(keys), 3.6))
    ax = fig.add_subplot()
    width = 0.8 / max(len(regimes), 1)
    for i, r in enumerate(regimes):
        means = [summary[r][k]["mean"] if k in summary[r] else np.nan for k in keys]
        stds = [summary[r][k]["std"] if k in summary[r] else 0.0 for k in keys]
        ax.bar(np.arange(len(keys)) + i * width, means, width, yerr=stds, label=r, capsize=2)
    ax.set_xticks(np.arange(len(keys)) + width * (len(regimes) - 1) / 2)
    ax.set_xticklabels([k.replace("sharpness_", "").replace("_", "\nε=") for k in keys], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ε-sharpness φ")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars
    ax.set_title("Keskar ε-sharpness (mean ± std over seeds)", fontsize=10)
    return fig


def batch_sweep_figure(batch_sizes, sharpness, test_accuracy, epsilon):
    """Keskar et al.'s Fig. 4: sharpness and test accuracy against batch size."""
    fig = plotting.figure((5.6, 3.6))
    ax = fig.add_subplot()
    ax.semilogx(batch_sizes, sharpness, "bo-")
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"sharpness (ε={epsilon:g})", color="b")
    ax2 = ax.twinx()
    ax2.semilogx(batch_sizes, test_accuracy, "rs--")
    ax2.set_ylabel("test accuracy (%)", color="r")
    return fig


# ------------------------------------------------------------------------------------ run


def validate(config, num_train: int | None = None, num_devices: int = 1) -> None:
    """Checks the ``keskar`` section (and the regimes' batch sizes when ``num_train`` is
    known) before any work.

    Raises:
      train.ConfigError: naming the field.
    """
    if "keskar" not in config:
        raise train.ConfigError(
            f"config {config.name!r} has no 'keskar' section; use configs/f1.py, f2, c1-c4 or "
            "quickstart"
        )
    train.validate_config(config)
    k = config.keskar

    def need(cond, msg):
        if not cond:
            raise train.ConfigError(f"config.keskar.{msg}")

    for name in (
        "seeds",
        "sweep_seeds",
        "small_batch",
        "max_iter",
        "sharpness_batch_size",
        "interpolation_examples",
        "conservative_inner_steps",
    ):
        train.check_numbers(config, f"keskar.{name}", low=1, integer=True)
    num = train.check_numbers
    num(config, "keskar.epsilons", low=0, low_open=True)
    num(config, "keskar.large_batch_fraction", low=0, low_open=True, high=1)
    for name in ("subspace_dim", "sharpness_examples"):
        num(config, f"keskar.{name}", low=0, integer=True)
    num(config, "keskar.interpolation_points", low=2, integer=True)
    num(config, "keskar.average_sigma", low=0)
    num(config, "keskar.conservative", low=0)
    num(config, "keskar.batch_sweep", low=1, integer=True, nonempty=False)
    need(not k.average_sigma or k.average_samples >= 2, "average_samples must be >= 2")
    need(
        not k.augment or config.data.name in ("cifar10", "cifar100", "svhn"),
        f"augment (random crop + flip) is for image data sets, not {config.data.name!r}",
    )
    if num_train is not None:
        for r in regimes(config, num_train, num_devices):
            if r["batch_size"] > num_train:
                raise train.ConfigError(
                    f"regime {r['name']}: batch {r['batch_size']} exceeds the "
                    f"{num_train} training examples"
                )


def section_run(ctx) -> dict:
    """Trains and measures every (regime, seed), then the parametric plots."""
    config, workdir, data, log = ctx.config, ctx.workdir, ctx.data, ctx.log
    num_train = len(data.x_train)
    num_devices = train.make_mesh(config.num_devices).size
    validate(config, num_train, num_devices)
    plan = regimes(config, num_train, num_devices)
    total = sum(r["seeds"] for r in plan)
    log(
        f"Keskar study '{config.name}': {train.plural(total, 'run')} ("
        + ", ".join(
            f"{r['name']}: batch {r['batch_size']} x {train.plural(r['seeds'], 'seed')}"
            for r in plan
        )
        + f") on {data.name} ({data.source}), {train.plural(jax.device_count(), 'device')}"
    )
    keys = key_streams(config.seed, "keskar/sharpness_subset", "keskar/sharpness")
    batches, weights = sharpness_batches(config, data, keys["keskar/sharpness_subset"])
    # One model, one loss and one meter for every run: their compiled code is reused.
    model = train.build_model(config, data)
    meter = sharpness.SharpnessMeter(losses.evaluation_loss(model), wrt="^params/")
    measurement = (meter, batches, weights, keys["keskar/sharpness"])
    records, results = [], {}
    t0 = time.time()
    for r in plan:
        for seed in range(r["seeds"]):
            record, result = train_and_measure(
                config, r, seed, workdir, data, model, measurement, log
            )
            records.append(record)
            results[(r["name"], seed)] = result
            elapsed = time.time() - t0
            log(
                f"-- {len(records)}/{train.plural(total, 'run')} done, {elapsed:.0f}s elapsed, ETA "
                f"{elapsed / len(records) * (total - len(records)):.0f}s"
            )
    paths = ["linear"] + (["curved"] if config.keskar.curved_path else [])
    sb, lb = results[("sb", 0)], results[("lb", 0)]
    curves = parametric(config, workdir, data, sb, lb, paths, log) if sb and lb else {}
    out = {
        "config": json.loads(config.to_json_best_effort()),
        "data": {
            "name": data.name,
            "source": data.source,
            "num_train": num_train,
            "num_test": len(data.x_test),
        },
        "sharpness_loss": "mean cross-entropy, BatchNorm eval mode, dropout off, weights only",
        "runs": records,
        "summary": runs.aggregate(records, "regime"),
        "parametric": curves,
        "paper": PAPER.get(config.model.name, {}),
    }
    return out


STUDY = Study(
    name="keskar",
    title=lambda c: f"Keskar et al. (2017) — {c.name}: {c.model.name} on {c.data.name}",
    sections=(
        Section(
            name="keskar",
            title="SB against LB",
            run=section_run,
            report=report,
            claims=section_claims,
            figures=section_figures,
        ),
    ),
    validate=validate,
    header=header,
)


run, claims, figures, report_markdown = contract_functions(
    STUDY,
    __name__,
    run="""The whole study into ``workdir`` (resumable); returns the results dict.""",
    claims="""The paper's two claims on this run: LB sharper than SB (full space, first ε), and SB
    generalizing better than LB; each holds only by more than the standard error over seeds
    (plus, for accuracies, the test set's sampling error).""",
    figures="""``parametric_linear`` / ``parametric_curved`` (Figs. 3, 10), ``sharpness`` (SB vs
    LB) and, with a batch-size sweep, ``sharpness_vs_batch`` (Fig. 4) — Figures, nothing
    saved.""",
    report_markdown="""``report.md``: the scale, the claims, this run's Tables 2–4, 6, 7
    beside the paper's
    (every cell of the paper for F1–C4) and the sweeps.""",
)
