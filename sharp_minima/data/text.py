"""Text to fixed-vocabulary integer arrays: PTB language-model windows, IMDB reviews."""

from __future__ import annotations

import collections
import re

import numpy as np

PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"
_WORD = re.compile(r"[a-z0-9']+")


def words(text: str | bytes) -> list[str]:
    """Lower-cased word tokens (HTML line breaks removed), the usual IMDB pre-processing."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return _WORD.findall(text.lower().replace("<br />", " "))


def build_vocab(token_lists, size: int, specials=(PAD, UNK)) -> dict[str, int]:
    """The ``size`` most frequent tokens (ties broken alphabetically), specials first."""
    counts = collections.Counter(t for tokens in token_lists for t in tokens)
    for s in specials:
        counts.pop(s, None)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: size - len(specials)]
    return {t: i for i, t in enumerate(list(specials) + [t for t, _ in ranked])}


def encode(tokens, vocab) -> np.ndarray:
    unk = vocab[UNK]
    return np.asarray([vocab.get(t, unk) for t in tokens], np.int32)


def pad_truncate(ids: np.ndarray, length: int, pad: int = 0) -> np.ndarray:
    out = np.full(length, pad, np.int32)
    out[: min(length, len(ids))] = ids[:length]
    return out


def reviews_to_arrays(train_texts, test_texts, *, vocab_size=20000, max_len=400):
    """IMDB: a vocabulary of the training reviews, reviews cut/padded to ``max_len`` tokens."""
    train_tokens = [words(t) for t in train_texts]
    vocab = build_vocab(train_tokens, vocab_size)

    def arr(token_lists):
        return np.stack([pad_truncate(encode(t, vocab), max_len) for t in token_lists])

    return arr(train_tokens), arr([words(t) for t in test_texts]), vocab


def lm_windows(ids: np.ndarray, seq_len: int):
    """Non-overlapping windows of a token stream: inputs ``w[:-1]``, targets ``w[1:]``.

    Each window is an independent example (the LSTM state starts at zero in each), a
    simplification of Zaremba et al.'s truncated back-propagation through the whole stream.
    """
    n = (len(ids) - 1) // seq_len
    x = ids[: n * seq_len].reshape(n, seq_len)
    y = ids[1 : n * seq_len + 1].reshape(n, seq_len)
    return x.astype(np.int32), y.astype(np.int32)
