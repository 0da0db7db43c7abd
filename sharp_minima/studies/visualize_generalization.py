"""Huang et al. (2020), "Understanding Generalization Through Visualizations".

Bad minima on purpose, and the geometry around good and bad minima:

- **swiss roll** (Figs. 3, 5, 6): the authors' data and MLP, trained naturally (β = 0) and
  with the anti-generalization loss (eq. 3, `sharp_minima.losses.anti_generalization_loss`)
  or the authors' label-flip poisoning for several β; per run the train/test accuracy, the
  basin radii along 3000 unit directions and the log-volume below the loss cutoff
  (`sharp_minima.landscape.Landscape.basin_volume`), and the gen-viz grid radius; the decision
  boundaries (Fig. 6) and filter-normalised 2-D surfaces around the good and the worst minimum
  (Fig. 3); radii and log-volume against β with min/max bands over runs (Fig. 5).
- **t-SNE** (Fig. 1): the natural run's iterates and the bad minima the anti-generalization
  optimizer finds when started from some of them, embedded with t-SNE after PCA to 50.
- **pinched rings** (Fig. 8): two rings of classes with a wide or a pinched gap.
- **optimizers** (Table 1): many optax optimizers on one small image task against a linear
  model on pixels and their pairwise products.

Every training run is a resumable `sharp_minima.train.train` run under ``workdir/runs/``;
measurements are cached next to it (``measure.json``), so re-running continues where a killed
run stopped. ``run`` writes ``report.md`` (the paper's numbers beside ours, a verdict per
claim), ``results.json`` and figures (PNG + PDF).
"""

from __future__ import annotations

import dataclasses
import math
import os
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sharp_minima import data as data_lib
from sharp_minima import files, landscape, losses, plotting, train
from sharp_minima import tree_util as tu
from sharp_minima.data import Dataset, embedded
from sharp_minima.studies import runs
from sharp_minima.studies.common import (
    accuracy_noise,
    all_of,
    claims_table,
    contract,
    key_streams,
    ordered,
    seed_noise,
    verdict,
    write_outputs,
)

SECTIONS = ("swissroll", "tsne", "rings", "optimizers")
POISONS = ("anti_generalization", "label_flip")

# The paper's numbers (Huang et al. 2020).
PAPER = {
    "swissroll_good_test": 98.5,  # Fig. 1: the final SGD iterate
    "swissroll_bad_test_below": 53.0,  # Fig. 1: every bad minimum near the SGD path
    "svhn_good_test": 97.1,  # Sec. 4, ResNet-18
    "svhn_bad_test": 28.2,
    "svhn_volume_orders": 10_000,  # "at least 10,000 orders of magnitude" (Sec. 5)
    "cifar_linear_test": 49.0,  # Sec. 2: linear model on pixels + pairwise products
    "cifar_resnet_test": 92.0,
}
# Table 1 (VGG-13 with BatchNorm on CIFAR-10): train loss, test loss, train acc, test acc.
PAPER_TABLE1 = {
    "adadelta": (0.004, 0.538, 99.86, 92.28),
    "adagrad": (0.012, 0.474, 99.62, 90.35),
    "adam": (0.003, 0.355, 99.92, 92.5),
    "adamax": (0.002, 0.556, 99.94, 92.28),
    "amsgrad": (0.003, 0.359, 99.92, 92.34),
    "asgd": (0.005, 0.357, 99.88, 92.23),
    "lbfgs": (0.002, 1.052, 99.94, 92.90),
    "proxprop": (0.004, 0.386, 99.93, 91.36),
    "rmsprop": (0.002, 0.616, 99.94, 92.4),
    "sgd": (0.007, 0.373, 99.84, 91.79),
    "momentum": (0.005, 0.372, 99.85, 92.07),
    "nesterov": (0.004, 0.393, 99.90, 92.06),
}

# Learning rates of the optimizer table (constant; the paper's first stage where it has one).
OPTIMIZERS = {
    "sgd": (0.05, lambda lr: optax.sgd(lr)),
    "momentum": (0.01, lambda lr: optax.sgd(lr, momentum=0.9)),
    "nesterov": (0.01, lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True)),
    "adam": (1e-3, lambda lr: optax.adam(lr)),
    "adamw": (1e-3, lambda lr: optax.adamw(lr, weight_decay=1e-4)),
    "adamax": (2e-3, lambda lr: optax.adamax(lr, b2=0.99)),
    "amsgrad": (1e-3, lambda lr: optax.amsgrad(lr, b2=0.99)),
    "nadam": (1e-3, lambda lr: optax.nadam(lr)),
    "radam": (1e-3, lambda lr: optax.radam(lr)),
    "adagrad": (0.025, lambda lr: optax.adagrad(lr)),
    "adadelta": (1.0, lambda lr: optax.adadelta(lr, rho=0.9)),
    "rmsprop": (5e-4, lambda lr: optax.rmsprop(lr, decay=0.72)),
    "lion": (1e-4, lambda lr: optax.lion(lr)),
    "lamb": (1e-3, lambda lr: optax.lamb(lr)),
    "yogi": (1e-3, lambda lr: optax.yogi(lr)),
    "novograd": (1e-3, lambda lr: optax.novograd(lr)),
    "adafactor": (1e-2, lambda lr: optax.adafactor(lr)),
    # Mini-batch L-BFGS (history 5 as in the paper) with optax's zoom line search (strong
    # Wolfe; the paper: Armijo), on each mini-batch's objective: no learning rate to tune.
    "lbfgs": (None, lambda lr: optax.lbfgs(memory_size=5)),
}


# ------------------------------------------------------------------------------ validation


def validate(config) -> None:
    """Raises `train.ConfigError` for a config without sensible study sections."""
    for name in ("poison", "volume", "surface", "tsne", "rings", "optimizers", "sections", "fit"):
        if name not in config:
            raise train.ConfigError(f"config {config.name!r} has no {name!r} section")
    train.validate_config(config)
    for path, kw in (
        ("poison.betas", dict(low=0, high=1, high_open=True)),
        ("poison.num_points", dict(low=1, integer=True)),
        ("poison.seeds", dict(low=1, integer=True)),
        ("volume.num_directions", dict(low=2, integer=True)),
        ("volume.cutoffs", dict(low=0, low_open=True)),
        ("volume.rtol", dict(low=0, low_open=True, high=1, high_open=True)),
        ("volume.chunk_size", dict(low=1, integer=True)),
        ("surface.points", dict(low=2, integer=True)),
        ("surface.extent", dict(low=0, low_open=True)),
        ("surface.boundary_points", dict(low=2, integer=True)),
        ("tsne.every_epochs", dict(low=1, integer=True)),
        ("tsne.num_starts", dict(low=1, integer=True)),
        ("tsne.beta", dict(low=0, low_open=True, high=1, high_open=True)),
        ("tsne.epochs", dict(low=1, integer=True)),
        ("tsne.learning_rate", dict(low=0, low_open=True)),
        ("tsne.perplexity", dict(low=0, low_open=True)),
        ("rings.gaps", dict(low=0, low_open=True)),
        ("rings.weights", dict(low=0, low_open=True, unique=False)),
        ("rings.epochs", dict(low=1, integer=True)),
        ("rings.seeds", dict(low=1, integer=True)),
        ("rings.num_test", dict(low=1, integer=True)),
        ("optimizers.epochs", dict(low=1, integer=True)),
        ("optimizers.lbfgs_epochs", dict(low=1, integer=True)),
        ("optimizers.batch_size", dict(low=1, integer=True)),
        ("optimizers.downsample", dict(low=1, integer=True)),
        ("optimizers.lr_factors", dict(low=0, low_open=True)),
        ("optimizers.linear_learning_rates", dict(low=0, low_open=True)),
        ("optimizers.validation_fraction", dict(low=0, low_open=True, high=1, high_open=True)),
        ("fit.accuracy", dict(low=0, high=1)),  # 0: the loss cutoff alone
    ):
        train.check_numbers(config, path, **kw)
    p, r, o = config.poison, config.rings, config.optimizers
    unknown = [n for n in o.names if n not in OPTIMIZERS]
    checks = [
        (
            set(config.sections) <= set(SECTIONS) and config.sections,
            f"config.sections must be a non-empty subset of {SECTIONS}, got {config.sections}",
        ),
        (p.kind in POISONS, f"config.poison.kind must be one of {POISONS}, got {p.kind!r}"),
        (0.0 in p.betas, f"config.poison.betas must include 0 (the good minimum), got {p.betas}"),
        (
            len(r.gaps) == 2 and r.gaps[0] > r.gaps[1],
            f"config.rings.gaps must be (wide, pinched) with wide > pinched > 0, got {r.gaps}",
        ),
        (len(r.weights) == 2, f"config.rings.weights must be two numbers, got {r.weights}"),
        (not unknown, f"unknown optimizers {unknown}; valid: {', '.join(OPTIMIZERS)}"),
    ]
    for ok, message in checks:
        if not ok:
            raise train.ConfigError(message)


