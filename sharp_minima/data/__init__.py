"""Data: one `load(name, ...)` for TFDS, local IDX folders, MNIST-1D and synthetic sets.

Sources are tried in this order (DESIGN.md): (1) a TFDS dataset already prepared in
``data_dir``, read with ``tfds.data_source``; (2) a local folder of MNIST-format IDX files
(``idx_dir``, or Debian's ``/usr/share/datasets/fashion-mnist`` for Fashion-MNIST); (3) a TFDS
download and preparation when TensorFlow and the network allow. When none works, `load` raises
`DataNotFoundError` naming every source tried and how to provide the data. MNIST-1D and the
synthetic sets (swiss roll, rings, spirals) are generated and always available.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from sharp_minima.data import embedded, idx, manual, pipeline, text, tfds_source
from sharp_minima.data.pipeline import (
    all_batches,
    curvature_batches,
    epoch_permutation,
    random_crop_flip,
)

__all__ = [
    "DATASETS",
    "DataNotFoundError",
    "Dataset",
    "all_batches",
    "curvature_batches",
    "epoch_permutation",
    "load",
    "pipeline",
    "random_crop_flip",
]

DEBIAN_DIRS = {
    "fashion_mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": "/usr/share/datasets/mnist",
}
CLASSES = {
    "mnist": 10,
    "fashion_mnist": 10,
    "cifar10": 10,
    "cifar100": 100,
    "svhn": 10,
    "mnist1d": 10,
    "swissroll": 2,
    "rings": 2,
    "spirals": 3,
    "imdb": 2,
    "timit": 1973,
    "ptb": 10000,  # the vocabulary size; the actual one comes from the files
}
TEXT = ("imdb", "ptb")  # integer token inputs: no float conversion or standardisation
DATASETS = tuple(CLASSES)


class DataNotFoundError(FileNotFoundError):
    """No source could provide the data set; the message lists what was tried."""


@dataclasses.dataclass
class Dataset:
    """Arrays ready to put on device, and their metadata.

    Images are float32 NHWC scaled to [0, 1] then standardised with the training set's
    per-channel mean and std (``mean``/``std`` kept for reference); labels are int32. Text
    ``x_extra``/``y_extra``: unseen data of the training distribution, neither train nor test
    (SVHN's extra split with ``extra="separate"``; Huang et al.'s D_d). Text
    sets (``TEXT``) hold int32 token ids: IMDB reviews padded to ``max_len``, PTB windows of
    ``seq_len`` tokens with next-token labels of the same shape.
    """

    name: str
    source: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    x_extra: np.ndarray | None = None
    y_extra: np.ndarray | None = None
    noisy_train: np.ndarray | None = None  # with label_noise: which training labels changed

    @property
    def input_shape(self):
        return self.x_train.shape[1:]


def _raw(name, data_dir, idx_dir, manual_dir, seed, allow_download, options):
    """Returns (splits, source description, number of classes)."""
    splits, source = _raw_splits(name, data_dir, idx_dir, manual_dir, seed, allow_download, options)
    num_classes = CLASSES[name]
    if isinstance(splits, tuple):  # manual loaders also return the class/vocabulary count
        splits, num_classes = splits
    if name == "imdb":
        x, xt, vocab = text.reviews_to_arrays(
            splits["train"][0],
            splits["test"][0],
            vocab_size=options.get("vocab_size", 20000),
            max_len=options.get("max_len", 400),
        )
        splits = {"train": (x, splits["train"][1]), "test": (xt, splits["test"][1])}
    return splits, source, num_classes


def _raw_splits(name, data_dir, idx_dir, manual_dir, seed, allow_download, options):
    if name in manual.EXPECTED:
        folder = os.path.expanduser(manual_dir) if manual_dir else manual.default_dir(name)
        if not manual.available(name, folder):
            raise DataNotFoundError(
                f"data set {name!r} is not available: {manual.missing_message(name, folder)} "
                "(or pass --config.data.manual_dir=FOLDER)."
            )
        loader = manual.load_timit if name == "timit" else manual.load_ptb
        return loader(folder, **options), f"files in {folder}"
    if name == "mnist1d":
        return embedded.mnist1d(seed, **options), "mnist1d package (generated)"
    if name in embedded.SYNTHETIC:
        return embedded.synthetic(name, seed=seed, **options), "generated"
    if name not in tfds_source.TFDS_NAMES:
        raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(DATASETS)}")
    # SVHN: True adds the 531k "extra" images to training; "separate" keeps them apart.
    extra = options.get("extra", False)
    tried = []

    def from_tfds(prepare: bool, what: str):
        try:
            splits = tfds_source.load_tfds(name, data_dir, allow_prepare=prepare, extra=extra)
            return splits, f"tfds ({'downloaded' if prepare else 'prepared'})"
        except FileNotFoundError as e:
            tried.append(f"{what}: {e}")
        except ImportError as e:
            tried.append(f"TFDS: cannot import tensorflow_datasets ({e})")
        return None

    found = from_tfds(False, f"TFDS prepared in {data_dir or '~/tensorflow_datasets'}")
    if found:
        return found
    for folder in [idx_dir, DEBIAN_DIRS.get(name)]:
        if folder is None:
            continue
        if os.path.isdir(folder):
            splits = idx.load_idx_dir(folder)
            if splits is not None:
                return splits, f"IDX files in {folder}"
            tried.append(f"IDX folder {folder}: no train/t10k image and label files")
        else:
            tried.append(f"IDX folder {folder}: does not exist")
    if allow_download:
        found = from_tfds(True, "TFDS download")
        if found:
            return found
    hint = "prepare it with TFDS (pip install -e '.[tfds]' and network access, or copy a prepared "
    hint += "tensorflow_datasets folder and pass its data_dir)"
    if name in ("mnist", "fashion_mnist"):
        hint += ", or pass idx_dir= a folder of MNIST-format IDX files"
    if name == "fashion_mnist":
        hint += " (Debian: apt-get install dataset-fashion-mnist)"
    raise DataNotFoundError(
        f"data set {name!r} is not available. Tried: " + "; ".join(tried) + f". To fix: {hint}."
    )


def load(
    name: str,
    *,
    data_dir: str | None = None,
    idx_dir: str | None = None,
    manual_dir: str | None = None,
    validation_fraction: float = 0.0,
    seed: int = 0,
    allow_download: bool = True,
    max_train: int | None = None,
    label_noise: float = 0.0,
    **options,
) -> Dataset:
    """Loads a data set as host arrays with a seeded train/validation split.

    Args:
      name: one of `DATASETS`.
      data_dir: TFDS data folder.
      idx_dir: folder of MNIST-format IDX files (train-/t10k- images and labels).
      manual_dir: folder of TIMIT or PTB files (default ``~/sharp_minima_data/<name>``).
      validation_fraction: fraction of the training set held out (split by ``seed``).
      seed: seed of the split and of generated data.
      allow_download: try a TFDS download when nothing local works.
      max_train: keep only the first ``max_train`` training examples (after shuffling).
      label_noise: symmetric label noise p: each label of the training set (and of the
        validation split held out of it; never the test set) is, with probability p,
        replaced by another class drawn uniformly (seeded by ``seed``). ``noisy_train``
        marks the training labels that changed. Classification sets only.
      **options: passed to the generators (e.g. ``gap=`` for rings, ``num_train=``), to the
        manual loaders (PTB ``seq_len``, ``vocab_size``), IMDB (``vocab_size``, ``max_len``)
        or SVHN (``extra=True``, or ``"separate"`` with ``max_extra``).

    Raises:
      ValueError: unknown name, bad fraction or label noise. DataNotFoundError: no source
        worked.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    if not 0.0 <= label_noise < 1.0 or (label_noise and name in TEXT):
        raise ValueError(f"label_noise must be in [0, 1), on classification data: {label_noise}")
    splits, source, num_classes = _raw(
        name, data_dir, idx_dir, manual_dir, seed, allow_download, options
    )
    x, y = splits["train"]
    xt, yt = splits["test"]
    is_text = name in TEXT
    if not is_text:
        x, xt = _as_float(x), _as_float(xt)
    perm = np.random.default_rng(seed).permutation(len(x))
    x, y = x[perm], np.asarray(y, np.int32)[perm]
    if max_train is not None:
        x, y = x[:max_train], y[:max_train]
    noisy = None
    if label_noise:  # another class, uniformly: y + U{1..K-1} mod K
        rng = np.random.default_rng([seed, 1])
        noisy = rng.random(len(y)) < label_noise
        shift = rng.integers(1, num_classes, len(y))
        y = np.where(noisy, (y + shift) % num_classes, y).astype(np.int32)
    n_val = int(round(validation_fraction * len(x)))
    xv, yv = (x[:n_val], y[:n_val]) if n_val else (None, None)
    x, y = x[n_val:], y[n_val:]
    noisy = None if noisy is None else noisy[n_val:]
    if "valid" in splits and xv is None:  # PTB ships its own validation text
        xv, yv = splits["valid"]
    xe = ye = None
    if "extra" in splits:
        limit = options.get("max_extra")
        xe, ye = _as_float(splits["extra"][0][:limit]), np.asarray(splits["extra"][1][:limit])
        ye = ye.astype(np.int32)
    if is_text:
        mean = std = None
        norm = lambda a: a  # noqa: E731
    else:
        axes = tuple(range(x.ndim - 1))
        mean, std = x.mean(axes), x.std(axes) + 1e-8
        norm = lambda a: None if a is None else ((a - mean) / std).astype(np.float32)  # noqa: E731
    return Dataset(
        name,
        source,
        norm(x),
        y,
        norm(xt),
        np.asarray(yt, np.int32),
        num_classes,
        norm(xv),
        yv,
        mean,
        std,
        norm(xe),
        ye,
        noisy,
    )


def _as_float(x):
    x = np.asarray(x)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
        if x.ndim == 3:  # (n, h, w) grey images from IDX files -> NHWC
            x = x[..., None]
    return x.astype(np.float32)
