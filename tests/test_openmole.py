"""OpenMOLE plans (``openmole/*.oms``): syntax, the train command they build, the names they use, one real point.

OpenMOLE cannot run here (Java 21 and Singularity are missing), so the scripts are checked without it:

* every ``.oms`` file, and the code of every ``ScalaTask`` in it, parses with tree-sitter's Scala grammar;
* the ``python -m python_task train`` command they build uses only options of ``train --help``, the required
  ones included, with each ``${value}`` named like its option; every architecture, stain and augmentation they
  sweep is in the registries; every metric they parse is a contract metric, and is in a real ``metrics.json``;
* every identifier that is not declared in the scripts is an OpenMOLE DSL name listed in the reference
  (``shared/reference/openmole.md`` §9) or a Scala/Java standard name;
* the structure the reference asks for: the environment chosen in one place with lazy environments, failures
  recorded instead of cancelling, ``/out`` as an ``EmptyDirectory``, the GPU path through ``apptainer exec --nv``,
  both data modes, ``by N`` on SLURM, the CSV/OMR hooks, the fold aggregation;
* the point command extracted from ``sweep.oms`` (``${...}`` replaced by sample values, the container paths by
  temporary folders) runs for real with ``sh -c`` on a tiny synthetic cohort and writes the metrics the script
  parses, and the parse regex of the ``ScalaTask`` reads them back.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from decimal import Decimal
from functools import lru_cache
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
OMS_DIR = REPO_ROOT / "openmole"
PLANS = ("sweep.oms", "lhs.oms", "nsga2.oms", "probe_gpu.oms")
SCRIPTS = ("common.oms", *PLANS)
REFERENCE = REPO_ROOT.parent / "shared" / "reference" / "openmole.md"

# The contract's metrics (shared/design/contracts.md, "Metrics").
CONTRACT_METRICS = ("val_auc", "val_accuracy", "val_balanced_accuracy", "val_sensitivity", "val_specificity",
                    "val_f1", "val_loss", "val_slide_auc", "val_patient_auc", "threshold", "train_seconds",
                    "epochs_run", "n_train_tiles", "n_val_tiles", "n_params")

# The reference's §9 "DSL identifiers a script of this kind uses" (checked against the reference when present).
DSL_IDENTIFIERS = frozenset("""
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
UNITS = frozenset("second seconds minute minutes hour hours day days megabyte megabytes gigabyte gigabytes".split())
# Scala / Java standard names and operators the scripts may use besides the DSL.
SCALA_STANDARD = frozenset("""
Seq Vector List Map Set Some None Option Array Double Int Long String Boolean math sys Runtime
+ - * / % == != < > <= >= && || ! += -> until to
""".split())

TRAIN_MARKER = "python -m python_task train"


# ------------------------------------------------------------------------------------------------ helpers

@lru_cache(maxsize=None)
def _parser():
    ts = pytest.importorskip("tree_sitter")
    tss = pytest.importorskip("tree_sitter_scala")
    return ts.Parser(ts.Language(tss.language()))


def parse(source: str):
    return _parser().parse(source.encode())


def walk(node):
    yield node
    for child in node.children:
        yield from walk(child)


def text(node) -> str:
    return node.text.decode()


def same(a, b) -> bool:
    return a is not None and b is not None and (a.start_byte, a.end_byte, a.type) == (b.start_byte, b.end_byte, b.type)


def syntax_problems(tree) -> list[str]:
    return [f"{n.type} at line {n.start_point[0] + 1}: {text(n)[:80]!r}"
            for n in walk(tree.root_node) if n.type == "ERROR" or n.is_missing]


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", '"': '"', "'": "'", "\\": "\\"}


def string_value(node_or_text) -> str:
    """The value of a Scala string literal (plain with escapes, or triple-quoted raw)."""
    s = node_or_text if isinstance(node_or_text, str) else text(node_or_text)
    if s.startswith('"""'):
        return s[3:-3]
    return re.sub(r"\\(u[0-9a-fA-F]{4}|.)",
                  lambda m: chr(int(m.group(1)[1:], 16)) if m.group(1).startswith("u") else _ESCAPES[m.group(1)],
                  s[1:-1])


@lru_cache(maxsize=None)
def source(name: str) -> str:
    return (OMS_DIR / name).read_text()


