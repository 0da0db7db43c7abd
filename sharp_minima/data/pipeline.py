"""On-device batching, shuffling and augmentation (seeded), and the curvature subset."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def epoch_permutation(key, num_examples: int, batch_size: int):
    """Indices (num_batches, batch_size) of one shuffled epoch (the remainder is dropped)."""
    perm = jax.random.permutation(key, num_examples)
    num_batches = num_examples // batch_size
    return perm[: num_batches * batch_size].reshape(num_batches, batch_size)


def random_minibatches(key, num_examples: int, batch_size: int, num_batches: int):
    """Indices (num_batches, batch_size) of independent mini-batches, each drawn without
    replacement (as SGD would see them, not one epoch's partition)."""
    keys = jax.random.split(key, num_batches)
    return jax.vmap(lambda k: jax.random.permutation(k, num_examples)[:batch_size])(keys)


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


def subset_indices(key, num_examples: int, size: int, batch_size: int):
    """Indices (num_batches, batch_size) of ``size`` random examples of ``num_examples``,
    rounded down to whole batches (at least one)."""
    bs = min(batch_size, size)
    nb = size // bs
    return jax.random.permutation(key, num_examples)[: nb * bs].reshape(nb, bs)


def ordered_indices(num_examples: int, batch_size: int = 0):
    """``(indices, mask)``: every example in order as (num_batches, batch_size) indices
    (``batch_size`` 0: one batch), the last batch padded with example 0 and masked out."""
    bs = batch_size or num_examples
    nb = -(-num_examples // bs)
    flat = np.arange(nb * bs)
    mask = (flat < num_examples).reshape(nb, bs).astype(np.float32)
    return np.where(flat < num_examples, flat, 0).reshape(nb, bs), mask


def stack_batches(x, y, indices, mask=None) -> dict:
    """The batches ``{"x": x[indices], "y": y[indices]}`` (plus ``"mask"``) with a leading
    batches axis (gathered on the host from host arrays, on the device from device
    arrays): the one way examples become the stacked batches of `sharp_minima.hessian` and
    the other measurements."""

    def take(a):
        return jnp.asarray(a[indices] if isinstance(a, np.ndarray) else jnp.asarray(a)[indices])

    out = {"x": take(x), "y": take(y)}
    if mask is not None:
        out["mask"] = jnp.asarray(mask)
    return out


def all_batches(x, y, batch_size: int = 0):
    """``(batches, weights)``: every example in order (`ordered_indices`), with a ``mask``
    for the padding and the real example count of each batch as its weight (so the
    measurement is exactly the mean over all examples)."""
    indices, mask = ordered_indices(len(x), batch_size)
    return stack_batches(x, y, indices, mask), mask.sum(1)


def curvature_batches(
    key, x, y, *, fraction: float = 0.05, batch_size: int = 256, num_examples: int | None = None
):
    """A fixed random subset of the training set as stacked batches for `sharp_minima.hessian`.

    Returns ``({"x": (nb, bs, ...), "y": (nb, bs)}, weights)``; the subset size is rounded down
    to whole batches (at least one), so ``weights`` are equal.
    """
    n = len(x)
    size = num_examples if num_examples is not None else max(1, int(round(fraction * n)))
    idx = subset_indices(key, n, min(size, n), batch_size)
    return stack_batches(x, y, idx), jnp.ones((idx.shape[0],))
