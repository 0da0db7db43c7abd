"""C3: shallow AlexNet-like conv net on CIFAR-100 (Keskar et al. 2017), ADAM, batch 256.

Variants: ``sb`` (batch 256), ``lb`` (batch 5000 = 10% of the training set), ``augment``
(random crop + flip, their Table 6), ``tiny``. Needs cifar100 from TFDS (see README, "Data").
"""

from configs import base
from configs import keskar_common as kc


def get_config(arg=None):
    c = kc.keskar("c3", "cifar100", num_epochs=100, width=64)

    def tiny(c):
        kc.tiny_study(c)
        c.model.kwargs.width = 4

    def augment(c):
        c.data.augment = True

    return base.with_variants(
        c,
        arg,
        {"sb": kc.small_batch, "lb": kc.large_batch_of(50_000), "augment": augment, "tiny": tiny},
    )
