"""Helpers shared by the studies: named key streams, mean ± std summaries, the claims table
and the study outputs."""

from __future__ import annotations

import os
import zlib

import jax
import numpy as np

from sharp_minima import files


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


Claim = tuple[str, bool, str]  # (the paper's claim, holds here, the numbers behind it)


def claims_table(claims: list[Claim]) -> list[str]:
    """The report's ``## Claims`` section: a yes/no line per claim with its numbers."""
    lines = ["## Claims", "", "| claim | holds here | numbers |", "| --- | --- | --- |"]
    return lines + [f"| {c} | {'yes' if ok else 'no'} | {nums} |" for c, ok, nums in claims]


def write_outputs(workdir, report: str, results: dict, claims: list[Claim], figures, log) -> dict:
    """Writes ``report.md`` and ``results.json`` (with the claims) atomically on process 0,
    prints the claims; returns ``results``."""
    results = {
        **results,
        "claims": [{"claim": c, "holds": ok, "numbers": n} for c, ok, n in claims],
    }
    if jax.process_index() == 0:
        files.write_json(os.path.join(workdir, "results.json"), results)
        files.write_atomic(os.path.join(workdir, "report.md"), report)
    for claim, ok, nums in claims:
        log(f"[{'yes' if ok else 'no '}] {claim}: {nums}")
    log(f"wrote {workdir}/report.md, results.json and {', '.join(figures)} (.png/.pdf)")
    return results
