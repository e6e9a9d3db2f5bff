"""The cohort table (``cohort.csv``): one row per slide, with its patient, files and optional diagnosis.

Columns ``slide_id, patient_id, slide_path, annotation_path``, optional ``diagnosis``; more columns are allowed.
Relative paths are relative to the CSV's folder. Several slides may belong to one patient.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from python_task.errors import TaskError

REQUIRED_COLUMNS = ("slide_id", "patient_id", "slide_path", "annotation_path")
COHORT_COLUMNS = (*REQUIRED_COLUMNS, "diagnosis")


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
    for n, row in enumerate(rows, start=2):
        slide_id = (row["slide_id"] or "").strip()
        if not slide_id or any(c in slide_id for c in "/\\"):
            raise TaskError(path, f"line {n}: invalid slide_id {slide_id!r}")
        if slide_id in seen:
            raise TaskError(path, f"line {n}: slide_id {slide_id!r} listed twice")
        seen.add(slide_id)
        jobs.append(SlideJob(slide_id=slide_id, patient_id=(row["patient_id"] or "").strip() or slide_id,
                             slide_path=_resolve(path.parent, row["slide_path"]),
                             annotation_path=_resolve(path.parent, row["annotation_path"]),
                             diagnosis=(row.get("diagnosis") or "").strip()))
    return jobs


def _resolve(base: Path, value: str) -> Path:
    p = Path((value or "").strip())
    return p if p.is_absolute() else base / p
