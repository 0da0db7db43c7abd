"""Jastrzębski et al. (2019), Sec. 4: Nudged-SGD (NSGD) against SGD.

NSGD takes the step γη along the top-K Hessian eigenvectors and η elsewhere
(`sharp_minima.optim.nudge`); the directions are recomputed at the start of every epoch by a
`sharp_minima.tracking.EigenTracker` hook that writes them into the optimizer state. With
momentum, the velocity is nudged when applied and kept uncorrected in the buffer (the
authors' Keras optimizer). ``run(config, workdir)`` trains, each in
``workdir/runs/<name>/seed<s>/`` (resumable):

- NSGD for K in ``ks`` at γ = ``gammas[0]``, and for γ in ``gammas`` at K = ``k``;
- SGD at the base η (= NSGD with γ = 1) and at each of ``baseline_learning_rates``;

all with η ÷ 10 after ``plateau_patience`` epochs without a better validation loss
(`sharp_minima.train.ValidationPlateau`). At every evaluation it logs ‖H‖_F from the top
``frobenius_k`` eigenvalues (the paper's top-50 approximation) and the distance from the
initialisation. ``report.md`` has the paper's Table 1 columns — ‖H‖_F at the best
validation epoch / at the end, test accuracy at the best validation epoch, validation
accuracy at epoch ``val_epoch``, final training loss, distance from the initialisation at the
best validation epoch — beside the paper's Tables 1–6, with a verdict per claim.
A run that diverges (NaN) is reported as such, as the paper excludes its diverged γ = 5.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sharp_minima import optim, plotting, tracking, train
from sharp_minima.studies import claims as claims_lib
from sharp_minima.studies import runs
from sharp_minima.studies.claims import (
    Claim,
    all_of,
    ordered,
    seed_noise,
    verdict,
)
from sharp_minima.studies.common import key_streams
from sharp_minima.studies.sections import Section, Study, contract_functions

# The paper's tables (App. C): name -> rows (‖H‖_F best/final, test acc., val acc. (50),
# final loss, distance). ResNet-32 uses K = 5 for the γ rows? The paper does not say which K
# the γ rows use; we run them at K = config.nsgd.k.
_COLUMNS = ("‖H‖_F best/final", "test acc.", "val. acc. (50)", "loss", "dist.")
PAPER = {
    "table1_resnet32_cifar10": {
        "γ=0.01": ("1,018/1,019", "87.3%", "69.3%", "0.01324", "21.08"),
        "γ=0.1": ("931/929", "87.2%", "69.0%", "0.00940", "21.32"),
        "γ=1": ("272/324", "86.6%", "63.0%", "0.01719", "22.90"),
        "γ=5": ("111/83", "85.5%", "52.3%", "1.17170", "25.32"),
        "SGD(0.005)": ("678/946", "86.0%", "49.9%", "0.06221", "18.87"),
        "SGD(0.1)": ("24/25", "88.0%", "84.7%", "0.00100", "50.73"),
    },
    "table2_simplecnn_cifar10": {
        "γ=0.01": ("423/429", "87.1%", "83.5%", "0.00143", "17.63"),
        "γ=0.1": ("294/268", "87.4%", "83.3%", "0.00126", "17.98"),
        "γ=1": ("127/127", "86.6%", "82.3%", "0.00063", "19.76"),
        "γ=5": ("130/129", "85.2%", "79.8%", "0.00160", "20.26"),
        "SGD(0.005)": ("476/516", "85.8%", "78.0%", "0.00862", "14.94"),
        "SGD(0.05)": ("34/26", "87.4%", "85.1%", "0.00008", "35.38"),
    },
    "table5_simplecnn_fashion_mnist": {
        "γ=0.01": ("294/431", "92.6%", "90.3%", "0.05300", "13.73"),
        "γ=0.1": ("257/341", "92.4%", "90.1%", "0.04340", "13.62"),
        "γ=1": ("159/162", "92.5%", "89.8%", "0.04672", "14.85"),
        "γ=5": ("75/101", "91.7%", "89.2%", "0.07820", "14.65"),
    },
    "table6_resnet32_cifar100": {
        "γ=0.01": ("1,315/1,544", "56.9%", "27.8%", "0.18048", "31.37"),
        "γ=0.1": ("797/1,192", "57.4%", "27.0%", "0.29081", "31.18"),
        "γ=1": ("470/720", "54.1%", "25.6%", "0.28299", "32.67"),
        "γ=5": ("240/378", "53.2%", "20.6%", "0.51348", "34.20"),
    },
}


def paper_table(config) -> str | None:
    """The paper's table that matches ``config`` best (None: no matching table)."""
    model, data = config.model.name, config.data.name
    if data == "cifar100":
        return "table6_resnet32_cifar100"
    if data == "fashion_mnist":
        return "table5_simplecnn_fashion_mnist"
    if model == "simplecnn":
        return "table2_simplecnn_cifar10"
    return "table1_resnet32_cifar10"


