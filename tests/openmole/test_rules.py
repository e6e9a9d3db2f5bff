"""Rules of OpenMOLE (v22.1) that :mod:`engine` ports, each tested on its own: on a synthetic context or a tiny
plan written here (no training), and through the project's plans (``sweep.oms``), where the tests marked
"fails on the plans at 94506fe" fail on the point as it was there, ``TryTask(train)``: the TryTask hands the task
its fallback ``outDir`` (``pointDefaults``' ``noOutput``), and an external task returns a File of its outputs that
its context already holds in place of the folder it produced (``External.fetchOutputFiles``), so every successful
point came back as ``.no-output`` and was recorded "failed".
"""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import pytest

from .conftest import copy_plans
from .dsl import Evaluator, Plan, Settings, ValRef, parse
from .engine import (
    Engine,
    ExecutionCancelled,
    TaskFailure,
    _fresh_tmp_possible,
    fetch_output_files,
    load_plan,
    namespaces_available,
)

OUT = ValRef("outDir", "File")
N = ValRef("n", "Int")


# ------------------------------------------------------------------------------------------------ External's output files

def test_a_file_the_context_holds_wins_over_the_file_the_task_produced(tmp_path):
    """EXT/External.scala:136,141-143: the output files are the declared ones plus the context's Files of the task's
    outputs, and `context ++ files` keeps the last value of a name: the context's."""
    fallback, produced = tmp_path / "fallback", tmp_path / "result" / "out"
    fallback.mkdir()
    produced.mkdir(parents=True)
    got = fetch_output_files([N, OUT], [(OUT, produced)], {"n": 1, "outDir": fallback}, [], tmp_path / "r")
    assert got["outDir"] == fallback and got["n"] == 1
    alone = fetch_output_files([N, OUT], [(OUT, produced)], {"n": 1}, [], tmp_path / "r")
    assert alone["outDir"] == produced, "with no such File in its context, the task returns what it produced"
    unrelated = fetch_output_files([N, OUT], [(OUT, produced)], {"n": 1, "other": fallback}, [], tmp_path / "r")
    assert unrelated["outDir"] == produced and unrelated["other"] == fallback, "only Files of its outputs count"


def test_a_missing_file_of_the_context_throws(tmp_path):
    """EXT/External.scala:145-153: every file is existence-checked, the context's too."""
    produced = tmp_path / "result" / "out"
    produced.mkdir(parents=True)
    gone = tmp_path / "gone" / ".no-output"
    with pytest.raises(TaskFailure, match=r"^Output file .*/gone/\.no-output \(stored in variable outDir: "
                                          r"java\.io\.File\) doesn't exist, its parent directory .*/gone doesn't "
                                          r"exist either$"):
        fetch_output_files([OUT], [(OUT, produced)], {"outDir": gone}, [], tmp_path / "r")
    with pytest.raises(TaskFailure, match=r"Output file .*/result/missing \(stored in variable outDir: "
                                          r"java\.io\.File\) doesn't exist, its parent directory .*/result contains "
                                          r"\[out\]"):
        fetch_output_files([OUT], [(OUT, tmp_path / "result" / "missing")], {}, [], tmp_path / "r")


