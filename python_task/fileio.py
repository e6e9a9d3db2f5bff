"""Atomic writes: outputs appear under their final name only once complete, with the mode the umask gives. One
writer per output folder.

JSON is written strictly (RFC 8259): a number that is not finite (NaN, an infinity) is written ``null``, which
every parser reads (JavaScript's ``JSON.parse``, jq, Java's strict readers), and :func:`nan_for_null` reads it
back as NaN. CSV files keep ``nan``.

:func:`folder_lock` makes a run the only writer of its output folder (a ``flock`` on a lock file inside it); while
it is held, temporary files left in the folder by an interrupted run are stale and
:func:`remove_stale_temporaries` deletes them.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import errno
import json
import logging
import math
import os
import socket
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from python_task.errors import BusyError

log = logging.getLogger(__name__)

LOCK_NAME = ".python_task.lock"  # the lock file inside an output folder while a run writes to it


def current_umask() -> int:
    """The process's umask (read without changing it where /proc tells it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temporary_sibling(final: Path) -> Path:
    """A unique temporary name in the same folder as ``final`` (so the rename is atomic), with the mode a plain
    ``open(final, "w")`` would give (0666 less the umask): ``mkstemp`` creates 0600, which no colleague on a shared
    filesystem, and no container running as another user, could read."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path; rename it to ``final`` if the block succeeds, delete it otherwise."""
    final = Path(final)
    tmp = temporary_sibling(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if exc.filename in (None, str(tmp)):  # a full disk: name the file being written, not its temporary
            raise OSError(exc.errno, exc.strerror or str(exc), str(final)) from exc
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> None:
    """``obj`` as strict JSON (see :func:`dumps_strict`)."""
    write_text_atomic(path, dumps_strict(obj, indent=indent) + "\n")


def dumps_strict(obj: Any, *, indent: int | None = None, **kwargs: Any) -> str:
    """``json.dumps`` that always gives valid JSON: NaN and infinities (Python or numpy) become ``null``; numpy
    scalars and arrays, and paths, are converted."""
    return json.dumps(strict_json(obj), indent=indent, allow_nan=False, default=_json_default, **kwargs)


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (recursively through dicts, lists, tuples, numpy)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy scalar or array
        return strict_json(obj.tolist())
    return obj


def nan_for_null(values: Mapping[str, Any]) -> dict[str, Any]:
    """A flat JSON object of numbers as written by :func:`write_json_atomic` (``metrics.json``), read back: its
    nulls are NaN again."""
    return {k: math.nan if v is None else v for k, v in values.items()}


def write_csv_atomic(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]],
                     fieldnames: Sequence[str] | None = None) -> None:
    """Write dict rows to CSV; columns are ``fieldnames`` or the union of keys in first-seen order."""
    if fieldnames is None:
        seen: dict[str, None] = {}
        for row in rows:
            for key in row:
                seen.setdefault(key, None)
        fieldnames = list(seen)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fieldnames), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


def _json_default(obj: Any) -> Any:
    """Make numpy scalars and paths JSON-serialisable."""
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# --------------------------------------------------------------------------------------------- one writer per folder

@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str], command: str) -> Iterator[Path]:
    """Hold the output folder ``folder`` (created if needed) for the block: an exclusive ``flock`` on
    ``folder/.python_task.lock``, which records the holder (pid, host, command, start time).

    A second run that asks while the lock is held gets :class:`~python_task.errors.BusyError` naming the folder and
    the holder's pid at once (no waiting). The lock dies with its process (``kill -9`` included), so a crashed run
    never blocks the next one; the file is removed on release (a stale one left by a killed run is harmless). On a
    filesystem that refuses locks (some NFS mounts) the run goes on unlocked, with a warning.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = _acquire(folder, path)
    if fd is None:  # the filesystem refuses locks: warned, run unlocked
        yield path
        return
    try:
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "started": started}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _acquire(folder: Path, path: Path) -> int | None:
    """The locked descriptor of ``path``; None where locks are not supported; BusyError when held elsewhere."""
    try:
        import fcntl  # POSIX only: imported here so the module loads anywhere
    except ImportError:
        return None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _lock_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise BusyError(folder, f"in use by another run ({holder}): wait for it to finish, or choose another "
                                "`out`") from None
            log.warning("%s: cannot be locked (%s): make sure no other run writes to it", folder,
                        exc.strerror or exc)
            return None
        # a releasing holder unlinks the file: the one locked must still be the one at ``path``
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _lock_holder(fd: int) -> str:
    """``extract, pid 1234 on host, since 2026-01-01T10:00:00+00:00`` from a lock file's record."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "pid unknown"
    where = f" on {info['host']}" if info.get("host") and info["host"] != socket.gethostname() else ""
    since = f", since {info['started']}" if info.get("started") else ""
    command = f"{info['command']}, " if info.get("command") else ""
    return f"{command}pid {info['pid']}{where}{since}"


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files an interrupted run left in ``folder`` (not below): the hidden ``.NAME.*.tmp``
    of :func:`atomic_path` and ``.NAME.*.tmp.keras`` of a model being saved. Call it only while holding the
    folder's :func:`folder_lock`: then no other run is writing them. Returns the files removed (logged)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed, size = [], 0
    for path in sorted(folder.iterdir()):
        name = path.name
        if name.startswith(".") and (name.endswith(".tmp") or name.endswith(".tmp.keras")) and path.is_file():
            with contextlib.suppress(OSError):
                size += path.stat().st_size
                path.unlink()
                removed.append(path)
    if removed:
        log.info("%s: removed %d temporary file%s (%.1f MB) left by an interrupted run", folder, len(removed),
                 "s" * (len(removed) != 1), size / 1e6)
    return removed
