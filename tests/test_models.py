"""Each model's forward pass, output shape and parameter count on tiny inputs."""

import jax
import jax.numpy as jnp
import pytest

from sharp_minima.models import MODELS, get_model

KEY = jax.random.key(0)


def count(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


def init_and_apply(model, x, train=True):
    """Initialised variables and the forward pass, each one compiled call (op-by-op dispatch
    compiles every layer's shapes apart: twice as slow for a VGG)."""
    variables = jax.jit(lambda x: model.init({"params": KEY, "dropout": KEY}, x, train=False))(x)
    apply = jax.jit(
        lambda v, x: model.apply(v, x, train=train, rngs={"dropout": KEY}, mutable=["batch_stats"])
    )
    out, _ = apply(variables, x)
    return variables, out


def test_f1_matches_the_paper_architecture_parameter_count():
    variables, out = init_and_apply(get_model("f1", num_classes=10), jnp.ones((2, 28, 28, 1)))
    assert out.shape == (2, 10)
    # 784-[512 BN ReLU]x5-10: dense kernels (no bias before BN) + BN scale/bias + output layer.
    expected = 784 * 512 + 4 * 512 * 512 + 5 * 2 * 512 + 512 * 10 + 10
    assert count(variables["params"]) == expected
    assert count(variables["batch_stats"]) == 5 * 2 * 512


@pytest.mark.parametrize(
    "name, kwargs, shape, classes",
    [
        ("f2", {"width": 8, "depth": 2}, (2, 360), 1973),
        ("swissroll_mlp", {"width": 8}, (2, 2), 2),
        ("c1", {"width": 4}, (2, 8, 8, 3), 10),
        ("c3", {"width": 4}, (2, 8, 8, 3), 100),
        ("c2", {"width_multiplier": 1 / 32}, (2, 32, 32, 3), 10),
        ("c4", {"width_multiplier": 1 / 32}, (2, 32, 32, 3), 100),
        ("vgg11", {"width_multiplier": 1 / 32}, (2, 32, 32, 3), 10),
        ("simplecnn", {"widths": (4, 4, 8, 8), "dense": 8}, (2, 8, 8, 1), 10),
        ("resnet32", {"widths": (4, 8, 8)}, (2, 8, 8, 3), 10),
        ("resnet32_bn", {"widths": (4, 8, 8)}, (2, 8, 8, 3), 10),
        ("svhn_resnet", {"widths": (4, 8, 8)}, (2, 8, 8, 3), 10),
        ("lstm_ptb", {"hidden": 8}, (2, 5), 50),
        ("imdb_cnn", {"embed": 4, "filters": 4, "dense": 4}, (2, 12), 2),
    ],
)
def test_forward_shapes(name, kwargs, shape, classes):
    if name in ("lstm_ptb", "imdb_cnn"):
        x = jnp.ones(shape, jnp.int32)
        kwargs = {**kwargs, "num_classes": classes}
        if name == "imdb_cnn":
            kwargs["vocab_size"] = 30
    else:
        x = jnp.ones(shape)
        kwargs = {**kwargs, "num_classes": classes}
    variables, out = init_and_apply(get_model(name, **kwargs), x)
    expected = (2, 5, classes) if name == "lstm_ptb" else (2, classes)
    assert out.shape == expected and bool(jnp.all(jnp.isfinite(out)))
    assert count(variables["params"]) > 0


def test_resnet32_has_32_layers_and_bounded_output_without_bn():
    model = get_model("resnet32", widths=(4, 8, 8))
    variables, out = init_and_apply(model, jax.random.normal(KEY, (4, 8, 8, 3)), train=False)
    convs = [
        k
        for k in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
        if "Conv" in jax.tree_util.keystr(k[0]) and "kernel" in jax.tree_util.keystr(k[0])
    ]
    assert len(convs) + 1 == 32  # 31 convolutions + the classifier
    assert float(jnp.abs(out).max()) < 100


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: .*f1"):
        get_model("f9")
    with pytest.raises(ValueError, match="bad arguments for model 'f1'"):
        get_model("f1", colour="red")
    assert "simplecnn" in MODELS
