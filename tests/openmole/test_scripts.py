"""The OpenMOLE plans as text: syntax, names, the train command they build, the structure a sweep needs.

OpenMOLE cannot run here (Java 21 and Singularity are missing), so the scripts are checked without it; what they
do when they run is in ``test_dataflow.py`` (the data flow) and ``test_engine.py`` (real points, in an emulation
of OpenMOLE taken from its source). Here:

* every ``.oms`` file, and the code of every ``ScalaTask``, parses with tree-sitter's Scala grammar, with no
  construct that tree-sitter reads differently from Scala (a line ending in an infix operator);
* the ``python -m python_task train`` command uses only options of ``train --help``, the required ones included,
  each ``${value}`` named like its option; every architecture, stain, augmentation and optimizer swept is
  registered; every metric parsed is a contract metric;
* every identifier not declared in the scripts is an OpenMOLE DSL name (the reference list, or a name read in
  OpenMOLE's source) or a Scala/Java standard name;
* the structure a sweep needs: one place chooses the environment, lazily; a point never calls ``exit``; the GPU
  path runs ``apptainer exec --nv --cleanenv`` with quoted paths; the number of folds comes from splits.json.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from python_task.training.metrics import RESULT_METRICS

from .dsl import OMS_DIR, Settings, parse, string_value, syntax_problems, text, walk
from .engine import load_plan

PLANS = ("sweep.oms", "lhs.oms", "nsga2.oms", "probe_gpu.oms")
SCRIPTS = ("factors.oms", "common.oms", *PLANS)
# A copy of the OpenMOLE reference notes (not part of the repository), when PYTHON_TASK_OPENMOLE_REFERENCE names one.
REFERENCE = Path(os.environ.get("PYTHON_TASK_OPENMOLE_REFERENCE", "")) if os.environ.get(
    "PYTHON_TASK_OPENMOLE_REFERENCE") else None


# The reference's §9 "DSL identifiers a script of this kind uses" (checked against the reference when present).
REFERENCE_DSL = frozenset("""
Val File workDirectory args set inputs outputs inputFiles outputFiles resources EmptyDirectory mapped := in x zip ++
withIndex withName filter take shuffle sample repeat on by hook evaluate as when -- -< >- display TrueFalse
ContainerTask PythonTask SystemExecTask ScalaTask EmptyTask TryTask RetryTask MoleTask
DockerImage SavedDockerImage HostFile SingularityOverlay SingularityMemory SingularityFlatImage
DirectSampling Replication SingleRun NSGA2Evolution Stochastic SteadyState Island Suggestion
LHS SobolSampling CSVSampling OMRSampling OneFactorSampling LogRangeDomain RangeDomain
CSVHook AppendToCSVFileHook AppendToFileHook CopyFileHook DisplayHook SaveHook
LocalEnvironment SLURMEnvironment EGIEnvironment SSHEnvironment PBSEnvironment SGEEnvironment CondorEnvironment
OAREnvironment DispatchEnvironment RuntimeSetting
average median standardDeviation variance medianAbsoluteDeviation meanSquaredError rootMeanSquaredError percentile
second seconds minute minutes hour hours day days megabyte megabytes gigabyte gigabytes
_file_ _parent_ omr
""".split())
# DSL names the plans use beyond that list, each read in OpenMOLE's source (v22.1 / dev f27e8a2c7a).
SOURCE_DSL = {
    "Strain": "core.workflow composition/package.scala:658-673 (object Strain)",
    "++=": "core.setter package.scala:112, 125, 163 (inputs, outputs, (inputs, outputs) ++= an Iterable of Vals)",
}
DSL_IDENTIFIERS = REFERENCE_DSL | set(SOURCE_DSL)
UNITS = frozenset("second seconds minute minutes hour hours day days megabyte megabytes gigabyte gigabytes".split())
SCALA_STANDARD = frozenset("""
Seq Vector List Map Set Some None Option Array Double Int Long String Boolean math sys Runtime scala java
+ - * / % == != < > <= >= && || ! += -> until to
""".split())

TRAIN_MARKER = "python -m python_task train"


# ------------------------------------------------------------------------------------------------ helpers

def source(name: str) -> str:
    return (OMS_DIR / name).read_text()


def tree(name: str):
    return parse(source(name))


def imports(name: str) -> list[str]:
    return [m.group(1) + ".oms" for m in re.finditer(r"^\s*import\s+_file_\.(\w+)\._", source(name), re.M)]


def with_imports(name: str) -> list[str]:
    return [*imports(name), name]


def calls(name: str, function: str) -> list:
    return [n for n in walk(tree(name).root_node)
            if n.type == "call_expression" and text(n.child_by_field_name("function")) == function]


def scala_task_codes(name: str) -> list[str]:
    """The code of each ScalaTask of a script: a string literal, or evaluated (common.oms joins factors.oms' lines)."""
    from .dsl import Evaluator

    plan = load_plan(name if name in PLANS else "sweep.oms")
    codes = []
    for call in calls(name, "ScalaTask"):
        argument = call.child_by_field_name("arguments").named_children[0]
        codes.append(string_value(argument) if argument.type == "string" else Evaluator(plan, {}).eval(argument))
    return codes


def same(a, b) -> bool:
    return a is not None and b is not None and (a.start_byte, a.end_byte, a.type) == (b.start_byte, b.end_byte, b.type)


@pytest.fixture(scope="module")
def common():
    """common.oms evaluated as OpenMOLE would, beside a splits.json of 5 folds."""
    return load_plan("sweep.oms")


def train_option_strings() -> tuple[set[str], set[str]]:
    """(every flag, the required flags) of ``train``, from TrainConfig (the parser is generated from it)."""
    from python_task.training.config import train_options

    options = train_options().values()
    return {o.flag for o in options}, {o.flag for o in options if o.required}


def command_options(command: str) -> list[str]:
    """Options of the train command proper (what follows ``python -m python_task train``)."""
    command = command[command.index(TRAIN_MARKER):]
    command = command.split(";", 1)[0]
    return re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", command)


def swept_values(factor: str) -> set[str]:
    """String levels given to a factor anywhere in the plans: ``f in Seq("a", ...)`` and ``f := "a"``."""
    values: set[str] = set()
    for n in SCRIPTS:
        src = source(n)
        for m in re.finditer(rf"\b{factor}\s+in\s+Seq\(([^)]*)\)", src):
            values.update(re.findall(r'"([^"]*)"', m.group(1)))
        values.update(re.findall(rf'\b{factor}\s*:=\s*"([^"]*)"', src))
    return values


# ------------------------------------------------------------------------------------------------ syntax

def test_the_scripts_are_there_and_the_plans_import_common():
    for name in SCRIPTS:
        assert (OMS_DIR / name).is_file(), name
    for name in PLANS:
        assert "common.oms" in imports(name), f"{name} does not import common.oms"
    assert (OMS_DIR / "README.md").is_file()


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_parses_without_error_nodes(name):
    t = tree(name)
    assert not syntax_problems(t), syntax_problems(t)


@pytest.mark.parametrize("name", SCRIPTS)
def test_no_construct_that_tree_sitter_reads_otherwise_than_scala(name):
    """A line ending in an infix operator continues on the next line in Scala (spec 1.2: a newline after an infix
    operator is not a separator); tree-sitter reads it as a postfix operator and a new statement. Wrap such an
    expression in parentheses, where Scala and tree-sitter agree."""
    postfix = [f"line {n.start_point[0] + 1}: {text(n)[:60]!r}" for n in walk(tree(name).root_node)
               if n.type == "postfix_expression"]
    assert not postfix, postfix


@pytest.mark.parametrize("name", SCRIPTS)
def test_scala_task_code_parses(name):
    for code in scala_task_codes(name):
        t = parse("object ScalaTaskCode {\n" + code + "\n}\n")
        assert not syntax_problems(t), (name, syntax_problems(t), code[:200])


def test_the_syntax_checks_catch_errors():
    broken = 'val t = ScalaTask("""val x = 1""") set (\n  inputs += (a, b\n)\nDirectSampling(evaluation = t, '
    assert syntax_problems(parse(broken))
    assert syntax_problems(parse("object X {\n val y = (1 +\n}\n"))
    assert any(n.type == "postfix_expression" for n in walk(parse("val s =\n  (a in Seq(1)) x\n  (b in Seq(2))\n")
                                                            .root_node))


def test_the_reference_dsl_list_is_copied_faithfully():
    if REFERENCE is None or not REFERENCE.is_file():
        pytest.skip("no OpenMOLE reference notes (set PYTHON_TASK_OPENMOLE_REFERENCE to a copy)")
    section = REFERENCE.read_text().split("## 9.", 1)[1].split("## 10.", 1)[0]
    block = section.split("```", 2)[1]
    tokens = {t for line in block.splitlines() if not line.lstrip().startswith("#") for t in line.split()}
    assert REFERENCE_DSL <= tokens, sorted(REFERENCE_DSL - tokens)


# ------------------------------------------------------------------------------------------------ identifiers

def _declared_names(t) -> set[str]:
    names = set()
    for n in walk(t.root_node):
        if n.type in ("val_definition", "var_definition"):
            p = n.child_by_field_name("pattern")
            if p is not None:
                names.update(text(i) for i in walk(p) if i.type == "identifier")
        elif n.type == "function_definition":
            names.add(text(n.child_by_field_name("name")))
            params = n.child_by_field_name("parameters")
            if params is not None:
                names.update(text(p.child_by_field_name("name")) for p in params.named_children
                             if p.type == "parameter")
        elif n.type == "lambda_expression":
            params = n.child_by_field_name("parameters")
            if params is not None:
                names.update(text(i) for i in walk(params) if i.type == "identifier")
        elif n.type == "case_clause":
            pattern = n.child_by_field_name("pattern")
            if pattern is not None:  # names bound by a pattern: `case Some(m) =>`
                names.update(text(i) for i in walk(pattern) if i.type == "identifier")
    return names


def _used_names(t) -> dict[str, int]:
    """Identifiers and operators used at the DSL level -> first line (declarations, fields, named arguments and
    import paths excluded; numeric-literal fields such as 4.hours are returned as units)."""
    used: dict[str, int] = {}

    def use(name: str, node) -> None:
        used.setdefault(name, node.start_point[0] + 1)

    for n in walk(t.root_node):
        parent = n.parent
        if n.type == "field_expression":
            value = n.child_by_field_name("value")
            if value is not None and value.type in ("integer_literal", "floating_point_literal"):
                use(text(n.child_by_field_name("field")), n)
            continue
        if n.type == "operator_identifier":
            use(text(n), n)
            continue
        if n.type != "identifier" or parent is None:
            continue
        if parent.type == "field_expression" and same(parent.child_by_field_name("field"), n):
            continue
        if parent.type == "assignment_expression" and same(parent.child_by_field_name("left"), n) \
                and parent.parent is not None and parent.parent.type in ("arguments", "tuple_expression"):
            continue  # a named argument
        if parent.type in ("import_declaration", "stable_identifier", "namespace_selectors", "stable_type_identifier"):
            continue
        if parent.type in ("val_definition", "var_definition") and same(parent.child_by_field_name("pattern"), n):
            continue
        if parent.type in ("function_definition", "parameter") and same(parent.child_by_field_name("name"), n):
            continue
        if parent.type == "lambda_expression" and same(parent.child_by_field_name("parameters"), n):
            continue
        use(text(n), n)
    return used


@pytest.mark.parametrize("name", SCRIPTS)
def test_identifiers_are_declared_or_dsl_names(name):
    declared = set().union(*(_declared_names(tree(n)) for n in with_imports(name)))
    used = _used_names(tree(name))
    unknown = {k: line for k, line in used.items()
               if k not in declared and k not in DSL_IDENTIFIERS and k not in SCALA_STANDARD}
    assert not unknown, f"{name}: names neither declared nor OpenMOLE DSL names: {unknown}"
    assert {k for k in used if k in UNITS} <= DSL_IDENTIFIERS


def test_the_identifier_check_catches_unknown_names():
    t = parse('val t = ContainerTask("img", "cmd") set (inputs += x)\nDirectSamplingz(evaluation = t on env by 4)\n'
              'val s = 4.hourz\n')
    used = _used_names(t)
    assert {"DirectSamplingz", "hourz", "env"} <= set(used)
    assert "evaluation" not in used and "ContainerTask" in used


# ------------------------------------------------------------------------------------------------ the train command

def test_train_command_uses_only_options_of_train_help(common):
    command = common.value("trainCommand")
    options, required = train_option_strings()
    used = command_options(command)
    unknown = sorted(set(used) - options)
    assert not unknown, f"options not in `train --help`: {unknown}"
    missing = sorted(required - set(used))
    assert not missing, f"required train options missing: {missing}"
    assert len(used) == len(set(used)), "an option is given twice"


def test_the_option_check_catches_a_wrong_option():
    options, required = train_option_strings()
    assert "--learning-rate" not in options and "--arch" in required and "--fold" in required
    assert command_options("timeout 1m python -m python_task train --lr 1 --bogus x; rm --force y") == ["--lr", "--bogus"]


def test_command_values_are_vals_named_like_their_options(common):
    command = common.value("trainCommand")
    vals = common.vals()
    for option, value in re.findall(r"(--[a-z][a-z0-9-]*)\s+(\S+)", command):
        refs = re.findall(r"\$\{(\w+)\}", value)
        if not refs:
            continue  # a fixed value, e.g. --shards /data/shards
        assert refs == [option[2:].replace("-", "_")], f"{option} {value}"
        assert refs[0] in vals, f"${{{refs[0]}}} is not a declared Val"
    # --augment turns the '+'-joined Val into train's comma-separated list, in the shell
    assert "--augment $(echo ${augment} | tr + ,)" in command


@pytest.mark.parametrize("name", SCRIPTS)
def test_dollar_braces_are_openmole_values_only(name):
    """``${...}`` is always OpenMOLE code (core.argument ExpandedString): no shell ``${VAR}``, only Vals."""
    plan_vals = {m.group(1) for n in with_imports(name) for m in re.finditer(r"\bval\s+(\w+)\s*=\s*Val\[", source(n))}
    scala_spans = [(c.child_by_field_name("arguments").start_byte, c.child_by_field_name("arguments").end_byte)
                   for c in calls(name, "ScalaTask")]
    for n in walk(tree(name).root_node):
        if n.type == "string" and not any(a <= n.start_byte and n.end_byte <= b for a, b in scala_spans):
            for ref in re.findall(r"\$\{([^}]*)\}", string_value(n)):
                assert ref in plan_vals, f"{name}: ${{{ref}}} is not a Val of the script: {text(n)[:100]!r}"


def test_the_point_never_exits_and_keeps_the_code(common):
    """OpenMOLE appends its own lines after the command in one sh script (ContainerTask.scala:482-510): an
    ``exit`` anywhere in the command would leave before the copy of /out."""
    point = common.value("pointCommand")
    assert TRAIN_MARKER in point
    assert not re.search(r"(?<![(\w])exit\b", point), "use `(exit $code)`, never `exit`"
    assert point.rstrip().endswith("(exit $code)")
    assert "'" not in point, "the GPU path wraps the command in sh -c '...'"
    kill_after, limit = common.value("pointKillAfterMinutes"), common.value("pointTimeLimitMinutes")
    assert point.startswith(f"timeout --kill-after={kill_after}m {limit}m "), "local runs: no memory bound"


@pytest.mark.parametrize("env", ["slurm", "slurm-gpu", "egi"])
def test_a_batch_job_outlasts_its_points_and_holds_their_memory(env):
    """A job killed at its time limit, or ended OUT_OF_MEMORY (a state gridscale does not know), is resubmitted
    for ever: every point of a job must end, killed at worst, inside the job's time, and must fail inside its
    memory bound before the job's limit is reached."""
    plan = load_plan("sweep.oms", Settings(environ={"OM_ENV": env}))
    per_point = plan.value("pointTimeLimitMinutes") + plan.value("pointKillAfterMinutes")
    margin = plan.value("batchJobMinutes") - plan.value("pointsPerJob") * per_point
    assert margin == plan.value("jobMarginMinutes") >= 15, "minutes left for the job's own start"
    point = plan.value("pointCommand")
    bound_mb = plan.value("pointMemoryMB")
    assert point.startswith(f"ulimit -d {bound_mb * 1024}; timeout --kill-after="), "RLIMIT_DATA in kB"
    environment = plan.value("env").args
    job_mb = (environment["memory"].value if env != "egi" else plan.value("egiSlotMemoryMB"))
    runtime_heap_mb = environment["openMOLEMemory"].value
    assert bound_mb + runtime_heap_mb + 1024 <= job_mb, "the runtime's heap and ~1 GB beside the point"
    assert bound_mb >= 2048, "TensorFlow needs room to train"
    if env == "egi":
        assert environment["cpuTime"].value == plan.value("batchJobMinutes")
    else:
        assert environment["time"].value == plan.value("batchJobMinutes")


# ------------------------------------------------------------------------------------------------ names swept

def test_swept_architectures_are_registered():
    from python_task.training.architectures import ARCHITECTURES

    archs = swept_values("arch")
    assert len(archs) >= 3
    assert archs <= set(ARCHITECTURES), sorted(archs - set(ARCHITECTURES))


def test_swept_stains_are_registered():
    from python_task.transforms.stain import STAIN_METHODS

    stains = swept_values("stain")
    assert {"none", "macenko"} <= stains
    assert stains <= set(STAIN_METHODS), sorted(stains - set(STAIN_METHODS))


def test_swept_augmentations_are_registered():
    from python_task.transforms.augmentations import AUGMENTATIONS

    levels = swept_values("augment")
    assert "none" in levels and len(levels) >= 3
    for level in levels:
        assert "," not in level, f"{level!r}: CSVHook does not quote values; join augmentations with '+'"
        parts = level.split("+")
        unknown = [p for p in parts if p != "none" and p not in AUGMENTATIONS]
        assert not unknown, f"{level!r}: {unknown} not in AUGMENTATIONS"
        assert "none" not in parts or parts == ["none"], level


def test_swept_optimizers_exist():
    from python_task.training.config import OPTIMIZERS

    assert swept_values("optimizer") <= set(OPTIMIZERS)


# ------------------------------------------------------------------------------------------------ metrics

def test_parsed_metrics_are_the_result_metrics(common):
    """Every metric the local runner's results.csv holds (the contract's, the selection rule and the patient counts
    the report shows beside each figure) is parsed from metrics.json into a Val[Double] of the same name."""
    from . import ports

    parse_task = common.value("parseMetrics")
    parsed = ports.parsed_metrics(parse_task.args["code"])
    assert all(name == key for name, key in parsed.items()), parsed
    assert set(parsed) == set(RESULT_METRICS), sorted(set(parsed) ^ set(RESULT_METRICS))
    vals = common.vals()
    for metric in RESULT_METRICS:
        assert vals[metric].type == "Double", f"{metric} is not a Val[Double]"
    assert set(RESULT_METRICS) | {"status", "error", "point_id", "out_dir"} <= set(parse_task.output_names())


def test_a_factor_a_plan_does_not_sweep_trains_with_trains_own_default(common):
    """pointDefaults fills every factor a plan leaves out: with train's default, so that a sweep over (say) the
    learning rate alone trains what `train` would (e.g. augment flip,rot90, the default since issue 14)."""
    from python_task.training.config import train_options

    options = train_options()
    node = common.value("pointDefaults")
    plan_defaults = {d.val.name: d.value for d in node.defaults if d.val.name not in ("exitCode", "outDir", "fold")}
    assert {"lr", "augment", "epochs", "patience"} <= set(plan_defaults)
    for name, value in plan_defaults.items():
        if options[name].required:  # arch: train has no default, the plans choose simple_cnn
            continue
        expected = options[name].fallback  # the AugmentOptions default for the augmentation ranges
        if name == "augment":  # joined with '+' in the plans (CSVHook does not quote)
            value = value.replace("+", ",")
        assert value == expected, f"pointDefaults: {name} := {value!r}, train's default is {expected!r}"


# ------------------------------------------------------------------------------------------------ structure

def test_environment_is_chosen_in_one_place_with_lazy_environments():
    common = source("common.oms")
    assert 'val envName = sys.env.getOrElse("OM_ENV", args.headOption.getOrElse("local"))' in common
    for env in ("local", "slurm", "slurmGpu", "egi"):
        assert re.search(rf"^lazy val {env}\s*=", common, re.M), f"{env} must be a lazy val"
    assert common.count("EGIEnvironment(") == 1
    for plan in ("sweep.oms", "lhs.oms", "nsga2.oms"):
        assert "Environment(" not in source(plan), f"{plan} builds its own environment"


def test_gpu_path_runs_apptainer_with_nv_and_a_clean_environment():
    from .dsl import Settings

    plan = load_plan("sweep.oms", Settings(environ={"OM_ENV": "slurm-gpu", "OM_CLUSTER_DATA": "/scratch/my data"}))
    command = plan.value("gpuCommand")
    assert command.startswith("runner=$(command -v apptainer || command -v singularity) || {")
    assert '"$runner" exec --nv --cleanenv --no-home $gpuenv --env KEEP_MODEL=' in command
    assert 'gpuenv="--env CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"' in command, "works with either runner"
    assert "APPTAINERENV_" not in command and "SINGULARITYENV_" not in command
    assert '-B "/scratch/my data/shards":/data/shards:ro' in command, "host paths quoted"
    assert '-B "$PWD/out":/out' in command and '"/scratch/my data/python-task-gpu.sif"' in command
    probe = source("probe_gpu.oms")
    assert "findRunner" in probe and "apptainerExec" in probe and "passCudaDevices" in probe and "nvidia-smi" in probe
    assert "jax.devices()" in probe and "accelerator_present" in probe and "slurmGpu" in probe


def test_every_system_exec_task_has_one_command():
    """SystemExecTask runs its first command only (SystemExecTask.scala:63 and :123, `command.find`)."""
    for name in SCRIPTS:
        for call in calls(name, "SystemExecTask"):
            args = call.child_by_field_name("arguments")
            seqs = [a for a in walk(args) if a.type == "call_expression" and text(a.child_by_field_name("function"))
                    == "Seq" and a.parent.type == "assignment_expression"
                    and text(a.parent.child_by_field_name("left")) == "command"]
            assert seqs, f"{name}: give SystemExecTask's command as command = Seq(one command)"
            assert len(seqs[0].child_by_field_name("arguments").named_children) == 1, f"{name}: one command"


def test_points_are_grouped_on_batch_environments_only():
    """SLURM: a job's fixed start cost shared; EGI: a job's downloads (the SIF, the shards archive) shared."""
    from .dsl import Settings

    grouping = {e: load_plan("sweep.oms", Settings(environ={"OM_ENV": e})).value("pointsPerJob")
                for e in ("local", "local-gpu", "slurm", "slurm-gpu", "egi")}
    assert grouping["slurm"] > 1 and grouping["slurm-gpu"] > 1 and grouping["egi"] > 1
    assert grouping["local"] == grouping["local-gpu"] == 1


def test_the_number_of_folds_comes_from_splits_json(tmp_path):
    from .dsl import Settings

    for name in ("sweep.oms", "lhs.oms", "nsga2.oms"):
        assert not re.search(r"\bval\s+K\s*=", source(name)), f"{name} sets its own number of folds"
    folder = tmp_path / "plans"
    folder.mkdir()
    for name in SCRIPTS:
        (folder / name).write_text(source(name))
    (folder / "splits.json").write_text('{\n  "format_version": 1,\n  "n_folds": 4,\n  "folds": []\n}\n')
    plan = load_plan("sweep.oms", Settings(work_directory=folder))
    assert plan.value("K") == 4
    (folder / "splits.json").unlink()
    with pytest.raises(FileNotFoundError, match="make it with `python -m python_task split"):
        load_plan("sweep.oms", Settings(work_directory=folder)).value("K")


def test_hooks_and_aggregation():
    common = source("common.oms")
    assert "parseMetrics hook CSVHook(pointsCsv)" in common
    assert "sampling = fold in (0 until K)" in common
    cv = common.split("def crossValidation", 1)[1]
    for line in ("val_patient_auc evaluate meanOf as mean_val_patient_auc",
                 "val_patient_auc evaluate sdOf as std_val_patient_auc",
                 "val_auc evaluate meanOf as mean_val_auc"):
        assert line in cv
    sweep = source("sweep.oms")
    assert ('crossValidation(workDirectory / "results" / "points.csv") '
            'hook CSVHook(workDirectory / "results" / "configs.csv")') in sweep
    nsga2 = source("nsga2.oms")
    assert "NSGA2Evolution(" in nsga2 and 'hook (workDirectory / "results" / "nsga2.omr"' in nsga2
    assert "objective = Seq(neg_mean_val_patient_auc, model_params)" in nsga2


def test_java_double_formatting():
    from .dsl import java_double

    assert java_double(0.001) == "0.001" and java_double(1e-4) == "1.0E-4" and java_double(0.0) == "0.0"
    assert java_double(8.0) == "8.0" and java_double(3e-5) == "3.0E-5" and java_double(0.0003) == "3.0E-4"
    assert java_double(1.5e-6) == "1.5E-6" and java_double(12345678.0) == "1.2345678E7"
    assert java_double(30.0) == "30.0" and java_double(float("nan")) == "NaN" and java_double(1e7) == "1.0E7"
    assert java_double(-2.5e-5) == "-2.5E-5"
