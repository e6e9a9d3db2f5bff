"""The same training code on Keras' JAX backend (what a GPU node may have). Skipped where JAX is absent."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="JAX not installed")


def test_train_and_predict_on_jax(learn_data, tmp_path):
    shards, splits = learn_data
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "python_task", "train", "--shards", str(shards), "--splits", str(splits), "--fold",
           "0", "--arch", "simple_cnn", "--out", str(out), "--epochs", "1", "--max-train-tiles", "64",
           "--max-val-tiles", "64", "--augment", "flip,rot90,elastic,hed", "--stain", "macenko", "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())
    assert config["versions"]["backend"] == "jax"
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["val_auc"] <= 1.0
    slide = next((shards.parent / "cohort" / "slides").glob("*.tiff"))
    proc = subprocess.run([sys.executable, "-m", "python_task", "predict", "--model", str(out / "model.keras"),
                           "--slide", str(slide), "--out", str(tmp_path / "pred")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "pred" / "slide.json").read_text())["n_tiles"] > 0
