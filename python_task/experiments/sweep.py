"""``sweep``: the local runner. A YAML plan -> one ``train`` command per point -> ``results.csv``.

Each point runs as the same command line the OpenMOLE container runs (``python -m python_task train ...``), in
its own process, sequentially or ``jobs`` at a time. After each point ``results.csv`` is rewritten (atomically)
with one row per point: the factor columns, the contract's metric columns and the selection and patient-count
columns (:data:`~python_task.training.metrics.RESULT_METRICS`), ``status``, ``error``, ``out_dir`` and the timing
columns. Re-running the same plan skips the points already finished; failed points are retried.
This is not a scheduler: anything beyond one machine is OpenMOLE's job.

The plan is checked in full before the first point runs (:func:`check_plan`): every value of every factor is
read as its train option's type (YAML reads ``1e-3`` as a string: it is the number 0.001, and ``[0.001, 1e-3]``
is one level), and every point is checked as ``train`` would check it (architectures, choices, ranges, the
split's folds); each bad value is one line naming the plan. One sweep writes to ``out`` at a time (its lock), and
``out`` records what its results depend on (``sweep.json``: the shards, the split and the fixed settings); a run
with others is refused unless ``overwrite``, which starts the folder afresh.

Plan layout (paths relative to the plan file)::

    shards: shards/
    splits: splits.json
    factors:            # full factorial; keys are train options without dashes (batch_size = --batch-size)
      arch: [simple_cnn, resnet50]
      fold: [0, 1, 2]
    fixed:              # passed unchanged to every point
      epochs: 5
    random:             # optional: n random draws of continuous factors, crossed with `factors`
      n: 4
      seed: 0
      factors:
        lr: {log_uniform: [1.0e-4, 1.0e-2]}
        dropout: {uniform: [0.0, 0.5]}
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from python_task.data.splits import read_splits
from python_task.errors import ConfigError, ErrorList, TaskError
from python_task.experiments.plan_limits import MAX_PLAN_NODES, MAX_POINTS
from python_task.fileio import (
    folder_lock,
    nan_for_null,
    open_for_writing,
    open_without_waiting,
    remove_stale_temporaries,
    write_csv_atomic,
    write_json_atomic,
)
from python_task.runtime import PARENT_PID_ENV
from python_task.shards.manifest import digest_rows, read_manifest
from python_task.training.config import TrainOption, config_from_options, train_options
from python_task.training.metrics import RESULT_METRICS

log = logging.getLogger(__name__)

BOOKKEEPING = ("status", "error", "point_id", "out_dir", "wall_seconds", "overhead_seconds")
RESERVED = {"shards", "splits", "out"}  # given by the plan's paths and the runner, never by a factor
DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform")
SETTINGS_NAME = "sweep.json"  # what a sweep folder's results depend on


@dataclass
class Plan:
    path: Path
    shards: Path
    splits: Path
    factors: dict[str, list[Any]]
    fixed: dict[str, Any]
    random: dict[str, Any] = field(default_factory=dict)

    def factor_names(self) -> list[str]:
        names = list(self.factors) + list(self.random.get("factors", {}))
        return names + [k for k in self.fixed if k not in names]


def load_plan(path: str | os.PathLike[str], *, max_points: int = MAX_POINTS,
              max_plan_nodes: int = MAX_PLAN_NODES) -> Plan:
    """Read and check a plan; every key must be a ``train`` option. A plan of more than ``max_points`` points, or
    whose YAML holds more than ``max_plan_nodes`` nodes with its aliases written out, is refused before anything
    is built from it (:class:`ConfigError` naming the plan and the setting)."""
    path = Path(path)
    _check_limit("max_points", max_points)
    _check_limit("max_plan_nodes", max_plan_nodes)
    data = _read_yaml(path, max_plan_nodes)
    if not isinstance(data, dict):
        raise ConfigError(None, "a plan is a YAML mapping with shards, splits, factors and fixed", path=path)
    for key in ("shards", "splits"):
        if not isinstance(data.get(key), str):
            raise ConfigError(None, f"missing '{key}: PATH'", path=path)
    unknown_top = set(data) - {"shards", "splits", "factors", "fixed", "random", "name", "description"}
    if unknown_top:
        raise ConfigError(None, f"unknown key(s) {', '.join(sorted(unknown_top))}", path=path)
    factors = data.get("factors") or {}
    fixed = data.get("fixed") or {}
    random = data.get("random") or {}
    if not isinstance(factors, dict) or not isinstance(fixed, dict) or not isinstance(random, dict):
        raise ConfigError(None, "factors, fixed and random must be mappings", path=path)
    factors = {k: v if isinstance(v, list) else [v] for k, v in factors.items()}
    for key, levels in factors.items():
        if not levels:
            raise ConfigError(None, f"factor '{key}' has no level", path=path)
    plan = Plan(path=path, shards=path.parent / data["shards"], splits=path.parent / data["splits"],
                factors=factors, fixed=fixed, random=random)
    _check_keys(plan)
    _normalise(plan)
    _check_size(plan, max_points)
    return plan


def _check_limit(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(name, f"must be a whole number of at least 1, got {value!r}")


class _TooManyNodes(Exception):
    """A YAML document whose nodes, aliases written out, pass the bound."""


class _CountingLoader(yaml.SafeLoader):
    """PyYAML's safe loader that counts, while it composes the document, the nodes it would hold with every alias
    written out (an alias counts as many nodes as its anchor's subtree), and stops past ``max_nodes``: a document
    of nested aliases is refused long before anything is built from it, in the memory of the nodes read so far."""

    def __init__(self, stream: Any, max_nodes: int) -> None:
        super().__init__(stream)
        self.max_nodes = max_nodes
        self.expanded = 0
        self.sizes: dict[int, int] = {}  # id of a composed node -> its subtree's size, aliases written out

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            node = super().compose_node(parent, index)
            if id(node) not in self.sizes:  # the anchor is still open: the alias lies inside it, without end
                raise yaml.composer.ComposerError(None, None, "an alias refers to the node that holds it", mark)
            self._count(self.sizes[id(node)])
            return node
        before = self.expanded
        node = super().compose_node(parent, index)
        self._count(1)
        self.sizes[id(node)] = self.expanded - before
        return node

    def _count(self, n: int) -> None:
        self.expanded += n
        if self.expanded > self.max_nodes:
            raise _TooManyNodes(f"more than {self.max_nodes:,} YAML nodes with its aliases written out")


def _read_yaml(path: Path, max_nodes: int) -> Any:
    """The plan's YAML document, read as a stream from a regular file (a FIFO or a device is refused before it is
    read) and composed under the node bound of :class:`_CountingLoader`."""
    try:
        fd, status = open_without_waiting(path)
    except FileNotFoundError:
        raise ConfigError(None, "plan not found", path=path) from None
    except OSError as exc:
        raise ConfigError(None, f"not a readable YAML plan ({exc.strerror or exc})", path=path) from None
    if not stat.S_ISREG(status.st_mode):
        os.close(fd)
        raise ConfigError(None, "not a readable YAML plan (not a regular file)", path=path)
    with open(fd, encoding="utf-8") as stream:
        loader = _CountingLoader(stream, max_nodes)
        try:
            return loader.get_single_data()
        except _TooManyNodes as exc:
            raise ConfigError("max_plan_nodes", f"{exc} (an alias counts as every value it stands for): write "
                              "fewer values, or raise `max_plan_nodes`", path=path) from None
        except (OSError, UnicodeDecodeError, RecursionError, yaml.YAMLError) as exc:
            raise ConfigError(None, f"not a readable YAML plan ({' '.join(str(exc).split()) or type(exc).__name__})",
                              path=path) from None
        finally:
            loader.dispose()


def count_points(plan: Plan) -> int:
    """The number of points :func:`expand_points` gives, from the number of levels of each factor (and of random
    draws), without building any."""
    n_draws = int(plan.random.get("n", 1)) if plan.random else 1
    return math.prod(len(levels) for levels in plan.factors.values()) * n_draws


def _check_size(plan: Plan, max_points: int) -> None:
    """Refuse a plan of more than ``max_points`` points before any is built or checked."""
    n = count_points(plan)
    if n > max_points:
        sizes = [f"{len(levels):,} {key}" for key, levels in plan.factors.items()]
        if plan.random:
            sizes.append(f"{int(plan.random['n']):,} random draws")
        raise ConfigError("max_points", f"{n:,} points ({' x '.join(sizes)}), more than the {max_points:,} a sweep "
                          "may run: use fewer levels, or raise `max_points`", path=plan.path)


def option_value(option: TrainOption, value: Any) -> Any:
    """``value`` as the train option's type: ``"1e-3"`` (how YAML reads it) is the float 0.001, ``32.0`` the int
    32, ``[flip, rot90]`` the string ``flip,rot90``. ``ValueError`` saying what the option needs otherwise."""
    kind = option.kind
    if value is None:
        raise ValueError("has no value (leave the key out to get the default)")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ValueError(f"must be true or false, not {value!r}")
    if isinstance(value, bool) and kind in (int, float):
        raise ValueError(f"must be a number, not {value!r}")
    if kind is int:
        try:
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, (int, float)) and float(number).is_integer():
                return int(number)
        except (ValueError, OverflowError):
            pass
        raise ValueError(f"must be a whole number, not {value!r}")
    if kind is float:
        try:
            if isinstance(value, (int, float, str)):
                return float(value)
        except ValueError:
            pass
        raise ValueError(f"must be a number, not {value!r}")
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        raise ValueError(f"must be a single value, not a mapping {value!r}")
    return str(value)


def _normalise(plan: Plan) -> None:
    """Every value as its option's type (one line per bad value, all at once); levels equal once typed are one."""
    options = train_options()
    problems: list[TaskError] = []

    def typed(where: str, key: str, value: Any) -> Any:
        try:
            return option_value(options[key], value)
        except ValueError as exc:
            problems.append(ConfigError(None, f"{where} '{key}': {value!r} {exc}", path=plan.path))
            return value

    for key, levels in plan.factors.items():
        values = [typed("factor", key, v) for v in levels]
        unique = list(dict.fromkeys(json.dumps(v, sort_keys=True) for v in values))
        if len(unique) < len(values):
            log.warning("%s: factor '%s' lists one value several times (%s): each runs once", plan.path, key,
                        ", ".join(map(str, levels)))
        plan.factors[key] = [json.loads(u) for u in unique]
    plan.fixed = {key: typed("fixed", key, v) for key, v in plan.fixed.items()}
    if problems:
        raise ErrorList(problems)


