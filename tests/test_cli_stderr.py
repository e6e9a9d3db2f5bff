"""The command line's stderr holds the project's lines alone, whatever the CPU: oneDNN forced on and off.

On a CPU with AVX-512 TensorFlow turns oneDNN on and writes its notices (and absl's) straight to file descriptor
2, despite ``TF_CPP_MIN_LOG_LEVEL``; other CPUs never show them. These tests force ``TF_ENABLE_ONEDNN_OPTS`` both
ways, so any machine meets both cases, and fail on any stderr line the project did not write
(:mod:`tests.own_stderr`). To run the whole suite with oneDNN forced on: ``TF_ENABLE_ONEDNN_OPTS=1
.venv/bin/python -m pytest`` (the variable reaches every command the tests start).
"""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from tests.own_stderr import foreign_lines, own_lines, run_cli


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory) -> tuple[Path, Path]:
    """Six synthetic patients cut into 64-px tiles at 1 µm/px, split in 2 folds (a few seconds)."""
    from python_task.data.splits import make_splits, write_splits
    from python_task.shards.extract import extract_cohort
    from python_task.shards.params import ExtractParams
    from python_task.synth.cohort import generate_cohort
    from python_task.synth.config import SynthConfig
    from python_task.wsi.cohort import read_cohort

    root = tmp_path_factory.mktemp("stderr")
    cohort = generate_cohort(root / "cohort", SynthConfig(patients=6, seed=0, slide_size=1024))
    report = extract_cohort(read_cohort(cohort), root / "shards", ExtractParams(tile_size=64, mpp=1.0),
                            progress=False)
    assert report.ok
    write_splits(make_splits(root / "shards", 2, seed=0), root / "splits.json")
    return root / "shards", root / "splits.json"


def train_args(data: tuple[Path, Path], out: Path, *extra: object) -> list[object]:
    shards, splits = data
    return ["train", "--shards", shards, "--splits", splits, "--arch", "simple_cnn", "--out", out, "--epochs", 1,
            "--max-train-tiles", 32, "--max-val-tiles", 32, "--base-filters", 4, "--calibration-folds", 0,
            "--no-tensorboard", "--quiet", *extra]


@pytest.mark.parametrize("onednn", ["0", "1"])
def test_a_training_run_writes_only_the_projects_lines(tiny_split, tmp_path, onednn):
    """TensorFlow loaded, a model fitted and saved: every stderr line is the project's."""
    proc = run_cli(train_args(tiny_split, tmp_path / "run", "--fold", 0), onednn=onednn)
    assert proc.returncode == 0, proc.stderr
    assert not foreign_lines(proc.stderr), proc.stderr
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_an_error_after_tensorflow_loads_is_the_only_line(tiny_split, tmp_path):
    """oneDNN on (as on an AVX-512 CPU): the error is the only line (the run above covers oneDNN off)."""
    proc = run_cli(train_args(tiny_split, tmp_path / "run", "--fold", 5), onednn="1")
    assert proc.returncode == 1 and not foreign_lines(proc.stderr), proc.stderr
    assert len(own_lines(proc.stderr)) == 1 and own_lines(proc.stderr)[0].startswith("error: "), proc.stderr
    assert "fold 5 is out of range" in proc.stderr


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="TensorFlow's oneDNN notice is that of x86-64 builds")
def test_the_check_sees_tensorflows_lines_when_they_are_let_through(tiny_split, tmp_path):
    """With ``-v`` the command line lets other libraries' lines through: forced oneDNN's notice is among them
    (on any x86-64 CPU), and the check counts it as foreign; the project's error line stays its own."""
    proc = run_cli(["-v", *train_args(tiny_split, tmp_path / "run", "--fold", 5)], onednn="1")
    assert proc.returncode == 1
    assert any("oneDNN custom operations are on" in ln for ln in foreign_lines(proc.stderr)), proc.stderr
    errors = [ln for ln in own_lines(proc.stderr) if ln.startswith("error: ")]
    assert len(errors) == 1 and "fold 5 is out of range" in errors[0], proc.stderr
