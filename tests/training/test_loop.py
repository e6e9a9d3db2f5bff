"""One training point: outputs per contract, learning, repeatability, resume, clear failures."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from python_task.data.splits import make_splits, write_splits
from python_task.errors import TaskError
from python_task.fileio import nan_for_null
from python_task.training.config import TrainConfig
from python_task.training.loop import MIN_INNER_PATIENTS, train
from python_task.training.metrics import CONTRACT_METRICS, FIXED_THRESHOLD


def _cfg(data, out, **kw) -> TrainConfig:
    shards, splits = data
    base = dict(shards=shards, splits=splits, fold=0, arch="simple_cnn", out=out, epochs=1, batch_size=16,
                input_size=64, lr=2e-3, workers=2, verbose=False, tensorboard=False, max_train_tiles=96,
                max_val_tiles=96, patience=0)
    base.update(kw)
    return TrainConfig(**base)


def test_outputs_follow_the_contract(learn_data, tmp_path):
    metrics = train(_cfg(learn_data, tmp_path / "run"))
    out = tmp_path / "run"
    for name in ("metrics.json", "model.keras", "history.csv", "config.json", "predictions.csv"):
        assert (out / name).exists(), name
    saved = nan_for_null(json.loads((out / "metrics.json").read_text()))
    assert set(CONTRACT_METRICS) <= set(saved) and set(saved) == set(metrics)
    assert all(saved[k] == metrics[k] or (math.isnan(saved[k]) and math.isnan(metrics[k])) for k in saved)
    assert all(isinstance(v, float) for v in saved.values())
    assert saved["n_val_tiles"] == 96 and saved["n_train_tiles"] == 96 and saved["epochs_run"] == 1
    assert saved["n_val_patients"] == saved["n_val_patients_pos"] + saved["n_val_patients_neg"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["arch"] == "simple_cnn" and config["resolved"]["tile_size"] == 64
    assert config["resolved"]["input_scaling"] == "grey"
    assert {"keras", "numpy", "backend"} <= set(config["versions"]) and config["resolved"]["manifest_digest"]
    with open(out / "predictions.csv", newline="") as fh:
        preds = list(csv.DictReader(fh))
    assert len(preds) == 96 and {"slide_id", "patient_id", "x", "y", "label", "prob"} <= set(preds[0])
    assert not (out / "checkpoint").exists()


def test_simple_cnn_learns_the_synthetic_classes(learn_data, tmp_path):
    metrics = train(_cfg(learn_data, tmp_path / "learn", epochs=4, max_train_tiles=0, max_val_tiles=0,
                         lr=5e-4, batch_size=32, augment="flip,rot90"))
    assert metrics["val_auc"] > 0.8, metrics  # the held-out fold, predicted once with the last epoch's model
    history = list(csv.DictReader(open(tmp_path / "learn" / "history.csv")))
    assert [int(r["epoch"]) for r in history] == [1, 2, 3, 4] and "val_auc" not in history[0]


def test_fixed_seed_gives_the_same_metrics_twice(learn_data, tmp_path):
    a = train(_cfg(learn_data, tmp_path / "a", epochs=2))
    b = train(_cfg(learn_data, tmp_path / "b", epochs=2))
    for key in CONTRACT_METRICS:
        if key != "train_seconds":
            assert a[key] == b[key] or (math.isnan(a[key]) and math.isnan(b[key])), key


def test_killed_run_resumes_after_its_last_epoch(learn_data, tmp_path, monkeypatch):
    import python_task.training.loop as train_mod

    calls = {"n": 0}
    real_save = train_mod.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            raise SystemExit("killed at wall time")

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    # dropout and augmentation layers in the model: their seed generators must continue, not restart
    cfg = _cfg(learn_data, tmp_path / "run", epochs=3, augment="flip,rot90,elastic", augment_on="model")
    with pytest.raises(SystemExit):
        train(cfg)
    assert not (tmp_path / "run" / "metrics.json").exists()
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1
    metrics = train(cfg)
    assert calls["n"] == 3  # epochs 2 and 3 only: epoch 1 was not run again
    assert metrics["epochs_run"] == 3
    assert train(cfg) == metrics  # finished: nothing is retrained

    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    uninterrupted = dataclasses.replace(cfg, out=tmp_path / "whole")
    train(uninterrupted)

    def history(folder):
        with open(folder / "history.csv") as fh:
            return [(int(r["epoch"]), float(r["loss"]), float(r["accuracy"])) for r in csv.DictReader(fh)]

    assert [e for e, _, _ in history(tmp_path / "run")] == [1, 2, 3]
    assert history(tmp_path / "run") == history(tmp_path / "whole")  # bit for bit: losses equal, not close
    held_out = [(tmp_path / run / "predictions.csv").read_text() for run in ("run", "whole")]
    assert held_out[0] == held_out[1]  # the same final model


def test_nan_loss_stops_with_a_clear_error(learn_data, tmp_path, monkeypatch):
    from python_task.data.dataset import ShardBatches

    real = ShardBatches.__getitem__

    def poisoned(self, i):
        x, y = real(self, i)
        return x * np.nan, y

    monkeypatch.setattr(ShardBatches, "__getitem__", poisoned)
    with pytest.raises(TaskError, match="nan"):
        train(_cfg(learn_data, tmp_path / "nan"))
    assert not (tmp_path / "nan" / "metrics.json").exists()


def test_other_settings_in_a_finished_folder_are_refused(learn_data, tmp_path):
    train(_cfg(learn_data, tmp_path / "run"))
    with pytest.raises(TaskError, match="other settings"):
        train(_cfg(learn_data, tmp_path / "run", lr=0.1))


def _cli(*args) -> subprocess.CompletedProcess:
    # without the test session's TF_CPP_MIN_LOG_LEVEL: the command line must keep TensorFlow's C++ log quiet itself
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-m", "python_task", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def test_cli_errors_are_one_line(learn_data, tmp_path):
    shards, splits = learn_data
    base = ["train", "--shards", shards, "--splits", splits, "--out", tmp_path / "o"]
    for extra, needle in ((["--fold", 0, "--arch", "vgg99"], "vgg99"), (["--fold", 5, "--arch", "simple_cnn"], "fold"),
                          (["--fold", 0, "--arch", "simple_cnn", "--weights", tmp_path / "none.h5"], "none.h5"),
                          (["--fold", 0, "--arch", "simple_cnn", "--lr", "-1"], "--lr")):
        proc = _cli(*base, *extra)
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert proc.returncode == 1 and len(errors) == 1 and needle in errors[0], proc.stderr
        assert proc.stderr.strip().splitlines() == errors  # no absl, cpu_feature_guard or other library lines
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_leaking_split_is_refused(learn_data, tmp_path):
    shards, splits = learn_data
    data = json.loads(splits.read_text())
    fold = data["folds"][0]
    fold["train_patients"].append(fold["val_patients"][0])
    leaky = tmp_path / "leaky.json"
    leaky.write_text(json.dumps(data))
    with pytest.raises(TaskError, match="leak"):
        train(_cfg((shards, leaky), tmp_path / "o"))


def test_checkpoint_state_is_strict_json_and_reads_back(tmp_path):
    """state.json holds -inf (no best AUC yet) and NaN metrics: written null, read back as they were."""
    import dataclasses

    from python_task.fileio import write_json_atomic
    from python_task.training.checkpoints import RunState, read_state

    state = RunState(epoch=1, history=[{"loss": 0.5, "val_auc": math.nan}])
    write_json_atomic(tmp_path / "state.json", dataclasses.asdict(state))
    text = (tmp_path / "state.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = read_state(tmp_path)
    assert back.best_auc == -math.inf and back.epoch == 1 and back.history[0]["loss"] == 0.5
    assert math.isnan(back.history[0]["val_auc"])


def test_a_damaged_tile_met_during_training_is_named(learn_data, tmp_path):
    """The reader threads' ShardError reaches the user as itself, not as the backend's wrapper (UnknownError)."""
    import shutil

    import h5py

    from python_task.data.splits import load_fold
    from python_task.errors import ShardError

    shards, splits = learn_data
    copy = shutil.copytree(shards, tmp_path / "shards")
    victim = copy / f"{load_fold(splits, shards, 0).train_slides[0]}.h5"
    with h5py.File(victim, "r+") as f:  # every tile's bytes changed, their recorded CRC-32 not
        images = f["images"]
        for i in range(images.shape[0]):
            blob = images[i].copy()
            blob[len(blob) // 2] ^= 0x01
            images[i] = blob
    with pytest.raises(ShardError, match="dataset images, tile .*: fails its CRC-32") as err:
        train(_cfg((copy, splits), tmp_path / "run"))
    assert err.value.path == str(victim)
    assert not (tmp_path / "run" / "metrics.json").exists()


# ------------------------------------------------------------------------------- selection off the held-out fold

@pytest.fixture(scope="module")
def tuned_split(learn_data, tmp_path_factory):
    """learn_data's shards in 3 folds: 6-7 training patients a fold, so each fold has a tuning set."""
    shards, _ = learn_data
    path = tmp_path_factory.mktemp("tuned") / "splits.json"
    splits = make_splits(shards, 3, seed=0)
    assert all(f["tune_patients"] for f in splits["folds"])
    write_splits(splits, path)
    return shards, path


