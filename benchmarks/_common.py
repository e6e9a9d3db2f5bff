"""Helpers shared by the benchmarks: subprocess measurements, peak memory, reporting."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PYTHON_TASK_SHARED_DATA", REPO.parent / "shared" / "data"))


def run_measured(code: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run Python ``code`` in a fresh process; it must print one JSON object on its last stdout line.

    Adds ``wall_s`` (whole process) and ``peak_rss_mib`` (the process itself) and ``children_peak_rss_mib``
    (its largest child, e.g. an extraction worker), read with ``getrusage`` inside the child.
    """
    wrapper = (
        "import json, resource, sys\n"
        f"{code}\n"
        "_r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "_c = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
        "RESULT.update(peak_rss_mib=_r, children_peak_rss_mib=_c)\n"
        "print(json.dumps(RESULT))\n")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"measured run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def write_report(out: Path, name: str, report: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


@contextlib.contextmanager
def scratch_folder(prefix: str, *, keep: bool) -> Iterator[Path]:
    """A temporary working folder, deleted on the way out unless ``keep`` (``--keep``)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def conclude(targets: dict[str, bool], path: Path, seconds: float | None = None) -> int:
    """Print the verdict on every target and where the report is; the exit status (0 when all are met)."""
    for name, ok in targets.items():
        print(f"  {verdict(ok)}  {name}")
    print(f"  {seconds:.0f} s; report: {path}" if seconds is not None else f"  report: {path}")
    return 0 if all(targets.values()) else 1
