"""The population loop: many small copies of one classifier trained at once, with plain SGD,
each with its own seed and learning-rate schedule, on top of
`sharp_minima.dynamics.PopulationTrainer` (one vmapped step; an evaluation chunk of steps in
one ``lax.scan``).

`Population` owns the compiled code (the vmapped initialisation, the flattening of the
members' parameters, the trainer) and the data on the device; `Population.train` is the
loop: schedules (`sharp_minima.train.optimizer.epoch_schedule`, one per member, and the
batch size, all by epoch) read at the start of every chunk of about ``1/evals_per_epoch``
epochs, the training and test metrics after each chunk, a stop after a number of epochs or
steps or once a target training loss is reached, and a progress line every 20 seconds.

Member p starts from ``fold_in(key, seeds[p])`` and visits the examples in its own order (a
fresh permutation per epoch from NumPy's generator seeded with ``(seeds[p], 7)``), so two
members with the same seed start and train alike, whatever population they are in.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from sharp_minima import dynamics, losses

_RECORDED = ("steps", "epochs", "train_loss", "train_accuracy", "test_loss", "test_accuracy")
_PER_CHUNK = ("peak_loss", "learning_rate", "batch_size")


class _Order:
    """Each member's example order: a fresh permutation of the N examples per epoch,
    concatenated, drawn from the member's seed (the same seed, the same order)."""

    def __init__(self, seeds, num_examples: int):
        self.rngs = [np.random.default_rng([int(s), 7]) for s in seeds]
        self.buffers = [np.empty(0, np.int64) for _ in seeds]
        self.n = num_examples

    def take(self, steps: int, batch_size: int) -> np.ndarray:
        need, out = steps * batch_size, []
        for p, rng in enumerate(self.rngs):
            while len(self.buffers[p]) < need:
                self.buffers[p] = np.concatenate([self.buffers[p], rng.permutation(self.n)])
            out.append(self.buffers[p][:need].reshape(steps, batch_size))
            self.buffers[p] = self.buffers[p][need:]
        return np.stack(out).astype(np.int32)


