"""Real points of the plans, run by the emulation of OpenMOLE (:mod:`engine`, rules cited from OpenMOLE's source)
on a tiny synthetic cohort: the ContainerTask script in a private mount namespace with /data and /out at their
absolute paths, the GPU path's SystemExecTask with a recording stand-in for ``apptainer``, the parse task, the
CSVHook file and ``report`` reading it.

The plans run as shipped except for two defaults made small for 2 CPU cores (``epochs := 1``,
``max_train_tiles := 64``: the edit a user makes for a smoke run); the failure cases change one more thing each,
named in the test. Each real training costs a few seconds: 7 in all.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from . import ports
from .conftest import copy_plans
from .dsl import Settings, java_double, scala_str
from .engine import (
    STANDIN_LOG,
    EndlessResubmission,
    Engine,
    ExecutionCancelled,
    load_plan,
    namespaces_available,
    standin_command,
    write_csv_hook,
)

QUICK = [("epochs := 10", "epochs := 1"), ("max_train_tiles := 0", "max_train_tiles := 64")]


@pytest.fixture(scope="module")
def namespaces():
    reason = namespaces_available()
    if reason:
        pytest.skip(f"the ContainerTask emulation {reason}")


@pytest.fixture
def plans(namespaces, learn_data, tmp_path) -> Path:
    """The plans in a folder with a space in its name, beside the cohort's splits.json and shards/."""
    shards, splits = learn_data
    folder = copy_plans(tmp_path / "my plans", splits.read_text())
    (folder / "shards").symlink_to(shards)
    return folder


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    return header, [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]


def sweep_engine(plans: Path, tmp_path: Path, edits=(), environ=None, factor_edits=(), **kwargs) -> Engine:
    """One configuration of sweep.oms: ``edits`` of common.oms, ``factor_edits`` of factors.oms (the defaults)."""
    settings = Settings(work_directory=plans, environ=environ or {},
                        edits={"common.oms": list(edits), "factors.oms": [*QUICK, *factor_edits]})
    return Engine(load_plan("sweep.oms", settings), tmp_path / "mole", first_samples=1, **kwargs)


# ------------------------------------------------------------------------------------------------ ContainerTask

