"""Test configuration: 4 simulated CPU devices for the data-parallel tests.

Must run before jax is imported anywhere, hence at conftest import time.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
