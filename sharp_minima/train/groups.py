"""SAM's m-sharpness groups in the train step (`sharp_minima.optim.sam`, Andriushchenko &
Flammarion 2022): how many groups a config asks for, and the clean pass over them.

- `sam_groups` — G, the number of groups of m examples in a batch (``config.sam.group_size``).
- `group_pass` — the clean pass of `sharp_minima.train.make_train_step` over G groups and
  the extra arguments ``tx.update`` receives: by layers (`sharp_minima.per_example`) for a
  network of dense layers and small leaves, a vmap over the groups elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from sharp_minima import per_example
from sharp_minima import tree_util as tu


def sam_groups(config) -> int:
    """G, the number of m-sharpness groups of a batch (``batch_size / config.sam.group_size``;
    1 without SAM or with ``group_size = 0``, the whole batch).

    Args:
      config: the run's config.

    Returns:
      G ≥ 1.
    """
    sam = config.get("sam")
    if sam is None or not sam.rho or not sam.group_size:
        return 1
    return config.batch_size // sam.group_size


def _layers(loss_fn, state, split, keys):
    """``(layers, leaves, treedef)``: the m-sharpness groups' layer plan
    (`sharp_minima.per_example.group_layers`; None where it does not apply) and the
    parameters' leaves."""
    leaves, treedef = jax.tree.flatten(state.params)

    def group_fn(ls, data):
        group, k = data
        return loss_fn(jax.tree.unflatten(treedef, ls), state.batch_stats, group, k)

    first = jax.tree.map(lambda a: a[0], (split, keys))
    return per_example.group_layers(group_fn, leaves, first), leaves, treedef


def group_pass(loss_fn, state, batch, key, groups, on_log_step):
    """The clean pass of SAM's m-sharpness over G groups of the batch, for
    `sharp_minima.train.make_train_step`.

    By layers (`sharp_minima.per_example.group_clean`), g — the groups' mean clean gradient —
    is read by SAM's diagnostics alone (each group ascends along its own gradient), so when
    ``state.opt_state`` holds a `sharp_minima.optim.sam` it is formed on log steps only
    (zeros elsewhere): the weight products of a backward pass saved on the other steps.

    Args:
      loss_fn: the `sharp_minima.train.TrainLoss`.
      state: the `sharp_minima.train.TrainState`.
      batch: the step's batch.
      key: the step's key (group k's: ``split(key, G)[k]``).
      groups: G > 1, dividing the batch.
      on_log_step: a traced bool, the step is a log step.

    Returns:
      ``(objective, aux, grads, extra)``: the groups' mean objective, aux and clean gradient
      g, and ``tx.update``'s extra arguments (``group_value_fn``, ``diagnose``,
      ``group_grads`` and, by layers, ``group_ascent``).
    """
    split = jax.tree.map(lambda a: a.reshape((groups, -1) + a.shape[1:]), batch)
    keys = jax.random.split(key, groups)

    def group_value_fn(params, i):  # group i's objective
        group = jax.tree.map(lambda a: a[i], split)
        return loss_fn(params, state.batch_stats, group, keys[i])[0]

    extra = {"group_value_fn": group_value_fn, "diagnose": on_log_step}
    layers, leaves, treedef = _layers(loss_fn, state, split, keys)
    if layers is None:  # the general path: a vmap over the groups
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (objective, aux), grads = jax.vmap(grad_fn, (None, None, 0, 0))(
            state.params, state.batch_stats, split, keys
        )
        extra["group_grads"] = grads
        return *tu.mean_over_leading_axis((objective, dict(aux), grads)), extra
    clean = per_example.group_clean(layers, leaves, (split, keys))
    objective, aux = jax.tree.unflatten(layers.out_tree, clean.outputs)

    def clean_mean():
        return jax.tree.unflatten(treedef, per_example.group_mean(layers, leaves, clean))

    sam_present = optax.tree_utils.tree_get(state.opt_state, "sam_metrics") is not None
    zeros = functools.partial(jax.tree.map, jnp.zeros_like, state.params)
    grads = jax.lax.cond(on_log_step if sam_present else True, clean_mean, zeros)

    def group_ascent(scale_fn):
        scale = scale_fn(jnp.sqrt(clean.sq))
        outs, mean = per_example.group_ascent(layers, leaves, (split, keys), clean, scale)
        return jnp.mean(outs[0]), jax.tree.unflatten(treedef, mean)

    formed = per_example.group_gradients(layers, leaves, clean)  # dropped unless read (ASAM)
    extra.update(group_grads=jax.tree.unflatten(treedef, formed), group_ascent=group_ascent)
    return *tu.mean_over_leading_axis((objective, dict(aux))), grads, extra