@lru_cache(maxsize=None)
def tree(name: str):
    return parse(source(name))


def imports(name: str) -> list[str]:
    """Files imported with ``import _file_.X._`` (same folder only, as the scripts do)."""
    return [m.group(1) + ".oms" for m in re.finditer(r"^\s*import\s+_file_\.(\w+)\._", source(name), re.M)]


def with_imports(name: str) -> list[str]:
    return [*imports(name), name]


def val_definitions(name: str) -> dict[str, object]:
    """``val``/``lazy val`` name -> value node, top level of the file."""
    out = {}
    for node in tree(name).root_node.children:
        if node.type == "val_definition":
            pattern, value = node.child_by_field_name("pattern"), node.child_by_field_name("value")
            if pattern is not None and pattern.type == "identifier":
                out[text(pattern)] = value
    return out


def all_val_definitions(name: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for n in with_imports(name):
        out.update(val_definitions(n))
    return out


def declared_vals(names) -> dict[str, str]:
    """``val x = Val[T]`` -> {x: T} over the given files."""
    out = {}
    for n in names:
        for m in re.finditer(r"\bval\s+(\w+)\s*=\s*Val\[(\w+)\]", source(n)):
            out[m.group(1)] = m.group(2)
    return out


def evaluate_string(node, vals: dict) -> str:
    """Evaluate a string expression made of literals, references to other vals and ``+``."""
    if node.type == "string":
        return string_value(node)
    if node.type == "identifier":
        return evaluate_string(vals[text(node)], vals)
    if node.type == "parenthesized_expression":
        return evaluate_string(node.named_children[0], vals)
    if node.type == "infix_expression" and text(node.child_by_field_name("operator")) == "+":
        return (evaluate_string(node.child_by_field_name("left"), vals)
                + evaluate_string(node.child_by_field_name("right"), vals))
    raise ValueError(f"not a constant string expression: {text(node)[:80]}")


def calls(name: str, function: str) -> list:
    return [n for n in walk(tree(name).root_node)
            if n.type == "call_expression" and text(n.child_by_field_name("function")) == function]


def first_string_argument(call) -> str:
    args = call.child_by_field_name("arguments")
    first = args.named_children[0]
    assert first.type == "string", f"first argument is not a string literal: {text(call)[:80]}"
    return string_value(first)


def scala_task_codes(name: str) -> list[str]:
    return [first_string_argument(c) for c in calls(name, "ScalaTask")]


def dsl_strings(name: str) -> list[str]:
    """String literals of the DSL level (the code of ScalaTasks excluded)."""
    scala_code_spans = [(c.child_by_field_name("arguments").named_children[0].start_byte,
                         c.child_by_field_name("arguments").named_children[0].end_byte)
                        for c in calls(name, "ScalaTask")]
    out = []
    for n in walk(tree(name).root_node):
        if n.type == "string" and not any(a <= n.start_byte and n.end_byte <= b for a, b in scala_code_spans):
            out.append(string_value(n))
    return out


def train_commands() -> list[tuple[str, str]]:
    """(file, string literal) for every literal that holds a train command line."""
    return [(n, s) for n in SCRIPTS for s in dsl_strings(n) if TRAIN_MARKER in s]


def command_options(command: str) -> list[str]:
    return re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", command)


def tuple_names(block: str, prefix: str) -> list[list[str]]:
    """The names in ``<prefix> += (a, b, c)`` (or ``+= a``) statements of a block of DSL code."""
    out = []
    for m in re.finditer(re.escape(prefix) + r"\s*\+=\s*(\(([^()]*)\)|(\w+))", block):
        body = m.group(2) if m.group(2) is not None else m.group(3)
        out.append([x.strip() for x in body.split(",") if x.strip()])
    return out


def definition_text(name: str, val: str) -> str:
    return text(all_val_definitions(name)[val])


def point_defaults() -> dict[str, str]:
    """``name := value`` of the pointDefaults task, values as written in the script."""
    block = definition_text("common.oms", "pointDefaults")
    return {m.group(1): m.group(2).strip('"') for m in re.finditer(r"(\w+)\s*:=\s*(\"[^\"]*\"|[-+0-9.eE]+)", block)}


def train_parser():
    from python_task.cli import build_parser

    parser = build_parser()
    for action in parser._actions:  # noqa: SLF001 - argparse keeps subparsers here
        choices = getattr(action, "choices", None)
        if isinstance(choices, dict) and "train" in choices:
            return choices["train"]
    raise AssertionError("no train subcommand in python_task.cli.build_parser()")


def train_option_strings() -> tuple[set[str], set[str]]:
    """(all option strings, required option strings) of ``train``."""
    p = train_parser()
    options = {o for a in p._actions for o in a.option_strings}  # noqa: SLF001
    required = {a.option_strings[0] for a in p._actions if a.required and a.option_strings}  # noqa: SLF001
    return options, required


def swept_values(factor: str) -> set[str]:
    """String levels given to a factor anywhere in the plans: ``f in Seq("a", ...)`` and ``f := "a"``."""
    values: set[str] = set()
    for n in SCRIPTS:
        src = source(n)
        for m in re.finditer(rf"\b{factor}\s+in\s+Seq\(([^)]*)\)", src):
            values.update(re.findall(r'"([^"]*)"', m.group(1)))
        values.update(re.findall(rf'\b{factor}\s*:=\s*"([^"]*)"', src))
    return values


def parse_task_code() -> str:
    codes = [c for c in scala_task_codes("common.oms") if "metrics.json" in c]
    assert len(codes) == 1, "exactly one ScalaTask of common.oms reads metrics.json"
    return codes[0]


def parsed_metrics() -> dict[str, str]:
    """``val name = metric("key")`` of the parse task: {name: key}."""
    return dict(re.findall(r'val\s+(\w+)\s*=\s*metric\("(\w+)"\)', parse_task_code()))


def metric_regex(key: str) -> re.Pattern:
    """The parse task's regex for one key, rebuilt from its Scala source: ``("<prefix>" + key + "<suffix>").r``."""
    m = re.search(r'\((".*?(?<!\\)")\s*\+\s*key\s*\+\s*(".*?(?<!\\)")\)\.r', parse_task_code())
    assert m, "the parse task builds its regex as (\"...\" + key + \"...\").r"
    return re.compile(string_value(m.group(1)) + key + string_value(m.group(2)))


def scala_double(value: float) -> str:
    """Java's Double.toString, which OpenMOLE inserts for a Double Val in ``${x}`` (e.g. 1e-4 -> "1.0E-4")."""
    if value == 0:
        return "0.0"
    if 1e-3 <= abs(value) < 1e7:
        r = repr(float(value))
        return r if "." in r else r + ".0"
    _, digits, exponent = Decimal(repr(abs(float(value)))).normalize().as_tuple()
    mantissa = f"{digits[0]}." + ("".join(map(str, digits[1:])) or "0")
    return ("-" if value < 0 else "") + f"{mantissa}E{len(digits) - 1 + exponent}"


def substitute(command: str, values: dict[str, str]) -> str:
    def one(m: re.Match) -> str:
        name = m.group(1)
        assert name in values, f"no sample value for ${{{name}}}"
        return values[name]

    return re.sub(r"\$\{(\w+)\}", one, command)


def point_command() -> str:
    """pointCommand as sweep.oms gets it (through its import of common.oms)."""
    vals = all_val_definitions("sweep.oms")
    return evaluate_string(vals["pointCommand"], vals)


def train_command() -> str:
    vals = all_val_definitions("sweep.oms")
    return evaluate_string(vals["trainCommand"], vals)


# ------------------------------------------------------------------------------------------------ files, syntax

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
    assert not t.root_node.has_error


@pytest.mark.parametrize("name", SCRIPTS)
def test_scala_task_code_parses(name):
    for code in scala_task_codes(name):
        t = parse("object ScalaTaskCode {\n" + code + "\n}\n")
        assert not syntax_problems(t), (name, syntax_problems(t), code[:200])


def test_the_syntax_check_catches_errors():
    broken = 'val t = ScalaTask("""val x = 1""") set (\n  inputs += (a, b\n)\nDirectSampling(evaluation = t, '
    assert syntax_problems(parse(broken))
    assert syntax_problems(parse("object X {\n val y = (1 +\n}\n"))


def test_the_reference_dsl_list_is_copied_faithfully():
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} not present")
    ref = REFERENCE.read_text()
    section = ref.split("## 9.", 1)[1].split("## 10.", 1)[0]
    block = section.split("```", 2)[1]
    tokens = {t for line in block.splitlines() if not line.lstrip().startswith("#") for t in line.split()}
    assert DSL_IDENTIFIERS <= tokens, sorted(DSL_IDENTIFIERS - tokens)


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
        if parent.type in ("import_declaration", "stable_identifier", "namespace_selectors"):
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
def test_identifiers_are_declared_or_in_the_reference_dsl_list(name):
    declared = set().union(*(_declared_names(tree(n)) for n in with_imports(name)))
    used = _used_names(tree(name))
    unknown = {k: line for k, line in used.items()
               if k not in declared and k not in DSL_IDENTIFIERS and k not in SCALA_STANDARD}
    assert not unknown, f"{name}: names neither declared nor in the reference's DSL list: {unknown}"
    units = {k for k in used if k in UNITS}
    assert units <= DSL_IDENTIFIERS