def validate(config) -> None:
    """Raises `train.ConfigError` for a config without a sensible ``nsgd`` section."""
    if "nsgd" not in config:
        raise train.ConfigError(f"config {config.name!r} has no 'nsgd' section")
    train.validate_config(config)
    num = train.check_numbers
    for path, kw in (
        ("nsgd.ks", dict(low=1, integer=True)),
        ("nsgd.k", dict(low=1, integer=True)),
        ("nsgd.gammas", dict(low=0)),
        ("nsgd.baseline_learning_rates", dict(low=0, low_open=True, nonempty=False)),
        ("nsgd.momentum", dict(low=0, high=1, high_open=True)),
        ("nsgd.plateau_patience", dict(low=1, integer=True)),
        ("nsgd.frobenius_k", dict(low=1, integer=True)),
        ("nsgd.val_epoch", dict(low=1, high=config.num_epochs, integer=True)),
        ("nsgd.seeds", dict(low=1, integer=True)),
        ("nsgd.curvature.fraction", dict(low=0, low_open=True, high=1)),
        ("nsgd.curvature.num_examples", dict(low=0, integer=True)),
        ("nsgd.curvature.batch_size", dict(low=1, integer=True)),
        ("nsgd.curvature.tol", dict(low=0, low_open=True, high=1, high_open=True)),
        ("nsgd.curvature.stochastic", dict(low=0, integer=True)),
    ):
        num(config, path, **kw)
    checks = [
        (
            config.data.validation_fraction > 0,
            "NSGD drops η on a validation plateau: set config.data.validation_fraction > 0",
        ),
        (config.eval_every_epochs == 1, "config.eval_every_epochs must be 1 (per-epoch tables)"),
    ]
    for ok, message in checks:
        if not ok:
            raise train.ConfigError(message)


@dataclasses.dataclass
class RunSpec:
    name: str  # "K5_gamma0.01", "sgd_lr0.05"
    label: str  # the table's row name
    k: int  # 0: plain SGD
    gamma: float
    learning_rate: float


def plan(config) -> list[RunSpec]:
    """The runs (one seed each), in training order, without duplicates."""
    n, lr = config.nsgd, config.optim.learning_rate
    specs = [RunSpec(f"sgd_lr{lr:g}", f"SGD({lr:g})", 0, 1.0, lr)]
    for k in n.ks:
        specs.append(
            RunSpec(f"K{k}_gamma{n.gammas[0]:g}", f"K={k}, γ={n.gammas[0]:g}", k, n.gammas[0], lr)
        )
    for g in n.gammas:
        specs.append(RunSpec(f"K{n.k}_gamma{g:g}", f"γ={g:g}", n.k, g, lr))
    for b in n.baseline_learning_rates:
        specs.append(RunSpec(f"sgd_lr{b:g}", f"SGD({b:g})", 0, 1.0, b))
    out, seen = [], set()
    for s in specs:
        if s.name not in seen:
            seen.add(s.name)
            out.append(s)
    return out


