"""``verify``: a shard folder checked end to end, for shards copied between machines or clusters.

Each shard is opened, its attributes read, every dataset read in full (HDF5 checks each chunk's Fletcher-32
checksum), its labels checked against ``label_names``, every stored JPEG file checked against its CRC-32 and
decoded to a ``(T, T, 3)`` tile (``decode=False`` skips the decoding, which is most of the time). The folder's
``manifest.csv`` must list exactly the shards present with their tile counts. Every problem is a
:class:`ShardError` naming the shard (and the dataset and tile); verification goes on after one, so the report
lists them all.

:func:`check_shard` without decoding is also how ``extract`` decides that a shard of an interrupted or copied
run is finished (it reads the bytes once, without decoding them).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from python_task.errors import ShardError
from python_task.shards.format import (
    CHECKSUMS,
    FIELDS,
    ShardInfo,
    check_encoded,
    check_labels,
    decode_tile,
    list_shards,
    odd_shard_cause,
    odd_shards,
    open_shard_file,
    read_encoded_rows,
    reading,
    shard_info_from_file,
)
from python_task.shards.manifest import MANIFEST_NAME, check_counts, read_manifest

log = logging.getLogger(__name__)

BLOCK = 256  # tiles read (and checked) at a time


@dataclass
class ShardCheck:
    """What :func:`check_shard` found: the shard's description, its labels, whether checksums covered it."""

    info: ShardInfo
    labels: np.ndarray
    checksummed: bool


def check_shard(path: str | os.PathLike[str], *, decode: bool = True) -> ShardCheck:
    """Check one shard end to end (see the module doc); the first problem raises a :class:`ShardError`."""
    path = Path(path)
    with open_shard_file(path) as f:
        info = shard_info_from_file(f, path)
        n = info.n_tiles
        version = int(f.attrs.get("format_version", 1))
        names = ["images", *FIELDS] + ([CHECKSUMS] if info.codec == "jpeg" and version >= 2 else [])
        for name in names:
            if name not in f:
                raise ShardError(path, f"dataset {name} is missing: the shard is incomplete; extract the slide again")
            if f[name].shape[:1] != (n,):
                raise ShardError(path, f"dataset {name} holds {f[name].shape[0]} rows where labels holds {n}: the "
                                 "shard is damaged; extract the slide again")
        declared = f.attrs.get("n_tiles")
        if declared is not None and int(declared) != n:
            raise ShardError(path, f"attribute n_tiles says {int(declared)} tiles where labels holds {n}: the shard is "
                             "damaged; extract the slide again")
        values = {}
        for name in names[1:]:
            with reading(path, name):
                values[name] = f[name][()]
        check_labels(path, values["labels"], info.label_names)
        checksums = values.get(CHECKSUMS)
        ds = f["images"]
        checksummed = bool(ds.fletcher32) if info.codec == "raw" else checksums is not None
        for start in range(0, n, BLOCK):
            rows = np.arange(start, min(n, start + BLOCK))
            if info.codec == "raw":
                with reading(path, "images"):
                    ds[start:start + len(rows)]  # HDF5 checks the chunks' Fletcher-32 as it reads them
                continue
            with reading(path, "images"):
                data = read_encoded_rows(ds, rows)
            check_encoded(path, rows, data, checksums)
            if decode:
                for row, blob in zip(rows, data):
                    decode_tile(path, row, blob, info.tile_size)
    return ShardCheck(info, values["labels"], checksummed)


def _report_odd_shards(report: VerifyReport, infos: list[ShardInfo]) -> None:
    """Shards sound on their own but not with the others (tile size, µm/px or classes differ from most):
    training on the folder would fail or mix scales, so each is a problem, naming the odd shard."""
    odd = odd_shards(infos)
    for info, example in odd:
        report.problems.append(ShardError(info.path, odd_shard_cause(info, example, len(infos) - len(odd))))


@dataclass
class VerifyReport:
    folder: Path
    shards: int = 0
    tiles: int = 0
    unchecked: list[Path] = field(default_factory=list)  # format-1 shards: no checksums
    problems: list[ShardError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_shards(folder: str | os.PathLike[str], *, decode: bool = True, progress: bool = True) -> VerifyReport:
    """Check every shard of ``folder`` and its ``manifest.csv``; returns every problem found (logs a summary)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardError(folder, "not found: no shards folder here")
    report = VerifyReport(folder)
    try:
        listed = {row["shard"]: row for row in read_manifest(folder)}
    except ShardError as exc:
        report.problems.append(exc)
        listed = None
    paths = list_shards(folder)
    manifest = folder / MANIFEST_NAME
    checked: list[ShardInfo] = []
    for path in tqdm(paths, desc="verify", unit="shard", disable=None if progress else True, file=sys.stderr):
        try:
            check = check_shard(path, decode=decode)
            checked.append(check.info)
            report.shards += 1
            report.tiles += check.info.n_tiles
            if not check.checksummed:
                report.unchecked.append(path)
            if listed is not None:
                if path.name not in listed:
                    raise ShardError(path, f"not listed in {manifest}: run extract again, which rewrites it")
                check_counts(path, check.labels, check.info.label_names, listed[path.name], manifest)
        except ShardError as exc:
            report.problems.append(exc)
    _report_odd_shards(report, checked)
    for name in sorted(set(listed or ()) - {p.name for p in paths}):
        report.problems.append(ShardError(folder / name, f"listed in {manifest} but missing: copy it again or run "
                                          "extract again"))
    if progress:
        what = "checksums and JPEG decoding" if decode else "checksums"
        log.info("%s: %d shard%s, %d tiles verified (%s); %d problem%s", folder, report.shards,
                 "s" * (report.shards != 1), report.tiles, what, len(report.problems),
                 "s" * (len(report.problems) != 1))
        if report.unchecked:
            log.warning("%d shard%s written before checksums (format 1) were only read and decoded: %s",
                        len(report.unchecked), "s" * (len(report.unchecked) != 1),
                        ", ".join(p.name for p in report.unchecked[:5]))
    return report