def test_the_identifier_check_catches_unknown_names():
    t = parse('val t = ContainerTask("img", "cmd") set (inputs += x)\nDirectSamplingz(evaluation = t on env by 4)\n'
              'val s = 4.hourz\n')
    used = _used_names(t)
    assert {"DirectSamplingz", "hourz", "env"} <= set(used)
    assert "evaluation" not in used and "ContainerTask" in used


# ------------------------------------------------------------------------------------------------ the train command

def test_train_commands_use_only_options_of_train_help():
    commands = train_commands()
    assert commands, "no train command found in the scripts"
    options, required = train_option_strings()
    for name, command in commands:
        used = command_options(command)
        assert used, command
        unknown = sorted(set(used) - options)
        assert not unknown, f"{name}: options not in `train --help`: {unknown}"
        missing = sorted(required - set(used))
        assert not missing, f"{name}: required train options missing: {missing}"
        assert len(used) == len(set(used)), f"{name}: an option is given twice"


def test_the_option_check_catches_a_wrong_option():
    options, required = train_option_strings()
    assert "--learning-rate" not in options and "--arch" in required and "--fold" in required


def test_command_values_are_vals_named_like_their_options():
    vals = declared_vals(SCRIPTS)
    for name, command in train_commands():
        pairs = re.findall(r"(--[a-z][a-z0-9-]*)\s+(\S+)", command)
        for option, value in pairs:
            refs = re.findall(r"\$\{(\w+)\}", value)
            if not refs:
                continue  # a fixed value, e.g. --shards /data/shards
            assert refs == [option[2:].replace("-", "_")], f"{name}: {option} {value}"
            assert refs[0] in vals, f"{name}: ${{{refs[0]}}} is not a declared Val"
        # --augment turns the '+'-joined Val into train's comma-separated list, in the shell
        assert "--augment $(echo ${augment} | tr + ,)" in command


