"""TFDS: read prepared datasets with `tfds.data_source` (array_record, no TensorFlow needed);
prepare them with TensorFlow when it and the network are available."""

from __future__ import annotations

import contextlib

import numpy as np

# Our names -> (TFDS name, image key, label key, test split).
TFDS_NAMES = {
    "mnist": ("mnist", "image", "label", "test"),
    "fashion_mnist": ("fashion_mnist", "image", "label", "test"),
    "cifar10": ("cifar10", "image", "label", "test"),
    "cifar100": ("cifar100", "image", "label", "test"),
    "svhn": ("svhn_cropped", "image", "label", "test"),
    "imdb": ("imdb_reviews", "text", "label", "test"),  # tokenised by data.text
}


def _to_arrays(source, image_key, label_key):
    n = len(source)
    try:  # batched read (fast on array_record); some sources only support indexing
        records = source.__getitems__(list(range(n)))
    except (AttributeError, TypeError):
        records = [source[i] for i in range(n)]
    x = np.stack([np.asarray(r[image_key]) for r in records])
    y = np.asarray([r[label_key] for r in records], np.int32)
    return x, y


@contextlib.contextmanager
def _quiet_probe():
    """absl logging at ERROR while TFDS looks for a prepared dataset: it warns about every
    version folder it probes ("Variant folder ... has no dataset_info.json"), which is how
    a missing dataset looks, not a problem (a notebook would show the warning, with a path
    of the machine). The level is restored afterwards."""
    from absl import logging

    level = logging.get_verbosity()
    logging.set_verbosity(min(level, logging.ERROR))  # absl: lower is quieter
    try:
        yield
    finally:
        logging.set_verbosity(level)


def load_tfds(name: str, data_dir: str | None, *, allow_prepare: bool = True, extra=False):
    """``{"train": (x, y), "test": (x, y)}`` from TFDS (SVHN: ``extra=True`` adds the extra
    images to the training set, ``extra="separate"`` returns them as ``"extra"``).

    Raises:
      FileNotFoundError: not prepared and it could not be prepared here (reason in message).
    """
    import tensorflow_datasets as tfds

    tfds_name, image_key, label_key, test_split = TFDS_NAMES[name]
    splits = {"train": "train+extra" if extra is True else "train", "test": test_split}
    if extra == "separate":  # SVHN's 531k extra images as their own split (D_d of Huang et al.)
        splits["extra"] = "extra"
    where = data_dir or "~/tensorflow_datasets"
    with _quiet_probe():
        builder = tfds.builder(tfds_name, data_dir=data_dir, file_format="array_record")
        prepared = builder.is_prepared()
    if not prepared:
        if not allow_prepare:
            raise FileNotFoundError(f"TFDS {tfds_name!r} is not prepared in {where}")
        try:
            import tensorflow  # noqa: F401  (preparing a dataset needs TensorFlow)
        except ImportError:
            raise FileNotFoundError(
                f"TFDS {tfds_name!r} is not prepared in {where} and preparing it needs "
                "TensorFlow (pip install -e '.[tfds]') and network access"
            ) from None
        try:
            builder.download_and_prepare()
        except Exception as e:
            raise FileNotFoundError(f"TFDS {tfds_name!r} could not be prepared: {e}") from None
    out = {}
    for ours, split in splits.items():
        parts = []
        for s in split.split("+"):
            try:
                source = builder.as_data_source(split=s)
            except Exception as e:
                raise FileNotFoundError(
                    f"TFDS {tfds_name!r} split {s!r} in {where} could not be read as "
                    f"array_record (prepare it with file_format='array_record'): {e}"
                ) from None
            parts.append(_to_arrays(source, image_key, label_key))
        out[ours] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return out
