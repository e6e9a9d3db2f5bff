"""Shared fixtures. Real slides and annotations come from ``../shared/data`` when it exists (CI has it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

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
