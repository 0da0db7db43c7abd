"""Convolutional nets: Keskar's C1-C4, VGG-11 and Jastrzębski et al.'s SimpleCNN."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn


def _bn(train):
    return nn.BatchNorm(use_running_average=not train, momentum=0.9)


class ShallowConv(nn.Module):
    """C1/C3 (Keskar et al. 2017): an AlexNet-like shallow conv net.

    [conv64 5x5 -> BN -> ReLU -> maxpool 3x3/2] x2 -> dense384 -> BN -> ReLU -> dropout .5
    -> dense192 -> BN -> ReLU -> dropout .5 -> classes.
    """

    num_classes: int = 10
    width: int = 64
    dropout: float = 0.5

    @nn.compact
    def __call__(self, x, train: bool = False):
        for _ in range(2):
            x = nn.Conv(self.width, (5, 5), use_bias=False)(x)
            x = nn.relu(_bn(train)(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        x = x.reshape((x.shape[0], -1))
        for width in (384, 192):
            x = nn.relu(_bn(train)(nn.Dense(width, use_bias=False)(x)))
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)


VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    """VGG-style net: 3x3 convs with BN+ReLU (``"M"`` = 2x2 max-pool), then dense layers.

    C2/C4 of Keskar et al. use the VGG-16 layout with dropout and one dense-512 layer; VGG-11
    of Jastrzębski et al. uses the VGG-11 layout. ``width_multiplier`` scales every layer
    (handy for tiny tests).
    """

    layout: Sequence = VGG16
    num_classes: int = 10
    dense: Sequence[int] = (512,)
    batch_norm: bool = True
    dropout: float = 0.5
    conv_dropout: float = 0.0
    width_multiplier: float = 1.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        for item in self.layout:
            if item == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
                continue
            x = nn.Conv(
                max(1, int(item * self.width_multiplier)), (3, 3), use_bias=not self.batch_norm
            )(x)
            if self.batch_norm:
                x = _bn(train)(x)
            x = nn.relu(x)
            if self.conv_dropout:
                x = nn.Dropout(self.conv_dropout, deterministic=not train)(x)
        x = x.reshape((x.shape[0], -1))
        for width in self.dense:
            x = nn.Dense(max(1, int(width * self.width_multiplier)), use_bias=not self.batch_norm)(
                x
            )
            if self.batch_norm:
                x = _bn(train)(x)
            x = nn.relu(x)
            if self.dropout:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)


class SimpleCNN(nn.Module):
    """SimpleCNN (Jastrzębski et al. 2019): 4 convs [32, 32, pool, 64, 64, pool] -> dense128."""

    num_classes: int = 10
    widths: Sequence[int] = (32, 32, 64, 64)
    kernel_size: int = 3
    dense: int = 128

    @nn.compact
    def __call__(self, x, train: bool = False):
        k = (self.kernel_size, self.kernel_size)
        for i, width in enumerate(self.widths):
            x = nn.relu(nn.Conv(width, k)(x))
            if i % 2 == 1:
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.dense)(x))
        return nn.Dense(self.num_classes)(x)


def c1(num_classes=10, **kw):
    return ShallowConv(num_classes=num_classes, **kw)


def c3(num_classes=100, **kw):
    return ShallowConv(num_classes=num_classes, **kw)


def c2(num_classes=10, **kw):
    return VGG(VGG16, num_classes=num_classes, conv_dropout=kw.pop("conv_dropout", 0.0), **kw)


def c4(num_classes=100, **kw):
    return VGG(VGG16, num_classes=num_classes, **kw)


def vgg11(num_classes=10, **kw):
    kw.setdefault("dense", ())
    kw.setdefault("dropout", 0.0)
    return VGG(VGG11, num_classes=num_classes, **kw)