def _flip_held_out_labels(monkeypatch):
    """Every held-out tile's label inverted as train reads it; nothing else changes."""
    import dataclasses

    import python_task.training.loop as loop

    real = loop.prepare_data

    def flipped(*args, **kwargs):
        data = real(*args, **kwargs)
        data.val_index = dataclasses.replace(data.val_index, labels=1 - data.val_index.labels)
        return data

    monkeypatch.setattr(loop, "prepare_data", flipped)


def test_epoch_and_threshold_do_not_change_when_only_held_out_labels_change(tuned_split, tmp_path, monkeypatch):
    kw = dict(epochs=3, patience=1, max_train_tiles=160, max_val_tiles=160, calibration_folds=4)  # inner fits on 3+
    a = train(_cfg(tuned_split, tmp_path / "a", **kw))
    _flip_held_out_labels(monkeypatch)
    b = train(_cfg(tuned_split, tmp_path / "b", **kw))
    assert a["selection_tuned"] == b["selection_tuned"] == 1.0
    for key in ("best_epoch", "epochs_run", "threshold", "tune_auc"):
        assert a[key] == b[key], key
    assert b["val_auc"] == pytest.approx(1 - a["val_auc"], abs=1e-9)  # the held-out figures do see the labels
    history = [list(csv.DictReader(open(tmp_path / run / "history.csv"))) for run in ("a", "b")]
    assert [(r["tune_loss"], r["tune_auc"]) for r in history[0]] == [(r["tune_loss"], r["tune_auc"])
                                                                     for r in history[1]]
    preds = [[r["prob"] for r in csv.DictReader(open(tmp_path / run / "predictions.csv"))] for run in ("a", "b")]
    assert preds[0] == preds[1]  # the same chosen model and calibration
    resolved = [json.loads((tmp_path / run / "config.json").read_text())["resolved"] for run in ("a", "b")]
    assert resolved[0]["calibration"] == resolved[1]["calibration"]
    assert resolved[0]["calibration"]["n_patients"] == len(resolved[0]["tune_patients"])  # the model's own map
    # the threshold: the tuning patients and the cross-fitted training patients, never a held-out one
    assert resolved[0]["calibration_patients"] == sorted(resolved[0]["train_patients"] + resolved[0]["tune_patients"])
    assert resolved[0]["calibration_patients"] == resolved[1]["calibration_patients"]
    assert not set(resolved[0]["calibration_patients"]) & set(resolved[0]["val_patients"])


