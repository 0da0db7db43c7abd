"""Every data source on tiny data: IDX files written here, TFDS mock data, MNIST-1D, generators."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sharp_minima import data
from sharp_minima.data import embedded, idx


def write_tiny_idx(folder, n_train=30, n_test=10):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        idx.write_idx(
            str(folder / f"{prefix}-images-idx3-ubyte.gz"),
            rng.integers(0, 256, (n, 6, 6), dtype=np.uint8),
        )
        idx.write_idx(
            str(folder / f"{prefix}-labels-idx1-ubyte.gz"), rng.integers(0, 10, n, dtype=np.uint8)
        )


def load_tiny_idx(folder):
    return data.load(
        "fashion_mnist",
        idx_dir=str(folder),
        data_dir=str(folder / "none"),
        validation_fraction=0.2,
        allow_download=False,
    )


def test_idx_round_trip_and_load(tmp_path):
    write_tiny_idx(tmp_path)
    ds = load_tiny_idx(tmp_path)
    assert ds.source.startswith("IDX files in")
    assert ds.x_train.shape == (24, 6, 6, 1) and ds.x_val.shape == (6, 6, 6, 1)
    assert ds.x_test.shape == (10, 6, 6, 1) and ds.y_train.dtype == np.int32
    np.testing.assert_allclose(ds.x_train.mean(), 0.0, atol=1e-5)
    # The split is seeded: the same seed gives the same split.
    again = load_tiny_idx(tmp_path)
    np.testing.assert_array_equal(again.y_val, ds.y_val)


def test_bad_idx_file_is_named(tmp_path):
    bad = tmp_path / "x.gz"
    idx.write_idx(str(bad), np.zeros((2, 2), np.uint8))
    bad.write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="x.gz is not an IDX file"):
        idx.read_idx(str(bad))


def test_missing_data_names_the_sources_tried(tmp_path):
    with pytest.raises(data.DataNotFoundError) as err:
        data.load("cifar10", data_dir=str(tmp_path), allow_download=False)
    assert "not prepared" in str(err.value) and "To fix" in str(err.value)
    with pytest.raises(ValueError, match="valid names"):
        data.load("imagenet")


def test_tfds_mock_data_through_data_source(tmp_path):
    import tensorflow_datasets as tfds

    with (
        tfds.testing.mock_data(num_examples=12),
        mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True),
    ):
        ds = data.load("cifar10", data_dir=str(tmp_path), allow_download=False)
    assert ds.source == "tfds (prepared)"
    assert ds.x_train.shape == (12, 32, 32, 3) and ds.num_classes == 10


def test_mnist1d_and_generators():
    ds = data.load("mnist1d")
    assert ds.x_train.shape == (4000, 40, 1) and set(np.unique(ds.y_train)) == set(range(10))
    for name, classes in (("swissroll", 2), ("rings", 2), ("spirals", 3)):
        ds = data.load(name, num_train=100, num_test=50)
        assert ds.x_train.shape == (100, 2) and ds.num_classes == classes
        assert set(np.unique(ds.y_train)) == set(range(classes))
    # Rings: the radial gap between classes is respected.
    x, y = embedded.rings(500, gap=0.2)
    r = np.linalg.norm(x, axis=1)
    assert r[y == 0].max() + 0.2 <= r[y == 1].min() + 1e-6


def test_symmetric_label_noise_changes_a_seeded_fraction_of_the_training_labels_only():
    clean = data.load("mnist1d", validation_fraction=0.1)
    noisy = data.load("mnist1d", validation_fraction=0.1, label_noise=0.4)
    changed = noisy.y_train != clean.y_train
    np.testing.assert_array_equal(changed, noisy.noisy_train)  # a changed label is another class
    assert abs(changed.mean() - 0.4) < 0.03  # 3,600 labels: 3 standard errors ≈ 0.025
    np.testing.assert_array_equal(noisy.x_train, clean.x_train)
    np.testing.assert_array_equal(noisy.y_test, clean.y_test)  # the test set stays clean
    assert 0.3 < (noisy.y_val != clean.y_val).mean() < 0.5  # the validation split is noisy
    # Every other class equally likely: the 9 shifts y' − y (mod 10) of the changed labels.
    shifts = np.bincount((noisy.y_train - clean.y_train)[changed] % 10, minlength=10)
    assert shifts[0] == 0 and shifts[1:].min() > 0.7 * shifts[1:].mean()
    again = data.load("mnist1d", validation_fraction=0.1, label_noise=0.4)
    np.testing.assert_array_equal(again.y_train, noisy.y_train)  # seeded
    assert clean.noisy_train is None
    with pytest.raises(ValueError, match="label_noise"):
        data.load("mnist1d", label_noise=1.0)


def test_pipeline_is_seeded_and_on_device():
    idx_a = data.epoch_permutation(jax.random.key(0), 10, 3)
    idx_b = data.epoch_permutation(jax.random.key(0), 10, 3)
    assert idx_a.shape == (3, 3) and len(set(np.asarray(idx_a).ravel())) == 9
    np.testing.assert_array_equal(idx_a, idx_b)
    images = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
    out = data.random_crop_flip(jax.random.key(1), images, padding=1)
    assert out.shape == images.shape
    batches, weights = data.curvature_batches(
        jax.random.key(2), np.zeros((100, 3)), np.zeros(100), fraction=0.2, batch_size=8
    )
    assert batches["x"].shape == (2, 8, 3) and weights.shape == (2,)


def test_manual_ptb_and_timit_folders(tmp_path):
    with pytest.raises(data.DataNotFoundError, match="lacks ptb.train.txt.*simple-examples"):
        data.load("ptb", manual_dir=str(tmp_path))
    lines = {
        "train": "the cat sat\nthe dog sat on the mat\n",
        "valid": "the cat\n",
        "test": "a dog sat on the cat\n",
    }
    for split, content in lines.items():
        (tmp_path / f"ptb.{split}.txt").write_text(content * 3)
    ds = data.load("ptb", manual_dir=str(tmp_path), seq_len=4)
    assert ds.x_train.dtype == np.int32 and ds.x_train.shape[1] == 4
    assert ds.num_classes == 8  # <unk> <eos> + 6 distinct training words
    # Targets are the inputs shifted by one token ("the cat sat <eos> the dog ...").
    flat_x, flat_y = ds.x_test.ravel(), ds.y_test.ravel()
    np.testing.assert_array_equal(flat_x[1:], flat_y[:-1])
    assert ds.x_val is not None  # PTB's own validation text
    assert ds.x_test.ravel()[0] == 0  # the unseen word "a" -> <unk>, id 0

    np.savez(tmp_path / "train.npz", x=np.ones((6, 360)), y=np.arange(6))
    with pytest.raises(data.DataNotFoundError, match="test.npz"):
        data.load("timit", manual_dir=str(tmp_path))
    np.savez(tmp_path / "test.npz", x=np.zeros((3, 360)), y=np.arange(3))
    ds = data.load("timit", manual_dir=str(tmp_path))
    assert ds.x_train.shape == (6, 360) and ds.num_classes == 1973


def test_imdb_tokenised_to_a_fixed_vocabulary(tmp_path):
    import tensorflow_datasets as tfds

    with (
        tfds.testing.mock_data(num_examples=10),
        mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True),
    ):
        ds = data.load(
            "imdb", data_dir=str(tmp_path), allow_download=False, vocab_size=50, max_len=16
        )
    assert ds.x_train.shape == (10, 16) and ds.x_train.dtype == np.int32
    assert ds.x_train.max() < 50 and ds.num_classes == 2
    assert text_ids_roundtrip()


def text_ids_roundtrip():
    from sharp_minima.data import text

    vocab = text.build_vocab([text.words("Great film<br />great cast")], 10)
    ids = text.pad_truncate(text.encode(text.words("great unknown"), vocab), 4)
    return list(ids) == [vocab["great"], vocab[text.UNK], 0, 0] and vocab["great"] == 2
