"""``train``: one experiment point. Shards + a patient-level fold -> a trained model and its metrics.

**Selection never sees the held-out fold.** The network is fitted on the fold's training patients; after every
epoch it predicts the fold's *tuning* patients (set aside by ``split``), and the epoch, early stopping and the
decision threshold are chosen on them only (the epoch with the highest tuning tile AUC, ties to the lower tuning
loss; the threshold by :func:`~python_task.training.metrics.choose_slide_threshold`). Then the held-out
(validation) fold is predicted once, with that model and threshold: the ``val_*`` metrics. A fold without a
tuning set (too few patients) uses the fixed rule: the last of ``epochs`` epochs (no early stopping), threshold
0.5; one warning line says so, and ``metrics.json``'s ``selection_tuned`` is 0 (1 with a tuning set).

Outputs in ``out``: ``metrics.json`` (the contract's keys and more), ``model.keras`` (the chosen epoch's model),
``history.csv`` (per epoch: training loss and accuracy, tuning loss and AUC), ``config.json`` (every resolved
setting, which patients served for what, library versions, the shards' manifest digest), ``predictions.csv``
(held-out tiles: slide, patient, coords, label, probability) and TensorBoard logs.

Every epoch ends with a checkpoint (``checkpoint/``): the same command on the same folder resumes after the last
finished epoch, so a cluster job killed at its wall time loses at most one epoch. A finished folder is not
retrained. Everything is written under temporary names and renamed, so ``metrics.json`` exists only when the
run is complete. Progress is logged (``logging``, when ``verbose``) with a tqdm bar per epoch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from sklearn.utils.class_weight import compute_class_weight
from tqdm import tqdm

from python_task.data.dataset import ShardBatches, TileIndex
from python_task.errors import TaskError
from python_task.fileio import (
    atomic_path,
    folder_lock,
    nan_for_null,
    remove_stale_temporaries,
    write_csv_atomic,
    write_json_atomic,
)
from python_task.runtime import accelerator_present, library_versions
from python_task.training.architectures import ARCHITECTURES, resolve_input_scaling
from python_task.training.calibration import Calibration, fit_platt
from python_task.training.checkpoints import (
    CHECKPOINT_DIR,
    TRAIN_WRAPPER,
    RunState,
    checkpoint_engine,
    has_checkpoint,
    inner_model,
    load_checkpoint,
    load_model,
    save_checkpoint,
    save_model_atomic,
)
from python_task.training.config import TrainConfig, comparable_settings
from python_task.training.inputs import STAIN_FILE, VAL_BATCH_MIN, RunData, prepare_data
from python_task.training.metrics import (
    FIXED_THRESHOLD,
    TileLayout,
    aggregate,
    auc,
    binary_cross_entropy,
    choose_slide_threshold,
    evaluation_metrics,
)
from python_task.training.models import build_model, count_params, unfreeze_backbone
from python_task.training.scoring import predict_index, tile_layout, write_predictions
from python_task.transforms.augment_layers import build_augmenter
from python_task.transforms.augmentations import resolve_engine

log = logging.getLogger(__name__)

ADAMW_WEIGHT_DECAY = 1e-4  # AdamW's decay when weight_decay is 0 (AdamW without decay would be Adam)
SGD_MOMENTUM = 0.9  # Nesterov momentum of sgd
FINE_TUNE_LR_FACTOR = 0.1  # the learning rate is scaled by this when a frozen backbone is unfrozen
HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "tune_loss", "tune_auc", "seconds"]
MIN_INNER_PATIENTS = 3  # cross-fitting needs inner models fitted on at least this many patients (cross_fitting_folds)


# --------------------------------------------------------------------------------------------- entry point

def train(cfg: TrainConfig) -> dict[str, float]:
    """Run (or resume, or recognise as finished) one training point; returns the metrics. Holds the lock of
    ``cfg.out`` throughout (:class:`~python_task.errors.BusyError` when another run holds it)."""
    with folder_lock(cfg.out, "train"):
        for folder in (cfg.out, cfg.out / CHECKPOINT_DIR):  # what a killed run was writing
            remove_stale_temporaries(folder)
        return _train(cfg)


def _train(cfg: TrainConfig) -> dict[str, float]:
    done = _finished_metrics(cfg)
    if done is not None:
        if cfg.verbose:
            log.info("%s: already complete (metrics.json present), nothing to do", cfg.out)
        return done
    t_start = time.perf_counter()
    _check_resume_config(cfg)
    policy = configure_backend(cfg.seed, cfg.mixed_precision)
    ckpt = cfg.out / CHECKPOINT_DIR
    resuming = has_checkpoint(ckpt)
    state = RunState()
    if resuming:
        state, train_model = load_checkpoint(ckpt)
        model = inner_model(train_model)
        engine = checkpoint_engine(cfg, train_model)
        if cfg.verbose:
            log.info("resuming %s after epoch %d", cfg.out, state.epoch)
    else:
        # where augmentation runs, resolved once for the run: nothing runs (model) without augmentation
        engine = resolve_engine(cfg.augment_on, accelerator_present()) if cfg.augmentations else "model"
    data = prepare_data(cfg, state.epoch, engine)
    warn_fixed_rule(cfg, data)
    if not resuming:
        model, train_model = build_training_model(cfg, data.train_index.tile_size, engine)
        compile_model(train_model, cfg, cfg.lr)
        write_json_atomic(cfg.out / "run_config.json", cfg.to_json())
    if cfg.verbose:
        tune = (f"{len(data.tune_index)} tuning tiles {data.tune_index.class_counts()}, "
                if data.tune_index is not None else "no tuning set, ")
        log.info("train %s fold %d: %d training tiles %s, %s%d held-out tiles %s, %s", cfg.arch, cfg.fold,
                 len(data.train_index), data.train_index.class_counts(), tune, len(data.val_index),
                 data.val_index.class_counts(), policy)
    state = run_epochs(cfg, model, train_model, data, state, ckpt)
    metrics = finish_run(cfg, data, state, policy, t_start, engine)
    shutil.rmtree(ckpt, ignore_errors=True)  # model.keras is the best checkpoint; the rest is no longer needed
    if cfg.verbose:
        log.info("val_auc %.4f, slide AUC %.4f, patient AUC %.4f; outputs in %s", metrics["val_auc"],
                 metrics["val_slide_auc"], metrics["val_patient_auc"], cfg.out)
    return metrics


# --------------------------------------------------------------------------------------------- model

def configure_backend(seed: int, mixed_precision: str) -> str:
    """Seed everything and pick the precision policy; returns the policy name."""
    keras.utils.set_random_seed(seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # the backend in use: only imported when it is TensorFlow

        tf.config.experimental.enable_op_determinism()
    use_mixed = mixed_precision == "on" or (mixed_precision == "auto" and accelerator_present())
    policy = "mixed_float16" if use_mixed else "float32"
    keras.mixed_precision.set_global_policy(policy)
    return policy


def build_training_model(cfg: TrainConfig, tile_size: int, engine: str = "model"):
    """The saved model (resize + normalisation + backbone + head) and the training wrapper with augmentation
    (the model itself when there is no augmentation or when it runs in the input pipeline, ``engine``
    ``pipeline``)."""
    size = cfg.input_size or tile_size
    core = build_model(cfg.arch, size, dropout=cfg.dropout, weights=cfg.weights,
                       freeze_backbone=cfg.freeze_backbone, base_filters=cfg.base_filters, seed=cfg.seed,
                       preprocessing=input_scaling(cfg))
    if size != tile_size:
        inputs = keras.Input((tile_size, tile_size, 3), name="tile")
        x = keras.layers.Resizing(size, size, interpolation="bilinear", name="resize")(inputs)
        model = keras.Model(inputs, core(x), name=f"{cfg.arch}_{size}")
    else:
        model = core
    if engine == "pipeline":
        return model, model
    augmenter = build_augmenter(cfg.augmentations, seed=cfg.seed, options=cfg.augment_settings)
    if augmenter is None:
        return model, model
    train_model = keras.Sequential([keras.Input((tile_size, tile_size, 3)), augmenter, model], name=TRAIN_WRAPPER)
    return model, train_model


def input_scaling(cfg: TrainConfig) -> str:
    """The preprocessing mode of the run's model (``input_scaling`` resolved: see :data:`INPUT_SCALINGS`)."""
    pretrained = cfg.weights is not None and bool(ARCHITECTURES[cfg.arch].pretrained_file)
    return resolve_input_scaling(cfg.arch, cfg.input_scaling, pretrained)


