"""Atomic writes: outputs appear under their final name only once complete, with the mode the umask gives.

JSON is written strictly (RFC 8259): a number that is not finite (NaN, an infinity) is written ``null``, which
every parser reads (JavaScript's ``JSON.parse``, jq, Java's strict readers), and :func:`nan_for_null` reads it
back as NaN. CSV files keep ``nan``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


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
