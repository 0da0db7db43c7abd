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


# The hidden widths of the authors' swiss-roll network (gen-viz): 6 ReLU layers.
SWISSROLL_WIDTHS = (23, 16, 26, 32, 28, 31)


def swissroll_mlp(
    num_classes: int = 2,
    widths: Sequence[int] = SWISSROLL_WIDTHS,
    width: int | None = None,
    depth: int = 6,
    **kw,
) -> MLP:
    """Huang et al. (2020): the MLP 2-23-16-26-32-28-31-2 with ReLU on the swiss roll; give
    ``width`` for ``depth`` equal layers instead."""
    if width is not None:
        widths = (width,) * depth
    return MLP(tuple(widths), num_classes, **kw)


class PairwiseLinear(nn.Module):
    """A linear classifier on pixels and their pairwise products (Huang et al. 2020, Sec. 2).

    The image is first average-pooled by ``downsample`` over its spatial axes (the paper
    downsamples by 2), flattened to f, and the features are ``[f, f_i·f_j for i ≤ j]`` — about
    as many parameters as a network, yet a model without a network's implicit bias: it fits
    the training set and generalizes far worse (the paper: 49 % vs ResNet-18's 92 % on CIFAR-10).

    Attributes:
      num_classes: output size.
      downsample: pooling factor over each spatial axis (1 = none).
      pairwise: with the pairwise products (default); False gives logistic regression on
        the inputs.
    """

    num_classes: int
    downsample: int = 2
    pairwise: bool = True  # False: the inputs alone (plain logistic regression)

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        k = self.downsample
        if k > 1:
            window = (k,) * (x.ndim - 2)  # every axis but batch and channels
            x = nn.avg_pool(x, window, strides=window)
        f = x.reshape((x.shape[0], -1))
        features = f
        if self.pairwise:
            i, j = jnp.triu_indices(f.shape[1])
            features = jnp.concatenate([f, f[:, i] * f[:, j]], axis=1)
        return nn.Dense(self.num_classes)(features)


def rescale_layers(variables, alpha: float, first: str = "Dense_0", second: str = "Dense_1"):
    """Dinh et al. (2017)'s reparameterisation of a ReLU network: layer ``first`` (kernel and
    bias) × α and the next layer ``second``'s kernel × 1/α. ReLU(αz) = α·ReLU(z) for α > 0,
    so the function, and every loss and accuracy, is unchanged, while the curvature of the
    two layers' blocks scales by 1/α² and α²: the Hessian's eigenvalues, its trace and
    Keskar's ε-sharpness move, and scale-invariant measures do not.

    Args:
      variables: ``{"params": {first: {"kernel", "bias"}, second: {"kernel", ...}, ...}}`` (or
        the ``params`` dict itself), with nothing but a ReLU between the two layers (no
        BatchNorm).
      alpha: the factor, > 0.

    Raises:
      ValueError: α ≤ 0 or a layer not found.

    >>> import jax, jax.numpy as jnp
    >>> model = MLP(widths=(8,), num_classes=3)
    >>> x = jnp.ones((2, 5))
    >>> v = model.init(jax.random.key(0), x)
    >>> w = rescale_layers(v, 10.0)
    >>> bool(jnp.allclose(model.apply(v, x), model.apply(w, x), rtol=1e-5, atol=1e-6))
    True
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0 (ReLU is positively homogeneous), got {alpha}")
    nested = "params" in variables
    params = dict(variables["params"] if nested else variables)
    for name in (first, second):
        if name not in params:
            raise ValueError(f"no layer {name!r} in the parameters; layers: {sorted(params)}")
    params[first] = {k: v * alpha for k, v in params[first].items()}
    params[second] = {k: v / alpha if k == "kernel" else v for k, v in params[second].items()}
    return {**variables, "params": params} if nested else params
