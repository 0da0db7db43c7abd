"""Helpers shared by the tests (importable: pytest puts this folder on sys.path)."""

import importlib
import json


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
