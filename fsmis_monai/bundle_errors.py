"""One clear last line for the project's input errors under ``python -m monai.bundle run``.

MONAI wraps an error raised while resolving a config item in ``RuntimeError: Failed to evaluate
ConfigExpression`` (or ``Failed to instantiate component``), so the product's own message would sit in the
middle of a long traceback. Every shipped bundle config imports this module (its ``imports`` list, whose
import statements MONAI evaluates before any other item), which installs :func:`excepthook`: an uncaught
error with bad input in its chain (the rule of the ``fsmis`` commands, :func:`fsmis_monai.io.input_error_line`)
is printed as one line ``error: <file>: <problem>``; any other error is a bug and keeps Python's full
traceback. ``FSMIS_TRACEBACK=1`` prints the traceback of input errors too, followed by the same line.

Written here rather than configured in MONAI: ``monai.bundle`` runs the workflow under ``fire`` with no hook
of its own for exceptions, so ``sys.excepthook`` is the one place that sees the error after MONAI wrapped it.
"""

from __future__ import annotations

import os
import sys
from types import TracebackType
from typing import Optional

from fsmis_monai.io import input_error_line

__all__ = ["excepthook", "install"]

TRACEBACK_ENV = "FSMIS_TRACEBACK"


def excepthook(exc_type: type[BaseException], error: BaseException, tb: Optional[TracebackType]) -> None:
    """``sys.excepthook``: ``error: <file>: <problem>`` on stderr for bad input, Python's traceback otherwise."""
    line = input_error_line(error)
    if line is None or os.environ.get(TRACEBACK_ENV):
        sys.__excepthook__(exc_type, error, tb)
    if line is not None:
        print(f"error: {line}", file=sys.stderr, flush=True)


def install() -> None:
    """Make :func:`excepthook` the process's ``sys.excepthook`` (idempotent)."""
    sys.excepthook = excepthook


install()