def check_plan(plan: Plan) -> None:
    """Check every point of ``plan`` as ``train`` would before running any (see the module doc): one
    :class:`ConfigError` naming the plan per bad value, raised together as an :class:`ErrorList`."""
    options = train_options()
    base = {"shards": plan.shards, "splits": plan.splits, "out": plan.path.parent}
    field_key = {o.field: k for k, o in options.items()}
    try:
        n_folds = len(read_splits(plan.splits)["folds"])
    except TaskError as exc:
        raise ConfigError(None, f"splits: {exc}", path=plan.path) from None
    problems: dict[str, str] = {}  # one line per bad value (or per failing combination)
    counts: dict[str, int] = {}

    def note(key: str, text: str) -> None:
        problems.setdefault(key, text)
        counts[key] = counts.get(key, 0) + 1

    def refuse() -> ErrorList:
        return ErrorList([ConfigError(None, text + (f" (and {counts[key] - 1} more points)" if counts[key] > 1 and
                                                    text.startswith("point") else ""), path=plan.path)
                          for key, text in problems.items()])

    levels = [("factor", k, v) for k, values in plan.factors.items() for v in values]
    levels += [("fixed", k, v) for k, v in plan.fixed.items()]
    for draw in random_draws(plan.random) if plan.random else []:
        levels += [("random factor", k, v) for k, v in draw.items()]
    # one value at a time, beside a valid architecture and fold: the message names the key and the value at fault
    archs = [v for where, k, v in levels if k == "arch"]
    reference = {"fold": 0, "arch": next((a for a in archs if _config_error({"arch": a, "fold": 0}, base) is None),
                                         archs[0] if archs else None)}
    for where, key, value in levels:
        if key == "fold":
            if not (isinstance(value, int) and 0 <= value < n_folds):
                note(f"fold={value!r}", f"{where} 'fold': {value!r} is not a fold of {plan.splits} (it has "
                     f"{n_folds}: 0 to {n_folds - 1})")
            continue
        error = _config_error({**reference, key: value}, base)
        if error is not None and field_key.get(error.setting or "", error.setting) in (key, None):
            note(f"{key}={value!r}", f"{where} '{key}': {value!r}: {error.cause}")
    if problems:
        raise refuse()
    for point in expand_points(plan):  # the combinations: every point as train checks it
        error = _config_error(point, base)
        if error is not None:
            what = f"{error.setting}: {error.cause}" if error.setting else error.cause
            shown = ", ".join(f"{k}={v}" for k, v in point.items() if k in plan.factors or k in plan.random.get(
                "factors", {}))
            note(what, f"point {shown or 'of the plan'}: {what}")
    if problems:
        raise refuse()


