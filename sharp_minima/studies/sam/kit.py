"""What the sections of the SAM study share: the arms (a name and the config fields it
changes), training one arm and seed with the trainer (λ_max tracked along the way), the
early-stopped test accuracy read back from a run's metrics, paired gains over seeds, and
small helpers of the tables and figures."""

from __future__ import annotations

import dataclasses
import zlib

import jax
import numpy as np

from sharp_minima import hessian, losses, tracking, train
from sharp_minima.studies import claims as claims_lib
from sharp_minima.studies import runs
from sharp_minima.studies.common import key_streams


@dataclasses.dataclass(frozen=True)
class Arm:
    """One training recipe of the study: ``changes`` to the study's config (dotted paths).
    Runs of the same name share their folder, so an arm two sections use trains once."""

    name: str  # the run folder's name, e.g. "sam_rho0.5"
    label: str  # the tables' and figures' name, e.g. "SAM ρ=0.5"
    changes: tuple = ()  # ((dotted path, value), ...)

    def config(self, config, seed: int):
        return runs.derive(config, dict(self.changes), seed=seed)


def sgd() -> Arm:
    return Arm("sgd", "SGD")


def sam(rho: float, *, adaptive: bool = False, group_size: int = 0, prefix: str = "") -> Arm:
    """SAM (ASAM with ``adaptive``; m-sharpness with ``group_size``) at radius ``rho``."""
    kind = "asam" if adaptive else "sam"
    name = f"{prefix}{kind}_rho{rho:g}" + (f"_m{group_size}" if group_size else "")
    label = f"{kind.upper()} ρ={rho:g}" + (f", m={group_size}" if group_size else "")
    changes = (("sam.rho", float(rho)), ("sam.adaptive", adaptive), ("sam.group_size", group_size))
    return Arm(name, label, changes)


def seeds(config) -> list[int]:
    """The seeds of every arm: ``seed, seed + 1, ...`` (``sam_study.seeds`` of them)."""
    return list(range(config.seed, config.seed + config.sam_study.seeds))


def prepare(config, data):
    """The study's model (every section but ``eos`` trains it)."""
    return train.build_model(config, data)


def curvature_subset(config, data) -> tracking.Subset:
    """The first ``curvature_examples`` of a fixed random draw of the training set: the same
    examples for every run on ``data``."""
    s = config.sam_study
    key = key_streams(config.seed, "sam/subset")["sam/subset"]
    return tracking.Subset(
        key,
        data.x_train,
        data.y_train,
        num_examples=min(s.curvature_examples, len(data.x_train)),
        batch_size=s.curvature_batch_size,
    )


def tracker(config, curv, subset, name: str, seed: int, *, k: int = 1):
    """The top-``k`` `tracking.EigenTracker` of one run: its own Lanczos key, the shared
    ``curv`` (one `hessian.Curvature` per model and subset, compiled once for every run)."""
    key = key_streams(config.seed, "sam/lanczos")["sam/lanczos"]
    key = jax.random.fold_in(key, zlib.crc32(f"{name}/{seed}".encode()))
    return tracking.EigenTracker(
        curv,
        subset,
        key=key,
        k=k,
        tol=config.sam_study.curvature.tol,
        description="mean cross-entropy, no regulariser, dropout off",
    )


@dataclasses.dataclass
class Runs:
    """Training the arms of one section on one data set and model: λ_max tracked every
    ``every_epochs`` epochs (default ``curvature.every_epochs``) and at the start, on
    ``subset`` (default `curvature_subset`), with one `hessian.Curvature` for every run."""

    ctx: object
    data: object
    model: object
    subset: tracking.Subset | None = None
    every_epochs: int | None = None

    def __post_init__(self):
        if self.subset is None:
            self.subset = curvature_subset(self.ctx.config, self.data)
        self.curvature = hessian.Curvature(losses.evaluation_loss(self.model), wrt="^params/")

    def train(self, arm: Arm, seed: int, *, every_epochs=None, **kw):
        """Trains (or resumes, or reads back) ``arm`` at ``seed`` in
        ``runs/<arm>/seed<seed>``, λ_max tracked every ``every_epochs`` (default: the
        bench's); ``kw`` goes to `sharp_minima.train.train` (``init_variables``).

        Returns:
          ``(result or runs.Diverged, folder)``.
        """
        ctx = self.ctx
        every = every_epochs or self.every_epochs or ctx.config.sam_study.curvature.every_epochs
        track = tracker(ctx.config, self.curvature, self.subset, arm.name, seed)
        folder = runs.run_dir(ctx.workdir, arm.name, f"seed{seed}")
        result = runs.train_run(
            train.setup(arm.config(ctx.config, seed), data=self.data, model=self.model),
            folder,
            hooks=[train.Hook(track, every_epochs=every, at_start=True, name="hessian")],
            log=ctx.log,
            label=f"[{arm.name} s{seed}] ",
            **kw,
        )
        return result, folder

    def train_all(self, arms, *, measure=None) -> dict:
        """Every arm at every seed: ``{arm name: {"label", "seeds": {seed: summary or
        None}}}`` (None: the run diverged). ``measure(arm, seed, result) -> dict`` adds to a
        summary (measurements of the final parameters)."""
        out = {}
        for arm in arms:
            per_seed = {}
            for seed in seeds(self.ctx.config):
                result, folder = self.train(arm, seed)
                summary = None if isinstance(result, runs.Diverged) else summarize(folder)
                if summary is not None and measure is not None:
                    summary.update(measure(arm, seed, result))
                per_seed[str(seed)] = summary
            out[arm.name] = {"label": arm.label, "seeds": per_seed}
        return out


