"""C2: VGG-16-like conv net (BN, dropout) on CIFAR-10 (Keskar et al. 2017), ADAM, batch 256.

Variants: ``sb`` (batch 256), ``lb`` (batch 5000 = 10% of the training set), ``augment``
(random crop + flip, their Table 6), ``tiny``. Needs cifar10 from TFDS (see README, "Data").
"""

from configs import base
from configs import keskar_common as kc


def get_config(arg=None):
    c = kc.keskar("c2", "cifar10", num_epochs=100, width_multiplier=1.0)

    def tiny(c):
        kc.tiny_study(c)
        c.model.kwargs.width_multiplier = 1 / 16

    def augment(c):
        c.data.augment = True

    return base.with_variants(
        c,
        arg,
        {"sb": kc.small_batch, "lb": kc.large_batch_of(50_000), "augment": augment, "tiny": tiny},
    )