def _config_error(values: dict[str, Any], base: dict[str, Any]) -> ConfigError | None:
    try:
        config_from_options({**values, **base})
    except ConfigError as exc:
        return exc
    return None


def _check_keys(plan: Plan) -> None:
    options = train_options()  # generated from TrainConfig: a new train setting is a plan key at once
    names = plan.factor_names()
    unknown = [k for k in names if k not in options or k in RESERVED]
    if unknown:
        raise ConfigError(None, f"not train options: {', '.join(unknown)} (keys are train options without "
                          "dashes, e.g. batch_size for --batch-size)", path=plan.path)
    dupes = set(plan.factors) & set(plan.fixed)
    if dupes:
        raise ConfigError(None, f"{', '.join(sorted(dupes))} both a factor and fixed", path=plan.path)
    for required in ("arch", "fold"):
        if required not in names:
            raise ConfigError(None, f"'{required}' must be a factor or fixed", path=plan.path)
    rnd = plan.random
    if rnd:
        if not isinstance(rnd.get("n"), int) or rnd["n"] < 1:
            raise ConfigError(None, "random.n must be a positive integer", path=plan.path)
        for key, dist in (rnd.get("factors") or {}).items():
            if not (isinstance(dist, dict) and len(dist) == 1 and next(iter(dist)) in DISTRIBUTIONS
                    and isinstance(next(iter(dist.values())), list) and len(next(iter(dist.values()))) == 2):
                raise ConfigError(None, f"random factor '{key}': write {{uniform|log_uniform|int_uniform: "
                                  "[low, high]}}", path=plan.path)
            kind, bounds = next(iter(dist.items()))
            option = train_options()[key]
            if option.kind not in (int, float):
                raise ConfigError(None, f"random factor '{key}': not a numeric option, cannot be drawn at random",
                                  path=plan.path)
            if (option.kind is int) != (kind == "int_uniform"):
                need = "int_uniform" if option.kind is int else "uniform or log_uniform"
                raise ConfigError(None, f"random factor '{key}': draw it with {need}", path=plan.path)
            try:
                low, high = (float(b) for b in bounds)  # YAML reads 1e-4 as a string
            except (TypeError, ValueError):
                raise ConfigError(None, f"random factor '{key}': bounds {bounds!r} are not numbers",
                                  path=plan.path) from None
            if not (math.isfinite(low) and math.isfinite(high) and low < high) or (
                    kind == "log_uniform" and low <= 0) or (kind == "int_uniform" and not (
                    low.is_integer() and high.is_integer())):
                raise ConfigError(None, f"random factor '{key}': {kind} needs finite bounds low < high"
                                  f"{' above 0' if kind == 'log_uniform' else ''}"
                                  f"{', whole numbers' if kind == 'int_uniform' else ''} (got {bounds!r})",
                                  path=plan.path)
            dist[kind] = [int(low), int(high)] if kind == "int_uniform" else [low, high]


