"""Helpers shared by the studies: named key streams and mean ± std summaries."""

from __future__ import annotations

import zlib

import jax
import numpy as np


def key_streams(seed: int, *names: str) -> dict[str, jax.Array]:
    """Independent keys named after what they are for, from one root ``key(seed)``.

    Each stream is ``fold_in(key(seed), crc32(name))``: adding a stream never changes the
    others, and no stream coincides with ``jax.random.split(key(seed), n)``, which the trainer
    uses for its init/data/augmentation keys.

    >>> keys = key_streams(0, "subset", "sharpness")
    >>> sorted(keys), bool((jax.random.key_data(keys["subset"])
    ...                     != jax.random.key_data(keys["sharpness"])).any())
    (['sharpness', 'subset'], True)
    """
    root = jax.random.key(seed)
    return {n: jax.random.fold_in(root, zlib.crc32(n.encode()) & 0x7FFFFFFF) for n in names}


def summarize(records: list[dict], group: str) -> dict:
    """``{group value: {field: [mean, std, count]}}`` over the records of each group, for every
    numeric field (booleans and ``seed`` excluded)."""
    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(r[group], []).append(r)
    out = {}
    for name, rs in by.items():
        keys = [
            k
            for k, v in rs[0].items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "seed"
        ]
        out[name] = {
            k: [float(np.mean([r[k] for r in rs])), float(np.std([r[k] for r in rs])), len(rs)]
            for k in keys
            if all(k in r for r in rs)
        }
    return out


def mean_std(summary: dict, key: str, group: str, digits: int = 2) -> str:
    """``"mean ± std"`` (or ``"mean"`` for one record, ``"—"`` when absent) for a table cell."""
    if group not in summary or key not in summary[group]:
        return "—"
    mean, std, n = summary[group][key]
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"
