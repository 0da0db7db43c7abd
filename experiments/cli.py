"""Shared command-line plumbing for the absl entry points: bad input exits with status 2.

The flags every study's entry point takes are defined here, once (``--config``,
``--workdir``, ``--extend``, ``--multihost``), so that every module of ``experiments/`` can be
imported together in one process (a notebook, the tests).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
import threading
import time

from absl import app, flags
from ml_collections import config_flags

from experiments.quiet import quiet

config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/<name>.py[:variants]).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Output folder (re-running the same command resumes).")
flags.DEFINE_bool(
    "extend",
    False,
    "Keep a workdir whose finished work was computed under another config: reuse what the "
    "change leaves valid, compute the rest (without it such a workdir is refused).",
)
flags.DEFINE_bool(
    "multihost",
    False,
    "Start JAX's multi-controller runtime first (jax.distributed.initialize): one process per "
    "host. TPU pod slices, SLURM and Open MPI are detected; elsewhere give the three flags "
    "below (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).",
)
flags.DEFINE_string(
    "coordinator_address", None, "With --multihost: host:port of process 0's coordinator."
)
flags.DEFINE_integer("num_processes", None, "With --multihost: how many processes in all.")
flags.DEFINE_integer("process_id", None, "With --multihost: this process's id, 0 … n − 1.")
flags.DEFINE_float(
    "peer_timeout",
    60.0,
    "With --multihost: seconds without a sign of life from another process before this one "
    "stops with one line (a dead host would otherwise leave it waiting in a collective).",
)
FLAGS = flags.FLAGS
MANUAL = (  # (flag, environment variable) of a manual launch
    ("coordinator_address", "JAX_COORDINATOR_ADDRESS"),
    ("num_processes", "JAX_NUM_PROCESSES"),
    ("process_id", "JAX_PROCESS_ID"),
)


def _one_line(error: BaseException) -> str:
    """The last meaningful line of an error message (config_flags embeds tracebacks)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    if not lines:
        return type(error).__name__
    last = lines[-1]
    first = lines[0]
    if first.startswith("flag --") and ":" in first and first != last:
        return f"{first.split(':', 1)[0]}: {last}"
    return " ".join(lines) if len(lines) <= 2 else last