def make_tx(spec: RunSpec, momentum: float) -> optax.GradientTransformation:
    """NSGD (`sharp_minima.optim.nsgd`; SGD for K = 0) with an injectable learning rate (the
    plateau hook lowers it)."""
    if spec.k:
        return optim.nsgd(
            spec.learning_rate,
            gamma=spec.gamma,
            num_directions=spec.k,
            momentum=momentum,
            inject_learning_rate=True,
        )
    sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=spec.learning_rate)
    return optax.chain(optax.trace(momentum), sgd) if momentum else optax.chain(sgd)


def _run_one(spec, config, seed, workdir, data, model, log, keys):
    """Trains one (run, seed); returns its `train.TrainResult` or `runs.Diverged`, and the
    curvature loss in words."""
    changes = {"optim.learning_rate": spec.learning_rate}
    if config.nsgd.momentum:
        changes.update({"optim.name": "momentum", "optim.momentum": config.nsgd.momentum})
    cfg = runs.derive(config, changes, seed=seed)
    n, t = config.nsgd, config.nsgd.curvature
    key = jax.random.fold_in(keys["nsgd/curvature"], zlib.crc32(f"{spec.name}/{seed}".encode()))
    k_dir, k_fro = jax.random.split(key)
    subset = keys["nsgd/subset"]  # the same examples for every run
    fro = tracking.make_tracker(cfg, t, data, model, subset, k_fro, k=n.frobenius_k)
    hooks = [train.Hook(fro, every_epochs=1, at_start=True, name="frobenius")]
    if spec.k:
        directions = tracking.make_tracker(
            cfg, t, data, model, subset, k_dir, k=spec.k, name="directions", set_directions=True
        )
        # Recomputed at the start of every epoch: at step 0, then after each epoch.
        hooks.insert(0, train.Hook(directions, every_epochs=1, at_start=True, name="directions"))
    params0 = train.initial_params(cfg, model, jnp.asarray(data.x_train[:1]))
    hooks.append(train.Hook(tracking.DistanceFromStart(params0), every_epochs=1, name="distance"))
    hooks.append(
        train.Hook(train.ValidationPlateau(n.plateau_patience), every_epochs=1, name="plateau")
    )
    result = runs.train_run(
        train.setup(cfg, data=data, model=model),
        runs.run_dir(workdir, spec.name, f"seed{seed}"),
        tx=make_tx(spec, n.momentum),
        hooks=hooks,
        log=log,
        label=f"[{spec.name} s{seed}] ",
    )
    return result, fro.description


def summarize(records: list[dict], config) -> dict | None:
    """The Table 1 columns of one run from its metrics records."""
    evals = [r for r in records if "val/accuracy" in r and "test/accuracy" in r]
    if not evals:
        return None
    key = f"hessian/frobenius_top{config.nsgd.frobenius_k}"
    best = max(evals, key=lambda r: r["val/accuracy"])
    at = [r for r in evals if r["epoch"] == config.nsgd.val_epoch]
    fro_first = [r for r in records if r.get("step") == 0 and key in r]
    return {
        "fro_best": best.get(key),
        "fro_final": evals[-1].get(key),
        "lambda_max_best": best.get("hessian/lambda_1"),
        "lambda_max_final": evals[-1].get("hessian/lambda_1"),
        "lambda_max_peak": max(r.get("hessian/lambda_1", 0.0) for r in records),
        "test_accuracy_best": best["test/accuracy"],
        "best_epoch": best["epoch"],
        "val_accuracy_at": at[0]["val/accuracy"] if at else None,
        "train_loss_final": evals[-1]["train/loss"],
        "distance_best": best.get("distance"),
        "fro_init": fro_first[0][key] if fro_first else None,
        "curve": [
            (r["epoch"], r["val/accuracy"], r["train/loss"], r.get("hessian/lambda_1"), r.get(key))
            for r in evals
        ],
    }


COLUMNS = (
    "fro_best",
    "fro_final",
    "lambda_max_best",
    "lambda_max_final",
    "lambda_max_peak",
    "test_accuracy_best",
    "val_accuracy_at",
    "train_loss_final",
    "distance_best",
)


