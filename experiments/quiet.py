"""Quiet library logging for every entry point (studies, training and the benchmarks).

Orbax and TFDS log every file operation at INFO (and TFDS warns about the folders it
probes); an entry point shows errors only, unless the user asked for a verbosity
(``--verbosity=0``). Defines no flags, so a benchmark with its own flags can use it.
"""

from __future__ import annotations


def quiet(main):
    """``main`` with absl logging (which orbax and TFDS use) at ERROR unless ``--verbosity``
    was given."""

    def wrapped(argv):
        from absl import flags, logging

        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.ERROR)
        return main(argv)

    return wrapped
