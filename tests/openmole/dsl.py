"""The OpenMOLE plans read as OpenMOLE reads them: tree-sitter's Scala grammar, and an evaluator of the part of
Scala and of OpenMOLE's DSL that the plans use, into plain Python objects that :mod:`engine` runs.

Nothing here knows what the plans should contain: a plan is loaded from ``openmole/*.oms`` (with its
``import _file_.common._``), every ``val`` and ``def`` evaluated on demand, with the settings a user gives
OpenMOLE (``OM_*`` variables, the words after ``--``, the script's folder). What the evaluator cannot evaluate
(Scala code beyond the DSL, a DSL name it does not know) raises :class:`Unsupported`, so a new construct in a plan
fails the tests until it is taught here and in the engine, instead of being skipped.

OpenMOLE behaviour reproduced here (OpenMOLE 22, openmole/openmole at v22.1 and dev f27e8a2c7a, March 2026):

* In an imported file top-level expressions are dropped and vals are lazy (core.project ``Project.scala:83-90``,
  ``filterTermAndAddLazy``): a val is evaluated only when used, so an environment the plan never picks is never
  built.
* ``${x}`` in a string is OpenMOLE's substitution, done later from the task's context (core.argument
  ``ExpandedString.scala:59-66, 137-147``); here strings keep it verbatim and :func:`engine.expand` substitutes it.
* ``x := v`` is a default with override = false (core.setter ``package.scala:53-55``); ``x := (v, true)``
  overrides (49-51).
* ``Strain(t)`` marks the task node strained (core.workflow ``composition/package.scala:658-660``);
  ``TryTask(t)`` adds every output of ``t`` to its inputs and keeps its defaults (core.workflow
  ``task/TryTask.scala:40-50``); ``returnValue``/``stdOut``/``stdErr`` are added to a ContainerTask's and a
  SystemExecTask's outputs (``ContainerTask.scala:108``, ``SystemExecTask.scala:74``); ``outputFiles += (o, x)``
  adds ``x`` to the outputs (plugin.task.external ``package.scala:44-45``).
* ``MoleTask(a -- b)`` (core.workflow ``task/MoleTask.scala:48-63``): its inputs are the root capsule's inputs
  (``MoleCapsule.scala:131-134``: the task's inputs with the vals of its defaults, ``Task.scala:213``), its outputs
  the last capsule's outputs (143-145: a strained one adds what it receives), its defaults the root task's.
"""

from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import dataclass, field, replace
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[2]
OMS_DIR = REPO_ROOT / "openmole"


class Unsupported(Exception):
    """A construct of a plan that this evaluator (and so the engine emulation) does not know."""


# ------------------------------------------------------------------------------------------------ parsing

@lru_cache(maxsize=None)
def _parser():
    import tree_sitter as ts
    import tree_sitter_scala as tss

    return ts.Parser(ts.Language(tss.language()))


def parse(source: str):
    return _parser().parse(source.encode())


def walk(node):
    yield node
    for child in node.children:
        yield from walk(child)


def text(node) -> str:
    return node.text.decode()


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


def java_double(value: float) -> str:
    """Java's ``Double.toString`` (JDK >= 19, the shortest repr; OpenMOLE needs Java 21): what ``${x}`` inserts
    for a Double and what CSVHook writes (1e-4 -> "1.0E-4", 0.001 -> "0.001", 8.0 -> "8.0")."""
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    if value == 0:
        return "-0.0" if math.copysign(1.0, value) < 0 else "0.0"
    if 1e-3 <= abs(value) < 1e7:
        r = repr(value)
        return r if "." in r else r + ".0"
    _, digits, exponent = Decimal(repr(abs(value))).as_tuple()
    digits = list(digits)
    while len(digits) > 1 and digits[-1] == 0:
        digits.pop()
        exponent += 1
    mantissa = f"{digits[0]}." + ("".join(map(str, digits[1:])) or "0")
    return ("-" if value < 0 else "") + f"{mantissa}E{len(digits) - 1 + exponent}"


