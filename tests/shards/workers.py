"""Per-slide job runners for the extract tests, importable by the worker processes (which ``spawn`` starts fresh):
each wraps the real job and misbehaves for the slides the test names in the environment."""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

from python_task.shards.extract import _run_job


def _pid_file(slide_id: str) -> Path:
    return Path(os.environ["TEST_EXTRACT_PIDS"]) / f"{slide_id}.pid"


def pause_once(job, out, params, overwrite, progress):
    """The slide in ``TEST_EXTRACT_PAUSE`` waits, on its first try, to be killed (its pid written for the test)."""
    flag = _pid_file(job.slide_id)
    if job.slide_id == os.environ.get("TEST_EXTRACT_PAUSE") and not flag.exists():
        flag.write_text(str(os.getpid()))
        time.sleep(300)
    return _run_job(job, out, params, overwrite, progress)


def die(job, out, params, overwrite, progress):
    """The slide in ``TEST_EXTRACT_DIE`` kills its worker every time (as the out-of-memory killer would)."""
    if job.slide_id == os.environ.get("TEST_EXTRACT_DIE"):
        os.kill(os.getpid(), signal.SIGKILL)
    return _run_job(job, out, params, overwrite, progress)


def pause_all(job, out, params, overwrite, progress):
    """Every slide writes its worker's pid and waits (for a test that kills the main process)."""
    _pid_file(job.slide_id).write_text(str(os.getpid()))
    time.sleep(300)
    return _run_job(job, out, params, overwrite, progress)


def full_disk(job, out, params, overwrite, progress):
    """The slides in ``TEST_EXTRACT_FULL`` (comma-separated) find the disk full: every write of their shard is
    refused with ENOSPC, as the operating system refuses it."""
    if job.slide_id not in os.environ.get("TEST_EXTRACT_FULL", "").split(","):
        return _run_job(job, out, params, overwrite, progress)
    real = os.pwrite

    def refuse(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    os.pwrite = refuse
    try:
        return _run_job(job, out, params, overwrite, progress)
    finally:
        os.pwrite = real


def die_at_start() -> None:
    """A worker's start step: the first two worker processes started (files in ``TEST_EXTRACT_PIDS``) are killed
    before they take any slide, as a worker killed while it imports would be."""
    for n in range(2):
        try:
            fd = os.open(_pid_file(f"start-{n}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)
