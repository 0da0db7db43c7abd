"""F1 (Keskar et al. 2017): MNIST MLP 784-[512 BN ReLU]x5-10, ADAM, batch 256.

Variants: ``sb`` (batch 256), ``lb`` (batch 6000 = 10% of MNIST), ``fashion`` (Fashion-MNIST,
e.g. from Debian's dataset-fashion-mnist), ``tiny``. Example: ``configs/f1.py:lb,fashion``.
"""

from configs import base
from configs import keskar_common as kc


def get_config(arg=None):
    c = kc.keskar("f1", "mnist", num_epochs=20, width=512, depth=5)

    def fashion(c):
        c.data.name = "fashion_mnist"

    def tiny(c):
        kc.tiny_study(c)
        c.model.kwargs.width = 32

    return base.with_variants(
        c,
        arg,
        {"sb": kc.small_batch, "lb": kc.large_batch_of(60_000), "fashion": fashion, "tiny": tiny},
    )