def table_row(stats: dict) -> dict:
    """A row of the table from `runs.aggregate`'s statistics of one run over its seeds: the
    mean of each column (None where no seed has it), and how many seeds diverged."""
    row = {"diverged": stats["diverged"], "seeds": stats["runs"]}
    if stats["diverged"] < stats["runs"]:
        row.update({c: stats[c]["mean"] if c in stats else None for c in COLUMNS})
        # one noise unit over seeds (NaN for one seed: unknown), for the claims' noise
        row.update({f"{c}_se": seed_noise(stats.get(c)) for c in COLUMNS})
    return row


J19 = "Jastrzębski et al. 2019"
FASTER_SHARPER = Claim(
    statement="NSGD with γ < 1 optimises faster than SGD at the same η (higher validation "
    "accuracy early) and traverses a sharper region (higher peak λ_max)",
    source=f"{J19}, Sec. 4, Fig. 8 and Table 1",
    quantity="val. accuracy and peak λ_max, NSGD − SGD, both predicted > 0",
    noise=claims_lib.SEEDS,
    min_seeds=3,
)
ENDS_SHARPER = Claim(
    statement="NSGD with γ < 1 ends in a sharper region (higher final ‖H‖_F) than SGD",
    source=f"{J19}, Sec. 4, Table 1 (‖H‖_F column)",
    quantity="final ‖H‖_F, NSGD − SGD, predicted > 0",
    noise=claims_lib.SEEDS,
    min_seeds=3,
)
GENERALISES = Claim(
    statement="NSGD with γ < 1 generalises better than SGD at the same η (test accuracy at "
    "the best validation epoch)",
    source=f"{J19}, Sec. 4, Table 1 (+0.5–0.9 points on CIFAR-10)",
    quantity="test accuracy, NSGD − SGD, predicted > 0",
    noise=claims_lib.SEEDS,
    min_seeds=3,
)
ENDS_WIDER = Claim(
    statement="NSGD with γ > 1 ends in a wider region (lower final ‖H‖_F) than SGD",
    source=f"{J19}, Sec. 4, Table 1",
    quantity="final ‖H‖_F, SGD − NSGD, predicted > 0",
    noise=claims_lib.SEEDS,
    min_seeds=3,
)
K_SHARPER = Claim(
    statement="a larger K reaches a sharper region (peak λ_max grows with K)",
    source=f"{J19}, Sec. 4, Fig. 8",
    quantity="successive peak λ_max, predicted increasing in K",
    noise=claims_lib.SEEDS,
    min_seeds=3,
)


@dataclasses.dataclass
class _Table:
    """The aggregated runs and the noise of their differences (`section_claims`)."""

    rows: dict
    tol: float  # the eigensolver's relative tolerance

    def row(self, name) -> dict:
        return self.rows.get(name, {})

    @staticmethod
    def get(row, col) -> float:
        v = row.get(col)
        return float("nan") if v is None else v

    def noise(self, row, col) -> float:
        v, se = self.get(row, col), row.get(f"{col}_se", float("nan"))
        if not np.isfinite(v):
            return float("nan")
        se = float("nan") if se is None else se
        return se if "accuracy" in col else claims_lib.combined(se, self.tol * abs(v))

    def diff(self, a_row, b_row, col) -> tuple[float, float]:
        """a − b, and the noise of the difference."""
        return self.get(a_row, col) - self.get(b_row, col), claims_lib.combined(
            self.noise(a_row, col), self.noise(b_row, col)
        )

    def seeds(self, *names) -> int:
        return min((self.row(m).get("seeds", 0) for m in names), default=0)

    def missing(self, *names) -> str:
        gone = [m for m in names if "test_accuracy_best" not in self.row(m)]
        return f"; not tested: {', '.join(gone)} diverged or did not run" if gone else ""


