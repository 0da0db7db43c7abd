"""C3: shallow AlexNet-like conv net on CIFAR-100 (Keskar et al. 2017), ADAM, batch 256.

Variants: ``sb`` (batch 256), ``lb`` (batch 5000 = 10% of the training set), ``augment``
(random crop + flip, their Table 6), ``tiny``. Needs cifar100 from TFDS (see README, "Data").
"""

from configs import keskar_common as kc


def get_config(arg=None):
    return kc.conv_net("c3", "cifar100", arg, width=64, tiny_kwargs={"width": 4})
