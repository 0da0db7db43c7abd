"""On-device batching, shuffling and augmentation (seeded), and the curvature subset."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def epoch_permutation(key, num_examples: int, batch_size: int):
    """Indices (num_batches, batch_size) of one shuffled epoch (the remainder is dropped)."""
    perm = jax.random.permutation(key, num_examples)
    num_batches = num_examples // batch_size
    return perm[: num_batches * batch_size].reshape(num_batches, batch_size)


def random_crop_flip(key, images, *, padding: int = 4, flip: bool = True):
    """Random crop after zero padding and random horizontal flip, per image (NHWC)."""
    n, h, w, _ = images.shape
    k_crop, k_flip = jax.random.split(key)
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(k_crop, (n, 2), 0, 2 * padding + 1)

    def crop(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))

    out = jax.vmap(crop)(padded, offsets)
    if flip:
        do_flip = jax.random.bernoulli(k_flip, 0.5, (n,))
        out = jnp.where(do_flip[:, None, None, None], out[:, :, ::-1, :], out)
    return out


def curvature_batches(
    key, x, y, *, fraction: float = 0.05, batch_size: int = 256, num_examples: int | None = None
):
    """A fixed random subset of the training set as stacked batches for `sharp_minima.hessian`.

    Returns ``({"x": (nb, bs, ...), "y": (nb, bs)}, weights)``; the subset size is rounded down
    to whole batches (at least one), so ``weights`` are equal.
    """
    n = len(x)
    size = num_examples if num_examples is not None else max(1, int(round(fraction * n)))
    size = min(size, n)
    bs = min(batch_size, size)
    nb = size // bs
    idx = jax.random.permutation(key, n)[: nb * bs].reshape(nb, bs)
    return {"x": jnp.asarray(x)[idx], "y": jnp.asarray(y)[idx]}, jnp.ones((nb,))