def test_config_lists_the_patients_of_each_role(tuned_split, tmp_path):
    metrics = train(_cfg(tuned_split, tmp_path / "run", max_train_tiles=0, max_val_tiles=0))
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    fold = json.loads(tuned_split[1].read_text())["folds"][0]
    assert resolved["train_patients"] == fold["train_patients"] and resolved["tune_patients"] == fold["tune_patients"]
    assert resolved["val_patients"] == fold["val_patients"] and resolved["test_patients"] == []
    assert not set(resolved["tune_patients"]) & (set(resolved["train_patients"]) | set(resolved["val_patients"]))
    assert resolved["selection"].startswith("tuning set") and resolved["threshold"] == metrics["threshold"]
    assert metrics["n_tune_patients"] == len(fold["tune_patients"]) and math.isfinite(metrics["tune_auc"])
    assert metrics["n_val_patients"] == len(fold["val_patients"])


def test_without_a_tuning_set_the_fixed_rule_applies_and_is_recorded(learn_data, tmp_path, caplog):
    splits = json.loads(learn_data[1].read_text())
    assert not splits["folds"][0]["tune_patients"]  # 10 patients in 2 folds: too few to spare a tuning set
    with caplog.at_level("WARNING", logger="python_task"):
        metrics = train(_cfg(learn_data, tmp_path / "run", epochs=2, patience=1, calibration_folds=0))
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(lines) == 1 and "no tuning set" in lines[0] and "threshold 0.5" in lines[0], lines
    assert metrics["selection_tuned"] == 0.0 and metrics["best_epoch"] == metrics["epochs_run"] == 2
    assert metrics["threshold"] == FIXED_THRESHOLD and math.isnan(metrics["tune_auc"])
    assert metrics["n_tune_patients"] == 0.0 and metrics["n_calibration_patients"] == 0.0
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    assert resolved["calibration"]["method"] == "none" and resolved["calibration_patients"] == []


