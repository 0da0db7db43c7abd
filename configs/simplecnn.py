"""SimpleCNN (Jastrzębski et al. 2019): 4 conv 3x3 [32, 32, pool, 64, 64, pool] → dense 128 →
10 on CIFAR-10, plain SGD, batch 128.

Variants: ``fashion`` (Fashion-MNIST), ``tiny``.
"""

from configs import base


def get_config(arg=None):
    c = base.base()
    c.name = "simplecnn"
    c.model.name = "simplecnn"
    c.model.kwargs = base.ml_collections.ConfigDict()
    c.data.name = "cifar10"
    c.batch_size = 128
    c.num_epochs = 200
    c.optim.name = "sgd"
    c.optim.learning_rate = 0.01

    def fashion(c):
        c.data.name = "fashion_mnist"

    return base.with_variants(c, arg, {"fashion": fashion})
