r"""Keskar et al. (2017): the large-batch generalization gap and ε-sharpness.

    python -m experiments.keskar --config=configs/quickstart.py --workdir=runs/quickstart
    python -m experiments.keskar --config=configs/f1.py:fashion --workdir=runs/keskar_f1
    python -m experiments.keskar --config=configs/c2.py --workdir=runs/keskar_c2

For each regime (SB = batch 256, LB = 10% of the training set; plus the sweeps the config
asks for) and each seed: train with ADAM until the training loss stops improving (or
``num_epochs``), then measure ε-sharpness in the full space and in a random p-dimensional
subspace at each ε (`sharp_minima.sharpness`), on the training loss. Then the parametric plots
f(αx_LB + (1−α)x_SB), α ∈ [−1, 2] (train and test, loss and accuracy) and the curved path.

Writes into ``--workdir``: ``runs/<regime>/seed<k>/`` (one resumable training run each, with
``sharpness.json``), ``results.json``, ``report.md`` (Tables 2–4, 6, 7 with the paper's numbers
beside this run's), ``parametric_linear``/``parametric_curved``/``sharpness``/
``sharpness_vs_batch`` figures (PNG and PDF). Re-running the same command resumes.

The sharpness loss f: mean cross-entropy on the training set (``keskar.sharpness_examples``
examples, 0 = all), BatchNorm in evaluation mode (running statistics, not perturbed), dropout
off, no weight decay; only the weights ("params") are perturbed.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from experiments import cli

config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/<name>.py[:variants]).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Output folder (resumes when it holds results).")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first.")
FLAGS = flags.FLAGS

# Keskar et al. (2017): Table 2 test accuracy (%) SB/LB, Table 3 full-space sharpness at
# ε = 1e-3 SB/LB (as transcribed in DESIGN.md; other cells are left to the paper).
PAPER = {
    "f1": {"test_acc": (98.03, 97.81), "sharpness_full_0.001": (1.23, 205.14)},
    "f2": {"test_acc": (64.02, 59.45)},
    "c1": {"test_acc": (80.04, 77.26), "sharpness_full_0.001": (28.58, 707.23)},
    "c2": {"test_acc": (89.24, 87.26), "sharpness_full_0.001": (8.68, 925.32)},
    "c3": {"test_acc": (49.58, 46.45)},
    "c4": {"test_acc": (63.08, 57.81)},
}
PAPER_DATA = {
    "f1": "mnist",
    "f2": "timit",
    "c1": "cifar10",
    "c2": "cifar10",
    "c3": "cifar100",
    "c4": "cifar100",
}


# Changing any of these (or the sharpness code's VERSION) recomputes the cached sharpness.
SHARPNESS_SETTINGS = (
    "epsilons",
    "subspace_dim",
    "max_iter",
    "sharpness_examples",
    "sharpness_batch_size",
    "average_sigma",
    "average_samples",
)


# ----------------------------------------------------------------------------- the regimes


def regimes(config, num_train: int, num_devices: int = 1) -> list[dict]:
    """The (name, batch size, augmentation, proximal λ, seeds) of every run the study needs.

    LB is ``large_batch_fraction`` of the training set, rounded down to a multiple of the
    number of devices (the batch is split evenly over them).
    """
    k = config.keskar
    lb = int(round(k.large_batch_fraction * num_train))
    lb = max(num_devices, lb - lb % num_devices)
    out = [
        {
            "name": "sb",
            "batch_size": k.small_batch,
            "augment": False,
            "proximal": 0.0,
            "seeds": k.seeds,
        },
        {"name": "lb", "batch_size": lb, "augment": False, "proximal": 0.0, "seeds": k.seeds},
    ]
    if k.augment:
        for r in out[:2]:
            out.append({**r, "name": r["name"] + "_aug", "augment": True})
    if k.conservative:
        out.append(
            {
                "name": "lb_conservative",
                "batch_size": lb,
                "augment": False,
                "proximal": k.conservative,
                "seeds": k.seeds,
            }
        )
    for b in k.batch_sweep:
        if b not in (k.small_batch, lb):
            out.append(
                {
                    "name": f"batch{b}",
                    "batch_size": int(b),
                    "augment": False,
                    "proximal": 0.0,
                    "seeds": k.sweep_seeds,
                }
            )
    return out


def run_config(config, regime: dict, seed: int):
    """The training config of one (regime, seed) run; the data split stays the base seed's."""
    c = copy.deepcopy(config)
    c.unlock()
    if c.data.seed is None:
        c.data.seed = config.seed
    c.seed = config.seed + seed
    c.batch_size = regime["batch_size"]
    c.data.augment = regime["augment"]
    c.optim.proximal = regime["proximal"]
    c.optim.proximal_inner_steps = config.keskar.conservative_inner_steps
    c.lock()
    return c


