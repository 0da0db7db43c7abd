"""1. Bad minima near the SGD path (Huang et al. 2020, Fig. 1): the natural run's iterates
and the bad minima the anti-generalization optimizer finds when started from some of them,
embedded with t-SNE after PCA to 50 dimensions."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sharp_minima import plotting, train
from sharp_minima import tree_util as tu
from sharp_minima.studies import runs
from sharp_minima.studies.sections import Section
from sharp_minima.studies.visualize_generalization import training

# The paper's bad minima test below 53 % against 98.5 %: we ask ≥ 20 points below the
# natural run.
TEST_GAP = 0.2


def validate(config) -> None:
    """Checks ``tsne``."""
    for path, kw in (
        ("tsne.every_epochs", dict(low=1, integer=True)),
        ("tsne.num_starts", dict(low=1, integer=True)),
        ("tsne.beta", dict(low=0, low_open=True, high=1, high_open=True)),
        ("tsne.epochs", dict(low=1, integer=True)),
        ("tsne.learning_rate", dict(low=0, low_open=True)),
        ("tsne.perplexity", dict(low=0, low_open=True)),
    ):
        train.check_numbers(config, path, **kw)


def run(ctx) -> dict:
    """Bad minima found from the natural run's iterates (Fig. 1)."""
    config, data, log = ctx.config, ctx.data, ctx.log
    t, p = config.tsne, config.poison
    n_t = len(data.x_train)
    natural = runs.run_dir(ctx.workdir, "swissroll", f"beta0/seed{config.seed}")
    cfg = training.run_config(config, config.seed, n_train=n_t, to_fit=True)
    model = train.build_model(cfg, data)
    hooks = [training.iterates_hook(config)]
    good = training.fit(
        cfg, natural, data, hooks=hooks, log=log, label="[tsne natural] ", n_t=n_t, model=model
    )
    if isinstance(good, runs.Diverged):
        return {"diverged": good.message, "good": None, "bad": []}
    epochs, iterates = training.load_iterates(natural)
    unravel = tu.ravel(good.state.params)[1]
    starts = np.unique(np.linspace(0, len(iterates) - 1, t.num_starts).round().astype(int))
    run_data = data if p.kind == "label_flip" else training.poisoned(data, p.num_points)
    bad = []
    for i in starts:
        bcfg = training.run_config(
            config,
            config.seed,
            epochs=t.epochs,
            n_train=len(run_data.x_train),
            learning_rate=t.learning_rate,
            to_fit=True,
        )
        res = training.fit(
            bcfg,
            runs.run_dir(ctx.workdir, "tsne", f"start{int(epochs[i]):05d}"),
            run_data,
            beta=t.beta,
            kind=p.kind,
            num_points=p.num_points,
            log=log,
            label=f"[tsne bad from epoch {int(epochs[i])}] ",
            init_variables={"params": unravel(jnp.asarray(iterates[i]))},
            n_t=n_t,
            model=model,
        )
        if not isinstance(res, runs.Diverged):
            bad.append(_bad_minimum(bcfg, res, epochs, iterates, i, len(run_data.x_train)))
    points = np.concatenate([iterates, np.stack([b["params"] for b in bad])]) if bad else iterates
    cache = runs.Cache(runs.run_dir(ctx.workdir, "tsne", "cache.json"))
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
        "good": {
            "train_accuracy": float(good.final["train/accuracy"]),
            "test_accuracy": float(good.final["test/accuracy"]),
        },
        "bad": [{k: v for k, v in b.items() if k != "params"} for b in bad],
        "num_iterates": len(iterates),
        "embedding": emb,
    }


