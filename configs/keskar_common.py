"""Shared settings of Keskar et al. (2017)'s networks: ADAM, small batch 256, large batch 10%
of the training set (variants ``sb`` and ``lb``)."""

from __future__ import annotations

import ml_collections

from configs import base

SMALL_BATCH = 256
LARGE_BATCH_FRACTION = 0.1


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
    return c


def small_batch(c):
    c.batch_size = SMALL_BATCH


def large_batch_of(num_train: int):
    def large_batch(c):
        c.batch_size = int(LARGE_BATCH_FRACTION * num_train)

    return large_batch