# ----------------------------------------------------------------------------- measurements


@functools.lru_cache(maxsize=8)
def eval_loss_fn(model):
    """f(variables, batch): mean cross-entropy with BatchNorm in evaluation mode, no dropout.
    Cached per model so that the compiled sharpness code is reused across runs."""
    from sharp_minima import losses

    def loss(variables, batch):
        logits = model.apply(variables, batch["x"], train=False)
        return losses.cross_entropy(logits, batch["y"])

    return loss


def sharpness_batches(config, data):
    """The fixed training subset of f, as stacked batches (same for every run)."""
    from sharp_minima import data as data_lib

    k = config.keskar
    n = len(data.x_train)
    m = k.sharpness_examples or n
    bs = min(k.sharpness_batch_size, m)
    batches, weights = data_lib.curvature_batches(
        jax.random.key(config.seed + 12345),
        data.x_train,
        data.y_train,
        num_examples=m,
        batch_size=bs,
    )
    return batches, weights


def measure_sharpness(config, state, model, batches, weights, seed, log):
    """ε-sharpness (full space and subspace) at every ε, plus average sharpness if asked."""
    from sharp_minima import sharpness

    k = config.keskar
    loss = eval_loss_fn(model)
    variables = state.variables()
    out = {}
    key = jax.random.key(1000 + seed)
    for eps in k.epsilons:
        spaces = [("full", None)] + ([("subspace", k.subspace_dim)] if k.subspace_dim else [])
        for space, dim in spaces:
            t0 = time.time()
            r = sharpness.epsilon_sharpness(
                loss,
                variables,
                batches,
                epsilon=eps,
                key=jax.random.fold_in(key, 7),
                subspace_dim=dim,
                max_iter=k.max_iter,
                weights=weights,
                wrt="^params/",
            )
            out[f"sharpness_{space}_{eps:g}"] = r.value
            out[f"evals_{space}_{eps:g}"] = r.num_evals
            out["train_loss_f"] = r.loss
            log(
                f"    sharpness {space:8s} ε={eps:g}: {r.value:10.4f}  (f={r.loss:.4g}, max "
                f"f={r.max_loss:.4g}, {r.num_evals} evals, {time.time() - t0:.1f}s)"
            )
    if k.average_sigma:
        e = sharpness.average_sharpness(
            loss,
            variables,
            batches,
            sigma=k.average_sigma,
            key=jax.random.fold_in(key, 8),
            num_samples=k.average_samples,
            weights=weights,
            wrt="^params/",
        )
        out["average_sharpness"] = e.value
        out["average_sharpness_stderr"] = e.stderr
    return out


