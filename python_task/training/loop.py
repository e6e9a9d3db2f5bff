"""``train``: one experiment point. Shards + a patient-level fold -> a trained model and its metrics.

Outputs in ``out``: ``metrics.json`` (the contract's keys), ``model.keras`` (best epoch by validation AUC),
``history.csv``, ``config.json`` (every resolved setting, library versions, the shards' manifest digest),
``predictions.csv`` (validation tiles: slide, patient, coords, label, probability) and TensorBoard logs.

Every epoch ends with a checkpoint (``checkpoint/``): the same command on the same folder resumes after the last
finished epoch, so a cluster job killed at its wall time loses at most one epoch. A finished folder is not
retrained. Everything is written under temporary names and renamed, so ``metrics.json`` exists only when the
run is complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from python_task.errors import TaskError
from python_task.fileio import atomic_path, write_csv_atomic, write_json_atomic

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
OPTIMIZERS = ("adam", "adamw", "sgd")
AUGMENT_ENGINES = ("auto", "pipeline", "model")  # --augment-on (python_task.transforms.augment_cv.resolve_engine)
# Settings that may change between a killed run and its resumption without invalidating the checkpoint.
RESUME_FREE_FIELDS = {"workers", "verbose", "tensorboard"}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one training run; written to ``config.json``."""

    shards: Path
    splits: Path
    fold: int
    arch: str
    out: Path
    lr: float = 1e-3
    batch_size: int = 32
    epochs: int = 10
    optimizer: str = "adam"
    weight_decay: float = 0.0
    dropout: float = 0.3
    augment: str = "none"
    augment_on: str = "auto"  # pipeline (OpenCV in the reader threads) | model (Keras layers) | auto
    stain: str = "none"
    stain_reference: Path | None = None
    seed: int = 0
    weights: Path | None = None
    freeze_backbone: bool = False
    unfreeze_at: int = 0  # epoch at which a frozen backbone is unfrozen for fine-tuning (0 = never)
    input_size: int | None = None  # resize tiles to this size inside the model (None = tile size)
    balance: str = "none"
    class_weights: bool = False
    patience: int = 5
    mixed_precision: str = "auto"  # auto | on | off
    max_train_tiles: int = 0  # 0 = all; otherwise a seeded random subset per run (quick sweeps)
    max_val_tiles: int = 0
    base_filters: int = 32
    workers: int = 2
    tensorboard: bool = True
    verbose: bool = True
    augment_options: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key, value in d.items():
            if isinstance(value, Path):
                d[key] = str(value)
        return d


def validate_config(cfg: TrainConfig) -> None:
    from python_task.transforms.augment_layers import parse_augment
    from python_task.data.dataset import BALANCE_MODES
    from python_task.training.models import ARCHITECTURES
    from python_task.transforms.stain import STAIN_METHODS

    if cfg.arch not in ARCHITECTURES:
        raise TaskError("--arch", f"unknown architecture {cfg.arch!r}; choose from: {', '.join(ARCHITECTURES)}")
    checks = [("--lr", cfg.lr > 0 and math.isfinite(cfg.lr), "must be a positive number"),
              ("--batch-size", cfg.batch_size >= 1, "must be at least 1"),
              ("--epochs", cfg.epochs >= 1, "must be at least 1"),
              ("--fold", cfg.fold >= 0, "must be 0 or more"),
              ("--weight-decay", cfg.weight_decay >= 0, "must be 0 or more"),
              ("--dropout", 0 <= cfg.dropout < 1, "must be in [0, 1)"),
              ("--patience", cfg.patience >= 0, "must be 0 or more"),
              ("--optimizer", cfg.optimizer in OPTIMIZERS, f"choose from {', '.join(OPTIMIZERS)}"),
              ("--balance", cfg.balance in BALANCE_MODES, f"choose from {', '.join(BALANCE_MODES)}"),
              ("--stain", cfg.stain in STAIN_METHODS, f"choose from {', '.join(STAIN_METHODS)}"),
              ("--augment-on", cfg.augment_on in AUGMENT_ENGINES, f"choose from {', '.join(AUGMENT_ENGINES)}"),
              ("--mixed-precision", cfg.mixed_precision in ("auto", "on", "off"), "choose from auto, on, off")]
    for option, ok, why in checks:
        if not ok:
            raise TaskError(option, f"{why} (got {getattr(cfg, option[2:].replace('-', '_'))!r})")
    parse_augment(cfg.augment)
    if cfg.weights is not None and not Path(cfg.weights).exists():
        raise TaskError(cfg.weights, "weights file not found")


