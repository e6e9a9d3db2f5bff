"""The failures a user can fix, as a small hierarchy: bad settings, slides, annotations, shards.

Every error names what is at fault and says why on one line: ``path`` (a file, or a thing such as ``stain
reference``) or ``setting`` (a field name such as ``lr`` or ``batch_size``), and ``cause``. The library speaks
in field names; settings mentioned inside a cause are quoted in backticks (``lower `lr```). The command line
alone turns them into its flags (``--lr``) and prints ``error: <file or flag>: <cause>``.
"""

from __future__ import annotations

from os import PathLike

# The exit status of a command that ran out of memory (a bounded point, ``ulimit -d``, or a full machine), apart
# from 1 (a failure the user can fix) and 2 (an unexpected one): the OpenMOLE plans and the sweep read it.
EXIT_OUT_OF_MEMORY = 3


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed: Python's MemoryError (NumPy's too), TensorFlow's ResourceExhaustedError, or an
    XLA (JAX) error whose status is RESOURCE_EXHAUSTED."""
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "ResourceExhaustedError"
            or "RESOURCE_EXHAUSTED" in str(exc))


class TaskError(Exception):
    """A failure the user can fix: the file (or setting) at fault and the cause, on one line."""

    def __init__(self, path: str | PathLike[str] | None, cause: str, *, setting: str | None = None) -> None:
        self.path = None if path is None else str(path)
        self.setting = setting
        self.cause = " ".join(str(cause).split())  # always one line
        subject = self.path if self.path is not None else setting
        super().__init__(self.cause if subject is None else f"{subject}: {self.cause}")


class ConfigError(TaskError):
    """A setting the program cannot use: ``setting`` is its field name (``lr``, ``tile_size``), ``path`` the file
    that gave it, if any (a plan)."""

    def __init__(self, setting: str | None, cause: str, *, path: str | PathLike[str] | None = None) -> None:
        super().__init__(path, cause, setting=setting)


class SlideError(TaskError):
    """A slide that cannot be opened or read, or lacks what the task needs (its µm/px)."""


class AnnotationError(TaskError):
    """An annotation or labels file that cannot be read, or whose regions cannot be used."""


class ShardError(TaskError):
    """Tile shards, their manifest, or a split of them that is missing, unreadable or inconsistent."""


class BusyError(TaskError):
    """An output folder another run is writing to (it holds the folder's lock): ``path`` is the folder."""


class ErrorList(TaskError):
    """Several failures found at once (every bad value of a plan, every damaged shard of a folder).

    ``errors`` holds them in order; the command line prints one line each. As a plain :class:`TaskError` it reads
    as the first one, with the count of the others.
    """

    def __init__(self, errors: list[TaskError]) -> None:
        if not errors:
            raise ValueError("ErrorList needs at least one error")
        self.errors = list(errors)
        first = self.errors[0]
        more = f" (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
        super().__init__(first.path, first.cause + more, setting=first.setting)
