"""VGG-11 on CIFAR-10 (Jastrzębski et al. 2019), SGD, batch 128, L2 5e-4, augmentation.

Variants: ``tiny``.
"""

from configs import base
from configs import jastrzebski_common as jc


def get_config(arg=None):
    c = jc.sgd_cifar("vgg11", "vgg11", learning_rate=0.05, weight_decay=5e-4, augment=True)
    return base.with_variants(c, arg, {})
