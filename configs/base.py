"""Base config: every field a training run reads, with its default.

Named configs (``configs/f1.py`` …) start from `base` and override a few fields. A suffix picks
variants, comma-separated: ``--config=configs/f1.py:lb,fashion``. Every config accepts
``tiny`` (a seconds-long run on a few hundred examples, for tests and smoke checks).
Override any field from the command line: ``--config.optim.learning_rate=3e-4``; the config is
locked, so a misspelt field is an error.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections
from ml_collections import config_dict


def model_and_data() -> ml_collections.ConfigDict:
    """The fields every study reads: name, seed, the model and where its data comes from
    (`sharp_minima.train.load_data`, `sharp_minima.train.build_model`). A study that trains
    with the trainer starts from `base`; one that trains its own way (the populations of
    ``configs/sgd_noise.py``) starts here, so its config holds only fields it reads."""
    c = ml_collections.ConfigDict()
    c.name = "base"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "mlp"
    c.model.kwargs = ml_collections.ConfigDict({"widths": (128, 128)})

    c.data = ml_collections.ConfigDict()
    c.data.name = "mnist1d"
    c.data.data_dir = config_dict.placeholder(
        str
    )  # TFDS data folder (default ~/tensorflow_datasets)
    c.data.idx_dir = config_dict.placeholder(str)  # folder of MNIST-format IDX .gz files
    c.data.manual_dir = config_dict.placeholder(str)  # TIMIT / PTB files (see README)
    c.data.validation_fraction = 0.0
    c.data.max_train = config_dict.placeholder(int)
    c.data.seed = config_dict.placeholder(int)  # split seed; default: config.seed
    c.data.allow_download = True
    c.data.options = ml_collections.ConfigDict()
    return c


def base() -> ml_collections.ConfigDict:
    """Every field a training run reads (`sharp_minima.train.train`), with its default."""
    c = model_and_data()
    # 0 = every device (every host's after distributed init); on one host, the most devices
    # the batch size divides over (train.dividing_devices: a batch of 100 on 8 TPU cores: 4).
    c.num_devices = 0
    c.data.augment = False  # random crop (pad 4) + horizontal flip, on device

    c.batch_size = 128
    c.eval_batch_size = 1000
    c.eval_train_examples = 10_000  # training-set metrics on a fixed subset (0 = all)
    c.num_epochs = 10
    c.eval_every_epochs = 1

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adam"  # sgd momentum nesterov adam adamw rmsprop adagrad
    c.optim.learning_rate = 1e-3
    c.optim.momentum = 0.9
    c.optim.nesterov = False
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0  # L2 term λ/2‖w‖² in the loss (adamw: decoupled decay)
    # True: the decay is applied to the update (optax.add_decayed_weights; adamw's own), not
    # added to the loss; with SAM it then stays out of the gradient at the perturbed point.
    c.optim.decoupled = False
    c.optim.grad_clip_norm = 0.0  # 0 = no clipping
    # Conservative training (Keskar et al. Sec. 4.2): min f(x) + λ/2‖x − x_k‖², x_k renewed
    # every proximal_inner_steps steps; 0 = off.
    c.optim.proximal = 0.0
    c.optim.proximal_inner_steps = 3

    # Sharpness-aware minimisation (Foret et al. 2021; optim.sam), before the optimizer above:
    # rho = 0 is off. adaptive: ASAM (Kwon et al. 2021), T = |w| + eta. group_size: m of
    # m-sharpness (Andriushchenko & Flammarion 2022), dividing batch_size; 0 = the batch.
    c.sam = ml_collections.ConfigDict()
    c.sam.rho = 0.0
    c.sam.adaptive = False
    c.sam.eta = 0.01
    c.sam.group_size = 0

    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "constant"  # constant step cosine plateau
    c.schedule.warmup_epochs = 0.0
    c.schedule.base_batch_size = 0  # > 0: linear scaling rule lr·batch/base (Goyal et al.)
    c.schedule.boundaries_epochs = ()  # step decay by decay_factor at these epochs
    c.schedule.decay_factor = 0.1
    c.schedule.plateau_patience = 5  # epochs
    c.schedule.plateau_factor = 0.1

    c.early_stop = ml_collections.ConfigDict()
    c.early_stop.metric = "train/loss"
    c.early_stop.patience = 0  # evaluations without improvement; 0 = off
    c.early_stop.min_delta = 0.0
    # Train to a fit: stop at the first evaluation meeting every target, e.g.
    # ("train/accuracy>=0.995", "train/loss<=0.1"); num_epochs is then the cap.
    c.early_stop.targets = ()

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 0  # 0 = at each evaluation only
    # Also after every this many epochs between evaluations (a full-batch run of thousands of
    # one-step epochs saves with its evaluations instead: set it to eval_every_epochs).
    c.checkpoint.every_epochs = 1
    c.checkpoint.keep = 3
    c.checkpoint.best_metric = "auto"  # val/accuracy if validation_fraction > 0 else train/accuracy

    c.log_every_steps = 50
    c.progress = True
    c.tensorboard = False  # also write the metrics as TensorBoard events (needs tensorboardX)
    return c


def tiny(c: ml_collections.ConfigDict) -> None:
    """A run of a few seconds: a few hundred examples, one epoch, small evaluation."""
    c.data.max_train = 256
    c.batch_size = min(c.batch_size, 32)
    c.eval_batch_size = 128
    c.eval_train_examples = 128
    c.num_epochs = 1
    c.log_every_steps = 4


def with_variants(
    c: ml_collections.ConfigDict,
    arg: str | None,
    variants: dict[str, Callable[[ml_collections.ConfigDict], None]],
) -> ml_collections.ConfigDict:
    """Applies the comma-separated variants named in ``arg`` (``tiny`` unless ``variants``
    redefines it), then locks.

    Raises:
      ValueError: an unknown variant (the message lists the valid ones).
    """
    variants = {"tiny": tiny, **variants}
    names = list(filter(None, (arg or "").split(",")))
    c.smoke_test = "tiny" in names  # a tiny run's report gives no verdicts
    for name in names:
        if name not in variants:
            raise ValueError(
                f"unknown config variant {name!r} for {c.name}; valid: {', '.join(variants)}"
            )
        variants[name](c)
    c.lock()
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """A small MLP on MNIST-1D (embedded data), Adam."""
    return with_variants(base(), arg, {})
