"""The shards folder's ``manifest.csv``: one row per finished shard, with its tile counts per class.

Columns: ``slide_id``, ``patient_id``, ``diagnosis``, ``shard`` (file name), ``n_tiles``, one ``n_<class>`` per
class, then ``codec``, ``tile_size``, ``mpp`` and ``slide_path`` (the slide file the shard was cut from, as the
cohort gave it). ``extract`` rewrites it from the shards present; ``split`` and
``train`` read it back, checked (:func:`read_manifest`), and identify the shard set by :func:`manifest_digest`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from python_task.errors import ShardError
from python_task.fileio import write_csv_atomic
from python_task.shards.format import check_labels, list_shards, open_shard_file, reading, shard_info_from_file
from python_task.wsi.labels import DEFAULT_CLASSES

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
SETTINGS_NAME = "extract.json"  # the parameters a folder's shards are made with (written by extract)
LEADING_COLUMNS = ("slide_id", "patient_id", "diagnosis", "shard", "n_tiles")
REQUIRED_COLUMNS = ("slide_id", "patient_id", "shard", "n_tiles")


def manifest_rows(shards_dir: str | os.PathLike[str], *, params: Mapping[str, Any] | None = None,
                  problems: list[ShardError] | None = None) -> list[dict[str, Any]]:
    """One manifest row per finished shard, with tile counts per class.

    A shard that cannot be read, whose labels are not indexes into its ``label_names``, or (given ``params``, the
    parameters the folder's shards share) that was made with other values of them has no row: its :class:`ShardError` is
    appended to ``problems`` when given, raised otherwise."""
    rows = []
    for path in list_shards(shards_dir):
        try:
            rows.append(_manifest_row(path, params))
        except ShardError as exc:
            if problems is None:
                raise
            problems.append(exc)
    return rows


def _manifest_row(path: Path, params: Mapping[str, Any] | None) -> dict[str, Any]:
    with open_shard_file(path) as f:
        info = shard_info_from_file(f, path)
        with reading(path, "labels"):
            labels = f["labels"][()]
    if params is not None and {k: info.params.get(k) for k in params} != dict(params):
        raise ShardError(path, "made with other extraction parameters than the folder's (extract.json): not listed; "
                         "extract this slide again with `overwrite`, or move the shard away")
    check_labels(path, labels, info.label_names)
    counts = np.bincount(labels, minlength=len(info.label_names))
    row: dict[str, Any] = {"slide_id": info.slide_id, "patient_id": info.patient_id,
                           "diagnosis": info.diagnosis, "shard": path.name, "n_tiles": info.n_tiles}
    for name, count in zip(info.label_names, counts):
        row[f"n_{name}"] = int(count)
    row.update(codec=info.codec, tile_size=info.tile_size, mpp=round(info.mpp, 6), slide_path=info.slide_path)
    return row


def write_manifest(shards_dir: str | os.PathLike[str], *, params: Mapping[str, Any] | None = None,
                   problems: list[ShardError] | None = None) -> Path:
    """(Re)write ``manifest.csv`` from the shards present, so a resumed run lists every shard. Shards that cannot
    be listed (see :func:`manifest_rows`) are left out, each with a logged warning (and its error appended to
    ``problems`` when given)."""
    found: list[ShardError] = []
    rows = manifest_rows(shards_dir, params=params, problems=found)
    for problem in found:
        log.warning("left out of %s: %s", MANIFEST_NAME, problem)
    if problems is not None:
        problems.extend(found)
    path = Path(shards_dir) / MANIFEST_NAME
    if rows:
        write_csv_atomic(path, rows)
    else:
        write_csv_atomic(path, [], fieldnames=LEADING_COLUMNS)
    return path


def read_manifest(shards_dir: str | Path) -> list[dict]:
    """Rows of ``shards_dir/manifest.csv`` in file order.

    Text columns are stripped strings (``diagnosis`` is ``""`` when absent); ``n_tiles`` and every ``n_<class>``
    column are ints. Raises :class:`ShardError` naming the manifest when it is missing, unparsable (ragged rows,
    missing columns, non-integer counts, empty or duplicate ids) or lists no slide.
    """
    path = Path(shards_dir) / MANIFEST_NAME
    if not path.is_file():
        where = "the shards folder does not exist" if not Path(shards_dir).is_dir() else "no manifest in the folder"
        raise ShardError(path, f"not found ({where}): run extract first")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip() for f in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in fields]
            if missing:
                raise ShardError(path, f"not a shards manifest: missing column(s) {', '.join(missing)} "
                                f"(columns found: {', '.join(fields) or 'none'})")
            if len(set(fields)) != len(fields):
                raise ShardError(path, "not a shards manifest: duplicate column names")
            reader.fieldnames = fields
            count_cols = [f for f in fields if f.startswith("n_")]
            rows: list[dict] = []
            seen: set[str] = set()
            for raw in reader:
                line = reader.line_num
                if None in raw or any(v is None for v in raw.values()):
                    raise ShardError(path, f"line {line}: {_n_fields(raw)} fields where the header has "
                                    f"{len(fields)}")
                row: dict[str, Any] = {k: v.strip() for k, v in raw.items()}
                row.setdefault("diagnosis", "")
                for col in count_cols:
                    row[col] = _count(row[col], col, line, path)
                for col in ("slide_id", "patient_id", "shard"):
                    if not row[col]:
                        raise ShardError(path, f"line {line}: empty {col}")
                if row["slide_id"] in seen:
                    raise ShardError(path, f"line {line}: slide {row['slide_id']} is listed twice")
                seen.add(row["slide_id"])
                rows.append(row)
    except ShardError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ShardError(path, f"cannot be read as CSV: {exc}") from exc
    if not rows:
        raise ShardError(path, "lists no slide (did extract find any tile?): nothing to split")
    _check_one_patient_per_file(path, rows)
    return rows


def _check_one_patient_per_file(path: Path, rows: Sequence[Mapping]) -> None:
    """Refuse a manifest whose ``slide_path`` column shows one slide file under two patients (shards of two
    cohort tables in one folder): a split would put the same tiles in training and held-out data."""
    owners: dict[str, Mapping] = {}
    for row in rows:
        source = os.path.normpath(row["slide_path"]) if row.get("slide_path") else ""
        first = owners.setdefault(source, row) if source else row
        if first["patient_id"] != row["patient_id"]:
            raise ShardError(path, f"slide file {row['slide_path']} is listed under two patients, "
                             f"{first['patient_id']} (slide {first['slide_id']}) and {row['patient_id']} (slide "
                             f"{row['slide_id']}): one file belongs to one patient; correct the cohort table and "
                             "extract again")


def check_counts(path: str | os.PathLike[str], labels: np.ndarray, label_names: Sequence[str], row: Mapping,
                 manifest_path: str | os.PathLike[str] | None) -> None:
    """Refuse a shard whose tile counts (in total and per class) differ from its manifest row."""
    counts = np.bincount(labels, minlength=len(label_names))
    have = {"n_tiles": len(labels), **{f"n_{n}": int(c) for n, c in zip(label_names, counts)}}
    listed = {k: row.get(k) for k in have if k in row}
    wrong = {k: (v, have[k]) for k, v in listed.items() if v is not None and int(v) != have[k]}
    if wrong:
        detail = ", ".join(f"{k} {old} in the manifest, {new} in the shard" for k, (old, new) in wrong.items())
        raise ShardError(path, f"does not match {manifest_path or 'manifest.csv'}: {detail}; the shard or the "
                         "manifest changed after extract (run verify; extract again rewrites the manifest)")


def _n_fields(raw: Mapping) -> int:
    extra = raw.get(None) or []
    return sum(v is not None for k, v in raw.items() if k is not None) + len(extra)


def _count(text: str, col: str, line: int, path: Path) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ShardError(path, f"line {line}: {col} is {text!r}, not a whole number") from None
    if value < 0:
        raise ShardError(path, f"line {line}: {col} is negative ({value})")
    return value


def manifest_label_names(rows: Sequence[Mapping]) -> tuple[str, ...]:
    """Class names from the ``n_<class>`` columns (except ``n_tiles``), in order; the defaults when there are none."""
    names = tuple(k[2:] for k in rows[0] if k.startswith("n_") and k != "n_tiles") if rows else ()
    return names or DEFAULT_CLASSES


def digest_rows(rows: Iterable[Mapping]) -> str:
    """SHA-256 (hex) of the sorted ``(slide_id, shard, n_tiles)`` of manifest rows."""
    key = sorted((str(r["slide_id"]), str(r["shard"]), int(r["n_tiles"])) for r in rows)
    return hashlib.sha256(json.dumps(key, separators=(",", ":")).encode("utf-8")).hexdigest()


def manifest_digest(shards_dir: str | Path) -> str:
    """SHA-256 (hex) of the sorted ``(slide_id, shard, n_tiles)`` rows of the manifest: identifies the shard set."""
    return digest_rows(read_manifest(shards_dir))