def section_claims(config, results: dict) -> list:
    """The declared claims of Sec. 4 (`FASTER_SHARPER` … `K_SHARPER`), tested on the
    aggregated table. A difference counts only beyond 2 noise units: the standard error over
    seeds (t-quantile; each claim needs ≥ 3 seeds), with the eigensolver's tolerance
    (``tol`` × the value) for λ_max and ‖H‖_F. Accuracies are differences of two arms
    scored on the same validation / test examples, so the split's sampling error is paired
    and cancels to first order: their noise is the spread over seeds alone (an unpaired
    binomial error on each arm would overstate it). A claim whose runs diverged reads
    "not tested".
    """
    n = config.nsgd
    t = _Table(results["runs"], n.curvature.tol)
    sgd_name = f"sgd_lr{config.optim.learning_rate:g}"
    small = [(g, f"K{n.k}_gamma{g:g}") for g in n.gammas if g < 1]
    big = [(g, f"K{n.k}_gamma{g:g}") for g in n.gammas if g > 1]
    out = _small_gamma_claims(config, t, small, sgd_name) if small else []
    if big:
        sgd = t.row(sgd_name)
        parts = [verdict(*t.diff(sgd, t.row(m), "fro_final")) for _, m in big]
        out.append(
            ENDS_WIDER.given(
                all_of(parts),
                "; ".join(f"γ={g:g}: {_fmt(t.row(m).get('fro_final'), '.4g')}" for g, m in big)
                + f"; SGD: {_fmt(sgd.get('fro_final'), '.4g')}"
                + t.missing(*[m for _, m in big], sgd_name),
                seeds=t.seeds(*[m for _, m in big], sgd_name),
            )
        )
    ks = [(k, f"K{k}_gamma{n.gammas[0]:g}") for k in sorted(n.ks)]
    if len(ks) >= 2:
        rows = [t.row(m) for _, m in ks]
        v = ordered(
            [t.get(r, "lambda_max_peak") for r in rows],
            [t.noise(r, "lambda_max_peak") for r in rows],
            decreasing=False,
        )
        out.append(
            K_SHARPER.given(
                v,
                f"γ={n.gammas[0]:g}: "
                + ", ".join(
                    f"K={k}: {_fmt(r.get('lambda_max_peak'), '.4g')}" for (k, _), r in zip(ks, rows)
                )
                + t.missing(*[m for _, m in ks]),
                seeds=t.seeds(*[m for _, m in ks]),
            )
        )
    return out


def _small_gamma_claims(config, t: _Table, small, sgd_name) -> list:
    """`FASTER_SHARPER`, `ENDS_SHARPER` and `GENERALISES`: each γ < 1 against SGD."""
    n, lr = config.nsgd, config.optim.learning_rate
    sgd, names = t.row(sgd_name), [m for _, m in small]
    seeds, missing = t.seeds(*names, sgd_name), t.missing(*names, sgd_name)
    parts, nums = [], []
    for g, m in small:
        v = t.row(m)
        parts += [
            verdict(*t.diff(v, sgd, "val_accuracy_at")),
            verdict(*t.diff(v, sgd, "lambda_max_peak")),
        ]
        nums.append(
            f"γ={g:g}: val. acc. at epoch {n.val_epoch} {_fmt(v.get('val_accuracy_at'), '.2%')}"
            f", peak λ_max {_fmt(v.get('lambda_max_peak'), '.3g')}"
        )
    nums.append(
        f"SGD({lr:g}): {_fmt(sgd.get('val_accuracy_at'), '.2%')}, peak λ_max "
        f"{_fmt(sgd.get('lambda_max_peak'), '.3g')}"
    )
    faster = FASTER_SHARPER.given(
        all_of(parts), f"K={n.k}: " + "; ".join(nums) + missing, seeds=seeds
    )
    parts = [verdict(*t.diff(t.row(m), sgd, "fro_final")) for _, m in small]
    sharper = ENDS_SHARPER.given(
        all_of(parts),
        f"‖H‖_F top-{n.frobenius_k}: "
        + "; ".join(f"γ={g:g}: {_fmt(t.row(m).get('fro_final'), '.4g')}" for g, m in small)
        + f"; SGD: {_fmt(sgd.get('fro_final'), '.4g')}"
        + missing,
        seeds=seeds,
    )
    parts = [verdict(*t.diff(t.row(m), sgd, "test_accuracy_best")) for _, m in small]
    generalises = GENERALISES.given(
        all_of(parts),
        "; ".join(f"γ={g:g}: {_fmt(t.row(m).get('test_accuracy_best'), '.2%')}" for g, m in small)
        + f"; SGD: {_fmt(sgd.get('test_accuracy_best'), '.2%')} (noise: spread over seeds; both "
        "arms scored on the same test set)" + missing,
        seeds=seeds,
    )
    return [faster, sharper, generalises]


