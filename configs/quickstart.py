"""Quickstart of Keskar et al.'s study: an F1-like MLP on MNIST-1D (embedded, no download).

    python -m experiments.keskar --config=configs/quickstart.py --workdir=runs/quickstart

40-[256 BN ReLU]x3-10 with Adam, small batch 32 vs large batch 1000 (25% of the 4000
training examples), 3 seeds (a claim needs ≥ 3), full-space and 100-d subspace sharpness at
ε ∈ {1e-3, 5e-4} on the whole training set, the parametric plots. About 3–4 minutes on 2 CPU
cores.
Variants: ``tiny`` (~20 s on 2 cores, mostly compilation; for tests).
"""

from configs import base
from configs import keskar_common as kc


def get_config(arg=None):
    c = kc.keskar("mlp", "mnist1d", num_epochs=60, widths=(256, 256, 256), batch_norm=True)
    c.name = "quickstart"
    c.batch_size = 32
    c.eval_train_examples = 0
    c.log_every_steps = 100
    c.early_stop.patience = 0  # fixed budget: both regimes fit the training set
    k = c.keskar
    k.seeds = 3  # every claim needs ≥ 3 seeds (issue 29)
    k.small_batch = 32
    k.large_batch_fraction = 0.25
    k.interpolation_examples = 4000
    k.average_sigma = 0.01
    k.batch_sweep = ()

    def tiny(c):
        kc.tiny_study(c)
        c.model.kwargs.widths = (16, 16)

    return base.with_variants(c, arg, {"tiny": tiny})
