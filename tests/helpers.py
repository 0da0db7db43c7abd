"""Helpers shared by the tests (importable: pytest puts this folder on sys.path)."""

import atexit
import contextlib
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


_FORKS = []  # [the process `run_experiment` forks command lines from, its environment]


def run_experiment(module, *args, timeout=300, env=None):
    """``python -m experiments.<module> *args`` from the repository root, its output captured
    (a ``subprocess.CompletedProcess``). Run as a fork of a process that has imported the
    libraries once (`tests/cli_forks.py`), with this process's environment (and ``env``;
    one whose ``JAX_*`` variables, which jax reads when imported, differ from those that
    process started with gets a fresh process of its own)."""
    env = dict(os.environ, **(env or {}))
    forks, started = fork_server()
    if any(env.get(k) != started.get(k) for k in set(env) | set(started) if k[:4] == "JAX_"):
        return subprocess.run(
            [sys.executable, "-m", f"experiments.{module}", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    call = {
        "module": module,
        "args": [str(a) for a in args],
        "env": env,
        "cwd": ROOT,
        "timeout": timeout,
    }
    out = fork_request(call)
    return subprocess.CompletedProcess(
        [sys.executable, "-m", f"experiments.{module}", *args],
        out["returncode"],
        out["stdout"],
        out["stderr"],
    )


def fork_server():
    """``(the process, the environment it started with)`` of `tests/cli_forks.py`, started
    once per test process."""
    if not _FORKS or _FORKS[0].poll() is not None:
        path = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
        _FORKS[:] = [
            subprocess.Popen(
                [sys.executable, os.path.join(ROOT, "tests", "cli_forks.py")],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=dict(os.environ, PYTHONPATH=path),
            ),
            dict(os.environ),
        ]
        atexit.register(_FORKS[0].kill)
    return _FORKS


def fork_request(call: dict) -> dict:
    """One request to `tests/cli_forks.py` (see its docstring), and its answer."""
    forks = fork_server()[0]
    forks.stdin.write(json.dumps(call) + "\n")
    forks.stdin.flush()
    answer = forks.stdout.readline()
    assert answer, f"tests/cli_forks.py stopped (exit {forks.wait()})"
    return json.loads(answer)


@contextlib.contextmanager
def config_reads():
    """Records every field of an ``ml_collections.ConfigDict`` read inside the block, as
    ``(the names of its node's fields, the field)``, so a read of a derived copy (the run
    configs studies derive) counts for the field it copies. Saving or comparing a whole config
    (``to_dict`` and the JSON dumps built on it) is not a read."""
    from ml_collections import ConfigDict

    reads, quiet = set(), [0]
    getitem, to_dict = ConfigDict.__getitem__, ConfigDict.to_dict

    def read(self, key):
        if not quiet[0] and isinstance(key, str) and "." not in key:
            reads.add((frozenset(self._fields), key))
        return getitem(self, key)

    def whole(self, *args, **kwargs):
        quiet[0] += 1
        try:
            return to_dict(self, *args, **kwargs)
        finally:
            quiet[0] -= 1

    ConfigDict.__getitem__, ConfigDict.to_dict = read, whole
    try:
        yield reads
    finally:
        ConfigDict.__getitem__, ConfigDict.to_dict = getitem, to_dict


def unread_fields(config, reads) -> list[str]:
    """The dotted paths of ``config``'s leaves that `config_reads` did not see read."""
    from ml_collections import ConfigDict

    out = []

    def walk(node, prefix):
        for key, value in node._fields.items():
            if isinstance(value, ConfigDict) and value._fields:
                walk(value, f"{prefix}{key}.")
            elif (frozenset(node._fields), key) not in reads:
                out.append(prefix + key)

    walk(config, "")
    return sorted(out)
