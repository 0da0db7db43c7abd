"""ResNet-32 without BatchNorm (initialisation scaled down with depth), as in Jastrzębski et
al. (2019), on CIFAR-10 with SGD, batch 128, L2 5e-4, augmentation.

Variants: ``bn`` (the usual ResNet-32 with BatchNorm), ``tiny``.
"""

from configs import base
from configs import jastrzebski_common as jc


def get_config(arg=None):
    c = jc.sgd_cifar("resnet32", "resnet32", learning_rate=0.05, weight_decay=5e-4, augment=True)

    def bn(c):
        c.model.name = "resnet32_bn"

    return base.with_variants(c, arg, {"bn": bn})
