"""Shared settings of Jastrzębski et al. (2019)'s CIFAR-10 networks: plain SGD, batch 128."""

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
