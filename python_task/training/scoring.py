"""A model's probabilities for batches of tiles: the validation pass of training and whole-slide prediction."""

from __future__ import annotations

import os

import numpy as np

from python_task.data.dataset import ShardBatches, TileIndex, iterate_batches
from python_task.fileio import write_csv_atomic
from python_task.training.metrics import TileLayout

PREDICTION_COLUMNS = ["slide_id", "patient_id", "x", "y", "label", "prob"]


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


def write_predictions(path: str | os.PathLike[str], index: TileIndex, prob: np.ndarray) -> None:
    """One row per tile of ``index`` with its probability (``train``'s predictions.csv, ``evaluate``'s
    test_predictions.csv)."""
    rows = [{"slide_id": s, "patient_id": p, "x": int(c[0]), "y": int(c[1]), "label": int(y), "prob": float(q)}
            for s, p, c, y, q in zip(index.slide_ids, index.patient_ids, index.coords, index.labels, prob)]
    write_csv_atomic(path, rows, fieldnames=PREDICTION_COLUMNS)


def tile_layout(index: TileIndex) -> TileLayout:
    """Where the tiles of ``index`` lie on their slides (level-0 corners and sides), for the ``smoothed_max``
    aggregation."""
    extent = np.array([s.tile_size * s.downsample for s in index.shards], dtype=np.float64)
    return TileLayout(index.coords, extent[index.shard] if len(index) else np.empty(0), index.slide_ids)
