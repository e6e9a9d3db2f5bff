"""The cohort table: ids that can name files, and one slide file per patient."""

from __future__ import annotations

from pathlib import Path

import pytest

from python_task.errors import TaskError
from python_task.shards.extract import extract_cohort
from python_task.shards.params import ExtractParams
from python_task.wsi.cohort import SlideJob, read_cohort
from tests.conftest import cli_line

HEADER = "slide_id,patient_id,slide_path,annotation_path,diagnosis\n"


def _cohort(tmp_path: Path, *rows: str) -> Path:
    path = tmp_path / "cohort.csv"
    path.write_text(HEADER + "".join(row + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("column, value", [("slide_id", ".hidden"), ("slide_id", "S\tx"), ("patient_id", ".."),
                                           ("patient_id", "P/1")])
def test_ids_that_cannot_name_a_file_are_refused(tmp_path, column, value):
    slide, patient = (value, "P1") if column == "slide_id" else ("S1", value)
    path = _cohort(tmp_path, f"{slide},{patient},s.tiff,s.geojson,benign")
    with pytest.raises(TaskError) as exc:
        read_cohort(path)
    assert exc.value.path == str(path) and f"invalid {column} {value!r}" in exc.value.cause
    assert "\n" not in str(exc.value)


def test_a_single_slide_id_that_escapes_out_is_refused_before_anything_is_written(synth_cohort, tmp_path):
    job = read_cohort(synth_cohort)[0]
    escaping = SlideJob("../escaped", "P1", job.slide_path, job.annotation_path)
    with pytest.raises(TaskError) as exc:
        extract_cohort([escaping], tmp_path / "out", ExtractParams(), progress=False)
    assert cli_line(exc.value).startswith("error: --slide-id: invalid id '../escaped'")
    assert not (tmp_path / "escaped.h5").exists() and not (tmp_path / "out").exists()


def test_one_slide_file_under_two_patients_is_refused(tmp_path):
    path = _cohort(tmp_path, "S1,P1,slides/s.tiff,a1.geojson,benign", "S2,P2,slides/../slides/s.tiff,a2.geojson,benign")
    with pytest.raises(TaskError) as exc:
        read_cohort(path)
    cause = exc.value.cause
    assert exc.value.path == str(path) and "line 3" in cause and "under two patients, P1 (line 2) and P2" in cause
    assert "s.tiff" in cause
    path = _cohort(tmp_path, "S1,P1,s.tiff,a1.geojson,benign", "S2,P1,s.tiff,a2.geojson,benign")
    assert [job.slide_id for job in read_cohort(path)] == ["S1", "S2"]  # twice under one patient: allowed