def selection_rule(cfg: TrainConfig, data: RunData) -> str:
    """How the epoch is chosen, in words (``config.json``; ``threshold_rule`` says how the threshold is)."""
    if data.tune_index is not None:
        return (f"tuning set ({len(set(data.tune_index.patient_ids))} patients): the epoch with the highest tuning "
                f"tile AUC{f', early stopping after {cfg.patience} epochs without a gain' if cfg.patience else ''}")
    return f"fixed (no tuning set): the last of {cfg.epochs} epochs"


def warn_fixed_rule(cfg: TrainConfig, data: RunData) -> None:
    """One warning line when the fold has no tuning set."""
    if data.tune_index is not None:
        return
    why = ("the split predates tuning sets (format_version 1): run split again to get them"
           if data.fold is not None and data.fold.format_version < 2 else "too few training patients for one")
    folds = cross_fitting_folds(cfg, data)
    threshold = (f"the calibration and threshold from {folds}-fold cross-fitting over the training patients"
                 if folds else f"the threshold {FIXED_THRESHOLD}, uncalibrated")
    log.warning("fold %d has no tuning set (%s): the model is the last of `epochs` %d epochs (no early stopping), "
                "%s; metrics.json records selection_tuned 0", cfg.fold, why, cfg.epochs, threshold)