def test_dollar_braces_are_openmole_values_only():
    """``${...}`` is always OpenMOLE code (reference §1.5): no shell ``${VAR}``, only declared Vals."""
    for name in SCRIPTS:
        vals = declared_vals(with_imports(name))
        for s in dsl_strings(name):
            for ref in re.findall(r"\$\{([^}]*)\}", s):
                assert ref in vals, f"{name}: ${{{ref}}} is not a Val of the script: {s[:120]!r}"


def test_the_train_tasks_declare_every_value_of_the_command_and_share_defaults():
    refs = set(re.findall(r"\$\{(\w+)\}", train_command()))
    lists = {}
    for task in ("pointDefaults", "trainInContainer", "trainWithApptainer", "parseMetrics"):
        found = tuple_names(definition_text("common.oms", task), "(inputs, outputs)")
        assert found, f"{task} declares no (inputs, outputs)"
        lists[task] = found[0]
    first = lists["pointDefaults"]
    for task, names in lists.items():
        assert names == first, f"{task} does not declare the same factors as pointDefaults"
    assert refs == set(first), (sorted(refs ^ set(first)))
    defaults = point_defaults()
    assert set(first) - set(defaults) == {"fold"}, "every factor but fold needs a default"


def test_point_command_keeps_the_container_contract():
    command = point_command()
    assert command.startswith(train_command())
    assert "--shards /data/shards" in command and "--splits /data/splits.json" in command
    assert "--out /out" in command and "--epochs ${epochs}" in command
    assert "'" not in command, "the GPU path wraps the command in sh -c '...'"
    assert "exit $code" in command


