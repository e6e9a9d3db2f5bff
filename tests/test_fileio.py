"""Atomic writes: complete or absent, and with the mode the umask gives (readable by colleagues on a shared
filesystem and by a container running as another user), not tempfile's 0600."""

from __future__ import annotations

import json
import math
import os
import stat

import numpy as np
import pytest

from python_task.fileio import (
    atomic_path,
    current_umask,
    dumps_strict,
    nan_for_null,
    write_csv_atomic,
    write_json_atomic,
    write_text_atomic,
)


def strict_loads(text: str):
    """JSON as a strict parser (JavaScript's JSON.parse, jq) reads it: NaN and Infinity are errors."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_outputs_get_the_umask_mode(tmp_path, umask, mask):
    umask(mask)
    assert current_umask() == mask
    write_text_atomic(tmp_path / "a.txt", "x")
    write_json_atomic(tmp_path / "b.json", {"x": 1})
    write_csv_atomic(tmp_path / "c.csv", [{"x": 1}])
    with atomic_path(tmp_path / "d.h5") as tmp:
        tmp.write_bytes(b"\x89HDF")
    expected = 0o666 & ~mask
    for name in ("a.txt", "b.json", "c.csv", "d.h5"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, (name, oct(expected))


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_json_outputs_are_strict_with_null_for_missing_numbers(tmp_path):
    obj = {"nan": math.nan, "inf": [math.inf, -math.inf], "np": np.float32("nan"), "np64": np.float64(1.5),
           "array": np.array([0.25, np.nan]), "nested": {"ok": 1, "bad": float("nan")}, "text": "NaN"}
    write_json_atomic(tmp_path / "a.json", obj)
    back = strict_loads((tmp_path / "a.json").read_text())
    assert back == {"nan": None, "inf": [None, None], "np": None, "np64": 1.5, "array": [0.25, None],
                    "nested": {"ok": 1, "bad": None}, "text": "NaN"}
    assert strict_loads(dumps_strict(obj)) == back
    metrics = nan_for_null({"val_auc": None, "n": 3})
    assert math.isnan(metrics["val_auc"]) and metrics["n"] == 3
    write_csv_atomic(tmp_path / "m.csv", [{"val_auc": math.nan}])  # CSV keeps its nan
    assert (tmp_path / "m.csv").read_text().splitlines() == ["val_auc", "nan"]
