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

from python_task.errors import TaskError
from python_task.training.config import TrainConfig
from python_task.training.loop import train
from python_task.training.metrics import CONTRACT_METRICS


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
    saved = json.loads((out / "metrics.json").read_text())
    assert set(CONTRACT_METRICS) <= set(saved) and saved == metrics
    assert all(isinstance(v, float) for v in saved.values())
    assert saved["n_val_tiles"] == 96 and saved["n_train_tiles"] == 96 and saved["epochs_run"] == 1
    config = json.loads((out / "config.json").read_text())
    assert config["arch"] == "simple_cnn" and config["resolved"]["tile_size"] == 64
    assert {"keras", "numpy", "backend"} <= set(config["versions"]) and config["resolved"]["manifest_digest"]
    with open(out / "predictions.csv", newline="") as fh:
        preds = list(csv.DictReader(fh))
    assert len(preds) == 96 and {"slide_id", "patient_id", "x", "y", "label", "prob"} <= set(preds[0])
    assert not (out / "checkpoint").exists()


def test_simple_cnn_learns_the_synthetic_classes(learn_data, tmp_path):
    metrics = train(_cfg(learn_data, tmp_path / "learn", epochs=4, max_train_tiles=0, max_val_tiles=0,
                         lr=5e-4, batch_size=32, augment="flip,rot90"))
    assert metrics["val_auc"] > 0.8, metrics  # the best epoch's model, chosen on validation AUC
    history = list(csv.DictReader(open(tmp_path / "learn" / "history.csv")))
    assert max(float(r["val_auc"]) for r in history) == pytest.approx(metrics["val_auc"], abs=1e-6)


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
            return [(int(r["epoch"]), float(r["loss"]), float(r["val_loss"])) for r in csv.DictReader(fh)]

    assert [e for e, _, _ in history(tmp_path / "run")] == [1, 2, 3]
    assert history(tmp_path / "run") == history(tmp_path / "whole")  # bit for bit: losses equal, not close


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