# ------------------------------------------------------------------------------------------------ names swept

def test_swept_architectures_are_registered():
    from python_task.training.architectures import ARCHITECTURES

    archs = swept_values("arch")
    assert len(archs) >= 3
    assert archs <= set(ARCHITECTURES), sorted(archs - set(ARCHITECTURES))


def test_swept_stains_are_registered():
    stain = pytest.importorskip("python_task.transforms.stain")
    stains = swept_values("stain")
    assert {"none", "macenko"} <= stains
    assert stains <= set(stain.STAIN_METHODS), sorted(stains - set(stain.STAIN_METHODS))


def test_swept_augmentations_are_registered():
    augment = pytest.importorskip("python_task.transforms.augmentations")
    levels = swept_values("augment")
    assert "none" in levels and len(levels) >= 3
    for level in levels:
        assert "," not in level, f"{level!r}: CSVHook does not quote values; join augmentations with '+'"
        parts = level.split("+")
        unknown = [p for p in parts if p != "none" and p not in augment.AUGMENTATIONS]
        assert not unknown, f"{level!r}: {unknown} not in python_task.transforms.augmentations.AUGMENTATIONS"
        assert "none" not in parts or parts == ["none"], level


def test_swept_optimizers_exist():
    from python_task.training.config import OPTIMIZERS

    assert swept_values("optimizer") <= set(OPTIMIZERS)


# ------------------------------------------------------------------------------------------------ metrics

def test_parsed_metrics_are_the_contract_metrics():
    parsed = parsed_metrics()
    assert all(name == key for name, key in parsed.items()), parsed
    assert set(parsed) == set(CONTRACT_METRICS), sorted(set(parsed) ^ set(CONTRACT_METRICS))
    vals = declared_vals(["common.oms"])
    for metric in CONTRACT_METRICS:
        assert vals.get(metric) == "Double", f"{metric} is not declared as Val[Double]"
    outputs = {x for names in tuple_names(definition_text("common.oms", "parseMetrics"), "outputs") for x in names}
    assert set(CONTRACT_METRICS) | {"status", "point_id", "out_dir"} <= outputs


def test_contract_metrics_match_the_package():
    metrics = pytest.importorskip("python_task.training.metrics")
    assert tuple(metrics.CONTRACT_METRICS) == CONTRACT_METRICS


def test_the_parse_regex_reads_a_flat_json_with_nan():
    payload = {"val_auc": 0.8125, "val_loss": float("nan"), "n_params": 12345.0, "threshold": 1e-05,
               "val_f1": -0.5, "train_seconds": float("inf")}
    raw = json.dumps(payload, indent=2)
    for key, value in payload.items():
        m = metric_regex(key).search(raw)
        assert m, key
        got = float(m.group(1))
        assert got == value or (math.isnan(got) and math.isnan(value)), (key, got)
    assert metric_regex("val_slide_auc").search(raw) is None  # missing -> NaN in the task
    assert metric_regex("val_auc").search('{"val_auc_x": 1.0}') is None


# ------------------------------------------------------------------------------------------------ structure

def test_environment_is_chosen_in_one_place_with_lazy_environments():
    common = source("common.oms")
    assert 'val envName = sys.env.getOrElse("OM_ENV", args.headOption.getOrElse("local"))' in common
    for env in ("local", "slurm", "slurmGpu", "egi"):
        assert re.search(rf"^lazy val {env}\s*=", common, re.M), f"{env} must be a lazy val"
    env = definition_text("common.oms", "env")
    for key in ('"slurm"', '"slurm-gpu"', '"egi"'):
        assert key in env
    assert "EGIEnvironment(" in definition_text("common.oms", "egi")
    assert source("common.oms").count("EGIEnvironment(") == 1
    slurm_gpu = definition_text("common.oms", "slurmGpu")
    assert 'gres = Vector("gpu:1")' in slurm_gpu
    for plan in ("sweep.oms", "lhs.oms", "nsga2.oms"):
        assert "Environment(" not in source(plan), f"{plan} builds its own environment"


