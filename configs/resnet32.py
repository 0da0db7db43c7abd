"""ResNet-32 without BatchNorm (initialisation scaled down with depth), as in Jastrzębski et
al. (2019), on CIFAR-10 with SGD, batch 128, L2 5e-4, augmentation.

Variants: ``bn`` (the usual ResNet-32 with BatchNorm), ``tiny``.
"""

from configs import base


def get_config(arg=None):
    c = base.base()
    c.name = "resnet32"
    c.model.name = "resnet32"
    c.model.kwargs = base.ml_collections.ConfigDict()
    c.data.name = "cifar10"
    c.data.augment = True
    c.batch_size = 128
    c.num_epochs = 200
    c.optim.name = "sgd"
    c.optim.learning_rate = 0.05
    c.optim.weight_decay = 5e-4

    def bn(c):
        c.model.name = "resnet32_bn"

    return base.with_variants(c, arg, {"bn": bn})