def _bad_minimum(cfg, res, epochs, iterates, i: int, num_examples: int) -> dict:
    flat = np.asarray(tu.ravel(res.state.params)[0])
    return {
        "from_epoch": int(epochs[i]),
        "fitted": training.fitted(cfg, res),
        "epochs": training.epochs_trained(cfg, res, num_examples),
        "train_accuracy": float(res.final["train/accuracy"]),
        "test_accuracy": float(res.final["test/accuracy"]),
        "distance": float(np.linalg.norm(flat - iterates[i])),
        "distance_to_next_iterate": float(
            np.linalg.norm(iterates[min(i + 1, len(iterates) - 1)] - iterates[i])
        ),
        "norm": float(np.linalg.norm(iterates[i])),
        "params": flat,
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


def claims(config, res) -> list:
    claim = (
        f"bad minima that fit the training set (≥ {100 * config.fit.accuracy:g} % train) "
        "and test ≥ 20 points below the natural run are found near every SGD iterate"
    )
    if not res.get("good"):
        return [(claim, None, f"not tested: the natural run diverged ({res.get('diverged')})")]
    if not res["bad"]:
        return [(claim, None, "not tested: no bad run finished")]
    good, bad = res["good"]["test_accuracy"], res["bad"]
    ok = [
        b.get("fitted", b["train_accuracy"] >= config.fit.accuracy)
        and b["test_accuracy"] <= good - TEST_GAP
        for b in bad
    ]
    ratio = [b["distance"] / max(b["norm"], 1e-12) for b in bad]
    return [
        (
            claim,
            bool(ok and all(ok)),
            f"{sum(ok)}/{len(ok)} starts ({sum(b.get('fitted', True) for b in bad)} "
            "fitted); test accuracy "
            f"{min(100 * b['test_accuracy'] for b in bad):.1f}–"
            f"{max(100 * b['test_accuracy'] for b in bad):.1f} % vs "
            f"{100 * good:.1f} %; distance / ‖θ_t‖ {min(ratio):.2f}–{max(ratio):.2f}",
        )
    ]


def report(config, res) -> list:
    if not res.get("good"):
        return [f"The natural run diverged ({res.get('diverged')}): no iterates to search from."]
    lines = [
        f"{res['num_iterates']} iterates of the natural run (every "
        f"{train.plural(config.tsne.every_epochs, 'epoch')}); from {len(res['bad'])} of them the "
        f"anti-generalization optimizer (β = {config.tsne.beta:g}, learning rate "
        f"{config.tsne.learning_rate:g}, trained to a fit, cap "
        f"{train.plural(config.tsne.epochs, 'epoch')}). t-SNE after PCA to 50 dimensions.",
        "",
        "| from epoch | fitted | epochs | train acc % | test acc % | distance | ‖θ_t‖ | "
        "distance / ‖θ_t‖ | distance to next iterate |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for b in res["bad"]:
        lines.append(
            f"| {b['from_epoch']} | {'yes' if b.get('fitted', True) else 'no'} | "
            f"{b.get('epochs', '—')} | {100 * b['train_accuracy']:.1f} | "
            f"{100 * b['test_accuracy']:.1f} | {b['distance']:.2f} | {b['norm']:.2f} | "
            f"{b['distance'] / max(b['norm'], 1e-12):.2f} | "
            f"{b['distance_to_next_iterate']:.2f} |"
        )
    return lines + [
        "",
        f"Natural run: train {100 * res['good']['train_accuracy']:.1f} %, test "
        f"{100 * res['good']['test_accuracy']:.1f} % (paper: 98.5 %, bad minima < 53 %).",
    ]


def figures(config, res) -> dict:
    """Fig. 1: natural iterates (red, opacity ∝ epoch), bad minima (blue), final (star)."""
    if "embedding" not in res:
        return {}
    fig = plotting.figure((4.6, 4.2))
    ax = fig.add_subplot()
    xy, n = np.asarray(res["embedding"]), res["num_iterates"]
    alpha = 0.15 + 0.85 * np.arange(n) / max(n - 1, 1)
    colors = np.zeros((n, 4))
    colors[:, 0], colors[:, 3] = 0.85, alpha
    ax.scatter(xy[:n, 0], xy[:n, 1], s=10, c=colors, label="SGD iterates")
    ax.scatter(xy[n:, 0], xy[n:, 1], s=14, c="C0", label="bad minima")
    ax.scatter(
        xy[n - 1, 0], xy[n - 1, 1], s=140, marker="*", c="gold", edgecolors="k",
        label="final iterate",
    )  # fmt: skip
    ax.legend(fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    return {"tsne": fig}


SECTION = Section(
    name="tsne",
    title="Bad minima near the SGD path (Fig. 1)",
    run=run,
    report=report,
    claims=claims,
    figures=figures,
    validate=validate,
)
