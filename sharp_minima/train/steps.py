"""The compiled steps of a run: the device mesh, the state, the training loss, the train and
eval steps.

- `make_mesh`, `replicate`, `serialize_collectives` — the 1-D ``"data"`` mesh over the
  devices and host arrays placed on it.
- `TrainState` — params, BatchNorm statistics, optimizer state, step and the loop key, as one
  pytree (checkpointed whole, so a resumed run continues bit for bit on the same hardware).
- `classification_loss` — the default `TrainLoss`; any research loss of the same protocol
  ``(params, model_state, batch, key) -> (objective, aux)`` can be passed to `train` instead.
- `make_train_step`, `make_eval_step`, `make_get_batch` — ``jit``-compiled once; the state is
  donated; the batch is sharded over the ``"data"`` axis of a device mesh and the state
  replicated, so the same code runs on one CPU, several GPUs, a TPU, or several hosts.

The evaluators that use `make_eval_step` are in `sharp_minima.train.evaluation`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sharp_minima import data as data_lib
from sharp_minima import losses
from sharp_minima.train.config import ConfigError, run_keys
from sharp_minima.train.groups import group_pass

# A training loss: ``loss(params, model_state, batch, key) -> (objective, aux)``; ``aux`` is a
# dict whose ``"model_state"`` entry (if any) replaces the BatchNorm statistics and whose other
# (scalar) entries are logged as ``train/<name>``.
TrainLoss = Callable[[Any, Any, Any, jax.Array], tuple[jax.Array, dict]]


# ------------------------------------------------------------------------------- devices


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D ``"data"`` mesh over the first ``num_devices`` devices (0 = all, every host).

    Args:
      num_devices: how many devices (0: all).

    Returns:
      A ``jax.sharding.Mesh`` with axis ``"data"``.

    Raises:
      ConfigError: more devices asked for than there are.
    """
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ConfigError(
                f"config.num_devices={num_devices} but only {len(devices)} devices are available"
            )
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), ("data",))


def serialize_collectives(mesh: Mesh) -> Callable[[Any], Any]:
    """``block_until_ready`` when ``mesh`` spans several *CPU* devices, identity otherwise.

    XLA:CPU runs each simulated device's part of a program on a shared thread pool; with
    several multi-device programs in flight (async dispatch) on few cores, the all-reduce of one
    can wait forever for a participant whose thread is busy with another (an abort after 40 s
    in ``rendezvous.cc``). Waiting for each step keeps one collective program in flight.
    GPUs and TPUs keep fully asynchronous dispatch.

    Args:
      mesh: the run's mesh.

    Returns:
      ``fn(x) -> x`` applied to every step's output.
    """
    if mesh.size > 1 and mesh.devices.flat[0].platform == "cpu":
        return jax.block_until_ready
    return lambda x: x


def replicate(x, mesh: Mesh):
    """A host array (the same on every host) as a global array replicated over ``mesh``.

    Args:
      x: a host array.
      mesh: the mesh.

    Returns:
      A ``jax.Array`` replicated over ``mesh``.
    """
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, P()), lambda idx: x[idx])


# ------------------------------------------------------------------------------ the steps


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree.

    Attributes:
      step: number of optimizer steps taken (int32 scalar).
      params: model parameters.
      batch_stats: BatchNorm running statistics (``{}`` for models without BatchNorm).
      opt_state: optax state.
      key: raw ``uint32`` data of the loop key (``jax.random.key_data``) so that the state can be
        checkpointed; dropout at step ``t`` uses ``fold_in(key, t)``.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    key: jax.Array

    def variables(self):
        """The ``variables`` dict for ``model.apply``.

        Returns:
          ``{"params": ...}`` and ``"batch_stats"`` when the model has BatchNorm.
        """
        if self.batch_stats:
            return {"params": self.params, "batch_stats": self.batch_stats}
        return {"params": self.params}


