"""``evaluate``: a trained model scored once on the test patients, and refused when it has seen one."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest

from python_task.data.splits import make_splits, write_splits
from python_task.errors import TaskError
from python_task.inference.evaluate import evaluate_model
from python_task.training.config import TrainConfig
from python_task.training.loop import train
from python_task.training.metrics import evaluation_metrics


@pytest.fixture(scope="module")
def test_split(learn_data, tmp_path_factory):
    """learn_data's 10 patients with one of each diagnosis held out as the test set, and a model trained on fold 0
    of that split."""
    shards, _ = learn_data
    root = tmp_path_factory.mktemp("evaluate")
    splits = make_splits(shards, 2, seed=0, test_fraction=0.2)
    assert len(splits["test_patients"]) == 2
    write_splits(splits, root / "splits.json")
    run = root / "run"
    train(TrainConfig(shards=shards, splits=root / "splits.json", fold=0, arch="simple_cnn", out=run, epochs=1,
                      batch_size=16, max_train_tiles=96, max_val_tiles=96, verbose=False, tensorboard=False,
                      aggregation="q90", calibration_folds=4))  # 4 training patients: inner models fit on 3
    return shards, root / "splits.json", run, splits


def test_scores_the_test_patients_once_with_the_runs_threshold(test_split, tmp_path):
    shards, splits, run, data = test_split
    m = evaluate_model(run / "model.keras", shards, splits, tmp_path / "eval")
    for name in ("test_metrics.json", "test_predictions.csv", "evaluation.json"):
        assert (tmp_path / "eval" / name).exists(), name
    threshold = json.loads((run / "config.json").read_text())["resolved"]["threshold"]
    assert m["threshold"] == threshold and 0 <= m["test_auc"] <= 1
    assert (m["n_test_patients_pos"], m["n_test_patients_neg"]) == (1.0, 1.0)
    for key in ("test_auc", "test_patient_auc"):
        low, high = m[f"{key}_ci_low"], m[f"{key}_ci_high"]
        assert 0 <= low <= high <= 1 or (math.isnan(low) and math.isnan(high))
    patients = {line.split(",")[1] for line in (tmp_path / "eval" / "test_predictions.csv").read_text().splitlines()[1:]}
    assert patients == set(data["test_patients"])
    # the decisions are the run's: its aggregation over its calibrated probabilities, at its threshold
    resolved = json.loads((run / "config.json").read_text())["resolved"]
    assert resolved["aggregation"] == "q90" and resolved["calibration"]["method"] == "platt"
    rows = list(csv.DictReader(open(tmp_path / "eval" / "test_predictions.csv")))
    y, prob = [int(r["label"]) for r in rows], [float(r["prob"]) for r in rows]
    again = evaluation_metrics(y, prob, [r["slide_id"] for r in rows], [r["patient_id"] for r in rows],
                               threshold=threshold, how="q90")
    for key in ("slide_accuracy", "slide_brier", "patient_accuracy", "slide_auc"):
        assert m[f"test_{key}"] == pytest.approx(again[f"val_{key}"], nan_ok=True), key
    assert evaluate_model(run, shards, splits, tmp_path / "eval") == pytest.approx(m, nan_ok=True)  # not again


def test_refuses_a_model_trained_on_a_test_patient(test_split, learn_data, tmp_path):
    shards, splits, _, data = test_split
    # the same shards' usual split (no test set): its fold 0 trains on patients the test split holds out
    other = tmp_path / "other"
    train(TrainConfig(shards=shards, splits=learn_data[1], fold=0, arch="simple_cnn", out=other, epochs=1,
                      batch_size=16, max_train_tiles=32, max_val_tiles=32, verbose=False, tensorboard=False))
    trained_on = set(json.loads((other / "config.json").read_text())["resolved"]["train_patients"])
    assert trained_on & set(data["test_patients"])
    with pytest.raises(TaskError, match="used test patient.* for training") as exc:
        evaluate_model(other / "model.keras", shards, splits, tmp_path / "eval")
    assert "\n" not in str(exc.value) and not (tmp_path / "eval" / "test_metrics.json").exists()


def test_refuses_a_tuning_patient_and_a_split_without_test_set(test_split, learn_data, tmp_path):
    shards, splits, run, data = test_split
    config = json.loads((run / "config.json").read_text())
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "model.keras").write_bytes((run / "model.keras").read_bytes())
    config["resolved"]["tune_patients"] = [data["test_patients"][0]]
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(TaskError, match="for tuning"):
        evaluate_model(copy / "model.keras", shards, splits, tmp_path / "e1")
    with pytest.raises(TaskError, match="no test patients"):
        evaluate_model(run / "model.keras", shards, learn_data[1], tmp_path / "e2")


def test_cli_evaluate_prints_one_line_errors(test_split, learn_data, tmp_path):
    shards, _, run, _ = test_split
    proc = subprocess.run([sys.executable, "-m", "python_task", "evaluate", "--model", str(run / "model.keras"),
                           "--shards", str(shards), "--splits", str(learn_data[1]), "--out", str(tmp_path / "e")],
                          capture_output=True, text=True, timeout=300)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "--test-fraction" in errors[0], proc.stderr


def test_one_evaluation_per_folder(test_split, tmp_path):
    from python_task.errors import BusyError
    from python_task.fileio import folder_lock

    shards, splits, run, _ = test_split
    with folder_lock(tmp_path / "eval", "evaluate"):
        with pytest.raises(BusyError, match="in use by another run \\(evaluate, pid"):
            evaluate_model(run / "model.keras", shards, splits, tmp_path / "eval")
    assert not (tmp_path / "eval" / "test_metrics.json").exists()


def test_a_missing_model_is_named_before_anything_else(test_split, tmp_path):
    shards, splits, run, _ = test_split
    (tmp_path / "config.json").write_text((run / "config.json").read_text())  # a run folder without its model
    with pytest.raises(TaskError, match="not found") as exc:
        evaluate_model(tmp_path / "model.keras", shards, splits, tmp_path / "eval")
    assert exc.value.path == str(tmp_path / "model.keras") and not (tmp_path / "eval").exists()


def _run_copy(run, folder, change) -> object:
    """A copy of a run folder (model and config.json) whose config.json ``change`` edits."""
    folder.mkdir()
    (folder / "model.keras").write_bytes((run / "model.keras").read_bytes())
    config = json.loads((run / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "model.keras"


def test_refuses_test_shards_of_another_scale(test_split, tmp_path):
    shards, splits, run, _ = test_split
    model = _run_copy(run, tmp_path / "run", lambda c: c["resolved"].update(mpp=0.5))  # the shards are at 1 µm/px
    with pytest.raises(TaskError) as exc:
        evaluate_model(model, shards, splits, tmp_path / "eval")
    cause = exc.value.cause
    assert exc.value.path == str(shards) and "64-px tiles at 1 µm/px" in cause and "64-px tiles at 0.5 µm/px" in cause
    assert "\n" not in str(exc.value) and not (tmp_path / "eval").exists()


def test_refuses_a_split_that_puts_a_test_patient_in_a_fold(test_split, tmp_path):
    shards, splits, run, data = test_split
    patient = data["test_patients"][0]
    changed = json.loads(splits.read_text())
    changed["folds"][1]["train_patients"].append(patient)  # the run is fold 0's: its own config cannot tell
    bad = tmp_path / "splits.json"
    bad.write_text(json.dumps(changed))
    with pytest.raises(TaskError) as exc:
        evaluate_model(run / "model.keras", shards, bad, tmp_path / "eval")
    assert exc.value.path == str(bad) and f"test patient {patient} is also in fold 1's train_patients" in exc.value.cause
    assert not (tmp_path / "eval").exists()
