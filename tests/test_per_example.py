"""The layer identities of sharp_minima.per_example against the chunked exact path: every
estimate `GradientNoise.measure` returns (|G|², tr Σ, B_simple, their standard errors, per
layer, and Ḡ) agrees to 1e-10 in float64 on Linen, NNX and plain-JAX models, with masked,
weighted and sharded batches, and each leaf reports the route it took."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sharp_minima import gradients, losses, objective
from sharp_minima.models import get_model


def ce(logits, batch):
    return losses.cross_entropy(logits, batch["y"], batch.get("mask"))


def images(key, nb, size, shape=(8, 8, 1)):
    kx, ky = jax.random.split(key)
    return {
        "x": jax.random.normal(kx, (nb, size) + shape, jnp.float64),
        "y": jax.random.randint(ky, (nb, size), 0, 3),
    }


class TokenModel(nn.Module):
    """Embedding -> a dense layer over the sequence (P = 5 positions) -> mean -> classes."""

    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(11, 6, param_dtype=jnp.float64)(tokens)
        h = jnp.tanh(nn.Dense(7, param_dtype=jnp.float64)(h))
        return nn.Dense(3, param_dtype=jnp.float64)(h.mean(1))


class TiedModel(nn.Module):
    """An embedding of 160 × 112 (over `FORM_LIMIT`) reused as the output layer: no layer
    identity holds for it, so it falls back to the chunked path; the rest does not."""

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(160, 112, param_dtype=jnp.float64)
        h = jnp.tanh(nn.Dense(112, param_dtype=jnp.float64)(embed(tokens).mean(1)))
        return embed.attend(h)[:, :3]


def linen(model, batch_x, key):
    """A Linen model's float64 variables and its mean cross-entropy."""
    variables = model.init(key, batch_x)
    variables = jax.tree.map(lambda a: a.astype(jnp.float64), variables)

    def loss(v, batch):
        return ce(model.apply(v, batch["x"]), batch)

    return loss, variables


def cases():
    """name -> (loss, params, batches, wrt, expected routes by path regex)."""
    k = jax.random.split(jax.random.key(0), 12)
    out = {}

    mlp = get_model("mlp", num_classes=3, widths=(8, 8))
    data = images(k[0], 2, 6, (5,))
    variables = jax.tree.map(
        lambda a: a.astype(jnp.float64), mlp.init(k[1], data["x"][0], train=False)
    )
    out["linen mlp, weight decay"] = (
        losses.evaluation_loss(mlp, weight_decay=3e-2),
        variables,
        data,
        "^params/",
        {"kernel": "dense", "bias": "formed"},
    )

    cnn = get_model("c1", num_classes=3, width=4, dropout=0.0)
    data = images(k[2], 2, 4)
    variables = cnn.init(k[3], data["x"][0], train=False)
    variables = jax.tree.map(lambda a: a.astype(jnp.float64), variables)
    # Running statistics away from their initial 0/1, so that evaluation mode matters.
    variables["batch_stats"] = jax.tree.map(lambda a: a + 0.3, variables["batch_stats"])
    out["linen cnn, batchnorm"] = (
        losses.evaluation_loss(cnn),
        variables,
        data,
        "^params/",
        {"Conv.*kernel": "conv", "Dense.*kernel": "dense", "BatchNorm|bias": "formed"},
    )

    def tokens(model, kx, ky, kinit, shape, vocab, routes):
        batch = {
            "x": jax.random.randint(kx, shape, 0, vocab),
            "y": jax.random.randint(ky, shape[:2], 0, 3),
        }
        loss, variables = linen(model, batch["x"][0], kinit)
        return loss, variables, batch, None, routes

    out["embedding, sequence"] = tokens(
        TokenModel(), k[4], k[5], k[6], (2, 8, 5), 11,
        {"embedding": "embedding", "kernel": "dense", "bias": "formed"},
    )  # fmt: skip
    out["mixed: a tied embedding falls back"] = tokens(
        TiedModel(), k[7], k[8], k[9], (2, 4, 3), 160,
        {"embedding": "chunked", "kernel": "dense", "bias": "formed"},
    )  # fmt: skip

    model = nnx.Sequential(
        nnx.Linear(5, 8, param_dtype=jnp.float64, rngs=nnx.Rngs(0)),
        jnp.tanh,
        nnx.Linear(8, 3, param_dtype=jnp.float64, rngs=nnx.Rngs(1)),
    )
    graphdef, state = nnx.split(model)

    def nnx_loss(state, batch):
        return ce(nnx.merge(graphdef, state)(batch["x"]), batch)

    out["nnx"] = (
        nnx_loss,
        state,
        images(k[10], 2, 6, (5,)),
        None,
        {"kernel": "dense", "bias": "formed"},
    )

    params = {
        "w1": jax.random.normal(k[11], (5, 8), jnp.float64),
        "b1": jnp.full((8,), 0.1, jnp.float64),
        "w2": jnp.linspace(-1, 1, 24, dtype=jnp.float64).reshape(8, 3),
    }

    def plain(p, batch):
        return ce(jnp.tanh(batch["x"] @ p["w1"] + p["b1"]) @ p["w2"], batch)

    out["plain pytree"] = (
        plain,
        params,
        images(k[0], 2, 6, (5,)),
        None,
        {"w": "dense", "b": "formed"},
    )
    return out


