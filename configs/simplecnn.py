"""SimpleCNN (Jastrzębski et al. 2019): 4 conv 3x3 [32, 32, pool, 64, 64, pool] → dense 128 →
10 on CIFAR-10, plain SGD, batch 128.

Variants: ``fashion`` (Fashion-MNIST), ``tiny``.
"""

from configs import base
from configs import jastrzebski_common as jc


def get_config(arg=None):
    c = jc.sgd_cifar("simplecnn", "simplecnn", learning_rate=0.01)

    def fashion(c):
        c.data.name = "fashion_mnist"

    return base.with_variants(c, arg, {"fashion": fashion})