def test_a_failed_run_then_a_rerun_of_sweep(plans, tmp_path):
    """First run: the shards folder is missing on the host (as on a node without the shared filesystem): each
    point is a recorded failure, not a cancelled execution. Second run of the same plan, shards in place: the
    points train, their /out comes back, rows are appended to the same CSV, and `report` keeps the new ones."""
    (plans / "shards").rename(plans / "shards.away")
    first = sweep_engine(plans, tmp_path / "1")
    first.run()
    header, rows = read_csv(plans / "results" / "points.csv")
    assert len(rows) == 2 and {r["status"] for r in rows} == {"failed"} and {r["exitCode"] for r in rows} == {"-1"}
    assert all("missing host path" in r["error"] for r in rows)
    caught = [e for e in first.events if e.kind == "caught"]
    assert len(caught) == 2 and "doesn't exist" in caught[0].detail["error"]
    assert not any((plans / "results" / "runs" / rows[0]["point_id"]).iterdir()), "noOutput: an empty folder"

    (plans / "shards.away").rename(plans / "shards")
    second = sweep_engine(plans, tmp_path / "2")
    second.run()
    text = (plans / "results" / "points.csv").read_text()
    assert text.count("arch,augment,batch_size") == 1, "the header is written once"
    header, rows = read_csv(plans / "results" / "points.csv")
    assert header == sorted(header) and "openmole$experiment" in header and "outDir" in header
    new = rows[2:]
    assert len(new) == 2 and {r["status"] for r in new} == {"ok"} and {r["exitCode"] for r in new} == {"0"}
    assert {r["fold"] for r in new} == {"0", "1"} and all(r["error"] == "" for r in new)
    for row in new:
        assert 0.0 <= float(row["val_auc"]) <= 1.0 and float(row["epochs_run"]) == 1.0
        assert row["lr"] == "0.001" and row["elastic_alpha"] == "8.0"  # Java's Double.toString
        run = plans / "results" / row["out_dir"]
        assert (run / "metrics.json").is_file() and (run / "predictions.csv").is_file()
        assert not (run / "model.keras").exists(), "keepModels = false: the model stays behind"
    container = next(e for e in second.events if e.kind == "container")
    script = container.detail["script"]
    assert "(exit $code) ; _PROCESS_RET_CODE_=$? ; true&& \\\nmkdir -p \"/_result_/" in script
    assert script.rstrip().endswith("exit $_PROCESS_RET_CODE_") and 'export HOME="/home/user"' in script
    binds = {b["destination"]: b["source"] for b in container.detail["binds"]}
    assert binds["/data/shards"] == str(plans / "shards") and Path(binds["/data/splits.json"]).name == "splits.json"
    assert {"/out", "/_result_", "/_run_commands.sh"} <= set(binds)

    header, configs = read_csv(plans / "results" / "configs.csv")
    assert "fold" not in header and {"arch", "lr", "augment", "stain", "seed", "folds_ok"} <= set(header)
    assert configs[-1]["folds_ok"] == "2" and 0 <= float(configs[-1]["mean_val_auc"]) <= 1

    from python_task.experiments.report import make_report, read_results, summarize

    summary = summarize(read_results(plans / "results" / "points.csv"))
    assert len(summary) == 1 and summary[0]["n_points"] == 2 and summary[0]["n_completed"] == 2
    html = make_report(plans / "results" / "points.csv", tmp_path / "report").read_text()
    assert "2 row(s) superseded" in html and (tmp_path / "report" / "roc_best.png").is_file()
    # the patients behind each figure travel through parseMetrics and CSVHook, so the report can show them
    assert all(float(r["n_val_patients_pos"]) >= 1 and float(r["n_val_patients_neg"]) >= 1 for r in new)
    assert "The table has no patient counts" not in html
    total_pos = sum(int(float(r["n_val_patients_pos"])) for r in new)
    total_neg = sum(int(float(r["n_val_patients_neg"])) for r in new)
    assert f"{total_pos} M + {total_neg} B (2 folds" in html


def test_a_training_that_fails_is_a_row_with_its_exit_code(plans, tmp_path):
    engine = sweep_engine(plans, tmp_path, factor_edits=[('optimizer := "adam"', 'optimizer := "nesterov"')])
    engine.run()
    _, rows = read_csv(plans / "results" / "points.csv")
    assert {r["exitCode"] for r in rows} == {"1"}, "train's own exit code (it refuses the optimizer)"
    assert {r["status"] for r in rows} == {"failed"} and all(math.isnan(float(r["val_auc"])) for r in rows)
    assert rows[0]["error"] == "train exited with code 1: see stderr in OpenMOLE's log"
    assert not [e for e in engine.events if e.kind == "caught"], "the task itself did not fail: /out came back"
    container = next(e for e in engine.events if e.kind == "container")
    assert "error: --optimizer: choose from adam, adamw, sgd (got 'nesterov')" in container.detail["stderr"]


def test_a_point_past_its_time_limit_is_stopped_and_recorded(plans, tmp_path):
    engine = sweep_engine(plans, tmp_path, edits=[("val pointTimeLimitMinutes = 55", "val pointTimeLimitMinutes = 0.02")])
    engine.run()
    _, rows = read_csv(plans / "results" / "points.csv")
    assert {r["exitCode"] for r in rows} == {"124"} and {r["status"] for r in rows} == {"failed"}
    assert rows[0]["error"] == "stopped after the point time limit (pointTimeLimitMinutes)"


OLD_POINT = [("(exit $code)", "exit $code"), ("TryTask(MoleTask(onlyFactors -- train)) on env", "train on env")]


