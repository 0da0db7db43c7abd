"""The README's commands and example stay true."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def test_ci_runs_exactly_the_readme_test_command():
    readme = read("README.md")
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2, commands
    ci_lines = [line.strip() for line in read(".ci/run").splitlines()]
    assert commands[1] in ci_lines
    # The main job is the Keskar quickstart (its tiny variant runs in test_keskar.py).
    assert "python -m experiments.keskar --config=configs/quickstart.py" in commands[0]


def test_readme_python_example_runs():
    readme = read("README.md")
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    top = namespace["top"]
    assert top.values.shape == (5,) and top.converged.all()
    assert namespace["tr"].stderr >= 0


def test_readme_training_example_runs(tmp_path, monkeypatch):
    readme = read("README.md")
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "train.train" in b)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(
        compile(
            block.replace("/tmp/sharp_minima_readme", str(tmp_path / "run")), "README.md", "exec"
        ),
        namespace,
    )
    result = namespace["result"]
    assert int(result.state.step) == result.final["step"] > 0
    logged = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "train/param_norm" in logged


def test_curvature_demo_runs_and_rejects_bad_flags(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.curvature_demo",
            f"--workdir={tmp_path}",
            "--steps=4",
            "--track_every=2",
            "--k=2",
            "--curvature_examples=64",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("results.json", "tracking.png", "tracking.pdf", "spectrum.png", "spectrum.pdf"):
        assert (tmp_path / name).exists(), name
    bad = subprocess.run(
        [sys.executable, "-m", "experiments.curvature_demo", "--stepz=3"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "stepz" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "experiments.curvature_demo", "--steps=0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "--steps must be positive" in bad.stderr