def test_output_files_in_the_work_directory_are_moved_out_of_it(tmp_path):
    """EXT/External.scala:155-175 (SystemExecTask, whose work directory is deleted after): a produced file is
    replaced by its real path and moved out; a file outside the work directory stays where it is."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    (work / "real").mkdir(parents=True)
    (work / "real" / "metrics.json").write_text("{}")
    (work / "out").symlink_to(work / "real")
    elsewhere.mkdir()
    result = tmp_path / "externalresult"
    got = fetch_output_files([OUT], [(OUT, work / "out")], {}, [work], result)
    assert got["outDir"].parent.parent == result and got["outDir"].name == "real", "realFile, then moved"
    assert (got["outDir"] / "metrics.json").is_file() and not (work / "real").exists()
    kept = fetch_output_files([OUT], [], {"outDir": elsewhere}, [work], result)
    assert kept["outDir"] == elsewhere and elsewhere.is_dir()


# ------------------------------------------------------------------------------------------------ tiny plans

TINY = '''
val n = Val[Int]
val exitCode = Val[Int]
val outDir = Val[File]
val fallback = {
  val folder = workDirectory / "fallback"
  folder.mkdirs()
  folder
}
val defaults = EmptyTask() set (
  (inputs, outputs) += (n, exitCode, outDir),
  n := 7,
  exitCode := -1,
  outDir := fallback
)
val produce = SystemExecTask(command = Seq("COMMAND"), returnValue = exitCode) set (
  (inputs, outputs) += n,
  outputFiles += ("out", outDir)
)
val onlyN = EmptyTask() set ((inputs, outputs) += n)
val slurm = SLURMEnvironment("me", "cluster.example.org")

WORKFLOW
'''


def tiny(tmp_path: Path, workflow: str, command: str = "mkdir out && echo ${n} > out/value") -> Engine:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "tiny.oms").write_text(TINY.replace("COMMAND", command).replace("WORKFLOW", workflow))
    return Engine(Plan("tiny.oms", Settings(work_directory=tmp_path)), tmp_path / "mole")


def test_a_system_exec_task_returns_the_fallback_its_try_task_hands_it(tmp_path):
    """TryTask (WF/task/TryTask.scala:40-66) runs the task on its whole context, fallbacks included, and
    SystemExecTask's output files follow External's rule (SE/SystemExecTask.scala:113,145)."""
    engine = tiny(tmp_path, "defaults -- TryTask(produce)")
    [result] = engine.run()
    assert result.values["exitCode"] == 0, "the command succeeded"
    assert result.values["outDir"] == tmp_path / "fallback", "... yet the fallback came back"


def test_a_mole_task_gives_the_external_task_only_what_its_root_passes_on(tmp_path):
    """MoleTask (WF/task/MoleTask.scala:48-63, 97-158): the root capsule gets the whole context, the transition
    to the next capsule delivers only its inputs, the result is the last capsule's job result."""
    engine = tiny(tmp_path, "defaults -- (TryTask(MoleTask(onlyN -- produce)) on slurm by 2)")
    [result] = engine.run()
    out = result.values["outDir"]
    assert out != tmp_path / "fallback" and (out / "value").read_text() == "7\n"
    assert result.values["exitCode"] == 0 and set(result.values) == {"n", "exitCode", "outDir"}
    received = {e.task: e.detail["received"] for e in engine.events if e.kind == "task"}
    assert received["onlyN"] == ["exitCode", "n", "outDir"], "the root is submitted with the whole context"
    assert received["produce"] == ["n"], "a transition delivers the next capsule's inputs only"


def test_a_mole_task_submits_its_root_with_the_whole_context(tmp_path):
    """MoleExecution.start/submit (WF/mole/MoleExecution.scala:194-221, 391): the root capsule of the inner mole
    is not cut down to its inputs, so a MoleTask whose root is the external task does not shield it."""
    engine = tiny(tmp_path, "defaults -- TryTask(MoleTask(produce))")
    [result] = engine.run()
    assert result.values["outDir"] == tmp_path / "fallback"


def test_the_mole_task_interface(tmp_path):
    """MoleTask.apply (MoleTask.scala:56-63): inputs of the root capsule (with its defaults' vals), outputs of the
    last capsule, defaults of the root task; TryTask adds the outputs to the inputs (TryTask.scala:48-50)."""
    (tmp_path / "tiny.oms").write_text(TINY.replace("WORKFLOW", "defaults"))
    plan = Plan("tiny.oms", Settings(work_directory=tmp_path))

    def evaluate(expression: str):
        return Evaluator(plan, {}).eval(parse(expression).root_node.children[0])

    mole = evaluate("MoleTask((onlyN set (n := 3)) -- produce)")
    assert mole.kind == "MoleTask" and [v.name for v in mole.inputs] == ["n"]
    assert {v.name for v in mole.outputs} == {"n", "exitCode", "outDir"}
    assert [(d.val.name, d.value) for d in mole.defaults] == [("n", 3)]
    strained = evaluate("MoleTask(defaults -- Strain(onlyN))")
    assert {v.name for v in strained.outputs} == {"n", "exitCode", "outDir"}, "a strained last capsule passes on"
    node = evaluate("TryTask(MoleTask(onlyN -- produce)) on slurm by 4")
    assert node.environment.kind == "SLURMEnvironment" and node.grouping == 4
    assert {v.name for v in node.task.inputs} == {"n", "exitCode", "outDir"}


