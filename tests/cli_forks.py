"""Runs ``python -m experiments.<module> ...`` command lines for the tests, each in a fork of
this process, which imports the libraries once (`helpers.run_experiment`: on a 2-core CPU a
fresh interpreter spends 5–7 s importing jax, flax, optax, matplotlib and the studies, most
of a command line that stops at a bad flag). Forking is safe: nothing here starts JAX's
backend or a thread before the fork, and each child runs its command line as ``python -m``
would — its own environment, working directory, flags and backend, stdout and stderr to
files.

One request per line on stdin, one answer per line on stdout (JSON):
``{"module": "train", "args": [...], "env": {...}, "cwd": "...", "timeout": 300}`` ->
``{"returncode": 2, "stdout": "...", "stderr": "..."}``; a child that outlives its timeout is
killed (return code -9, ``"timed out after … s"`` appended to its stderr).

The processes of a multi-process test (`tests/mp_harness.py`) run side by side, so they are
started and watched by three more requests: ``{"op": "start", "argv": ["-m", "experiments.
train", ...] or ["tests/mp_worker.py", ...], "env", "cwd", "stdout": path, "stderr": path}``
-> ``{"pid": 123}`` (not waited for); ``{"op": "poll", "pid": 123}`` -> ``{"returncode": null
or its exit status}``; ``{"op": "signal", "pid": 123, "signal": 9}`` -> ``{}``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time

# What the command lines import (not the experiments' own modules: run as __main__, they
# define their flags then).
import flax  # noqa: F401
import jax  # noqa: F401
import matplotlib
import optax  # noqa: F401

matplotlib.use("Agg")  # what a fresh `python -m` picks without a display
import matplotlib.pyplot  # noqa: E402, F401

import sharp_minima.studies.curvature_demo  # noqa: E402, F401
import sharp_minima.studies.keskar  # noqa: E402, F401
import sharp_minima.studies.nudged_sgd  # noqa: E402, F401
import sharp_minima.studies.sgd_noise  # noqa: E402, F401
import sharp_minima.studies.sharpest_directions  # noqa: E402, F401
import sharp_minima.studies.visualize_generalization  # noqa: E402, F401
import sharp_minima.train  # noqa: E402, F401


def child(call: dict, out: str, err: str) -> None:
    """The command line, in the forked child (never returns: it ends as the interpreter ends
    a ``python -m`` or ``python script.py`` run, waiting for the run's threads, e.g. orbax's
    checkpoint writers, and running its exit handlers)."""
    import runpy
    import traceback

    code = 1
    try:
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, out, 0), (2, err, 0)):
            f = os.open(path, flags or os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(f, fd)
            os.close(f)
        os.environ.clear()
        os.environ.update(call["env"])
        os.chdir(call["cwd"])
        argv = call.get("argv") or ["-m", f"experiments.{call['module']}", *call["args"]]
        if argv[0] == "-m":
            sys.path[0] = call["cwd"]  # as `python -m` puts the working directory first
            sys.argv = [argv[1].replace(".", "/") + ".py", *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))  # the script's folder
            sys.argv = list(argv)
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:  # as the interpreter turns it into an exit status
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 — as the interpreter would: traceback, status 1
        traceback.print_exc()
    sys.exit(code)  # up through `run` and `main`: the child never reads the requests


def run(call: dict) -> dict:
    folder = tempfile.mkdtemp(prefix="sharp_minima_cli_")
    out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
    pid = os.fork()
    if pid == 0:
        child(call, out, err)
    deadline = time.monotonic() + call["timeout"]
    status = None
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        status = None
        time.sleep(0.02)
    if status is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    result = {"returncode": -9 if status is None else os.waitstatus_to_exitcode(status)}
    for name, path in (("stdout", out), ("stderr", err)):
        with open(path, errors="replace") as f:
            result[name] = f.read()
        os.remove(path)
    os.rmdir(folder)
    if status is None:
        result["stderr"] += f"\ntimed out after {call['timeout']} s"
    return result


STARTED = {}  # pid -> exit status, once reaped (None while it runs)


def start(call: dict) -> dict:
    pid = os.fork()
    if pid == 0:
        child(call, call["stdout"], call["stderr"])
    STARTED[pid] = None
    return {"pid": pid}


def poll(call: dict) -> dict:
    pid = call["pid"]
    if STARTED[pid] is None:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            STARTED[pid] = os.waitstatus_to_exitcode(status)
    return {"returncode": STARTED[pid]}


def send(call: dict) -> dict:
    if STARTED[call["pid"]] is None:
        os.kill(call["pid"], call["signal"])
    return {}


def main() -> None:
    ops = {"run": run, "start": start, "poll": poll, "signal": send}
    for line in sys.stdin:
        if line.strip():
            call = json.loads(line)
            print(json.dumps(ops[call.get("op", "run")](call)), flush=True)


if __name__ == "__main__":
    main()
