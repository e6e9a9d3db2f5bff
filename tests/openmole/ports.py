"""Python ports of the Scala code inside the plans: the ``def``s that do more than the DSL (``foldsIn``, the fold
aggregations) and the code of every ``ScalaTask``.

Each port follows its Scala line by line and takes its regular expressions from the Scala source itself (Java's
``java.util.regex`` and Python's ``re`` agree on these patterns), so a change of the Scala that the port does not
follow makes :func:`check_port` fail instead of testing a stale copy. A ScalaTask without a port is an error of
:func:`scala_task_port`: a new ScalaTask in a plan needs its port here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .dsl import string_value


class PortMismatch(AssertionError):
    """The Scala code changed and no longer reads as the port does."""


def _normalise(code: str) -> str:
    return re.sub(r"\s+", " ", code).strip()


def check_port(code: str, lines: Sequence[str]) -> None:
    """Every line the port relies on is in the Scala code (whitespace-insensitive)."""
    normal = _normalise(code)
    missing = [line for line in lines if _normalise(line) not in normal]
    if missing:
        raise PortMismatch(f"the Scala code no longer contains {missing}; update the port in tests/openmole/ports.py")


# ------------------------------------------------------------------------------------------------ defs

FOLDS_REGEX_LITERAL = r'"\"n_folds\"\\s*:\\s*(\\d+)"'  # the Scala string literal, as written in common.oms
FOLDS_IN_LINES = (
    "if (!splits.exists)",
    FOLDS_REGEX_LITERAL + ".r.findFirstMatchIn(text) match {",
    "case Some(m) => m.group(1).toInt",
)


def folds_in(splits: Path) -> int:
    """``foldsIn(splits)`` of common.oms: the ``n_folds`` of a splits.json."""
    splits = Path(splits)
    if not splits.exists():
        raise FileNotFoundError(f"{splits}: not found; make it with `python -m python_task split ...`")
    text = splits.read_text(encoding="utf-8")
    m = re.search(string_value(FOLDS_REGEX_LITERAL), text)
    if m is None:
        raise ValueError(f'{splits}: no "n_folds" (not a splits file of `python -m python_task split`)')
    return int(m.group(1))


def finite_values(xs: Sequence[float]) -> list[float]:
    return [float(v) for v in xs if not (math.isnan(v) or math.isinf(v))]


def mean_of(xs: Sequence[float]) -> float:
    f = finite_values(xs)
    return math.nan if not f else sum(f) / len(f)


def sd_of(xs: Sequence[float]) -> float:
    f = finite_values(xs)
    if len(f) < 2:
        return math.nan
    m = sum(f) / len(f)
    return math.sqrt(sum((v - m) ** 2 for v in f) / (len(f) - 1))


def count_finite(xs: Sequence[float]) -> int:
    return len(finite_values(xs))


AGGREGATION_LINES = {
    "finiteValues": ("def finiteValues(xs: Seq[Double]): Seq[Double] = xs.filter(v => !v.isNaN && !v.isInfinite)",),
    "meanOf": ("if (f.isEmpty) Double.NaN else f.sum / f.size",),
    "sdOf": ("if (f.size < 2) Double.NaN", "math.sqrt(f.map(v => (v - m) * (v - m)).sum / (f.size - 1))"),
    "countFinite": ("def countFinite(xs: Seq[Double]): Int = finiteValues(xs).size",),
}

NATIVES: dict[str, Callable[..., Any]] = {
    "foldsIn": folds_in, "finiteValues": finite_values, "meanOf": mean_of, "sdOf": sd_of,
    "countFinite": count_finite,
}
NATIVE_LINES = {"foldsIn": FOLDS_IN_LINES, **AGGREGATION_LINES}


# ------------------------------------------------------------------------------------------------ ScalaTasks

def metric_pattern(code: str) -> tuple[str, str]:
    """The prefix and suffix of the parse task's regex, ``("<prefix>" + key + "<suffix>").r``."""
    m = re.search(r'\((".*?(?<!\\)")\s*\+\s*key\s*\+\s*(".*?(?<!\\)")\)\.r', code)
    if not m:
        raise PortMismatch('the parse task no longer builds its regex as ("..." + key + "...").r')
    return string_value(m.group(1)), string_value(m.group(2))


def parsed_metrics(code: str) -> dict[str, str]:
    """``val name = metric("key")`` of the parse task: {name: key}."""
    return dict(re.findall(r'val\s+(\w+)\s*=\s*metric\("(\w+)"\)', code))


PARSE_LINES = (
    'val metricsFile = outDir / "metrics.json"',
    'val text = if (metricsFile.exists) metricsFile.content else ""',
    "pattern.findFirstMatchIn(text).map(m => m.group(1)).flatMap(v => scala.util.Try(v.toDouble).toOption)"
    ".getOrElse(Double.NaN)",
    'val status = if (exitCode == 0 && text.nonEmpty) "ok" else "failed"',
    'else if (exitCode != 0) "train exited with code " + exitCode + ": see stderr in OpenMOLE\'s log"',
    'else if (text.isEmpty) "train exited 0 but wrote no metrics.json"',
    'val out_dir = "runs/" + point_id',
)
# `if (exitCode == N) "message"` / `else if (exitCode == N) "message"` of the error chain, read from the code itself
EXIT_MESSAGE = re.compile(r'(?:else\s+)?if \(exitCode == (-?\d+)\) "([^"]*)"')