def test_the_old_point_loses_every_result(plans, tmp_path):
    """The point as shipped before: `exit $code` ends OpenMOLE's script before its copy of /out, even after a
    successful training, so the output file is missing and the execution is cancelled (local) ..."""
    engine = sweep_engine(plans, tmp_path, edits=OLD_POINT)
    with pytest.raises(ExecutionCancelled, match=r"Output file .*out \(stored in variable outDir: java.io.File\) "
                                                 r"doesn't exist, its parent directory .* doesn't exist either"):
        engine.run()
    container = next(e for e in engine.events if e.kind == "container")
    assert container.detail["returncode"] == 0, "the training itself succeeded"
    assert not (plans / "results" / "points.csv").exists()


def test_the_old_point_is_resubmitted_forever_on_slurm(plans, tmp_path):
    """... and on a batch environment the job fails and is resubmitted without limit (KillActor.scala:32-37)."""
    engine = sweep_engine(plans, tmp_path, edits=OLD_POINT, factor_edits=[('optimizer := "adam"', 'optimizer := "nesterov"')],
                          environ={"OM_ENV": "slurm", "OM_CLUSTER_DATA": str(plans)}, resubmissions=2)
    with pytest.raises(EndlessResubmission, match="resubmitted 2 times on SLURMEnvironment"):
        engine.run()


# ------------------------------------------------------------------------------------------------ SystemExecTask

def test_the_gpu_path_runs_apptainer_with_a_clean_environment(plans, tmp_path):
    (plans / "python-task-gpu.sif").write_bytes(b"a SIF stands here")
    log = tmp_path / "apptainer.jsonl"
    standin = standin_command(log)
    try:
        environ = {**os.environ, "PATH": f"{standin}:{os.environ['PATH']}", STANDIN_LOG: str(log),
                   "CUDA_VISIBLE_DEVICES": "0", "HOST_ONLY_SECRET": "1", "KERAS_BACKEND": "torch"}
        engine = sweep_engine(plans, tmp_path, edits=[("val keepModels = false", "val keepModels = true")],
                              environ={"OM_ENV": "local-gpu"}, job_environ=environ)
        engine.run()
    finally:
        shutil.rmtree(standin)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 2
    call = calls[0]
    assert {"--nv", "--cleanenv", "--no-home"} <= set(call["flags"])
    binds = {(b["source"], b["destination"], b["options"]) for b in call["binds"]}
    assert (f"{plans}/shards", "/data/shards", "ro") in binds, "the path with a space stays one argument"
    assert any(d == "/data/splits.json" and o == "ro" for _, d, o in binds)
    assert any(s.endswith("/out") and d == "/out" for s, d, _ in binds)
    assert call["image"] == str(plans / "python-task-gpu.sif")
    assert call["env"] == {"CUDA_VISIBLE_DEVICES": "0", "KEEP_MODEL": "true", "OMP_NUM_THREADS": str(load_plan(
        "sweep.oms", Settings(work_directory=plans, environ={"OM_ENV": "local-gpu"})).value("pointThreads"))}
    inside = call["container_env"]
    assert "HOST_ONLY_SECRET" not in inside, "--cleanenv: the host's variables stay out"
    assert inside["CUDA_VISIBLE_DEVICES"] == "0", "SLURM's GPU choice passes in with --env"
    assert inside["KERAS_BACKEND"] != "torch"
    _, rows = read_csv(plans / "results" / "points.csv")
    assert {r["status"] for r in rows} == {"ok"} and {r["exitCode"] for r in rows} == {"0"}
    for row in rows:
        assert (plans / "results" / row["out_dir"] / "model.keras").is_file(), "keepModels = true"
        assert (plans / "results" / row["out_dir"] / "metrics.json").is_file()


