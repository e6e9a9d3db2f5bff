"""Atomic writes: outputs appear under their final name only once complete, with the mode the umask gives. One
writer per output folder.

JSON is written strictly (RFC 8259): a number that is not finite (NaN, an infinity) is written ``null``, which
every parser reads (JavaScript's ``JSON.parse``, jq, Java's strict readers), and :func:`nan_for_null` reads it
back as NaN. CSV files keep ``nan``.

:func:`folder_lock` makes a run the only writer of its output folder (a ``flock`` on a lock file inside it); while
it is held, temporary files left in the folder by an interrupted run are stale and
:func:`remove_stale_temporaries` deletes them.

No write follows a symbolic link: a file the project creates or truncates in place (the lock, a log) is opened
with ``O_NOFOLLOW`` and a link there is refused (:class:`~python_task.errors.TaskError` naming it), so a link
planted in an output folder can never redirect a write to its target; a temporary file is created with
``O_EXCL`` (never through a link) and renamed over its final name, which replaces a link there instead of
writing through it.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import errno
import hashlib
import json
import logging
import math
import os
import socket
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from python_task.errors import BusyError, TaskError

log = logging.getLogger(__name__)

LOCK_NAME = ".python_task.lock"  # the lock file inside an output folder while a run writes to it
NAME_MAX = 255  # the longest file name, in bytes, where the filesystem does not say (Linux, macOS, ext4, APFS)
TEMPORARY_SUFFIX = ".tmp"  # the end of every temporary name (what remove_stale_temporaries recognises)
_RANDOM_PART = 8  # characters mkstemp puts between the prefix and the suffix


def current_umask() -> int:
    """The process's umask (read without changing it where /proc tells it)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
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
    filesystem, and no container running as another user, could read.

    ``mkstemp`` creates the file with ``O_CREAT | O_EXCL``, which never follows a symbolic link. The name is
    ``.FINAL.XXXXXXXX.tmp``, shortened (:func:`temporary_prefix`) where that would exceed the folder's longest file
    name. A folder that refuses the file (read-only, full) is reported under ``final``, the name the user knows."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, name = tempfile.mkstemp(prefix=temporary_prefix(final), suffix=TEMPORARY_SUFFIX, dir=final.parent)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(final)) from exc
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    return Path(name)


def temporary_prefix(final: Path) -> str:
    """``.FINAL.``, the start of ``final``'s temporary names, when ``.FINAL.XXXXXXXX.tmp`` fits in the folder's
    longest file name; else the longest start of FINAL that fits, then ``~`` and 8 hex digits of FINAL's SHA-1
    (two long names with one start still get different prefixes). A 248-byte name is legal where the limit is
    255 bytes, but its temporary name, 14 bytes longer, would not be."""
    limit = name_max(final.parent)
    room = limit - 2 - _RANDOM_PART - len(TEMPORARY_SUFFIX)  # the leading and trailing dots, mkstemp's part
    if len(os.fsencode(final.name)) <= room:
        return f".{final.name}."
    tag = "~" + hashlib.sha1(os.fsencode(final.name)).hexdigest()[:8]
    stem = final.name
    while stem and len(os.fsencode(stem + tag)) > room:  # by characters: never a split multi-byte character
        stem = stem[:-1]
    return f".{stem}{tag}."


def name_max(folder: Path) -> int:
    """The longest file name ``folder``'s filesystem takes, in bytes (:data:`NAME_MAX` where it does not say)."""
    try:
        value = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return NAME_MAX
    return value if isinstance(value, int) and value > 0 else NAME_MAX


def open_for_writing(path: str | os.PathLike[str], *, binary: bool = False) -> IO[Any]:
    """``path`` created or truncated for writing (text in UTF-8, or ``binary``), as ``open(path, "w")`` but never
    through a symbolic link: a link at ``path`` is refused with a :class:`TaskError` naming it (its target, which
    may be anyone's file, is left as it is). The mode is the umask's."""
    path = Path(path)
    fd = open_no_follow(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    return os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")


def open_no_follow(path: Path, flags: int) -> int:
    """``os.open(path, flags | O_NOFOLLOW)`` with the umask's mode; a symbolic link at ``path`` (dangling or
    not) raises :class:`TaskError` naming it, and any other failure an ``OSError`` naming ``path``."""
    try:
        return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o666 & ~current_umask())
    except OSError as exc:
        if exc.errno == errno.ELOOP or path.is_symlink():
            raise TaskError(path, "is a symbolic link: refusing to write through it (remove the link; its target "
                                  "is left as it is)") from None
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc


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


@contextlib.contextmanager
def atomic_paths(finals: Sequence[str | os.PathLike[str]]) -> Iterator[list[Path]]:
    """Temporary paths for several outputs of one result, renamed to ``finals`` together only once the block
    has written them all; deleted, and the previous outputs left as they were, if it fails or is interrupted.

    The last of ``finals`` marks the set complete: it is removed before the others are renamed and renamed last,
    so a run killed during the renames (microseconds, against the minutes of writing) leaves the folder without
    its marker, never a marker beside another result's files."""
    finals = [Path(f) for f in finals]
    temps: list[Path] = []
    try:
        for final in finals:
            temps.append(temporary_sibling(final))
        yield list(temps)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(finals[-1])
        for tmp, final in zip(temps, finals):
            _rename(tmp, final)
    finally:
        for tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _rename(tmp: Path, final: Path) -> None:
    """``os.replace`` whose failure names ``final``, the file the user asked for."""
    try:
        os.replace(tmp, final)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(final)) from exc


def open_without_waiting(path: str | os.PathLike[str]) -> tuple[int, os.stat_result]:
    """A read-only descriptor of ``path`` and its status, opened with ``O_NONBLOCK`` so that a FIFO does not wait
    for a writer: the caller refuses what is not a regular file (a device, a FIFO) before reading a byte. The
    descriptor is the caller's to close; ``OSError`` as ``os.open`` raises it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


def read_json_file(path: str | os.PathLike[str], *, missing: str, damaged: str,
                   error: type[TaskError] = TaskError) -> Any:
    """The JSON in ``path``; one ``error`` naming the file otherwise: ``missing`` when it does not exist, ``damaged``
    (after the parser's reason) when it is not valid JSON, and the system's reason when it cannot be read."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(path, missing) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(path, f"cannot be read ({exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(path, f"not valid JSON ({exc.msg}: line {exc.lineno}, column {exc.colno}): {damaged}") from None


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
        fd = _open_lock_file(folder, path)
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
            if os.lstat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _open_lock_file(folder: Path, path: Path) -> int:
    """The lock file, created if needed, never through a symbolic link (:func:`open_no_follow`); a folder that
    refuses it (read-only) is reported under the folder, the output the user named."""
    try:
        return open_no_follow(path, os.O_RDWR | os.O_CREAT)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write in this output folder ({exc.strerror or exc})", str(folder)) \
            from None


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
    of :func:`atomic_path` (``.START~HASH.*.tmp`` for a name too long for that, :func:`temporary_prefix`) and
    ``.NAME.*.tmp.keras`` of a model being saved. Call it only while holding the folder's :func:`folder_lock`: then
    no other run is writing them. Returns the files removed (logged)."""
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
