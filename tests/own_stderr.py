"""Run the command line in a subprocess and tell the lines the project wrote on stderr from any other.

The command runs as ``python -m python_task`` does (``cli.main(program=True)``: the filter of TensorFlow's native
notices included), with the project's own stderr writers tagged: the log formatter of :mod:`python_task.cli` (its
progress lines, warnings and tracebacks) and the command line's ``print(..., file=sys.stderr)`` (its ``error:``
lines and summaries). A line without the tag was written by someone else: TensorFlow's C++ log (absl, oneDNN,
cpu_feature_guard), a library's ``print``, Python's warnings or a traceback the project did not format.

``TF_ENABLE_ONEDNN_OPTS`` is set as asked, so a machine whose CPU would not turn oneDNN on (no AVX-512) still meets
oneDNN's notices; ``TF_CPP_MIN_LOG_LEVEL`` is removed, since the command line must keep TensorFlow quiet itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

TAG = "[python_task own line] "  # a prefix no library writes
_RUNNER = f"""
import builtins, sys
from python_task import cli
TAG = {TAG!r}
_format = cli._LogFormatter.format
cli._LogFormatter.format = lambda self, record: "\\n".join(TAG + ln for ln in _format(self, record).split("\\n"))
def _print(*args, file=None, sep=" ", **kw):
    if file is sys.stderr:
        args = ("\\n".join(TAG + ln for ln in sep.join(map(str, args)).split("\\n")),)
    builtins.print(*args, file=file, sep=sep, **kw)
cli.print = _print
raise SystemExit(cli.main(sys.argv[1:], program=True))
"""


def run_cli(args: Sequence[object], *, onednn: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m python_task ARGS`` with ``TF_ENABLE_ONEDNN_OPTS=onednn``; stderr keeps the tags."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["TF_ENABLE_ONEDNN_OPTS"] = onednn
    return subprocess.run([sys.executable, "-c", _RUNNER, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def foreign_lines(stderr: str) -> list[str]:
    """The stderr lines the project did not write (empty lines included: the project writes none)."""
    return [ln for ln in stderr.splitlines() if not ln.startswith(TAG)]


def own_lines(stderr: str) -> list[str]:
    """The project's stderr lines, untagged."""
    return [ln[len(TAG):] for ln in stderr.splitlines() if ln.startswith(TAG)]
