"""Test configuration: 4 simulated CPU devices for the data-parallel tests.

Must run before jax is imported anywhere, hence at conftest import time.
"""

import atexit
import os
import shutil
import tempfile

# Four simulated devices; and XLA:CPU set to compile fast: the tests compile many small
# programs and run each briefly, so compiling fast matters more than the code's speed.
# Backend optimisations off (3x faster compiles, measured on the model zoo's forward
# passes), the legacy fusion emitters instead of the MLIR ones (compiles 2x faster again:
# the Huang tiny study 48 s -> 28 s on this 2-core machine), and each program generated as
# one module instead of split for parallel code generation (whose threads only contend with
# the other test worker on 2 cores: the sgd_noise tiny study's backend compile time
# 10 s -> 8 s). Every comparison in the suite is made within one setting (references are
# computed in the same process or with the same flags, which the command lines, notebooks
# and multi-process tests inherit, or carry a tolerance).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
    + " --xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One compilation cache for this test run, shared with the command lines the tests start:
# the same tiny models are compiled by many tests and processes (a third of the suite's time
# on a 2-core CPU). It starts empty, so every test still compiles what no earlier one did.
_CACHE = tempfile.mkdtemp(prefix="sharp_minima_jax_cache_")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import dataclasses  # noqa: E402
import importlib  # noqa: E402

import pytest  # noqa: E402

# Each study's tiny config, run once per test session (tests/test_studies.py and the studies'
# own tests read it; a test that changes a workdir works on a copy: `tiny_study.copy`).
TINY = {
    "keskar": "quickstart.py:tiny",
    "curvature_demo": "curvature_demo.py:tiny",
    "sharpest_directions": "sharpest_directions.py:tiny",
    "nudged_sgd": "nudged_sgd.py:tiny",
    "visualize_generalization": "visualize_generalization.py:tiny",
    "sgd_noise": "sgd_noise.py:tiny",
    "sam": "sam.py:tiny",
}


@dataclasses.dataclass
class TinyRun:
    config: object
    workdir: str
    results: dict
    lines: list
    unread: list  # the config's fields the run never read (helpers.config_reads)

    def copy(self, dst) -> str:
        """A copy of the run's workdir at ``dst`` (e.g. to extend or re-measure it)."""
        shutil.copytree(self.workdir, dst, dirs_exist_ok=True)
        return str(dst)


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """``tiny_study(name) -> TinyRun``: the study's tiny config, run once per session."""
    from helpers import config_reads, load_config, unread_fields

    done = {}

    def get(name: str) -> TinyRun:
        if name not in done:
            module = importlib.import_module(f"sharp_minima.studies.{name}")
            config = load_config(TINY[name])
            if "num_devices" in config:  # one device (multi-device: test_train)
                config = load_config(TINY[name], num_devices=1)
            workdir = str(tmp_path_factory.mktemp(name))
            lines = []
            with config_reads() as reads:
                results = module.run(config, workdir, log=lines.append)
            done[name] = TinyRun(config, workdir, results, lines, unread_fields(config, reads))
        return done[name]

    return get


# Under pytest-xdist (``-n``) the tests of one tiny study run in one worker (``--dist
# loadgroup``), so each study still runs once per test run while the studies spread over the
# workers. Studies that share tests share a group.
GROUPS = {
    "keskar": "keskar",
    "curvature_demo": "keskar",  # test_readme reads both
    "sharpest_directions": "jastrzebski",
    "nudged_sgd": "jastrzebski",  # one notebook runs both
    "visualize_generalization": "huang",
    "sgd_noise": "sgd_noise",
    "sam": "sam",
}
MODULE_STUDY = {  # the study a test module reads, when its tests are not parametrised by it
    "test_huang": "visualize_generalization",
    "test_jastrzebski": "sharpest_directions",
    "test_keskar": "keskar",
    "test_readme": "keskar",
    "test_runs": "keskar",
    "test_sgd_noise": "sgd_noise",
    "test_sam": "sam",
    "test_notebooks": "keskar",
    "test_multiprocess": "keskar",
}


def _study_of(item) -> str:
    name = getattr(getattr(item, "callspec", None), "params", {}).get("name")
    if name in TINY:  # a study, or the notebook named after it
        return name
    return MODULE_STUDY.get(item.module.__name__.rsplit(".", 1)[-1], "keskar")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups (xdist 3.8)
def pytest_collection_modifyitems(config, items):
    """Every test that reads a tiny study joins its study's xdist group (`GROUPS`)."""
    for item in items:
        if "tiny_study" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group(f"tiny_{GROUPS[_study_of(item)]}"))