def test_a_failure_inside_a_mole_task_is_the_mole_tasks_failure(tmp_path):
    """A task failing in the inner mole cancels it and MoleExecution.run rethrows (MoleExecution.scala:359-366,
    795-801): a TryTask returns its context; an inner `on env` is ignored (MoleTask.scala:122-138: local)."""
    caught = tiny(tmp_path / "a", "defaults -- TryTask(MoleTask(onlyN -- (produce on slurm)))", command="exit 3")
    [result] = caught.run()
    assert result.values["exitCode"] == -1 and result.values["outDir"] == tmp_path / "a" / "fallback"
    assert "doesn't exist" in next(e for e in caught.events if e.kind == "caught").detail["error"]
    bare = tiny(tmp_path / "b", "defaults -- MoleTask(onlyN -- produce)", command="exit 3")
    with pytest.raises(ExecutionCancelled, match=r"Output file .*/out \(stored in variable outDir: java\.io\.File\) "
                                                 r"doesn't exist"):
        bare.run()


def test_input_and_output_errors_read_as_openmoles(tmp_path):
    """InputOutputCheck.perform (WF/task/InputOutputCheck.scala:96-111)."""
    engine = tiny(tmp_path / "a", "onlyN")
    with pytest.raises(ExecutionCancelled, match=r"Input errors have been found in onlyN: Input data 'n: Int' has "
                                                 r"not been found\.$"):
        engine.run()
    engine = tiny(tmp_path / "b", "EmptyTask() set (outputs += n)")
    with pytest.raises(ExecutionCancelled, match=r"Output errors in .*: Output data 'n: Int' has not been found\.$"):
        engine.run()


def test_an_unmodelled_argument_of_an_external_task_is_an_error(tmp_path):
    engine = tiny(tmp_path, 'defaults -- (SystemExecTask(command = Seq("true"), workDirectory = "sub") set '
                            '((inputs, outputs) += n))')
    with pytest.raises(Exception, match=r"argument\(s\) \['workDirectory'\] not modelled"):
        engine.run()


PROBE = '''
val outDir = Val[File]
val code = Val[Int]
ContainerTask(
  workDirectory / "image.tar",
  "(touch $HOME/probe 2>/dev/null && echo writable || echo not writable) > /out/home; ls -A /tmp > /out/tmp; env > /out/env; (exit 3)",
  containerSystem = SingularityOverlay(embedResources = false),
  environmentVariables = Vector("GREETING" -> "hello"),
  returnValue = code
) set (
  resources += EmptyDirectory("/out"),
  outputFiles += ("/out", outDir)
)
'''


def test_the_container_gets_a_clean_environment_a_fresh_tmp_and_no_writable_home(tmp_path):
    """Singularity.executeImage (container:Singularity.scala:260, 273-289, 330-347): the script exports the image's
    ENV, the task's variables and HOME=/home/user, `--cleanenv` keeps the host's out, `--contain` gives a fresh
    /tmp; the image has no /home/user and the container runs as the caller, who cannot create it. The exit code is
    kept and the copy of /out still runs (CT/ContainerTask.scala:499-527)."""
    reason = namespaces_available()
    if reason:
        pytest.skip(f"the ContainerTask emulation {reason}")
    (tmp_path / "probe.oms").write_text(PROBE)
    [result] = Engine(Plan("probe.oms", Settings(work_directory=tmp_path)), tmp_path / "mole").run()
    out = result.values["outDir"]
    assert result.values["code"] == 3
    assert (out / "home").read_text() == "not writable\n"
    env = dict(line.split("=", 1) for line in (out / "env").read_text().splitlines() if "=" in line)
    assert env["HOME"] == "/home/user" and env["GREETING"] == "hello" and "PYTEST_CURRENT_TEST" not in env
    assert "PYTEST_CURRENT_TEST" in os.environ, "the host variable the container must not see"
    if _fresh_tmp_possible():  # not when this checkout lives under /tmp
        assert (out / "tmp").read_text() == "", "a fresh /tmp"


