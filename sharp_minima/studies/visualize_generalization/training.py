"""What the sections of Huang et al.'s study share: the data with D_d (unseen data of the
same distribution), the runs' configs, training to a fit (natural or poisoned), the iterates
hook of the t-SNE, decision boundaries, and the checks of the blocks several sections read."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sharp_minima import landscape, losses, train
from sharp_minima import tree_util as tu
from sharp_minima.data import Dataset, embedded
from sharp_minima.studies import runs

POISONS = ("anti_generalization", "label_flip")


def validate(config) -> None:
    """The blocks several sections read (``poison``, ``volume``, ``surface``, ``fit``) and
    the training fields; each section checks its own block.

    Raises:
      sharp_minima.train.ConfigError: naming the field.
    """
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
        ("fit.accuracy", dict(low=0, high=1)),  # 0: the loss cutoff alone
    ):
        train.check_numbers(config, path, **kw)
    p = config.poison
    if p.kind not in POISONS:
        raise train.ConfigError(f"config.poison.kind must be one of {POISONS}, got {p.kind!r}")
    if 0.0 not in p.betas:
        raise train.ConfigError(
            f"config.poison.betas must include 0 (the good minimum), got {p.betas}"
        )


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


def fit_phrase(config, every: int, cap: int) -> str:
    """How a run trains to a fit, for a report: the `fit_targets`, how often they are
    checked, and the cap."""
    return (
        f"trained to a fit (training accuracy ≥ {100 * config.fit.accuracy:g} % and loss < "
        f"{config.volume.cutoffs[0]:g} at an evaluation every {train.plural(every, 'epoch')}; "
        f"cap {cap} epochs)"
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


def iterates_hook(config):
    """`Iterates` every ``tsne.every_epochs`` epochs and at the start."""
    every = config.tsne.every_epochs
    return train.Hook(Iterates(), every_epochs=every, at_start=True, name="iterates")


def load_iterates(workdir: str) -> tuple[np.ndarray, np.ndarray]:
    """``(epochs, flat params)`` saved by `Iterates`, in step order."""
    arrays = [a for _, a in runs.read_arrays(workdir, "iterates")]
    return np.asarray([int(a["epoch"]) for a in arrays]), np.stack([a["params"] for a in arrays])


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


# ---------------------------------------------------------------------------- measurements


class Geometry:
    """The landscapes of one model (held by the study so every minimum reuses the kernels):
    basin radii and log-volumes, the gen-viz grid radius, filter-normalised surfaces."""

    def __init__(self, model, config):
        v = config.volume
        self.loss = losses.evaluation_loss(model)
        self.basins = landscape.Landscape(self.loss, wrt="^params/", chunk_size=v.chunk_size)
        self.surfaces = landscape.Landscape(
            losses.evaluation_metrics(model), wrt="^params/", chunk_size=v.chunk_size
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
            # directions ≈ 1): the error is then undetermined (NaN, `BasinVolume`).
            out.update(
                {
                    f"log_volume_{c:g}": vol.log_volume,
                    f"log_volume_stderr_{c:g}": vol.stderr,
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
        """The filter-normalised 2-D surface of loss and accuracy around ``variables``."""
        s = config.surface
        d1, d2 = landscape.orthogonal_pair(key, variables, "filter", wrt="^params/")
        grid = np.linspace(-s.extent, s.extent, s.points)
        out = self.surfaces.slice(variables, batches, [d1, d2], [grid, grid], weights=weights)
        return {"grid": grid, **out}


def measure_key(config, result) -> dict:
    """What a run's measurements depend on besides its parameters: its training step and the
    volume and surface settings."""
    return {
        "step": int(result.state.step),
        "volume": config.volume.to_dict(),
        "surface": config.surface.to_dict(),
    }
