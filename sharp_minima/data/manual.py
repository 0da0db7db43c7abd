"""Data sets that need files put in place by hand: TIMIT features and PTB text.

Both have licences or distribution formats that rule out an automatic download (TIMIT is an
LDC corpus; TFDS has no PTB builder). `load` looks in ``manual_dir`` (default
``~/sharp_minima_data/<name>``) and says exactly which files it wants when they are missing.
"""

from __future__ import annotations

import os

import numpy as np

from sharp_minima.data import text

DEFAULT_ROOT = os.path.join("~", "sharp_minima_data")

EXPECTED = {
    "timit": (
        ("train.npz", "test.npz"),
        "TIMIT frame features as in Keskar et al.'s F2: train.npz and test.npz, each with arrays "
        "x (frames, 360) float (e.g. 40 filterbank features x 9 context frames) and y (frames,) "
        "int state labels in [0, 1973)",
    ),
    "ptb": (
        ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"),
        "the Penn Treebank language-modelling text of Mikolov et al. (the data/ folder of "
        "simple-examples.tgz): ptb.train.txt, ptb.valid.txt, ptb.test.txt",
    ),
}


def default_dir(name: str) -> str:
    return os.path.expanduser(os.path.join(DEFAULT_ROOT, name))


def missing_message(name: str, folder: str) -> str:
    wanted, what = EXPECTED[name]
    return f"manual folder {folder} lacks {', '.join(wanted)}; put there {what}"


def available(name: str, folder: str) -> bool:
    return all(os.path.exists(os.path.join(folder, f)) for f in EXPECTED[name][0])


def load_timit(folder: str):
    out = {}
    for split in ("train", "test"):
        with np.load(os.path.join(folder, f"{split}.npz")) as f:
            if "x" not in f or "y" not in f:
                raise ValueError(f"{folder}/{split}.npz must hold arrays 'x' and 'y'")
            x, y = np.asarray(f["x"], np.float32), np.asarray(f["y"], np.int32)
        if x.ndim != 2 or len(x) != len(y):
            raise ValueError(f"{folder}/{split}.npz: x must be (frames, features) and y (frames,)")
        out[split] = (x, y)
    return out, 1973


def load_ptb(folder: str, *, seq_len: int = 35, vocab_size: int = 10000):
    """PTB as (windows, seq_len) token arrays; returns (splits, vocabulary size).

    The standard files already map rare words to ``<unk>`` (10k words); a line ends in ``<eos>``.
    """

    def read(split):
        with open(os.path.join(folder, f"ptb.{split}.txt")) as f:
            return [tok for line in f for tok in line.split() + [text.EOS]]

    train_tokens = read("train")
    vocab = text.build_vocab([train_tokens], vocab_size, specials=(text.UNK, text.EOS))
    out = {}
    for ours, split in (("train", "train"), ("valid", "valid"), ("test", "test")):
        tokens = train_tokens if split == "train" else read(split)
        out[ours] = text.lm_windows(text.encode(tokens, vocab), seq_len)
    return out, len(vocab)
