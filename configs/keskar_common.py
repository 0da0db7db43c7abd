"""Shared settings of Keskar et al. (2017)'s networks: ADAM, small batch 256, large batch 10%
of the training set (variants ``sb`` and ``lb``)."""

from __future__ import annotations

import ml_collections

from configs import base

SMALL_BATCH = 256
LARGE_BATCH_FRACTION = 0.1


def study(seeds: int = 5) -> ml_collections.ConfigDict:
    """The ``config.keskar`` section read by ``experiments.keskar`` (ignored by training)."""
    k = ml_collections.ConfigDict()
    k.seeds = seeds
    k.small_batch = SMALL_BATCH
    k.large_batch_fraction = LARGE_BATCH_FRACTION  # LB = this fraction of the training set
    k.epsilons = (1e-3, 5e-4)
    k.subspace_dim = 100  # p of the random n×p matrix A (Table 4); 0 = skip the subspace
    k.max_iter = 10  # L-BFGS-B iterations
    k.sharpness_examples = 0  # training examples in f (0 = the whole training set)
    k.sharpness_batch_size = 1000
    k.average_sigma = 0.0  # > 0: also Gaussian average sharpness E f(x + σz) − f(x)
    k.average_samples = 100
    k.interpolation_points = 31  # α on [−1, 2] (Fig. 3)
    k.interpolation_examples = 10_000  # training examples in the train curves
    k.curved_path = True  # also the path cos(απ/2) x_SB + sin(απ/2) x_LB
    k.batch_sweep = ()  # extra batch sizes: sharpness and test accuracy vs batch size (Fig. 4)
    k.sweep_seeds = 1
    k.augment = False  # Table 6: SB and LB with data augmentation too
    k.conservative = 0.0  # Table 7: λ > 0 adds LB with conservative (proximal) training
    k.conservative_inner_steps = 3
    return k


def keskar(model: str, data: str, num_epochs: int, **model_kwargs) -> ml_collections.ConfigDict:
    c = base.base()
    c.name = model
    c.model.name = model
    c.model.kwargs = ml_collections.ConfigDict(model_kwargs)
    c.data.name = data
    c.batch_size = SMALL_BATCH
    c.num_epochs = num_epochs
    c.optim.name = "adam"
    c.optim.learning_rate = 1e-3
    # Train "until the training loss stops improving" (or num_epochs).
    c.early_stop.metric = "train/loss"
    c.early_stop.patience = 5
    c.early_stop.min_delta = 1e-4
    c.keskar = study()
    return c


def tiny_study(c):
    """Test-sized study: 1 seed, few sharpness/interpolation points."""
    base.tiny(c)
    c.keskar.seeds = 1
    c.keskar.small_batch = 32
    c.keskar.subspace_dim = 4
    c.keskar.max_iter = 2
    c.keskar.sharpness_batch_size = 64
    c.keskar.interpolation_points = 4
    c.keskar.interpolation_examples = 64
    c.early_stop.patience = 0


def small_batch(c):
    c.batch_size = SMALL_BATCH


def large_batch_of(num_train: int):
    def large_batch(c):
        c.batch_size = int(LARGE_BATCH_FRACTION * num_train)

    return large_batch


def conv_net(name: str, data: str, arg, *, tiny_kwargs: dict, **model_kwargs):
    """C1–C4 on CIFAR: ADAM, batch 256, 100 epochs at most; variants ``sb``, ``lb`` (batch
    5000 = 10% of CIFAR's 50k), ``augment`` (random crop + flip, Table 6), ``tiny``."""
    c = keskar(name, data, num_epochs=100, **model_kwargs)

    def tiny(c):
        tiny_study(c)
        c.model.kwargs.update(tiny_kwargs)

    def augment(c):
        c.data.augment = True

    variants = {"sb": small_batch, "lb": large_batch_of(50_000), "augment": augment, "tiny": tiny}
    return base.with_variants(c, arg, variants)