def train_and_measure(config, regime, seed, workdir, data, batches, weights, log):
    """One (regime, seed): train (resumable) and measure sharpness (cached in a JSON file)."""
    from sharp_minima import files, sharpness, train

    run_dir = os.path.join(workdir, "runs", regime["name"], f"seed{seed}")
    path = os.path.join(run_dir, "sharpness.json")
    c = run_config(config, regime, seed)
    log(f"== {regime['name']} (batch {regime['batch_size']}) seed {seed}")
    result = train.train(c, run_dir, data=data, log=log)
    settings = {k: config.keskar[k] for k in SHARPNESS_SETTINGS}
    settings["sharpness_version"] = sharpness.VERSION
    if os.path.exists(path):
        with open(path) as f:
            record = json.load(f)
        if record.get("step") == int(result.state.step) and record.get("settings") == json.loads(
            json.dumps(settings)
        ):
            return record, result
    final = result.final
    record = {
        "regime": regime["name"],
        "batch_size": regime["batch_size"],
        "seed": seed,
        "step": int(result.state.step),
        "epochs": final.get("epoch"),
        "train_accuracy": 100 * final["train/accuracy"],
        "test_accuracy": 100 * final["test/accuracy"],
        "train_loss": final["train/loss"],
        "test_loss": final["test/loss"],
        "settings": settings,
    }
    record.update(measure_sharpness(c, result.state, result.model, batches, weights, seed, log))
    files.write_json(path, record)
    return record, result


def _map_variances(fn, batch_stats):
    """Applies ``fn`` to the BatchNorm ``var`` leaves only."""
    from sharp_minima import tree_util

    def f(path, leaf):
        return fn(leaf) if tree_util.path_str(path).endswith("var") else leaf

    return jax.tree_util.tree_map_with_path(f, batch_stats)


def parametric(config, data, sb, lb, paths, log):
    """Train/test loss and accuracy along each path from x_SB (α=0) to x_LB (α=1)."""
    from sharp_minima import landscape, train

    k = config.keskar
    mesh = train.make_mesh(config.num_devices)
    ebs = max(mesh.size, config.eval_batch_size - config.eval_batch_size % mesh.size)
    step = train.make_eval_step(sb.model, mesh, ebs)
    m = min(k.interpolation_examples, len(data.x_train))
    ev = {
        "train": train.Evaluator(step, data.x_train[:m], data.y_train[:m], ebs, mesh),
        "test": train.Evaluator(step, data.x_test, data.y_test, ebs, mesh),
    }
    # BatchNorm running variances are interpolated in log space (geometrically): linear
    # extrapolation beyond [0, 1] would make them negative. Means and weights: linearly.
    log_var = functools.partial(_map_variances, jnp.log)
    a = {"params": sb.state.params, "batch_stats": log_var(sb.state.batch_stats)}
    b = {"params": lb.state.params, "batch_stats": log_var(lb.state.batch_stats)}

    def metrics(v):
        stats = _map_variances(jnp.exp, v["batch_stats"])
        s = sb.state.replace(params=v["params"], batch_stats=stats)
        out = {}
        for split, e in ev.items():
            r = e(s)
            out[f"{split}_loss"], out[f"{split}_accuracy"] = r["loss"], 100 * r["accuracy"]
        return out

    alphas = np.linspace(-1.0, 2.0, k.interpolation_points)
    curves = {}
    for path in paths:
        log(f"parametric plot ({path} path, {len(alphas)} points)")
        curve = landscape.interpolation_curve(metrics, a, b, alphas, path=path)
        curves[path] = {key: v.tolist() for key, v in curve.items()}
    return curves


# ------------------------------------------------------------------------------- reporting


def summarize(records: list[dict]) -> dict:
    """Mean and std (over seeds) of every numeric field, per regime."""
    by = {}
    for r in records:
        by.setdefault(r["regime"], []).append(r)
    out = {}
    for regime, rs in by.items():
        keys = [
            k
            for k, v in rs[0].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "seed"
        ]
        out[regime] = {
            k: [float(np.mean([r[k] for r in rs])), float(np.std([r[k] for r in rs])), len(rs)]
            for k in keys
        }
    return out