# ------------------------------------------------------------------------------------------------ the plans

def _sweep(plans: Path, tmp_path: Path, env: str, dry: bool) -> tuple[Engine, dict]:
    settings = Settings(work_directory=plans, environ={"OM_ENV": env, "OM_CLUSTER_DATA": str(plans)})
    plan = load_plan("sweep.oms", settings)
    first = Engine(plan, tmp_path / "samples").samples(plan.workflow().sampling)[0]
    sample = {**first, "epochs": 1, "max_train_tiles": 64}  # reach pointDefaults as a plan's factors would
    engine = Engine(plan, tmp_path / "mole", dry=dry, outer_sample=sample, inner_samples=1)
    return engine, sample


def _recorded_out_dirs(engine: Engine) -> list[Path]:
    return [Path(e.detail["values"]["outDir"]) for e in engine.events
            if e.kind == "hook" and e.detail["hook"] == "CSVHook" and "outDir" in e.detail["values"]]


@pytest.mark.parametrize("env", ["local", "slurm-gpu"])
def test_a_point_returns_the_folder_its_training_produced(plans, tmp_path, env):
    """Fails on the plans at 94506fe. Dry (no training): ContainerTask (local) and SystemExecTask (slurm-gpu)
    points, each one fold of the first configuration of sweep.oms."""
    engine, _ = _sweep(plans, tmp_path, env, dry=True)
    engine.run()
    [out_dir] = _recorded_out_dirs(engine)
    no_output = (plans / ".no-output").resolve()
    assert out_dir.resolve() != no_output, (
        f"the point's outDir is the TryTask's fallback {out_dir}, not the folder the training produced: the "
        f"external task received outDir in its context (External.fetchOutputFiles keeps the context's File)")
    assert not [e for e in engine.events if e.kind == "caught"]


@pytest.fixture
def plans_with_data(learn_data, tmp_path) -> Path:
    reason = namespaces_available()
    if reason:
        pytest.skip(f"the ContainerTask emulation {reason}")
    shards, splits = learn_data
    folder = copy_plans(tmp_path / "my plans", splits.read_text())
    (folder / "shards").symlink_to(shards)
    return folder


def test_a_successful_point_is_recorded_ok_with_its_metrics(plans_with_data, tmp_path):
    """Fails on the plans at 94506fe. One real point of sweep.oms on the CPU path (ContainerTask, 1 epoch, 64
    tiles): its row says ok with the metrics, and results/runs/<point_id>/ holds metrics.json."""
    plans = plans_with_data
    engine, sample = _sweep(plans, tmp_path, "local", dry=False)
    engine.run()
    lines = (plans / "results" / "points.csv").read_text().splitlines()
    header = lines[0].split(",")
    [row] = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
    assert row["exitCode"] == "0", row
    assert (row["status"], row["error"]) == ("ok", ""), (
        f"a successful point recorded {row['status']}: {row['error']!r} (outDir = {row['outDir']})")
    assert 0.0 <= float(row["val_auc"]) <= 1.0 and not math.isnan(float(row["val_patient_auc"]))
    assert row["arch"] == sample["arch"] and row["epochs"] == "1"
    run = plans / "results" / "runs" / row["point_id"]
    assert (run / "metrics.json").is_file() and (run / "predictions.csv").is_file()


# ------------------------------------------------------------------------------------------------ citations

