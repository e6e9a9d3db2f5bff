"""A model's probabilities for batches of tiles: the validation pass of training and whole-slide prediction."""

from __future__ import annotations

import numpy as np

from python_task.data.dataset import ShardBatches, iterate_batches


def predict_padded(model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """``model.predict_on_batch`` with the batch padded to a fixed size, so the compiled function is reused."""
    n = len(x)
    if n < batch_size:
        x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)])
    return np.asarray(model.predict_on_batch(x), dtype=np.float64).reshape(-1)[:n]


def predict_index(model, batches: ShardBatches) -> np.ndarray:
    """Probabilities for every tile of ``batches`` in order (backend-agnostic, threaded reads)."""
    probs = [predict_padded(model, x, batches.batch_size)
             for x, _ in iterate_batches(batches, threads=max(1, batches.workers))]
    return np.concatenate(probs) if probs else np.empty(0)
