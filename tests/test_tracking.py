"""Curvature tracking: the hook's numbers are eigenpairs' numbers; warm starts save HVPs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sharp_minima import data, hessian, losses, tracking
from sharp_minima.models import get_model


def _problem():
    ds = data.load("mnist1d", seed=0, max_train=512)
    model = get_model("mlp", num_classes=10, widths=(32, 32), activation="tanh")
    params = model.init(jax.random.key(0), jnp.asarray(ds.x_train[:1]))
    batches, weights = data.curvature_batches(
        jax.random.key(1), ds.x_train, ds.y_train, num_examples=256, batch_size=128
    )
    return model, params, ds, batches, weights


def test_tracking_equals_a_direct_eigenpairs_call_and_warm_starts_save_hvps():
    model, variables, ds, batches, weights = _problem()
    loss = losses.evaluation_loss(model)
    tracker = tracking.EigenTracker(loss, batches, key=jax.random.key(2), k=3, weights=weights)
    tx = optax.adam(1e-2)
    opt_state = tx.init(variables)
    x, y = jnp.asarray(ds.x_train[:128]), jnp.asarray(ds.y_train[:128])
    warm, cold = [], []
    for step in range(4):
        m = tracker.measure(variables, step)
        direct = hessian.eigenpairs(
            loss,
            variables,
            batches,
            k=3,
            key=jax.random.fold_in(jax.random.key(2), step),
            weights=weights,
            init_vectors=tracker.history and None,
        )
        cold.append(direct.num_steps)
        if step:
            warm.append(m["hessian/num_hvps"])
        np.testing.assert_allclose(
            [m[f"hessian/lambda_{i + 1}"] for i in range(3)], direct.values, rtol=1e-3
        )
        np.testing.assert_allclose(
            m["hessian/frobenius_top3"], np.linalg.norm(direct.values), rtol=1e-3
        )
        for _ in range(5):  # a few training steps between measurements
            g = jax.grad(lambda v: loss(v, {"x": x, "y": y}))(variables)
            updates, opt_state = tx.update(g, opt_state)
            variables = optax.apply_updates(variables, updates)
    assert tracker.curvature.num_traces == 1  # compiled once, reused at every call
    print(f"HVPs per call: warm {warm}, cold {cold[1:]}")
    assert np.mean(warm) < np.mean(cold[1:]), (warm, cold)
