"""The one base class for failures a user can fix (bad input, bad config, missing files).

The CLI prints a ``VolttlError`` as one line and exits 1; anything else is a bug and keeps
its traceback so that it can be reported. Every module's own error class derives from it.
It derives from ``ValueError`` so that library callers catching ``ValueError`` keep working.
"""

from __future__ import annotations


class VolttlError(ValueError):
    """A failure phrased for the user in one line, naming the file or key at fault."""