def _ms(s, key, regime, digits=2):
    if regime not in s or key not in s[regime]:
        return "—"
    mean, std, n = s[regime][key]
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def report_markdown(config, summary, num_train) -> str:
    paper = PAPER.get(config.model.name, {})
    p = lambda key, i: f"{paper[key][i]:.2f}" if key in paper else "—"  # noqa: E731
    k = config.keskar
    lines = [
        f"# Keskar et al. (2017) — {config.name}: {config.model.name} on {config.data.name}",
        "",
        f"SB = batch {k.small_batch}, LB = batch "
        f"{int(round(k.large_batch_fraction * num_train))} ({100 * k.large_batch_fraction:g}% "
        f"of {num_train} training examples); ADAM lr {config.optim.learning_rate:g}; mean ± std "
        f"over {k.seeds} seed(s). Sharpness: f = mean training cross-entropy on "
        f"{k.sharpness_examples or num_train} training examples, BatchNorm in evaluation mode "
        f"(running statistics, not perturbed), dropout off; {k.max_iter} L-BFGS-B iterations; "
        f"subspace A: random n×{k.subspace_dim} with N(0, 1) entries. Paper: their Tables 2–4 "
        "(cells not transcribed are —).",
        "",
    ]
    paper_data = PAPER_DATA.get(config.model.name)
    if paper and paper_data != config.data.name:
        lines += [
            f"Note: the paper's numbers are for {config.model.name} on {paper_data}; this run "
            f"uses {config.data.name}, so compare the SB/LB pattern, not the values.",
            "",
        ]
    lines += [
        "## Table 2 — accuracy (%)",
        "",
        "| | SB train | SB test | LB train | LB test | paper SB test | paper LB test |",
        "|---|---|---|---|---|---|---|",
        f"| {config.model.name} | {_ms(summary, 'train_accuracy', 'sb')} | "
        f"{_ms(summary, 'test_accuracy', 'sb')} | {_ms(summary, 'train_accuracy', 'lb')} | "
        f"{_ms(summary, 'test_accuracy', 'lb')} | {p('test_acc', 0)} | {p('test_acc', 1)} |",
        "",
    ]
    for space, title in (
        ("full", "Table 3 — sharpness, full space"),
        ("subspace", f"Table 4 — sharpness, random {k.subspace_dim}-d subspace"),
    ):
        if space == "subspace" and not k.subspace_dim:
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
                f"| {eps:g} | {_ms(summary, key, 'sb')} | {_ms(summary, key, 'lb')} | "
                f"{p(key, 0)} | {p(key, 1)} |"
            )
        lines.append("")
    if k.average_sigma:
        lines += [
            f"## Average sharpness E f(x + σz) − f(x), σ = {k.average_sigma:g}",
            "",
            "| SB | LB |",
            "|---|---|",
            f"| {_ms(summary, 'average_sharpness', 'sb', 4)} | "
            f"{_ms(summary, 'average_sharpness', 'lb', 4)} |",
            "",
        ]
    extra = [r for r in summary if r not in ("sb", "lb")]
    if extra:
        eps = k.epsilons[0]
        lines += [
            "## Sweeps (Table 6: _aug = data augmentation; Table 7: lb_conservative; "
            "batchN: Fig. 4)",
            "",
            f"| regime | train acc | test acc | sharpness full ε={eps:g} |",
            "|---|---|---|---|",
        ]
        for r in ["sb", "lb"] + extra:
            lines.append(
                f"| {r} | {_ms(summary, 'train_accuracy', r)} | {_ms(summary, 'test_accuracy', r)}"
                f" | {_ms(summary, f'sharpness_full_{eps:g}', r)} |"
            )
        lines.append("")
    sb_s = summary.get("sb", {}).get(f"sharpness_full_{k.epsilons[0]:g}", [np.nan])[0]
    lb_s = summary.get("lb", {}).get(f"sharpness_full_{k.epsilons[0]:g}", [np.nan])[0]
    sb_t = summary.get("sb", {}).get("test_accuracy", [np.nan])[0]
    lb_t = summary.get("lb", {}).get("test_accuracy", [np.nan])[0]
    lines += [
        "## The paper's claims on this run",
        "",
        f"- LB sharper than SB (full space, ε={k.epsilons[0]:g}): {lb_s:.3g} vs {sb_s:.3g} → "
        f"**{'yes' if lb_s > sb_s else 'no'}** (ratio {lb_s / sb_s if sb_s else float('nan'):.3g})",
        f"- SB test accuracy ≥ LB: {sb_t:.2f}% vs {lb_t:.2f}% → "
        f"**{'yes' if sb_t >= lb_t else 'no'}**",
        "",
        "Figures: parametric_linear, parametric_curved, sharpness (and sharpness_vs_batch), "
        "PNG and PDF.",
    ]
    return "\n".join(lines) + "\n"


