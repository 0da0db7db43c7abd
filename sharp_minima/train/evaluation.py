"""Loss and accuracy in evaluation mode on fixed example sets (the training subset, the
validation split, the test set), each with the one compiled step of `make_eval_step`:
`Evaluator`, `make_evaluators`, `evaluate`."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from sharp_minima.train.steps import (
    TrainState,
    make_eval_step,
    replicate,
    serialize_collectives,
)


class Evaluator:
    """Loss and accuracy of a state on a fixed example set, with one compiled step.

    Args:
      eval_step: `make_eval_step`'s output.
      x: the inputs (host array).
      y: the labels.
      batch_size: examples per evaluation batch.
      mesh: the mesh the arrays are replicated over.

    Calling it with a `TrainState` returns ``{"loss": ..., "accuracy": ...}``.
    """

    def __init__(self, eval_step, x, y, batch_size: int, mesh: Mesh):
        n = len(x)
        padded = -(-n // batch_size) * batch_size
        pad = [(0, padded - n)] + [(0, 0)] * (x.ndim - 1)
        self.num_batches = padded // batch_size
        self.x = replicate(np.pad(x, pad), mesh)
        self.y = replicate(np.pad(y, pad[: y.ndim]), mesh)
        self.w = replicate(np.pad(np.ones(n, np.float32), (0, padded - n)), mesh)
        self.eval_step = eval_step
        self.size = n
        self.sync = serialize_collectives(mesh)

    def __call__(self, state) -> dict[str, float]:
        parts = [
            self.sync(self.eval_step(state, self.x, self.y, self.w, i))
            for i in range(self.num_batches)
        ]
        sums = jax.device_get(jax.tree.map(lambda *a: sum(a), *parts))
        count = max(float(sums["count"]), 1.0)
        return {"loss": float(sums["loss"]) / count, "accuracy": float(sums["correct"]) / count}


def make_evaluators(config, model, data, mesh: Mesh) -> dict[str, Evaluator]:
    """Loss and accuracy on the training subset (``eval_train_examples``), the validation
    split (if any) and the test set, in evaluation mode, each with one compiled step.

    Args:
      config: the run's config.
      model: the Flax model.
      data: the `sharp_minima.data.Dataset`.
      mesh: the mesh.

    Returns:
      ``{"train": ..., "val": ... (with a validation split), "test": ...}``: an `Evaluator` each.
    """
    ebs = config.eval_batch_size - config.eval_batch_size % mesh.size or mesh.size
    step = make_eval_step(model, mesh, ebs)
    m = config.eval_train_examples or len(data.x_train)
    out = {"train": Evaluator(step, data.x_train[:m], data.y_train[:m], ebs, mesh)}
    if data.x_val is not None:
        out["val"] = Evaluator(step, data.x_val, data.y_val, ebs, mesh)
    out["test"] = Evaluator(step, data.x_test, data.y_test, ebs, mesh)
    return out


def evaluate(evaluators: dict[str, Evaluator], state: TrainState, epoch: int) -> dict:
    """One evaluation record ``{"step", "epoch", "<split>/loss", "<split>/accuracy", ...}``.

    Args:
      evaluators: `make_evaluators`'s output.
      state: the state to evaluate.
      epoch: the epoch, for the record.

    Returns:
      The record (a dict of floats).
    """
    rec = {"step": int(state.step), "epoch": epoch}
    for split, ev in evaluators.items():
        for k, v in ev(state).items():
            rec[f"{split}/{k}"] = v
    return rec