def test_the_gpu_path_runs_singularity_where_apptainer_is_absent(plans, tmp_path):
    """A site with SingularityCE and no Apptainer: the same command runs `singularity exec`, the GPU choice
    still reaches the point (--env, which both read; APPTAINERENV_ would be lost)."""
    (plans / "python-task-gpu.sif").write_bytes(b"a SIF stands here")
    log = tmp_path / "singularity.jsonl"
    standin = standin_command(log)
    (standin / "apptainer").rename(standin / "singularity")
    try:
        environ = {**os.environ, "PATH": f"{standin}:{os.environ['PATH']}", STANDIN_LOG: str(log),
                   "CUDA_VISIBLE_DEVICES": "1"}
        assert shutil.which("apptainer", path=environ["PATH"]) is None
        engine = sweep_engine(plans, tmp_path, environ={"OM_ENV": "local-gpu"}, job_environ=environ,
                              inner_samples=1)
        engine.run()
    finally:
        shutil.rmtree(standin)
    [call] = [json.loads(line) for line in log.read_text().splitlines()]
    assert call["container_env"]["CUDA_VISIBLE_DEVICES"] == "1" and "--nv" in call["flags"]
    _, rows = read_csv(plans / "results" / "points.csv")
    assert [(r["status"], r["exitCode"]) for r in rows] == [("ok", "0")]


@pytest.mark.parametrize("missing", ["sif", "shards", "runner"])
def test_a_gpu_point_that_cannot_start_is_recorded_with_exit_code_minus_one(plans, tmp_path, missing):
    """No SIF, no shards folder or neither runner on PATH: the point never starts, its row says -1 (as on the
    CPU path), not the runner's 255 or the shell's 127, and the sweep goes on."""
    if missing != "sif":
        (plans / "python-task-gpu.sif").write_bytes(b"a SIF stands here")
    if missing == "shards":
        (plans / "shards").rename(plans / "shards.away")
    log = tmp_path / "apptainer.jsonl"
    standin = standin_command(log)
    path = os.environ["PATH"] if missing == "runner" else f"{standin}:{os.environ['PATH']}"
    try:
        environ = {**os.environ, "PATH": path, STANDIN_LOG: str(log)}
        engine = sweep_engine(plans, tmp_path, environ={"OM_ENV": "local-gpu"}, job_environ=environ)
        engine.run()
    finally:
        shutil.rmtree(standin)
    _, rows = read_csv(plans / "results" / "points.csv")
    assert len(rows) == 2 and {(r["status"], r["exitCode"]) for r in rows} == {("failed", "-1")}
    assert all("could not start" in r["error"] for r in rows)
    assert not log.exists(), "the runner was never called"
    said = {"sif": "GPU image (SIF) not found", "shards": "shards folder not found",
            "runner": "neither apptainer nor singularity is on PATH"}[missing]
    stderr = [e.detail["stderr"] for e in engine.events if e.kind == "systemexec"]
    assert stderr and all(said in err for err in stderr)


# ------------------------------------------------------------------------------------------------ LHS

def test_an_lhs_configuration_trains_with_its_sampled_factors(plans, tmp_path):
    settings = Settings(work_directory=plans, edits={"factors.oms": QUICK})
    engine = Engine(load_plan("lhs.oms", settings), tmp_path / "mole", first_samples=1,
                    select=lambda s: s["arch"] == "simple_cnn")
    engine.run()
    header, configs = read_csv(plans / "results" / "lhs_configs.csv")
    assert len(configs) == 1
    config = configs[0]
    defaults = {"weight_decay": "0.0", "dropout": "0.3", "elastic_alpha": "8.0", "lr": "0.001"}
    for factor, default in defaults.items():
        assert factor in header and config[factor] != default, factor
    assert config["arch"] == "simple_cnn" and config["augment"] == "flip+rot90+elastic"
    assert config["lr"] == java_double(10 ** float(config["log10_lr"]))
    _, points = read_csv(plans / "results" / "lhs_points.csv")
    assert len(points) == 2 and {p["status"] for p in points} == {"ok"}
    for point in points:
        for factor in ("weight_decay", "dropout", "elastic_alpha", "lr", "augment"):
            assert point[factor] == config[factor], factor
        trained = json.loads((plans / "results" / point["out_dir"] / "config.json").read_text())
        assert trained["dropout"] == float(config["dropout"]) and trained["lr"] == float(config["lr"])
        assert trained["weight_decay"] == float(config["weight_decay"])
        assert trained["augment"] == "flip,rot90,elastic", "'+' joined in the plan, ',' for train"


