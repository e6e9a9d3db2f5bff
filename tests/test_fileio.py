"""Atomic writes: complete or absent, and with the mode the umask gives (readable by colleagues on a shared
filesystem and by a container running as another user), not tempfile's 0600."""

from __future__ import annotations

import os
import stat

import pytest

from python_task.fileio import atomic_path, current_umask, write_csv_atomic, write_json_atomic, write_text_atomic


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
