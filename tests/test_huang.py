"""Huang et al. (2020): the anti-generalization loss, the swiss roll, the pairwise linear
model, SVHN's extra split, and the study end to end on its tiny config (in-process)."""

import json
import os
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_config, run_experiment

from sharp_minima import data as data_lib
from sharp_minima import landscape, losses, train
from sharp_minima.data import embedded
from sharp_minima.models import get_model
from sharp_minima.studies import claims as claims_lib
from sharp_minima.studies import visualize_generalization as vg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def test_anti_generalization_is_cross_entropy_at_beta_0_and_stable():
    z = jax.random.normal(jax.random.key(0), (6, 3)) * 3
    y = jnp.array([0, 1, 2, 0, 1, 2])
    zd, yd = z[::-1] * 2, y
    ce = losses.cross_entropy(z, y)
    assert float(losses.anti_generalization(z, y, zd, yd, 0.0)) == pytest.approx(float(ce))
    # β = 1: only the reverse cross-entropy −log(1 − p) on D_d.
    p = jax.nn.softmax(zd)[jnp.arange(6), yd]
    expected = float(jnp.mean(-jnp.log1p(-p)))
    assert float(losses.anti_generalization(z, y, zd, yd, 1.0)) == pytest.approx(expected, 1e-5)
    # p → 1 (a confident, correct D_d prediction): finite, about the logit margin, no log(0).
    big = jnp.array([[200.0, -200.0]])
    r = losses.reverse_cross_entropy_per_example(big, jnp.array([0]))
    assert np.isfinite(float(r[0])) and float(r[0]) == pytest.approx(400.0, rel=1e-6)
    g = jax.grad(lambda a: losses.reverse_cross_entropy_per_example(a, jnp.array([0]))[0])(big)
    assert np.all(np.isfinite(g))


def test_anti_generalization_gradient_matches_finite_differences(x64):
    z = jax.random.normal(jax.random.key(1), (4, 3), jnp.float64)
    zd = jax.random.normal(jax.random.key(2), (5, 3), jnp.float64)
    y, yd = jnp.array([0, 1, 2, 1]), jnp.array([2, 2, 0, 1, 0])

    def f(a, b):
        return losses.anti_generalization(a, y, b, yd, 0.3)

    ga, gb = jax.grad(f, argnums=(0, 1))(z, zd)
    h = 1e-6
    for i, j in [(0, 0), (3, 2)]:
        e = jnp.zeros_like(z).at[i, j].set(h)
        fd = (f(z + e, zd) - f(z - e, zd)) / (2 * h)
        assert float(ga[i, j]) == pytest.approx(float(fd), rel=1e-6, abs=1e-9)
        e = jnp.zeros_like(zd).at[i, j].set(h)
        fd = (f(z, zd + e) - f(z, zd - e)) / (2 * h)
        assert float(gb[i, j]) == pytest.approx(float(fd), rel=1e-6, abs=1e-9)


def test_training_losses_split_marked_labels_and_flip_fresh_points():
    model = get_model("swissroll_mlp", widths=(8,))
    x, y = embedded.swiss_roll(12, seed=0)
    xd, yd = embedded.swiss_roll(6, seed=1)
    params = model.init(jax.random.key(0), jnp.asarray(x))["params"]
    batch = {
        "x": jnp.concatenate([x, xd]),
        "y": jnp.concatenate([y, losses.poisoned_labels(yd, 2)]),
    }
    loss = losses.anti_generalization_loss(model, 0.4, 2)
    obj, aux = loss(params, {}, batch, jax.random.key(0))
    logits = lambda a: model.apply({"params": params}, a)  # noqa: E731
    direct = losses.anti_generalization(logits(x), y, logits(xd), yd, 0.4)
    assert float(obj) == pytest.approx(float(direct), rel=1e-6)
    assert float(aux["loss"]) == pytest.approx(float(losses.cross_entropy(logits(x), y)), 1e-6)
    with pytest.raises(ValueError, match="beta"):
        losses.anti_generalization_loss(model, 1.5, 2)
    # Label flip: β = 0 is the cross-entropy; β > 0 adds CE on fresh flipped points.
    sample = lambda k, n: embedded.swiss_roll_jax(k, n, 0.5)  # noqa: E731
    plain = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    flip0, _ = losses.label_flip_loss(model, sample, 0.0, 8)(params, {}, plain, jax.random.key(3))
    assert float(flip0) == pytest.approx(float(losses.cross_entropy(logits(x), y)), rel=1e-6)
    flip = losses.label_flip_loss(model, sample, 0.5, 8)
    a, _ = flip(params, {}, plain, jax.random.key(3))
    b, _ = flip(params, {}, plain, jax.random.key(4))
    assert float(a) != float(b)  # fresh points at every step
    xp, yp = sample(jax.random.split(jax.random.key(3))[1], 8)
    expected = 0.5 * losses.cross_entropy(logits(x), y) + 0.5 * losses.cross_entropy(
        logits(xp), 1 - yp
    )
    assert float(a) == pytest.approx(float(expected), rel=1e-5)