def summarize(folder: str, *, epoch_offset: int = 0) -> dict | None:
    """A run's early-stopped numbers from its ``metrics.jsonl``: the test accuracy at the
    evaluation of the best validation accuracy (the first, on ties), the final test and
    training accuracies, the final λ_max, and the curves by epoch (``epoch_offset`` added:
    a run continued from another's parameters). None when no evaluation was logged."""
    records = runs.read_metrics(folder)
    evals = [r for r in records if "val/accuracy" in r and "test/accuracy" in r]
    if not evals:
        return None
    best = max(evals, key=lambda r: r["val/accuracy"])
    lam = [
        (r["epoch"] + epoch_offset, r["hessian/lambda_1"])
        for r in records
        if "hessian/lambda_1" in r
    ]
    return {
        "test_accuracy": best["test/accuracy"],
        "best_epoch": best["epoch"] + epoch_offset,
        "final_test_accuracy": evals[-1]["test/accuracy"],
        "final_train_accuracy": evals[-1]["train/accuracy"],
        "final_lambda_max": lam[-1][1] if lam else None,
        "curve": {
            "epoch": [r["epoch"] + epoch_offset for r in evals],
            "test_accuracy": [r["test/accuracy"] for r in evals],
            "train_accuracy": [r["train/accuracy"] for r in evals],
        },
        "lambda_curve": {"epoch": [e for e, _ in lam], "value": [v for _, v in lam]},
    }


def per_seed(arm: dict, field: str) -> dict:
    """``{seed: value}`` of ``field`` over an arm's seeds that ran (NaN where it diverged)."""
    return {
        s: (float("nan") if v is None or v.get(field) is None else float(v[field]))
        for s, v in arm["seeds"].items()
    }


def stat(arm: dict, field: str) -> dict | None:
    """`claims.seed_stat` of ``field`` over an arm's seeds."""
    return claims_lib.seed_stat(list(per_seed(arm, field).values()))


def paired(a: dict, b: dict, field: str, *, transform=None) -> tuple[float, float, int]:
    """The mean over seeds of ``field``'s difference a − b (of ``transform(value)`` if
    given), each seed paired with itself (same initialisation, same data order), its noise
    unit (`claims.seed_noise`) and the number of seeds both arms have."""
    fa, fb = per_seed(a, field), per_seed(b, field)
    f = transform or (lambda x: x)
    with np.errstate(all="ignore"):
        diffs = [f(fa[s]) - f(fb[s]) for s in fa if s in fb]
    st = claims_lib.seed_stat(diffs)
    if st is None:
        return float("nan"), float("nan"), 0
    return st["mean"], claims_lib.seed_noise(st), st["n"]


def mean_pm(arm: dict, field: str, scale: float = 100.0, digits: int = 1) -> str:
    """``"61.2 ± 0.8"``: the mean over seeds and the standard error (× ``scale``)."""
    st = stat(arm, field)
    if st is None:
        return "diverged"
    se = st["std"] / np.sqrt(st["n"]) if st["n"] > 1 else float("nan")
    se_txt = "" if not np.isfinite(se) else f" ± {scale * se:.{digits}f}"
    return f"{scale * st['mean']:.{digits}f}{se_txt}"


def mean_curve(arm: dict, key: str, field: str):
    """The mean over seeds of a curve (``key`` ∈ {"curve", "lambda_curve"}), on the epochs all
    seeds share: ``(epochs, mean)`` or None."""
    curves = [v[key] for v in arm["seeds"].values() if v is not None]
    if not curves:
        return None
    epochs = sorted(set.intersection(*(set(c["epoch"]) for c in curves)))
    if not epochs:
        return None
    values = [[dict(zip(c["epoch"], c[field]))[e] for e in epochs] for c in curves]
    return np.asarray(epochs), np.mean(np.asarray(values, float), axis=0)