class Population:
    """Members of one Flax classifier, trained at once with plain SGD (or ``optimizer``).

    The loss is `sharp_minima.losses.evaluation_loss` (BatchNorm in evaluation mode, dropout
    off: the population trains small models without them), the metrics
    `sharp_minima.losses.evaluation_metrics`.

    Args:
      model: the Flax classifier.
      data: the `sharp_minima.data.Dataset` (training and test arrays go to the device).
      key: the root of the members' initialisations (member p: ``fold_in(key, seed_p)``).
      optimizer: ``optimizer(learning_rate) -> optax.GradientTransformation``.

    Attributes:
      loss: ``loss(params, batch)``, for curvature and sharpness at a member's parameters.
      trainer: the `sharp_minima.dynamics.PopulationTrainer`.
      train_data, test_data: the examples as ``{"x", "y"}`` on the device.
      dim: the number of parameters of one member.
    """

    def __init__(self, model, data, key, *, optimizer: Callable = optax.sgd):
        self.model = model
        self.loss = losses.evaluation_loss(model)
        self.trainer = dynamics.PopulationTrainer(
            self.loss, optimizer, metrics_fn=losses.evaluation_metrics(model)
        )
        self.train_data = {"x": jnp.asarray(data.x_train), "y": jnp.asarray(data.y_train)}
        self.test_data = {"x": jnp.asarray(data.x_test), "y": jnp.asarray(data.y_test)}
        self.num_train, self.num_test = len(data.x_train), len(data.x_test)
        self.num_classes = data.num_classes
        self.key = key
        self._init = jax.jit(jax.vmap(model.init, in_axes=(0, None)))
        template = model.init(jax.random.key(0), self.train_data["x"][:1])
        flat, self._unravel = ravel_pytree(template)
        self.dim = flat.size
        self._flat = jax.jit(jax.vmap(lambda p: ravel_pytree(p)[0]))

    def init(self, seeds: Sequence[int]):
        """The initial parameters of members with these seeds (leading axis P).

        Args:
          seeds: one seed per member.

        Returns:
          The members' parameters.
        """
        keys = jnp.stack([jax.random.fold_in(self.key, int(s)) for s in seeds])
        return self._init(keys, self.train_data["x"][:1])

    def flat(self, params) -> np.ndarray:
        """The members' parameters as rows of a (P, D) array.

        Args:
          params: the members' parameters (leading axis P).

        Returns:
          A NumPy array.
        """
        return np.asarray(self._flat(params))

    def member(self, flat_row):
        """One member's parameters from its row of `flat`.

        Args:
          flat_row: (D,).

        Returns:
          The parameter pytree of one model.
        """
        return self._unravel(jnp.asarray(flat_row))

    def evaluate(self, params, data) -> dict:
        """Every member's loss and accuracy on ``data`` (one compiled call).

        Args:
          params: the members' parameters.
          data: ``{"x", "y"}`` shared by the members.

        Returns:
          ``{"loss": (P,), "accuracy": (P,)}``.
        """
        return self.trainer.evaluate(params, data)

    def train(
        self,
        *,
        seeds: Sequence[int],
        learning_rates: Sequence[Callable[[float], float]],
        batch_size: int | Callable[[float], int],
        num_epochs: float | None = None,
        max_steps: int | None = None,
        evals_per_epoch: int = 1,
        num_train: int | None = None,
        target: float | None = None,
        log=print,
        label: str = "",
    ) -> dict[str, np.ndarray]:
        """Trains one member per entry of ``seeds``.

        Args:
          seeds: the members' seeds (initialisation and example order).
          learning_rates: one ``epoch -> rate`` schedule per member
            (`sharp_minima.train.optimizer.epoch_schedule`).
          batch_size: the batch size, or an ``epoch -> batch size`` schedule (shared).
          num_epochs: stop after this many epochs (examples seen / N) ...
          max_steps: ... or this many steps.
          evals_per_epoch: evaluations (and schedule updates) per epoch.
          num_train: train on the first ``num_train`` training examples only.
          target: stop once every seed has a member whose training loss is ≤ ``target``
            (the fewest steps over a seed's members cannot fall any more).
          log: takes a progress line every 20 seconds and the last line.
          label: the lines' prefix.

        Returns:
          ``steps``, ``epochs`` and the ``train_/test_`` ``loss`` and ``accuracy`` (T, P) at
          every evaluation (index 0: the start); per chunk the largest mini-batch loss
          ``peak_loss`` (T−1, P), ``learning_rate`` (T−1, P) and ``batch_size`` (T−1,);
          the final ``params`` (P, D) and, with ``target``, each member's parameters at its
          first evaluation at or below it (``target_params``, NaN if none) and that step
          (``target_step``, −1 if none).

        Raises:
          ValueError: neither ``num_epochs`` nor ``max_steps``, or not one schedule per seed.
        """
        if num_epochs is None and max_steps is None:
            raise ValueError(
                "Population.train needs num_epochs or max_steps (a target may stop it sooner)"
            )
        if len(learning_rates) != len(seeds):
            raise ValueError(f"{len(learning_rates)} schedules for {len(seeds)} members")
        sizes = batch_size if callable(batch_size) else (lambda epoch: batch_size)
        n = self.num_train if num_train is None else num_train
        data = (
            self.train_data if num_train is None else jax.tree.map(lambda a: a[:n], self.train_data)
        )
        run = _Run(self, data, n, np.asarray(seeds), target)
        params = self.init(seeds)
        state = self.trainer.init(params, learning_rates=jnp.asarray(_rates(learning_rates, 0.0)))
        order = _Order(seeds, n)
        run.record(params, 0, 0)
        t0, shown = time.time(), time.time()
        while not run.finished(num_epochs, max_steps):
            b = int(sizes(run.examples / n))
            chunk = run.chunk(b, evals_per_epoch, num_epochs, max_steps)
            lrs = np.asarray(_rates(learning_rates, run.examples / n), np.float64)
            state = self.trainer.set_learning_rates(state, lrs)
            params, state, step_losses = self.trainer.epoch(
                params, state, data, order.take(chunk, b)
            )
            run.chunk_done(step_losses, lrs, b, chunk)
            run.record(params, run.step, run.examples)
            if run.reached(params):
                break
            if time.time() - shown > 20:
                shown = time.time()
                log(
                    f"{label}epoch {run.examples / n:.1f}, step {run.step}, best training loss "
                    f"{np.nanmin(run.rec['train_loss'][-1]):.4f} ({time.time() - t0:.0f} s)"
                )
        took = time.time() - t0
        log(f"{label}done: {run.step} steps, {run.examples / n:.1f} epochs ({took:.0f} s)")
        return run.result(params)


