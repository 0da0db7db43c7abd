"""Files of a run: atomic writes, the workdir and its lock.

- `write_atomic` / `write_json`: a killed run never leaves a half-written file; files get the
  permissions of an ordinary file under the user's umask (colleagues can read them).
- `prepare_workdir`: creates the output folder, or says in one line why it cannot.
- `workdir_lock`: one process at a time per workdir. It is an advisory ``flock`` on
  ``<workdir>/.lock``, which the kernel releases when the holder dies however it dies, so the
  lock of a killed run is simply taken over by the next one. (``flock`` may not be shared
  between hosts on some network file systems: run one study per workdir per host.)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import socket
import sys
import tempfile
import time
from typing import Any

# Lock files this process holds (paths only), with how often the lock was entered.
_HELD: dict[str, int] = {}


class WorkdirError(ValueError):
    """The workdir cannot be used (not creatable, a file, not writable, or locked)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str, data: str | bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file in the same folder and a rename.

    The file's mode is ``0o666 & ~umask`` (as ``open`` would give), not `tempfile`'s 0600.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str, obj: Any) -> None:
    """Atomic JSON dump (numpy scalars and arrays are converted)."""
    write_atomic(path, json.dumps(obj, indent=2, default=to_builtin) + "\n")


def to_builtin(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"cannot serialise {type(x).__name__} to JSON")


def prepare_workdir(path: str) -> str:
    """Creates ``path`` (and its parents) if needed; returns it.

    Raises:
      WorkdirError: it is a file, cannot be created, or is not writable (one line saying why).
    """
    if not path:
        raise WorkdirError("the workdir is empty; pass --workdir=<folder>")
    if os.path.exists(path) and not os.path.isdir(path):
        raise WorkdirError(f"workdir {path} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"cannot create workdir {path}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise WorkdirError(f"workdir {path} is not writable")
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def workdir_lock(path: str, log=None):
    """Holds ``<path>/.lock`` for the duration of the block (one process per workdir).

    Args:
      path: the workdir (created if needed).
      log: optional line printer; told when the lock of a process that no longer runs is
        taken over.

    Raises:
      WorkdirError: another live process holds the lock (the message names it).
    """
    prepare_workdir(path)
    lock_path = os.path.realpath(os.path.join(path, ".lock"))
    if lock_path in _HELD:  # re-entered by this process (a study and its own training run)
        _HELD[lock_path] += 1
        try:
            yield
        finally:
            _HELD[lock_path] -= 1
        return
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        who = (
            f"process {holder.get('pid')} on {holder.get('host')} since "
            f"{holder.get('started')} (command: {shlex.join(holder.get('argv', []))})"
            if holder
            else "another process"
        )
        raise WorkdirError(
            f"workdir {path} is in use by {who}; wait for it to finish or use another --workdir"
        ) from None
    previous = _read_holder(fd)
    if previous and log is not None and previous.get("host") == socket.gethostname():
        if not _pid_alive(int(previous.get("pid", -1))):
            log(f"taking over the lock of process {previous.get('pid')}, which no longer runs")
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    _HELD[lock_path] = 1
    try:
        yield
    finally:
        del _HELD[lock_path]
        # A clean exit (Ctrl-C included) leaves an empty lock file: only a process that was
        # killed leaves its name behind, and only then is a take-over worth a line.
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _read_holder(fd) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
