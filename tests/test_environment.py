"""The suite passes whatever the user's shell holds: the project's settings, another Keras backend, a C locale."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

HOSTILE = {"PYTHON_TASK_LOG": "DEBUG", "PYTHON_TASK_DEBUG": "1", "PYTHON_TASK_MAX_ANNOTATION_BYTES": "10",
           "PYTHON_TASK_MAX_VERTICES": "3", "PYTHON_TASK_REPAIR_SECONDS": "0.000001", "KERAS_BACKEND": "jax",
           "LC_ALL": "C", "LANG": "C"}


def test_a_hostile_environment_changes_no_outcome():
    """Annotation reading (size and vertex limits, repair time) and the command line's error lines (log level,
    tracebacks) under settings that would fail them, run in a fresh interpreter as a user's shell would."""
    env = {**os.environ, **HOSTILE}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/wsi/test_annotations.py", "tests/test_cli.py"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
