"""What one run reads: its fold's tile indexes (training, tuning, validation), the batches (stain normalised,
augmented in the pipeline when that is the engine) and the fitted stain normaliser."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from python_task.data.dataset import (
    ChainTransform,
    ShardBatches,
    TileFetcher,
    TileIndex,
    build_index,
    check_one_setting,
)
from python_task.data.splits import FoldAssignment, load_fold
from python_task.errors import ShardError, TaskError
from python_task.fileio import write_json_atomic
from python_task.shards.manifest import MANIFEST_NAME, digest_rows, read_manifest
from python_task.training.config import TrainConfig
from python_task.transforms.augment_cv import PipelineAugmenter
from python_task.transforms.stain import (
    Normalizer,
    StainTransform,
    make_normalizer,
    read_normalizer,
    reference_positions,
)

STAIN_FILE = "stain.json"  # the fitted normaliser, saved with the run
VAL_BATCH_MIN = 64  # validation batches hold at least this many tiles (no gradients: larger is cheaper)


@dataclass
class RunData:
    train_index: TileIndex
    val_index: TileIndex
    train_batches: ShardBatches
    val_batches: ShardBatches
    normalizer: Any
    manifest_digest: str
    stain_transforms: list[StainTransform] = field(default_factory=list)
    fold: FoldAssignment | None = None
    tune_index: TileIndex | None = None  # None: the fold has no tuning set (train's fixed rule)
    tune_batches: ShardBatches | None = None

    def reader_error(self) -> TaskError | None:
        """The first failure of a reader thread (a damaged shard), which the backend may have re-raised as its own
        exception type (TensorFlow: ``UnknownError``): re-raise this instead, it names the shard."""
        tune_error = self.tune_batches.error if self.tune_batches is not None else None
        return self.train_batches.error or self.val_batches.error or tune_error

    def passthrough_fraction(self) -> float:
        """Fraction of the tiles normalised so far that passed through unchanged (background, no estimate)."""
        seen = sum(t.seen for t in self.stain_transforms)
        passthrough = sum(t.passthrough for t in self.stain_transforms)
        return passthrough / seen if seen else 0.0


def prepare_data(cfg: TrainConfig, start_epoch: int, engine: str = "model") -> RunData:
    """Indexes, batches and stain normaliser of a run; with ``engine`` ``pipeline`` the training batches are
    augmented in the reader threads (after stain normalisation)."""
    fold = load_fold(cfg.splits, cfg.shards, cfg.fold)
    rows = read_manifest(cfg.shards)
    listed = {"manifest": {r["slide_id"]: r for r in rows}, "manifest_path": Path(cfg.shards) / MANIFEST_NAME}
    check_one_setting(cfg.shards, [*fold.train_slides, *fold.val_slides, *fold.tune_slides])
    train_index = build_index(cfg.shards, fold.train_slides, **listed).sample(cfg.max_train_tiles, cfg.seed)
    val_index = build_index(cfg.shards, fold.val_slides, **listed).sample(cfg.max_val_tiles, cfg.seed + 1)
    tune_index = build_index(cfg.shards, fold.tune_slides, **listed).sample(cfg.max_val_tiles, cfg.seed + 2) \
        if fold.tune_slides else None
    if len(np.unique(train_index.labels)) < 2:
        raise ShardError(cfg.splits, f"fold {cfg.fold}: the training set has a single class "
                         f"({train_index.class_counts()}); a classifier cannot be trained")
    normalizer = load_or_fit_normalizer(cfg, train_index)
    stain = val_stain = None
    if normalizer is not None:
        stain, val_stain = StainTransform(normalizer), StainTransform(normalizer)
    augmenter = None
    if engine == "pipeline":
        augmenter = PipelineAugmenter(cfg.augmentations, cfg.augment_settings) or None
    transform = ChainTransform(stain, augmenter) if stain or augmenter else None
    train_batches = ShardBatches(train_index, cfg.batch_size, shuffle=True, balance=cfg.balance, seed=cfg.seed,
                                 transform=transform, workers=cfg.workers, epoch=start_epoch, dtype=None)
    val_batches = ShardBatches(val_index, max(cfg.batch_size, VAL_BATCH_MIN), shuffle=False, seed=cfg.seed,
                               transform=val_stain, workers=cfg.workers, dtype=None)
    tune_batches = None
    if tune_index is not None:
        tune_batches = ShardBatches(tune_index, max(cfg.batch_size, VAL_BATCH_MIN), shuffle=False, seed=cfg.seed,
                                    transform=val_stain, workers=cfg.workers, dtype=None)
    return RunData(train_index, val_index, train_batches, val_batches, normalizer, digest_rows(rows),
                   [t for t in (stain, val_stain) if t is not None], fold=fold, tune_index=tune_index,
                   tune_batches=tune_batches)


def load_or_fit_normalizer(cfg: TrainConfig, train_index: TileIndex) -> Normalizer | None:
    """Fit stain normalisation once (on ``stain_reference`` or on seeded training tiles); saved with the run."""
    if cfg.stain == "none":
        return None
    saved = cfg.out / STAIN_FILE
    if saved.exists():
        return read_normalizer(saved)
    normalizer = make_normalizer(cfg.stain)
    try:
        normalizer.fit(reference_tiles(cfg, train_index))
    except TaskError as exc:  # the normaliser says "stain reference": name the user's file when there is one
        if cfg.stain_reference is None or exc.path != "stain reference":
            raise
        raise TaskError(cfg.stain_reference, exc.cause) from None
    write_json_atomic(saved, {"method": cfg.stain, **normalizer.to_dict()})
    return normalizer


def reference_tiles(cfg: TrainConfig, train_index: TileIndex) -> np.ndarray:
    """The stain reference: an image file or ``.npy`` given by the user, else seeded training tiles."""
    if cfg.stain_reference is not None:
        path = Path(cfg.stain_reference)
        try:
            if path.suffix == ".npy":
                return np.load(path)
            return np.asarray(Image.open(path).convert("RGB"))
        except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty .npy
            raise TaskError(path, f"cannot read the stain reference ({type(exc).__name__}: "
                                  f"{' '.join(str(exc).split())})") from None
    return TileFetcher(train_index).fetch(reference_positions(len(train_index), cfg.seed))