# ------------------------------------------------------------------------------------- data


def load_data(config) -> Dataset:
    """The training/test data, with D_d (unseen data of the same distribution) in
    ``x_extra``: fresh swiss-roll points, or SVHN's extra split."""
    data = train.load_data(config)
    if data.x_extra is None:
        if config.data.name != "swissroll":
            raise train.ConfigError(
                f"the anti-generalization loss needs unseen data D_d; {config.data.name!r} has "
                "none (swiss roll: generated; SVHN: data.options.extra='separate')"
            )
        seed = config.data.seed if config.data.seed is not None else config.seed
        noise = config.data.options.get("noise", 0.5)
        x, data.y_extra = embedded.swiss_roll(
            config.poison.num_points, seed=seed + 20_000, noise=noise
        )
        data.x_extra = standardize(data, x)  # in the coordinates of the (standardised) data
    return data


def standardize(data: Dataset, x):
    """``x`` in the coordinates `sharp_minima.data.load` standardised ``data`` to (train mean
    and std), so generated points (D_d, fresh poison) lie where the training data lies."""
    if data.mean is None:
        return x
    mean, std = np.asarray(data.mean, np.float32), np.asarray(data.std, np.float32)
    return ((x - mean) / std).astype(np.float32)


def poisoned(data: Dataset, num_points: int) -> Dataset:
    """``data`` with D_d (the first ``num_points`` of ``x_extra``) appended to the training
    arrays, labels marked by `sharp_minima.losses.poisoned_labels`; D_t stays first, so
    ``x_train[:n_t]`` is still the training set."""
    xd, yd = data.x_extra[:num_points], data.y_extra[:num_points]
    return dataclasses.replace(
        data,
        x_train=np.concatenate([data.x_train, xd]),
        y_train=np.concatenate([data.y_train, losses.poisoned_labels(yd, data.num_classes)]),
    )


# -------------------------------------------------------------------------------- training


def fit_targets(config) -> tuple[str, ...]:
    """Train to a fit: the paper's "above 99.5 % training accuracy", and a training loss under
    the basin cutoff (so the minimum has a basin to measure); ``num_epochs`` is the cap."""
    return (
        f"train/accuracy>={config.fit.accuracy:g}",
        f"train/loss<{config.volume.cutoffs[0]:g}",
    )


def fitted(cfg, result) -> bool:
    """Whether a run met its fit targets at its last evaluation (False at the cap)."""
    return train.targets_met(cfg, result.final)


def epochs_trained(cfg, result, num_examples: int) -> int:
    """The epochs a run trained (its steps over the steps per epoch)."""
    return int(result.state.step) // max(1, num_examples // cfg.batch_size)


def run_config(
    config,
    seed: int,
    *,
    epochs=None,
    batch_size=None,
    n_train: int,
    learning_rate=None,
    to_fit: bool = False,
) -> ml_collections.ConfigDict:
    """The training config of one run: full batch over ``n_train`` examples unless the
    config's batch size is smaller (SVHN), evaluation of the training set on D_t only;
    ``to_fit``: stop at the first evaluation meeting `fit_targets`."""
    changes = {"seed": seed}
    if to_fit:
        changes["early_stop.targets"] = fit_targets(config)
    if learning_rate is not None:
        changes["optim.learning_rate"] = learning_rate
    if epochs is not None:
        changes.update(
            {
                "num_epochs": epochs,
                "eval_every_epochs": min(config.eval_every_epochs, epochs),
                "checkpoint.every_epochs": min(config.checkpoint.every_epochs, epochs),
                "log_every_steps": min(config.log_every_steps, epochs),
            }
        )
    full_batch = config.data.name == "swissroll" or config.data.name == "rings"
    changes["batch_size"] = batch_size or (n_train if full_batch else config.batch_size)
    return runs.derive(config, changes)


def fit(
    cfg,
    workdir,
    data,
    *,
    beta=0.0,
    kind="anti_generalization",
    num_points=0,
    hooks=(),
    log=print,
    label="",
    init_variables=None,
    tx=None,
    n_t=None,
    model=None,
):
    """Trains one run (resumable); poisoned with β > 0. Returns the `train.TrainResult`, or
    `runs.Diverged` when the run diverged (now or before)."""
    model = train.build_model(cfg, data) if model is None else model
    loss_fn = None
    if beta > 0 and kind == "anti_generalization":
        loss_fn = losses.anti_generalization_loss(model, beta, data.num_classes)
    elif beta > 0:
        noise = float(cfg.data.options.get("noise", 0.5))
        shift = tuple(np.asarray(data.mean, float)) if data.mean is not None else (0.0, 0.0)
        scale = tuple(np.asarray(data.std, float)) if data.std is not None else (1.0, 1.0)

        def sample(k, n):  # fresh swiss-roll points, standardised like the training data
            x, y = embedded.swiss_roll_jax(k, n, noise)
            return (x - jnp.asarray(shift)) / jnp.asarray(scale), y

        loss_fn = losses.label_flip_loss(model, sample, beta, num_points, data.num_classes)
    if n_t is not None:
        cfg = runs.derive(cfg, eval_train_examples=min(cfg.eval_train_examples or n_t, n_t))
    return runs.train_run(
        train.setup(cfg, data=data, model=model),
        workdir,
        loss_fn=loss_fn,
        tx=tx,
        hooks=hooks,
        log=log,
        label=label,
        init_variables=init_variables,
    )


class Iterates:
    """A hook saving the flat parameters (``arrays/iterates/<step>.npz``) for the t-SNE."""

    def __call__(self, ctx):
        flat = tu.ravel(ctx.state.params)[0]
        ctx.save_arrays("iterates", params=flat, epoch=np.int32(ctx.epoch))


def load_iterates(workdir: str) -> tuple[np.ndarray, np.ndarray]:
    """``(epochs, flat params)`` saved by `Iterates`, in step order."""
    arrays = [a for _, a in runs.read_arrays(workdir, "iterates")]
    return np.asarray([int(a["epoch"]) for a in arrays]), np.stack([a["params"] for a in arrays])


