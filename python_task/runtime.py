"""The machine a run is on: whether the Keras backend sees an accelerator, the library versions in use, and child
processes that do not outlive their parent.

Keras (and the backend) are imported only when asked, so importing this module costs nothing.
"""

from __future__ import annotations

import os
import platform
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
