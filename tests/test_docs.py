"""The API reference (Sphinx autodoc over the public modules) builds with warnings as errors,
so a broken docstring or reference fails the suite."""

import subprocess
import sys

from helpers import ROOT

MODULES = ("hessian", "curvature", "operators", "gradients", "sharpness", "landscape",
           "dynamics", "optim", "losses", "tracking", "train", "studies")  # fmt: skip


def test_api_reference_builds_without_warnings(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "docs",
            str(tmp_path),
        ],  # fmt: skip
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    for module in MODULES:
        assert (tmp_path / "api" / f"{module}.html").exists(), module
    page = (tmp_path / "api" / "hessian.html").read_text()
    for name in ("eigenpairs", "spectral_density", "trace", "Curvature"):
        assert f'id="sharp_minima.hessian.{name}"' in page, name
    dynamics = (tmp_path / "api" / "dynamics.html").read_text()
    assert 'id="sharp_minima.dynamics.PopulationTrainer"' in dynamics
    assert "Args" in page or "Parameters" in page  # Google-style sections rendered (napoleon)
