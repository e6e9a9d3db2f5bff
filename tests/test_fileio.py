"""Atomic writes: complete or absent, and with the mode the umask gives (readable by colleagues on a shared
filesystem and by a container running as another user), not tempfile's 0600."""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from python_task.errors import BusyError, TaskError
from python_task.fileio import (
    LOCK_NAME,
    atomic_path,
    current_umask,
    dumps_strict,
    folder_lock,
    nan_for_null,
    remove_stale_temporaries,
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


# --------------------------------------------------------------------------------------------- one writer per folder

def _holder(folder, command="extract"):
    """Another process holding ``folder``'s lock (it prints ``locked`` once it does)."""
    code = ("import sys, time; from python_task.fileio import folder_lock\n"
            "with folder_lock(sys.argv[1], sys.argv[2]):\n    print('locked', flush=True); time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder), command], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_folder_has_one_writer_until_its_holder_ends(tmp_path):
    holder = _holder(tmp_path / "out")
    try:
        with pytest.raises(BusyError, match=f"in use by another run \\(extract, pid {holder.pid}") as err:
            with folder_lock(tmp_path / "out", "train"):
                pass
        assert err.value.path == str(tmp_path / "out")
        proc = subprocess.run([sys.executable, "-m", "python_task", "extract", "--slide", "s.svs", "--annotations",
                               "a.json", "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1
        assert proc.stderr.strip().splitlines() == [
            f"error: {tmp_path / 'out'}: in use by another run (extract, pid {holder.pid}, since "
            f"{proc.stderr.split('since ')[1].split(')')[0]}): wait for it to finish, or choose another --out"]
    finally:
        holder.kill()  # as kill -9 would: the lock dies with its process, the file stays behind
        holder.wait()
    assert (tmp_path / "out" / LOCK_NAME).exists()
    with folder_lock(tmp_path / "out", "train"):
        assert json.loads((tmp_path / "out" / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / "out" / LOCK_NAME).exists()  # released: removed


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / ".S1.h5.abcd1234.tmp").write_bytes(b"x" * 100)
    (tmp_path / ".model.123.tmp.keras").write_bytes(b"x")
    (tmp_path / "S2.h5").write_bytes(b"kept")
    (tmp_path / "notes.tmp").write_bytes(b"not ours: kept")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".S1.h5.abcd1234.tmp", ".model.123.tmp.keras"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S2.h5", "notes.tmp"]


def test_a_child_ends_with_its_parent(tmp_path):
    """``exit_with_parent``: a child whose parent is killed (-9) ends too (no orphan left running)."""
    import signal
    import time

    child = ("import time; from python_task.runtime import exit_with_parent; exit_with_parent(); "
             "print('ready', flush=True); time.sleep(300)")
    parent = ("import subprocess, sys; c = subprocess.Popen([sys.executable, '-c', sys.argv[1]], stdout=subprocess.PIPE,"
              " text=True); assert c.stdout.readline().strip() == 'ready'; print(c.pid, flush=True); c.wait()")
    proc = subprocess.Popen([sys.executable, "-c", parent, child], stdout=subprocess.PIPE, text=True)
    pid = int(proc.stdout.readline())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for _ in range(600):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        stat_file = f"/proc/{pid}/stat"
        if os.path.exists(stat_file) and open(stat_file).read().split()[2] == "Z":
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the child outlived its parent")


def test_a_full_disk_names_the_file_being_written_not_its_temporary(tmp_path):
    import errno

    final = tmp_path / "metrics.json"
    with pytest.raises(OSError) as err:
        with atomic_path(final) as tmp:
            tmp.write_text("partial")
            raise OSError(errno.ENOSPC, "No space left on device")  # as a file object's write raises it
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(final)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------- links, long names,
#                                                                                               read-only folders

def test_the_lock_never_writes_through_a_symbolic_link(tmp_path):
    """A link planted as the lock file (to a victim, or dangling) is refused, naming it; the victim keeps its
    content and a dangling link's target is not created."""
    from tests.conftest import cli_line

    victim = tmp_path / "victim"
    victim.write_text("DATA\n")
    for folder, target in ((tmp_path / "o", victim), (tmp_path / "o2", tmp_path / "created_by_lock")):
        folder.mkdir()
        (folder / LOCK_NAME).symlink_to(target)
        with pytest.raises(TaskError, match="is a symbolic link") as err:
            with folder_lock(folder, "extract"):
                pytest.fail("the lock was taken through a link")
        assert cli_line(err.value).startswith(f"error: {folder / LOCK_NAME}: is a symbolic link")
        assert (folder / LOCK_NAME).is_symlink()
    assert victim.read_text() == "DATA\n"
    assert not (tmp_path / "created_by_lock").exists()


def test_open_for_writing_truncates_a_file_but_never_a_links_target(tmp_path, umask):
    from python_task.fileio import open_for_writing

    umask(0o027)
    with open_for_writing(tmp_path / "train.log") as fh:
        fh.write("first\n")
    with open_for_writing(tmp_path / "train.log") as fh:
        fh.write("second\n")
    assert (tmp_path / "train.log").read_text() == "second\n"
    assert stat.S_IMODE((tmp_path / "train.log").stat().st_mode) == 0o640
    victim = tmp_path / "victim"
    victim.write_text("DATA\n")
    (tmp_path / "link.log").symlink_to(victim)
    (tmp_path / "dangling.log").symlink_to(tmp_path / "nowhere")
    for link in (tmp_path / "link.log", tmp_path / "dangling.log"):
        with pytest.raises(TaskError, match="is a symbolic link") as err:
            open_for_writing(link)
        assert err.value.path == str(link)
    assert victim.read_text() == "DATA\n" and not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("name", ["x" * 248, "y" * 255, "é" * 120 + ".json"])
def test_a_legal_long_name_gets_a_temporary_name_within_the_limit(tmp_path, name):
    """A 248-byte name is legal (the limit is 255 bytes) though ``.NAME.XXXXXXXX.tmp`` is not: the temporary name
    is shortened, stays hidden and ``.tmp`` (so an interrupted run's is still removed), and the file arrives."""
    from python_task.fileio import temporary_sibling

    write_text_atomic(tmp_path / name, "complete")
    assert (tmp_path / name).read_text() == "complete"
    tmp = temporary_sibling(tmp_path / name)
    assert len(os.fsencode(tmp.name)) <= 255 and tmp.name.startswith(".") and tmp.name.endswith(".tmp")
    assert remove_stale_temporaries(tmp_path) == [tmp]
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def _read_only(monkeypatch, folder):
    """``folder`` refuses new files as a read-only mount does (EROFS, naming the file tried), whoever runs the
    test (root ignores a folder's mode)."""
    import errno

    real_open = os.open

    def refuse(path, *args, **kwargs):
        if os.path.dirname(os.fspath(path)) == str(folder):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)  # what mkstemp and the lock file use


def test_a_read_only_folder_is_named_by_the_file_asked_for_not_its_temporary(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    _read_only(monkeypatch, folder)
    for write in (lambda p: write_json_atomic(p, {"x": 1}), lambda p: write_csv_atomic(p, [{"x": 1}])):
        with pytest.raises(OSError) as err:
            write(folder / "splits.json")
        assert err.value.filename == str(folder / "splits.json") and "Read-only" in err.value.strerror
    with pytest.raises(OSError) as err:
        with folder_lock(folder, "report"):
            pass
    assert err.value.filename == str(folder) and "Read-only" in err.value.strerror
    assert list(folder.iterdir()) == []
