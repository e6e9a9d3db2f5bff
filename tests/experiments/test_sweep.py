"""The local runner: plan expansion, one row per point, resume, failures recorded, plan errors."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import yaml

from python_task.errors import TaskError
from python_task.experiments.sweep import expand_points, load_plan, point_id, run_sweep, train_command
from python_task.training.metrics import CONTRACT_METRICS


def _plan(tmp_path, shards, splits, **extra) -> object:
    plan = {"shards": str(shards), "splits": str(splits), "factors": {"arch": ["simple_cnn"], "fold": [0, 1]},
            "fixed": {"epochs": 1, "input_size": 32, "max_train_tiles": 48, "batch_size": 16, "seed": 0}}
    plan.update(extra)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


@pytest.fixture(scope="module")
def splits_file(synth_shards, tmp_path_factory):
    from python_task.data.splits import make_splits, write_splits

    path = tmp_path_factory.mktemp("splits") / "splits.json"
    write_splits(make_splits(synth_shards, 2, seed=0), path)
    return path


def test_expansion_is_full_factorial_with_fixed_and_random(tmp_path, synth_shards, splits_file):
    path = _plan(tmp_path, synth_shards, splits_file, factors={"arch": ["simple_cnn", "unet_encoder"],
                                                               "lr": [0.001, 0.0003], "fold": [0, 1, 2]})
    points = expand_points(load_plan(path))
    assert len(points) == 12 and all(p["epochs"] == 1 for p in points)
    assert len({point_id(p) for p in points}) == 12
    rnd = _plan(tmp_path, synth_shards, splits_file, random={"n": 3, "seed": 1, "factors": {
        "lr": {"log_uniform": [1e-4, 1e-2]}, "dropout": {"uniform": [0.0, 0.5]}}})
    points = expand_points(load_plan(rnd))
    assert len(points) == 6 and all(1e-4 <= p["lr"] <= 1e-2 and 0 <= p["dropout"] <= 0.5 for p in points)
    assert points == expand_points(load_plan(rnd))  # seeded


def test_command_is_the_train_command_line(tmp_path, synth_shards, splits_file):
    plan = load_plan(_plan(tmp_path, synth_shards, splits_file))
    cmd = train_command(plan, {"arch": "simple_cnn", "fold": 0, "batch_size": 8, "freeze_backbone": True,
                               "class_weights": False, "augment": ["flip", "rot90"]}, tmp_path / "o")
    assert cmd[1:4] == ["-m", "python_task", "train"]
    assert "--batch-size" in cmd and "--freeze-backbone" in cmd and "--class-weights" not in cmd
    assert cmd[cmd.index("--augment") + 1] == "flip,rot90"


@pytest.mark.parametrize("bad, needle", [
    ({"factors": {"arch": ["simple_cnn"], "fold": [0], "learning_rate": [0.1]}}, "learning_rate"),
    ({"factors": {"fold": [0]}}, "arch"),
    ({"fixed": {"epochs": 1, "arch": "simple_cnn"}, "factors": {"arch": ["x"], "fold": [0]}}, "both"),
    ({"random": {"n": 2, "factors": {"lr": {"normal": [0, 1]}}}}, "lr"),
])
def test_plan_errors_name_the_file(tmp_path, synth_shards, splits_file, bad, needle):
    path = _plan(tmp_path, synth_shards, splits_file, **bad)
    with pytest.raises(TaskError, match=needle) as err:
        load_plan(path)
    assert "plan.yaml" in str(err.value)


def test_runs_points_records_failures_and_resumes(tmp_path, synth_shards, splits_file):
    path = _plan(tmp_path, synth_shards, splits_file, factors={"arch": ["simple_cnn"], "fold": [0, 1, 7]})
    out = tmp_path / "sweep"
    report = run_sweep(path, out, jobs=2, progress=False)
    assert report.ran == 3
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3
    assert set(CONTRACT_METRICS) <= set(rows[0]) and {"arch", "fold", "status", "epochs"} <= set(rows[0])
    by_fold = {r["fold"]: r for r in rows}
    assert by_fold["0"]["status"] == by_fold["1"]["status"] == "ok"
    assert by_fold["7"]["status"] == "failed" and "fold" in by_fold["7"]["error"]
    assert 0.0 <= float(by_fold["0"]["val_auc"]) <= 1.0
    assert float(by_fold["0"]["overhead_seconds"]) > 0
    assert (out / by_fold["0"]["out_dir"] / "model.keras").exists()
    stamp = (out / "results.csv").stat().st_mtime_ns

    ok_plan = _plan(tmp_path, synth_shards, splits_file)  # the same two good points
    again = run_sweep(ok_plan, out, progress=False)
    assert again.ran == 0 and again.skipped == 2
    assert (out / "results.csv").stat().st_mtime_ns == stamp  # nothing to do, nothing written


def test_cli_exit_status(tmp_path, synth_shards, splits_file):
    path = _plan(tmp_path, synth_shards, splits_file, factors={"arch": ["no_such_arch"], "fold": [0]})
    proc = subprocess.run([sys.executable, "-m", "python_task", "sweep", str(path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "1 failed" in proc.stderr
    with open(tmp_path / "o" / "results.csv") as fh:
        row = next(csv.DictReader(fh))
    assert row["status"] == "failed" and "no_such_arch" in row["error"]


def test_null_metrics_stay_nan_in_the_results_table(tmp_path, synth_shards, splits_file, monkeypatch):
    """metrics.json is strict JSON (a metric without a value is null); results.csv keeps writing nan."""
    from python_task.experiments import sweep

    script = ("import math, pathlib, sys; from python_task.fileio import write_json_atomic; "
              "from python_task.training.metrics import CONTRACT_METRICS; "
              "write_json_atomic(pathlib.Path(sys.argv[1]) / 'metrics.json', "
              "{m: math.nan if m == 'val_slide_auc' else 0.5 for m in CONTRACT_METRICS})")
    monkeypatch.setattr(sweep, "train_command", lambda plan, point, out: [sys.executable, "-c", script, str(out)])
    path = _plan(tmp_path, synth_shards, splits_file, factors={"arch": ["simple_cnn"], "fold": [0]})
    run_sweep(path, tmp_path / "sweep", progress=False)
    (point,) = (tmp_path / "sweep" / "points").iterdir()
    assert '"val_slide_auc": null' in (point / "metrics.json").read_text()
    with open(tmp_path / "sweep" / "results.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["status"] == "ok" and row["val_slide_auc"] == "nan" and row["val_auc"] == "0.5"
