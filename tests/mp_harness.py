"""A harness that starts N local JAX processes (a localhost coordinator, gloo CPU
collectives, simulated CPU devices per process) and collects what each prints.

``launch(args, processes=2, devices=2)`` runs ``python <args>`` N times with the manual
launch's environment (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``,
read by `experiments.cli.start_multihost` and by `tests/mp_worker.py`). A process that
fails, or a launch that outlives its timeout (every process is then killed: never a stuck
suite), raises ``AssertionError`` with each process's last lines.

Each process is a fork of the test process's warm `tests/cli_forks.py` (which has imported
jax, flax, optax and the studies, but started no backend: each child picks its own devices
and joins the launch), as ``python <args>`` would run; ``env`` with other ``JAX_*`` values
than the fork server started with gets fresh interpreters.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

from helpers import fork_request, fork_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = "RESULT "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def environment(process: int, processes: int, devices: int, port: int) -> dict:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(
        [ROOT, os.path.join(ROOT, "tests")] + [env.get("PYTHONPATH", "")]
    )
    env.update(
        JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
        JAX_NUM_PROCESSES=str(processes),
        JAX_PROCESS_ID=str(process),
    )
    return env


class Process:
    """One started process: its id, return code and output (files read by path, so that
    its output so far can be read while it runs: `output`)."""

    def __init__(self, index, popen, out_path, err_path):
        self.index, self.popen, self.paths = index, popen, (out_path, err_path)
        self.returncode = None
        self.stdout = self.stderr = ""

    def output(self) -> str:
        """stdout then stderr, as written so far."""
        return "".join(open(p, errors="replace").read() for p in self.paths)

    def collect(self):
        self.stdout, self.stderr = (open(p, errors="replace").read() for p in self.paths)

    def tail(self, n: int = 15) -> str:
        lines = (self.stdout + self.stderr).splitlines()
        return f"--- process {self.index} (exit {self.returncode}):\n" + "\n".join(lines[-n:])

    def results(self) -> list:
        """The JSON values the process printed after ``RESULT``."""
        return [
            json.loads(ln[len(RESULT) :])
            for ln in self.stdout.splitlines()
            if ln.startswith(RESULT)
        ]


class Forked:
    """A process started by `tests/cli_forks.py`, with the part of ``subprocess.Popen``'s
    interface the harness uses."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self):
        if self.returncode is None:
            self.returncode = fork_request({"op": "poll", "pid": self.pid})["returncode"]
        return self.returncode

    def send_signal(self, sig) -> None:
        fork_request({"op": "signal", "pid": self.pid, "signal": int(sig)})

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self):
        while self.poll() is None:
            time.sleep(0.05)
        return self.returncode


LAUNCH_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def start(args, *, processes=2, devices=2, cwd=None, env=None) -> list[Process]:
    """Starts ``python <args>`` once per process (process 0 first); returns them running."""
    port, out = free_port(), []
    folder = tempfile.mkdtemp(prefix="sharp_minima_mp_")
    started = fork_server()[1]
    for i in range(processes):
        e = environment(i, processes, devices, port)
        e.update(env or {})
        paths = [os.path.join(folder, f"{i}.{s}") for s in ("out", "err")]
        for path in paths:  # readable at once (`Process.output`)
            open(path, "w").close()
        names = (set(e) | set(started)) - set(LAUNCH_VARIABLES)
        if all(e.get(k) == started.get(k) for k in names if k[:4] == "JAX_"):
            call = {"op": "start", "argv": list(args), "env": e, "cwd": cwd or ROOT}
            p = Forked(fork_request({**call, "stdout": paths[0], "stderr": paths[1]})["pid"])
        else:  # jax reads these when imported: a fresh interpreter
            with open(paths[0], "w") as o, open(paths[1], "w") as r:
                p = subprocess.Popen(
                    [sys.executable, *args], env=e, cwd=cwd or ROOT, stdout=o, stderr=r
                )
        out.append(Process(i, p, *paths))
    return out


def wait_for(proc: Process, text: str, timeout: float) -> None:
    """Waits until ``proc`` has printed ``text`` (AssertionError at ``timeout`` seconds or
    when it exits first)."""
    deadline = time.monotonic() + timeout
    while text not in proc.output():
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(
                f"process {proc.index} never printed {text!r}:\n{proc.output()[-2000:]}"
            )
        time.sleep(0.2)


def wait(procs: list[Process], timeout: float, *, check: bool = True, grace: float = 20.0):
    """Waits for every process; all are killed at ``timeout`` seconds, or ``grace`` seconds
    after one failed (the others may wait for it in a collective). With ``check`` a failure
    raises with every process's last lines. Returns ``procs``."""
    deadline = time.monotonic() + timeout
    while any(p.popen.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.popen.poll() for p in procs):  # one failed: the others get `grace` seconds
            deadline = min(deadline, time.monotonic() + grace)
        time.sleep(0.1)
    hung = [p for p in procs if p.popen.poll() is None]
    for p in hung:
        p.popen.kill()
    for p in procs:
        p.returncode = p.popen.wait()
        p.collect()
    if hung and (check or not any(p.returncode for p in procs if p not in hung)):
        raise AssertionError(
            f"processes {[p.index for p in hung]} killed after waiting\n"
            + "\n".join(p.tail() for p in procs)
        )
    if check and any(p.returncode for p in procs):
        raise AssertionError("a process failed\n" + "\n".join(p.tail() for p in procs))
    return procs


def launch(args, *, processes=2, devices=2, timeout=120.0, cwd=None, env=None, check=True):
    """`start` then `wait`: the finished processes."""
    procs = start(args, processes=processes, devices=devices, cwd=cwd, env=env)
    return wait(procs, timeout, check=check)
