"""Swiss roll (Huang et al. 2020): 2-D two-class spiral, the authors' MLP 2-23-16-26-32-28-31-2.

Embedded data (generated, no download). Variants: ``tiny``.
"""

from configs import base


def get_config(arg=None):
    c = base.base()
    c.name = "swissroll"
    c.model.name = "swissroll_mlp"
    c.model.kwargs = base.ml_collections.ConfigDict({"widths": (23, 16, 26, 32, 28, 31)})
    c.data.name = "swissroll"
    c.batch_size = 128
    c.num_epochs = 100
    c.eval_train_examples = 0
    c.optim.name = "adam"
    c.optim.learning_rate = 1e-3
    return base.with_variants(c, arg, {})
