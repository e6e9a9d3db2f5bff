"""The cohort table (``cohort.csv``): one row per slide, with its patient, files and optional diagnosis.

Columns ``slide_id, patient_id, slide_path, annotation_path``, optional ``diagnosis``; more columns are allowed.
Relative paths are relative to the CSV's folder. Several slides may belong to one patient; one slide file may not
belong to two (its copies would land on both sides of a split).

A slide id names its shard file (``<slide_id>.h5`` in the output folder), so it must be a plain file name: no
path separator, no leading dot (a hidden file, or ``..``), no control character. Patient ids follow the same
rule, so either can name a file or a folder downstream.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from python_task.errors import ConfigError, TaskError

REQUIRED_COLUMNS = ("slide_id", "patient_id", "slide_path", "annotation_path")
COHORT_COLUMNS = (*REQUIRED_COLUMNS, "diagnosis")
MAX_ID_BYTES = 200  # a shard's name (the id, ``.h5``, a temporary suffix) must stay under 255 bytes


@dataclass(frozen=True)
class SlideJob:
    """One row of the cohort table: a slide, its annotations, its patient and (optionally) its diagnosis."""

    slide_id: str
    patient_id: str
    slide_path: Path
    annotation_path: Path
    diagnosis: str = ""


def read_cohort(path: str | os.PathLike[str]) -> list[SlideJob]:
    """Rows of ``cohort.csv``; relative paths are resolved against the CSV's folder."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            columns = set(reader.fieldnames or [])
    except FileNotFoundError:
        raise TaskError(path, "cohort table not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TaskError(path, f"not a readable CSV ({exc})") from None
    missing = set(REQUIRED_COLUMNS) - columns
    if missing:
        raise TaskError(path, f"missing column(s) {', '.join(sorted(missing))}")
    if not rows:
        raise TaskError(path, "no slides listed")
    jobs, seen = [], set()
    owners: dict[Path, tuple[str, int]] = {}  # a slide file: the patient listing it first, and the line
    for n, row in enumerate(rows, start=2):
        slide_id = (row["slide_id"] or "").strip()
        patient_id = (row["patient_id"] or "").strip() or slide_id
        for column, value in (("slide_id", slide_id), ("patient_id", patient_id)):
            why = id_problem(value)
            if why:
                raise TaskError(path, f"line {n}: invalid {column} {value!r}: {why}")
        if slide_id in seen:
            raise TaskError(path, f"line {n}: slide_id {slide_id!r} listed twice")
        seen.add(slide_id)
        slide_path = _resolve(path.parent, row["slide_path"])
        _check_one_patient_per_file(path, n, slide_path, patient_id, owners)
        jobs.append(SlideJob(slide_id=slide_id, patient_id=patient_id, slide_path=slide_path,
                             annotation_path=_resolve(path.parent, row["annotation_path"]),
                             diagnosis=(row.get("diagnosis") or "").strip()))
    return jobs


def id_problem(value: str) -> str:
    """Why ``value`` cannot be a slide or patient id ("" when it can): ids name files (``<slide_id>.h5``), so a
    separator or ``..`` would write outside the output folder and a leading dot would make a hidden file that
    the manifest leaves out."""
    if not value:
        return "empty"
    if "/" in value or "\\" in value:
        return "a path separator ('/' or '\\') in an id would put its file outside the output folder"
    if value.startswith("."):
        return "an id may not start with '.' (a hidden file, or '..', the folder above)"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "control characters (a tab, a line break) are not allowed"
    if len(value.encode("utf-8")) > MAX_ID_BYTES:
        return f"longer than {MAX_ID_BYTES} bytes (it names a file)"
    return ""


def check_job_ids(job: SlideJob) -> None:
    """Refuse a job built outside a cohort table (``extract --slide``) whose ids cannot name files
    (:func:`id_problem`): a :class:`ConfigError` naming the setting (``slide_id``, ``patient_id``) and the id."""
    for setting, value in (("slide_id", job.slide_id), ("patient_id", job.patient_id)):
        why = id_problem(value)
        if why:
            raise ConfigError(setting, f"invalid id {value!r}: {why}")


def _check_one_patient_per_file(path: Path, line: int, slide_path: Path, patient_id: str,
                                owners: dict[Path, tuple[str, int]]) -> None:
    """Refuse a slide file listed under two patients: its tiles would be both training and held-out data."""
    key = Path(os.path.realpath(slide_path))  # one file, however the rows spell its path
    first = owners.setdefault(key, (patient_id, line))
    if first[0] != patient_id:
        raise TaskError(path, f"line {line}: slide file {slide_path} is listed under two patients, {first[0]} "
                        f"(line {first[1]}) and {patient_id}: one file belongs to one patient (a copy in both "
                        "would put the same tiles on both sides of a split)")


def _resolve(base: Path, value: str) -> Path:
    p = Path((value or "").strip())
    return p if p.is_absolute() else base / p