# --------------------------------------------------------------------------------------------- environment

def configure_backend(seed: int, mixed_precision: str) -> str:
    """Seed everything and pick the precision policy; returns the policy name."""
    import keras

    keras.utils.set_random_seed(seed)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    use_mixed = mixed_precision == "on" or (mixed_precision == "auto" and accelerator_present())
    policy = "mixed_float16" if use_mixed else "float32"
    keras.mixed_precision.set_global_policy(policy)
    return policy


def accelerator_present() -> bool:
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
    import h5py
    import keras
    import sklearn

    versions = {"python": platform.python_version(), "keras": keras.__version__, "numpy": np.__version__,
                "h5py": h5py.__version__, "scikit-learn": sklearn.__version__, "backend": keras.backend.backend()}
    for mod in ("tensorflow", "jax"):
        if mod in sys.modules:
            versions[mod] = getattr(sys.modules[mod], "__version__", "?")
    from python_task import __version__

    versions["python_task"] = __version__
    return versions


# --------------------------------------------------------------------------------------------- model

def build_training_model(cfg: TrainConfig, tile_size: int, engine: str = "model"):
    """The saved model (resize + normalisation + backbone + head) and the training wrapper with augmentation
    (the model itself when there is no augmentation or when it runs in the input pipeline, ``engine``
    ``pipeline``)."""
    import keras

    from python_task.transforms.augment_layers import AugmentOptions, build_augmenter, parse_augment
    from python_task.training.models import build_model

    size = cfg.input_size or tile_size
    core = build_model(cfg.arch, size, dropout=cfg.dropout, weights=cfg.weights,
                       freeze_backbone=cfg.freeze_backbone, base_filters=cfg.base_filters, seed=cfg.seed)
    if size != tile_size:
        inputs = keras.Input((tile_size, tile_size, 3), name="tile")
        x = keras.layers.Resizing(size, size, interpolation="bilinear", name="resize")(inputs)
        model = keras.Model(inputs, core(x), name=f"{cfg.arch}_{size}")
    else:
        model = core
    if engine == "pipeline":
        return model, model
    options = AugmentOptions(**cfg.augment_options)
    augmenter = build_augmenter(parse_augment(cfg.augment), seed=cfg.seed, options=options)
    if augmenter is None:
        return model, model
    train_model = keras.Sequential([keras.Input((tile_size, tile_size, 3)), augmenter, model], name="train_wrapper")
    return model, train_model


def make_optimizer(cfg: TrainConfig, lr: float):
    import keras

    if cfg.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate=lr, weight_decay=cfg.weight_decay or 1e-4)
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=0.9, nesterov=True,
                                    weight_decay=cfg.weight_decay or None)
    return keras.optimizers.Adam(learning_rate=lr, weight_decay=cfg.weight_decay or None)


def compile_model(train_model, cfg: TrainConfig, lr: float) -> None:
    import keras

    train_model.compile(optimizer=make_optimizer(cfg, lr), loss=keras.losses.BinaryCrossentropy(),
                        metrics=[keras.metrics.BinaryAccuracy(name="accuracy")], jit_compile="auto")


# --------------------------------------------------------------------------------------------- data

@dataclass
class RunData:
    train_index: Any
    val_index: Any
    train_batches: Any
    val_batches: Any
    normalizer: Any
    manifest_digest: str
    stain_transforms: list[Any] = field(default_factory=list)


