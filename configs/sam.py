"""Sharpness-aware minimisation: SAM, ASAM and m-sharpness against SGD
(`sharp_minima.studies.sam`).

    python -m experiments.sam --workdir=runs/sam   # this CPU-sized config

Default (CPU-sized, about 15 minutes on 2 cores): a ReLU MLP 40-128-128-10 on the embedded
MNIST-1D (3,600 training examples, 400 held out for validation, 1,000 test), heavy-ball SGD
(η = 0.05, μ = 0.9, batch 128), 60 epochs, 3 seeds per arm, test accuracy at the epoch of
the best validation accuracy. Five sections (``--config.sections=label_noise,eos`` runs two):

- ``label_noise``: SGD, SAM and ASAM with 40 % symmetric label noise;
- ``m_sweep``: SAM's test accuracy against the group size m of m-sharpness;
- ``curvature``: λ_max, tr H and adaptive sharpness of SGD's and SAM's minima, λ_max along
  training;
- ``eos``: SAM's edge of stability, on a quadratic and in full-batch training;
- ``late_phase``: SGD, then SAM for the last 20 % of the epochs, against SGD and SAM.

Variants: ``cifar10`` (the sources' setting for GPU/TPU users: ResNet-32 with BatchNorm on
CIFAR-10 with augmentation, η = 0.1 cosine, weight decay 5e-4, 200 epochs, ρ = 0.05 —
the model zoo has no WRN-28-10, so the sources' numbers are context, not a target);
``fashion`` (a 784-128-128-10 MLP on 10,000 Fashion-MNIST examples); ``tiny`` (seconds, for
tests).
"""

import ml_collections

from configs import base


def get_config(arg=None):
    c = base.base()
    c.name = "sam"
    c.model.name = "mlp"
    c.model.kwargs = ml_collections.ConfigDict({"widths": (128, 128)})
    c.data.name = "mnist1d"
    c.data.validation_fraction = 0.1  # early stopping: the epoch of the best validation accuracy
    c.data.options.label_noise = 0.0  # the study's data are clean; label_noise loads its own
    c.batch_size = 128
    c.num_epochs = 60
    c.eval_every_epochs = 1
    c.eval_train_examples = 1000
    c.log_every_steps = 100
    c.optim.name = "momentum"
    c.optim.learning_rate = 0.05
    c.optim.momentum = 0.9
    c.checkpoint.keep = 1
    # By name, in any order (they run in the study's order); on the command line a comma
    # list: --config.sections=label_noise,eos.
    c.sections = ("label_noise", "m_sweep", "curvature", "eos", "late_phase")

    s = c.sam_study = ml_collections.ConfigDict()
    s.seeds = 3  # every claim needs ≥ 3
    # SAM's ρ for label_noise, curvature and late_phase: picked from {0.05, 0.2, 0.5} on one
    # scouting seed with 40 % label noise (the sources tune ρ on held-out data; Foret et al.
    # use 0.05 on CIFAR). ASAM's ρ: davda54's and SamsungLabs' CIFAR-10 value, not tuned here.
    s.rho = 0.5
    s.rho_origin = (
        "picked from 0.05, 0.2 and 0.5 in one scouting run under label noise, before this run"
    )
    s.asam_rho = 2.0
    s.curvature_examples = 1000  # training examples for λ_max, tr H, adaptive sharpness
    s.curvature_batch_size = 1000

    n = s.label_noise = ml_collections.ConfigDict()
    n.fraction = 0.4  # symmetric: a label is replaced by another class with probability 0.4
    n.claims = ml_collections.ConfigDict()  # fixed before the run
    n.claims.gain = 0.0  # SAM (ASAM) beats SGD's early-stopped test accuracy: gain > 0

    m = s.m_sweep = ml_collections.ConfigDict()
    m.group_sizes = (128, 32, 8, 2)  # batch, batch/4, batch/16, small
    m.rho = 0.05  # Foret et al.'s default; one ρ for every m (Andriushchenko & Flammarion)
    m.claims = ml_collections.ConfigDict()
    m.claims.gain = 0.0  # the smallest m beats m = batch: gain > 0

    v = s.curvature = ml_collections.ConfigDict()
    v.every_epochs = 5  # λ_max along training
    v.trace_matvecs = 60  # Hutch++
    v.adaptive_epsilon = 0.01  # adaptive sharpness: the box |δ_i| ≤ ε|w_i| (Kwon et al.)
    v.tol = 1e-3  # the eigensolver's relative tolerance
    v.claims = ml_collections.ConfigDict()
    v.claims.ratio = 1.0  # SGD's value / SAM's > 1 for λ_max, tr H and adaptive sharpness

    e = s.eos = ml_collections.ConfigDict()
    e.widths = (64, 64)  # the full-batch MLP (its own, smaller model)
    e.examples = 1000  # full batch: the first 1,000 training examples
    e.learning_rate = 0.2  # plain GD, no momentum: 2/η = 10
    e.rho = 0.05
    e.steps = 2000
    e.every_steps = 25  # λ_max and ‖g‖
    e.quadratic_lambdas = 41  # the quadratic's grid of curvatures, λ_SAM × [0.9, 1.1]
    e.quadratic_grad_norms = (0.1, 1.0)  # ‖g‖, held by the quadratic's linear direction
    e.quadratic_steps = 400
    e.claims = ml_collections.ConfigDict()
    e.claims.quadratic_tol = 0.01  # the quadratic's stability edge within 1 % of λ_SAM
    # "settles at": the median of λ_max / threshold over the second half of training within
    # 20 % of 1 (an equivalence margin; Cohen et al.'s GD sits within a few % of 2/η)
    e.claims.margin = 0.2

    p = s.late_phase = ml_collections.ConfigDict()
    p.fraction = 0.2  # SAM for the last 20 % of the epochs (Zhou et al.: the last 10-20 %)
    p.claims = ml_collections.ConfigDict()
    p.claims.share = 0.5  # "most of full SAM's gain": (late − SGD) / (SAM − SGD) > 0.5

    def tiny(c):
        base.tiny(c)
        c.data.max_train = 320
        c.model.kwargs.widths = (16,)
        c.num_epochs = 2
        c.eval_train_examples = 64
        s.seeds = 1
        s.curvature_examples = 64
        s.curvature_batch_size = 64
        m.group_sizes = (32, 8)
        v.every_epochs = 1
        v.trace_matvecs = 8
        e.widths = (16,)
        e.examples = 64
        e.steps = 8
        e.every_steps = 4
        e.quadratic_lambdas = 5
        e.quadratic_steps = 20
        p.fraction = 0.5

    def fashion(c):
        c.model.kwargs.widths = (128, 128)
        c.data.name = "fashion_mnist"
        c.data.max_train = 10_000

    def cifar10(c):
        c.model.name = "resnet32_bn"
        c.model.kwargs = ml_collections.ConfigDict()
        c.data.name = "cifar10"
        c.data.augment = True
        c.data.validation_fraction = 0.1
        c.batch_size = 128
        c.num_epochs = 200
        c.optim.learning_rate = 0.1
        c.optim.weight_decay = 5e-4
        c.schedule.name = "cosine"
        c.eval_train_examples = 10_000
        s.rho = 0.05
        s.rho_origin = "Foret et al.'s CIFAR value"
        s.curvature_batch_size = 250
        m.group_sizes = (128, 32, 8, 4)
        e.widths = (256, 256)  # the full-batch MLP on 1,000 flattened CIFAR images
        e.learning_rate = 0.05

    return base.with_variants(c, arg, {"tiny": tiny, "fashion": fashion, "cifar10": cifar10})