def figures(config, workdir, summary, records, curves):
    from sharp_minima import plotting

    for path, curve in curves.items():
        plotting.save(
            plotting.parametric_figure(
                curve, title=f"{config.name}: {path} path x_SB (α=0) → x_LB (α=1)"
            ),
            workdir,
            f"parametric_{path}",
        )
    plotting.save(plotting.sharpness_figure(summary, config.keskar.epsilons), workdir, "sharpness")
    sweep = sorted(
        (
            (r["batch_size"], r)
            for r in records
            if not r["regime"].endswith(("_aug", "_conservative"))
        ),
        key=lambda t: t[0],
    )
    if len({b for b, _ in sweep}) > 2:
        eps = config.keskar.epsilons[0]
        plotting.save(
            plotting.batch_sweep_figure(
                [b for b, _ in sweep],
                [r[f"sharpness_full_{eps:g}"] for _, r in sweep],
                [r["test_accuracy"] for _, r in sweep],
                eps,
            ),
            workdir,
            "sharpness_vs_batch",
        )


def run_study(config, workdir: str, *, data=None, log=print) -> dict:
    """The whole study into ``workdir`` (resumable); returns the results dict."""
    from sharp_minima import files, train

    train.validate_config(config)
    if data is None:
        data = train.load_data(config)
    num_train = len(data.x_train)
    plan = regimes(config, num_train, train.make_mesh(config.num_devices).size)
    for r in plan:
        if r["batch_size"] > num_train:
            raise train.ConfigError(
                f"regime {r['name']}: batch {r['batch_size']} exceeds the "
                f"{num_train} training examples"
            )
    total = sum(r["seeds"] for r in plan)
    log(
        f"Keskar study '{config.name}': {total} runs ("
        + ", ".join(f"{r['name']}: batch {r['batch_size']} x {r['seeds']} seeds" for r in plan)
        + f") on {data.name} ({data.source}), {jax.device_count()} device(s)"
    )
    batches, weights = sharpness_batches(config, data)
    records, results = [], {}
    done = 0
    t0 = time.time()
    for r in plan:
        for seed in range(r["seeds"]):
            record, result = train_and_measure(
                config, r, seed, workdir, data, batches, weights, log
            )
            records.append(record)
            results[(r["name"], seed)] = result
            done += 1
            elapsed = time.time() - t0
            log(
                f"-- {done}/{total} runs done, {elapsed:.0f}s elapsed, ETA "
                f"{elapsed / done * (total - done):.0f}s"
            )
    summary = summarize(records)
    paths = ["linear"] + (["curved"] if config.keskar.curved_path else [])
    curves = parametric(config, data, results[("sb", 0)], results[("lb", 0)], paths, log)
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
        "summary": summary,
        "parametric": curves,
        "paper": PAPER.get(config.model.name, {}),
    }
    files.write_json(os.path.join(workdir, "results.json"), out)
    files.write_atomic(
        os.path.join(workdir, "report.md"), report_markdown(config, summary, num_train)
    )
    figures(config, workdir, summary, records, curves)
    log(f"wrote {workdir}/report.md, results.json and figures")
    return out


def main(argv):
    config = cli.setup(argv, FLAGS.config, FLAGS.workdir, FLAGS.multihost)
    if "keskar" not in config:
        cli.usage_error(
            f"config {config.name!r} has no 'keskar' section; use configs/f1.py, "
            "f2, c1-c4 or quickstart"
        )

    def log(line):
        if jax.process_index() == 0:
            print(line, flush=True)

    with cli.user_errors_exit_2():
        run_study(config, FLAGS.workdir, log=log)
    print(open(os.path.join(FLAGS.workdir, "report.md")).read())


if __name__ == "__main__":
    cli.run(main)