def test_without_a_tuning_set_cross_fitting_calibrates_on_every_training_patient(learn_data, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="python_task"):  # 5 training patients: inner models fit on 3
        metrics = train(_cfg(learn_data, tmp_path / "run", epochs=1, max_train_tiles=0, calibration_folds=3))
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(lines) == 1 and "3-fold cross-fitting" in lines[0], lines
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    assert resolved["calibration_patients"] == resolved["train_patients"]
    assert metrics["n_calibration_patients"] == len(resolved["train_patients"])
    assert not set(resolved["calibration_patients"]) & set(resolved["val_patients"])
    assert resolved["threshold"] == metrics["threshold"] and "inner cross-fitted models" in resolved["threshold_rule"]


def test_no_cross_fitting_when_inner_models_would_fit_on_too_few_patients(learn_data, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="python_task"):  # 5 training patients in 2 inner folds: 2 to fit on
        metrics = train(_cfg(learn_data, tmp_path / "run", epochs=1, max_train_tiles=0, calibration_folds=2))
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(lines) == 1 and "threshold 0.5" in lines[0], lines
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    assert metrics["threshold"] == FIXED_THRESHOLD and resolved["calibration"]["method"] == "none"
    assert f"fewer than {MIN_INNER_PATIENTS} patients" in resolved["threshold_rule"]
    assert not (tmp_path / "run" / "checkpoint" / "crossfit_0.npy").exists()


def test_a_format_1_split_trains_under_the_fixed_rule(learn_data, tmp_path, caplog):
    shards, splits = learn_data
    old = json.loads(splits.read_text())
    old["format_version"] = 1
    for key in ("tune_fraction", "test_fraction", "test_patients", "test_slides", "test_diagnoses"):
        old.pop(key)
    for f in old["folds"]:
        f["train_patients"] = sorted(f["train_patients"] + f.pop("tune_patients"))
        f["train_slides"] = sorted(f["train_slides"] + f.pop("tune_slides"))
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(old))
    with caplog.at_level("WARNING", logger="python_task"):
        metrics = train(_cfg((shards, path), tmp_path / "run"))
    assert metrics["selection_tuned"] == 0.0
    assert any("format_version 1" in r.getMessage() for r in caplog.records)
