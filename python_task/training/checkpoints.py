"""Checkpoints of a run and the saved models: written atomically, read back with the package's custom layers.

A run's ``checkpoint/`` folder holds ``last.keras`` (the training model with its optimizer state, every epoch),
``best.keras`` (the best model so far) and ``state.json`` (:class:`RunState`, written last). With augmentation
in the model, the training model is a wrapper named :data:`TRAIN_WRAPPER` around the saved model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras

import python_task.training.models  # noqa: F401 - registers the custom layers the saved models hold
import python_task.transforms.augment_layers  # noqa: F401 - likewise, for a training wrapper's augmenter
from python_task.fileio import nan_for_null, write_json_atomic
from python_task.training.config import TrainConfig

CHECKPOINT_DIR = "checkpoint"
TRAIN_WRAPPER = "train_wrapper"  # name of the training model that puts augmentation layers before the model


@dataclass
class RunState:
    """What a resumed run needs besides the model: progress, early-stopping state, history."""

    epoch: int = 0  # epochs completed
    best_auc: float = -math.inf  # of the tuning set (the epoch chosen on it)
    best_epoch: int = -1
    best_loss: float = math.inf  # the tuning loss of the best epoch: breaks ties of its AUC
    wait: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    stopped_early: bool = False


def load_model(path: str | os.PathLike[str], *, compile: bool = False) -> Any:
    """A saved ``.keras`` model (architectures and augmentation layers of this package included)."""
    return keras.saving.load_model(path, compile=compile)


def save_model_atomic(model, final: Path) -> None:
    """``model.save`` under a temporary ``.keras`` name in the same folder, then rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.stem}.{os.getpid()}.tmp.keras"
    try:
        model.save(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(ckpt: Path, model, train_model, state: RunState, *, best: bool) -> None:
    """Last epoch (model with optimizer state) always; the best model when it improved. State last."""
    save_model_atomic(train_model, ckpt / "last.keras")
    if best:
        save_model_atomic(model, ckpt / "best.keras")
    write_json_atomic(ckpt / "state.json", dataclasses.asdict(state))


def has_checkpoint(ckpt: Path) -> bool:
    return (ckpt / "state.json").exists() and (ckpt / "last.keras").exists()


def load_checkpoint(ckpt: Path) -> tuple[RunState, Any]:
    return read_state(ckpt), load_model(ckpt / "last.keras", compile=True)


def read_state(ckpt: Path) -> RunState:
    """``state.json`` back: it is strict JSON, so a NaN (or the initial -inf best AUC) was written null."""
    saved = json.loads((ckpt / "state.json").read_text())
    return RunState(**{**saved, "best_auc": -math.inf if saved.get("best_auc") is None else saved["best_auc"],
                       "best_loss": math.inf if saved.get("best_loss") is None else saved["best_loss"],
                       "history": [nan_for_null(row) for row in saved.get("history", [])]})


def inner_model(train_model):
    """The saved model inside the augmentation wrapper (the wrapper's last layer), or the model itself."""
    if train_model.name == TRAIN_WRAPPER:
        return train_model.layers[-1]
    return train_model


def checkpoint_engine(cfg: TrainConfig, train_model) -> str:
    """The engine a checkpointed run started with, read off its model: a resumed run must keep it (with the
    layers in the saved wrapper, augmenting in the pipeline too would augment twice)."""
    if not cfg.augmentations or train_model.name == TRAIN_WRAPPER:
        return "model"
    return "pipeline"
