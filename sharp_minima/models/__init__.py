"""Flax Linen models of the four source works and a plain-dict registry.

Every model is called as ``model.apply(variables, x, train=...)``; BatchNorm uses running
averages when ``train=False``; dropout draws from the ``"dropout"`` RNG stream.

>>> from sharp_minima.models import get_model
>>> get_model("f1", num_classes=10).widths
(512, 512, 512, 512, 512)
"""

from __future__ import annotations

from sharp_minima.models import conv, mlp, resnet, sequence

MODELS = {
    "f1": mlp.f1,
    "f2": mlp.f2,
    "mlp": mlp.MLP,
    "swissroll_mlp": mlp.swissroll_mlp,
    "pairwise_linear": mlp.PairwiseLinear,
    "c1": conv.c1,
    "c2": conv.c2,
    "c3": conv.c3,
    "c4": conv.c4,
    "vgg11": conv.vgg11,
    "simplecnn": conv.SimpleCNN,
    "resnet32": resnet.resnet32,
    "resnet32_bn": resnet.resnet32_bn,
    "svhn_resnet": resnet.svhn_resnet,
    "lstm_ptb": sequence.lstm_ptb,
    "imdb_cnn": sequence.imdb_cnn,
}


def get_model(name: str, **kwargs):
    """Builds the model registered as ``name`` with keyword arguments ``kwargs``.

    Raises:
      ValueError: unknown name (the message lists the valid ones) or bad arguments.

    Args:
      name: a name of `MODELS`.
      **kwargs: the model's fields (e.g. ``widths``, ``num_classes``).

    Returns:
      The Flax module.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    try:
        return MODELS[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments for model {name!r}: {e}") from None