def expand_points(plan: Plan) -> list[dict[str, Any]]:
    """Every point of the plan: the full factorial of ``factors`` (x the random draws), plus ``fixed``."""
    keys = list(plan.factors)
    grid = [dict(zip(keys, combo)) for combo in itertools.product(*(plan.factors[k] for k in keys))]
    draws = random_draws(plan.random) if plan.random else [{}]
    return [{**draw, **point, **plan.fixed} for draw in draws for point in grid]


def random_draws(spec: dict[str, Any]) -> list[dict[str, Any]]:
    rng = np.random.default_rng(spec.get("seed", 0))
    draws = []
    for _ in range(spec["n"]):
        draw = {}
        for key, dist in (spec.get("factors") or {}).items():
            kind, (low, high) = next(iter(dist.items()))
            if kind == "uniform":
                value: Any = float(rng.uniform(low, high))
            elif kind == "log_uniform":
                value = float(math.exp(rng.uniform(math.log(low), math.log(high))))
            else:
                value = int(rng.integers(low, high + 1))
            draw[key] = float(f"{value:.4g}") if isinstance(value, float) else value
        draws.append(draw)
    return draws


def point_id(point: dict[str, Any]) -> str:
    """A short stable name: a few readable factor values and a hash of all of them."""
    digest = hashlib.sha1(json.dumps(point, sort_keys=True, default=str).encode()).hexdigest()[:8]
    readable = "_".join(str(point[k]) for k in ("arch", "fold") if k in point)
    return f"{readable}_{digest}"


