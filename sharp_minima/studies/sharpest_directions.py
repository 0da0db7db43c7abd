"""Jastrzębski et al. (2019), Sec. 3: the sharpest directions along the SGD trajectory.

``run(config, workdir)`` trains, in ``workdir/runs/<name>/`` (each resumable), with a
`sharp_minima.tracking.EigenTracker` hook (top ``k`` eigenvalues, often early in training and
once per epoch later):

- **evolution** (Figs. 2, 4, 13): SGD for each η of ``learning_rates``, each batch size S of
  ``batch_sizes`` and each momentum of ``momenta`` (the others at the base values);
- **probe** (Figs. 5, 6), on the run with η = ``probe_learning_rate``: at every measurement,
  10 mini-batch gradients g against the top eigenvectors — the mean |cos(g, e_i)| over the
  top 5 against random directions, E[L(θ − αη g̃₁) − L(θ)] for α in ``alphas`` (g̃₁ = ⟨g,
  e₁⟩e₁), and L(θ + k e₁ η E|g̃₁|) for k in [−5, 5];
- **full batch** (Fig. 3): gradient descent on the first ``gd_examples`` training examples
  for each η of ``gd_learning_rates``, its Hessian on those examples, drawn with 2/η (the
  edge of stability of Cohen et al. 2021);
- **variants** (Fig. 7): from the base run's parameters after ``variants_from_epoch`` epochs,
  SGD, "SGD top" (only the gradient along e₁), "SGD constant top" (along e₁ at the restart)
  and "SGD no top" (the gradient minus its e₁ part), e₁ recomputed every
  ``variants_every_steps`` steps;
- **schedule** (Fig. 12): η for L epochs, then η/10, for L in ``schedule_first_epochs``.

Then ``report.md`` (the scale, a verdict per claim of the paper, the paper's numbers
beside ours), ``results.json`` and figures (PNG + PDF) in ``workdir``. The curvature loss is
the training objective's data term plus the same L2 term, with BatchNorm in evaluation mode
(running statistics) and the training augmentation when training uses it; the report
states it.
"""

from __future__ import annotations

import dataclasses
import os
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sharp_minima import gradients, optim, plotting, tracking, train
from sharp_minima import tree_util as tu
from sharp_minima.data import pipeline
from sharp_minima.studies import claims as claims_lib
from sharp_minima.studies import runs
from sharp_minima.studies.claims import NOT_TESTED, Claim, all_of, ordered, verdict
from sharp_minima.studies.common import key_streams
from sharp_minima.studies.sections import Section, Study, contract_functions

# The paper's numbers (Sec. 3.2, Figs. 4-7): what each report puts beside ours.
PAPER = {
    "alpha_sweep": {
        "simplecnn": {2.0: "+2.1%", 4.0: "+11.1%", 0.25: "≈ −2%", 0.5: "≈ −2%"},
        "resnet32": {2.0: "+3%", 4.0: "+13.1%", 0.25: "≈ −0.5%", 0.5: "≈ −0.5%"},
    },
    "max_cosine": "0.2–0.4 (maximum over training of the mean \\|cos\\| with the top 5)",
    "nsgd_k20_lambda_max": "≈ 8·10³ (NSGD K = 20) vs ≈ 150 (SGD), ResNet-32",
}


# ----------------------------------------------------------------------------- validation


def validate(config) -> None:
    """Raises `train.ConfigError` for a config without a sensible ``sharpest`` section."""
    if "sharpest" not in config:
        raise train.ConfigError(f"config {config.name!r} has no 'sharpest' section")
    train.validate_config(config)
    for path, kw in (
        ("sharpest.curvature.k", dict(low=1, high=50, integer=True)),
        ("sharpest.curvature.fraction", dict(low=0, low_open=True, high=1)),
        ("sharpest.curvature.num_examples", dict(low=0, integer=True)),
        ("sharpest.curvature.batch_size", dict(low=1, integer=True)),
        ("sharpest.curvature.every_steps", dict(low=0, integer=True)),
        ("sharpest.curvature.until_step", dict(low=0, integer=True)),
        ("sharpest.curvature.stochastic", dict(low=0, integer=True)),
        ("sharpest.curvature.tol", dict(low=0, low_open=True, high=1, high_open=True)),
        ("sharpest.learning_rates", dict(low=0, low_open=True)),
        ("sharpest.batch_sizes", dict(low=1, integer=True)),
        ("sharpest.momenta", dict(low=0, high=1, high_open=True, nonempty=False)),
        ("sharpest.probe_learning_rate", dict(low=0, low_open=True)),
        ("sharpest.num_grads", dict(low=1, integer=True)),
        ("sharpest.alphas", dict(low=0, low_open=True)),
        ("sharpest.line_points", dict(low=2, integer=True)),
        ("sharpest.early_epochs", dict(low=1, integer=True)),
        ("sharpest.gd_examples", dict(low=1, integer=True)),
        ("sharpest.gd_learning_rates", dict(low=0, low_open=True, nonempty=False)),
        ("sharpest.gd_steps", dict(low=1, integer=True)),
        ("sharpest.gd_every_steps", dict(low=1, integer=True)),
        ("sharpest.variants_from_epoch", dict(low=1, integer=True)),
        ("sharpest.variants_epochs", dict(low=0, integer=True)),
        ("sharpest.variants_every_steps", dict(low=1, integer=True)),
        (
            "sharpest.schedule_first_epochs",
            dict(low=1, high=config.num_epochs, high_open=True, integer=True, nonempty=False),
        ),
        ("sharpest.seeds", dict(low=1, integer=True)),
        ("sharpest.claims.peak_growth", dict(low=1)),
        ("sharpest.claims.late_plateau", dict(low=0, low_open=True)),
        ("sharpest.claims.edge_band", dict(low=0, low_open=True)),
        ("sharpest.claims.alignment_ratio", dict(low=1)),
        ("sharpest.claims.similar_loss", dict(low=0, low_open=True)),
    ):
        train.check_numbers(config, path, **kw)
    if config.optim.name != "sgd":
        raise train.ConfigError("the study trains with plain SGD: config.optim.name='sgd'")
    if config.sharpest.seeds != 1:
        raise train.ConfigError(
            f"config.sharpest.seeds={config.sharpest.seeds}: every run trains one seed for now "
            "(config.seed), so the claims that need 3 seeds read 'not tested'"
        )


