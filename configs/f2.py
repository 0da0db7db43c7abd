"""F2 (Keskar et al. 2017): TIMIT MLP 360-[512 BN ReLU]x7-1973, ADAM, batch 256.

TIMIT is licensed (LDC) and has no TFDS builder: put ``train.npz`` and ``test.npz`` (arrays
``x`` (n, 360) float features and ``y`` (n,) int frame labels in [0, 1973)) in
``--config.data.manual_dir``. Variants: ``sb``, ``lb`` (batch 10% of the training frames —
set for the ~1.1M frames of the paper's setup), ``tiny``.
"""

from configs import base
from configs import keskar_common as kc


def get_config(arg=None):
    c = kc.keskar("f2", "timit", num_epochs=20, width=512, depth=7)
    return base.with_variants(c, arg, {"sb": kc.small_batch, "lb": kc.large_batch_of(1_100_000)})