def _fmt(v, fmt):
    return "—" if v is None else format(v, fmt)


def header(config, results: dict) -> list[str]:
    """The scale of this run and the paper's."""
    n, data = config.nsgd, results["data"]
    mom = f", momentum {n.momentum:g} (velocity nudged when applied)" if n.momentum else ""
    return [
        f"**Scale.** {config.model.name} {dict(config.model.kwargs)} on {data['num_train']} "
        f"{data['name']} training examples ({data['source']}), {data['num_val']} for "
        "validation; base "
        f"η = {config.optim.learning_rate:g}, S = {config.batch_size}{mom}, "
        f"{train.plural(config.num_epochs, 'epoch')}, η ÷ 10 after "
        f"{train.plural(n.plateau_patience, 'epoch')} without a better validation loss; "
        f"{train.plural(n.seeds, 'seed')} (mean). NSGD's directions: top K eigenvectors at the "
        "start of every "
        f"epoch; ‖H‖_F from the top {n.frobenius_k}; curvature loss: "
        f"{results['curvature_loss']}. The paper: "
        "ResNet-32 / SimpleCNN on CIFAR-10 (Fashion-MNIST, CIFAR-100), η = 0.01, 200+ epochs, "
        "plateau patience 100 epochs, top-50 ‖H‖_F, 2 seeds.",
    ]


