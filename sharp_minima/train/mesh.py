"""Devices: the data-parallel mesh of a run, and placing host arrays on it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sharp_minima.train.config import ConfigError


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D ``"data"`` mesh over the first ``num_devices`` devices (0 = all, every host)."""
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ConfigError(
                f"config.num_devices={num_devices} but only {len(devices)} devices are available"
            )
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), ("data",))


def serialize_collectives(mesh: Mesh) -> Callable[[Any], Any]:
    """``block_until_ready`` when ``mesh`` spans several *CPU* devices, identity otherwise.

    XLA:CPU runs each simulated device's part of a program on a shared thread pool; with
    several multi-device programs in flight (async dispatch) on few cores, the all-reduce of one
    can wait forever for a participant whose thread is busy with another (an abort after 40 s
    in ``rendezvous.cc``). Waiting for each step keeps one collective program in flight.
    GPUs and TPUs keep fully asynchronous dispatch.
    """
    if mesh.size > 1 and mesh.devices.flat[0].platform == "cpu":
        return jax.block_until_ready
    return lambda x: x


def replicate(x, mesh: Mesh):
    """A host array (the same on every host) as a global array replicated over ``mesh``."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, P()), lambda idx: x[idx])
