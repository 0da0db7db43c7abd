"""Shared command-line plumbing for the absl entry points: bad input exits with status 2."""

from __future__ import annotations

import sys

from absl import app, flags


def parse_flags_or_exit(argv):
    """absl flags parser that prints one clear line and exits 2 on a bad flag."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"{argv[0]}: error: {e}", file=sys.stderr)
        sys.exit(2)


def usage_error(message: str):
    """Stops the program with ``message`` and exit status 2 (no traceback)."""
    raise app.UsageError(message, exitcode=2)


def run(main):
    """``app.run`` with the exit-status-2 flag parser."""
    app.run(main, flags_parser=parse_flags_or_exit)