def make_optimizer(cfg: TrainConfig, lr: float):
    if cfg.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate=lr, weight_decay=cfg.weight_decay or ADAMW_WEIGHT_DECAY)
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=SGD_MOMENTUM, nesterov=True,
                                    weight_decay=cfg.weight_decay or None)
    return keras.optimizers.Adam(learning_rate=lr, weight_decay=cfg.weight_decay or None)


def compile_model(train_model, cfg: TrainConfig, lr: float) -> None:
    train_model.compile(optimizer=make_optimizer(cfg, lr), loss=keras.losses.BinaryCrossentropy(),
                        metrics=[keras.metrics.BinaryAccuracy(name="accuracy")], jit_compile="auto")


# --------------------------------------------------------------------------------------------- epochs

class EpochProgress:
    """A tqdm bar per epoch on stderr, driven by a Keras callback."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def callback(self, epoch: int, epochs: int, steps: int):
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


def run_epochs(cfg: TrainConfig, model, train_model, data: RunData, state: RunState, ckpt: Path) -> RunState:
    progress = EpochProgress(cfg.verbose)
    class_weight = _class_weight(data.train_index.labels) if cfg.class_weights else None
    tb = _tensorboard_writer(cfg)
    while state.epoch < cfg.epochs and not state.stopped_early:
        epoch = state.epoch
        if cfg.unfreeze_at and epoch == cfg.unfreeze_at and cfg.freeze_backbone:
            # fine-tune the backbone; batch-norm layers stay in inference mode (small batches would wreck them)
            unfreeze_backbone(model, keep_batchnorm_frozen=True)
            compile_model(train_model, cfg, cfg.lr * FINE_TUNE_LR_FACTOR)
        t0 = time.perf_counter()
        data.train_batches.set_epoch(epoch)
        try:
            hist = train_model.fit(data.train_batches, epochs=1, verbose=0, class_weight=class_weight,
                                   shuffle=False, callbacks=[progress.callback(epoch, cfg.epochs,
                                                                               len(data.train_batches))])
        except Exception:
            if data.reader_error() is not None:  # a damaged shard: its own error, not the backend's wrapper
                raise data.reader_error() from None
            raise
        loss = float(hist.history["loss"][-1])
        if not math.isfinite(loss):
            raise TaskError(cfg.out, f"training loss became {loss} at epoch {epoch + 1}: lower `lr` "
                            f"(now {cfg.lr}) or check the tiles")
        tune_auc = tune_loss = math.nan
        if data.tune_batches is not None:
            prob = predict_index(model, data.tune_batches)
            tune_auc, tune_loss = auc(data.tune_index.labels, prob), binary_cross_entropy(data.tune_index.labels, prob)
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "loss": loss, "accuracy": float(hist.history.get("accuracy", [np.nan])[-1]),
               "tune_loss": tune_loss, "tune_auc": tune_auc, "seconds": seconds}
        state.history.append(row)
        state.train_seconds += seconds
        improved = _improved(state, tune_auc, tune_loss, tuned=data.tune_batches is not None)
        if improved:
            state.best_auc = tune_auc if math.isfinite(tune_auc) else -math.inf
            state.best_loss = tune_loss if math.isfinite(tune_loss) else math.inf
            state.best_epoch, state.wait = epoch + 1, 0
        else:
            state.wait += 1
            if cfg.patience and state.wait >= cfg.patience:
                state.stopped_early = True
        state.epoch = epoch + 1
        if improved and data.tune_batches is not None:  # the chosen model's tuning predictions, for the threshold
            with atomic_path(ckpt / f"tune_prob_epoch{epoch + 1}.npy") as tmp, open(tmp, "wb") as fh:
                np.save(fh, prob)
        save_checkpoint(ckpt, model, train_model, state, best=improved)
        if tb is not None:
            tb(epoch + 1, row)
        if cfg.verbose:
            log.info("epoch %d/%d: loss %.4f, tune_loss %.4f, tune_auc %.4f (%.1f s)%s", epoch + 1, cfg.epochs, loss,
                     tune_loss, tune_auc, seconds, " *" if improved and data.tune_batches is not None else "")
    return state


def _improved(state: RunState, tune_auc: float, tune_loss: float, *, tuned: bool) -> bool:
    """Whether this epoch becomes the chosen one: without a tuning set always (the last epoch); with one, a higher
    tuning AUC, or the same AUC with a lower tuning loss; the first epoch always."""
    if not tuned or state.best_epoch < 0:
        return True
    if not math.isfinite(tune_auc):
        return False
    if tune_auc > state.best_auc + 1e-12:
        return True
    return abs(tune_auc - state.best_auc) <= 1e-12 and tune_loss < state.best_loss


def _class_weight(labels: np.ndarray) -> dict[int, float]:
    classes = np.unique(labels)
    weights = compute_class_weight("balanced", classes=classes, y=labels)
    return {int(c): float(w) for c, w in zip(classes, weights)}


def _tensorboard_writer(cfg: TrainConfig):
    """Scalar logs for TensorBoard when TensorFlow is importable (any backend); None otherwise."""
    if not cfg.tensorboard:
        return None
    try:
        import tensorflow as tf  # optional: the logs need TensorFlow, whatever the backend
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


# --------------------------------------------------------------------------------------------- outputs

def finish_run(cfg: TrainConfig, data: RunData, state: RunState, policy: str, t_start: float,
               engine: str) -> dict[str, float]:
    best = load_model(cfg.out / CHECKPOINT_DIR / "best.keras", compile=False)
    tuned = data.tune_index is not None
    tune_auc = math.nan
    tune_prob = None
    if tuned:
        saved_prob = cfg.out / CHECKPOINT_DIR / f"tune_prob_epoch{state.best_epoch}.npy"
        tune_prob = np.load(saved_prob) if saved_prob.exists() else predict_index(best, data.tune_batches)
        if len(tune_prob) != len(data.tune_index):
            tune_prob = predict_index(best, data.tune_batches)
        tune_auc = auc(data.tune_index.labels, tune_prob)
    t_cal = time.perf_counter()
    decision = fit_decision(cfg, calibration_tiles(cfg, data, state, engine, tune_prob), tuned)
    calibration, threshold = decision.calibration, decision.threshold
    calibration_seconds = time.perf_counter() - t_cal
    # the held-out fold, once, with the chosen model, calibration, aggregation and threshold
    prob = calibration.apply(predict_index(best, data.val_batches))
    y = data.val_index.labels
    metrics = evaluation_metrics(y, prob, data.val_index.slide_ids, data.val_index.patient_ids, threshold=threshold,
                                 loss=binary_cross_entropy(y, prob), how=cfg.aggregation,
                                 layout=tile_layout(data.val_index))
    metrics.update(train_seconds=float(state.train_seconds), epochs_run=float(state.epoch),
                   best_epoch=float(state.best_epoch), n_train_tiles=float(len(data.train_index)),
                   n_val_tiles=float(len(data.val_index)), n_params=float(count_params(best)),
                   wall_seconds=float(time.perf_counter() - t_start), tune_auc=float(tune_auc),
                   selection_tuned=float(tuned), calibration_seconds=float(calibration_seconds),
                   n_calibration_patients=float(len(decision.patients)),
                   n_tune_tiles=float(len(data.tune_index)) if tuned else 0.0,
                   **group_counts(data))
    if data.normalizer is not None:
        metrics["stain_passthrough_fraction"] = float(data.passthrough_fraction())
    save_model_atomic(best, cfg.out / "model.keras")
    write_predictions(cfg.out / "predictions.csv", data.val_index, prob)
    write_csv_atomic(cfg.out / "history.csv", state.history, fieldnames=HISTORY_COLUMNS)
    fold = data.fold
    config = {**cfg.to_json(), "resolved": {
        "tile_size": data.train_index.tile_size, "label_names": list(data.train_index.label_names),
        "mpp": data.train_index.shards[0].mpp, "precision_policy": policy,
        "input_size": cfg.input_size or data.train_index.tile_size, "input_scaling": input_scaling(cfg),
        "train_patients": sorted(set(data.train_index.patient_ids)),
        "tune_patients": sorted(set(data.tune_index.patient_ids)) if tuned else [],
        "val_patients": sorted(set(data.val_index.patient_ids)),
        "test_patients": list(fold.test_patients) if fold is not None else [],
        "train_slides": sorted(set(data.train_index.slide_ids)),
        "tune_slides": sorted(set(data.tune_index.slide_ids)) if tuned else [],
        "val_slides": sorted(set(data.val_index.slide_ids)),
        "train_class_counts": data.train_index.class_counts(), "val_class_counts": data.val_index.class_counts(),
        "tune_class_counts": data.tune_index.class_counts() if tuned else {},
        "selection": selection_rule(cfg, data), "best_epoch": state.best_epoch,
        "manifest_digest": data.manifest_digest, "threshold": metrics["threshold"],
        "aggregation": cfg.aggregation, "calibration": calibration.to_json(),
        "calibration_patients": decision.patients,
        "threshold_rule": threshold_rule(cfg, decision, tuned, cross_fitting_folds(cfg, data)),
        "stain_file": STAIN_FILE if data.normalizer is not None else None,
        "stopped_early": state.stopped_early,
        "augment_on": engine if cfg.augmentations else None}, "versions": library_versions()}
    write_json_atomic(cfg.out / "config.json", config)
    write_json_atomic(cfg.out / "metrics.json", metrics)  # last: its presence means the run is complete
    return metrics


# --------------------------------------------------------------------------------------------- calibration

@dataclass(frozen=True)
class HeldOutTiles:
    """One model's predictions for tiles of patients it did not fit on: the tuning patients by the run's model, or
    an inner fold's patients by the inner model fitted without them."""

    labels: np.ndarray
    prob: np.ndarray
    slides: np.ndarray
    patients: np.ndarray
    layout: TileLayout

    @classmethod
    def of(cls, index: TileIndex, prob: np.ndarray) -> HeldOutTiles:
        return cls(index.labels, np.asarray(prob, np.float64), index.slide_ids, index.patient_ids, tile_layout(index))

    @classmethod
    def join(cls, parts: list[HeldOutTiles]) -> HeldOutTiles:
        return cls(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("labels", "prob", "slides", "patients")),
                   TileLayout(*(np.concatenate([getattr(p.layout, k) for p in parts])
                                for k in ("coords", "extent", "slides"))))

    def calibrated(self, calibration: Calibration) -> HeldOutTiles:
        return dataclasses.replace(self, prob=calibration.apply(self.prob))