def train_command(plan: Plan, point: dict[str, Any], out: Path) -> list[str]:
    """The exact ``train`` command line of a point (what the container runs)."""
    options = train_options()
    cmd = [sys.executable, "-m", "python_task", "train", "--shards", str(plan.shards), "--splits", str(plan.splits),
           "--out", str(out), "--quiet"]
    for key, value in point.items():
        flag = options[key].flag
        if isinstance(value, bool):
            if value:
                cmd.append(flag)
        elif isinstance(value, (list, tuple)):
            cmd += [flag, ",".join(map(str, value))]
        else:
            cmd += [flag, str(value)]
    return cmd


@dataclass
class PointResult:
    point: dict[str, Any]
    point_id: str
    status: str
    error: str
    out_dir: str
    metrics: dict[str, float]
    wall_seconds: float

    def row(self) -> dict[str, Any]:
        train_s = self.metrics.get("train_seconds", float("nan"))
        row: dict[str, Any] = {k: _csv_value(v) for k, v in self.point.items()}
        row.update({m: self.metrics.get(m, float("nan")) for m in RESULT_METRICS})
        row.update(status=self.status, error=self.error, point_id=self.point_id, out_dir=self.out_dir,
                   wall_seconds=round(self.wall_seconds, 3),
                   overhead_seconds=round(self.wall_seconds - train_s, 3) if self.status == "ok" else float("nan"))
        return row


def _csv_value(v: Any) -> Any:
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v


def run_point(plan: Plan, point: dict[str, Any], out_dir: Path, threads: int) -> PointResult:
    pid = point_id(point)
    folder = out_dir / "points" / pid
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "point.json", point)
    env = {**os.environ, "TF_NUM_INTRAOP_THREADS": str(threads), "TF_NUM_INTEROP_THREADS": "1",
           "OMP_NUM_THREADS": str(threads), "TF_CPP_MIN_LOG_LEVEL": "2",
           PARENT_PID_ENV: str(os.getpid())}  # the point ends if the sweep is killed
    t0 = time.perf_counter()
    with open_for_writing(folder / "train.log") as log:  # never through a link planted there
        proc = subprocess.run(train_command(plan, point, folder), stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    rel = os.path.relpath(folder, out_dir)
    metrics_file = folder / "metrics.json"
    if proc.returncode == 0 and metrics_file.exists():
        metrics = nan_for_null(json.loads(metrics_file.read_text(encoding="utf-8")))
        return PointResult(point, pid, "ok", "", rel, metrics, wall)
    return PointResult(point, pid, "failed", _last_error(folder / "train.log", proc.returncode), rel, {}, wall)


def _last_error(log: Path, code: int) -> str:
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    text = errors[-1] if errors else (lines[-1] if lines else "")
    return f"exit {code}: {text}"[:500]


@dataclass
class SweepReport:
    results_csv: Path
    rows: list[dict[str, Any]]
    ran: int
    skipped: int

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] != "ok"]


