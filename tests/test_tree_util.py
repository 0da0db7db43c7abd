import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sharp_minima import tree_util as tu

TREE = {"a": jnp.array([1.0, 2.0]), "b": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(3)}}


def test_algebra_matches_the_flat_vector():
    flat, unravel = tu.ravel(TREE)
    other = unravel(jnp.arange(flat.size, dtype=flat.dtype))
    np.testing.assert_allclose(tu.dot(TREE, other), flat @ tu.ravel(other)[0])
    np.testing.assert_allclose(tu.norm(TREE), np.linalg.norm(flat), rtol=1e-6)
    np.testing.assert_allclose(
        tu.ravel(tu.axpy(2.0, TREE, other))[0], 2 * flat + tu.ravel(other)[0]
    )
    np.testing.assert_allclose(tu.ravel(tu.sub(tu.add(TREE, other), other))[0], flat)
    np.testing.assert_allclose(tu.ravel(tu.scale(3.0, TREE))[0], 3 * flat)


def test_random_like_and_select():
    r = tu.random_like(jax.random.key(0), TREE, "rademacher")
    assert jax.tree.structure(r) == jax.tree.structure(TREE)
    assert set(np.unique(tu.ravel(r)[0]).tolist()) <= {-1.0, 1.0}
    with pytest.raises(ValueError, match="distribution"):
        tu.random_like(jax.random.key(0), TREE, "uniform")
    selected, merge = tu.select(TREE, "kernel$")
    assert len(selected) == 1 and selected[0].shape == (2, 2)
    merged = merge([jnp.zeros((2, 2))], TREE)
    assert float(merged["b"]["kernel"].sum()) == 0 and float(merged["a"].sum()) == 3
    with pytest.raises(ValueError, match="selects no parameter.*b/kernel"):
        tu.select(TREE, "Dense_9")
