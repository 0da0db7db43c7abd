"""Multi-layer perceptrons: Keskar et al.'s F1/F2 and Huang et al.'s swiss-roll MLP."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
    """Dense layers of ``widths``, each followed by (optional BatchNorm and) the activation.

    Attributes:
      widths: hidden widths.
      num_classes: output size.
      batch_norm: BatchNorm after every hidden dense layer (F1/F2 in Keskar et al. 2017).
      activation: ``"relu"`` or ``"tanh"``.
      dropout: dropout rate after every hidden layer (needs the ``"dropout"`` RNG stream).
    """

    widths: Sequence[int]
    num_classes: int
    batch_norm: bool = False
    activation: str = "relu"
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        act = {"relu": nn.relu, "tanh": jnp.tanh}[self.activation]
        x = x.reshape((x.shape[0], -1))
        for width in self.widths:
            x = nn.Dense(width, use_bias=not self.batch_norm)(x)
            if self.batch_norm:
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = act(x)
            if self.dropout:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)


def f1(num_classes: int = 10, width: int = 512, depth: int = 5, **kw) -> MLP:
    """F1: MNIST MLP 784-[512 BN ReLU]x5-10 (Keskar et al. 2017, Table 1)."""
    return MLP((width,) * depth, num_classes, batch_norm=True, **kw)


def f2(num_classes: int = 1973, width: int = 512, depth: int = 7, **kw) -> MLP:
    """F2: TIMIT MLP 360-[512 BN ReLU]x7-1973 (Keskar et al. 2017, Table 1)."""
    return MLP((width,) * depth, num_classes, batch_norm=True, **kw)


def swissroll_mlp(num_classes: int = 2, width: int = 64, depth: int = 6, **kw) -> MLP:
    """Huang et al. (2020): 6 hidden ReLU layers on the 2-D swiss roll."""
    return MLP((width,) * depth, num_classes, **kw)