def test_failures_are_recorded_not_fatal():
    container = definition_text("common.oms", "trainInContainer")
    gpu = definition_text("common.oms", "trainWithApptainer")
    for block in (container, gpu):
        assert "returnValue = exitCode" in block
        assert "errorOnReturnValue = true" not in block
    assert 'resources += EmptyDirectory("/out")' in container
    assert 'outputFiles += ("/out", outDir)' in container
    assert 'outputFiles += ("out", outDir)' in gpu and "mkdir -p out &&" in gpu
    code = parse_task_code()
    assert "Double.NaN" in code and "metricsFile.exists" in code
    assert 'val status = if (exitCode == 0 && text.nonEmpty) "ok" else "failed"' in code


def test_gpu_path_runs_apptainer_with_nv():
    gpu = definition_text("common.oms", "trainWithApptainer")
    assert "SystemExecTask(" in gpu and "apptainer exec --nv" in gpu
    assert "sh -c '\" + pointCommand + \"'\"" in gpu
    assert "-B $PWD/out:/out" in gpu
    evaluation = source("common.oms").split("def pointEvaluation", 1)[1].split("\ndef ", 1)[0]
    assert "if (useApptainer) pointDefaults -- (trainWithApptainer on env by pointsPerJob)" in evaluation
    assert 'val useApptainer = envName == "slurm-gpu" || envName == "local-gpu"' in source("common.oms")
    assert "pointDefaults -- (trainInContainer on env by pointsPerJob)" in evaluation
    probe = source("probe_gpu.oms")
    assert "apptainer exec --nv" in probe and "nvidia-smi" in probe and "jax.devices()" in probe
    assert "accelerator_present" in probe and "slurmGpu" in probe


def test_both_data_modes_are_shown():
    container = definition_text("common.oms", "trainInContainer")
    assert 'HostFile(hostData + "/shards", "/data/shards")' in container
    assert 'HostFile(hostData + "/splits.json", "/data/splits.json")' in container
    assert 'resources += (workDirectory / "shards", "/data/shards")' in container
    assert 'resources += (workDirectory / "splits.json", "/data/splits.json")' in container
    assert 'val dataMode = sys.env.getOrElse("OM_DATA"' in source("common.oms")


def test_points_are_grouped_on_slurm_only():
    block = definition_text("common.oms", "pointsPerJob")
    groups = dict(re.findall(r'case\s+("[\w-]+"|_)\s*=>\s*(\d+)', block))
    assert int(groups['"slurm"']) > 1 and int(groups['"slurm-gpu"']) > 1 and int(groups["_"]) == 1


def test_hooks_and_aggregation():
    common = source("common.oms")
    assert "parseMetrics hook CSVHook(pointsCsv)" in common
    assert "sampling = fold in (0 until k)" in common
    cv = common.split("def crossValidation", 1)[1]
    for line in ("val_patient_auc evaluate meanOf as mean_val_patient_auc",
                 "val_patient_auc evaluate sdOf as std_val_patient_auc",
                 "val_auc evaluate meanOf as mean_val_auc"):
        assert line in cv
    sweep = source("sweep.oms")
    assert ('crossValidation(K, workDirectory / "results" / "points.csv") '
            'hook CSVHook(workDirectory / "results" / "configs.csv")') in sweep
    for factor in ("arch", "lr", "augment", "stain", "seed"):
        assert re.search(rf"\({factor} in Seq\(", sweep), factor
    lhs = source("lhs.oms")
    assert "LHS(" in lhs and all(f"{v} in (" in lhs for v in ("log10_lr", "weight_decay", "dropout", "elastic_alpha"))
    nsga2 = source("nsga2.oms")
    assert "NSGA2Evolution(" in nsga2 and 'hook (workDirectory / "results" / "nsga2.omr"' in nsga2
    assert "objective = Seq(neg_mean_val_patient_auc, model_params)" in nsga2
    assert "-mean_val_patient_auc" in nsga2 and "crossValidation(K" in nsga2


def test_scala_double_formatting_matches_java():
    assert scala_double(0.001) == "0.001" and scala_double(1e-4) == "1.0E-4" and scala_double(0.0) == "0.0"
    assert scala_double(8.0) == "8.0" and scala_double(3e-5) == "3.0E-5" and scala_double(0.0003) == "3.0E-4"
    assert scala_double(1.5e-6) == "1.5E-6" and scala_double(12345678.0) == "1.2345678E7"
    assert scala_double(30.0) == "30.0"