MIRROR = Path(os.environ.get("OPENMOLE_SOURCE", "/work/.mirror/openmole+openmole/repo"))

# (file at v22.1, first line, text that must stand on the lines cited from there): the rules engine.py cites
CITED = [
    ("openmole/plugins/org.openmole.plugin.task.external/src/main/scala/org/openmole/plugin/task/external/"
     "External.scala", 130, "InputOutputCheck.filterOutput(outputs, context).values.filter("),
    ("openmole/plugins/org.openmole.plugin.task.external/src/main/scala/org/openmole/plugin/task/external/"
     "External.scala", 136, "val outputContext = context ++ resultContext"),
    ("openmole/plugins/org.openmole.plugin.task.external/src/main/scala/org/openmole/plugin/task/external/"
     "External.scala", 143, "val allFiles = (fileOutputs ++ contextFiles(outputs, context)).distinct"),
    ("openmole/plugins/org.openmole.plugin.task.external/src/main/scala/org/openmole/plugin/task/external/"
     "External.scala", 153, "doesn't exist, $parentMessage"),
    ("openmole/core/org.openmole.core.context/src/main/scala/org/openmole/core/context/Context.scala", 157,
     "def ++(vs: Iterable[Variable[?]]): Context = Context.fromMap(variables ++ (vs.map"),
    ("openmole/plugins/org.openmole.plugin.task.container/src/main/scala/org/openmole/plugin/task/container/"
     "ContainerTask.scala", 619, "External.fetchOutputFiles("),
    ("openmole/plugins/org.openmole.plugin.task.systemexec/src/main/scala/org/openmole/plugin/task/systemexec/"
     "SystemExecTask.scala", 145, "External.fetchOutputFiles(external, systemExecTask.outputs, preparedContext"),
    ("openmole/core/org.openmole.core.workflow/src/main/scala/org/openmole/core/workflow/task/TryTask.scala", 49,
     "dsl.inputs ++= task.outputs"),
    ("openmole/core/org.openmole.core.workflow/src/main/scala/org/openmole/core/workflow/task/TryTask.scala", 63,
     "try TaskExecution.execute(taskProcessing, executionContext).from(context)"),
    ("openmole/core/org.openmole.core.workflow/src/main/scala/org/openmole/core/workflow/task/MoleTask.scala", 60,
     "dsl.inputs ++= mole.root.inputs(mole, Sources.empty, Hooks.empty).toSeq"),
    ("openmole/core/org.openmole.core.workflow/src/main/scala/org/openmole/core/workflow/task/MoleTask.scala", 153,
     "try execution.run(Some(context), validate = false)"),
    ("openmole/core/org.openmole.core.workflow/src/main/scala/org/openmole/core/workflow/mole/MoleExecution.scala",
     391, "submit(moleExecution.rootSubMoleExecution, moleExecution.mole.root, context.getOrElse(Context.empty)"),
    ("openmole/core/org.openmole.core.workflow/src/main/scala/org/openmole/core/workflow/task/"
     "InputOutputCheck.scala", 103, "try initializedContext + process.from(initializedContext)"),
    ("openmole/core/org.openmole.core.workflow/src/main/scala/org/openmole/core/workflow/transition/"
     "Transition.scala", 82, "ContextAggregator.aggregate(MoleExecution.cachedCapsuleInputs("),
]


def test_the_cited_lines_of_openmole_say_what_the_engine_ports():
    """Runs where OpenMOLE's git repository is at hand (OPENMOLE_SOURCE); a moved line fails here."""
    if not (MIRROR / "HEAD").exists() and not (MIRROR / ".git").exists():
        pytest.skip(f"no OpenMOLE repository at {MIRROR} (set OPENMOLE_SOURCE)")
    for path, line, snippet in CITED:
        source = subprocess.run(["git", "-C", str(MIRROR), "show", f"v22.1:{path}"], capture_output=True,
                                text=True, check=True).stdout.splitlines()
        assert snippet in source[line - 1], f"{Path(path).name}:{line} is now {source[line - 1].strip()!r}"
