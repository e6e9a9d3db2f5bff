"""Shared fixtures. Real slides and annotations come from the folder ``SHARED_DATA`` names when it exists (CI has
it); the tests that need them skip otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The suite's outcome must not depend on the user's environment: the project's own settings (log level, debug
# tracebacks, size limits) are cleared, and the backend is the one the suite tests (a KERAS_BACKEND=jax in a
# user's shell would otherwise run it on another backend, or fail to import one not installed).
KEPT_SETTINGS = {"PYTHON_TASK_SHARED_DATA"}
for _name in [n for n in os.environ if n.startswith("PYTHON_TASK_") and n not in KEPT_SETTINGS]:
    del os.environ[_name]
os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PYTHON_TASK_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real test slides and annotations; the test is skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cmu_slide(shared_data: Path) -> Path:
    path = shared_data / "cmu-1-small-region.svs"
    if not path.exists():
        pytest.skip(f"{path} missing")
    return path


@pytest.fixture(scope="session")
def synth_cohort(tmp_path_factory) -> Path:
    """A small synthetic cohort (4 patients, 2048-px slides), made once per test session."""
    from python_task.synth.cohort import generate_cohort
    from python_task.synth.config import SynthConfig

    out = tmp_path_factory.mktemp("cohort")
    return generate_cohort(out, SynthConfig(patients=4, seed=11, slide_size=2048))


@pytest.fixture(scope="session")
def synth_shards(synth_cohort, tmp_path_factory) -> Path:
    """Default-parameter shards of :func:`synth_cohort`."""
    from python_task.shards.extract import extract_cohort
    from python_task.shards.params import ExtractParams
    from python_task.wsi.cohort import read_cohort

    out = tmp_path_factory.mktemp("shards")
    report = extract_cohort(read_cohort(synth_cohort), out, ExtractParams(), workers=1, progress=False)
    assert report.ok, report.failed
    return out


@pytest.fixture(scope="session")
def learn_data(tmp_path_factory):
    """A synthetic cohort of 10 patients cut at 1 µm/px into 64-px tiles, with a 2-fold patient split."""
    from python_task.data.splits import make_splits, write_splits
    from python_task.shards.extract import extract_cohort
    from python_task.shards.params import ExtractParams
    from python_task.synth.cohort import generate_cohort
    from python_task.synth.config import SynthConfig
    from python_task.wsi.cohort import read_cohort

    root = tmp_path_factory.mktemp("learn")
    cohort = generate_cohort(root / "cohort", SynthConfig(patients=10, seed=5, slide_size=2048))
    shards = root / "shards"
    report = extract_cohort(read_cohort(cohort), shards, ExtractParams(tile_size=64, mpp=1.0), progress=False)
    assert report.ok
    splits = root / "splits.json"
    write_splits(make_splits(shards, 2, seed=0), splits)
    return shards, splits


@pytest.fixture(scope="session")
def trained_model(learn_data, tmp_path_factory) -> Path:
    """A simple_cnn trained for 3 epochs on :func:`learn_data` (fold 0); the run folder."""
    from python_task.training.config import TrainConfig
    from python_task.training.loop import train

    shards, splits = learn_data
    out = tmp_path_factory.mktemp("trained")
    train(TrainConfig(shards=shards, splits=splits, fold=0, arch="simple_cnn", out=out, epochs=3, batch_size=32,
                      lr=5e-4, augment="flip,rot90", verbose=False, tensorboard=False, patience=0,
                      calibration_folds=3))  # 5 training patients: 3 inner folds leave 3 to fit on
    return out


def cli_line(exc) -> str:
    """The one line the command line prints for a library error (settings named as flags)."""
    from python_task.cli import build_parser, error_line, option_flags

    return error_line(exc, option_flags(build_parser()))