@dataclass(frozen=True)
class Decision:
    """How the run turns tile probabilities into a call: the calibration of its model's probabilities, the slide
    threshold on their aggregate, and the held-out tiles behind both (None: the fixed rule)."""

    calibration: Calibration
    threshold: float
    tiles: HeldOutTiles | None  # every model's calibrated predictions pooled: what the threshold was chosen on

    @property
    def patients(self) -> list[str]:
        """The patients behind the threshold, sorted."""
        return sorted(set(self.tiles.patients.tolist())) if self.tiles is not None else []


def calibration_tiles(cfg: TrainConfig, data: RunData, state: RunState, engine: str,
                      tune_prob: np.ndarray | None) -> list[HeldOutTiles]:
    """The tuning patients as the run's model predicts them (first, when there is a tuning set), then
    (``calibration_folds`` >= 2) every training patient as predicted by an inner model fitted without it."""
    parts = [HeldOutTiles.of(data.tune_index, tune_prob)] if data.tune_index is not None and tune_prob is not None \
        else []
    if cross_fitting_folds(cfg, data):
        parts += [HeldOutTiles.of(index, prob) for index, prob in cross_fitted_predictions(cfg, data, state, engine)]
    return parts


def cross_fitting_folds(cfg: TrainConfig, data: RunData) -> int:
    """``calibration_folds``, or 0 (no cross-fitting) when an inner model would fit on fewer than
    ``MIN_INNER_PATIENTS`` patients: measured on 8-patient cohorts, where 2 folds leave 4 training patients and
    inner models fitted on 2 of them, their calibration and threshold called fewer slides right than the
    uncalibrated 0.5 (worst point 0.333 against 0.833 for the demo's ``unet_encoder``)."""
    k = cfg.calibration_folds
    n = len(set(data.train_index.patient_ids))
    return k if k and n - math.ceil(n / k) >= MIN_INNER_PATIENTS else 0


