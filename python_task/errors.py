"""One exception type for every expected failure: bad slides, bad annotations, bad options.

The command line prints ``error: <file>: <cause>`` on one line and exits non-zero; library callers can catch
:class:`TaskError` and read ``path`` and ``cause`` separately.
"""

from __future__ import annotations

from os import PathLike


class TaskError(Exception):
    """A failure the user can fix: names the file (or option) at fault and the cause, on one line."""

    def __init__(self, path: str | PathLike[str] | None, cause: str) -> None:
        self.path = None if path is None else str(path)
        self.cause = " ".join(str(cause).split())  # always one line
        super().__init__(self.cause if self.path is None else f"{self.path}: {self.cause}")