def report(config, results: dict) -> list[str]:
    """This run's Table 1 columns and the paper's tables."""
    n = config.nsgd
    specs, table = plan(config), results["runs"]
    lines = [
        f"## Table 1 columns (here; mean over {train.plural(n.seeds, 'seed')})",
        "",
        f"| run | ‖H‖_F best/final | test acc. (best val.) | val. acc. ({n.val_epoch}) | loss | "
        "dist. | λ_max peak |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for spec in specs:
        v = table.get(spec.name, {})
        if "test_accuracy_best" not in v:
            lines.append(
                f"| {spec.label} | diverged ({v.get('diverged', '?')}/"
                f"{train.plural(n.seeds, 'seed')}) | | | | | |"
            )
            continue
        pct = lambda x: "—" if x is None else f"{100 * x:.2f}%"  # noqa: E731
        lines.append(
            f"| {spec.label} | {_fmt(v['fro_best'], '.4g')}/{_fmt(v['fro_final'], '.4g')} | "
            f"{pct(v['test_accuracy_best'])} | {pct(v['val_accuracy_at'])} | "
            f"{_fmt(v['train_loss_final'], '.5f')} | {_fmt(v['distance_best'], '.2f')} | "
            f"{_fmt(v['lambda_max_peak'], '.4g')} |"
        )
    for name, rows in PAPER.items():
        mark = " (the closest to this config)" if name == paper_table(config) else ""
        lines += [
            "",
            f"## Paper, {name.replace('_', ' ')}{mark}",
            "",
            "| run | " + " | ".join(_COLUMNS) + " |",
            "|" + " --- |" * (len(_COLUMNS) + 1),
        ]
        lines += [f"| {row} | " + " | ".join(cells) + " |" for row, cells in rows.items()]
    return lines


def section_figures(config, results: dict) -> dict:
    """``nsgd_curves`` and ``nsgd_k``."""
    n, specs, curves = config.nsgd, plan(config), results["curves"]
    sgd = f"sgd_lr{config.optim.learning_rate:g}"
    groups = [
        ("nsgd_curves", [s for s in specs if s.k == n.k or s.name == sgd]),
        ("nsgd_k", [s for s in specs if (s.k and s.gamma == n.gammas[0]) or s.name == sgd]),
    ]
    out = {}
    for name, group in groups:
        fig = plotting.figure((15, 4))
        axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
        for i, spec in enumerate(group):
            curve = curves.get(spec.name)
            if not curve:
                continue
            ep, val, loss, lam, fro = map(np.asarray, zip(*curve))
            # SGD in black, dotted and on top: NSGD with γ = 1 is SGD and would hide it
            color = "k" if not spec.k else f"C{i}"
            top = {} if spec.k else {"ls": ":", "lw": 2.0, "zorder": 5}
            axes[0].plot(ep, 100 * val, color=color, label=spec.label, **top)
            axes[1].plot(ep, loss, color=color, **top)
            axes[2].plot(ep, lam.astype(float), color=color, **top)
            axes[2].plot(ep, fro.astype(float), color=color, ls="--", lw=0.8)
        axes[0].set_title("validation accuracy (%)")
        axes[1].set_title("training loss")
        axes[1].set_yscale("log")
        axes[2].set_title(f"λ_max (solid), ‖H‖_F top-{n.frobenius_k} (dashed)")
        axes[2].set_yscale("log")
        for ax in axes:
            ax.set_xlabel("epoch")
        axes[0].legend(fontsize=8)
        out[name] = fig
    return out


def section_run(ctx) -> dict:
    """Trains every run and seed; the Table 1 columns from their metrics."""
    config, workdir, data, log = ctx.config, ctx.workdir, ctx.data, ctx.log
    if config.batch_size > len(data.x_train):
        raise train.ConfigError(
            f"config.batch_size={config.batch_size} exceeds the {len(data.x_train)} training "
            "examples"
        )
    n = config.nsgd
    model = train.build_model(config, data)  # one model for every run
    keys = key_streams(config.seed, "nsgd/subset", "nsgd/curvature")
    records, curves, description = [], {}, ""
    for spec in plan(config):
        for seed in range(config.seed, config.seed + n.seeds):
            result, description = _run_one(spec, config, seed, workdir, data, model, log, keys)
            row = None
            if not isinstance(result, runs.Diverged):
                metrics = runs.read_metrics(runs.run_dir(workdir, spec.name, f"seed{seed}"))
                row = summarize(metrics, config)
            if row is None:
                records.append({"run": spec.name, "seed": seed, "diverged": True})
                continue
            curves.setdefault(spec.name, row.pop("curve"))  # the first seed's curve
            records.append({"run": spec.name, "seed": seed, **row})
    table = {name: table_row(stats) for name, stats in runs.aggregate(records, "run").items()}
    results = {
        "config": config.name,
        "curvature_loss": description,
        "data": {
            "name": data.name,
            "source": data.source,
            "num_train": len(data.x_train),
            "num_val": len(data.x_val),
            "num_test": len(data.x_test),
        },
        "runs": table,
        "curves": curves,
    }
    return results


STUDY = Study(
    name="nudged_sgd",
    title=lambda config: f"Jastrzębski et al. (2019), Sec. 4: Nudged-SGD — {config.name}",
    sections=(
        Section(
            name="nudged_sgd",
            title="Nudged-SGD against SGD",
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
    run="""Runs the study (resuming), writes ``report.md``, ``results.json`` and figures.""",
    claims="""The claims of Sec. 4, tested on the aggregated table. A difference counts only beyond
    its noise: the eigensolver's tolerance (``tol`` × the value) and the standard error over
    seeds for λ_max and ‖H‖_F; the sampling error of the split and the standard error over
    seeds for accuracies. A claim whose runs diverged reads "not tested".""",
    figures="""``nsgd_curves`` (the γ sweep) and ``nsgd_k`` (the K sweep) against SGD: validation
    accuracy, training loss, λ_max and ‖H‖_F by epoch (Figures, nothing saved).""",
    report_markdown="""``report.md``: the scale, the claims, this run's Table 1 columns, the
    paper's tables.""",
)