def scala_str(value: Any) -> str:
    """``value.toString`` as Scala/Java writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return java_double(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


# ------------------------------------------------------------------------------------------------ DSL objects

@dataclass(frozen=True)
class ValRef:
    """``val name = Val[T]``."""

    name: str
    type: str

    def python_type(self) -> type:
        return {"String": str, "Double": float, "Int": int, "Long": int, "Boolean": bool, "File": Path}[self.type]


@dataclass
class Default:
    val: ValRef
    value: Any
    override: bool = False


@dataclass
class Resource:
    """``resources += (file, destination[, link = b])`` or ``resources += EmptyDirectory(destination)``."""

    source: Path | None  # None: an EmptyDirectory
    destination: str
    link: bool = False


@dataclass
class HostFile:
    path: str
    destination: str


@dataclass
class Task:
    """A task of the DSL with its data-flow configuration (``set (...)``) and its own arguments."""

    kind: str  # ContainerTask | SystemExecTask | ScalaTask | EmptyTask | TryTask | MoleTask
    name: str
    inputs: list[ValRef] = field(default_factory=list)
    outputs: list[ValRef] = field(default_factory=list)
    defaults: list[Default] = field(default_factory=list)
    args: dict[str, Any] = field(default_factory=dict)
    resources: list[Resource] = field(default_factory=list)
    output_files: list[tuple[str, ValRef]] = field(default_factory=list)
    wrapped: Task | None = None  # TryTask
    # MoleTask: its mole, ``args["mole"]``, a Chain of Nodes

    def input_names(self) -> set[str]:
        return {v.name for v in self.inputs} | {d.val.name for d in self.defaults}

    def output_names(self) -> list[str]:
        return list(dict.fromkeys(v.name for v in self.outputs))


@dataclass
class Environment:
    kind: str  # LocalEnvironment | SLURMEnvironment | EGIEnvironment
    args: dict[str, Any]

    @property
    def batch(self) -> bool:
        return self.kind != "LocalEnvironment"


@dataclass
class Hook:
    kind: str  # CSVHook | CopyFileHook | AppendToFileHook | display | OMR
    args: dict[str, Any]


@dataclass
class Node:
    """A task in a workflow: strained or not, delegated or not, with its hooks."""

    task: Task
    strain: bool = False
    environment: Environment | None = None
    grouping: int = 1
    hooks: list[Hook] = field(default_factory=list)


@dataclass
class Chain:
    """``a -- b -- c``."""

    parts: list[Any]
    hooks: list[Hook] = field(default_factory=list)


@dataclass
class Factor:
    """``v in domain``: a list of values, or bounds ``(lo, hi)`` for LHS and genomes."""

    val: ValRef
    values: list[Any] | None = None
    bounds: tuple[float, float] | None = None


@dataclass
class Product:
    parts: list[Any]


@dataclass
class LHS:
    sample: int
    factors: list[Factor]


@dataclass
class Aggregation:
    val: ValRef
    function: str
    output: ValRef | None = None


@dataclass
class DirectSampling:
    evaluation: Any
    sampling: Any
    aggregation: list[Aggregation]
    hooks: list[Hook] = field(default_factory=list)


@dataclass
class NSGA2:
    genome: list[Factor]
    objective: list[ValRef]
    evaluation: Any
    args: dict[str, Any]
    hooks: list[Hook] = field(default_factory=list)


@dataclass
class Quantity:
    value: float
    unit: str


@dataclass
class EmptyDirectory:
    destination: str


class _Marker(str):
    """``inputs``, ``outputs``, ``resources``, ``outputFiles`` on the left of ``+=`` in ``set (...)``."""


# ------------------------------------------------------------------------------------------------ plans

@dataclass
class Settings:
    """What OpenMOLE gives a script: its folder, the words after ``--``, the process environment."""

    work_directory: Path = OMS_DIR
    args: list[str] = field(default_factory=list)
    environ: dict[str, str] = field(default_factory=dict)
    # Replacements of a script's source text, as a user editing the file would make them: {file: [(old, new)]}
    edits: dict[str, list[tuple[str, str]]] = field(default_factory=dict)


def script_source(name: str, settings: Settings | None = None) -> str:
    folder = settings.work_directory if settings else OMS_DIR
    src = (folder / name).read_text()
    for old, new in (settings.edits.get(name, []) if settings else []):
        if old not in src:
            raise AssertionError(f"edit of {name}: {old[:60]!r} is not in the script")
        src = src.replace(old, new)
    return src


def imports(source: str) -> list[str]:
    """Files imported with ``import _file_.X._`` (same folder only, as the plans do)."""
    return [m.group(1) + ".oms" for m in re.finditer(r"^\s*import\s+_file_\.(\w+)\._", source, re.M)]


class Plan:
    """One ``.oms`` file with what it imports, evaluated lazily."""

    def __init__(self, name: str, settings: Settings | None = None,
                 natives: dict[str, Callable[..., Any]] | None = None) -> None:
        self.name = name
        self.settings = settings or Settings()
        self.natives = dict(natives or {})
        self.sources: dict[str, str] = {}
        self.trees: dict[str, Any] = {}
        self.definitions: dict[str, Any] = {}  # name -> val_definition or function_definition node
        self.order: list[str] = []
        source = script_source(name, self.settings)
        for imported in imports(source):
            self._load(imported, script_source(imported, self.settings))
        self._load(name, source)
        self.cache: dict[str, Any] = {}
        self.workflow_node = self._last_expression(name)

    def _load(self, name: str, source: str) -> None:
        tree = parse(source)
        problems = syntax_problems(tree)
        if problems:
            raise AssertionError(f"{name}: {problems}")
        self.sources[name], self.trees[name] = source, tree
        for node in tree.root_node.children:
            if node.type == "val_definition":
                pattern = node.child_by_field_name("pattern")
                if pattern is not None and pattern.type == "identifier":
                    self.definitions[text(pattern)] = node
                    self.order.append(text(pattern))
            elif node.type == "function_definition":
                self.definitions[text(node.child_by_field_name("name"))] = node

    def _last_expression(self, name: str):
        exprs = [n for n in self.trees[name].root_node.children
                 if n.type not in ("val_definition", "function_definition", "import_declaration", "comment",
                                   "block_comment")]
        return exprs[-1] if exprs else None

    # -------------------------------------------------------------------------------------------- access

    def value(self, name: str) -> Any:
        """The value of a top-level ``val`` (evaluated once, like a lazy val)."""
        if name not in self.cache:
            node = self.definitions.get(name)
            if node is None or node.type != "val_definition":
                raise KeyError(f"{self.name}: no val {name}")
            value = Evaluator(self, {}).eval_definition(name, node)
            if isinstance(value, Task):
                value.name = name
            elif isinstance(value, Node):
                value.task.name = name
            self.cache[name] = value
        return self.cache[name]

    def vals(self) -> dict[str, ValRef]:
        """Every ``val x = Val[T]`` of the plan and its imports."""
        return {n: self.value(n) for n, node in self.definitions.items()
                if node.type == "val_definition" and text(node.child_by_field_name("value")).startswith("Val[")}

    def workflow(self) -> Any:
        """The plan's workflow: its last top-level expression."""
        if self.workflow_node is None:
            raise AssertionError(f"{self.name} ends with no workflow expression")
        return Evaluator(self, {}).eval(self.workflow_node)


