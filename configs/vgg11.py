"""VGG-11 on CIFAR-10 (Jastrzębski et al. 2019), SGD, batch 128, L2 5e-4, augmentation.

Variants: ``tiny``.
"""

from configs import base


def get_config(arg=None):
    c = base.base()
    c.name = "vgg11"
    c.model.name = "vgg11"
    c.model.kwargs = base.ml_collections.ConfigDict()
    c.data.name = "cifar10"
    c.data.augment = True
    c.batch_size = 128
    c.num_epochs = 200
    c.optim.name = "sgd"
    c.optim.learning_rate = 0.05
    c.optim.weight_decay = 5e-4
    return base.with_variants(c, arg, {})