def prepare_data(cfg: TrainConfig, start_epoch: int, engine: str = "model") -> RunData:
    """Indexes, batches and stain normaliser of a run; with ``engine`` ``pipeline`` the training batches are
    augmented in the reader threads (after stain normalisation)."""
    from python_task.transforms.augment_cv import PipelineAugmenter
    from python_task.data.dataset import ChainTransform, ShardBatches, build_index
    from python_task.data.splits import load_fold, manifest_digest

    fold = load_fold(cfg.splits, cfg.shards, cfg.fold)
    train_index = _subset(build_index(cfg.shards, fold.train_slides), cfg.max_train_tiles, cfg.seed)
    val_index = _subset(build_index(cfg.shards, fold.val_slides), cfg.max_val_tiles, cfg.seed + 1)
    if len(np.unique(train_index.labels)) < 2:
        raise TaskError(cfg.splits, f"fold {cfg.fold}: the training set has a single class "
                        f"({train_index.class_counts()}); a classifier cannot be trained")
    normalizer = load_or_fit_normalizer(cfg, train_index)
    stain = val_stain = None
    if normalizer is not None:
        from python_task.transforms.stain import StainTransform

        stain, val_stain = StainTransform(normalizer), StainTransform(normalizer)
    augmenter = None
    if engine == "pipeline":
        augmenter = PipelineAugmenter(cfg.augment, cfg.augment_options) or None
    transform = ChainTransform(stain, augmenter) if stain or augmenter else None
    train_batches = ShardBatches(train_index, cfg.batch_size, shuffle=True, balance=cfg.balance, seed=cfg.seed,
                                 transform=transform, workers=cfg.workers, epoch=start_epoch, dtype=None)
    val_batches = ShardBatches(val_index, max(cfg.batch_size, 64), shuffle=False, seed=cfg.seed,
                               transform=val_stain, workers=cfg.workers, dtype=None)
    return RunData(train_index, val_index, train_batches, val_batches, normalizer, manifest_digest(cfg.shards),
                   [t for t in (stain, val_stain) if t is not None])


def _subset(index, limit: int, seed: int):
    """A seeded random subset of an index (all tiles when ``limit`` is 0 or larger than the index)."""
    if not limit or len(index) <= limit:
        return index
    keep = np.sort(np.random.default_rng(seed).choice(len(index), limit, replace=False))
    return dataclasses.replace(index, shard=index.shard[keep], tile=index.tile[keep], labels=index.labels[keep],
                               slide_ids=index.slide_ids[keep], patient_ids=index.patient_ids[keep],
                               coords=index.coords[keep])


def load_or_fit_normalizer(cfg: TrainConfig, train_index):
    """Fit stain normalisation once (on ``--stain-reference`` or on seeded training tiles); saved with the run."""
    from python_task.transforms.stain import make_normalizer, normalizer_from_dict

    if cfg.stain == "none":
        return None
    saved = cfg.out / "stain.json"
    if saved.exists():
        return normalizer_from_dict(json.loads(saved.read_text()))
    normalizer = make_normalizer(cfg.stain)
    normalizer.fit(reference_tiles(cfg, train_index))
    write_json_atomic(saved, {"method": cfg.stain, **normalizer.to_dict()})
    return normalizer


def reference_tiles(cfg: TrainConfig, train_index, n: int = 16) -> np.ndarray:
    """The stain reference: an image file or ``.npy`` given by the user, else ``n`` seeded training tiles."""
    if cfg.stain_reference is not None:
        path = Path(cfg.stain_reference)
        try:
            if path.suffix == ".npy":
                return np.load(path)
            from PIL import Image

            return np.asarray(Image.open(path).convert("RGB"))
        except (OSError, ValueError) as exc:
            raise TaskError(path, f"cannot read the stain reference ({exc})") from None
    from python_task.data.dataset import TileFetcher

    rng = np.random.default_rng(cfg.seed + 17)
    pos = np.sort(rng.choice(len(train_index), min(n, len(train_index)), replace=False))
    return TileFetcher(train_index).fetch(pos)


# --------------------------------------------------------------------------------------------- epochs

@dataclass
class RunState:
    """What a resumed run needs besides the model: progress, early-stopping state, history."""

    epoch: int = 0  # epochs completed
    best_auc: float = -math.inf
    best_epoch: int = -1
    wait: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    stopped_early: bool = False