# ------------------------------------------------------------------------------- the runs


@dataclasses.dataclass
class RunSpec:
    """One training run of the study."""

    name: str
    group: str  # evolution, full_batch, variants, schedule
    config: ml_collections.ConfigDict
    probe: bool = False
    variant: str = ""  # sgd, top, constant_top, no_top


def run_name(lr: float, batch_size: int, momentum: float) -> str:
    return f"lr{lr:g}_bs{batch_size}_mom{momentum:g}"


def plan(config) -> list[RunSpec]:
    """Every run of the study, in the order they are trained."""
    s = config.sharpest
    lr0, bs0 = config.optim.learning_rate, config.batch_size
    combos = [(lr, bs0, 0.0) for lr in s.learning_rates]
    combos += [(lr0, bs, 0.0) for bs in s.batch_sizes]
    combos += [(lr0, bs0, mom) for mom in s.momenta]
    if (s.probe_learning_rate, bs0, 0.0) not in combos:
        combos.append((s.probe_learning_rate, bs0, 0.0))
    specs, seen = [], set()
    for lr, bs, mom in combos:
        name = run_name(lr, bs, mom)
        if name in seen:
            continue
        seen.add(name)
        changes = {"optim.learning_rate": lr, "batch_size": bs}
        if mom:
            changes.update({"optim.name": "momentum", "optim.momentum": mom})
        specs.append(
            RunSpec(
                name,
                "evolution",
                runs.derive(config, changes),
                lr == s.probe_learning_rate and bs == bs0 and not mom,
            )
        )
    for lr in s.gd_learning_rates:
        cfg = runs.derive(
            config,
            {"optim.learning_rate": lr, "data.max_train": s.gd_examples, "data.augment": False},
            batch_size=s.gd_examples,
            num_epochs=s.gd_steps,
            eval_every_epochs=s.gd_every_steps,
            eval_train_examples=0,
            log_every_steps=s.gd_every_steps,
        )
        specs.append(RunSpec(f"gd_lr{lr:g}", "full_batch", cfg))
    if s.variants_epochs:
        start = runs.derive(config, num_epochs=s.variants_from_epoch)
        specs.append(RunSpec("variants/start", "variants", start, variant="start"))
        for v in ("sgd", "top", "constant_top", "no_top"):
            cfg = runs.derive(config, num_epochs=s.variants_epochs, eval_every_epochs=1)
            specs.append(RunSpec(f"variants/{v}", "variants", cfg, variant=v))
    for first in s.schedule_first_epochs:
        cfg = runs.derive(
            config,
            {
                "schedule.name": "step",
                "schedule.boundaries_epochs": (first,),
                "schedule.decay_factor": 0.1,
            },
        )
        specs.append(RunSpec(f"schedule_L{first}", "schedule", cfg))
    return specs


class StepProbe:
    """The SGD step against the sharpest directions (Figs. 5 and 6), as a trainer hook run
    right after the tracker's (it reads ``tracker.vectors``).

    At each call, a `sharp_minima.gradients.DirectionProbe` on ``num_grads`` mini-batches
    (batch ``batch_size``) of the curvature loss: their mean |cos| with the top 5
    eigenvectors and with random directions, ΔL(α) (L on the curvature subset) and the loss
    along e₁ on a grid of k in [−5, 5]; logged as ``probe/...`` and saved under
    ``arrays/probe/``.
    """

    def __init__(
        self,
        tracker,
        data,
        *,
        batch_size,
        learning_rate,
        key,
        num_grads,
        alphas,
        line_points,
        top=5,
    ):
        self.tracker, self.batch_size, self.lr = tracker, batch_size, learning_rate
        self.examples = {"x": jnp.asarray(data.x_train), "y": jnp.asarray(data.y_train)}
        self.key, self.num_grads = key, num_grads
        self.alphas = np.asarray(alphas, np.float32)
        self.ks = np.asarray(jnp.linspace(-5.0, 5.0, line_points))
        self.probe = gradients.DirectionProbe(
            tracker.curvature.loss_fn, wrt=tracker.curvature.wrt, top=top
        )

    def __call__(self, ctx):
        tr = self.tracker
        if not tr.history or tr.history[-1][0] != ctx.step:
            return None
        key = jax.random.fold_in(self.key, ctx.step)
        k_idx, k_rand = jax.random.split(key)
        n = len(self.examples["y"])
        grad_idx = pipeline.random_minibatches(k_idx, n, self.batch_size, self.num_grads)
        subset, weights = tr.subset(ctx.step)
        out = self.probe(
            ctx.state.variables(),
            tr.vectors,
            self.examples,
            grad_idx,
            subset,
            weights,
            step_size=self.lr,
            alphas=self.alphas,
            ks=self.ks,
            key=k_rand,
        )
        out = jax.tree.map(np.asarray, out)
        ctx.save_arrays(
            "probe",
            ks=self.ks,
            alphas=self.alphas,
            cos_top=out["cos_top"],
            cos_random=out["cos_random"],
            loss=out["loss"],
            delta=out["delta"],
            step_e1=out["step_e1"],
            along_e1=out["along"],
        )
        metrics = {
            "probe/cos_top5": float(out["cos_top"]),
            "probe/cos_random": float(out["cos_random"]),
            "probe/loss": float(out["loss"]),
            "probe/step_e1": float(out["step_e1"]),
        }
        for a, d in zip(self.alphas, out["delta"]):
            metrics[f"probe/delta_alpha{a:g}"] = float(d)
        return metrics