def test_swiss_roll_is_the_authors_formula():
    x, y = embedded.swiss_roll_jax(jax.random.key(0), 200, noise=0.0)
    x, y = np.asarray(x), np.asarray(y)
    t = np.linalg.norm(x, axis=1) / 1.5  # |(−1.5 t cos t, 1.5 t sin t)| = 1.5 t
    assert t.max() <= 600 * 2 * np.pi / 360 + 1e-4 and (y == 1).sum() == 100
    a = x[y == 0]
    np.testing.assert_allclose(a[:, 0], -1.5 * t[y == 0] * np.cos(t[y == 0]), atol=1e-4)
    np.testing.assert_allclose(a[:, 1], 1.5 * t[y == 0] * np.sin(t[y == 0]), atol=1e-4)
    b = x[y == 1]  # the second arm is the first rotated by π
    tb = t[y == 1]
    np.testing.assert_allclose(b[:, 0], 1.5 * tb * np.cos(tb), atol=1e-4)
    xs, ys = embedded.swiss_roll(50, seed=3)
    assert xs.shape == (50, 2) and set(ys) == {0, 1}


def test_pairwise_linear_features():
    model = get_model("pairwise_linear", num_classes=3, downsample=2)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
    v = model.init(jax.random.key(1), x)
    f = 4  # 2x2 pooled pixels -> 4 + 4·5/2 features
    assert v["params"]["Dense_0"]["kernel"].shape == (f + f * (f + 1) // 2, 3)
    # Linear in the pairwise features: the logit of pooled pixels p is w·[p, p_i p_j] + b.
    pooled = x.reshape(2, 2, 2, 2, 2, 1).mean((2, 4)).reshape(2, -1)
    i, j = np.triu_indices(4)
    feats = np.concatenate([pooled, pooled[:, i] * pooled[:, j]], 1)
    k, b = v["params"]["Dense_0"]["kernel"], v["params"]["Dense_0"]["bias"]
    np.testing.assert_allclose(model.apply(v, x), feats @ k + b, rtol=1e-5, atol=1e-5)


def test_study_tiny_end_to_end(tiny_study):
    run = tiny_study("visualize_generalization")
    results, tmp_path = run.results, Path(run.workdir)
    report = (tmp_path / "report.md").read_text()
    assert "| claim | source | verdict | numbers |" in report and "Table 1" in report
    assert len(results["claims"]) == 8
    for claim in results["claims"]:
        assert claim["verdict"] in claims_lib.VERDICTS and claim["numbers"]
    secs = results["sections"]
    assert list(secs) == ["swissroll", "tsne", "rings", "optimizers"]
    # one claim prefix per section, in order
    assert [c["claim"][:3] for c in results["claims"]] == ["[0]"] * 5 + ["[1]", "[2]", "[3]"]
    recs = secs["swissroll"]["records"]
    assert {r["beta"] for r in recs} == {0.0, 0.9}
    # Trained to a fit: the natural run stops at the first evaluation meeting the targets,
    # before the cap; the β = 0.9 run reaches the cap, is reported as not fitted and gets
    # no volume.
    natural, poisoned = (next(r for r in recs if r["beta"] == b) for b in (0.0, 0.9))
    assert natural["fitted"] and natural["epochs"] < run.config.num_epochs
    assert natural["train_accuracy"] >= run.config.fit.accuracy
    assert natural["epochs"] % run.config.eval_every_epochs == 0
    assert "log_volume_0.7" in natural and "effective_directions_0.7" in natural
    # one dominating direction: the error is undetermined, not a number (issue 29)
    if natural["effective_directions_0.7"] < landscape.MIN_EFFECTIVE_DIRECTIONS:
        assert np.isnan(natural["log_volume_stderr_0.7"]) and landscape.UNDETERMINED in report
    assert not poisoned["fitted"] and poisoned["epochs"] == run.config.num_epochs
    assert not any(k.startswith("log_volume") for k in poisoned)
    assert "Did not fit: β = 0.9" in report
    fits = next(c for c in results["claims"] if c["claim"].startswith("[0] every network"))
    assert fits["verdict"] == "no" and "β=0.9 seed 0" in fits["numbers"]
    for fig in ("decision_boundaries", "surfaces", "volume", "tsne", "rings"):
        assert (tmp_path / f"{fig}.png").stat().st_size > 0
    # The natural run saved its iterates up to its fit; the t-SNE searched from two of them,
    # each search trained to a fit too (or reported as not fitted).
    its = os.listdir(tmp_path / "runs" / "swissroll" / "beta0" / "seed0" / "arrays" / "iterates")
    assert len(its) == natural["epochs"] // run.config.tsne.every_epochs + 1
    assert len(secs["tsne"]["bad"]) == 2
    assert all(isinstance(b["fitted"], bool) and b["epochs"] >= 1 for b in secs["tsne"]["bad"])
    surface = np.load(tmp_path / "runs" / "swissroll" / "beta0" / "seed0" / "measure.surface.npz")
    assert surface["loss"].shape == (5, 5) and surface["accuracy"].max() <= 1
    assert set(secs["optimizers"]["rows"]) == {
        "sgd",
        "adam",
        "lbfgs",
        "linear (inputs + pairwise products)",
        "linear (inputs only)",
    }
    rows = secs["optimizers"]["rows"]
    assert all(isinstance(rows[k]["fitted"], bool) and rows[k]["epochs"] >= 1 for k in rows)
    assert json.load(open(tmp_path / "results.json"))["claims"] == results["claims"]


def test_the_optimizer_table_takes_a_rate_that_fits_and_marks_a_grid_edge():
    from sharp_minima.studies.visualize_generalization.optimizers import _best_on_validation

    tried = {  # the best validation accuracy is a run that did not fit the training set
        "lr0.1": {"learning_rate": 0.1, "val_accuracy": 0.50, "fitted": True},
        "lr0.3": {"learning_rate": 0.3, "val_accuracy": 0.55, "fitted": True},
        "lr1": {"learning_rate": 1.0, "val_accuracy": 0.60, "fitted": False},
        "lr3": {"learning_rate": 3.0, "diverged": True},
    }
    best = _best_on_validation(tried)
    assert best["learning_rate"] == 0.3 and best["grid_edge"] is None
    assert best["tried"] == {"lr0.1": 0.50, "lr0.3": 0.55, "lr1": 0.60, "lr3": None}
    baseline = _best_on_validation(tried, prefer_fit=False)  # the linear model: fit or not
    assert baseline["learning_rate"] == 1.0 and baseline["grid_edge"] is None
    unfit = {k: {**r, "fitted": False} for k, r in tried.items()}  # none fit: the best of all
    assert _best_on_validation(unfit)["learning_rate"] == 1.0
    tried["lr0.1"]["val_accuracy"] = 0.58
    assert _best_on_validation(tried)["grid_edge"] == "bottom"


def test_svhn_config_with_extra_split_under_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    config = load_config(
        "visualize_generalization.py:svhn",
        **{
            "model.name": "mlp",
            "model.kwargs": {"widths": (8,)},
            "batch_size": 4,
            "num_epochs": 1,
            "eval_every_epochs": 1,
            "eval_batch_size": 4,
            "eval_train_examples": 8,
            "poison.num_points": 8,
            "poison.seeds": 1,
            "volume.num_directions": 4,
            "volume.cutoffs": (10.0,),
            "fit.accuracy": 0.0,  # fitted when the loss is under the cutoff
            "volume.grid_points": 4,
            "surface.points": 3,
            "data.data_dir": str(tmp_path / "tfds"),
            "data.allow_download": False,
        },
    )
    with (
        tfds.testing.mock_data(num_examples=12),
        mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True),
    ):
        ds = data_lib.load(
            "svhn", data_dir=str(tmp_path), allow_download=False, extra="separate", max_extra=10
        )
        assert ds.x_extra.shape == (10, 32, 32, 3) and ds.x_train.shape == (12, 32, 32, 3)
        results = vg.run(config, str(tmp_path / "run"), log=lambda s: None)
    recs = results["sections"]["swissroll"]["records"]
    assert {r["beta"] for r in recs} == {0.0, 0.1}
    assert all("log_volume_10" in r for r in recs)


