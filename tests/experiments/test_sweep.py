"""The local runner: plan expansion, one row per point, resume, failures recorded, plan errors."""

from __future__ import annotations

import csv
import json
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
    from python_task.fileio import folder_lock

    path = _plan(tmp_path, synth_shards, splits_file)
    out = tmp_path / "sweep"
    busy = next(p for p in expand_points(load_plan(path)) if p["fold"] == 1)
    with folder_lock(out / "points" / point_id(busy), "a stray train"):  # that point fails as it runs
        report = run_sweep(path, out, jobs=2, progress=False)
    assert report.ran == 2
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    assert set(CONTRACT_METRICS) <= set(rows[0]) and {"arch", "fold", "status", "epochs"} <= set(rows[0])
    by_fold = {r["fold"]: r for r in rows}
    assert by_fold["0"]["status"] == "ok"
    assert by_fold["1"]["status"] == "failed" and "in use by another run (a stray train" in by_fold["1"]["error"]
    assert 0.0 <= float(by_fold["0"]["val_auc"]) <= 1.0
    assert float(by_fold["0"]["overhead_seconds"]) > 0
    assert (out / by_fold["0"]["out_dir"] / "model.keras").exists()

    again = run_sweep(path, out, progress=False)  # the failed point is retried, the finished one skipped
    assert again.ran == 1 and again.skipped == 1 and not again.failed
    stamp = (out / "results.csv").stat().st_mtime_ns
    third = run_sweep(path, out, progress=False)
    assert third.ran == 0 and third.skipped == 2
    assert (out / "results.csv").stat().st_mtime_ns == stamp  # nothing to do, nothing written


def test_cli_refuses_a_bad_plan_before_any_point(tmp_path, synth_shards, splits_file):
    path = _plan(tmp_path, synth_shards, splits_file, factors={"arch": ["simple_cnn", "no_such_arch"],
                                                               "fold": [0, 5], "lr": [0.001, -1, "1e-3"]})
    proc = subprocess.run([sys.executable, "-m", "python_task", "sweep", str(path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 3, proc.stderr
    assert all(str(path) in e for e in errors)
    assert any("'arch': 'no_such_arch'" in e for e in errors)
    assert any("'fold': 5 is not a fold" in e and "it has 2" in e for e in errors)
    assert any("'lr': -1.0: must be a positive number" in e for e in errors)
    assert not (tmp_path / "o" / "results.csv").exists() and not (tmp_path / "o" / "points").exists()


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


def test_values_are_typed_so_equal_values_are_one_level(tmp_path, synth_shards, splits_file):
    path = _plan(tmp_path, synth_shards, splits_file, factors={"arch": ["simple_cnn"], "fold": [0],
                                                               "lr": [0.001, "1e-3", "0.0005"],
                                                               "base_filters": [8, 8.0, "16"]})
    plan = load_plan(path)
    assert plan.factors["lr"] == [0.001, 0.0005] and plan.factors["base_filters"] == [8, 16]
    points = expand_points(plan)
    assert len(points) == 4 and len({point_id(p) for p in points}) == 4
    for bad, needle in (({"epochs": "ten"}, "'epochs': 'ten' must be a whole number"),
                        ({"freeze_backbone": "maybe"}, "must be true or false")):
        with pytest.raises(TaskError, match=needle):
            load_plan(_plan(tmp_path, synth_shards, splits_file, fixed=bad))
    with pytest.raises(TaskError, match="draw it with int_uniform"):
        load_plan(_plan(tmp_path, synth_shards, splits_file,
                        random={"n": 2, "factors": {"batch_size": {"uniform": [8, 32]}}}))
    rnd = load_plan(_plan(tmp_path, synth_shards, splits_file,
                          random={"n": 2, "factors": {"lr": {"log_uniform": ["1e-4", "1e-2"]}}}))
    assert all(1e-4 <= p["lr"] <= 1e-2 for p in expand_points(rnd))


def test_one_sweep_per_folder_and_its_settings_are_kept(tmp_path, synth_shards, splits_file):
    from python_task.errors import BusyError
    from python_task.experiments import sweep
    from python_task.fileio import folder_lock

    path = _plan(tmp_path, synth_shards, splits_file)
    out = tmp_path / "o"
    with folder_lock(out, "sweep"):
        with pytest.raises(BusyError, match="in use by another run \\(sweep, pid"):
            run_sweep(path, out, progress=False)
    plan = load_plan(path)
    sweep._check_settings(plan, out, overwrite=False)  # a first run records what its results depend on
    (out / "points" / "old").mkdir(parents=True)
    (out / "results.csv").write_text("point_id,status\nold,ok\n")
    other = load_plan(_plan(tmp_path, synth_shards, splits_file, fixed={"epochs": 2}))
    with pytest.raises(TaskError, match=r"sweep.json: the results in .* were made with other fixed .* use `overwrite`"):
        sweep._check_settings(other, out, overwrite=False)
    sweep._check_settings(other, out, overwrite=True)
    assert not (out / "points").exists() and not (out / "results.csv").exists()
    assert json.loads((out / "sweep.json").read_text())["fixed"] == {"epochs": 2}
    sweep._check_settings(other, out, overwrite=False)  # the same settings again: fine


def _bare_plan(tmp_path, text: str = "", **extra) -> object:
    """A plan whose shards and splits need not exist: its size is refused before they are looked at."""
    plan = {"shards": "shards", "splits": "splits.json", "factors": {"arch": ["simple_cnn"], "fold": [0]}}
    plan.update(extra)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan) + text)
    return path


def test_a_plan_of_nested_aliases_is_refused_while_it_is_read(tmp_path):
    """Six levels of ten aliases stand for 10⁶ values in 600 bytes (nine filled 5.8 GB before a MemoryError)."""
    from python_task.errors import ConfigError

    anchors = ["  - &a0 [flip, flip, flip, flip, flip, flip, flip, flip, flip, flip]"]
    anchors += [f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 6)]
    bomb = "description:\n" + "\n".join(anchors) + "\nfixed:\n  augment: *a5\n"
    path = _bare_plan(tmp_path, bomb)
    with pytest.raises(ConfigError, match="more than 100,000 YAML nodes with its aliases written out") as err:
        load_plan(path)
    assert err.value.path == str(path) and err.value.setting == "max_plan_nodes"
    assert "`max_plan_nodes`" in err.value.cause and "\n" not in str(err.value)
    loop = _bare_plan(tmp_path, "fixed:\n  augment: &loop [flip, *loop]\n")
    with pytest.raises(ConfigError, match="not a readable YAML plan .*an alias refers to the node that holds it"):
        load_plan(loop)
    lrs = tmp_path / "lrs.yaml"
    lrs.write_text("shards: shards\nsplits: splits.json\ndescription: &lrs [0.001, 0.01]\n"
                   "factors: {arch: [simple_cnn], fold: [0], lr: *lrs}\n")
    assert load_plan(lrs).factors["lr"] == [0.001, 0.01]  # aliases within the bound read as before