def _rates(schedules, epoch: float) -> np.ndarray:
    return np.array([s(epoch) for s in schedules])


class _Run:
    """The bookkeeping of one `Population.train` call: counters, the records, the stop."""

    def __init__(self, population: Population, data, n: int, seeds: np.ndarray, target):
        self.pop, self.data, self.n, self.seeds, self.target = population, data, n, seeds, target
        self.rec = {k: [] for k in _RECORDED + _PER_CHUNK}
        self.step = self.examples = 0
        if target is not None:
            self.snap = np.full((len(seeds), population.dim), np.nan, np.float32)
            self.snap_step = np.full(len(seeds), -1)

    def finished(self, num_epochs, max_steps) -> bool:
        epoch = self.examples / self.n
        return (num_epochs is not None and epoch >= num_epochs - 1e-9) or (
            max_steps is not None and self.step >= max_steps
        )

    def chunk(self, b: int, evals_per_epoch: int, num_epochs, max_steps) -> int:
        """Steps until the next evaluation (never past the end)."""
        chunk = max(1, round(self.n / b / evals_per_epoch))
        if num_epochs is not None:
            chunk = min(chunk, max(1, math.ceil((num_epochs * self.n - self.examples) / b)))
        if max_steps is not None:
            chunk = min(chunk, max_steps - self.step)
        return chunk

    def chunk_done(self, step_losses, lrs, b: int, chunk: int) -> None:
        self.step, self.examples = self.step + chunk, self.examples + chunk * b
        self.rec["peak_loss"].append(np.asarray(step_losses, np.float64).max(1))
        self.rec["learning_rate"].append(lrs)
        self.rec["batch_size"].append(b)

    def record(self, params, step: int, examples: int) -> None:
        pop = self.pop
        tr, te = pop.evaluate(params, self.data), pop.evaluate(params, pop.test_data)
        self.rec["steps"].append(step)
        self.rec["epochs"].append(examples / self.n)
        for k, m in (("train", tr), ("test", te)):
            self.rec[f"{k}_loss"].append(np.asarray(m["loss"], np.float64))
            self.rec[f"{k}_accuracy"].append(np.asarray(m["accuracy"], np.float64))

    def reached(self, params) -> bool:
        """With a target: snapshot the members that just reached it; True once every seed
        has one (or no member is finite any more)."""
        if self.target is None:
            return False
        loss = self.rec["train_loss"][-1]
        new = (self.snap_step < 0) & (loss <= self.target)
        if new.any():
            self.snap[new] = self.pop.flat(params)[new]
            self.snap_step[new] = self.step
        done = [bool((self.snap_step[self.seeds == s] >= 0).any()) for s in np.unique(self.seeds)]
        return all(done) or not np.isfinite(loss).any()

    def result(self, params) -> dict[str, np.ndarray]:
        out = {k: np.asarray(v) for k, v in self.rec.items()}
        out["params"] = self.pop.flat(params)
        if self.target is not None:
            out["target_params"], out["target_step"] = self.snap, self.snap_step
        return out