# ------------------------------------------------------------------------------------------------ evaluator

_TASK_KINDS = ("ContainerTask", "SystemExecTask", "ScalaTask", "EmptyTask")
_ENVIRONMENTS = ("LocalEnvironment", "SLURMEnvironment", "EGIEnvironment")
_UNITS = {"second", "seconds", "minute", "minutes", "hour", "hours", "day", "days",
          "megabyte", "megabytes", "gigabyte", "gigabytes"}


class Evaluator:
    def __init__(self, plan: Plan, local: dict[str, Any]) -> None:
        self.plan = plan
        self.local = local

    # -------------------------------------------------------------------------------------------- entry points

    def eval_definition(self, name: str, node) -> Any:
        value = node.child_by_field_name("value")
        if value.type == "generic_function" and text(value.child_by_field_name("function")) == "Val":
            type_name = text(value.child_by_field_name("type_arguments"))[1:-1].strip()
            return ValRef(name, type_name)
        result = self.eval(value)
        if isinstance(result, Task) and result.name == "":
            result.name = name
        if isinstance(result, Node) and result.task.name == "":
            result.task.name = name
        return result

    def eval(self, node) -> Any:
        handler = getattr(self, "_eval_" + node.type, None)
        if handler is None:
            raise Unsupported(f"{node.type}: {text(node)[:80]!r}")
        return handler(node)

    # -------------------------------------------------------------------------------------------- literals

    def _eval_string(self, node) -> str:
        return string_value(node)

    def _eval_integer_literal(self, node) -> int:
        return int(text(node).rstrip("lL"))

    def _eval_floating_point_literal(self, node) -> float:
        return float(text(node).rstrip("dDfF"))

    def _eval_boolean_literal(self, node) -> bool:
        return text(node) == "true"

    def _eval_parenthesized_expression(self, node) -> Any:
        return self.eval(node.named_children[0])

    def _eval_tuple_expression(self, node) -> tuple:
        return tuple(self.eval(c) for c in node.named_children)

    def _eval_block(self, node) -> Any:
        scope = Evaluator(self.plan, dict(self.local))
        result = None
        children = [c for c in node.named_children if c.type != "comment"]
        i = 0
        while i < len(children):
            child = children[i]
            i += 1
            if child.type == "postfix_expression" and i < len(children):
                # Scala reads `a x` + newline + `b` as `a x b` (a newline after an infix operator is no
                # separator); tree-sitter reads a postfix operator and a new statement.
                value, op = scope.eval(child.named_children[0]), text(child.named_children[-1])
                while True:
                    following = children[i]
                    i += 1
                    if following.type == "postfix_expression" and i < len(children):
                        value = scope._apply(value, op, following.named_children[0], following)
                        op = text(following.named_children[-1])
                    else:
                        result = scope._apply(value, op, following, following)
                        break
                continue
            if child.type == "val_definition":
                name = text(child.child_by_field_name("pattern"))
                scope.local[name] = scope.eval_definition(name, child)
                result = None
            else:
                result = scope.eval(child)
        return result

    _eval_indented_block = _eval_block

    def _eval_if_expression(self, node) -> Any:
        condition = self.eval(node.child_by_field_name("condition"))
        branch = node.child_by_field_name("consequence" if condition else "alternative")
        return None if branch is None else self.eval(branch)

    def _eval_match_expression(self, node) -> Any:
        value = self.eval(node.child_by_field_name("value"))
        for clause in node.child_by_field_name("body").named_children:
            if clause.type != "case_clause":
                continue
            pattern = clause.child_by_field_name("pattern")
            if pattern.type == "wildcard" or (pattern.type == "string" and string_value(pattern) == value):
                return self.eval(clause.child_by_field_name("body"))
        raise Unsupported(f"no case matches {value!r}: {text(node)[:60]!r}")

    # -------------------------------------------------------------------------------------------- names

    def _eval_identifier(self, node) -> Any:
        name = text(node)
        if name in self.local:
            return self.local[name]
        if name == "workDirectory":
            return Path(self.plan.settings.work_directory)
        if name == "args":
            return list(self.plan.settings.args)
        if name in ("inputs", "outputs", "resources", "outputFiles"):
            return _Marker(name)
        if name in ("display",):
            return Hook("display", {})
        if name in self.plan.natives and name not in self.plan.definitions:
            return self.plan.natives[name]
        if name in self.plan.definitions:
            node_def = self.plan.definitions[name]
            if node_def.type == "function_definition":
                return _Function(self.plan, name, node_def)
            return self.plan.value(name)
        if name in _TASK_KINDS or name in ("EmptyDirectory",):
            return name
        raise Unsupported(f"unknown name {name!r}")

    def _eval_field_expression(self, node) -> Any:
        path = text(node)
        if path == "Runtime.getRuntime.availableProcessors":
            return os.cpu_count() or 1
        if path == "args.headOption":
            args = self.plan.settings.args
            return _Option(args[0] if args else None)
        if path == "sys.env":
            return dict(self.plan.settings.environ)
        value = self.eval(node.child_by_field_name("value"))
        name = text(node.child_by_field_name("field"))
        if name in _UNITS and isinstance(value, (int, float)):
            return Quantity(float(value), name.rstrip("s"))
        if name == "toString":
            return scala_str(value)
        if isinstance(value, Path):
            if name == "getAbsolutePath":
                return str(value if value.is_absolute() else Path.cwd() / value)
            if name == "getParentFile":
                return value.parent
            if name == "getName":
                return value.name
        raise Unsupported(f"field {path!r}")

    # -------------------------------------------------------------------------------------------- operators

    def _eval_infix_expression(self, node) -> Any:
        return self._infix(node.child_by_field_name("left"), text(node.child_by_field_name("operator")),
                           node.child_by_field_name("right"), node)

    def _infix(self, left_node, op: str, right_node, node) -> Any:
        return self._apply(self.eval(left_node), op, right_node, node)

    def _apply(self, left: Any, op: str, right_node, node) -> Any:
        if op == "set":
            return self._set(left, right_node)
        if op == "hook":
            return _with_hook(left, self._hook(right_node))
        if op == "in":
            return self._factor(left, right_node)
        if op == "--":
            return _chain(left, self.eval(right_node))
        if op == "on":
            return replace(_as_node(left), environment=self.eval(right_node))
        if op == "by":
            return replace(_as_node(left), grouping=int(self.eval(right_node)))
        if op == "evaluate":
            return Aggregation(left, text(right_node))
        if op == "as":
            return replace(left, output=self.eval(right_node))
        right = self.eval(right_node)
        if op == "x":
            return Product([*_parts(left), *_parts(right)])
        if op == "+":
            if isinstance(left, str) or isinstance(right, str):
                return scala_str(left) + scala_str(right)
            return left + right
        if op == "/" and isinstance(left, Path):
            return left / right
        if op == "until":
            return list(range(left, right))
        if op == "to":
            return list(range(left, right + 1))
        if op == "->":
            return (left, right)
        binary = {"-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b
                  if isinstance(a, int) and isinstance(b, int) else a / b,
                  "==": lambda a, b: a == b, "!=": lambda a, b: a != b, "&&": lambda a, b: a and b,
                  "||": lambda a, b: a or b, "<": lambda a, b: a < b, ">": lambda a, b: a > b,
                  "<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b}
        if op in binary:
            return binary[op](left, right)
        raise Unsupported(f"operator {op!r}: {text(node)[:80]!r}")

    def _eval_prefix_expression(self, node) -> Any:
        src = text(node)
        if src.startswith("!"):
            return not self.eval(node.named_children[-1])
        if src.startswith("-"):
            return -self.eval(node.named_children[-1])
        raise Unsupported(src[:60])

    # -------------------------------------------------------------------------------------------- calls

    def _arguments(self, node) -> tuple[list[Any], dict[str, Any]]:
        positional, named = [], {}
        for child in node.child_by_field_name("arguments").named_children:
            if child.type == "assignment_expression":
                named[text(child.child_by_field_name("left"))] = self.eval(child.child_by_field_name("right"))
            elif child.type != "comment":
                positional.append(self.eval(child))
        return positional, named

    def _eval_call_expression(self, node) -> Any:
        function = node.child_by_field_name("function")
        name = text(function)
        if name == "ScalaTask":  # its code: a string literal, or an expression of strings (factors.oms' lines)
            argument = node.child_by_field_name("arguments").named_children[0]
            code = string_value(argument) if argument.type == "string" else self.eval(argument)
            if not isinstance(code, str):
                raise Unsupported(f"ScalaTask code that is not a string: {text(argument)[:60]!r}")
            return Task("ScalaTask", "", args={"code": code})
        if name in ("Strain", "TryTask", "MoleTask", "DirectSampling", "NSGA2Evolution", "LHS") or name in _TASK_KINDS:
            positional, named = self._arguments(node)
            return self._dsl_call(name, positional, named)
        if function.type == "field_expression":
            return self._method_call(function, node)
        positional, named = self._arguments(node)
        if name in ("Seq", "Vector", "List"):
            return list(positional)
        if name == "HostFile":
            return HostFile(*positional)
        if name == "EmptyDirectory":
            return EmptyDirectory(positional[0])
        if name in _ENVIRONMENTS:
            return Environment(name, {"positional": positional, **named})
        if name in ("SingularityOverlay", "SingularityMemory", "SingularityFlatImage", "DockerImage"):
            return (name, positional, named)
        if name in ("CSVHook", "CopyFileHook", "AppendToFileHook", "DisplayHook"):
            return Hook(name, {"positional": positional, **named})
        callee = self.eval(function)
        if isinstance(callee, _Function):
            return callee(*positional, **named)
        if callable(callee):
            return callee(*positional, **named)
        raise Unsupported(f"call of {name!r}")

    def _method_call(self, function, node) -> Any:
        positional, named = self._arguments(node)
        path = text(function)
        if path == "sys.env.getOrElse":
            return self.plan.settings.environ.get(positional[0], positional[1])
        if path == "math.max":
            return max(positional)
        if path == "math.min":
            return min(positional)
        receiver = self.eval(function.child_by_field_name("value"))
        method = text(function.child_by_field_name("field"))
        if isinstance(receiver, _Option) and method == "getOrElse":
            return receiver.value if receiver.value is not None else positional[0]
        if isinstance(receiver, Path) and method == "mkdirs":
            existed = receiver.is_dir()
            receiver.mkdir(parents=True, exist_ok=True)
            return not existed
        if isinstance(receiver, str) and method == "startsWith":
            return receiver.startswith(positional[0])
        if isinstance(receiver, str) and method == "endsWith":
            return receiver.endswith(positional[0])
        raise Unsupported(f"method {path!r}")

    def _dsl_call(self, name: str, positional: list[Any], named: dict[str, Any]) -> Any:
        if name == "Strain":
            return replace(_as_node(positional[0]), strain=True)
        if name == "TryTask":
            inner = positional[0]
            if not isinstance(inner, Task):
                raise Unsupported("TryTask takes a Task (TryTask.scala: apply(task: Task)); "
                                  "`TryTask(t on env)` does not compile")
            wrapped = copy.deepcopy(inner)
            return Task("TryTask", f"TryTask({wrapped.name})", inputs=[*wrapped.inputs, *wrapped.outputs],
                        outputs=list(wrapped.outputs),
                        defaults=list(wrapped.defaults), wrapped=wrapped)
        if name == "MoleTask":
            if len(positional) != 1 or named:
                raise Unsupported("MoleTask(dsl) only (MoleTask.scala:48); MoleTask(mole, last) is not modelled")
            return mole_task(positional[0])
        if name == "DirectSampling":
            return DirectSampling(named["evaluation"], named["sampling"], list(named.get("aggregation", [])))
        if name == "NSGA2Evolution":
            objective = named["objective"]
            return NSGA2(list(named["genome"]), objective if isinstance(objective, list) else [objective],
                         named["evaluation"], {k: v for k, v in named.items()
                                               if k not in ("genome", "objective", "evaluation")})
        if name == "LHS":
            return LHS(int(named.get("sample", positional[0] if positional else 0)), list(named["factor"]))
        task = Task(name, "", args={"positional": positional, **named})
        for key in ("returnValue", "stdOut", "stdErr"):
            if isinstance(named.get(key), ValRef):
                task.outputs.append(named[key])
        return task

    # -------------------------------------------------------------------------------------------- set / hook / in

    def _set(self, target: Any, clauses_node) -> Any:
        node = _as_node(target) if isinstance(target, Node) else None
        task = copy.deepcopy(node.task if node else target)
        if not isinstance(task, Task):
            raise Unsupported(f"set on {type(target).__name__}")
        clauses = (clauses_node.named_children if clauses_node.type in ("tuple_expression",
                                                                        "parenthesized_expression")
                   else [clauses_node])
        for clause in clauses:
            if clause.type == "comment":
                continue
            self._clause(task, clause)
        return replace(node, task=task) if node else task

    def _clause(self, task: Task, clause) -> None:
        if clause.type != "infix_expression":
            raise Unsupported(f"set clause {text(clause)[:60]!r}")
        op = text(clause.child_by_field_name("operator"))
        left_node, right_node = clause.child_by_field_name("left"), clause.child_by_field_name("right")
        if op == ":=":
            right = self.eval(right_node)
            if isinstance(right, tuple) and len(right) == 2 and isinstance(right[1], bool):
                task.defaults.append(Default(self.eval(left_node), right[0], right[1]))
            else:
                task.defaults.append(Default(self.eval(left_node), right))
            return
        if op not in ("+=", "++="):
            raise Unsupported(f"set clause {text(clause)[:60]!r}")
        left = self.eval(left_node)
        targets = list(left) if isinstance(left, tuple) else [left]
        if op == "++=" and targets not in (["inputs"], ["outputs"], ["inputs", "outputs"]):
            raise Unsupported(f"set clause {text(clause)[:60]!r}")
        if targets in (["inputs"], ["outputs"], ["inputs", "outputs"]):
            right = self.eval(right_node)
            if op == "++=":  # core.setter package.scala:112, 125, 163: an Iterable of Vals
                if not isinstance(right, (list, tuple)) or not all(isinstance(v, ValRef) for v in right):
                    raise Unsupported(f"++= takes a Seq of Vals: {text(clause)[:60]!r}")
                vals = list(right)
            else:
                vals = list(right) if isinstance(right, tuple) else [right]
            for target in targets:
                getattr(task, target).extend(vals)
        elif targets == ["resources"]:
            task.resources.append(self._resource(right_node))
        elif targets == ["outputFiles"]:
            origin, val = self.eval(right_node)
            task.output_files.append((origin, val))
            task.outputs.append(val)
        else:
            raise Unsupported(f"set clause {text(clause)[:60]!r}")

    def _resource(self, node) -> Resource:
        if node.type == "call_expression":
            value = self.eval(node)
            if isinstance(value, EmptyDirectory):
                return Resource(None, value.destination, link=True)
            return Resource(Path(value), Path(value).name)
        if node.type != "tuple_expression":
            return Resource(Path(self.eval(node)), Path(self.eval(node)).name)
        link, parts = False, []
        for child in node.named_children:
            if child.type == "assignment_expression" and text(child.child_by_field_name("left")) == "link":
                link = bool(self.eval(child.child_by_field_name("right")))
            else:
                parts.append(self.eval(child))
        source, destination = parts[0], parts[1] if len(parts) > 1 else Path(parts[0]).name
        return Resource(Path(source), destination, link)

    def _hook(self, node) -> Hook:
        if node.type == "tuple_expression":  # method.evolution: evolution hook (file, frequency = n): OMR
            positional, named = [], {}
            for child in node.named_children:
                if child.type == "assignment_expression":
                    named[text(child.child_by_field_name("left"))] = self.eval(child.child_by_field_name("right"))
                else:
                    positional.append(self.eval(child))
            return Hook("OMR", {"positional": positional, **named})
        value = self.eval(node)
        if not isinstance(value, Hook):
            raise Unsupported(f"hook {text(node)[:60]!r}")
        return value

    def _factor(self, val: Any, domain_node) -> Factor:
        if not isinstance(val, ValRef):
            raise Unsupported(f"factor of {val!r}")
        domain = self.eval(domain_node)
        if isinstance(domain, tuple) and len(domain) == 2 and all(isinstance(x, (int, float)) for x in domain):
            return Factor(val, bounds=(domain[0], domain[1]))
        if isinstance(domain, list):
            return Factor(val, values=list(domain))
        raise Unsupported(f"domain {text(domain_node)[:60]!r}")


@dataclass
class _Option:
    value: Any


class _Function:
    """A ``def`` of a plan, called with its arguments bound in a fresh scope."""

    def __init__(self, plan: Plan, name: str, node) -> None:
        self.plan, self.name, self.node = plan, name, node

    def __call__(self, *positional: Any, **named: Any) -> Any:
        if self.name in self.plan.natives:
            return self.plan.natives[self.name](*positional, **named)
        params = [text(p.child_by_field_name("name"))
                  for ps in self.node.children if ps.type == "parameters" for p in ps.named_children
                  if p.type == "parameter"]
        scope = dict(zip(params, positional))
        scope.update(named)
        return Evaluator(self.plan, scope).eval(self.node.child_by_field_name("body"))


def _as_node(value: Any) -> Node:
    if isinstance(value, Node):
        return value
    if isinstance(value, Task):
        return Node(value)
    raise Unsupported(f"not a task: {type(value).__name__}")


def _parts(value: Any) -> list[Any]:
    return list(value.parts) if isinstance(value, Product) else [value]


def _chain(left: Any, right: Any) -> Chain:
    parts = []
    for side in (left, right):
        if isinstance(side, Chain) and not side.hooks:
            parts.extend(side.parts)
        else:
            parts.append(_as_node(side) if isinstance(side, Task) else side)
    return Chain(parts)


def _with_hook(target: Any, hook: Hook) -> Any:
    if isinstance(target, Task):
        target = Node(target)
    target = copy.copy(target)
    target.hooks = [*target.hooks, hook]
    return target


def mole_task(dsl: Any) -> Task:
    """``MoleTask(dsl)`` (``MoleTask.scala:48-63``) of a chain of tasks: inputs = the root capsule's inputs,
    outputs = the last capsule's outputs, defaults = the root task's defaults."""
    chain = dsl if isinstance(dsl, Chain) else Chain([dsl])
    nodes = [_as_node(p) if isinstance(p, Task) else p for p in chain.parts]
    if not nodes or not all(isinstance(n, Node) for n in nodes):
        raise Unsupported("MoleTask of a chain of tasks only (no sampling or evolution inside): not modelled")
    root = nodes[0].task
    declared = {v.name for v in root.inputs}
    inputs = [*root.inputs, *(d.val for d in root.defaults if d.override or d.val.name not in declared)]
    received: list[ValRef] = []  # nothing reaches the root of a mole (it is submitted, not delivered)
    for node in nodes:  # MoleCapsule.outputs: a strained capsule passes on what it receives
        own = list(node.task.outputs)
        received = [*own, *(v for v in received if v.name not in {o.name for o in own})] if node.strain else own
    outputs = list({v.name: v for v in received}.values())
    names = " -- ".join(n.task.name or n.task.kind for n in nodes)
    return Task("MoleTask", f"MoleTask({names})", inputs=_unique(inputs), outputs=outputs,
                defaults=list(root.defaults), args={"mole": Chain(nodes, list(chain.hooks))})


def _unique(vals: list[ValRef]) -> list[ValRef]:
    return list({v.name: v for v in vals}.values())


# ------------------------------------------------------------------------------------------------ helpers for tests

def task_nodes(workflow: Any) -> list[Node]:
    """Every task node of a workflow, in order (through chains, samplings and evolutions)."""
    out: list[Node] = []

    def visit(x: Any) -> None:
        if isinstance(x, Node):
            out.append(x)
        elif isinstance(x, Task):
            out.append(Node(x))
        elif isinstance(x, Chain):
            for p in x.parts:
                visit(p)
        elif isinstance(x, (DirectSampling, NSGA2)):
            visit(x.evaluation)

    visit(workflow)
    return out


def all_tasks(workflow: Any) -> list[Task]:
    """Every task of a workflow, with the tasks a TryTask wraps and the tasks of a MoleTask's mole."""
    out: list[Task] = []

    def visit(task: Task) -> None:
        out.append(task)
        if task.wrapped is not None:
            visit(task.wrapped)
        if task.kind == "MoleTask":
            for node in task_nodes(task.args["mole"]):
                visit(node.task)

    for node in task_nodes(workflow):
        visit(node.task)
    return out
