"""``evaluate``: a trained model scored once on the split's test patients, the patients no fold ever touched.

``split --test-fraction F`` holds a stratified set of patients out of every fold (``test_patients`` in
``splits.json``); cross-validation and any sweep never see them. ``evaluate`` predicts their tiles with a finished
``train`` run's model (its stain normalisation and its decision threshold, both from the run's ``config.json``)
and writes, in ``out``:

* ``test_metrics.json``: the same metrics as ``train``'s ``metrics.json``, named ``test_*`` instead of ``val_*``
  (tile level, ``test_slide_auc``, ``test_patient_auc``, ``threshold``), the patients and slides behind them per
  class (``n_test_patients_pos`` ...), and 95 % percentile-bootstrap intervals over patients of the tile and
  patient AUC (``test_auc_ci_low`` ...), which stay inside [0, 1];
* ``test_predictions.csv``: one row per test tile, as ``predictions.csv``;
* ``evaluation.json``: the model, its run, the split and the test patients.

It refuses a split whose test patients are also in one of its folds, or among the run's validation patients; a
model trained at another µm/px or tile size than the test shards hold (``resolved`` ``mpp`` and ``tile_size``
of its ``config.json``); a model whose run fitted or tuned on a test patient (its ``config.json`` lists which patients served
for what; a run from before tuning sets chose its epoch on its validation patients, so those count too), a split
without a test set, and a split made from other shards. An ``out`` that already holds the evaluation of this
model returns it without predicting again; one that holds another model's is refused. One run writes to
``out`` at a time (its lock), as for ``train`` and ``predict``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from python_task.data.dataset import ShardBatches, build_index
from python_task.data.splits import check_shard_set, read_splits
from python_task.errors import TaskError
from python_task.fileio import (
    folder_lock,
    nan_for_null,
    remove_stale_temporaries,
    write_json_atomic,
)
from python_task.inference.predict import load_bundle
from python_task.shards.manifest import read_manifest
from python_task.training.metrics import aggregate, bootstrap_interval, evaluation_metrics
from python_task.training.scoring import predict_index, tile_layout, write_predictions
from python_task.transforms.stain import StainTransform

METRICS_NAME = "test_metrics.json"
PREDICTIONS_NAME = "test_predictions.csv"
RECORD_NAME = "evaluation.json"


def used_patients(config: dict, slides: dict[str, str]) -> dict[str, set[str]]:
    """The patients a run fitted on (``training``) and chose its epoch and threshold on (``tuning``), from its
    ``config.json``; a run from before tuning sets (no ``tune_patients``) tuned on its validation patients."""
    resolved = config.get("resolved", {})

    def patients(key: str) -> set[str]:
        if f"{key}_patients" in resolved:
            return set(resolved[f"{key}_patients"])
        return {slides.get(s, s) for s in resolved.get(f"{key}_slides", [])}

    used = {"training": patients("train"), "tuning": patients("tune")}
    if "tune_patients" not in resolved:
        used["tuning"] |= patients("val")
    return used


def check_test_set_apart(data: dict, config: dict, splits: Path) -> None:
    """Refuse a split whose test patients (or test slides) are also in a fold, or among the patients the run
    validated on: scores on them would not be held-out figures."""
    test = set(data.get("test_patients", []))
    test_slides = set(data.get("test_slides", []))
    for i, fold in enumerate(data["folds"]):
        for key in ("train", "tune", "val"):
            patients = (test & set(fold.get(f"{key}_patients", []))) | {
                data["slides"].get(s, s) for s in test_slides & set(fold.get(f"{key}_slides", []))}
            if patients:
                raise TaskError(splits, f"test patient {sorted(patients)[0]} is also in fold {i}'s {key}_patients "
                                "(or slides): a test patient must be in no fold; make the split again")
    resolved = config.get("resolved", {})
    validated = set(resolved.get("val_patients", [])) | {data["slides"].get(s, s)
                                                          for s in resolved.get("val_slides", [])}
    leaked = sorted(validated & test)
    if leaked:
        raise TaskError(splits, f"test patient {leaked[0]} was a validation patient of the model's run: this split "
                        "is not the one the model was trained on; evaluate with the run's split")


def check_scale(resolved: dict, model_path: Path, rows: list[dict], test_slides: list[str], shards: Path) -> None:
    """Refuse test shards cut at another µm/px or tile size than the model was trained on (its config.json's
    ``resolved`` ``mpp`` and ``tile_size``; the manifest's ``mpp`` and ``tile_size`` columns)."""
    try:
        want = (int(resolved["tile_size"]), float(resolved["mpp"]))
    except (KeyError, TypeError, ValueError):
        return  # a run that recorded neither: the tile size is checked on the tiles, in _score
    wanted = set(test_slides)
    for row in rows:
        if row["slide_id"] not in wanted or not row.get("tile_size") or not row.get("mpp"):
            continue
        try:
            have = (int(row["tile_size"]), float(row["mpp"]))
        except ValueError:
            continue
        if have[0] != want[0] or abs(have[1] - want[1]) > 1e-6 * max(1.0, want[1]):
            raise TaskError(shards, f"the test shards ({row['shard']} ...) hold {have[0]}-px tiles at {have[1]:g} "
                            f"µm/px, the model {model_path} was trained on {want[0]}-px tiles at {want[1]:g} µm/px: "
                            "extract the test slides with the model's `tile_size` and `mpp`")


def evaluate_model(model_path: str | os.PathLike[str], shards: str | os.PathLike[str],
                   splits: str | os.PathLike[str], out: str | os.PathLike[str], *, batch_size: int = 64,
                   workers: int = 2) -> dict[str, float]:
    """Score ``model_path`` on the test patients of ``splits``; returns the test metrics (see the module doc)."""
    model_path, shards, splits, out = Path(model_path), Path(shards), Path(splits), Path(out)
    if model_path.is_dir():
        model_path = model_path / "model.keras"
    if not model_path.is_file():
        raise TaskError(model_path, "not found: give the model.keras that train writes (or its run folder)")
    config_path = model_path.parent / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TaskError(config_path, "missing: evaluate needs the config.json that train writes beside the model") \
            from None
    except (OSError, ValueError) as exc:
        raise TaskError(config_path, f"not a train config.json ({exc})") from None
    data = read_splits(splits)
    test_patients = sorted(data.get("test_patients", []))
    test_slides = sorted(data.get("test_slides", []))
    if not test_patients:
        raise TaskError(splits, "has no test patients: make the split with `test_fraction` (split --test-fraction "
                        "0.2) and train on it")
    rows = read_manifest(shards)
    check_shard_set(data, rows, splits, shards)
    check_test_set_apart(data, config, splits)
    check_scale(config.get("resolved", {}), model_path, rows, test_slides, shards)
    used = used_patients(config, data["slides"])
    for role, ids in used.items():
        leaked = sorted(ids & set(test_patients))
        if leaked:
            raise TaskError(model_path, f"this model's run used test patient{'s' * (len(leaked) > 1)} "
                            f"{', '.join(leaked)} for {role}: its test figures would not be honest; evaluate a "
                            "model trained on a fold of this split")

    model_digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    record = {"model": str(model_path.resolve()), "model_sha256": model_digest, "splits": str(splits.resolve()),
              "manifest_digest": data.get("manifest_digest"), "test_patients": test_patients,
              "test_slides": test_slides, "run_config": config}
    with folder_lock(out, "evaluate"):
        remove_stale_temporaries(out)
        done = _finished(out, record)
        return done if done is not None else _score(model_path, shards, test_slides, out, record, batch_size,
                                                    workers)


def _score(model_path: Path, shards: Path, test_slides: list[str], out: Path, record: dict, batch_size: int,
           workers: int) -> dict[str, float]:
    """Predict the test tiles and write the three outputs (the metrics last)."""
    bundle = load_bundle(model_path)
    index = build_index(shards, test_slides)
    if tuple(index.label_names) != tuple(bundle.label_names):
        raise TaskError(model_path, f"trained on classes {list(bundle.label_names)}, the test shards hold "
                        f"{list(index.label_names)}")
    if index.tile_size != bundle.tile_size:
        raise TaskError(model_path, f"trained on {bundle.tile_size}-px tiles, the test shards hold "
                        f"{index.tile_size}-px tiles")
    transform = StainTransform(bundle.normalizer) if bundle.normalizer is not None else None
    batches = ShardBatches(index, batch_size, shuffle=False, seed=0, transform=transform, workers=workers, dtype=None)
    prob = bundle.calibration.apply(predict_index(bundle.model, batches))
    y = index.labels
    metrics = {k.replace("val_", "test_", 1): v for k, v in evaluation_metrics(
        y, prob, index.slide_ids, index.patient_ids, threshold=bundle.threshold, how=bundle.aggregation,
        layout=tile_layout(index)).items()}
    for level, ids in (("patients", index.patient_ids), ("slides", index.slide_ids)):
        labels = aggregate(prob, y, ids)[2]
        metrics.update({f"n_test_{level}": float(len(labels)), f"n_test_{level}_pos": float(labels.sum()),
                        f"n_test_{level}_neg": float(len(labels) - labels.sum())})
    for key, statistic in (("test_auc", "tile_auc"), ("test_patient_auc", "patient_auc")):
        low, high = bootstrap_interval(y, prob, index.patient_ids, statistic)
        metrics.update({f"{key}_ci_low": low, f"{key}_ci_high": high})
    metrics["n_test_tiles"] = float(len(index))
    write_predictions(out / PREDICTIONS_NAME, index, prob)
    write_json_atomic(out / RECORD_NAME, record)
    write_json_atomic(out / METRICS_NAME, metrics)  # last: its presence means the evaluation is complete
    return metrics


def _finished(out: Path, record: dict) -> dict[str, float] | None:
    metrics, saved = out / METRICS_NAME, out / RECORD_NAME
    if not (metrics.exists() and saved.exists()):
        return None
    previous = json.loads(saved.read_text(encoding="utf-8"))
    if (previous.get("model_sha256"), previous.get("test_patients")) != (record["model_sha256"],
                                                                          record["test_patients"]):
        raise TaskError(out, "holds the evaluation of another model or test set; choose another `out`")
    return nan_for_null(json.loads(metrics.read_text(encoding="utf-8")))
