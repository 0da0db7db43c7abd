"""Jastrzębski et al. (2019), Sec. 4: Nudged-SGD (NSGD) against SGD.

    python -m experiments.nudged_sgd --workdir=runs/nsgd   # this CPU-sized config

Default (CPU-sized, ~15 minutes on 2 cores): a ReLU MLP 784-128-128-10 on 10,000
Fashion-MNIST training examples (+ 2,000 held out for validation), base η = 0.05, S = 128,
30 epochs, 3 seeds (every claim needs ≥ 3); NSGD's directions are the top K Hessian
eigenvectors on a fixed 5% subset, recomputed at the start of every epoch; η ÷ 10 after 5
epochs without a better validation loss. Paper-scale variants (GPU/TPU):

- ``paper``: ResNet-32 on CIFAR-10, η = 0.01, S = 128, 2 seeds (Table 1);
- ``simplecnn``: the "medium" SimpleCNN (f = 100, k = 5) on CIFAR-10 (Table 2);
- ``lr01`` / ``momentum``: with ``paper``, η = 0.1 (Table 3) or momentum 0.9 (Table 4);
- ``fashion``: with ``simplecnn``, Fashion-MNIST (Table 5); ``cifar100``: with ``paper``
  (Table 6); ``imdb``: the IMDB CNN (App. F, Table 7: S = 8, K = 1, 3 seeds);
- ``mnist1d``: the embedded MNIST-1D; ``tiny``: ~35 s on 2 cores (mostly
  compilation), for tests.
"""

import ml_collections

from configs import base
from configs import jastrzebski_common as jc


def get_config(arg=None):
    c = base.base()
    c.name = "nudged_sgd"
    c.model.name = "mlp"
    c.model.kwargs = ml_collections.ConfigDict({"widths": (128, 128)})
    c.data.name = "fashion_mnist"
    c.data.max_train = 12_000
    c.data.validation_fraction = 1 / 6  # 10,000 train + 2,000 validation
    c.batch_size = 128
    c.num_epochs = 30
    c.eval_train_examples = 5000
    c.optim.name = "sgd"
    c.optim.learning_rate = 0.05
    c.log_every_steps = 100
    c.checkpoint.best_metric = "val/accuracy"
    c.nsgd = jc.nsgd(0.05)
    n = c.nsgd
    n.plateau_patience = 5
    n.frobenius_k = 20
    n.val_epoch = 5
    n.seeds = 3

    def paper(c):
        _cifar(c, "resnet32", weight_decay=5e-4, augment=True)

    def simplecnn(c):
        _cifar(c, "simplecnn")
        c.name = "nudged_sgd_simplecnn"
        c.model.kwargs = ml_collections.ConfigDict(
            {"widths": (100, 100, 200, 200), "kernel_size": 5, "dense": 256}
        )

    def lr01(c):
        c.optim.learning_rate = 0.1

    def momentum(c):
        c.nsgd.momentum = 0.9

    def fashion(c):
        c.data.name = "fashion_mnist"
        c.data.augment = False

    def cifar100(c):
        c.data.name = "cifar100"

    def imdb(c):
        c.name = "nudged_sgd_imdb"
        c.model.name = "imdb_cnn"
        c.model.kwargs = ml_collections.ConfigDict({"filters": 128, "dense": 128})
        c.data.name = "imdb"
        c.data.max_train = None
        c.data.validation_fraction = 0.1
        c.data.augment = False
        c.batch_size = 8
        c.num_epochs = 20
        n = c.nsgd
        n.ks = (1,)
        n.k = 1
        n.gammas = (0.1, 1.0, 5.0)
        n.seeds = 3

    def mnist1d(c):
        c.data.name = "mnist1d"
        c.data.max_train = None
        c.data.validation_fraction = 0.2
        c.model.kwargs.widths = (64, 64)
        c.num_epochs = 60

    def tiny(c):
        base.tiny(c)
        c.data.name = "mnist1d"
        c.data.max_train = 320
        c.data.validation_fraction = 0.2
        c.model.kwargs.widths = (16,)
        c.num_epochs = 3
        c.batch_size = 32
        n = c.nsgd
        n.ks = (1, 2)
        n.k = 2
        n.gammas = (0.1, 5.0)
        n.baseline_learning_rates = (0.5,)
        n.curvature.num_examples = 64
        n.curvature.batch_size = 32
        n.plateau_patience = 1
        n.frobenius_k = 3
        n.val_epoch = 2
        n.seeds = 1

    return base.with_variants(
        c,
        arg,
        {
            "paper": paper,
            "simplecnn": simplecnn,
            "lr01": lr01,
            "momentum": momentum,
            "fashion": fashion,
            "cifar100": cifar100,
            "imdb": imdb,
            "mnist1d": mnist1d,
            "tiny": tiny,
        },
    )


def _cifar(c, model, weight_decay=0.0, augment=False):
    """The paper's CIFAR-10 protocol (η = 0.01, S = 128, top-50 ‖H‖_F, 2 seeds)."""
    c.name = f"nudged_sgd_{model}"
    c.model.name = model
    c.model.kwargs = ml_collections.ConfigDict()
    c.data.name = "cifar10"
    c.data.max_train = None
    c.data.validation_fraction = 0.1
    c.data.augment = augment
    c.num_epochs = 200
    c.eval_train_examples = 10_000
    c.optim.learning_rate = 0.01
    c.optim.weight_decay = weight_decay
    n = c.nsgd
    n.baseline_learning_rates = (0.005, 0.1)
    n.frobenius_k = 50
    n.plateau_patience = 100
    n.val_epoch = 50
    n.seeds = 2
