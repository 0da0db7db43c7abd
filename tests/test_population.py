"""The population loop (`sharp_minima.train.Population`) and the schedules by epoch
(`train.epoch_schedule`): against the trainer's own steps taken by hand, the schedules read
at every chunk, the stop at a target."""

import jax
import numpy as np
import pytest

from sharp_minima import data as data_lib
from sharp_minima import train
from sharp_minima.models import get_model


@pytest.fixture(scope="module")
def population():
    data = data_lib.load("mnist1d", max_train=64, seed=0)
    return train.Population(get_model("mlp", num_classes=10, widths=(8,)), data, jax.random.key(3))


def test_epoch_schedules_by_hand():
    gradual = train.epoch_schedule(0.4, warmup_epochs=2, warmup_from=0.1)
    constant = train.epoch_schedule(0.4, warmup_epochs=2, warmup_from=0.1, warmup="constant")
    assert [gradual(e) for e in (0, 1, 2)] == pytest.approx([0.1, 0.25, 0.4])
    assert [constant(e) for e in (0, 1.99, 2)] == [0.1, 0.1, 0.4]
    grow = train.epoch_schedule(16, boundaries_epochs=(1, 2), factor=2)
    assert [grow(e) for e in (0, 1 - 1e-12, 2, 9)] == [16, 32, 64, 64]  # float epochs count
    with pytest.raises(ValueError, match="warmup"):
        train.epoch_schedule(0.1, warmup="cosine")
    with pytest.raises(ValueError, match="increase"):
        train.epoch_schedule(0.1, boundaries_epochs=(2, 1), factor=0.5)


def test_population_equals_the_trainers_steps_taken_by_hand(population):
    pop = population
    rate = train.epoch_schedule(0.2, boundaries_epochs=(1,), factor=0.5)
    out = pop.train(
        seeds=[0, 0, 1], learning_rates=[rate] * 3, batch_size=16, num_epochs=2, evals_per_epoch=2
    )
    np.testing.assert_allclose(out["epochs"], [0, 0.5, 1, 1.5, 2])
    assert out["steps"].tolist() == [0, 2, 4, 6, 8] and out["train_loss"].shape == (5, 3)
    np.testing.assert_allclose(out["learning_rate"][:, 0], [0.2, 0.2, 0.1, 0.1])
    np.testing.assert_array_equal(out["params"][0], out["params"][1])  # same seed, same run
    assert not np.allclose(out["params"][0], out["params"][2])
    # By hand: member 0's epoch order from its seed, the rate halved after one epoch.
    rng = np.random.default_rng([0, 7])
    order = np.concatenate([rng.permutation(64), rng.permutation(64)]).reshape(8, 16)
    params = pop.init([0])
    state = pop.trainer.init(params, learning_rates=np.array([0.2]))
    params, state, _ = pop.trainer.epoch(params, state, pop.train_data, order[None, :4])
    state = pop.trainer.set_learning_rates(state, np.array([0.1]))
    params, state, _ = pop.trainer.epoch(params, state, pop.train_data, order[None, 4:])
    np.testing.assert_allclose(pop.flat(params)[0], out["params"][0], rtol=1e-6, atol=1e-7)
    loss = pop.evaluate(params, pop.test_data)["loss"]
    np.testing.assert_allclose(out["test_loss"][-1, 0], loss[0], rtol=1e-6)


def test_population_stops_once_every_seed_reaches_the_target(population):
    pop = population
    first = pop.train(seeds=[0], learning_rates=[train.epoch_schedule(0.0)], batch_size=16,
                      max_steps=1)  # fmt: skip
    target = float(first["train_loss"][0, 0]) + 1.0  # met at the first evaluation
    out = pop.train(
        seeds=[0, 1],
        learning_rates=[train.epoch_schedule(0.1)] * 2,
        batch_size=8,
        max_steps=100,
        target=target,
    )
    assert out["steps"].tolist() == [0, 8] and (out["target_step"] == 8).all()
    np.testing.assert_array_equal(out["target_params"], out["params"])
    with pytest.raises(ValueError, match="num_epochs or max_steps"):
        pop.train(seeds=[0], learning_rates=[train.epoch_schedule(0.1)], batch_size=8)
