"""Tiles from shards to training batches, streamed, shuffled across shards, optionally class-balanced.

The core is plain numpy + h5py + imagecodecs, so it serves Keras on any backend (TensorFlow by default, JAX on a
GPU node). :class:`ShardBatches` is a ``keras.utils.PyDataset``: Keras fetches its batches in worker threads;
JPEG decoding releases the GIL, so threads really run in parallel.

Only a small index (shard, tile, label, slide, patient per tile) is held in memory; pixels are read per batch.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import keras
import numpy as np

from python_task.data.sampling import epoch_order
from python_task.errors import ConfigError, ShardError, TaskError
from python_task.shards.format import (
    ShardInfo,
    ShardReader,
    check_encoded,
    check_labels,
    decode_tile,
    list_shards,
    odd_shard_cause,
    odd_shards,
    read_encoded_rows,
    reading,
)
from python_task.shards.manifest import check_counts

BatchTransform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


@dataclass
class TileIndex:
    """Every tile of a set of shards, as parallel arrays (no pixels)."""

    shards: list[ShardInfo]
    shard: np.ndarray  # int32: index into ``shards``
    tile: np.ndarray  # int64: row in that shard
    labels: np.ndarray  # int64
    slide_ids: np.ndarray  # str
    patient_ids: np.ndarray  # str
    coords: np.ndarray  # int64 (N, 2)

    def __len__(self) -> int:
        return len(self.tile)

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.shards[0].label_names if self.shards else ()

    @property
    def tile_size(self) -> int:
        return self.shards[0].tile_size if self.shards else 0

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.label_names))
        return {name: int(n) for name, n in zip(self.label_names, counts)}

    def take(self, positions: np.ndarray) -> TileIndex:
        """The tiles at ``positions``, in that order (same shards)."""
        return dataclasses.replace(self, shard=self.shard[positions], tile=self.tile[positions],
                                   labels=self.labels[positions], slide_ids=self.slide_ids[positions],
                                   patient_ids=self.patient_ids[positions], coords=self.coords[positions])

    def sample(self, limit: int, seed: int) -> TileIndex:
        """A seeded random subset of ``limit`` tiles in index order (all of them when ``limit`` is 0 or not
        smaller than the index)."""
        if not limit or len(self) <= limit:
            return self
        return self.take(np.sort(np.random.default_rng(seed).choice(len(self), limit, replace=False)))


def build_index(shards_dir: str | os.PathLike[str], slide_ids: Sequence[str] | None = None, *,
                manifest: Mapping[str, Mapping] | None = None, manifest_path: str | os.PathLike[str] | None = None
                ) -> TileIndex:
    """Index the tiles of the shards in ``shards_dir`` (only those of ``slide_ids`` when given).

    Every label must index ``label_names`` (a :class:`ShardError` naming the shard and ``labels`` otherwise). With
    ``manifest`` (manifest rows by slide id, read from ``manifest_path``), each shard's tile count and count per
    class must equal its row: a shard changed after the manifest was written is refused, naming both."""
    paths = list_shards(shards_dir)
    by_id = {p.stem: p for p in paths}
    if slide_ids is not None:
        missing = sorted(set(slide_ids) - set(by_id))
        if missing:
            raise ShardError(shards_dir, f"no shard for slide(s) {', '.join(missing)}")
        paths = [by_id[s] for s in sorted(set(slide_ids))]
    if not paths:
        raise ShardError(shards_dir, "no shard (*.h5) found")
    infos, parts = [], []
    for k, path in enumerate(paths):
        with ShardReader(path) as r:
            info = r.info
            labels = r.field("labels").astype(np.int64)
            coords = r.field("coords").astype(np.int64)
        check_labels(path, labels, info.label_names)
        if len(coords) != len(labels):
            raise ShardError(path, f"dataset coords holds {len(coords)} rows, labels {len(labels)}: the shard is "
                             "damaged; extract the slide again")
        if manifest is not None and info.slide_id in manifest:
            check_counts(path, labels, info.label_names, manifest[info.slide_id], manifest_path)
        infos.append(info)
        n = len(labels)
        parts.append((np.full(n, k, np.int32), np.arange(n, dtype=np.int64), labels,
                      np.full(n, info.slide_id, dtype=object), np.full(n, info.patient_id, dtype=object), coords))
    odd = odd_shards(infos)
    if odd:  # named by the setting most shards share, so the odd one out is blamed, not the first one read
        info, example = odd[0]
        raise ShardError(info.path, odd_shard_cause(info, example, len(infos) - len(odd)))
    cols = [np.concatenate([p[i] for p in parts]) for i in range(5)]
    coords = np.concatenate([p[5] for p in parts]).reshape(-1, 2)
    return TileIndex(infos, cols[0], cols[1], cols[2], cols[3].astype(str), cols[4].astype(str), coords)


def check_one_setting(shards_dir: str | os.PathLike[str], slide_ids: Sequence[str]) -> None:
    """Refuse shards of ``slide_ids`` that do not share one tile size, µm/px and set of classes, naming the odd one
    (:class:`ShardError`). A run's training, tuning and validation shards are compared together before any is
    indexed: compared within one side alone (a held-out patient's two slides, one of them re-extracted at another
    tile size), a tie could name the good shard."""
    by_id = {p.stem: p for p in list_shards(shards_dir)}
    infos = []
    for slide_id in sorted(set(slide_ids) & set(by_id)):
        with ShardReader(by_id[slide_id]) as reader:
            infos.append(reader.info)
    odd = odd_shards(infos)
    if odd:
        info, example = odd[0]
        raise ShardError(info.path, odd_shard_cause(info, example, len(infos) - len(odd)))


class TileFetcher:
    """Reads and decodes tiles by index position; one lazily opened reader per shard and thread."""

    def __init__(self, index: TileIndex) -> None:
        self.index = index
        self._local = threading.local()

    def _readers(self) -> list[ShardReader]:
        readers = getattr(self._local, "readers", None)
        if readers is None:
            readers = [ShardReader.from_info(info) for info in self.index.shards]
            self._local.readers = readers
        return readers

    def fetch(self, positions: np.ndarray) -> np.ndarray:
        """``(n, T, T, 3)`` uint8 tiles for index positions, grouped per shard for few HDF5 calls."""
        T = self.index.tile_size
        out = np.empty((len(positions), T, T, 3), dtype=np.uint8)
        shard_of = self.index.shard[positions]
        readers = self._readers()
        for s in np.unique(shard_of):
            where = np.flatnonzero(shard_of == s)
            rows = self.index.tile[positions[where]]
            order = np.argsort(rows, kind="stable")
            uniq, inverse = np.unique(rows[order], return_inverse=True)
            reader = readers[s]
            ds = reader.images_dataset
            if reader.info.codec == "raw":
                with reading(reader.path, "images"):  # Fletcher-32 checked by HDF5
                    data = ds[uniq] if len(uniq) > 1 else ds[uniq[0]:uniq[0] + 1]
                out[where[order]] = data[inverse]
            else:  # decoded straight into the batch: no intermediate tile, no copy of the JPEG bytes
                with reading(reader.path, "images"):
                    data = read_encoded_rows(ds, uniq)
                check_encoded(reader.path, uniq, data, reader.checksums)
                for k, j in enumerate(inverse):
                    decode_tile(reader.path, uniq[j], data[j], T, out=out[where[order[k]]])
        return out


class ShardBatches(keras.utils.PyDataset):
    """Batches ``(x, y)`` for ``model.fit``: x ``(B, T, T, 3)`` in [0, 255], y float32 ``(B, 1)``.

    x is float32 by default; ``dtype=None`` hands over what the reader (uint8) or the transform produced: the
    model casts on its device (``train`` does this: a quarter of the bytes to copy and queue, no conversion pass
    in the reader threads).

    Each epoch draws a new order from ``seed`` and the epoch number, so a run is repeatable and a resumed run
    continues the same sequence. ``transform`` (augmentation) gets each batch and a generator seeded from
    (seed, epoch, batch), so it is repeatable whatever the thread scheduling.
    """

    def __init__(self, index: TileIndex, batch_size: int = 64, *, shuffle: bool = True, balance: str = "none",
                 seed: int = 0, transform: BatchTransform | None = None, workers: int = 2,
                 drop_remainder: bool = False, epoch: int = 0, dtype: str | None = "float32", **kwargs) -> None:
        super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=max(4, 2 * workers), **kwargs)
        if batch_size < 1:
            raise ConfigError("batch_size", f"must be at least 1, got {batch_size}")
        self.index = index
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.balance = balance
        self.seed = seed
        self.transform = transform
        self.drop_remainder = drop_remainder
        self.dtype = dtype
        self.fetcher = TileFetcher(index)
        self.epoch = epoch
        self._order = self._make_order(epoch)
        self.error: TaskError | None = None  # the first failure of a reader thread (see __getitem__)

    def _make_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        return epoch_order(self.index.labels, shuffle=self.shuffle, balance=self.balance, rng=rng)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._order = self._make_order(epoch)

    @property
    def num_batches(self) -> int:
        n = len(self._order)
        return n // self.batch_size if self.drop_remainder else -(-n // self.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def positions(self, i: int) -> np.ndarray:
        return self._order[i * self.batch_size:(i + 1) * self.batch_size]

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i >= self.num_batches:
            raise IndexError(i)
        pos = self.positions(i)
        try:
            x = self.fetcher.fetch(pos)
        except TaskError as exc:  # kept: a backend may re-raise it as its own type (TensorFlow: UnknownError)
            if self.error is None:
                self.error = exc
            raise
        if self.transform is not None:
            x = self.transform(x, np.random.default_rng([self.seed, self.epoch, i, 7]))
        y = self.index.labels[pos].astype(np.float32)[:, None]
        return (x if self.dtype is None else x.astype(self.dtype, copy=False)), y

    def on_epoch_end(self) -> None:
        self.set_epoch(self.epoch + 1)

    def labels_in_order(self) -> np.ndarray:
        return self.index.labels[self._order]


class ChainTransform:
    """Batch transforms applied in order (stain normalisation, then augmentation), each given the batch's
    generator."""

    def __init__(self, *steps: BatchTransform | None) -> None:
        self.steps = [t for t in steps if t is not None]

    def __call__(self, batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        for step in self.steps:
            batch = step(batch, rng)
        return batch


def iterate_batches(batches: ShardBatches, threads: int = 2):
    """Yield the batches in order, fetched ``threads`` at a time (for evaluation and benchmarks)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending = [pool.submit(batches.__getitem__, i) for i in range(min(threads * 2, len(batches)))]
        nxt = len(pending)
        while pending:
            fut = pending.pop(0)
            if nxt < len(batches):
                pending.append(pool.submit(batches.__getitem__, nxt))
                nxt += 1
            yield fut.result()

