"""The API reference (Sphinx autodoc over the public modules) builds with warnings as errors,
so a broken docstring or reference fails the suite."""

import os
import subprocess
import sys

from helpers import ROOT

MODULES = ("hessian", "curvature", "operators", "gradients", "per_example", "sharpness",
           "landscape", "dynamics", "optim", "losses", "tracking", "train", "studies")  # fmt: skip


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
    # The guide: every page of docs/guide, built from its own Markdown.
    guide = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "docs", "guide")))
    assert len(guide) >= 15 and "12-studies" in guide
    for name in guide:
        assert (tmp_path / "guide" / f"{name}.html").exists(), name
    assert "--config.sections" in (tmp_path / "guide" / "12-studies.html").read_text()


DOCUMENTED = MODULES[:-2] + ("notebook", "plotting", "studies.runs", "studies.common",
                              "studies.claims", "studies.sections")  # fmt: skip
STUDIES = ("keskar", "sharpest_directions", "nudged_sgd", "visualize_generalization",
           "sgd_noise", "curvature_demo")  # fmt: skip
CONTRACT = ("run", "figures", "claims", "report_markdown")


def _public_objects():
    """(name, object) of every public function, class and method of the documented modules,
    every name of ``sharp_minima.train`` and each study's contract."""
    import importlib
    import inspect

    from sharp_minima import train

    def members(prefix, obj):
        yield prefix, obj
        if inspect.isclass(obj) and not issubclass(obj, tuple | BaseException):
            for k, v in vars(obj).items():
                if not k.startswith("_") and inspect.isfunction(v):
                    if (v.__module__ or "").startswith("sharp_minima"):  # not flax's replace
                        yield f"{prefix}.{k}", v

    for name in DOCUMENTED:
        module = importlib.import_module(f"sharp_minima.{name}")
        names = getattr(module, "__all__", None) or [n for n in vars(module) if n[0] != "_"]
        for n in names:
            obj = getattr(module, n)
            if (
                inspect.isfunction(obj) or inspect.isclass(obj)
            ) and obj.__module__ == module.__name__:
                yield from members(f"{name}.{n}", obj)
    for n in train.__all__:
        obj = getattr(train, n)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            yield from members(f"train.{n}", obj)
    for study in STUDIES:
        module = importlib.import_module(f"sharp_minima.studies.{study}")
        for n in CONTRACT:
            yield f"studies.{study}.{n}", getattr(module, n)


def test_public_functions_document_their_arguments_returns_and_raises():
    """Google-style sections: ``Args:`` when there are arguments (``Attributes:`` for a
    record class), ``Returns:`` when the code returns a value, ``Raises:`` when it raises."""
    import inspect
    import re

    missing = []
    for name, obj in _public_objects():
        doc = inspect.getdoc(obj) or ""
        try:
            params = [p for p in inspect.signature(obj).parameters if p not in ("self", "cls")]
            source = inspect.getsource(obj)
        except (TypeError, ValueError, OSError):
            continue
        is_class = inspect.isclass(obj)
        if not doc:
            missing.append(f"{name}: no docstring")
            continue
        if params and "Args:" not in doc and not (is_class and "Attributes:" in doc):
            missing.append(f"{name}: Args")
        if is_class:
            continue
        if re.search(r"^[ \t]+return[ \t]+\S", source, re.M) and "Returns:" not in doc:
            missing.append(f"{name}: Returns")
        if re.search(r"^[ \t]+raise [A-Z]\w*\(", source, re.M) and "Raises:" not in doc:
            missing.append(f"{name}: Raises")
    assert not missing, "\n".join(missing)