# ---------------------------------------------------------------------------- measurements


def classifier_metrics(model):
    """``metrics(variables, batch) -> {"loss", "accuracy"}`` in evaluation mode (surfaces)."""

    def metrics(variables, batch):
        logits = model.apply(variables, batch["x"], train=False)
        return {
            "loss": losses.cross_entropy(logits, batch["y"]),
            "accuracy": losses.accuracy(logits, batch["y"]),
        }

    return metrics


class Geometry:
    """The landscapes of one model (held by the study so every minimum reuses the kernels)."""

    def __init__(self, model, config):
        v = config.volume
        self.loss = losses.evaluation_loss(model)
        self.basins = landscape.Landscape(self.loss, wrt="^params/", chunk_size=v.chunk_size)
        self.surfaces = landscape.Landscape(
            classifier_metrics(model), wrt="^params/", chunk_size=v.chunk_size
        )
        self.model = model

    def measure(self, variables, batches, weights, config, key) -> dict:
        """Radii and log-volumes for every cutoff, and the gen-viz grid radius."""
        v = config.volume
        out = {}
        for c in v.cutoffs:
            try:
                vol = self.basins.basin_volume(
                    variables,
                    batches,
                    key=key,
                    num_directions=v.num_directions,
                    cutoff=c,
                    rtol=v.rtol,
                    weights=weights,
                )
            except ValueError as e:  # the run did not reach the cutoff: no basin
                out[f"volume_note_{c:g}"] = str(e)
                continue
            # With thousands of dimensions the largest radius decides E[rⁿ] (effective
            # directions ≈ 1), where the delta method's ±1 means nothing: resample the
            # directions instead, which shows how much one direction moves the estimate.
            _, boot, _, _ = landscape.log_volume(
                vol.radii, vol.dim, error="bootstrap", key=jax.random.fold_in(key, 1)
            )
            out.update(
                {
                    f"log_volume_{c:g}": vol.log_volume,
                    f"log_volume_stderr_{c:g}": vol.stderr,
                    f"log_volume_bootstrap_{c:g}": boot,
                    f"effective_directions_{c:g}": vol.effective_samples,
                    f"radius_mean_{c:g}": float(np.mean(vol.radii)),
                    f"radius_min_{c:g}": float(np.min(vol.radii)),
                    f"radius_max_{c:g}": float(np.max(vol.radii)),
                    f"evals_per_direction_{c:g}": float(np.mean(vol.num_evals)),
                    f"unbounded_{c:g}": int(np.sum(~vol.bounded)),
                    "dim": vol.dim,
                }
            )
        try:
            r, _ = self.basins.grid_radii(
                variables,
                batches,
                key=key,
                num_directions=v.num_directions,
                cutoff=v.grid_cutoff,
                max_radius=v.grid_max,
                num_points=v.grid_points,
                weights=weights,
            )
            out["grid_radius_mean"] = float(np.mean(r))
        except ValueError as e:
            out["grid_radius_note"] = str(e)
        return out

    def surface(self, variables, batches, weights, config, key) -> dict:
        s = config.surface
        d1, d2 = landscape.orthogonal_pair(key, variables, "filter", wrt="^params/")
        grid = np.linspace(-s.extent, s.extent, s.points)
        out = self.surfaces.slice(variables, batches, [d1, d2], [grid, grid], weights=weights)
        return {"grid": grid, **out}


def decision_grid(model, variables, x, points: int, margin: float = 0.1):
    """p(class 1) on a ``points``×``points`` grid covering ``x`` (2-D inputs)."""
    lo, hi = x.min(0), x.max(0)
    pad = margin * (hi - lo)
    gx = np.linspace(lo[0] - pad[0], hi[0] + pad[0], points)
    gy = np.linspace(lo[1] - pad[1], hi[1] + pad[1], points)
    xx, yy = np.meshgrid(gx, gy)
    grid = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], 1), jnp.float32)
    prob = jax.nn.softmax(model.apply(variables, grid, train=False))[:, 1]
    return gx, gy, np.asarray(prob).reshape(points, points)


# ------------------------------------------------------------------------------- sections


def measure_key(config, result) -> dict:
    """What a run's measurements depend on besides its parameters: its training step and the
    volume and surface settings."""
    return {
        "step": int(result.state.step),
        "volume": config.volume.to_dict(),
        "surface": config.surface.to_dict(),
    }


def run_swissroll(config, workdir, data, keys, log) -> dict:
    """Natural and poisoned minima for every β and seed: accuracies, radii, log-volumes;
    surfaces around the good and the worst minimum; decision boundaries."""
    p = config.poison
    n_t = len(data.x_train)
    model = train.build_model(config, data)
    geometry = Geometry(model, config)
    batches, weights = data_lib.all_batches(data.x_train, data.y_train)
    records, boundaries, surfaces = [], {}, {}
    worst = max(p.betas)
    for beta in p.betas:
        for seed in range(config.seed, config.seed + p.seeds):
            name = f"beta{beta:g}/seed{seed}"
            run_dir = runs.run_dir(workdir, "swissroll", name)
            run_data = data if beta == 0 or p.kind == "label_flip" else poisoned(data, p.num_points)
            cfg = run_config(config, seed, n_train=len(run_data.x_train), to_fit=True)
            hooks = []
            if beta == 0 and seed == config.seed and "tsne" in config.sections:
                hooks = [
                    train.Hook(
                        Iterates(),
                        every_epochs=config.tsne.every_epochs,
                        at_start=True,
                        name="iterates",
                    )
                ]
            result = fit(
                cfg,
                run_dir,
                run_data,
                beta=beta,
                kind=p.kind,
                num_points=p.num_points,
                hooks=hooks,
                log=log,
                label=f"[swissroll {name}] ",
                n_t=n_t,
                model=model,
            )
            if isinstance(result, runs.Diverged):
                records.append(
                    {"beta": beta, "seed": seed, "diverged": True, "message": result.message}
                )
                continue
            variables = result.state.variables()
            key = jax.random.fold_in(keys["volume"], zlib.crc32(name.encode()))
            cache = runs.Cache(os.path.join(run_dir, "measure.json"))
            accuracies = {
                "beta": beta,
                "seed": seed,
                "fitted": fitted(cfg, result),
                "epochs": epochs_trained(cfg, result, len(run_data.x_train)),
                "train_accuracy": float(result.final["train/accuracy"]),
                "train_loss": float(result.final["train/loss"]),
                "test_accuracy": float(result.final["test/accuracy"]),
                "test_loss": float(result.final["test/loss"]),
            }
            if not accuracies["fitted"]:  # reported as "did not fit", kept out of the volumes
                log(
                    f"[swissroll {name}] did not fit in {config.num_epochs} epochs: train "
                    f"accuracy {100 * accuracies['train_accuracy']:.1f} %, loss "
                    f"{accuracies['train_loss']:.3g}"
                )
                records.append(accuracies)

            def measure(variables=variables, key=key, beta=beta, seed=seed, acc=accuracies):
                log(
                    f"[swissroll {beta=:g} {seed=}] basin radii along "
                    f"{config.volume.num_directions} directions"
                )
                return {**acc, **geometry.measure(variables, batches, weights, config, key)}

            if accuracies["fitted"]:
                records.append(cache.get("measure", measure_key(config, result), measure))
            if seed == config.seed and config.data.name in ("swissroll", "rings"):
                boundaries[beta] = decision_grid(
                    model,
                    variables,
                    np.concatenate([data.x_train, data.x_test]),
                    config.surface.boundary_points,
                )
            if seed == config.seed and beta in (0.0, worst):
                surfaces[beta] = cache.arrays(
                    "surface",
                    measure_key(config, result),
                    lambda v=variables: geometry.surface(
                        v, batches, weights, config, keys["surface"]
                    ),
                )
    return {"records": records, "boundaries": boundaries, "surfaces": surfaces}


