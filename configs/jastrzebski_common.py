"""Shared settings of Jastrzębski et al. (2019): plain SGD, batch 128, and the sections read by
the two studies (``config.sharpest`` for `sharp_minima.studies.sharpest_directions`,
``config.nsgd`` for `sharp_minima.studies.nudged_sgd`; training ignores both)."""

from __future__ import annotations

import ml_collections

from configs import base


def sgd_cifar(
    name: str,
    model: str,
    *,
    learning_rate: float,
    weight_decay: float = 0.0,
    augment: bool = False,
    num_epochs: int = 200,
) -> ml_collections.ConfigDict:
    c = base.base()
    c.name = name
    c.model.name = model
    c.model.kwargs = ml_collections.ConfigDict()
    c.data.name = "cifar10"
    c.data.augment = augment
    c.batch_size = 128
    c.num_epochs = num_epochs
    c.optim.name = "sgd"
    c.optim.learning_rate = learning_rate
    c.optim.weight_decay = weight_decay
    return c


def curvature() -> ml_collections.ConfigDict:
    """How the top Hessian eigenvalues are tracked (the paper: top 10, ARPACK on ~2,500
    training examples, every iteration early on and every epoch later)."""
    t = ml_collections.ConfigDict()
    t.k = 10
    t.fraction = 0.05  # of the training set; num_examples > 0 overrides it
    t.num_examples = 0
    t.batch_size = 500  # examples per HVP batch
    t.resample = False  # a fresh subset at every measurement
    t.every_steps = 10  # early in training ...
    t.until_step = 200  # ... up to this step; then once per epoch
    t.stochastic = 0  # > 0: Hutchinson ||H||_F and Hutch++ trace with this many HVPs
    t.tol = 1e-4
    return t


def sharpest(learning_rate: float, batch_size: int) -> ml_collections.ConfigDict:
    """``config.sharpest``: the runs of Sec. 3 (Figs. 2–7, 12, 13)."""
    s = ml_collections.ConfigDict()
    s.curvature = curvature()
    # Figs. 2, 4, 13: eigenvalue evolution. The base run is (config lr, batch, momentum 0).
    s.learning_rates = (learning_rate / 10, learning_rate / 3, learning_rate)
    s.batch_sizes = (batch_size // 4, batch_size, batch_size * 4)
    s.momenta = (0.9,)  # beyond momentum 0 (Fig. 13)
    # Figs. 5, 6: the SGD step against the sharpest directions, at every measurement.
    s.probe_learning_rate = learning_rate / 10  # the run probed (the paper: eta = 0.01)
    s.num_grads = 10
    s.alphas = (0.25, 0.5, 1.0, 2.0, 4.0)
    s.line_points = 21  # k in [-5, 5]
    s.early_epochs = 6  # "early in training" for the alpha-sweep claim
    # Figs. 3, 9: full-batch gradient descent on the first `gd_examples` training examples.
    s.gd_examples = 2560
    s.gd_learning_rates = (0.01, 0.05)
    s.gd_steps = 1000
    s.gd_every_steps = 20
    # Fig. 7: SGD variants restarted from the base run at `variants_from_epoch`.
    s.variants_from_epoch = 4
    s.variants_epochs = 2
    s.variants_every_steps = 10  # e_1 recomputed (and the curves measured) this often
    # Fig. 12: eta = lr for L epochs, then lr / 10.
    s.schedule_first_epochs = (10, 20, 40, 80)
    s.seeds = 1  # one seed per run (more are not implemented: the seed claims read not tested)
    # The claims' thresholds, fixed before the run (each with its origin in the study's Claim).
    s.claims = ml_collections.ConfigDict()
    s.claims.peak_growth = 1.5  # λ_max peak ≥ 1.5× its first value (Fig. 2)
    s.claims.late_plateau = 0.15  # a late peak: the last quarter within 15 % of it
    s.claims.edge_band = (0.8, 1.2)  # full-batch GD: λ_max within 0.8–1.2× 2/η (Cohen et al.)
    s.claims.alignment_ratio = 5.0  # top-5 |cos| ≥ 5× random (Fig. 5: about 10×)
    s.claims.similar_loss = 0.25  # "similar loss": within 25 % of SGD's (Fig. 7)
    return s


def nsgd(learning_rate: float) -> ml_collections.ConfigDict:
    """``config.nsgd``: Sec. 4 and App. C (Tables 1–6). NSGD's base η is
    ``config.optim.learning_rate``; ``learning_rate`` sets the SGD baselines around it."""
    n = ml_collections.ConfigDict()
    n.curvature = curvature()
    # Directions are recomputed at the start of every epoch (not by steps); K is each run's
    # (ks, k), frobenius_k for the norms.
    for unused in ("every_steps", "until_step", "k"):
        del n.curvature[unused]
    n.ks = (1, 5, 10, 20)  # K swept at gamma = gammas[0]
    n.gammas = (0.01, 0.1, 1.0, 5.0)  # swept at K = k
    n.k = 5
    n.baseline_learning_rates = (learning_rate / 2, learning_rate * 10)  # SGD(0.005), SGD(0.1)
    n.momentum = 0.0  # Table 4: 0.9
    n.plateau_patience = 100  # epochs without a better validation loss before eta / 10
    n.frobenius_k = 50  # ||H||_F from the top 50 at the best validation epoch and the end
    n.val_epoch = 50  # "Val. acc. (50)"
    n.seeds = 2
    return n
