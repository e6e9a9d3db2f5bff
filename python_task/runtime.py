"""The machine a run is on: whether the Keras backend sees an accelerator, the library versions in use, and child
processes that do not outlive their parent.

Keras (and the backend) are imported only when asked, so importing this module costs nothing.
"""

from __future__ import annotations

import atexit
import os
import platform
import re
import signal
import sys
import threading
import time

from python_task import __version__


def accelerator_present() -> bool:
    """Whether the Keras backend in use (TensorFlow, JAX or torch) sees a GPU; False when the probe fails."""
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            return bool(tf.config.list_physical_devices("GPU"))
        if backend == "jax":
            import jax

            return any(d.platform in ("gpu", "cuda", "rocm") for d in jax.devices())
        if backend == "torch":
            import torch

            return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no accelerator if the probe itself fails
        return False
    return False


def library_versions() -> dict[str, str]:
    """Versions of Python, this package and the numerical libraries, for a run's ``config.json``."""
    import h5py
    import keras
    import numpy as np
    import sklearn

    versions = {"python": platform.python_version(), "keras": keras.__version__, "numpy": np.__version__,
                "h5py": h5py.__version__, "scikit-learn": sklearn.__version__, "backend": keras.backend.backend()}
    for mod in ("tensorflow", "jax"):
        if mod in sys.modules:
            versions[mod] = getattr(sys.modules[mod], "__version__", "?")
    versions["python_task"] = __version__
    return versions


PARENT_PID_ENV = "PYTHON_TASK_PARENT_PID"  # set by a parent (sweep) for a child command that must die with it
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_WATCH_SECONDS = 1.0


def exit_with_parent(parent_pid: int | None = None) -> None:
    """Make this process end when its parent does (``parent_pid``, default the current parent), whatever way the
    parent dies (``kill -9`` included): on Linux the kernel sends SIGKILL (``prctl(PR_SET_PDEATHSIG)``; it fires
    when the *thread* that started this process ends, so start children from a thread that outlives them), elsewhere
    a daemon thread checks the parent every second. A parent already gone ends this process at once."""
    parent = os.getppid() if parent_pid is None else int(parent_pid)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0:
                if os.getppid() != parent:  # the parent died before the call: no signal will come
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), name="exit-with-parent", daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_WATCH_SECONDS)
    os._exit(1)


# Lines that TensorFlow's native code (absl logging) writes straight to file descriptor 2 at INFO and WARNING level,
# some before TF_CPP_MIN_LOG_LEVEL is read: absl's notice that logging is not initialised yet, oneDNN's notice on
# CPUs with AVX-512, cpu_feature_guard's (and its second line). ERROR and FATAL lines (E..., F...) are kept.
NATIVE_NOTICE = re.compile(
    rb"^(?:WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|[IW]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [\w.-]+:\d+\] "
    rb"|To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\.)")


def filter_native_notices() -> None:
    """Keep :data:`NATIVE_NOTICE` lines off this process's stderr (file descriptor 2), for the command line.

    Native code writes them to the descriptor itself, so no Python setting reaches them. Descriptor 2 becomes a
    pipe read by a forked process that passes on every other line as it comes and ends when the last writer
    closes the pipe: this process and the children that inherit its stderr. A separate process, not a thread, so
    that what a crash writes last (a fatal native log line, faulthandler's traceback) still gets out. Call it
    early, before any thread starts (it forks); at exit this process hands the descriptor back and waits briefly
    for the filter to drain.
    """
    real = os.dup(2)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the filter
        try:
            os.close(write_end)
            os.dup2(real, 2)
            with os.fdopen(read_end, "rb", buffering=0) as pipe:
                for line in iter(pipe.readline, b""):
                    if not NATIVE_NOTICE.match(line):
                        os.write(real, line)
        finally:
            os._exit(0)
    os.close(read_end)
    sys.stderr.flush()
    pipe = os.fstat(write_end)
    os.dup2(write_end, 2)
    os.close(write_end)

    def drain() -> None:
        sys.stderr.flush()
        os.dup2(real, 2)
        for name in os.listdir("/proc/self/fd"):  # copies of the pipe a library made (absl duplicates stderr)
            fd = int(name)
            try:
                if fd > 2 and os.path.samestat(os.fstat(fd), pipe):
                    os.close(fd)
            except OSError:
                pass
        # this process's ends closed: the filter ends once the children that inherited one have closed theirs
        for _ in range(50):
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                return
            time.sleep(0.02)

    atexit.register(drain)