class EpochProgress:
    """A tqdm bar per epoch on stderr, driven by a Keras callback."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def callback(self, epoch: int, epochs: int, steps: int):
        import keras
        from tqdm import tqdm

        enabled = self.enabled

        class _Bar(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False,
                                file=sys.stderr, disable=None if enabled else True)

            def on_train_batch_end(self, batch, logs=None):
                self.bar.update(1)
                if logs and "loss" in logs:
                    self.bar.set_postfix(loss=f"{float(logs['loss']):.4f}", refresh=False)

            def on_train_end(self, logs=None):
                self.bar.close()

        return _Bar()


def predict_index(model, batches) -> np.ndarray:
    """Probabilities for every tile of ``batches`` in order (backend-agnostic, threaded reads)."""
    from python_task.data.dataset import iterate_batches

    probs = [predict_padded(model, x, batches.batch_size)
             for x, _ in iterate_batches(batches, threads=max(1, batches.workers))]
    return np.concatenate(probs) if probs else np.empty(0)


def predict_padded(model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """``model.predict_on_batch`` with the batch padded to a fixed size, so the compiled function is reused."""
    n = len(x)
    if n < batch_size:
        x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)])
    return np.asarray(model.predict_on_batch(x), dtype=np.float64).reshape(-1)[:n]


def bce(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))) if len(y) else float("nan")


def run_epochs(cfg: TrainConfig, model, train_model, data: RunData, state: RunState, ckpt: Path) -> RunState:
    from sklearn.metrics import roc_auc_score

    progress = EpochProgress(cfg.verbose)
    class_weight = _class_weight(data.train_index.labels) if cfg.class_weights else None
    val_y = data.val_index.labels.astype(np.float64)
    tb = _tensorboard_writer(cfg)
    while state.epoch < cfg.epochs and not state.stopped_early:
        epoch = state.epoch
        if cfg.unfreeze_at and epoch == cfg.unfreeze_at and cfg.freeze_backbone:
            _unfreeze(model)
            compile_model(train_model, cfg, cfg.lr * 0.1)
        t0 = time.perf_counter()
        data.train_batches.set_epoch(epoch)
        hist = train_model.fit(data.train_batches, epochs=1, verbose=0, class_weight=class_weight, shuffle=False,
                               callbacks=[progress.callback(epoch, cfg.epochs, len(data.train_batches))])
        loss = float(hist.history["loss"][-1])
        if not math.isfinite(loss):
            raise TaskError(cfg.out, f"training loss became {loss} at epoch {epoch + 1}: lower --lr "
                            f"(now {cfg.lr}) or check the tiles")
        prob = predict_index(model, data.val_batches)
        val_auc = float(roc_auc_score(val_y, prob)) if len(np.unique(val_y)) == 2 else float("nan")
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "loss": loss, "accuracy": float(hist.history.get("accuracy", [np.nan])[-1]),
               "val_loss": bce(val_y, prob), "val_auc": val_auc, "seconds": seconds}
        state.history.append(row)
        state.train_seconds += seconds
        improved = val_auc > state.best_auc or (state.best_epoch < 0)
        if improved:
            state.best_auc, state.best_epoch, state.wait = (val_auc if math.isfinite(val_auc) else -math.inf,
                                                            epoch + 1, 0)
        else:
            state.wait += 1
            if cfg.patience and state.wait >= cfg.patience:
                state.stopped_early = True
        state.epoch = epoch + 1
        if improved:  # the best model's validation predictions: finish_run reuses them instead of predicting again
            with atomic_path(ckpt / f"val_prob_epoch{epoch + 1}.npy") as tmp, open(tmp, "wb") as fh:
                np.save(fh, prob)
        save_checkpoint(ckpt, model, train_model, state, best=improved)
        if tb is not None:
            tb(epoch + 1, row)
        if cfg.verbose:
            mark = " *" if improved else ""
            print(f"epoch {epoch + 1}/{cfg.epochs}: loss {loss:.4f}, val_loss {row['val_loss']:.4f}, "
                  f"val_auc {val_auc:.4f} ({seconds:.1f} s){mark}", file=sys.stderr, flush=True)
    return state


def _class_weight(labels: np.ndarray) -> dict[int, float]:
    from sklearn.utils.class_weight import compute_class_weight

    classes = np.unique(labels)
    weights = compute_class_weight("balanced", classes=classes, y=labels)
    return {int(c): float(w) for c, w in zip(classes, weights)}


def _unfreeze(model) -> None:
    """Fine-tune the backbone; batch-norm layers stay in inference mode (small batches would wreck them)."""
    from python_task.training.models import unfreeze_backbone

    unfreeze_backbone(model, keep_batchnorm_frozen=True)


def _tensorboard_writer(cfg: TrainConfig):
    """Scalar logs for TensorBoard when TensorFlow is importable (any backend); None otherwise."""
    if not cfg.tensorboard:
        return None
    try:
        import tensorflow as tf
    except ImportError:
        return None
    writer = tf.summary.create_file_writer(str(cfg.out / "tensorboard"))

    def log_row(step: int, row: dict[str, float]) -> None:
        with writer.as_default():
            for key, value in row.items():
                if key != "epoch" and math.isfinite(value):
                    tf.summary.scalar(key, value, step=step)
        writer.flush()

    return log_row


# --------------------------------------------------------------------------------------------- checkpoints

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


def load_checkpoint(ckpt: Path):
    import keras

    import python_task.transforms.augment_layers  # noqa: F401 - registers the custom layers
    import python_task.training.models  # noqa: F401

    state = RunState(**json.loads((ckpt / "state.json").read_text()))
    train_model = keras.saving.load_model(ckpt / "last.keras", compile=True)
    return state, train_model


def inner_model(train_model):
    """The saved model inside the augmentation wrapper (the wrapper's last layer), or the model itself."""
    if train_model.name == "train_wrapper":
        return train_model.layers[-1]
    return train_model


# --------------------------------------------------------------------------------------------- outputs

def write_predictions(path: Path, index, prob: np.ndarray) -> None:
    rows = [{"slide_id": s, "patient_id": p, "x": int(c[0]), "y": int(c[1]), "label": int(y), "prob": float(q)}
            for s, p, c, y, q in zip(index.slide_ids, index.patient_ids, index.coords, index.labels, prob)]
    write_csv_atomic(path, rows, fieldnames=["slide_id", "patient_id", "x", "y", "label", "prob"])


def finish_run(cfg: TrainConfig, data: RunData, state: RunState, policy: str, t_start: float,
               engine: str) -> dict[str, float]:
    import keras

    from python_task.transforms.augment_layers import parse_augment
    from python_task.training.metrics import evaluation_metrics
    from python_task.training.models import count_params

    import python_task.training.models  # noqa: F401 - registers the custom layers

    best = keras.saving.load_model(cfg.out / CHECKPOINT_DIR / "best.keras", compile=False)
    saved_prob = cfg.out / CHECKPOINT_DIR / f"val_prob_epoch{state.best_epoch}.npy"
    prob = np.load(saved_prob) if saved_prob.exists() else predict_index(best, data.val_batches)
    if len(prob) != len(data.val_index):
        prob = predict_index(best, data.val_batches)
    y = data.val_index.labels
    metrics = evaluation_metrics(y, prob, data.val_index.slide_ids, data.val_index.patient_ids, loss=bce(y, prob))
    metrics.update(train_seconds=float(state.train_seconds), epochs_run=float(state.epoch),
                   best_epoch=float(state.best_epoch), n_train_tiles=float(len(data.train_index)),
                   n_val_tiles=float(len(data.val_index)), n_params=float(count_params(best)),
                   wall_seconds=float(time.perf_counter() - t_start))
    if data.normalizer is not None:
        metrics["stain_passthrough_fraction"] = float(_passthrough_fraction(data))
    save_model_atomic(best, cfg.out / "model.keras")
    write_predictions(cfg.out / "predictions.csv", data.val_index, prob)
    write_csv_atomic(cfg.out / "history.csv", state.history,
                     fieldnames=["epoch", "loss", "accuracy", "val_loss", "val_auc", "seconds"])
    config = {**cfg.to_json(), "resolved": {
        "tile_size": data.train_index.tile_size, "label_names": list(data.train_index.label_names),
        "mpp": data.train_index.shards[0].mpp, "precision_policy": policy,
        "input_size": cfg.input_size or data.train_index.tile_size,
        "train_slides": sorted(set(data.train_index.slide_ids)), "val_slides": sorted(set(data.val_index.slide_ids)),
        "train_class_counts": data.train_index.class_counts(), "val_class_counts": data.val_index.class_counts(),
        "manifest_digest": data.manifest_digest, "threshold": metrics["threshold"],
        "stain_file": "stain.json" if data.normalizer is not None else None,
        "stopped_early": state.stopped_early,
        "augment_on": engine if parse_augment(cfg.augment) else None}, "versions": library_versions()}
    write_json_atomic(cfg.out / "config.json", config)
    write_json_atomic(cfg.out / "metrics.json", metrics)  # last: its presence means the run is complete
    return metrics


def _passthrough_fraction(data: RunData) -> float:
    seen = passthrough = 0
    for t in data.stain_transforms:
        seen += t.seen
        passthrough += t.passthrough
    return passthrough / seen if seen else 0.0


# --------------------------------------------------------------------------------------------- entry point

def train(cfg: TrainConfig) -> dict[str, float]:
    """Run (or resume, or recognise as finished) one training point; returns the metrics."""
    validate_config(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    done = _finished_metrics(cfg)
    if done is not None:
        if cfg.verbose:
            print(f"{cfg.out}: already complete (metrics.json present), nothing to do", file=sys.stderr)
        return done
    t_start = time.perf_counter()
    _check_resume_config(cfg)
    policy = configure_backend(cfg.seed, cfg.mixed_precision)
    ckpt = cfg.out / CHECKPOINT_DIR
    resuming = (ckpt / "state.json").exists() and (ckpt / "last.keras").exists()
    state = RunState()
    if resuming:
        state, train_model = load_checkpoint(ckpt)
        model = inner_model(train_model)
        engine = checkpoint_engine(cfg, train_model)
        if cfg.verbose:
            print(f"resuming {cfg.out} after epoch {state.epoch}", file=sys.stderr)
    else:
        engine = augment_engine(cfg)
    data = prepare_data(cfg, state.epoch, engine)
    if not resuming:
        model, train_model = build_training_model(cfg, data.train_index.tile_size, engine)
        compile_model(train_model, cfg, cfg.lr)
        write_json_atomic(cfg.out / "run_config.json", cfg.to_json())
    if cfg.verbose:
        print(f"train {cfg.arch} fold {cfg.fold}: {len(data.train_index)} training tiles "
              f"{data.train_index.class_counts()}, {len(data.val_index)} validation tiles "
              f"{data.val_index.class_counts()}, {policy}", file=sys.stderr)
    state = run_epochs(cfg, model, train_model, data, state, ckpt)
    metrics = finish_run(cfg, data, state, policy, t_start, engine)
    shutil.rmtree(ckpt, ignore_errors=True)  # model.keras is the best checkpoint; the rest is no longer needed
    if cfg.verbose:
        print(f"val_auc {metrics['val_auc']:.4f}, slide AUC {metrics['val_slide_auc']:.4f}, patient AUC "
              f"{metrics['val_patient_auc']:.4f}; outputs in {cfg.out}", file=sys.stderr)
    return metrics


def augment_engine(cfg: TrainConfig) -> str:
    """Where augmentation runs: ``--augment-on``, with ``auto`` resolved by the hardware (see
    :func:`python_task.transforms.augment_cv.resolve_engine`); ``model`` when there is no augmentation (nothing runs)."""
    from python_task.transforms.augment_layers import parse_augment
    from python_task.transforms.augment_cv import resolve_engine

    if not parse_augment(cfg.augment):
        return "model"
    return resolve_engine(cfg.augment_on, accelerator_present())


def checkpoint_engine(cfg: TrainConfig, train_model) -> str:
    """The engine a checkpointed run started with, read off its model: a resumed run must keep it (with the
    layers in the saved wrapper, augmenting in the pipeline too would augment twice)."""
    from python_task.transforms.augment_layers import parse_augment

    if not parse_augment(cfg.augment) or train_model.name == "train_wrapper":
        return "model"
    return "pipeline"


def _finished_metrics(cfg: TrainConfig) -> dict[str, float] | None:
    metrics = cfg.out / "metrics.json"
    config = cfg.out / "config.json"
    if not (metrics.exists() and config.exists()):
        return None
    saved = json.loads(config.read_text())
    if _comparable(saved) != _comparable(cfg.to_json()):
        raise TaskError(cfg.out, "holds a finished run with other settings; choose another --out")
    return json.loads(metrics.read_text())


def _check_resume_config(cfg: TrainConfig) -> None:
    path = cfg.out / "run_config.json"
    if path.exists() and _comparable(json.loads(path.read_text())) != _comparable(cfg.to_json()):
        raise TaskError(cfg.out, "holds a checkpoint of a run with other settings; choose another --out "
                        "or delete the folder")


def _comparable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}
            and k not in RESUME_FREE_FIELDS}


if os.environ.get("PYTHON_TASK_LOG"):
    logging.basicConfig(level=os.environ["PYTHON_TASK_LOG"])