def read_results(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def run_sweep(plan_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, jobs: int = 1,
              progress: bool = True, overwrite: bool = False, max_points: int = MAX_POINTS,
              max_plan_nodes: int = MAX_PLAN_NODES) -> SweepReport:
    """Run every unfinished point of a plan; returns the full results table. The plan is checked in full first
    (its size first of all: ``max_points``, ``max_plan_nodes``, see :func:`load_plan`); ``out_dir``'s lock is held
    throughout; ``overwrite`` lets a plan with other shards, split or fixed settings replace the folder's results
    (the points of the earlier runs are deleted)."""
    plan = load_plan(plan_path, max_points=max_points, max_plan_nodes=max_plan_nodes)
    for path, what in ((plan.shards, "shards folder"), (plan.splits, "splits file")):
        if not path.exists():
            raise ConfigError(None, f"{what} {path} not found", path=plan.path)
    if jobs < 1:
        raise ConfigError("jobs", f"must be at least 1, got {jobs}")
    check_plan(plan)
    out = Path(out_dir)
    with folder_lock(out, "sweep"):
        remove_stale_temporaries(out)
        _check_settings(plan, out, overwrite)
        return _run_points(plan, out, jobs, progress)


def _settings(plan: Plan) -> dict[str, Any]:
    """What a sweep folder's finished points depend on beyond their own factors."""
    return {"shards": str(plan.shards.resolve()), "splits": str(plan.splits.resolve()),
            "manifest_digest": digest_rows(read_manifest(plan.shards)),
            "splits_sha256": hashlib.sha256(plan.splits.read_bytes()).hexdigest(),
            "fixed": json.loads(json.dumps(plan.fixed, sort_keys=True, default=str))}


def _check_settings(plan: Plan, out: Path, overwrite: bool) -> None:
    """Refuse a plan whose shards, split or fixed settings differ from those the folder's results were made with
    (``sweep.json``), unless ``overwrite``: then the earlier results and points are deleted."""
    path = out / SETTINGS_NAME
    mine = _settings(plan)
    theirs: Any = None
    if path.exists():
        try:
            theirs = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            theirs = {}
    if theirs == mine:
        return
    if theirs is not None and not overwrite:
        changed = [k for k in mine if not isinstance(theirs, dict) or theirs.get(k) != mine[k]]
        raise ConfigError(None, f"the results in {out} were made with other {', '.join(changed)} than {plan.path} "
                          "gives: use `overwrite` to start that folder afresh with this plan, or another `out`",
                          path=path)
    if overwrite and ((out / "points").exists() or (out / "results.csv").exists()):
        log.info("%s: earlier results deleted (overwrite)", out)
        shutil.rmtree(out / "points", ignore_errors=True)
        (out / "results.csv").unlink(missing_ok=True)
    write_json_atomic(path, mine)


def _run_points(plan: Plan, out: Path, jobs: int, progress: bool) -> SweepReport:
    points = expand_points(plan)
    results_csv = out / "results.csv"
    done = {r["point_id"]: r for r in read_results(results_csv) if r.get("status") == "ok"
            and (out / r["out_dir"] / "metrics.json").exists()}
    rows: dict[str, dict[str, Any]] = {pid: row for pid, row in done.items()}
    todo = [p for p in points if point_id(p) not in done]
    columns = plan.factor_names() + list(RESULT_METRICS) + list(BOOKKEEPING)
    lock = threading.Lock()
    threads = max(1, (os.cpu_count() or 1) // jobs)
    if progress:
        log.info("sweep %s: %d points, %d already done, %d to run, %d at a time", plan.path.name, len(points),
                 len(done), len(todo), jobs)

    def record(result: PointResult) -> None:
        with lock:
            rows[result.point_id] = result.row()
            ordered = [rows[point_id(p)] for p in points if point_id(p) in rows]
            write_csv_atomic(results_csv, ordered, fieldnames=columns)
            if progress:
                n = len(rows)
                summary = (f"val_auc {result.metrics.get('val_auc', float('nan')):.3f}, patient AUC "
                           f"{result.metrics.get('val_patient_auc', float('nan')):.3f}"
                           if result.status == "ok" else result.error)
                log.info("[%d/%d] %s: %s, %s (%.1f s)", n, len(points), result.point_id, result.status, summary,
                         result.wall_seconds)

    if jobs == 1:
        for p in todo:
            record(run_point(plan, p, out, threads))
    else:
        with cf.ThreadPoolExecutor(max_workers=jobs) as pool:
            for fut in cf.as_completed([pool.submit(run_point, plan, p, out, threads) for p in todo]):
                record(fut.result())
    if not todo:
        ordered = [rows[point_id(p)] for p in points if point_id(p) in rows]
        if not results_csv.exists():
            write_csv_atomic(results_csv, ordered, fieldnames=columns)
    report = SweepReport(results_csv, [rows[point_id(p)] for p in points if point_id(p) in rows], len(todo),
                         len(done))
    if progress:
        log.info("%d of %d points ok, %d failed; results: %s", len(report.rows) - len(report.failed), len(points),
                 len(report.failed), results_csv)
    return report
