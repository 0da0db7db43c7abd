"""Jastrzębski et al. (2019), Sec. 3: the sharpest directions along the SGD trajectory.

    python -m experiments.sharpest_directions --workdir=runs/sharpest   # this CPU-sized config

Default (CPU-sized, ~4.5 minutes on 2 cores): a ReLU MLP 784-128-128-10 on 10,000
Fashion-MNIST training examples (Debian's dataset-fashion-mnist, or TFDS), plain SGD, base
η = 0.1 and batch S = 128, 15 epochs; the top 5 Hessian eigenvalues on a fixed 5% subset every
10 steps up to step 300, then every epoch. Paper-scale variants (GPU/TPU; the paper's
CIFAR-10 models and its ~2,500-example curvature subset):

- ``paper``: SimpleCNN on CIFAR-10, η ∈ {0.01, 0.05, 0.1}, S ∈ {32, 128, 512}, 200 epochs;
- ``resnet32`` / ``resnet32_bn`` / ``vgg11``: the same protocol on those models (L2 5e-4 and
  augmentation, which the curvature loss then includes);
- ``ptb``: the 2-layer LSTM on PTB (Fig. 4), needs the PTB files (see the README);
- ``mnist1d``: the embedded MNIST-1D (no download, a smaller MLP);
- ``tiny``: ~40 s on 2 cores (mostly compilation), for tests.
"""

import ml_collections

from configs import base
from configs import jastrzebski_common as jc


def get_config(arg=None):
    c = base.base()
    c.name = "sharpest_directions"
    c.model.name = "mlp"
    c.model.kwargs = ml_collections.ConfigDict({"widths": (128, 128)})
    c.data.name = "fashion_mnist"
    c.data.max_train = 10_000
    c.data.validation_fraction = 0.0
    c.batch_size = 128
    c.num_epochs = 15
    c.eval_train_examples = 5000
    c.optim.name = "sgd"
    c.optim.learning_rate = 0.1
    c.log_every_steps = 50
    c.sharpest = jc.sharpest(0.1, 128)
    s = c.sharpest
    s.curvature.k = 5
    s.curvature.until_step = 300
    s.learning_rates = (0.01, 0.03, 0.1)
    s.batch_sizes = (32, 128, 512)
    s.probe_learning_rate = 0.01
    s.early_epochs = 6
    s.gd_learning_rates = (0.05, 0.1)
    s.gd_steps = 600
    s.gd_every_steps = 20
    s.schedule_first_epochs = (2, 5, 10)

    def paper(c):
        _cifar(c, "simplecnn", 0.1)

    def resnet32(c):
        _cifar(c, "resnet32", 0.1, weight_decay=5e-4, augment=True)

    def resnet32_bn(c):
        _cifar(c, "resnet32_bn", 0.1, weight_decay=5e-4, augment=True)

    def vgg11(c):
        _cifar(c, "vgg11", 0.1, weight_decay=5e-4, augment=True)

    def ptb(c):
        c.model.name = "lstm_ptb"
        c.model.kwargs = ml_collections.ConfigDict()
        c.data.name = "ptb"
        c.data.max_train = None
        c.batch_size = 20
        c.num_epochs = 40
        c.optim.learning_rate = 1.0
        s = c.sharpest
        s.learning_rates = (0.1, 0.3, 1.0)
        s.batch_sizes = (10, 20, 80)
        s.probe_learning_rate = 0.1
        s.gd_learning_rates = ()
        s.schedule_first_epochs = ()

    def mnist1d(c):
        c.data.name = "mnist1d"
        c.data.max_train = None
        c.model.kwargs.widths = (64, 64)
        c.num_epochs = 40
        c.sharpest.gd_examples = 2560
        c.sharpest.schedule_first_epochs = (5, 10, 20)

    def tiny(c):
        base.tiny(c)
        c.data.name = "mnist1d"
        c.model.kwargs.widths = (16,)
        c.num_epochs = 2
        c.batch_size = 32
        s = c.sharpest
        s.curvature.k = 2
        s.curvature.num_examples = 64
        s.curvature.batch_size = 32
        s.curvature.every_steps = 4
        s.curvature.until_step = 8
        s.learning_rates = (0.05, 0.1)
        s.batch_sizes = (16, 32)
        s.momenta = (0.9,)
        s.probe_learning_rate = 0.05
        s.num_grads = 2
        s.line_points = 5
        s.early_epochs = 1
        s.gd_examples = 64
        s.gd_learning_rates = (0.1,)
        s.gd_steps = 8
        s.gd_every_steps = 4
        s.variants_from_epoch = 1
        s.variants_epochs = 1
        s.variants_every_steps = 4
        s.schedule_first_epochs = (1,)

    return base.with_variants(
        c,
        arg,
        {
            "paper": paper,
            "resnet32": resnet32,
            "resnet32_bn": resnet32_bn,
            "vgg11": vgg11,
            "ptb": ptb,
            "mnist1d": mnist1d,
            "tiny": tiny,
        },
    )


def _cifar(c, model, lr, weight_decay=0.0, augment=False):
    """The paper's CIFAR-10 protocol for ``model``."""
    c.name = f"sharpest_directions_{model}"
    c.model.name = model
    c.model.kwargs = ml_collections.ConfigDict()
    c.data.name = "cifar10"
    c.data.max_train = None
    c.data.augment = augment
    c.num_epochs = 200
    c.eval_train_examples = 10_000
    c.optim.learning_rate = lr
    c.optim.weight_decay = weight_decay
    s = c.sharpest
    s.curvature.k = 10
    s.curvature.until_step = 400
    s.curvature.every_steps = 1  # every iteration early on (Fig. 2 bottom)
    s.learning_rates = (0.01, 0.05, 0.1)
    s.batch_sizes = (32, 128, 512)
    s.probe_learning_rate = 0.01
    s.gd_learning_rates = (0.01, 0.05)
    s.gd_steps = 2000
    s.schedule_first_epochs = (10, 20, 40, 80)
