"""The machine a run is on: whether the Keras backend sees an accelerator, and the library versions in use.

Keras (and the backend) are imported only when asked, so importing this module costs nothing.
"""

from __future__ import annotations

import platform
import sys

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