with jax.enable_x64(True):
    CASES = cases()


def assert_same(a, b, rtol):
    """Every estimate of two `NoiseScale`s, total and per layer, and Ḡ."""
    np.testing.assert_allclose(tuple(a.total), tuple(b.total), rtol=rtol)
    assert a.layers.keys() == b.layers.keys()
    for key in a.layers:
        np.testing.assert_allclose(
            tuple(a.layers[key]), tuple(b.layers[key]), rtol=rtol, err_msg=key
        )
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(b.mean_gradient))
    for x, y in zip(jax.tree.leaves(a.mean_gradient), jax.tree.leaves(b.mean_gradient)):
        np.testing.assert_allclose(x, y, rtol=0, atol=rtol * scale)
    assert a.num_examples == b.num_examples


@pytest.fixture(scope="module", params=sorted(CASES))
def measured(request):
    loss, params, batches, wrt, routes = CASES[request.param]
    with jax.enable_x64(True):
        fast = gradients.GradientNoise(loss, wrt=wrt)
        slow = gradients.GradientNoise(loss, wrt=wrt, method="chunked")
        yield request.param, fast, slow, params, batches, routes


def test_equal_to_the_chunked_path_in_float64(measured):
    name, fast, slow, params, batches, routes = measured
    with jax.enable_x64(True):
        a, b = fast.measure(params, batches), slow.measure(params, batches)
    assert_same(a, b, 1e-10)
    assert set(b.routes.values()) == {"chunked"}
    for path, route in a.routes.items():
        expected = [r for rx, r in routes.items() if re.search(rx, path)]
        assert expected and expected[0] == route, (name, path, route, a.routes)


