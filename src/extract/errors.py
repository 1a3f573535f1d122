"""The one exception type that means "the input or the settings are wrong", for both stages.

The ``gigassl`` command prints a :class:`UserError` as one line (the message says what is
wrong, with which file or value, and how to fix it) and exits with status 2; any other
exception is a bug and is shown with its traceback (see :mod:`gigassl.cli`). ``UserError``
subclasses ``ValueError``, so code and tests that catch ``ValueError`` keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input or settings, described in one line that names the file or value and the fix."""
