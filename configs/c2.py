"""C2: VGG-16-like conv net (BN, dropout) on CIFAR-10 (Keskar et al. 2017), ADAM, batch 256.

Variants: ``sb`` (batch 256), ``lb`` (batch 5000 = 10% of the training set), ``augment``
(random crop + flip, their Table 6), ``tiny``. Needs cifar10 from TFDS (see README, "Data").
"""

from configs import keskar_common as kc


def get_config(arg=None):
    return kc.conv_net(
        "c2", "cifar10", arg, width_multiplier=1.0, tiny_kwargs={"width_multiplier": 1 / 16}
    )
