"""``openmole/factors.oms``, generated: the OpenMOLE plans' factors and metrics, declared once, here.

A factor of the plans is an option of ``train`` (:func:`python_task.training.config.train_options`, from
:class:`~python_task.training.config.TrainConfig`); a metric the plans read is one ``train`` writes to
``metrics.json`` (:data:`python_task.training.metrics.RESULT_METRICS`). From :data:`PLAN_FACTORS` and those two
definitions this module writes, as Scala, everything of the plans that names them one by one: the ``Val`` of
each factor and metric, the list of factors every task of a point passes on, each factor's default (train's
own), the ``train`` command, the lines of the parse task that read each metric, and the point's id.
``openmole/common.oms`` uses those names and lists no factor or metric itself.

Letting a plan sweep another train option is one key in :data:`PLAN_FACTORS`, then::

    python -m python_task.experiments.openmole_factors          # rewrites openmole/factors.oms

A test fails while ``openmole/factors.oms`` differs from what this writes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from python_task.fileio import write_text_atomic
from python_task.training.config import TrainOption, train_options
from python_task.training.metrics import RESULT_METRICS

# The train options a plan can set, in the train command's order and the point id's (fold, which always comes from
# the fold loop, last in the id: the part that varies fastest).
PLAN_FACTORS = ("fold", "arch", "lr", "batch_size", "epochs", "optimizer", "weight_decay", "dropout", "augment",
                "stain", "elastic_alpha", "max_train_tiles", "patience", "aggregation", "calibration",
                "calibration_folds", "seed")
# train has no default architecture: a plan that sets none trains this one.
PLAN_DEFAULTS = {"arch": "simple_cnn"}
# Factors whose train value is a comma-separated list: CSVHook does not quote values, so the plans join the items
# with '+' and the command turns them back into ','.
PLUS_JOINED = frozenset({"augment"})
# How the point's id spells each factor: a prefix before its value ("lr0.001"); a factor not listed is "<key>-".
ID_PREFIXES = {"arch": "", "lr": "lr", "batch_size": "bs", "epochs": "ep", "optimizer": "", "weight_decay": "wd",
               "dropout": "do", "augment": "aug-", "stain": "stain-", "elastic_alpha": "ea",
               "max_train_tiles": "mt", "patience": "pa", "aggregation": "agg-", "calibration": "cal-",
               "calibration_folds": "cf",
               "seed": "seed", "fold": "fold"}
# Where the image has the data and the output (its mount points), and the switches every point gets.
COMMAND_HEAD = "python -m python_task train --shards /data/shards --splits /data/splits.json --out /out"
COMMAND_TAIL = "--no-tensorboard --quiet"
OUTPUT = Path(__file__).resolve().parents[2] / "openmole" / "factors.oms"

_SCALA_TYPES = {str: "String", float: "Double", int: "Int", bool: "Boolean"}


def plan_factors() -> list[TrainOption]:
    """The options of :data:`PLAN_FACTORS`, checked: each an option of ``train`` with a Scala type."""
    options = train_options()
    unknown = [k for k in PLAN_FACTORS if k not in options]
    if unknown:
        raise ValueError(f"PLAN_FACTORS: {unknown} are not options of train")
    out = [options[k] for k in PLAN_FACTORS]
    for option in out:
        if option.kind not in _SCALA_TYPES:
            raise ValueError(f"PLAN_FACTORS: {option.key} has type {option.kind.__name__}, which a Val cannot hold")
    return out


def scala_literal(value: object) -> str:
    """A Scala literal of ``value`` as the plans write it (a string quoted, a Double with a decimal point)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float):
        text = repr(value)
        return text if ("." in text or "e" in text) else text + ".0"
    return str(value)