def fit_decision(cfg: TrainConfig, parts: list[HeldOutTiles], tuned: bool) -> Decision:
    """Each model's probabilities calibrated by a Platt scaling fitted on its own held-out tiles (models differ in
    scale: an inner model fitted on fewer patients is less sure of itself), so that all of them speak one scale;
    the slide threshold chosen on every model's calibrated slides pooled (:func:`choose_slide_threshold` with the
    run's aggregation); the run's model keeps the calibration fitted on its tuning patients, or without a tuning
    set the one fitted on the inner models' tiles pooled. The identity and 0.5 without held-out tiles."""
    if not parts:
        return Decision(Calibration(), FIXED_THRESHOLD, None)

    def platt(p: HeldOutTiles) -> Calibration:
        if cfg.calibration == "platt":
            return fit_platt(p.labels, p.prob, p.patients)
        return Calibration(n_tiles=len(p.labels), n_patients=len(set(p.patients.tolist())))

    pooled = HeldOutTiles.join([p.calibrated(platt(p)) for p in parts])
    threshold = choose_slide_threshold(pooled.labels, pooled.prob, pooled.slides, cfg.aggregation, pooled.layout)
    own = platt(parts[0]) if tuned else platt(HeldOutTiles.join(parts))
    return Decision(own, threshold, pooled)