@pytest.mark.parametrize(
    "override,needle",
    [("--config.poison.kind=flip", "poison.kind"), ("--config.rings.gaps=(0.1,0.5)", "gaps")],
)
def test_bad_config_exits_2(tmp_path, override, needle):
    out = run_experiment(
        "visualize_generalization",
        "--config=configs/visualize_generalization.py:tiny",
        override,
        f"--workdir={tmp_path}",
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and needle in out.stderr


def test_a_missing_image_data_set_stops_the_study_before_any_training(tmp_path, monkeypatch):
    """The optimizer table's data is loaded first: without Fashion-MNIST the study stops at
    once (exit 2 on the command line), not after the swiss-roll section has trained."""
    real = train.load_data

    def load(config):
        if config.data.name == "fashion_mnist":
            raise data_lib.DataNotFoundError("data set 'fashion_mnist' is not available")
        return real(config)

    monkeypatch.setattr(train, "load_data", load)
    config = load_config("visualize_generalization.py:tiny", **{"optimizers.data": "fashion_mnist"})
    with pytest.raises(data_lib.DataNotFoundError, match="fashion_mnist"):
        vg.run(config, str(tmp_path), log=lambda s: None)
    assert not (tmp_path / "runs").exists()


def test_a_changed_config_is_refused_and_the_workdir_left_alone(tiny_study, tmp_path):
    run = tiny_study("visualize_generalization")
    workdir = run.copy(tmp_path / "w")
    before = {
        os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
        for d, _, fs in os.walk(workdir)
        for f in fs
    }
    config = load_config("visualize_generalization.py:tiny", **{"volume.num_directions": 32})
    with pytest.raises(train.ConfigError) as e:
        vg.run(config, workdir, log=lambda s: None)
    assert "volume.num_directions: 16 → 32" in str(e.value) and "\n" not in str(e.value)
    after = {
        os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
        for d, _, fs in os.walk(workdir)
        for f in fs
    }
    assert after == before
