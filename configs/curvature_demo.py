"""Curvature demo: the top Hessian eigenvalues of a small MLP tracked along training.

    python -m experiments.curvature_demo --workdir=runs/curvature_demo

A 40-128-128-10 tanh MLP on MNIST-1D (embedded), Adam 1e-3, batch 128, ~3000 steps; the top
``curvature.k`` eigenvalues every ``curvature.every_steps`` steps on a fixed subset of
``curvature.examples`` training examples (warm-started Lanczos), then the full spectrum
picture at the end. About a minute on 2 CPU cores. Variant ``tiny``: ~30 s (mostly compilation).
"""

import ml_collections

from configs import base


def get_config(arg=None):
    c = base.base()
    c.name = "curvature_demo"
    c.model.kwargs = ml_collections.ConfigDict({"widths": (128, 128), "activation": "tanh"})
    c.batch_size = 128
    c.num_epochs = 96  # 31 steps per epoch on MNIST-1D's 4000 examples: ~3000 steps
    c.eval_every_epochs = 16
    c.log_every_steps = 100
    c.curvature = ml_collections.ConfigDict()
    c.curvature.k = 5  # top eigenvalues tracked
    c.curvature.every_steps = 500
    c.curvature.examples = 1024  # the fixed curvature subset
    c.curvature.final_k = 10  # top eigenpairs measured at the end

    def tiny(c):
        base.tiny(c)
        c.eval_every_epochs = 1
        c.curvature.k = 2
        c.curvature.every_steps = 4
        c.curvature.examples = 64
        c.curvature.final_k = 3

    return base.with_variants(c, arg, {"tiny": tiny})