# ------------------------------------------------------------------------------------------------ formats

def test_the_csv_hook_writes_openmoles_format(tmp_path):
    """The literal form of CSVHook + CSVFormat (core.workflow hook/CSVHook.scala, core.format CSVFormat.scala)."""
    path = tmp_path / "results" / "points.csv"
    row = {"val_auc": math.nan, "arch": "simple_cnn", "lr": 1e-4, "fold": 0, "outDir": Path("/tmp/x/out"),
           "status": "ok", "openmole$experiment": 17}
    write_csv_hook(path, row)
    write_csv_hook(path, {**row, "fold": 1, "openmole$experiment": 18, "tiles": [1, 2]})
    assert path.read_text() == ("arch,fold,lr,openmole$experiment,outDir,status,val_auc\n"
                                "simple_cnn,0,1.0E-4,17,/tmp/x/out,ok,NaN\n"
                                'simple_cnn,1,1.0E-4,18,/tmp/x/out,ok,"[1,2]",NaN\n')


def test_the_parse_task_reads_real_and_broken_metrics(common_parse_code, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    context = {"outDir": out, "exitCode": 0, "arch": "simple_cnn", "lr": 1e-4, "batch_size": 32, "epochs": 1,
               "optimizer": "adam", "weight_decay": 0.0, "dropout": 0.3, "augment": "flip+rot90", "stain": "none",
               "elastic_alpha": 8.0, "max_train_tiles": 0, "patience": 5, "aggregation": "mean",
               "calibration": "platt", "calibration_folds": 3, "seed": 0, "fold": 1}
    missing = ports.parse_metrics(common_parse_code, context, scala_str)
    assert missing["status"] == "failed" and math.isnan(missing["val_auc"])
    assert missing["error"] == "train exited 0 but wrote no metrics.json"
    (out / "metrics.json").write_text(json.dumps({"val_auc": 0.8125, "val_loss": float("nan"), "n_params": 12345.0,
                                                  "threshold": 1e-05, "val_f1": -0.5, "train_seconds": float("inf"),
                                                  "val_slide_auc": None, "val_accuracy": "1.2.3"}, indent=2))
    got = ports.parse_metrics(common_parse_code, context, scala_str)
    assert got["val_auc"] == 0.8125 and got["n_params"] == 12345.0 and got["threshold"] == 1e-05
    assert got["val_f1"] == -0.5 and got["train_seconds"] == math.inf and math.isnan(got["val_loss"])
    assert math.isnan(got["val_slide_auc"]), "strict JSON's null reads as NaN"
    assert math.isnan(got["val_accuracy"]) and math.isnan(got["val_patient_auc"]), "unreadable or missing: NaN"
    assert got["status"] == "ok" and got["error"] == ""
    assert got["point_id"] == ("simple_cnn_lr1.0E-4_bs32_ep1_adam_wd0.0_do0.3_aug-flip+rot90_stain-none_ea8.0_mt0_"
                               "pa5_agg-mean_cal-platt_cf3_seed0_fold1") and got["out_dir"] == "runs/" + got["point_id"]
    assert ports.parse_metrics(common_parse_code, {**context, "exitCode": -1}, scala_str)["status"] == "failed"


@pytest.fixture
def common_parse_code() -> str:
    return load_plan("sweep.oms").value("parseMetrics").args["code"]


def test_the_ports_follow_the_scala(common_parse_code):
    src = (Path(__file__).resolve().parents[2] / "openmole" / "common.oms").read_text()
    for lines in ports.NATIVE_LINES.values():
        ports.check_port(src, lines)
    ports.check_port(common_parse_code, ports.PARSE_LINES)
    with pytest.raises(ports.PortMismatch):
        ports.check_port(common_parse_code.replace("exitCode == 0 &&", "exitCode >= 0 &&"), ports.PARSE_LINES)
