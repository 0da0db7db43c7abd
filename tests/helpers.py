"""Helpers shared by the tests (importable: pytest puts this folder on sys.path)."""

import importlib
import json
import os
import subprocess
import sys


def load_config(spec, **overrides):
    """``configs/<path>[:arg]`` as ``--config`` would load it, with dotted-field overrides."""
    path, _, arg = spec.partition(":")
    config = importlib.import_module(f"configs.{path[:-3]}").get_config(arg or None)
    config.unlock()
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    config.lock()
    return config


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def figure_overlaps(fig) -> list[str]:
    """Text of one panel (axis labels, tick labels, titles, a colourbar's label) drawn over
    another panel of ``fig``, as descriptions; empty when the layout keeps them apart."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    axes = [a for a in fig.axes if a.get_visible()]
    out = []
    for a in axes:
        texts = [a.xaxis.label, a.yaxis.label, a.title]
        texts += [t for t in a.get_xticklabels() + a.get_yticklabels() if t.get_visible()]
        for t in texts:
            if not t.get_text().strip():
                continue
            box = t.get_window_extent(renderer).shrunk(0.9, 0.9)  # glyph margins
            for b in axes:
                if b is a or b.bbox.overlaps(a.bbox):  # itself, or a twin axis
                    continue
                if box.overlaps(b.bbox):
                    out.append(
                        f"{t.get_text()!r} of {a.get_title() or a} over {b.get_title() or b}"
                    )
    return out


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_experiment(module, *args, timeout=300, env=None):
    """``python -m experiments.<module> *args`` from the repository root, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", f"experiments.{module}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else dict(os.environ, **env),
    )
