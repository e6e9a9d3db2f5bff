"""Fixtures of the OpenMOLE tests: a copy of the plans in a folder whose name has a space, as a user's might."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .dsl import OMS_DIR


def copy_plans(folder: Path, splits_text: str = '{\n  "format_version": 1,\n  "n_folds": 2\n}\n') -> Path:
    """openmole/*.oms copied into ``folder``, beside a splits.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for script in OMS_DIR.glob("*.oms"):
        shutil.copy(script, folder / script.name)
    (folder / "splits.json").write_text(splits_text)
    return folder


@pytest.fixture
def plans(tmp_path) -> Path:
    return copy_plans(tmp_path / "my plans")