def classification_loss(model, weight_decay: float = 0.0) -> TrainLoss:
    """The default training loss: mean cross-entropy (+ ``weight_decay · l2_penalty``).

    The model runs in training mode (batch statistics, dropout from ``key``);
    ``aux["model_state"]`` holds the updated BatchNorm statistics and the other entries of
    ``aux`` (``loss``, ``accuracy``) are logged as ``minibatch/<name>``.

    Args:
      model: the Flax classifier.
      weight_decay: the L2 coefficient λ.

    Returns:
      ``loss(params, model_state, batch, key) -> (objective, aux)``, the `TrainLoss`
      protocol.
    """

    def loss(params, model_state, batch, key):
        logits, model_state = losses.train_forward(model, params, model_state, batch["x"], key)
        metrics = losses.classification_metrics(logits, batch["y"])
        objective = metrics["loss"]
        if weight_decay:
            objective = objective + weight_decay * losses.l2_penalty(params)
        return objective, {"model_state": model_state, **metrics}

    return loss


MINIBATCH = "minibatch/"  # prefix of the running metrics of the training steps


def make_train_step(
    loss_fn: TrainLoss,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    lr_fn: Callable[[Any, Any], Any] | None = None,
    log_every: int = 1,
    groups: int = 1,
):
    """``train_step(state, batch) -> (state, metrics)``, jitted once with the state donated.

    Args:
      loss_fn: a `TrainLoss` (e.g. `classification_loss`, or a research loss).
      tx: any optax transformation; ``tx.update`` receives the params and the extra arguments
        ``value=objective`` (for ``reduce_on_plateau``), ``grad=`` and ``value_fn=`` (the
        mini-batch objective as a function of the parameters: ``optax.lbfgs``'s line search).
      mesh: the batch arrives sharded along its ``"data"`` axis; the state stays replicated.
      lr_fn: optional ``lr_fn(step, opt_state)`` logged as ``train/learning_rate``.
      log_every: the metrics of `sharp_minima.train.log_step_metrics` (``minibatch/grad_norm``:
        one more pass over the gradient) are computed on steps ending a multiple of it alone.
      groups: G > 1 splits the batch into G groups of equal size for SAM's m-sharpness
        (`sharp_minima.optim.sam`): the clean pass is a vmap over the groups (BatchNorm
        normalises each group by its own statistics, as one device of a data-parallel run
        does; the running statistics are averaged), its gradient the groups' mean, and
        ``tx.update`` also receives ``group_grads=`` (stacked on a leading axis),
        ``group_value_fn=`` (``(params, i) ->`` group i's objective) and ``diagnose=`` (a log
        step). For a network of dense layers and small leaves
        (`sharp_minima.per_example.group_layers`) the clean pass runs by layers and
        ``tx.update`` also receives ``group_ascent(scale_fn) -> (value, gradient)``: every
        group's perturbed pass at once, each group's move of a dense layer in low rank
        (`sharp_minima.per_example.group_ascent`); the stacked ``group_grads`` are then
        formed only if the transformation reads them, and the mean gradient only on log
        steps when ``tx`` holds a `sharp_minima.optim.sam` (`sharp_minima.train.group_pass`).

    Metrics are computed inside the step and stay on device until a log step: the step's own
    mini-batch values prefixed ``minibatch/`` (``objective``, the scalars of the loss's aux
    such as ``loss`` and ``accuracy``, ``grad_norm``) — never ``train/``, which names the
    evaluation on the whole training set — ``train/learning_rate``, and the diagnostics a
    transform keeps in its state under ``sam_metrics`` (`sharp_minima.optim.SamState`) as
    ``sam/<name>``.

    Returns:
      The jitted ``train_step``.
    """

    tx = optax.with_extra_args_support(tx)  # a plain transform ignores value=

    def step(state: TrainState, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        on_log_step = (state.step + 1) % log_every == 0
        extra = {}
        if groups > 1:  # m-sharpness: the clean pass group by group
            objective, aux, grads, extra = group_pass(
                loss_fn, state, batch, key, groups, on_log_step
            )
        else:
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            (objective, aux), grads = grad_fn(state.params, state.batch_stats, batch, key)
        aux = dict(aux)
        stats = aux.pop("model_state", state.batch_stats)

        def value_fn(params):  # the mini-batch objective (optax.lbfgs's line search, SAM)
            return loss_fn(params, state.batch_stats, batch, key)[0]

        updates, opt_state = tx.update(
            grads,
            state.opt_state,
            state.params,
            value=objective,
            grad=grads,
            value_fn=value_fn,
            **extra,
        )
        params = optax.apply_updates(state.params, updates)
        grad_norm = jax.lax.cond(
            on_log_step, optax.tree.norm, lambda g: jnp.zeros((), jnp.float32), grads
        )
        metrics = {f"{MINIBATCH}objective": objective, f"{MINIBATCH}grad_norm": grad_norm}
        metrics.update({f"{MINIBATCH}{k}": v for k, v in aux.items()})
        if lr_fn is not None:
            metrics["train/learning_rate"] = lr_fn(state.step, state.opt_state)
        sam_metrics = optax.tree_utils.tree_get(opt_state, "sam_metrics")
        metrics.update({f"sam/{k}": v for k, v in (sam_metrics or {}).items()})
        new = state.replace(
            step=state.step + 1, params=params, batch_stats=stats, opt_state=opt_state
        )
        return new, metrics

    return jax.jit(step, donate_argnums=0, out_shardings=NamedSharding(mesh, P()))


def make_eval_step(model, mesh: Mesh, batch_size: int):
    """``eval_step(state, x, y, w, i)``: sums of loss, correct predictions and weights over
    batch ``i`` of the padded, replicated eval arrays (``w`` masks the padding).

    Args:
      model: the Flax model.
      mesh: the mesh (the arrays are replicated over it).
      batch_size: examples per evaluation batch.

    Returns:
      The jitted ``eval_step``.
    """

    def step(state: TrainState, x, y, w, i):
        def take(a):
            out = jax.lax.dynamic_slice_in_dim(a, i * batch_size, batch_size)
            return jax.lax.with_sharding_constraint(out, NamedSharding(mesh, P("data")))

        bx, by, bw = take(x), take(y), take(w)
        logits = model.apply(state.variables(), bx, train=False)
        ce = losses.cross_entropy_per_example(logits, by)
        bw = jnp.broadcast_to(bw.reshape(bw.shape + (1,) * (ce.ndim - 1)), ce.shape)
        correct = (jnp.argmax(logits, -1) == by).astype(jnp.float32)
        return {
            "loss": jnp.sum(ce * bw),
            "correct": jnp.sum(correct * bw),
            "count": jnp.sum(bw),
        }

    return jax.jit(step, out_shardings=NamedSharding(mesh, P()))


def make_get_batch(mesh: Mesh, augment: bool):
    """``get_batch(x, y, perm, i, key, step)``: batch ``i`` of an epoch permutation, gathered
    on device from the replicated training arrays, augmented, and sharded over ``"data"``.

    Args:
      mesh: the mesh (the batch is sharded over ``"data"``).
      augment: random crops and flips (CIFAR-style) on the gathered batch.

    Returns:
      The jitted ``get_batch``.
    """

    def get(x, y, perm, i, key, step):
        idx = jax.lax.dynamic_index_in_dim(perm, i, keepdims=False)
        bx, by = x[idx], y[idx]
        if augment:
            bx = data_lib.random_crop_flip(jax.random.fold_in(key, step), bx)
        return {"x": bx, "y": by}

    return jax.jit(get, out_shardings=NamedSharding(mesh, P("data")))


def initial_params(config, model, sample_x):
    """The parameters `train` starts ``config`` from (e.g. for the distance travelled).

    Args:
      config: the run's config (its ``seed``).
      model: the Flax model.
      sample_x: a batch of inputs.

    Returns:
      The ``params`` collection at initialisation.
    """
    init_key, _ = jax.random.split(run_keys(config)[0])
    return model.init({"params": init_key, "dropout": init_key}, sample_x, train=False)["params"]


def init_state(model, tx, sample_x, key) -> TrainState:
    """Initial `TrainState` (on the host's default device; `train` replicates it).

    Args:
      model: the Flax model.
      tx: the optax transformation.
      sample_x: a batch of inputs (for the shapes).
      key: the run's initialisation key.

    Returns:
      A `TrainState` at step 0.
    """
    init_key, loop_key = jax.random.split(key)
    variables = model.init({"params": init_key, "dropout": init_key}, sample_x, train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=fresh_copy(tx.init(params)),
        key=jax.random.key_data(loop_key),
    )


def fresh_copy(tree):
    """A copy of every array of ``tree`` with weak types made strong: some transforms
    (optax.lbfgs) reuse one buffer in several state leaves, which a donating step cannot
    take, and start with weakly typed scalars, which the step returns strongly typed (the
    step would be compiled a second time for its own output)."""
    return jax.tree.map(lambda x: jnp.array(x, dtype=jnp.asarray(x).dtype), tree)