def test_a_plan_with_too_many_points_is_refused_from_its_factor_sizes(tmp_path):
    """1,000 seeds x 1,000 learning rates: refused at once, before a point is built (it took 13 minutes of
    checking)."""
    from python_task.errors import ConfigError

    path = _bare_plan(tmp_path, factors={"arch": ["simple_cnn"], "fold": [0], "seed": list(range(1000)),
                                         "lr": [round(1e-4 * (1 + i), 6) for i in range(1000)]})
    with pytest.raises(ConfigError, match=r"1,000,000 points \(1 arch x 1 fold x 1,000 lr x 1,000 seed\), more "
                                          r"than the 10,000 a sweep may run") as err:
        load_plan(path)
    assert err.value.path == str(path) and err.value.setting == "max_points" and "`max_points`" in err.value.cause
    from python_task.experiments.sweep import count_points

    assert count_points(load_plan(path, max_points=10**6)) == 10**6
    draws = _bare_plan(tmp_path, random={"n": 20_000, "factors": {"dropout": {"uniform": [0.0, 0.5]}}})
    with pytest.raises(ConfigError, match=r"20,000 points \(1 arch x 1 fold x 20,000 random draws\)"):
        load_plan(draws)


def test_cli_names_the_plan_size_flags(tmp_path):
    path = _bare_plan(tmp_path, factors={"arch": ["simple_cnn"], "fold": [0, 1]})
    for flag, value, needle in (("--max-points", "1", "2 points (1 arch x 2 fold), more than the 1 a sweep may "
                                                      "run: use fewer levels, or raise --max-points"),
                                ("--max-plan-nodes", "5", "more than 5 YAML nodes with its aliases written out (an "
                                                          "alias counts as every value it stands for): write fewer "
                                                          "values, or raise --max-plan-nodes")):
        proc = subprocess.run([sys.executable, "-m", "python_task", "sweep", str(path), "--out", str(tmp_path / "o"),
                               flag, value], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1 and proc.stderr.splitlines()[-1] == f"error: {path}: {needle}", proc.stderr
        assert not (tmp_path / "o").exists()