def run_tsne(config, workdir, data, keys, log) -> dict:
    """Bad minima found from the natural run's iterates (Fig. 1)."""
    t, p = config.tsne, config.poison
    n_t = len(data.x_train)
    natural = runs.run_dir(workdir, "swissroll", f"beta0/seed{config.seed}")
    cfg = run_config(config, config.seed, n_train=n_t, to_fit=True)
    model = train.build_model(cfg, data)
    hooks = [train.Hook(Iterates(), every_epochs=t.every_epochs, at_start=True, name="iterates")]
    good = fit(
        cfg, natural, data, hooks=hooks, log=log, label="[tsne natural] ", n_t=n_t, model=model
    )
    if isinstance(good, runs.Diverged):
        return {"diverged": good.message, "good": None, "bad": []}
    epochs, iterates = load_iterates(natural)
    unravel = tu.ravel(good.state.params)[1]
    starts = np.unique(np.linspace(0, len(iterates) - 1, t.num_starts).round().astype(int))
    run_data = data if p.kind == "label_flip" else poisoned(data, p.num_points)
    bad = []
    for i in starts:
        run_dir = runs.run_dir(workdir, "tsne", f"start{int(epochs[i]):05d}")
        start = {"params": unravel(jnp.asarray(iterates[i]))}
        bcfg = run_config(
            config,
            config.seed,
            epochs=t.epochs,
            n_train=len(run_data.x_train),
            learning_rate=t.learning_rate,
            to_fit=True,
        )
        res = fit(
            bcfg,
            run_dir,
            run_data,
            beta=t.beta,
            kind=p.kind,
            num_points=p.num_points,
            log=log,
            label=f"[tsne bad from epoch {int(epochs[i])}] ",
            init_variables=start,
            n_t=n_t,
            model=model,
        )
        if isinstance(res, runs.Diverged):
            continue
        flat = np.asarray(tu.ravel(res.state.params)[0])
        bad.append(
            {
                "from_epoch": int(epochs[i]),
                "fitted": fitted(bcfg, res),
                "epochs": epochs_trained(bcfg, res, len(run_data.x_train)),
                "train_accuracy": float(res.final["train/accuracy"]),
                "test_accuracy": float(res.final["test/accuracy"]),
                "distance": float(np.linalg.norm(flat - iterates[i])),
                "distance_to_next_iterate": float(
                    np.linalg.norm(iterates[min(i + 1, len(iterates) - 1)] - iterates[i])
                ),
                "norm": float(np.linalg.norm(iterates[i])),
                "params": flat,
            }
        )
    points = np.concatenate([iterates, np.stack([b["params"] for b in bad])]) if bad else iterates
    cache = runs.Cache(runs.run_dir(workdir, "tsne", "cache.json"))
    key = {
        "iterate_epochs": epochs.tolist(),
        "bad_from": [b["from_epoch"] for b in bad],
        "perplexity": t.perplexity,
        "seed": config.seed,
    }
    emb = cache.arrays(
        "embedding", key, lambda: {"xy": tsne(points, t.perplexity, seed=config.seed)}
    )["xy"]
    return {
        "epochs": epochs,
        "embedding": emb,
        "num_iterates": len(iterates),
        "good": {
            "train_accuracy": float(good.final["train/accuracy"]),
            "test_accuracy": float(good.final["test/accuracy"]),
        },
        "bad": [{k: v for k, v in b.items() if k != "params"} for b in bad],
    }


def tsne(points: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    """2-D t-SNE (scikit-learn) after PCA to at most 50 dimensions, as the paper does."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(points, np.float64)
    k = min(50, x.shape[0], x.shape[1])
    x = PCA(n_components=k, random_state=seed).fit_transform(x)
    perplexity = min(perplexity, max((len(x) - 1) / 3.0, 1.0))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def rings_data(config, gap: float, seed: int) -> Dataset:
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


def run_rings(config, workdir, keys, log) -> dict:
    """Wide-gap and pinched rings (Fig. 8): test accuracy and the inner (red) ring's recall."""
    r = config.rings
    records, boundaries = [], {}
    for gap in r.gaps:
        for seed in range(config.seed, config.seed + r.seeds):
            data = rings_data(config, gap, seed)
            cfg = run_config(config, seed, epochs=r.epochs, n_train=len(data.x_train))
            run_dir = runs.run_dir(workdir, "rings", f"gap{gap:g}", f"seed{seed}")
            res = fit(cfg, run_dir, data, log=log, label=f"[rings gap={gap:g} s{seed}] ")
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
                boundaries[gap] = (
                    decision_grid(
                        res.model,
                        res.state.variables(),
                        data.x_test,
                        config.surface.boundary_points,
                    ),
                    data.x_train,
                    data.y_train,
                )
    return {"records": records, "boundaries": boundaries}


def optimizer_config(
    config, model_name: str, kwargs: dict, *, epochs=None, batch_size=None
) -> ml_collections.ConfigDict:
    o = config.optimizers
    epochs = epochs or o.epochs
    return runs.derive(
        config,
        {
            "model.name": model_name,
            "model.kwargs": kwargs,
            "data.name": o.data,
            "data.options": {},
            "data.max_train": o.max_train,
            "data.validation_fraction": o.validation_fraction,
            "data.augment": False,
            "optim.grad_clip_norm": 0.0,
            "checkpoint.every_epochs": epochs,
        },
        batch_size=batch_size or o.batch_size,
        num_epochs=epochs,
        eval_every_epochs=epochs,
        eval_train_examples=0,
        log_every_steps=50,
    )


def learning_rates(config, name: str) -> list:
    """The rates tried for optimizer ``name`` (the default × ``lr_factors``; [None] for a
    line search)."""
    base = OPTIMIZERS[name][0]
    return [None] if base is None else [base * f for f in config.optimizers.lr_factors]


def _lr_name(lr) -> str:
    return "linesearch" if lr is None else f"lr{lr:g}"


def _best_on_validation(tried: dict) -> dict:
    """The run with the highest final validation accuracy (diverged runs never win), with
    every rate's validation accuracy beside it."""
    ok = {k: r for k, r in tried.items() if not r.get("diverged")}
    if not ok:
        return {**next(iter(tried.values())), "tried": {}}
    best = max(ok, key=lambda k: ok[k].get("val_accuracy", -1.0))
    return {
        **ok[best],
        "tried": {
            k: (None if r.get("diverged") else r.get("val_accuracy")) for k, r in tried.items()
        },
    }


def run_optimizers(config, workdir, log, data=None) -> dict:
    """Table 1: every optimizer of ``config.optimizers.names`` on one small task, each with its
    learning rate chosen on a validation split, and a linear model on the inputs and their
    pairwise products trained with SGD (its rate chosen the same way) (``data``: that task's
    data, default loaded here)."""
    o = config.optimizers
    net = optimizer_config(config, "mlp", {"widths": tuple(o.widths)})
    data = train.load_data(net) if data is None else data
    model = train.build_model(net, data)
    rows = {}
    for name in o.names:
        make = OPTIMIZERS[name][1]
        cfg = net
        if name == "lbfgs":  # full batch, as L-BFGS is meant to run (the paper: 350 epochs)
            kw = {"widths": tuple(o.widths)}
            cfg = optimizer_config(
                config, "mlp", kw, epochs=o.lbfgs_epochs, batch_size=len(data.x_train)
            )
        tried = {}
        for lr in learning_rates(config, name):
            res = fit(
                cfg,
                runs.run_dir(workdir, "optimizers", name, _lr_name(lr)),
                data,
                tx=make(lr),
                log=log,
                label=f"[optimizers {name} {_lr_name(lr)}] ",
                model=model,
            )
            tried[_lr_name(lr)] = _row(res, lr)
        rows[name] = _best_on_validation(tried)
    counts = {}
    for pairwise, row, folder in (
        (True, "linear (inputs + pairwise products)", "linear"),
        (False, "linear (inputs only)", "linear_inputs"),
    ):
        linear = optimizer_config(
            config, "pairwise_linear", {"downsample": o.downsample, "pairwise": pairwise}
        )
        linear_model = train.build_model(linear, data)
        counts[folder] = _count(linear_model, data)
        tried = {}
        for lr in o.linear_learning_rates:
            res = fit(
                linear,
                runs.run_dir(workdir, "optimizers", folder, _lr_name(lr)),
                data,
                tx=optax.sgd(lr),
                log=log,
                label=f"[optimizers {folder} {_lr_name(lr)}] ",
                model=linear_model,
            )
            tried[_lr_name(lr)] = _row(res, lr)
        rows[row] = _best_on_validation(tried)
    return {
        "rows": rows,
        "data": f"{data.name} ({data.source}), {len(data.x_train)} training examples "
        f"({len(data.x_val)} more for validation)",
        "num_test": len(data.x_test),
        "params_linear": counts["linear"],
        "params_linear_inputs": counts["linear_inputs"],
        "params_net": _count(model, data),
    }


def _count(model, data) -> int:
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(data.x_train[:1]))
    return int(sum(np.prod(s.shape) for s in jax.tree.leaves(shapes)))


