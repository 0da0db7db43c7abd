"""CIFAR ResNets (He et al. 2016): ResNet-32 with or without BN, and a small SVHN ResNet."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


class BasicBlock(nn.Module):
    width: int
    stride: int
    batch_norm: bool
    init_scale: float

    @nn.compact
    def __call__(self, x, train: bool = False):
        init = nn.initializers.variance_scaling(2.0 * self.init_scale**2, "fan_in", "normal")
        y = nn.Conv(
            self.width,
            (3, 3),
            (self.stride, self.stride),
            use_bias=not self.batch_norm,
            kernel_init=init,
        )(x)
        if self.batch_norm:
            y = nn.BatchNorm(use_running_average=not train, momentum=0.9)(y)
        y = nn.relu(y)
        y = nn.Conv(self.width, (3, 3), use_bias=not self.batch_norm, kernel_init=init)(y)
        if self.batch_norm:
            y = nn.BatchNorm(
                use_running_average=not train, momentum=0.9, scale_init=nn.initializers.zeros
            )(y)
        if x.shape != y.shape:  # option A shortcut: subsample and zero-pad channels
            x = x[:, :: self.stride, :: self.stride, :]
            pad = self.width - x.shape[-1]
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (pad // 2, pad - pad // 2)))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """CIFAR-style ResNet with ``3 * blocks_per_stage`` basic blocks (depth 6n + 2).

    Without BatchNorm (Jastrzębski et al. 2019) the residual branches' initialisation is
    scaled down by ``1/sqrt(number of blocks)`` so the forward pass stays bounded with depth.
    """

    blocks_per_stage: int = 5
    widths: Sequence[int] = (16, 32, 64)
    num_classes: int = 10
    batch_norm: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        n_blocks = self.blocks_per_stage * len(self.widths)
        scale = 1.0 if self.batch_norm else n_blocks**-0.5
        x = nn.Conv(self.widths[0], (3, 3), use_bias=not self.batch_norm)(x)
        if self.batch_norm:
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        for stage, width in enumerate(self.widths):
            for b in range(self.blocks_per_stage):
                stride = 2 if stage > 0 and b == 0 else 1
                x = BasicBlock(width, stride, self.batch_norm, scale)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


def resnet32(num_classes=10, batch_norm=False, **kw):
    """ResNet-32 (5 blocks per stage); without BN by default, as in Jastrzębski et al."""
    return ResNet(5, num_classes=num_classes, batch_norm=batch_norm, **kw)


def resnet32_bn(num_classes=10, **kw):
    return ResNet(5, num_classes=num_classes, batch_norm=True, **kw)


def svhn_resnet(num_classes=10, **kw):
    """A small ResNet (ResNet-20 layout, BN) for the SVHN good/bad minima of Huang et al."""
    kw.setdefault("batch_norm", True)
    return ResNet(3, num_classes=num_classes, **kw)
