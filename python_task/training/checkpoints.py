"""Checkpoints of a run and the saved models: written atomically, read back with the package's custom layers.

A run's ``checkpoint/`` folder holds ``last.keras`` (the training model with its optimizer state, every epoch),
``best.keras`` (the best model so far), ``rng.json`` (the random generators, see below) and ``state.json``
(:class:`RunState`, written last). With augmentation in the model, the training model is a wrapper named
:data:`TRAIN_WRAPPER` around the saved model.

A resumed run continues exactly as the uninterrupted run would have: ``rng.json`` holds the state of every Keras
seed generator of the training model (dropout masks, augmentation layers: ``.keras`` files keep their seeds, not
their positions), Keras's global seed generator, Python's and numpy's global generators, and the data-order
position (the epoch the next batches are drawn for; the order of an epoch is a function of the seed and the
epoch, see :class:`~python_task.data.dataset.ShardBatches`). Loading a checkpoint restores them all.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

import python_task.training.models  # noqa: F401 - registers the custom layers the saved models hold
import python_task.transforms.augment_layers  # noqa: F401 - likewise, for a training wrapper's augmenter
from python_task.fileio import nan_for_null, write_json_atomic
from python_task.training.config import TrainConfig

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
RNG_FILE = "rng.json"
SEED_STATE = "seed_generator_state"  # the name Keras gives a SeedGenerator's state variable
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
    except OSError as exc:
        if exc.filename in (None, str(tmp)):  # a full disk: name the model being written, not its temporary
            raise OSError(exc.errno, exc.strerror or str(exc), str(final)) from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(ckpt: Path, model, train_model, state: RunState, *, best: bool) -> None:
    """Last epoch (model with optimizer state) always; the best model when it improved; the random generators.
    State last."""
    save_model_atomic(train_model, ckpt / "last.keras")
    if best:
        save_model_atomic(model, ckpt / "best.keras")
    write_json_atomic(ckpt / RNG_FILE, capture_rng(train_model, data_epoch=state.epoch))
    write_json_atomic(ckpt / "state.json", dataclasses.asdict(state))


def has_checkpoint(ckpt: Path) -> bool:
    return (ckpt / "state.json").exists() and (ckpt / "last.keras").exists()


def load_checkpoint(ckpt: Path) -> tuple[RunState, Any]:
    """The run's state and its training model, with every random generator where the checkpoint left it."""
    state = read_state(ckpt)
    train_model = load_model(ckpt / "last.keras", compile=True)
    rng = ckpt / RNG_FILE
    if rng.exists():
        restore_rng(train_model, json.loads(rng.read_text(encoding="utf-8")), data_epoch=state.epoch)
    else:  # a checkpoint written before rng.json: resumes, but not bit for bit
        log.warning("%s: no %s (an older checkpoint): the resumed run draws other random numbers than an "
                    "uninterrupted one would", ckpt, RNG_FILE)
    return state, train_model


def seed_variables(model) -> list[Any]:
    """The state variables of every Keras seed generator of ``model``, in a fixed order."""
    return [v for v in model.variables if v.name == SEED_STATE]


def _global_seed_generator(create: bool = False):
    """Keras's global seed generator (unseeded ``keras.random`` calls), when there is one."""
    try:
        from keras.src.backend.common import global_state
        from keras.src.random import seed_generator
    except ImportError:  # another Keras layout: nothing to save
        return None
    gen = global_state.get_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR)
    return seed_generator.global_seed_generator() if gen is None and create else gen


def capture_rng(train_model, *, data_epoch: int) -> dict[str, Any]:
    """Every random generator a resumed run needs to continue identically, as JSON."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    glob = _global_seed_generator()
    return {"data_epoch": int(data_epoch),
            "keras_seed_generators": [keras.ops.convert_to_numpy(v).tolist() for v in seed_variables(train_model)],
            "keras_global_seed_generator": None if glob is None else keras.ops.convert_to_numpy(glob.state).tolist(),
            "python": [version, list(mt), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def restore_rng(train_model, saved: dict[str, Any], *, data_epoch: int) -> None:
    """Put the generators back where :func:`capture_rng` found them (the data order follows ``data_epoch``)."""
    if int(saved.get("data_epoch", data_epoch)) != data_epoch:  # killed between writing it and state.json
        log.warning("the checkpoint's %s is for epoch %s, its state for epoch %d: random generators not restored",
                    RNG_FILE, saved.get("data_epoch"), data_epoch)
        return
    states = saved.get("keras_seed_generators") or []
    variables = seed_variables(train_model)
    if len(states) != len(variables):
        log.warning("the checkpoint holds %d seed generator states for %d generators: not restored", len(states),
                    len(variables))
    else:
        for var, value in zip(variables, states):
            var.assign(np.asarray(value, dtype=keras.backend.standardize_dtype(var.dtype)))
    if saved.get("keras_global_seed_generator") is not None:
        glob = _global_seed_generator(create=True)
        if glob is not None:
            glob.state.assign(np.asarray(saved["keras_global_seed_generator"],
                                         dtype=keras.backend.standardize_dtype(glob.state.dtype)))
    version, mt, gauss = saved["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def read_state(ckpt: Path) -> RunState:
    """``state.json`` back: it is strict JSON, so a NaN (or the initial -inf best AUC) was written null."""
    saved = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
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
