"""The data-flow check of a plan: does every factor of its sampling (or genome) reach the training point?

One configuration of the plan's outermost sampling is run through :class:`engine.Engine` in dry mode (the
external tasks record what they receive instead of running), with factor values chosen unlike the point's
defaults, so that a factor dropped on the way and silently replaced by its default shows. A factor is fine when
the train task receives its sampled value, or when it is not a train option and a task on the way reads it
(``log10_lr`` read by ``lrFromLog10``, which makes ``lr``). Otherwise the report names the first task after which
the factor was gone: a task between the sampling and the point that is neither a ``Strain(...)`` nor declares the
factor.

It also checks the point's output files: a File value that the training task RECEIVES under the name of one of its
File outputs wins over the folder the task produces (``External.fetchOutputFiles``, ``External.scala:136, 141-143``
at v22.1, ported in :func:`engine.fetch_output_files`), so the point would return that value (e.g. a TryTask's
fallback ``outDir``) instead of its results.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .dsl import LHS, NSGA2, DirectSampling, Factor, Plan, Product, Settings, Task, all_tasks
from .engine import Engine, _typed, load_plan

POINT_TASKS = ("trainInContainer", "trainWithApptainer")


@dataclass
class FlowReport:
    plan: str
    sample: dict[str, Any]
    received: dict[str, Any]  # what the train task received
    problems: list[str] = field(default_factory=list)
    command: str = ""


def outer_factors(workflow: Any) -> list[Factor]:
    if isinstance(workflow, NSGA2):
        return list(workflow.genome)
    if isinstance(workflow, DirectSampling):
        return _factors(workflow.sampling)
    return []


def _factors(sampling: Any) -> list[Factor]:
    if isinstance(sampling, Factor):
        return [sampling]
    if isinstance(sampling, Product):
        return [f for p in sampling.parts for f in _factors(p)]
    if isinstance(sampling, LHS):
        return list(sampling.factors)
    return []


def distinctive_sample(plan: Plan, factors: list[Factor]) -> dict[str, Any]:
    """For each factor a value unlike the point's default for it (so a dropped factor shows)."""
    defaults = {d.val.name: _typed(d.val, d.value) for d in plan.value("pointDefaults").defaults}
    sample = {}
    for f in factors:
        if f.values is not None:
            values = [_typed(f.val, v) for v in f.values]
            sample[f.val.name] = next((v for v in values if v != defaults.get(f.val.name)), values[0])
        else:
            lo, hi = f.bounds
            sample[f.val.name] = _typed(f.val, lo + 0.37 * (hi - lo))
    return sample


def check_plan(name: str, settings: Settings, root: Path) -> FlowReport:
    plan = load_plan(name, settings)
    workflow = plan.workflow()
    factors = outer_factors(workflow)
    sample = distinctive_sample(plan, factors)
    if isinstance(workflow, NSGA2):
        engine = Engine(plan, root, dry=True, genome=sample)
    else:
        engine = Engine(plan, root, dry=True, outer_sample=sample)
    engine.run()
    dry = [e for e in engine.events if e.kind == "dry" and e.task in POINT_TASKS]
    report = FlowReport(name, sample, dry[0].detail["context"] if dry else {})
    if not dry:
        report.problems.append("no training point ran")
        return report
    report.command = dry[0].detail["command"]
    point_task = next(t for t in (_task_named(workflow, name) for name in POINT_TASKS) if t is not None)
    train_inputs = {v.name for v in point_task.inputs}
    used_by_a_task = set()
    for event in engine.events:
        if event.kind == "task" and event.task not in POINT_TASKS:
            task = _task_named(workflow, event.task)
            if task is not None:
                used_by_a_task |= {v.name for v in task.inputs}
    for f in factors:
        name, value = f.val.name, sample[f.val.name]
        if name in train_inputs:
            got = report.received.get(name)
            if not _same(got, value):
                culprit = _first_dropper(engine, name)
                report.problems.append(f"{name}: sampled {value!r} but the point trained with {got!r} (its default)"
                                       f"; dropped by {culprit}: make it a Strain(...) or declare {name} in its "
                                       f"(inputs, outputs)")
        elif name not in used_by_a_task:
            report.problems.append(f"{name}: sampled but neither a train option nor read by any task")
    for val in point_task.outputs:
        if val.type == "File" and val.name in report.received:
            report.problems.append(
                f"{val.name}: {point_task.name} receives {val.name} = {report.received[val.name]} and returns it in "
                f"place of the folder it produces (External.fetchOutputFiles: a File of its outputs already in its "
                f"context wins); give it a context without {val.name}, e.g. TryTask(MoleTask(onlyFactors -- train))")
    for ref in re.findall(r"\$\{(\w+)\}", plan.value("trainCommand")):
        if ref not in train_inputs:
            report.problems.append(f"${{{ref}}} is in the train command but not an input of {point_task.name}")
    return report


def _first_dropper(engine: Engine, name: str) -> str:
    present = False
    for event in engine.events:
        if event.kind != "task":
            continue
        result = event.detail["result"]
        if name in result:
            present = True
        elif present or name not in event.detail["received"]:
            return event.task
    return "an unknown task"


def _task_named(workflow: Any, name: str) -> Task | None:
    return next((task for task in all_tasks(workflow) if task.name == name), None)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-12 * max(1.0, abs(b))
    return a == b
