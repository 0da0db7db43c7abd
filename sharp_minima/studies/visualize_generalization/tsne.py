"""1. Bad minima near the SGD path (Huang et al. 2020, Fig. 1): the natural run's iterates
and the bad minima the anti-generalization optimizer finds when started from some of them,
embedded with t-SNE after PCA to 50 dimensions."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sharp_minima import plotting, train
from sharp_minima import tree_util as tu
from sharp_minima.studies import claims as claims_lib
from sharp_minima.studies import runs
from sharp_minima.studies.claims import (
    NO,
    WITHIN_NOISE,
    YES,
    Claim,
    accuracy_noise,
    all_of,
    verdict,
)
from sharp_minima.studies.sections import Section
from sharp_minima.studies.visualize_generalization import training

NEAR_EVERY_ITERATE = Claim(
    statement="bad minima that fit the training set, test below the paper's 53 %, and lie "
    "near the SGD path are found from every iterate searched",
    source="Huang et al. 2020, Sec. 3 and Fig. 1",
    quantity="per start: fitted; bad_test_below − test accuracy > 0; near × the path's "
    "length − distance > 0",
    noise=claims_lib.TEST_SET,
    threshold="tsne.claims.bad_test_below",
    origin="Fig. 1: the bad minima test below 53 % (natural 98.5 %), 'in close proximity' of "
    "the iterates; near = within the length of the SGD path itself (tsne.claims.near × it)",
)


def validate(config) -> None:
    """Checks ``tsne``."""
    for path, kw in (
        ("tsne.every_epochs", dict(low=1, integer=True)),
        ("tsne.num_starts", dict(low=1, integer=True)),
        ("tsne.beta", dict(low=0, low_open=True, high=1, high_open=True)),
        ("tsne.epochs", dict(low=1, integer=True)),
        ("tsne.learning_rate", dict(low=0, low_open=True)),
        ("tsne.perplexity", dict(low=0, low_open=True)),
        ("tsne.claims.bad_test_below", dict(low=0, high=1)),
        ("tsne.claims.near", dict(low=0, low_open=True)),
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
            "num_test": len(data.x_test),
        },
        # how far the SGD path itself travels: the sum of its iterates' steps
        "path_length": float(np.linalg.norm(np.diff(iterates, axis=0), axis=1).sum()),
        "bad": [{k: v for k, v in b.items() if k != "params"} for b in bad],
        "num_iterates": len(iterates),
        "embedding": emb,
    }


def _bad_minimum(cfg, res, epochs, iterates, i: int, num_examples: int) -> dict:
    flat = np.asarray(tu.ravel(res.state.params)[0])
    return {
        "from_epoch": int(epochs[i]),
        "from_index": int(i),
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
    """`NEAR_EVERY_ITERATE`: every start must fit, test below ``bad_test_below`` beyond 2
    units of the test set's binomial error, and lie within ``near`` × the path's length."""
    t = config.tsne.claims
    if not res.get("good"):
        return [NEAR_EVERY_ITERATE.untested(f"the natural run diverged ({res.get('diverged')})")]
    if not res["bad"]:
        return [NEAR_EVERY_ITERATE.untested("no bad run finished")]
    good, bad = res["good"]["test_accuracy"], res["bad"]
    num_test, path = res["good"].get("num_test", 0), res.get("path_length", float("nan"))
    parts = []
    for b in bad:
        fits = b.get("fitted", b["train_accuracy"] >= config.fit.accuracy)
        noise = accuracy_noise(b["test_accuracy"], num_test) if num_test else float("nan")
        parts += [
            YES if fits else NO,
            verdict(t.bad_test_below - b["test_accuracy"], noise),
            verdict(t.near * path - b["distance"]),
        ]
    v = all_of(parts)
    ratio = [b["distance"] / max(path, 1e-12) for b in bad]
    below = sum(b["test_accuracy"] < t.bad_test_below for b in bad)
    near = sum(b["distance"] <= t.near * path for b in bad)
    return [
        NEAR_EVERY_ITERATE.test(
            {YES: 1.0, NO: -1.0, WITHIN_NOISE: 0.0}.get(v, float("nan")),
            0.0,
            f"{len(bad)} starts: {sum(b.get('fitted', True) for b in bad)} fitted, {below} "
            f"below {100 * t.bad_test_below:g} % test, {near} within {t.near:g}× the path's "
            f"length {path:.3g}; test accuracy {min(100 * b['test_accuracy'] for b in bad):.1f}"
            f"–{max(100 * b['test_accuracy'] for b in bad):.1f} % vs {100 * good:.1f} %; "
            f"distance / path length {min(ratio):.2f}–{max(ratio):.2f} (paper: natural 98.5 %, "
            "bad minima below 53 %, 'in close proximity')",
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
        f"{100 * res['good']['test_accuracy']:.1f} % (paper: 98.5 %, bad minima < 53 %). "
        f"The SGD path travels {res.get('path_length', float('nan')):.3g} (the sum of its "
        "steps between saved iterates); a bad minimum is *near* within "
        f"{config.tsne.claims.near:g}× that length (fixed before the run).",
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
    ax.plot(xy[:n, 0], xy[:n, 1], lw=0.6, c="0.6", zorder=0)  # the path, in order
    ax.scatter(xy[:n, 0], xy[:n, 1], s=10, c=colors, label="SGD iterates")
    ax.scatter(xy[n:, 0], xy[n:, 1], s=14, c="C0", label="bad minima")
    for j, b in enumerate(res["bad"]):  # each bad minimum joined to the iterate it started at
        if "from_index" in b:
            i = b["from_index"]
            ax.plot([xy[i, 0], xy[n + j, 0]], [xy[i, 1], xy[n + j, 1]], c="C0", lw=0.7,
                    alpha=0.6, label="search from an iterate" if j == 0 else None)  # fmt: skip
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
