"""The one exception type that means "the input or the settings are wrong", for both stages.

The ``gigassl`` command prints a :class:`UserError` as one line (the message says what is
wrong, with which file or value, and how to fix it) and exits with status 2; any other
exception is a bug and is shown with its traceback (see :mod:`gigassl.cli`). ``UserError``
subclasses ``ValueError``, so code and tests that catch ``ValueError`` keep working.

:func:`one_line` is how every such line is made from an exception: its message on one line, or,
for an error re-raised from a DataLoader worker (whose message carries the worker's traceback),
the original ``Type: message`` line alone.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input or settings, described in one line that names the file or value and the fix."""


def one_line(error: BaseException, *, with_type: bool = False) -> str:
    """The error's message on one line: its non-blank lines stripped and joined by spaces (the
    type's name when the message is empty; ``with_type``: prefixed with ``Type: ``, for errors
    whose message does not say what went wrong). An error re-raised from a DataLoader worker
    carries the worker's traceback in its message: its last line, the original ``Type: message``."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if any(line.startswith("Original Traceback") for line in lines):
        return lines[-1]
    text = " ".join(lines)
    if not text:
        return type(error).__name__
    return f"{type(error).__name__}: {text}" if with_type else text