def _row(res, lr):
    if isinstance(res, runs.Diverged):
        return {"diverged": True, "learning_rate": lr, "message": res.message}
    f = res.final
    return {
        "val_accuracy": float(f["val/accuracy"]) if "val/accuracy" in f else None,
        "train_loss": float(f["train/loss"]),
        "test_loss": float(f["test/loss"]),
        "train_accuracy": float(f["train/accuracy"]),
        "test_accuracy": float(f["test/accuracy"]),
        "learning_rate": lr,
    }


# ------------------------------------------------------------------------------ summaries


def by_beta(records: list[dict], key: str) -> dict[float, dict]:
    """``{β: {"mean", "std", "min", "max", "n"}}`` of ``key`` over the runs of each β that
    have it (`runs.aggregate`), by increasing β."""
    stats = runs.aggregate(records, "beta")
    return {b: v[key] for b, v in sorted(stats.items()) if key in v}


@contract
def claims(config, results: dict) -> list[tuple[str, str, str]]:
    """A verdict per claim of the paper this run tests, with the numbers. Accuracies differ
    only beyond their noise (the standard error over seeds plus the test set's sampling
    error), log-volumes beyond their standard error over seeds; claims whose runs diverged
    read "not tested".
    """
    out = results
    cl = []
    if "swissroll" in out:
        every = out["swissroll"]
        unfit = [r for r in every if not r.get("fitted", True) and "test_accuracy" in r]
        fit_runs = [r for r in every if "test_accuracy" in r]
        cl.append(
            (
                f"every network, natural and poisoned, fits the training set (≥ "
                f"{100 * config.fit.accuracy:g} % train accuracy, loss < "
                f"{config.volume.cutoffs[0]:g}; trained to a fit, capped at "
                f"{config.num_epochs} epochs)",
                bool(fit_runs) and not unfit if fit_runs else None,
                (
                    f"{len(fit_runs) - len(unfit)}/{len(fit_runs)} runs fitted"
                    + (
                        "; did not fit: "
                        + ", ".join(
                            f"β={r['beta']:g} seed {r['seed']} (train "
                            f"{100 * r['train_accuracy']:.1f} %, loss {r['train_loss']:.3g})"
                            for r in unfit
                        )
                        if unfit
                        else ""
                    )
                ),
            )
        )
        recs = [r for r in every if r.get("fitted", True)]  # volumes exist only for these
        num_test = out.get("setup", {}).get("num_test") or 0
        test_stats = by_beta(recs, "test_accuracy")
        test = {b: v["mean"] for b, v in test_stats.items()}
        tr = {b: v["mean"] for b, v in by_beta(recs, "train_accuracy").items()}
        c = config.volume.cutoffs[0]
        logv_stats = by_beta(recs, f"log_volume_{c:g}")
        acc_noise = {
            b: seed_noise(v) + (accuracy_noise(v["mean"], num_test) if num_test else 0.0)
            for b, v in test_stats.items()
        }
        betas = sorted(float(b) for b in config.poison.betas)
        gone = [b for b in betas if b not in test]
        missing = f" — not tested: every run of β = {gone} diverged" if gone else ""
        nan = float("nan")
        good_stats = test_stats.get(0.0, {"mean": nan, "min": nan, "n": 0})
        good = good_stats["mean"]
        cl.append(
            (
                "a natural (β = 0) swiss-roll minimum generalizes: ≥ 95 % test accuracy",
                verdict(good_stats["min"] - 0.95, acc_noise.get(0.0, 0.0)),
                f"test accuracy {100 * good:.1f} % (min {100 * good_stats['min']:.1f} %, "
                f"{train.plural(good_stats['n'], 'run')}; paper 98.5 %)" + missing,
            )
        )
        bad = [b for b in betas if b > 0]
        parts = []
        for b in bad:
            parts.append(
                verdict(tr.get(b, nan) - config.fit.accuracy, 0.0) if tr.get(b, nan) < 1 else "yes"
            )
            parts.append(
                verdict(good - test.get(b, nan), acc_noise.get(0.0, 0) + acc_noise.get(b, 0))
            )
        cl.append(
            (
                f"poisoned minima fit the training set (≥ {100 * config.fit.accuracy:g} % train "
                "accuracy) and generalize worse",
                all_of(parts),
                "; ".join(
                    f"β={b:g}: train {100 * tr[b]:.1f} %, test {100 * test[b]:.1f} %"
                    for b in bad
                    if b in test
                )
                + missing,
            )
        )
        seen = [b for b in betas if b in test]
        cl.append(
            (
                "test accuracy decreases as β grows",
                ordered(
                    [test.get(b, nan) for b in betas],
                    [acc_noise.get(b, 0.0) for b in betas],
                    decreasing=True,
                ),
                ", ".join(f"{100 * test[b]:.1f} %" for b in seen)
                + f" for β = {seen} (noise ±"
                + ", ".join(f"{100 * acc_noise[b]:.1f}" for b in seen)
                + " points)"
                + missing,
            )
        )
        lv = [logv_stats[b]["mean"] if b in logv_stats else nan for b in betas]
        cl.append(
            (
                f"log-volume of the basin (loss < {c:g}) is smaller for poisoned minima and "
                "decreases as β grows",
                ordered(lv, [seed_noise(logv_stats.get(b)) for b in betas], decreasing=True),
                ", ".join(f"{v:.1f}" for v in lv)
                + f" for β = {betas} (natural log; mean over seeds)"
                + missing,
            )
        )
        pairs = [
            (r["test_accuracy"], r[f"log_volume_{c:g}"]) for r in recs if f"log_volume_{c:g}" in r
        ]
        if len(pairs) >= 4:
            acc, vol = np.asarray(pairs).T
            corr = float(np.corrcoef(acc, vol)[0, 1])
            noise = 2.0 / math.sqrt(len(pairs))  # ≈ 2 standard errors of r when there is none
            cl.append(
                (
                    "log-volume falls as the test accuracy falls (positive correlation over the "
                    "fitted runs)",
                    verdict(corr, noise),
                    f"Pearson r = {corr:.2f} over {len(pairs)} runs (noise ±{noise:.2f})",
                )
            )
    if "tsne" in out:
        t = out["tsne"]
        claim = (
            f"bad minima that fit the training set (≥ {100 * config.fit.accuracy:g} % train) "
            "and test ≥ 20 points below the natural run are found near every SGD iterate"
        )
        if not t.get("good"):
            cl.append((claim, None, f"not tested: the natural run diverged ({t.get('diverged')})"))
        else:
            good = t["good"]["test_accuracy"]
            ok = [
                b.get("fitted", b["train_accuracy"] >= config.fit.accuracy)
                and b["test_accuracy"] <= good - 0.2
                for b in t["bad"]
            ]
            ratio = [b["distance"] / max(b["norm"], 1e-12) for b in t["bad"]]
            cl.append(
                (
                    claim,
                    bool(ok and all(ok)) if t["bad"] else None,
                    f"{sum(ok)}/{len(ok)} starts ({sum(b.get('fitted', True) for b in t['bad'])} "
                    "fitted); test accuracy "
                    f"{min(100 * b['test_accuracy'] for b in t['bad']):.1f}–"
                    f"{max(100 * b['test_accuracy'] for b in t['bad']):.1f} % vs "
                    f"{100 * good:.1f} %; distance / ‖θ_t‖ {min(ratio):.2f}–{max(ratio):.2f}"
                    if t["bad"]
                    else "not tested: no bad run finished",
                )
            )
    if "rings" in out:
        recs = out["rings"]
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
            cl.append((claim, None, "not tested: every run of a gap diverged"))
        else:
            # recall is measured on the inner ring: about half the test set
            def noise(xs):
                se = float(np.std(xs, ddof=1) / np.sqrt(len(xs))) if len(xs) > 1 else 0.0
                return se + accuracy_noise(float(np.mean(xs)), max(num // 2, 1))

            cl.append(
                (
                    claim,
                    all_of(
                        [
                            verdict(np.mean(w) - 0.95, noise(w)),
                            verdict(np.mean(w) - 0.10 - np.mean(pn), noise(w) + noise(pn)),
                        ]
                    ),
                    f"inner-ring recall {100 * np.mean(w):.1f} % (wide) vs "
                    f"{100 * np.mean(pn):.1f} % (pinched); test accuracy {100 * np.mean(wa):.1f}"
                    f" % vs {100 * np.mean(pa):.1f} %",
                )
            )
    if "optimizers" in out:
        rows = out["optimizers"]["rows"]
        lin = rows["linear (inputs + pairwise products)"].get("test_accuracy", np.nan)
        nets = {
            k: v["test_accuracy"]
            for k, v in rows.items()
            if not k.startswith("linear") and "test_accuracy" in v
        }
        num = out["optimizers"].get("num_test") or 0
        worst = min(nets, key=nets.get) if nets else None
        cl.append(
            (
                "every optimizer generalizes far better (≥ 5 points) than the linear model",
                verdict(
                    nets[worst] - lin - 0.05,
                    accuracy_noise(nets[worst], num) + accuracy_noise(lin, num) if num else 0.0,
                )
                if nets
                else None,
                f"worst optimizer {worst} {100 * nets[worst]:.1f} %, best "
                f"{100 * max(nets.values()):.1f} % vs linear {100 * lin:.1f} % test accuracy "
                f"(paper: ≥ 90.4 % vs 49 %)"
                if nets
                else "not tested: no optimizer run finished",
            )
        )
    return cl


# ---------------------------------------------------------------------------------- figures


@contract
def figures(config, results: dict) -> dict:
    """The study's figures (Figures, nothing saved): decision_boundaries, surfaces, volume
    (swiss roll), tsne, rings — each when its section ran.
    """
    out, data = {}, results.get("figure_data", {})
    if "swissroll" in results:
        s = data["swissroll"]
        if s["boundaries"]:
            out["decision_boundaries"] = boundary_figure(
                s["boundaries"], results["swissroll"], s["data"], seed=config.seed
            )
        if s["surfaces"]:
            out["surfaces"] = surface_figure(s["surfaces"])
        out["volume"] = volume_figure(results["swissroll"], config)
    if "tsne" in results and "tsne" in data:
        out["tsne"] = tsne_figure(data["tsne"])
    if "rings" in data and data["rings"]["boundaries"]:
        out["rings"] = rings_figure(data["rings"])
    return out


def boundary_figure(boundaries, records, data, seed: int = 0):
    """Fig. 6: decision boundaries, one panel per β (the run of ``seed``), titled with its
    generalization gap."""
    fig = plotting.figure((3.2 * len(boundaries), 3.2))
    first = {r["beta"]: r for r in records if r["seed"] == seed and "test_accuracy" in r}
    for i, (beta, (gx, gy, prob)) in enumerate(sorted(boundaries.items())):
        ax = fig.add_subplot(1, len(boundaries), i + 1)
        ax.contourf(gx, gy, prob, levels=[0, 0.5, 1], colors=["#9ecae1", "#fcae91"], alpha=0.8)
        x, y = data
        ax.scatter(x[y == 0, 0], x[y == 0, 1], s=4, c="C0")
        ax.scatter(x[y == 1, 0], x[y == 1, 1], s=4, c="C3")
        r = first.get(beta)
        gap = 100 * (r["train_accuracy"] - r["test_accuracy"]) if r else float("nan")
        ax.set_title(f"β = {beta:g}: gap {gap:.1f} %", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def surface_figure(surfaces):
    """Fig. 3 (bottom): filter-normalised 2-D loss surfaces on one colour scale — log₁₀ of the
    training loss (from 10⁻³), one colourbar, clipped at the 95th percentile of all surfaces —
    so that the basins compare; white contours at loss 0.1 and 1."""
    fig = plotting.figure((4.2 * len(surfaces) + 0.8, 3.6))
    logs = {b: np.log10(np.maximum(np.asarray(s["loss"]), 1e-3)) for b, s in surfaces.items()}
    vmax = max(float(np.percentile(z, 95)) for z in logs.values())
    vmin = min(float(z.min()) for z in logs.values())
    levels = np.linspace(vmin, max(vmax, vmin + 1e-6), 21)
    axes = []
    for i, (beta, s) in enumerate(sorted(surfaces.items())):
        ax = fig.add_subplot(1, len(surfaces), i + 1)
        axes.append(ax)
        g = s["grid"]
        cs = ax.contourf(g, g, np.minimum(logs[beta], levels[-1]).T, levels=levels)
        ax.contour(g, g, np.asarray(s["loss"]).T, levels=[0.1, 1.0], colors="w", linewidths=0.8)
        ax.set_title(("good" if beta == 0 else "bad") + f" minimum (β = {beta:g})", fontsize=9)
        ax.set_xlabel("filter-normalised direction 1")
        if i == 0:
            ax.set_ylabel("filter-normalised direction 2")
    fig.colorbar(cs, ax=axes, label="log₁₀ training loss (one scale)")
    return fig


def volume_figure(records, config):
    """Fig. 5: test accuracy, mean radius and log-volume against β; dashed lines the mean,
    bands min/max over runs."""
    c = config.volume.cutoffs[0]
    panels = [
        ("test_accuracy", "test accuracy"),
        (f"radius_mean_{c:g}", f"mean radius (loss < {c:g})"),
        (f"log_volume_{c:g}", "log-volume (nats)"),
    ]
    fig = plotting.figure((11, 3.2))
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        vals = by_beta(records, key)
        if not vals:
            continue
        b = np.asarray(list(vals))
        ax.plot(b, [v["mean"] for v in vals.values()], "k--o", ms=3)
        ax.fill_between(
            b, [v["min"] for v in vals.values()], [v["max"] for v in vals.values()], alpha=0.3
        )
        ax.set_xlabel("β (anti-generalization)")
        ax.set_ylabel(label)
    return fig


def tsne_figure(t):
    """Fig. 1: natural iterates (red, opacity ∝ epoch), bad minima (blue), final (star)."""
    fig = plotting.figure((4.6, 4.2))
    ax = fig.add_subplot()
    xy, n = np.asarray(t["embedding"]), t["num_iterates"]
    alpha = 0.15 + 0.85 * np.arange(n) / max(n - 1, 1)
    colors = np.zeros((n, 4))
    colors[:, 0], colors[:, 3] = 0.85, alpha
    ax.scatter(xy[:n, 0], xy[:n, 1], s=10, c=colors, label="SGD iterates")
    ax.scatter(xy[n:, 0], xy[n:, 1], s=14, c="C0", label="bad minima")
    ax.scatter(
        xy[n - 1, 0],
        xy[n - 1, 1],
        s=140,
        marker="*",
        c="gold",
        edgecolors="k",
        label="final iterate",
    )
    ax.legend(fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


def rings_figure(r):
    fig = plotting.figure((7, 3.4))
    for i, (gap, ((gx, gy, prob), x, y)) in enumerate(
        sorted(r["boundaries"].items(), reverse=True)
    ):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.contourf(gx, gy, prob, levels=[0, 0.5, 1], colors=["#fcae91", "#9ecae1"], alpha=0.8)
        ax.scatter(x[y == 0, 0], x[y == 0, 1], s=4, c="C3")
        ax.scatter(x[y == 1, 0], x[y == 1, 1], s=4, c="C0")
        ax.set_title(f"{'wide' if i == 0 else 'pinched'} gap {gap:g}", fontsize=9)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


# ----------------------------------------------------------------------------------- report


@contract
def report_markdown(config, results: dict) -> str:
    """``report.md``: per section the setup, this run's table beside the paper's numbers,
    then the claims.
    """
    out = results
    lines = [f"# Huang et al. (2020) — {config.name}", ""]
    if "swissroll" in out:
        s = out["setup"]
        records = out["swissroll"]
        c = config.volume.cutoffs[0]
        lines += [
            "## Swiss roll: natural vs poisoned minima (Figs. 3, 5, 6)",
            "",
            f"Data: {s['data_note']}. Model {config.model.name} {dict(config.model.kwargs)}, "
            f"{config.optim.name} lr {config.optim.learning_rate:g}, gradient clipping "
            f"{config.optim.grad_clip_norm:g}, trained to a fit (training accuracy ≥ "
            f"{100 * config.fit.accuracy:g} % and loss < {c:g} at an evaluation every "
            f"{train.plural(config.eval_every_epochs, 'epoch')}; cap "
            f"{config.num_epochs} epochs), poisoning "
            f"{config.poison.kind} with |D_d| = {config.poison.num_points}, "
            f"{train.plural(config.poison.seeds, 'run')} per β. Basin: training loss "
            "(evaluation mode) below "
            f"{c:g} along {config.volume.num_directions} unit directions in all "
            f"{s['dim']} parameters; radii by bisection to rtol {config.volume.rtol:g}. "
            "Grid radius: the authors' gen-viz radius (cross-entropy "
            f"{config.volume.grid_cutoff:g} "
            f"on a power-5 grid of {config.volume.grid_points} points up to "
            f"{config.volume.grid_max:g}, filter-normalised directions). A run that reaches "
            "the cap without fitting is counted under *did not fit* and has no volume.",
            "",
            "| β | fitted | epochs to fit | train acc % | test acc % | log V (min–max) | "
            "± runs (std) | ± bootstrap | ± delta | mean radius | grid radius |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for b in sorted({r["beta"] for r in records if "test_accuracy" in r}):
            every = [r for r in records if r["beta"] == b and "test_accuracy" in r]
            rs = [r for r in every if r.get("fitted", True)]
            f = lambda k, rs=rs: [r[k] for r in rs if k in r]  # noqa: E731
            lv = f(f"log_volume_{c:g}")
            ep = [r["epochs"] for r in rs if "epochs" in r]
            lines.append(
                f"| {b:g} | {len(rs)}/{len(every)} | "
                + (f"{min(ep)}–{max(ep)}" if ep else "—")
                + f" | {_mean(f('train_accuracy'), 1, 100)} | "
                f"{_mean(f('test_accuracy'), 1, 100)} | "
                + (f"{np.mean(lv):.1f} ({min(lv):.1f}–{max(lv):.1f})" if lv else "—")
                + (f" | {np.std(lv, ddof=1):.0f}" if len(lv) > 1 else " | —")
                + f" | {_mean(f(f'log_volume_bootstrap_{c:g}'), 0)} | "
                f"{_mean(f(f'log_volume_stderr_{c:g}'), 2)} | "
                f"{_mean(f(f'radius_mean_{c:g}'), 3)} | {_mean(f('grid_radius_mean'), 3)} |"
            )
        unfit = [r for r in records if not r.get("fitted", True) and "test_accuracy" in r]
        for r in unfit:
            lines.append(
                f"\nDid not fit: β = {r['beta']:g}, seed {r['seed']}: train "
                f"{100 * r['train_accuracy']:.1f} %, loss {r['train_loss']:.3g}, test "
                f"{100 * r['test_accuracy']:.1f} % after {r.get('epochs', '?')} epochs."
            )
        eff = [r.get(f"effective_directions_{c:g}") for r in records]
        eff = [e for e in eff if e is not None]
        lines += [
            "",
            "**Error bars of log V.** log V = log ω_n + log mean rⁿ with n in the hundreds or "
            "thousands, so the largest radius decides the mean: the effective number of "
            f"directions 1/Σw² (w ∝ rⁿ) is {_mean(eff, 2)} here. The delta method then reads "
            "≈ ±1 whatever the data, because it assumes many directions share the weight; it "
            "does not apply. The spread over runs is the error bar that means something for a "
            "comparison between β; the bootstrap over directions (resampling the radii) says "
            "how much the estimate of one run hangs on its single largest radius.",
        ]
        lines += [
            "",
            "Paper: natural 98.5 % test (Fig. 1); bad minima below 53 %; SVHN "
            "ResNet-18 97.1 % vs 28.2 % with basins ≥ 10,000 orders of magnitude apart.",
            "",
        ]
    if "tsne" in out and out["tsne"].get("good"):
        t = out["tsne"]
        lines += [
            "## Bad minima near the SGD path (Fig. 1)",
            "",
            f"{t['num_iterates']} iterates of the natural run (every "
            f"{train.plural(config.tsne.every_epochs, 'epoch')}); from {len(t['bad'])} of them the "
            f"anti-generalization optimizer (β = {config.tsne.beta:g}, learning rate "
            f"{config.tsne.learning_rate:g}, trained to a fit, cap "
            f"{train.plural(config.tsne.epochs, 'epoch')}). t-SNE after PCA to 50 dimensions.",
            "",
            "| from epoch | fitted | epochs | train acc % | test acc % | distance | ‖θ_t‖ | "
            "distance / ‖θ_t‖ | distance to next iterate |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for b in t["bad"]:
            lines.append(
                f"| {b['from_epoch']} | {'yes' if b.get('fitted', True) else 'no'} | "
                f"{b.get('epochs', '—')} | {100 * b['train_accuracy']:.1f} | "
                f"{100 * b['test_accuracy']:.1f} | {b['distance']:.2f} | {b['norm']:.2f} | "
                f"{b['distance'] / max(b['norm'], 1e-12):.2f} | "
                f"{b['distance_to_next_iterate']:.2f} |"
            )
        lines += [
            "",
            f"Natural run: train {100 * t['good']['train_accuracy']:.1f} %, test "
            f"{100 * t['good']['test_accuracy']:.1f} % (paper: 98.5 %, bad minima < 53 %).",
            "",
        ]
    if "rings" in out:
        lines += [
            "## Pinched rings (Fig. 8)",
            "",
            f"Two thin rings (width {config.rings.width:g}; inner = class 0, "
            f"{config.rings.weights[0]:g}:{config.rings.weights[1]:g} points), "
            f"{config.rings.num_train} training points, "
            f"{train.plural(config.rings.seeds, 'run')} per gap.",
            "",
            "| gap | train acc % | test acc % | inner-ring recall % |",
            "| --- | --- | --- | --- |",
        ]
        for gap in config.rings.gaps:
            rs = [r for r in out["rings"] if r["gap"] == gap]
            if rs:
                lines.append(
                    f"| {gap:g} | {100 * np.mean([r['train_accuracy'] for r in rs]):.1f} | "
                    f"{100 * np.mean([r['test_accuracy'] for r in rs]):.1f} | "
                    f"{100 * np.mean([r['inner_recall'] for r in rs]):.1f} |"
                )
        lines.append("")
    if "optimizers" in out:
        o = out["optimizers"]
        lines += [
            "## Optimizers vs a linear model (Table 1)",
            "",
            f"Data: {o['data']}; MLP {tuple(config.optimizers.widths)} "
            f"({o['params_net']} parameters) for "
            f"{train.plural(config.optimizers.epochs, 'epoch')} at "
            f"batch {config.optimizers.batch_size}, constant learning rates, each chosen on "
            "the validation split among the default × "
            f"{', '.join(f'{x:.3g}' for x in config.optimizers.lr_factors)} (L-BFGS: history "
            "5 with optax's zoom line search, no rate, full batch for "
            f"{config.optimizers.lbfgs_epochs} epochs); linear model on the inputs "
            f"(downsampled ×{config.optimizers.downsample}) and their pairwise "
            f"products ({o['params_linear']} parameters; the paper's comparison) or the inputs "
            f"alone (logistic regression, {o.get('params_linear_inputs', '?')} parameters), "
            "SGD at the best of "
            f"{', '.join(f'{x:g}' for x in config.optimizers.linear_learning_rates)}. Paper: "
            "VGG-13 on CIFAR-10.",
            "",
            "| optimizer | chosen lr | val acc % (each lr tried) | train loss | test loss | "
            "train acc % | test acc % | paper train / test acc % |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, r in o["rows"].items():
            paper = PAPER_TABLE1.get(name)
            pp = f"{paper[2]:.2f} / {paper[3]:.2f}" if paper else "—"
            lr = "line search" if r.get("learning_rate") is None else f"{r['learning_rate']:g}"
            tried = ", ".join(
                f"{k}: " + ("diverged" if v is None else f"{100 * v:.1f}")
                for k, v in r.get("tried", {}).items()
            )
            if r.get("diverged"):
                lines.append(f"| {name} | {lr} | {tried} | diverged | | | | {pp} |")
                continue
            lines.append(
                f"| {name} | {lr} | {tried} | {r['train_loss']:.3f} | "
                f"{r['test_loss']:.3f} | {100 * r['train_accuracy']:.2f} | "
                f"{100 * r['test_accuracy']:.2f} | {pp} |"
            )
        lines += ["", "Paper, linear model: 49 % test (ResNet-18: 92 %).", ""]
    return "\n".join(lines + claims_table(out["claims"]) + [""])


def _mean(values, digits, scale=1.0):
    return f"{scale * np.mean(values):.{digits}f}" if values else "—"


# --------------------------------------------------------------------------------- the study


@contract
def run(config, workdir: str, *, data=None, log=print) -> dict:
    """Runs the study (resuming), writes ``report.md``, ``results.json`` and figures.
    ``data``, when given, is the swiss-roll (or SVHN) data with D_d in ``x_extra``."""
    validate(config)
    with files.workdir_lock(workdir, log=log):
        return _run_locked(config, workdir, data, log)


def _run_locked(config, workdir, data, log) -> dict:
    keys = key_streams(config.seed, "huang/volume", "huang/surface")
    keys = {k.split("/")[1]: v for k, v in keys.items()}
    results: dict = {"config": config.name, "paper": PAPER}
    figure_data: dict = {}
    needs_data = {"swissroll", "tsne"} & set(config.sections)
    if needs_data and data is None:
        data = load_data(config)
    image_data = None  # loaded before any training: a missing data set stops the study now
    if "optimizers" in config.sections:
        o = config.optimizers
        image_data = train.load_data(optimizer_config(config, "mlp", {"widths": tuple(o.widths)}))
    if "swissroll" in config.sections:
        out = run_swissroll(config, workdir, data, keys, log)
        results["swissroll"] = out["records"]
        dims = [r["dim"] for r in out["records"] if "dim" in r]
        results["setup"] = {
            "data_note": f"{data.name} ({data.source}), {len(data.x_train)} train / "
            f"{len(data.x_test)} test",
            "dim": dims[0] if dims else "?",
            "num_test": len(data.x_test),
        }
        figure_data["swissroll"] = {
            "boundaries": out["boundaries"],
            "surfaces": out["surfaces"],
            "data": (data.x_train, data.y_train),
        }
    if "tsne" in config.sections:
        out = run_tsne(config, workdir, data, keys, log)
        results["tsne"] = {
            k: v for k, v in out.items() if k in ("good", "bad", "num_iterates", "diverged")
        }
        if "embedding" in out:
            figure_data["tsne"] = {
                "embedding": out["embedding"],
                "num_iterates": len(out["epochs"]),
            }
    if "rings" in config.sections:
        out = run_rings(config, workdir, keys, log)
        results["rings"] = out["records"]
        figure_data["rings"] = {"boundaries": out["boundaries"]}
    if "optimizers" in config.sections:
        results["optimizers"] = run_optimizers(config, workdir, log, data=image_data)
    results["figure_data"] = figure_data
    return write_outputs(
        config, results, workdir, log, claims=claims, figures=figures, report=report_markdown
    )