def test_the_point_tail_keeps_the_exit_code_and_drops_the_model(tmp_path):
    tail = point_command()[len(train_command()):]
    out = tmp_path / "out"
    fake = f"mkdir -p {out} && touch {out}/model.keras && (exit 3)"
    script = fake + tail.replace("/out/", f"{out}/")
    env = {k: v for k, v in os.environ.items() if k != "KEEP_MODEL"}
    proc = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3 and not (out / "model.keras").exists()
    proc = subprocess.run(["sh", "-c", script], env={**env, "KEEP_MODEL": "true"}, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 3 and (out / "model.keras").exists()
    ok = f"mkdir -p {out} && (exit 0)" + tail.replace("/out/", f"{out}/")
    assert subprocess.run(["sh", "-c", ok], env=env, timeout=30).returncode == 0


# ------------------------------------------------------------------------------------------------ real runs

@pytest.fixture(scope="module")
def tiny_data(synth_shards, tmp_path_factory):
    """The session's synthetic shards with a 2-fold patient split."""
    splits = pytest.importorskip("python_task.data.splits")
    pytest.importorskip("python_task.training.loop")
    path = tmp_path_factory.mktemp("openmole_splits") / "splits.json"
    splits.write_splits(splits.make_splits(synth_shards, 2, seed=0), path)
    return synth_shards, path


def _sample_values(**overrides) -> dict[str, str]:
    vals = declared_vals(["common.oms"])
    values = {}
    for name, raw in point_defaults().items():
        values[name] = scala_double(float(raw)) if vals.get(name) == "Double" else raw
    values.update({k: scala_double(v) if isinstance(v, float) else str(v) for k, v in overrides.items()})
    return values


def test_point_command_runs(tiny_data, tmp_path):
    shards, splits = tiny_data
    out = tmp_path / "out"
    values = _sample_values(arch="simple_cnn", lr=1e-4, fold=0, epochs=1, batch_size=16, max_train_tiles=64,
                            patience=0, augment="flip+rot90", stain="none", seed=0)
    command = substitute(point_command(), values)
    assert "--lr 1.0E-4" in command
    # Only for speed on 2 CPU cores: both are real train options (checked against train --help above).
    command = command.replace(" --quiet", " --quiet --input-size 32 --max-val-tiles 64", 1)
    command = (command.replace("/data/shards", str(shards)).replace("/data/splits.json", str(splits))
               .replace("--out /out", f"--out {out}").replace("/out/model.keras", f"{out}/model.keras"))
    assert "/data/" not in command and " /out" not in command
    env = {k: v for k, v in os.environ.items() if k != "KEEP_MODEL"}
    env.update(PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""), KERAS_BACKEND="tensorflow",
               TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(["sh", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = (out / "metrics.json").read_text()
    saved = json.loads(raw)
    for key in parsed_metrics().values():
        assert key in saved, key
        m = metric_regex(key).search(raw)
        assert m, f"the parse task's regex does not find {key} in metrics.json"
        got = float(m.group(1))
        assert got == saved[key] or (math.isnan(got) and math.isnan(saved[key])), key
    assert saved["epochs_run"] == 1 and 0 < saved["n_train_tiles"] <= 64
    assert not (out / "model.keras").exists(), "KEEP_MODEL unset: the model is not sent back"
    config = json.loads((out / "config.json").read_text())
    assert config["augment"] == "flip,rot90", "the '+'-joined level reaches train as a comma-separated list"
    assert config["lr"] == 1e-4 and config["fold"] == 0 and config["arch"] == "simple_cnn"


def test_parsed_metrics_exist_in_a_real_run(tiny_data, tmp_path):
    train = pytest.importorskip("python_task.training.loop")
    shards, splits = tiny_data
    cfg = train.TrainConfig(shards=shards, splits=splits, fold=0, arch="simple_cnn", out=tmp_path / "run", epochs=1,
                            input_size=32, max_train_tiles=64, max_val_tiles=64, batch_size=16, workers=1,
                            verbose=False, tensorboard=False, patience=0)
    train.train(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    missing = sorted(set(parsed_metrics().values()) - set(saved))
    assert not missing, f"parsed by the OpenMOLE scripts but not written by train: {missing}"