def test_masked_weighted_and_sharded_batches(measured):
    name, fast, slow, params, batches, _ = measured
    if name not in ("linen cnn, batchnorm", "embedding, sequence"):
        pytest.skip("two models cover the batch variants")
    size = jax.tree.leaves(batches)[0].shape[1]
    with jax.enable_x64(True):
        masked = dict(batches, mask=jnp.ones((2, size)).at[1, size // 2 :].set(0.0))
        weights = jnp.asarray([0.7, 0.3])
        a = fast.measure(params, masked, weights=weights)
        b = slow.measure(params, masked, weights=weights)
        assert_same(a, b, 1e-10)
        assert a.num_examples == 2 * size - (size - size // 2)
        # Several devices: the example axis split over the 4 simulated CPU devices.
        sharded = objective.shard_batches(batches)
        assert_same(fast.measure(params, sharded), slow.measure(params, batches), 1e-10)
        if name == "linen cnn, batchnorm":  # the chunked path, one example at a time there
            assert_same(slow.measure(params, sharded), slow.measure(params, batches), 1e-10)


def test_float32_agrees_to_rounding():
    loss, params, batches, wrt, _ = CASES["linen mlp, weight decay"]
    params32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    batches32 = dict(batches, x=batches["x"].astype(jnp.float32))
    a = gradients.GradientNoise(loss, wrt=wrt).measure(params32, batches32)
    b = gradients.GradientNoise(loss, wrt=wrt, method="chunked").measure(params32, batches32)
    assert_same(a, b, 1e-5)


def test_an_unreadable_loss_falls_back_to_the_chunked_path_with_a_warning(monkeypatch):
    from sharp_minima import per_example

    loss, params, batches, _, _ = CASES["plain pytree"]

    def broken(*args):
        raise RuntimeError("no jaxpr here")

    with jax.enable_x64(True):
        expected = gradients.GradientNoise(loss, method="chunked").measure(params, batches)
        monkeypatch.setattr(per_example, "_program", broken)
        with pytest.warns(UserWarning, match="chunked exact path"):
            got = gradients.GradientNoise(loss).measure(params, batches)
    assert set(got.routes.values()) == {"chunked"}
    assert_same(got, expected, 1e-12)


class GroupModel(nn.Module):
    """Dense layers (one over a sequence axis, one with its kernel as the left operand),
    BatchNorm in training mode (a group's examples interact) and biases."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(6, param_dtype=jnp.float64)(x)
        h = nn.BatchNorm(use_running_average=False, param_dtype=jnp.float64)(h)
        h = jnp.tanh(h).reshape(h.shape[0], 2, 3)
        h = jnp.tanh(nn.Dense(4, use_bias=False, param_dtype=jnp.float64)(h)).reshape(-1, 8)
        w = self.param("left", nn.initializers.normal(0.5), (3, 8), jnp.float64)
        return jnp.einsum("cf,bf->bc", w, h)


def test_sam_groups_by_layers_equal_a_loop_over_groups():
    """`group_clean`, `group_ascent`, `group_mean` and `group_gradients` against a Python
    loop over G groups of a model whose examples interact within a group: each group's
    squared gradient norm, the mean clean gradient, each group's gradient, and SAM's
    m-sharpness gradient (each group perturbed by ρ g_k/‖g_k‖) and values, to 1e-10 in
    float64. A convolution or a weight-decay term takes the general path (None)."""
    from sharp_minima import per_example as pe

    model, G, m, rho = GroupModel(), 4, 5, 0.3
    with jax.enable_x64(True):
        data = images(jax.random.key(5), G, m, (7,))
        variables = model.init(jax.random.key(6), data["x"][0])
        leaves, tdef = jax.tree.flatten(variables["params"])
        stats = variables["batch_stats"]

        def f(ls, g):
            logits, new = model.apply(
                {"params": jax.tree.unflatten(tdef, ls), "batch_stats": stats},
                g["x"],
                mutable=["batch_stats"],
            )
            return ce(logits, g), new

        first = jax.tree.map(lambda a: a[0], data)
        layers = pe.group_layers(f, leaves, first)
        assert sorted(set(layers.plan.routes)) == ["dense", "formed"]

        @jax.jit
        def fast(ls, groups):
            clean = pe.group_clean(layers, ls, groups)
            outs, mean = pe.group_ascent(layers, ls, groups, clean, rho / jnp.sqrt(clean.sq))
            each = pe.group_gradients(layers, ls, clean)
            return clean, outs[0], mean, each, pe.group_mean(layers, ls, clean)

        clean, values, ascent, each, clean_mean = fast(leaves, data)

        def objective(ls, k):
            return f(ls, jax.tree.map(lambda a: a[k], data))[0]

        grads, at_point, want_values = [], [], []
        for k in range(G):  # a Python loop over the groups
            g = jax.grad(objective)(leaves, k)
            norm = jnp.sqrt(sum(jnp.vdot(a, a) for a in g))
            point = [w + rho * a / norm for w, a in zip(leaves, g)]
            value, adv = jax.value_and_grad(objective)(point, k)
            grads.append(g)
            at_point.append(adv)
            want_values.append(value)

        def close(a, b):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)

        close(clean.sq, [sum(jnp.vdot(a, a) for a in g) for g in grads])
        close(values, want_values)
        for j in range(len(leaves)):
            close(clean_mean[j], np.mean([g[j] for g in grads], 0))
            close(each[j], np.stack([g[j] for g in grads]))
            close(ascent[j], np.mean([g[j] for g in at_point], 0))
        # Each group's BatchNorm statistics come out with its objective.
        assert clean.outputs[1].shape == (G, 6)  # the running mean's update, per group

        def conv_loss(ls, g):  # a 1-d convolution's kernel: not a dense leaf
            y = jax.lax.conv_general_dilated(g["x"][:, None], ls[0], (1,), "SAME")
            return jnp.mean(y**2)

        def decayed(ls, g):
            return f(ls, g)[0] + 1e-3 * sum(jnp.vdot(a, a) for a in ls)

        assert pe.group_layers(conv_loss, [jnp.ones((2, 1, 3))], first) is None
        assert pe.group_layers(decayed, leaves, first) is None