def _train_run(spec, config, workdir, data, model, log, keys, base_variables=None):
    """Trains one run (resuming if it was interrupted); returns the `train.TrainResult` and
    the run's tracker."""
    cfg = spec.config
    s = config.sharpest
    t = s.curvature
    run_data = data
    if spec.group == "full_batch":
        run_data = dataclasses.replace(
            data, x_train=data.x_train[: s.gd_examples], y_train=data.y_train[: s.gd_examples]
        )
    key = jax.random.fold_in(keys["sharpest/curvature"], zlib.crc32(spec.name.encode()))
    subset_key = keys["sharpest/subset"]
    tracker_for = lambda **kw: tracking.make_tracker(  # noqa: E731
        cfg, t, run_data, model, subset_key, key, **kw
    )
    hooks, tx, init = [], None, None
    if spec.group == "full_batch":
        tracker = tracker_for(k=t.k, full=True)
        hooks.append(
            train.Hook(tracker, every_steps=s.gd_every_steps, at_start=True, name=tracker.name)
        )
    elif spec.group == "variants" and spec.variant != "start":
        init = base_variables
        # e₁ at the restart point, cached: a resumed (or finished) variant needs no Lanczos.
        cache = runs.Cache(os.path.join(runs.run_dir(workdir, spec.name), "restart.json"))
        key_e1 = {"from_epoch": s.variants_from_epoch, "tol": t.tol, "subset": t.to_dict()}
        e1 = _top_direction(tracker_for(k=1), base_variables, cache, key_e1)
        if spec.variant == "sgd":
            tx = optax.sgd(cfg.optim.learning_rate)
        elif spec.variant == "constant_top":
            tx = optax.chain(optim.project_onto(e1), optax.sgd(cfg.optim.learning_rate))
        else:
            proj = optim.project_onto if spec.variant == "top" else optim.project_out
            tx = optax.chain(proj(e1), optax.sgd(cfg.optim.learning_rate))
        refresh = spec.variant in ("top", "no_top")
        tracker = tracker_for(
            k=max(1, min(t.k, 5)),
            set_directions=(lambda v: jax.tree.map(lambda a: a[:1], v["params"]))
            if refresh
            else False,
        )
        hooks.append(
            train.Hook(
                tracker, every_steps=s.variants_every_steps, at_start=True, name=tracker.name
            )
        )
    else:
        tracker = tracker_for(k=t.k)
        # Often early in training, once per epoch later, and at step 0; the probe follows.
        schedule = dict(
            every_steps=t.every_steps or None,
            until_step=t.until_step,
            every_epochs=1,
            at_start=True,
        )
        hooks.append(train.Hook(tracker, name=tracker.name, **schedule))
        if spec.probe:
            probe = StepProbe(
                tracker,
                run_data,
                batch_size=cfg.batch_size,
                learning_rate=cfg.optim.learning_rate,
                key=jax.random.fold_in(keys["sharpest/probe"], 0),
                num_grads=s.num_grads,
                alphas=s.alphas,
                line_points=s.line_points,
            )
            hooks.append(train.Hook(probe, name="probe", **schedule))
    result = runs.train_run(
        train.setup(cfg, data=run_data, model=model),
        runs.run_dir(workdir, spec.name),
        tx=tx,
        hooks=hooks,
        log=log,
        label=f"[{spec.name}] ",
        init_variables=init,
    )
    return result, tracker


def _top_direction(tracker, variables, cache, key):
    """e₁ at ``variables`` (the restart point of the variants), params-shaped, leading axis 1,
    kept in ``cache`` under ``key``."""
    unravel = tu.ravel(variables["params"])[1]

    def compute():
        tracker.measure(variables, 0)
        return {"e1": tu.ravel(jax.tree.map(lambda a: a[0], tracker.vectors["params"]))[0]}

    flat = cache.arrays("e1", key, compute)["e1"]
    return jax.tree.map(lambda a: a[None], unravel(jnp.asarray(flat)))


# ------------------------------------------------------------------------------ analysis


LAMBDA = "hessian/lambda_"  # the tracked eigenvalues λ_1..λ_k in a run's metrics