def threshold_rule(cfg: TrainConfig, decision: Decision, tuned: bool, folds: int) -> str:
    tiles = decision.tiles
    if tiles is None:
        why = "" if not cfg.calibration_folds else f", inner models would fit on fewer than {MIN_INNER_PATIENTS} patients"
        return f"fixed at {FIXED_THRESHOLD}, uncalibrated probabilities (no tuning set, no cross-fitting{why})"
    sources = ("the tuning patients by this model" if tuned else "") + (
        f"{' and ' if tuned else ''}the training patients by {folds} inner cross-fitted models" if folds else "")
    return (f"chosen on {len(set(tiles.slides.tolist()))} slides of {len(decision.patients)} patients, "
            f"each predicted by a model that did not fit on it ({sources}); each model's tile probabilities "
            f"{'Platt-scaled on its own held-out tiles' if cfg.calibration == 'platt' else 'uncalibrated'}; slides "
            f"scored by {cfg.aggregation}; the cut of highest Youden's J half-way between neighbouring slide scores "
            "(the one nearest 0.5 among equals)")


def inner_folds(index: TileIndex, k: int, seed: int) -> list[np.ndarray]:
    """The training patients in ``k`` folds, each diagnosis dealt round-robin in a seeded order (so every inner
    training set keeps both classes where it can); tile positions per fold, empty folds left out."""
    ids, inverse = np.unique(index.patient_ids, return_inverse=True)
    inverse = inverse.reshape(-1)
    diagnosis = np.zeros(len(ids), np.int64)
    np.maximum.at(diagnosis, inverse, index.labels)
    rng = np.random.default_rng([seed, 0xC0F])
    fold_of = np.zeros(len(ids), np.int64)
    start = 0
    for d in (1, 0):
        members = rng.permutation(np.flatnonzero(diagnosis == d))
        fold_of[members] = (np.arange(len(members)) + start) % k
        start += len(members)
    folds = [np.flatnonzero(fold_of[inverse] == j) for j in range(k)]
    return [f for f in folds if len(f)]