def exit_messages(code: str) -> dict[int, str]:
    """The error chain's messages for particular exit codes, in the code's order (the first match wins in Scala)."""
    out: dict[int, str] = {}
    for number, message in EXIT_MESSAGE.findall(code):
        out.setdefault(int(number), message)
    if not out:
        raise PortMismatch("the parse task has no `if (exitCode == N) \"message\"` chain")
    return out


def point_id_parts(code: str) -> list[tuple[str, str]]:
    """``val point_id = Seq(arch, "lr" + lr, ...).mkString("_")`` of the parse task (factors.oms' pointIdCode):
    (prefix, factor) per part; nothing else may stand in the Seq."""
    m = re.search(r'val point_id = Seq\((.*)\)\.mkString\("_"\)', code)
    if m is None:
        raise PortMismatch('the parse task has no `val point_id = Seq(...).mkString("_")`')
    parts = []
    for item in (i.strip() for i in m.group(1).split(",")):
        one = re.fullmatch(r'(?:"([^"]*)"\s*\+\s*)?(\w+)', item)
        if one is None:
            raise PortMismatch(f"point_id part {item!r}: only `factor` or `\"prefix\" + factor` is ported")
        parts.append((one.group(1) or "", one.group(2)))
    return parts


def java_to_double(text: str) -> float:
    """``String.toDouble`` (Java's ``Double.parseDouble``): NaN, [-]Infinity, decimal and exponent forms."""
    if not re.fullmatch(r"[+-]?(NaN|Infinity|(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?)[dDfF]?", text.strip()):
        raise ValueError(text)
    return float(text.strip().rstrip("dDfF").replace("Infinity", "inf"))


def parse_metrics(code: str, context: Mapping[str, Any], java_str: Callable[[Any], str]) -> dict[str, Any]:
    """The parse task of common.oms on a context holding outDir, exitCode and the factors."""
    check_port(code, PARSE_LINES)
    prefix, suffix = metric_pattern(code)
    metrics_file = Path(context["outDir"]) / "metrics.json"
    text = metrics_file.read_text(encoding="utf-8") if metrics_file.exists() else ""

    def metric(key: str) -> float:
        m = re.search(prefix + key + suffix, text)
        if m is None:
            return math.nan
        try:
            return java_to_double(m.group(1))
        except ValueError:  # scala.util.Try(v.toDouble).toOption: "null" and anything unreadable
            return math.nan

    out: dict[str, Any] = {name: metric(key) for name, key in parsed_metrics(code).items()}
    exit_code = int(context["exitCode"])
    out["status"] = "ok" if exit_code == 0 and text else "failed"
    messages = exit_messages(code)
    if exit_code in messages:
        out["error"] = messages[exit_code]
    elif exit_code != 0:
        out["error"] = f"train exited with code {exit_code}: see stderr in OpenMOLE's log"
    elif not text:
        out["error"] = "train exited 0 but wrote no metrics.json"
    else:
        out["error"] = ""
    parts = [prefix + (value if isinstance(value := context[name], str) else java_str(value))
             for prefix, name in point_id_parts(code)]
    out["point_id"] = "_".join(parts)
    out["out_dir"] = "runs/" + out["point_id"]
    return out


LR_FROM_LOG10_LINES = ("val lr = math.pow(10.0, log10_lr)",)


def lr_from_log10(code: str, context: Mapping[str, Any], java_str: Callable[[Any], str]) -> dict[str, Any]:
    check_port(code, LR_FROM_LOG10_LINES)
    return {"lr": math.pow(10.0, float(context["log10_lr"]))}


OBJECTIVES_LINES = (
    "val neg_mean_val_patient_auc = if (mean_val_patient_auc.isNaN) 0.0 else -mean_val_patient_auc",
    "val model_params = if (mean_n_params.isNaN) 1.0e12 else mean_n_params",
)


def objectives(code: str, context: Mapping[str, Any], java_str: Callable[[Any], str]) -> dict[str, Any]:
    check_port(code, OBJECTIVES_LINES)
    auc, params = float(context["mean_val_patient_auc"]), float(context["mean_n_params"])
    return {"neg_mean_val_patient_auc": 0.0 if math.isnan(auc) else -auc,
            "model_params": 1.0e12 if math.isnan(params) else params}


SCALA_TASK_PORTS: dict[frozenset[str], Callable[[str, Mapping[str, Any], Callable[[Any], str]], dict[str, Any]]] = {
    frozenset({"val_auc", "status", "error", "point_id", "out_dir"}): parse_metrics,
    frozenset({"lr"}): lr_from_log10,
    frozenset({"neg_mean_val_patient_auc", "model_params"}): objectives,
}


def defined_vals(code: str) -> set[str]:
    """The names a ScalaTask's code defines at its top level (``val x = ...`` at the code's base indentation)."""
    lines = [line for line in code.splitlines() if line.strip()]
    indent = min(len(line) - len(line.lstrip()) for line in lines)
    return {m.group(1) for line in lines if len(line) - len(line.lstrip()) == indent
            for m in [re.match(r"\s*val\s+(\w+)\s*=", line)] if m}


def scala_task_port(code: str):
    """The port of a ScalaTask's code, found by the values it defines."""
    defined = defined_vals(code)
    for key, port in SCALA_TASK_PORTS.items():
        if key <= defined:
            return port
    raise PortMismatch(f"no port of the ScalaTask defining {sorted(defined)}: add one to tests/openmole/ports.py")