def summarize_run(records: list[dict], steps_per_epoch: int) -> dict:
    """Peak and final λ_max, their steps, the first measurement and the accuracies."""
    steps, values = runs.series(records, LAMBDA)
    evals = [r for r in records if "test/accuracy" in r]
    out = {"steps_per_epoch": steps_per_epoch}
    if len(steps):
        lam = values[:, 0]
        i = int(np.argmax(lam))
        out.update(
            lambda_first=float(lam[0]),
            lambda_peak=float(lam[i]),
            peak_step=int(steps[i]),
            lambda_final=float(lam[-1]),
            last_step=int(steps[-1]),
            lambda_last_quarter=float(np.median(lam[len(lam) * 3 // 4 :])),
            lambda_median=float(np.median(lam)),
        )
    if evals:
        out.update(
            train_loss=evals[-1].get("train/loss"),
            train_accuracy=evals[-1].get("train/accuracy"),
            test_accuracy=evals[-1].get("test/accuracy"),
        )
    return out


def curves(records: list[dict]) -> dict:
    """What the figures draw of one run: λ_1..λ_k, ‖H‖_F from the top k, the mini-batch
    training loss (by step), and the evaluations' training / test accuracy."""
    evals = [r for r in records if "test/accuracy" in r]
    steps, values = runs.series(records, LAMBDA)
    out = {"lambda": {"steps": steps.tolist(), "values": values.tolist()}}
    fro = f"hessian/frobenius_top{values.shape[1]}" if values.size else None
    if fro:
        f_steps, f_values = runs.series(records, fro)
        out["frobenius"] = {"steps": f_steps.tolist(), "values": f_values.tolist()}
    batch = [r for r in records if "minibatch/loss" in r]
    out["train_loss"] = {
        "steps": [r["step"] for r in batch],
        "values": [r["minibatch/loss"] for r in batch],
    }
    out["train_accuracy"] = {
        "steps": [r["step"] for r in evals],
        "values": [r["train/accuracy"] for r in evals],
    }
    out["test_accuracy"] = {
        "epochs": [r["epoch"] for r in evals],
        "values": [r["test/accuracy"] for r in evals],
    }
    return out


def _lambda(curve) -> tuple[np.ndarray, np.ndarray]:
    steps = np.asarray(curve["lambda"]["steps"], int)
    return steps, np.asarray(curve["lambda"]["values"], float).reshape(len(steps), -1)


def _rel(d, loss):
    return 100.0 * d / loss if loss else float("nan")


J19 = "Jastrzębski et al. 2019"
GROWS = Claim(
    statement="λ_max grows early in training, then peaks or stabilises",
    source=f"{J19}, Sec. 3.1, Fig. 2",
    quantity="peak λ_max − growth × first λ_max (> 0); a late peak: drift of the last "
    "quarter below plateau × peak",
    noise=claims_lib.SOLVER,
    threshold="sharpest.claims.peak_growth",
    origin="Fig. 2: the top eigenvalue rises several-fold in the first epochs",
    min_seeds=3,
)
LOWER_PEAK_LR = Claim(
    statement="the λ_max peak is lower for a larger η (S fixed)",
    source=f"{J19}, Sec. 3.1, Fig. 4",
    quantity="successive peaks, predicted decreasing in η",
    noise=claims_lib.SOLVER,
    min_seeds=3,
)
LOWER_PEAK_S = Claim(
    statement="the λ_max peak is lower for a smaller S (η fixed)",
    source=f"{J19}, Sec. 3.1, Fig. 4",
    quantity="successive peaks, predicted increasing in S",
    noise=claims_lib.SOLVER,
    min_seeds=3,
)
LOWER_PEAK_MOMENTUM = Claim(
    statement="the λ_max peak is lower with more momentum",
    source=f"{J19}, Sec. 3.1 and App. Fig. 13",
    quantity="successive peaks, predicted decreasing in μ",
    noise=claims_lib.SOLVER,
    min_seeds=3,
)
EDGE = Claim(
    statement="full-batch GD: λ_max climbs to 2/η and hovers at or just above it (the edge of "
    "stability; Jastrzębski et al. show the climb and the instability, Figs. 3 and 9)",
    source="Cohen et al. 2021, Sec. 3; Jastrzębski et al. 2019, Figs. 3, 9",
    quantity="peak ≥ low × 2/η and last-quarter median ≤ high × 2/η",
    noise=claims_lib.SOLVER,
    threshold="sharpest.claims.edge_band",
    origin="Cohen et al. 2021: λ_max hovers at, or just above, 2/η",
)
STEP_TOO_LONG = Claim(
    statement="early in training a step αη g̃₁ along e₁ raises the loss for α > 1 and lowers "
    "it for α < 1",
    source=f"{J19}, Sec. 3.2, Fig. 6",
    quantity="relative loss change, predicted > 0 for α > 1 and < 0 for α < 1",
    noise=claims_lib.BLOCK_BOOTSTRAP,
)
ALIGNED = Claim(
    statement="the mini-batch gradient is far better aligned with the top 5 eigenvectors "
    "than with random directions",
    source=f"{J19}, Sec. 3.2, Fig. 5",
    quantity="mean |cos| with the top 5 − ratio × mean |cos| with random directions",
    noise=claims_lib.BLOCK_BOOTSTRAP,
    threshold="sharpest.claims.alignment_ratio",
    origin="Fig. 5: top-5 cosines an order of magnitude above the random line",
)
TOP_FLATTER = Claim(
    statement='"SGD top" ends flatter (lower λ_max) with a higher loss than SGD',
    source=f"{J19}, Sec. 3.3, Fig. 7",
    quantity="λ_max(SGD) − λ_max(top) and loss(top) − loss(SGD), both predicted > 0",
    noise=claims_lib.SOLVER,
    min_seeds=3,
)
NO_TOP_SHARPER = Claim(
    statement='"SGD no top" ends sharper (higher λ_max) at a similar loss',
    source=f"{J19}, Sec. 3.3, Fig. 7",
    quantity="λ_max(no top) − λ_max(SGD) > 0 and |loss gap| within similar_loss × SGD's loss",
    noise=claims_lib.SOLVER,
    threshold="sharpest.claims.similar_loss",
    origin="Fig. 7: the no-top curve's loss tracks SGD's",
    min_seeds=3,
)


def section_claims(config, results: dict) -> list:
    """A `Finding` for each declared claim of Sec. 3 this study tests (`GROWS` …
    `NO_TOP_SHARPER`). Eigenvalues differ only beyond 2 units of the eigensolver's
    tolerance (``curvature.tol`` × λ each); the probe's means beyond 2 units of a block
    bootstrap over the probed steps (they are autocorrelated). Claims about single runs need
    ≥ 3 seeds; the study trains one (``sharpest.seeds``), so they read *not tested*. A claim
    whose runs diverged (or are missing) reads "not tested".
    """
    c = _Evidence(config, results)
    return (
        _evolution_claims(c)
        + _order_claims(c)
        + _full_batch_claims(c)
        + _probe_claims(c)
        + _variant_claims(c)
    )


class _Evidence:
    """The runs' summaries and the comparisons every claim of Sec. 3 makes."""

    def __init__(self, config, results):
        self.config, self.results, self.s = config, results, config.sharpest
        self.summaries = results["runs"]
        self.tol = self.s.curvature.tol
        self.lr0, self.bs0 = config.optim.learning_rate, config.batch_size
        self.seeds = 1  # every run trains once (config.seed)
        self.t = self.s.claims

    def get(self, lr, bs, mom) -> dict:
        return self.summaries.get(run_name(lr, bs, mom), {})

    @staticmethod
    def val(v, key) -> float:
        x = v.get(key)
        return float("nan") if x is None else float(x)

    def missing(self, names) -> str:
        gone = [n for n in names if "lambda_peak" not in self.summaries.get(n, {})]
        return f"; not tested: {', '.join(gone)} diverged or did not run" if gone else ""

    def at_least(self, x, bound) -> str:
        """x ≥ bound, beyond 2 units of the solver's tolerance on both."""
        return verdict(x - bound, self.tol * (abs(x) + abs(bound)))


def _evolution_claims(c) -> list:
    evo = [(n, v) for n, v in c.summaries.items() if n.startswith("lr")]
    if not evo:
        return []
    parts = []
    for _, v in evo:
        if "lambda_peak" not in v:
            parts.append(None)
            continue
        parts.append(c.at_least(v["lambda_peak"], c.t.peak_growth * v["lambda_first"]))
        if v["peak_step"] >= 0.75 * v["last_step"]:  # a late peak must be a plateau
            drift = abs(v["lambda_last_quarter"] - v["lambda_peak"])
            parts.append(c.at_least(c.t.late_plateau * v["lambda_peak"], drift))
    nums = "; ".join(
        f"{n}: {v['lambda_first']:.3g} → peak {v['lambda_peak']:.3g} at step "
        f"{v['peak_step']} → {v['lambda_final']:.3g} at {v['last_step']}"
        for n, v in evo
        if "lambda_peak" in v
    )
    nums += f" (growth ≥ {c.t.peak_growth:g}×; paper, Fig. 2: several-fold in the first epochs)"
    return [GROWS.given(all_of(parts), nums + c.missing([n for n, _ in evo]), seeds=c.seeds)]


def _order_claims(c) -> list:
    out = []

    def ordered_claim(claim, labels, names, decreasing, extra=""):
        if len(names) < 2:
            return
        values = [c.val(c.summaries.get(n, {}), "lambda_peak") for n in names]
        v = ordered(values, [c.tol * abs(x) for x in values], decreasing=decreasing)
        out.append(
            claim.given(
                v,
                ", ".join(f"{k}: {x:.4g}" for k, x in zip(labels, values) if np.isfinite(x))
                + f" (solver tolerance ±{c.tol:g}×λ){extra}"
                + c.missing(names),
                seeds=c.seeds,
            )
        )

    s, lr0, bs0 = c.s, c.lr0, c.bs0
    lrs = sorted(s.learning_rates)
    ordered_claim(
        LOWER_PEAK_LR,
        [f"η={lr:g}" for lr in lrs],
        [run_name(lr, bs0, 0.0) for lr in lrs],
        decreasing=True,
    )
    bss = sorted(s.batch_sizes)
    ordered_claim(
        LOWER_PEAK_S,
        [f"S={b}" for b in bss],
        [run_name(lr0, b, 0.0) for b in bss],
        decreasing=False,
    )
    moms = sorted({0.0, *s.momenta})
    # Not part of the verdict: the median over the run, for the reader of a "no".
    med = ", ".join(f"μ={m:g}: {c.val(c.get(lr0, bs0, m), 'lambda_median'):.3g}" for m in moms)
    ordered_claim(
        LOWER_PEAK_MOMENTUM,
        [f"μ={m:g}" for m in moms],
        [run_name(lr0, bs0, m) for m in moms],
        decreasing=True,
        extra=f" (median λ_max over the run: {med})",
    )
    return out


def _full_batch_claims(c) -> list:
    out = []
    low, high = c.t.edge_band
    for lr in c.s.gd_learning_rates:
        name = f"gd_lr{lr:g}"
        v = c.summaries.get(name, {})
        edge = 2.0 / lr
        if "lambda_peak" not in v:
            out.append(EDGE.untested(f"η={lr:g}: " + c.missing([name]).lstrip("; ")))
            continue
        parts = [
            c.at_least(v["lambda_peak"], low * edge),
            c.at_least(high * edge, v["lambda_last_quarter"]),
        ]
        out.append(
            EDGE.given(
                all_of(parts),
                f"η={lr:g}, 2/η = {edge:.3g} (band {low:g}–{high:g}× 2/η): first "
                f"{v['lambda_first']:.3g}, peak {v['lambda_peak']:.3g} (step {v['peak_step']}), "
                f"median of the last quarter {v['lambda_last_quarter']:.3g}",
            )
        )
    return out


def _mean_se(xs, block: int = 1) -> tuple[float, float]:
    """The mean of a series and its standard error by a block bootstrap (blocks of
    ``block`` consecutive values: probed steps are autocorrelated)."""
    xs = np.asarray(xs, np.float64)
    se = claims_lib.block_bootstrap_se(xs, block) if len(xs) > 1 else float("nan")
    return float(xs.mean()), float(se)


def _probe_claims(c) -> list:
    s = c.s
    probed = c.summaries.get(run_name(s.probe_learning_rate, c.bs0, 0.0), {})
    probe = c.results.get("probe", {}).get("records", [])
    if not (probe and "steps_per_epoch" in probed):
        return []
    spe = probed["steps_per_epoch"]
    early = [r for r in probe if r["step"] <= s.early_epochs * spe] or probe
    # Blocks of about √n probed steps (the usual moving-block rule of thumb).
    block = lambda xs: max(1, int(round(np.sqrt(len(xs)))))  # noqa: E731
    rel = {}
    for a in s.alphas:
        xs = [_rel(r[f"probe/delta_alpha{a:g}"], r["probe/loss"]) for r in early]
        rel[a] = _mean_se(xs, block(xs))
    parts = [verdict(m, se) for a, (m, se) in rel.items() if a > 1]
    parts += [verdict(-m, se) for a, (m, se) in rel.items() if a < 1]
    cos, cos_se = _mean_se([r["probe/cos_top5"] for r in probe], block(probe))
    rnd, rnd_se = _mean_se([r["probe/cos_random"] for r in probe], block(probe))
    ratio = c.t.alignment_ratio
    return [
        STEP_TOO_LONG.given(
            all_of(parts),
            f"first {train.plural(s.early_epochs, 'epoch')}, η={s.probe_learning_rate:g}: "
            + ", ".join(f"α={a:g}: {m:+.2f}% ± {se:.2f}" for a, (m, se) in rel.items())
            + f" (mean ± block-bootstrap error over {len(early)} probed steps; paper, Fig. 6: "
            "the loss rises for α > 1 early in training)",
        ),
        ALIGNED.test(
            cos - ratio * rnd,
            claims_lib.combined(cos_se, ratio * rnd_se),
            f"mean |cos| with top 5: {cos:.3f} ± {cos_se:.3f} (max "
            f"{max(r['probe/cos_top5'] for r in probe):.3f}); random: {rnd:.4f} ± "
            f"{rnd_se:.4f}; threshold {ratio:g}× random (paper, Fig. 5: ≈ 0.1–0.3 vs ≈ 0.01)",
        ),
    ]


def _variant_claims(c) -> list:
    names = {v: f"variants/{v}" for v in ("sgd", "top", "constant_top", "no_top")}
    if not (any(n in c.summaries for n in names.values()) or c.s.variants_epochs):
        return []
    var = {v: c.summaries.get(n, {}) for v, n in names.items()}
    ready = all("lambda_final" in v and v.get("train_loss") is not None for v in var.values())
    gone = c.missing([n for v, n in names.items() if "lambda_final" not in var[v]])
    base, top, no_top = var["sgd"], var["top"], var["no_top"]
    nums = (
        "; ".join(
            f"{n}: λ_max {v['lambda_final']:.3g}, train loss {v['train_loss']:.4f}"
            for n, v in var.items()
        )
        if ready
        else gone.lstrip("; ")
    )
    flatter = sharper = NOT_TESTED  # unless every variant finished
    if ready:
        loss_gap = lambda v: v["train_loss"] - base["train_loss"]  # noqa: E731
        flatter = all_of(
            [c.at_least(base["lambda_final"], top["lambda_final"]), verdict(loss_gap(top))]
        )
        sharper = all_of(
            [
                c.at_least(no_top["lambda_final"], base["lambda_final"]),
                verdict(c.t.similar_loss * base["train_loss"] - abs(loss_gap(no_top))),
            ]
        )
    return [
        TOP_FLATTER.given(flatter, nums, seeds=c.seeds),
        NO_TOP_SHARPER.given(
            sharper,
            nums + f" (similar: within {c.t.similar_loss:g}× SGD's loss)",
            seeds=c.seeds,
        ),
    ]


# ------------------------------------------------------------------------------- figures


def section_figures(config, results: dict) -> dict:
    """The study's figures (`matplotlib.figure.Figure`, nothing saved): eigenvalues,
    full_batch, step_vs_curvature, variants, schedule — each when its runs are there.
    """
    out = {}
    for draw in (_eigenvalue_figure, _full_batch_figure, _probe_figure, _variants_figure,
                 _schedule_figure):  # fmt: skip
        draw(config, results, out)
    return out


def _eigenvalue_figure(config, results: dict, out: dict) -> None:
    """λ₁ and λ₂ along SGD against η, S and μ (Figs. 2, 4, 13)."""
    s = config.sharpest
    lr0, bs0 = config.optim.learning_rate, config.batch_size
    summaries, data = results["runs"], results["curves"]
    spe = lambda name: summaries[name]["steps_per_epoch"]  # noqa: E731
    groups = [
        ("η", [(f"η={lr:g}", run_name(lr, bs0, 0.0), lr) for lr in sorted(s.learning_rates)]),
        ("S", [(f"S={b}", run_name(lr0, b, 0.0), lr0) for b in sorted(s.batch_sizes)]),
        ("μ", [(f"μ={m:g}", run_name(lr0, bs0, m), lr0) for m in sorted({0.0, *s.momenta})]),
    ]
    fig = plotting.figure((15, 4))
    for j, (label, group) in enumerate(groups):
        ax = fig.add_subplot(1, 3, j + 1)
        for i, (tag, name, lr) in enumerate(group):
            if name not in data:
                continue
            steps, values = _lambda(data[name])
            if not len(steps):
                continue
            color = f"C{i}"
            ax.plot(steps / spe(name), values[:, 0], color=color, label=f"{tag} λ₁")
            if values.shape[1] > 1:
                ax.plot(steps / spe(name), values[:, 1], color=color, ls="--", lw=0.8)
            ax.axhline(2 / lr, color=color, ls=":", lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(f"λ₁ (solid), λ₂ (dashed) vs {label}; dotted: 2/η")
        ax.legend(fontsize=8)
    out["eigenvalues"] = fig


def _full_batch_figure(config, results: dict, out: dict) -> None:
    """Full-batch GD against 2/η (Fig. 3)."""
    s = config.sharpest
    data = results["curves"]
    gd = [lr for lr in s.gd_learning_rates if f"gd_lr{lr:g}" in data]
    if gd:
        fig = plotting.figure((6 * len(gd), 4))
        for j, lr in enumerate(gd):
            ax = fig.add_subplot(1, len(gd), j + 1)
            curve = data[f"gd_lr{lr:g}"]
            steps, values = _lambda(curve)
            for i in range(values.shape[1]):
                ax.plot(
                    steps,
                    values[:, i],
                    lw=1.5 if i == 0 else 0.7,
                    label=f"λ{i + 1}" if i < 3 else None,
                )
            ax.axhline(2 / lr, color="k", ls=":", label="2/η")
            acc = curve["train_accuracy"]
            if acc["steps"]:
                ax2 = ax.twinx()
                ax2.plot(acc["steps"], acc["values"], color="gray", lw=0.8)
                ax2.set_ylabel("train accuracy", color="gray")
            ax.set_xlabel("gradient-descent step")
            ax.set_title(f"full-batch GD, η={lr:g}, {s.gd_examples} examples")
            ax.legend(fontsize=8)
        out["full_batch"] = fig


def _probe_figure(config, results: dict, out: dict) -> None:
    """The step against the sharpest direction (Figs. 5, 6)."""
    s = config.sharpest
    bs0 = config.batch_size
    summaries, data = results["runs"], results["curves"]
    spe = lambda name: summaries[name]["steps_per_epoch"]  # noqa: E731
    import matplotlib

    probed = run_name(s.probe_learning_rate, bs0, 0.0)
    probe = results.get("probe", {})
    if probed in data and probe.get("records"):
        recs = probe["records"]
        fig = plotting.figure((15, 4))
        ax = fig.add_subplot(1, 3, 1)
        ep = np.asarray([r["step"] for r in recs]) / spe(probed)
        for a in s.alphas:
            rel = [_rel(r[f"probe/delta_alpha{a:g}"], r["probe/loss"]) for r in recs]
            ax.plot(ep, rel, label=f"α={a:g}")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("epoch")
        ax.set_ylabel("E[L(θ − αη g̃₁)] − L(θ)  (% of L)")
        ax.set_title("step along e₁ (Fig. 6 left)")
        ax.legend(fontsize=8)
        ax = fig.add_subplot(1, 3, 2)
        ax.plot(ep, [r["probe/cos_top5"] for r in recs], label="top-5 eigenvectors")
        ax.plot(ep, [r["probe/cos_random"] for r in recs], label="random directions")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean |cos(g, ·)|")
        ax.set_title("gradient alignment (Fig. 5)")
        ax.legend(fontsize=8)
        ax = fig.add_subplot(1, 3, 3)
        lines = probe.get("lines", [])
        lam = dict(zip(*_lambda(data[probed])))
        if lines:
            lams = np.asarray([lam.get(line["step"], [np.nan])[0] for line in lines])
            norm = (lams - np.nanmin(lams)) / max(np.nanmax(lams) - np.nanmin(lams), 1e-12)
            cmap = matplotlib.colormaps["coolwarm"]
            for line, c in zip(lines, norm):
                along = np.asarray(line["along_e1"]) - line["loss"]
                ax.plot(line["ks"], along, color=cmap(c), lw=0.8)
            ax.set_xlabel("k  (θ + k·e₁·η·E|g̃₁|)")
            ax.set_ylabel("L − L(θ)")
            ax.set_title("loss along e₁ per measurement (blue→red: λ₁)")
        out["step_vs_curvature"] = fig


def _variants_figure(config, results: dict, out: dict) -> None:
    """SGD, SGD top, constant top, no top (Fig. 7)."""
    data = results["curves"]
    var = [v for v in ("sgd", "top", "constant_top", "no_top") if f"variants/{v}" in data]
    if var:
        fig = plotting.figure((10, 4))
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        for v in var:
            curve = data[f"variants/{v}"]
            steps, values = _lambda(curve)
            ax2.plot(steps, values[:, 0], label=v.replace("_", " "))
            tl = curve["train_loss"]
            if tl["steps"]:
                ax1.plot(tl["steps"], tl["values"], label=v.replace("_", " "))
        ax1.set_title("mini-batch training loss (Fig. 7)")
        ax1.set_xlabel("step after the restart")
        ax2.set_title("λ_max")
        ax2.set_xlabel("step after the restart")
        ax1.legend(fontsize=8)
        out["variants"] = fig


def _schedule_figure(config, results: dict, out: dict) -> None:
    """The learning-rate drop after L epochs (Fig. 12)."""
    s = config.sharpest
    summaries, data = results["runs"], results["curves"]
    spe = lambda name: summaries[name]["steps_per_epoch"]  # noqa: E731
    sched = [L for L in sorted(s.schedule_first_epochs) if f"schedule_L{L}" in data]
    if sched:
        fig = plotting.figure((10, 4))
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        for i, L in enumerate(sched):
            name = f"schedule_L{L}"
            curve = data[name]
            steps, values = _lambda(curve)
            ax1.plot(steps / spe(name), values[:, 0], color=f"C{i}", label=f"L={L}")
            fro = curve.get("frobenius", {"steps": []})
            if fro["steps"]:
                x = np.asarray(fro["steps"]) / spe(name)
                ax1.plot(x, fro["values"], color=f"C{i}", ls="--", lw=0.8)
            acc = curve["test_accuracy"]
            ax2.plot(acc["epochs"], acc["values"], color=f"C{i}", label=f"L={L}")
            ax1.axvline(L, color=f"C{i}", ls=":", lw=0.8)
        ax1.set_yscale("log")
        ax1.set_xlabel("epoch")
        ax1.set_title("λ_max (solid), ‖H‖_F top-k (dashed)")
        ax2.set_xlabel("epoch")
        ax2.set_title("test accuracy (Fig. 12)")
        ax1.legend(fontsize=8)
        out["schedule"] = fig


# --------------------------------------------------------------------------------- report


def header(config, results: dict) -> list[str]:
    """The scale of this run and the paper's."""
    s = config.sharpest
    data, description = results["data"], results["curvature_loss"]
    n = data["num_train"]
    return [
        f"**Scale.** {config.model.name} {dict(config.model.kwargs)} on {n} {data['name']} "
        f"training examples ({data['source']}); plain SGD, base η = "
        f"{config.optim.learning_rate:g}, S = {config.batch_size}, "
        f"{train.plural(config.num_epochs, 'epoch')}; "
        f"top {s.curvature.k} eigenvalues by "
        f"Lanczos on {description}, every {train.plural(s.curvature.every_steps, 'step')} up "
        "to step "
        f"{s.curvature.until_step}, then every epoch. The paper: SimpleCNN / ResNet-32 / VGG-11 "
        "on CIFAR-10 (and an LSTM on PTB), top 10 eigenvalues by ARPACK on ~2,500 training "
        "examples, 200+ epochs.",
    ]


def report(config, results: dict) -> list[str]:
    """The paper's numbers beside ours, and every run's λ_max."""
    s, summaries = config.sharpest, results["runs"]
    lines = [
        "## The paper's numbers",
        "",
        "| quantity | paper | here |",
        "| --- | --- | --- |",
    ]
    probed = summaries.get(run_name(s.probe_learning_rate, config.batch_size, 0.0), {})
    probe = results.get("probe", {}).get("records", [])
    if probe:
        spe = probed["steps_per_epoch"]
        early = [r for r in probe if r["step"] <= s.early_epochs * spe] or probe
        for a in s.alphas:
            here = np.mean([_rel(r[f"probe/delta_alpha{a:g}"], r["probe/loss"]) for r in early])
            paper = ", ".join(f"{m}: {v[a]}" for m, v in PAPER["alpha_sweep"].items() if a in v)
            lines.append(
                f"| ΔL/L for α = {a:g} (first {train.plural(s.early_epochs, 'epoch')}) | "
                f"{paper or '—'} | "
                f"{here:+.2f}% |"
            )
        cos = max(r["probe/cos_top5"] for r in probe)
        lines.append(
            f"| max mean \\|cos\\| gradient vs top 5 | {PAPER['max_cosine']} | {cos:.3f} |"
        )
    lines += [
        "",
        "## Runs",
        "",
        "| run | λ_max first | peak (step) | final | 2/η | train acc. | test acc. |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for spec in plan(config):
        v = summaries.get(spec.name, {})
        if "lambda_peak" not in v:
            continue
        lr = spec.config.optim.learning_rate
        acc = lambda key, v=v: f"{100 * v[key]:.2f}%" if v.get(key) is not None else "—"  # noqa: E731
        lines.append(
            f"| {spec.name} | {v['lambda_first']:.3g} | {v['lambda_peak']:.3g} ({v['peak_step']}) "
            f"| {v['lambda_final']:.3g} | {2 / lr:.3g} | {acc('train_accuracy')} | "
            f"{acc('test_accuracy')} |"
        )
    return lines


# ------------------------------------------------------------------------------------ run


def section_run(ctx) -> dict:
    """Trains every run of `plan` (resuming), with its trackers and probes."""
    config, workdir, data, log = ctx.config, ctx.workdir, ctx.data, ctx.log
    s = config.sharpest
    n = len(data.x_train)
    for b in [*s.batch_sizes, config.batch_size]:
        if b > n:
            raise train.ConfigError(f"batch size {b} exceeds the {n} training examples")
    if s.gd_learning_rates and s.gd_examples > n:
        raise train.ConfigError(
            f"config.sharpest.gd_examples={s.gd_examples} exceeds the {n} training examples"
        )
    model = train.build_model(config, data)  # one model for every run (same architecture)
    keys = key_streams(config.seed, "sharpest/subset", "sharpest/curvature", "sharpest/probe")
    summaries, data_curves, description = {}, {}, ""
    probed, probe = run_name(s.probe_learning_rate, config.batch_size, 0.0), {}
    base_variables = None
    for spec in plan(config):
        if spec.group == "variants" and spec.variant != "start" and base_variables is None:
            continue  # the run they restart from diverged
        result, tracker = _train_run(spec, config, workdir, data, model, log, keys, base_variables)
        description = description or tracker.description
        if isinstance(result, runs.Diverged):
            summaries[spec.name] = {"diverged": True, "message": result.message}
            continue
        if spec.variant == "start":
            base_variables = result.state.variables()
            continue
        folder = runs.run_dir(workdir, spec.name)
        recs = runs.read_metrics(folder)
        data_curves[spec.name] = curves(recs)
        spe = max(1, len(result.data.x_train) // spec.config.batch_size)
        summaries[spec.name] = summarize_run(recs, spe)
        if spec.name == probed:
            probe = {
                "run": probed,
                "records": [r for r in recs if "probe/cos_top5" in r],
                "lines": [
                    {
                        "step": step,
                        "ks": a["ks"].tolist(),
                        "along_e1": a["along_e1"].tolist(),
                        "loss": float(a["loss"]),
                    }
                    for step, a in runs.read_arrays(folder, "probe")
                ],
            }
        if spec.group == "schedule":
            drop = spec.config.schedule.boundaries_epochs[0] * spe
            steps, values = runs.series(recs, LAMBDA)
            if len(steps):
                summaries[spec.name]["drop_lambda"] = float(
                    values[np.argmin(np.abs(steps - drop)), 0]
                )
    results = {
        "config": config.name,
        "curvature_loss": description,
        "data": {"name": data.name, "source": data.source, "num_train": n},
        "runs": summaries,
        "curves": data_curves,
        "probe": probe,
    }
    return results


STUDY = Study(
    name="sharpest_directions",
    title=lambda config: f"Jastrzębski et al. (2019), Sec. 3 — {config.name}",
    sections=(
        Section(
            name="sharpest_directions",
            title="The sharpest directions along SGD",
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
    run="""Runs the study (resuming finished and interrupted runs), writes the report.""",
    claims="""``(claim, verdict, numbers)`` for each claim of Sec. 3 this study tests. Eigenvalues
    differ only beyond the eigensolver's tolerance (``curvature.tol`` × λ each); the probe's
    means only beyond their standard error over the probed steps. A claim whose runs
    diverged (or are missing) reads "not tested".""",
    figures="""The study's figures (`matplotlib.figure.Figure`, nothing saved): eigenvalues,
    full_batch, step_vs_curvature, variants, schedule — each when its runs are there.""",
    report_markdown="""``report.md``: the scale, the claims, the paper's numbers beside ours,
    the runs.""",
)