def plan_default(option: TrainOption) -> object:
    """A factor's default in the plans: train's own, '+'-joined where :data:`PLUS_JOINED`."""
    value = PLAN_DEFAULTS.get(option.key, option.fallback)
    if option.key in PLUS_JOINED and isinstance(value, str):
        value = value.replace(",", "+")
    if option.kind is float and isinstance(value, int):
        value = float(value)
    return value


def command_argument(option: TrainOption) -> str:
    value = "${" + option.key + "}"
    if option.key in PLUS_JOINED:
        value = "$(echo " + value + " | tr + ,)"
    return f"{option.flag} {value}"


def point_id_expression() -> str:
    """The Scala expression of the point's id: its factors' values with their prefixes, joined with '_', fold last."""
    parts = []
    for key in [k for k in PLAN_FACTORS if k != "fold"] + ["fold"]:
        prefix = ID_PREFIXES.get(key, key + "-")
        parts.append(key if prefix == "" else f'"{prefix}" + {key}')
    return "Seq(" + ", ".join(parts) + ').mkString("_")'


def render() -> str:
    """The text of ``openmole/factors.oms``."""
    factors = plan_factors()
    sweepable = [f for f in factors if f.key != "fold"]
    lines = [
        "// factors.oms: GENERATED by `python -m python_task.experiments.openmole_factors` from train's options",
        "// (TrainConfig) and the metrics train writes (RESULT_METRICS). Do not edit it: a test fails when it differs",
        "// from what that command writes. To let a plan sweep another train option, add its key to PLAN_FACTORS in",
        "// python_task/experiments/openmole_factors.py and run the command. common.oms and the plans import it.",
        "",
        "// Factors: the train options, '-' -> '_', so the CSV columns are the local runner's (`sweep`).",
    ]
    lines += [f"val {f.key} = Val[{_SCALA_TYPES[f.kind]}]" for f in factors]
    lines += [
        "",
        "// Every factor: the inputs and outputs of each task a point passes through.",
        "val factors: Seq[Val[?]] = Seq(" + ", ".join(f.key for f in factors) + ")",
        "",
        "// Each factor's default, train's own (a value that reaches the task, a plan's factor, wins over it); fold",
        "// always comes from the fold loop. train has no default architecture: a plan that sets none trains "
        + PLAN_DEFAULTS["arch"] + ".",
        "// Lists are joined with '+' (" + ", ".join(sorted(PLUS_JOINED)) + "): CSVHook does not quote values.",
        "val factorDefaults = EmptyTask() set (",
        "  (inputs, outputs) ++= factors,",
    ]
    lines += [f"  {f.key} := {scala_literal(plan_default(f))}," for f in sweepable]
    lines[-1] = lines[-1].rstrip(",")
    lines += [
        ")",
        "",
        "// The train command inside the image (/data/shards, /data/splits.json and /out are its mount points).",
        "// `${x}` is OpenMOLE's substitution of the Val x; no single quote: the GPU path wraps it in sh -c '...'.",
        'val trainCommand = "' + " ".join([COMMAND_HEAD, *(command_argument(f) for f in factors), COMMAND_TAIL])
        + '"',
        "",
        "// The metrics train writes to metrics.json, same names.",
    ]
    lines += [f"val {m} = Val[Double]" for m in RESULT_METRICS]
    lines += [
        "val metrics: Seq[Val[?]] = Seq(" + ", ".join(RESULT_METRICS) + ")",
        "",
        "// Lines of the parse task's code: each metric read with its `metric` function, then the point's id.",
        'val readMetricsCode = """',
    ]
    lines += [f'  val {m} = metric("{m}")' for m in RESULT_METRICS]
    lines += [
        '"""',
        'val pointIdCode = """',
        "  val point_id = " + point_id_expression(),
        '"""',
    ]
    return "\n".join(lines) + "\n"


def write(path: Path = OUTPUT) -> Path:
    write_text_atomic(path, render())
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    path = Path(args[0]) if args else OUTPUT
    print(write(path))  # noqa: T201 - a developer's command: the file it wrote
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
