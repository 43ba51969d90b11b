"""patchbench's messages go through the standard :mod:`logging` module.

Every module logs to a child of the ``patchbench`` logger. That logger has one handler of its
own (as libraries with a command line, e.g. transformers, do), which writes each message to
stderr through ``tqdm.write`` so that progress bars stay whole, at level INFO, and does not
pass messages on to the root logger. To quiet or redirect them::

    logging.getLogger("patchbench").setLevel(logging.ERROR)      # only errors
    logging.getLogger("patchbench").handlers[:] = [my_handler]   # somewhere else

Messages carry their ``patchbench:`` prefix in their text, so that the warnings a run keeps
in ``run.json`` read the same as on the terminal.
"""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

ROOT = "patchbench"


class TqdmHandler(logging.Handler):
    """Writes records to the current ``sys.stderr`` with ``tqdm.write`` (bars stay whole)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never stop a run
            self.handleError(record)


def get_logger(name: str) -> logging.Logger:
    """The logger of module ``name``, under a ``patchbench`` logger that has its handler."""
    root = logging.getLogger(ROOT)
    if not root.handlers:  # unless the user configured it before
        handler = TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return logging.getLogger(name)