def parse_flags_or_exit(argv):
    """absl flags parser that prints one clear line and exits 2 on a bad flag or config key."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        message = _one_line(e)
        override = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.")), None)
        if override and not any(a.startswith("--config=") for a in argv[1:]):
            message = (
                f"{override} overrides a field of a config file, and no --config= was given: "
                f"add {_default_config(argv[0])} before it"
            )
        print(f"{argv[0]}: error: {message}", file=sys.stderr)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        # ml_collections raises these for a misspelt or mistyped --config.field override.
        inner = e.args[0] if e.args and isinstance(e.args[0], Exception) else e
        name = None
        if isinstance(inner, (KeyError, AttributeError)) and inner.args:
            name = str(inner.args[0]).splitlines()[0].strip("'\"")
        culprits = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        if name is not None:
            culprits = [c for c in culprits if name in c] or culprits
            msg = f"no config field {name!r} (a study's config holds only the fields it reads)"
        else:
            msg = _one_line(e)
        print(f"{argv[0]}: error: bad config override {' '.join(culprits)}: {msg}", file=sys.stderr)
    sys.exit(2)


def _default_config(program: str) -> str:
    """``--config=configs/<entry point>.py`` when that file exists (the default config of
    the study's entry point), else a config to start from."""
    import os

    name = os.path.splitext(os.path.basename(program))[0]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.exists(os.path.join(root, "configs", f"{name}.py")):
        return f"--config=configs/{name}.py (this command's default)"
    return "--config=<file> (e.g. --config=configs/quickstart.py)"


def usage_error(message: str):
    """Stops the program with one line ``prog: error: message`` and exit status 2."""
    print(f"{sys.argv[0]}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def config_or_exit(config):
    """The parsed ``--config`` value, or exit 2 when the file could not be loaded."""
    if config is None:
        usage_error("--config is required, e.g. --config=configs/f1.py")
    try:
        config.get("name")  # an unloadable file gives an object that raises on any access
    except Exception as e:  # noqa: BLE001  (we only turn it into one line)
        usage_error(f"--config: {_one_line(e)}")
    return config


def setup(argv, default_config=None):
    """The checks every experiment makes first: no stray arguments, a loadable ``--config``
    (or ``default_config()`` when the flag is absent), a ``--workdir``; then
    ``jax.distributed.initialize()`` with ``--multihost``. Returns the config."""
    if len(argv) > 1:
        usage_error(f"unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    if config is None and default_config is not None:
        config = default_config()
    config = config_or_exit(config)
    if not FLAGS.workdir:
        usage_error("--workdir is required")
    from sharp_minima import files

    try:
        files.prepare_workdir(FLAGS.workdir)
    except files.WorkdirError as e:
        usage_error(str(e))
    if FLAGS.multihost:
        start_multihost()
    elif any(getattr(FLAGS, f) is not None for f, _ in MANUAL):
        usage_error("--coordinator_address, --num_processes and --process_id need --multihost")
    return config


def multihost_arguments(values: dict, environ) -> dict:
    """The keyword arguments of ``jax.distributed.initialize`` for a manual launch: each of
    ``coordinator_address``, ``num_processes``, ``process_id`` from ``values`` (the flags) or
    else the environment (`MANUAL`); ``{}`` when none is set (cluster auto-detection).

    Raises:
      ValueError: some but not all are set, or the values are inconsistent.
    """
    out = {}
    for name, var in MANUAL:
        value = values.get(name)
        if value is None and environ.get(var):
            value = environ[var]
        if value is not None:
            out[name] = value
    if not out:
        return {}
    if len(out) < len(MANUAL):
        missing = ", ".join(f"--{n} (or {v})" for n, v in MANUAL if n not in out)
        raise ValueError(f"a manual multi-process launch needs all three values; missing {missing}")
    try:
        n, i = int(out["num_processes"]), int(out["process_id"])
    except ValueError:
        raise ValueError(
            f"--num_processes={out['num_processes']} and --process_id={out['process_id']} "
            "must be integers"
        ) from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--process_id={i} is not in 0 … {n - 1} (--num_processes={n})")
    host, _, port = str(out["coordinator_address"]).rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(
            f"--coordinator_address={out['coordinator_address']} is not host:port "
            "(e.g. localhost:12355, process 0's host)"
        )
    return {"coordinator_address": out["coordinator_address"], "num_processes": n, "process_id": i}


def start_multihost() -> None:
    """``jax.distributed.initialize`` with the manual launch's values (`multihost_arguments`)
    or cluster auto-detection; CPU collectives over gloo (CPU-only hosts, the tests); then
    `watch_peers` with ``--peer_timeout``. Bad values exit 2 with one line."""
    import os

    try:
        kwargs = multihost_arguments({f: getattr(FLAGS, f) for f, _ in MANUAL}, os.environ)
    except ValueError as e:
        usage_error(str(e))
    if not FLAGS.peer_timeout > 0:
        usage_error(f"--peer_timeout={FLAGS.peer_timeout} must be a positive number of seconds")
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # The runtime's own heartbeat check aborts with a stack dump: let `watch_peers` speak first.
    kwargs["heartbeat_timeout_seconds"] = max(100, math.ceil(2 * FLAGS.peer_timeout))
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        usage_error(f"--multihost: {_one_line(e)}")
    watch_peers(FLAGS.peer_timeout)


def watch_peers(
    timeout: float, every: float = 1.0, *, client=None, process=None, count=None
) -> threading.Thread | None:
    """Stops this process with one line (`lost_peer`, exit status 1) when another process of
    the launch has shown no sign of life for ``timeout`` seconds.

    A daemon thread bumps this process's counter in the coordination service's key-value
    store every ``every`` seconds and reads the others'. A process killed in the middle of a
    collective can leave the rest waiting in it for good (gloo does not always notice), until
    the runtime's heartbeat check aborts them with a stack dump; this thread speaks first.
    The thread ends quietly once the runtime shuts down.

    Args:
      timeout: seconds a peer's counter may stay unchanged.
      every: seconds between two checks.
      client: the runtime's client (default: JAX's, once ``jax.distributed`` is initialised).
      process: this process's index (default ``jax.process_index()``).
      count: the number of processes (default ``jax.process_count()``).

    Returns:
      The thread (None in a single-process run).
    """
    import jax
    from jax._src import distributed

    if client is None:
        client = getattr(distributed.global_state, "client", None)
    me = jax.process_index() if process is None else process
    count = jax.process_count() if count is None else count
    if client is None or count == 1:
        return None
    key = "sharp_minima/alive/{}".format
    start = time.monotonic()
    seen = {p: (None, start) for p in range(count) if p != me}  # value, since when

    def beat():
        for n in itertools.count():
            try:
                client.key_value_set(key(me), str(n), allow_overwrite=True)
            except Exception:  # noqa: BLE001  (the runtime shut down: the run is over)
                return
            now = time.monotonic()
            for p, (last, since) in seen.items():
                try:
                    value = client.key_value_try_get(key(p))
                except Exception:  # noqa: BLE001  (not written yet)
                    value = last
                if value != last:
                    seen[p] = (value, now)
                elif now - since > timeout:
                    lost_peer(f"process {p} has shown no sign of life for {now - since:.0f} s")
                    return
            time.sleep(every)

    thread = threading.Thread(target=beat, name="watch_peers", daemon=True)
    thread.start()
    return thread


def log(line: str) -> None:
    """Prints on process 0 only (every host runs the same program)."""
    import jax

    if jax.process_index() == 0:
        print(line, flush=True)


@contextlib.contextmanager
def user_errors_exit_2():
    """Bad config, missing data or bad values → one line and exit 2; NaN/Inf, or a study
    whose runs all diverged (nothing to report) → one line and exit 1."""
    from sharp_minima import data, train
    from sharp_minima.studies import runs

    try:
        yield
    except (train.ConfigError, data.DataNotFoundError, ValueError) as e:
        usage_error(str(e))
    except (train.NonFiniteError, runs.NothingToReport) as e:
        raise SystemExit(f"{sys.argv[0]}: error: {e}") from None


def _interruptible(main):
    """Ctrl-C: one line on stderr (where the run stopped and how to resume), exit status 130,
    no traceback. Training checkpoints its last completed step first; finished measurements
    are cached, so rerunning the same command resumes. In a multi-process run, a collective
    that fails because another process died gives one line and exit status 1 at once
    (`lost_peer`), instead of a traceback and a wait for the runtime's shutdown barrier."""

    def wrapped(argv):
        try:
            return main(argv)
        except KeyboardInterrupt as e:
            message = str(e) or "interrupted; rerun the same command to resume"
            print(message, file=sys.stderr, flush=True)
            sys.exit(130)
        except Exception as e:
            if FLAGS.multihost and _collective_failure(e):
                lost_peer(e)
            raise

    return wrapped


def _collective_failure(error: BaseException) -> bool:
    import jax

    return jax.process_count() > 1 and isinstance(error, jax.errors.JaxRuntimeError)


def lost_peer(error: BaseException | str) -> None:
    """One line naming what failed (a collective's error, or a process gone silent: see
    `watch_peers`), then ``os._exit(1)``: the runtime's own exit would wait for a shutdown
    barrier that the dead process never reaches (until its heartbeat timeout) and then abort
    with a stack dump. What was saved stays: rerunning every process with the same command
    resumes from the last checkpoint."""
    import os

    import jax

    what = error if isinstance(error, str) else f"a collective failed ({_one_line(error)[:200]})"
    print(
        f"{sys.argv[0]}: error: process {jax.process_index()} of {jax.process_count()}: "
        f"{what}; another process has probably died; rerun every process with the same "
        "command to resume from the last checkpoint",
        file=sys.stderr,
        flush=True,
    )
    os._exit(1)


def run(main):
    """``app.run`` with the exit-status-2 flag parser, quiet library logging and a one-line
    Ctrl-C."""
    app.run(_interruptible(quiet(main)), flags_parser=parse_flags_or_exit)