def cross_fitted_predictions(cfg: TrainConfig, data: RunData, state: RunState,
                             engine: str) -> list[tuple[TileIndex, np.ndarray]]:
    """Out-of-fold predictions of every training patient: ``calibration_folds`` inner models, each fitted like the
    run (its settings, ``best_epoch`` epochs, no selection) on the other training patients. Each fold's
    predictions are saved in the checkpoint folder, so a resumed run does not fit it again. An inner training set
    of one class is skipped (its patients are left out of the calibration)."""
    index = data.train_index
    out = []
    for j, positions in enumerate(inner_folds(index, cfg.calibration_folds, cfg.seed)):
        held, rest = index.take(positions), index.take(np.setdiff1d(np.arange(len(index)), positions))
        if len(np.unique(rest.labels)) < 2:
            log.warning("calibration fold %d: its training patients are of one class; its %d patients are left out "
                        "of the calibration", j + 1, len(set(held.patient_ids)))
            continue
        saved = cfg.out / CHECKPOINT_DIR / f"crossfit_{j}.npy"
        if saved.exists() and len(prob := np.load(saved)) == len(held):
            out.append((held, prob))
            continue
        if cfg.verbose:
            log.info("calibration fold %d/%d: fitting on %d patients, predicting %d", j + 1, cfg.calibration_folds,
                     len(set(rest.patient_ids)), len(set(held.patient_ids)))
        model = fit_inner_model(cfg, data, rest, max(1, state.best_epoch), cfg.seed + 1000 * (j + 1), engine)
        prob = predict_index(model, ShardBatches(held, max(cfg.batch_size, VAL_BATCH_MIN), shuffle=False,
                                                 seed=cfg.seed, transform=data.val_batches.transform,
                                                 workers=cfg.workers, dtype=None))
        with atomic_path(saved) as tmp, open(tmp, "wb") as fh:
            np.save(fh, prob)
        out.append((held, prob))
    return out


def fit_inner_model(cfg: TrainConfig, data: RunData, index: TileIndex, epochs: int, seed: int, engine: str):
    """A model fitted on ``index`` as the run fits its own (architecture, optimiser, augmentation, stain,
    balancing, class weights, unfreezing), for ``epochs`` epochs from ``seed``."""
    keras.utils.set_random_seed(seed)
    model, train_model = build_training_model(cfg, index.tile_size, engine)
    compile_model(train_model, cfg, cfg.lr)
    batches = ShardBatches(index, cfg.batch_size, shuffle=True, balance=cfg.balance, seed=seed,
                           transform=data.train_batches.transform, workers=cfg.workers, dtype=None)
    class_weight = _class_weight(index.labels) if cfg.class_weights else None
    for epoch in range(epochs):
        if cfg.unfreeze_at and epoch == cfg.unfreeze_at and cfg.freeze_backbone:
            unfreeze_backbone(model, keep_batchnorm_frozen=True)
            compile_model(train_model, cfg, cfg.lr * FINE_TUNE_LR_FACTOR)
        batches.set_epoch(epoch)
        try:
            train_model.fit(batches, epochs=1, verbose=0, class_weight=class_weight, shuffle=False)
        except Exception:
            if batches.error is not None:
                raise batches.error from None
            raise
    return model


def group_counts(data: RunData) -> dict[str, float]:
    """How many patients (and slides) of each class lie behind the held-out and tuning figures: ``n_val_patients``,
    ``n_val_patients_pos`` / ``_neg`` (a patient is positive when any of its tiles is malignant, as for
    ``val_patient_auc``), the same for slides, and ``n_tune_patients``."""
    out: dict[str, float] = {}
    for side, index in (("val", data.val_index), ("tune", data.tune_index)):
        for level, ids in (("patients", None if index is None else index.patient_ids),
                           ("slides", None if index is None else index.slide_ids)):
            labels = np.zeros(0, np.int64) if index is None else aggregate(np.zeros(len(index)), index.labels, ids)[2]
            out[f"n_{side}_{level}"] = float(len(labels))
            out[f"n_{side}_{level}_pos"] = float(labels.sum())
            out[f"n_{side}_{level}_neg"] = float(len(labels) - labels.sum())
    return out


def _finished_metrics(cfg: TrainConfig) -> dict[str, float] | None:
    metrics = cfg.out / "metrics.json"
    config = cfg.out / "config.json"
    if not (metrics.exists() and config.exists()):
        return None
    saved = json.loads(config.read_text(encoding="utf-8"))
    if comparable_settings(saved) != cfg.comparable():
        raise TaskError(cfg.out, "holds a finished run with other settings; choose another `out`")
    return nan_for_null(json.loads(metrics.read_text(encoding="utf-8")))


def _check_resume_config(cfg: TrainConfig) -> None:
    path = cfg.out / "run_config.json"
    if path.exists() and comparable_settings(json.loads(path.read_text(encoding="utf-8"))) != cfg.comparable():
        raise TaskError(cfg.out, "holds a checkpoint of a run with other settings; choose another `out` "
                        "or delete the folder")
