"""Sequence models: an LSTM language model (PTB "small") and a 1-D CNN for IMDB."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class LSTMLanguageModel(nn.Module):
    """Zaremba et al. (2014) "small": 2 LSTM layers of 200 units, tied-free softmax.

    Input: int tokens (batch, time); output: logits (batch, time, vocab).
    """

    vocab_size: int = 10000
    hidden: int = 200
    layers: int = 2
    dropout: float = 0.0

    @nn.compact
    def __call__(self, tokens, train: bool = False):
        x = nn.Embed(self.vocab_size, self.hidden)(tokens)
        for _ in range(self.layers):
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
            x = nn.RNN(nn.OptimizedLSTMCell(self.hidden))(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.vocab_size)(x)


class TextCNN(nn.Module):
    """1-D CNN for IMDB sentiment: embedding -> conv1d -> global max-pool -> dense."""

    vocab_size: int = 20000
    num_classes: int = 2
    embed: int = 64
    filters: int = 64
    kernel_size: int = 5
    dense: int = 64

    @nn.compact
    def __call__(self, tokens, train: bool = False):
        x = nn.Embed(self.vocab_size, self.embed)(tokens)
        x = nn.relu(nn.Conv(self.filters, (self.kernel_size,))(x))
        x = jnp.max(x, axis=1)
        x = nn.relu(nn.Dense(self.dense)(x))
        return nn.Dense(self.num_classes)(x)


def lstm_ptb(num_classes=10000, **kw):
    return LSTMLanguageModel(vocab_size=num_classes, **kw)


def imdb_cnn(num_classes=2, **kw):
    return TextCNN(num_classes=num_classes, **kw)
