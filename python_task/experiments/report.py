"""``report``: a sweep's results table -> ``summary.csv``, ``report.html`` and PNG figures.

Input is one row per experiment point, written either by the local runner (``sweep``: factor columns, the
contract's metric columns, ``status``, ``error``, ``out_dir``, timings) or by OpenMOLE's ``CSVHook`` (the same
names sorted alphabetically, plus ``openmole$experiment``, ``exitCode``, ``outDir``..., maybe no ``status``).

Columns are classified by name:

* metrics: the contract's names (``val_auc`` ... ``n_params``) and any other ``val_*`` column;
* bookkeeping: ``status``, ``error``, ``out_dir``/``outDir``, ``exitCode``, ``returnValue``, ``point_id``,
  ``stdOut``/``stdErr``, anything starting with ``openmole`` and any other ``...seconds``/``...duration`` column;
* factors: everything else. A *configuration* is every factor but ``fold`` and ``seed``.

A point is one configuration, fold and seed. When the table holds several rows of one point (a plan re-run into
the same table: OpenMOLE's ``CSVHook`` appends, and ``openmole$experiment`` restarts with each execution), the
last completed row counts, else the last row; the report says how many rows were superseded.

A point is failed when its ``status`` is not ``ok``; without a ``status`` column, when ``exitCode`` (or
``returnValue``) is non-zero; and in any case when every metric is NaN. A row holding an impossible metric value
(outside the metric's range, :func:`metric_range`: an AUC of -5; an infinity; text that is no number) is invalid:
a one-line warning names the file, its line and the column, and the row counts as a failed point, none of its
values averaged (one broken value says the row cannot be trusted). Failed points are listed in the report,
never fatal. Means, standard deviations (ddof=1) and 95 % t-intervals of each metric are taken over a
configuration's completed points with a finite value of that metric; an interval is clipped to the metric's range
(:func:`metric_range`: an AUC's never leaves [0, 1]). Configurations are ranked by the mean of the ranking metric
(``val_patient_auc`` by default): highest first, or lowest first for ``*loss`` / ``*seconds``; NaN last; equal
means by the mean tile AUC (:func:`tie_breaker`).

What a number is worth: beside the patient- and slide-level figures the ranking shows how many patients (and
slides) of each class lie behind them (``n_val_patients_pos`` / ``_neg`` ... of ``train``'s metrics, summed over
the folds, with the fewest of one fold); a warning lists every fold with fewer than 2 validation patients of a
class; a line says that the best of N configurations is an optimistic estimate (chosen on the same folds it is
reported on) and where the test-set figure is. The best configuration's patient AUC over all its folds' patients
pooled gets a percentile-bootstrap interval over patients (from the points' ``predictions.csv``). Test-set
evaluations (``evaluate`` output folders, ``tests``) are shown in their own section, apart from the ranking.

The HTML is a single static page (inline CSS, no JavaScript) with ``<img>`` links to PNGs in the same folder:
``auc_by_arch.png`` (box plot of patient-level AUC per architecture, or per configuration without an ``arch``
column), ``factor_<name>.png`` (mean ± std of the ranking metric per level of each factor that varies,
marginalised over the other factors) and ``roc_best.png`` (tile- and patient-level ROC curves of the best
configuration, one curve per fold, from each point's ``predictions.csv`` when present; a patient's score is the
mean probability of its tiles and its label the highest label of its tiles) and ``reliability_best.png`` (the
best configuration's validation tiles pooled: observed fraction malignant against predicted probability, with the
Brier score).
"""

from __future__ import annotations

import csv
import html
import logging
import math
import os
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from python_task.errors import ConfigError, TaskError
from python_task.fileio import (
    atomic_path,
    folder_lock,
    remove_stale_temporaries,
    write_csv_atomic,
    write_text_atomic,
)
from python_task.training.metrics import CONTRACT_METRICS, RESULT_METRICS, aggregate, bootstrap_interval

log = logging.getLogger(__name__)

FACTOR_EXCLUDE = {"fold", "seed"}
BOOKKEEPING = {"status", "error", "out_dir", "outdir", "exitcode", "returnvalue", "point_id", "pointid", "stdout",
               "stderr"}  # compared in lower case
STATS = ("mean", "std", "ci_low", "ci_high")
CONFIDENCE = 0.95
MISSING = {"", "nan", "none", "null", "na", "n/a"}
OK_STATUS = {"ok", "success", "succeeded", "done", "completed"}
TABLE_METRICS = ("val_auc", "val_slide_auc", "val_patient_auc", "val_balanced_accuracy", "val_slide_accuracy",
                 "val_patient_accuracy", "val_slide_brier", "n_params", "train_seconds")
MAX_BOXES = 40


# --------------------------------------------------------------------------------------------- reading


def column_kind(name: str) -> str:
    """``"metric"``, ``"bookkeeping"`` or ``"factor"``."""
    if name in RESULT_METRICS or name.startswith(("val_", "tune_", "n_val_", "n_tune_")):
        return "metric"
    low = name.lower()
    if low in BOOKKEEPING or low.startswith("openmole") or low.endswith("seconds") or low.endswith("duration"):
        return "bookkeeping"
    return "factor"


def _to_float(value: Any) -> float:
    """A metric value as float; NaN for empty, missing, non-numeric or infinite values."""
    if value is None:
        return math.nan
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        v = float(value)
    else:
        text = str(value).strip()
        if text.lower() in MISSING:
            return math.nan
        try:
            v = float(text)
        except ValueError:
            return math.nan
    return v if math.isfinite(v) else math.nan


def _metric_cell(value: str) -> float | str:
    """A metric cell of a results table as read: a float (infinities kept, for :func:`_invalid_values` to refuse),
    NaN when missing, or the text itself when it is no number."""
    text = value.strip()
    if text.lower() in MISSING:
        return math.nan
    try:
        return float(text)
    except ValueError:
        return text


def _parse_number(text: str) -> int | float | None:
    """``"3"`` -> 3, ``"1.0E-4"`` -> 0.0001 (OpenMOLE writes Scala doubles), anything else -> None."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        v = float(text)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _typed_factor_column(values: list[str]) -> list[Any]:
    """Numbers stay numbers when every non-empty value of the column is one (``NaN`` counts as missing there);
    empty -> None; anything else stays text as written (``none`` is a level, e.g. ``stain=none``)."""
    present = [v.strip() for v in values if v.strip()]
    numbers = [v for v in present if v.lower() != "nan"]
    if numbers and all(_parse_number(v) is not None for v in numbers):
        out: list[Any] = []
        for v in values:
            num = _parse_number(v.strip()) if v.strip() and v.strip().lower() != "nan" else None
            if isinstance(num, float) and num.is_integer() and abs(num) < 2**53:
                num = int(num)
            out.append(num)
        return out
    return [v.strip() or None for v in values]


def _sniff_delimiter(header_line: str) -> str:
    counts = {d: header_line.count(d) for d in (",", ";", "\t")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] > 0 else ","


def read_results(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a results table, typed: metrics as floats (NaN when missing; an infinity, or text that is no number,
    kept as read for the analysis to refuse), factors as int/float/str/None, bookkeeping columns as strings. Each
    row also gets ``_line`` (its line number in the file).

    Raises :class:`TaskError` naming the file if it is missing, empty, not a text CSV, has no metric column, or has
    a row with more fields than the header (OpenMOLE does not quote values: a comma inside one breaks the row).
    """
    path = Path(path)
    if not path.exists():
        raise TaskError(path, "results table not found")
    if not path.is_file():
        raise TaskError(path, "not a file (expected a results CSV)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise TaskError(path, "not a UTF-8 text CSV file") from None
    except OSError as exc:
        raise TaskError(path, f"cannot read: {exc.strerror or exc}") from None
    if "\x00" in text:
        raise TaskError(path, "not a text CSV file (binary content)")
    if not text.strip():
        raise TaskError(path, "empty file: no header and no rows")
    first = next(line for line in text.splitlines() if line.strip())
    try:
        records = list(csv.reader(text.splitlines(), delimiter=_sniff_delimiter(first)))
    except csv.Error as exc:
        raise TaskError(path, f"not a valid CSV file: {exc}") from None
    lines = [(i + 1, r) for i, r in enumerate(records) if any(c.strip() for c in r)]
    (_, header), body = lines[0], lines[1:]
    names = [h.strip() for h in header]
    dupes = sorted({n for n in names if n and names.count(n) > 1})
    if dupes:
        raise TaskError(path, f"duplicate column(s) in the header: {', '.join(dupes)}")
    metrics = [n for n in names if n and column_kind(n) == "metric"]
    if not metrics:
        hint = ""
        if any(n.startswith(("mean_", "std_", "avg_")) for n in names):
            hint = " (this looks like a per-configuration summary; give the table with one row per point)"
        shown = ", ".join(n for n in names[:8] if n) or "none"
        raise TaskError(path, f"no metric column (val_auc, val_patient_auc, ... or any val_*) in the header; "
                              f"columns: {shown}{hint}")
    if not body:
        raise TaskError(path, "no rows: the header is there but no experiment point was recorded")
    raw: list[dict[str, str]] = []
    for line_no, rec in body:
        if len(rec) > len(names):
            raise TaskError(path, f"line {line_no} has {len(rec)} fields but the header has {len(names)} "
                                  f"(an unquoted comma inside a value?)")
        rec = rec + [""] * (len(names) - len(rec))  # a truncated last line: missing values
        raw.append({n: v for n, v in zip(names, rec) if n})
    columns = [n for n in names if n]
    typed: dict[str, list[Any]] = {}
    for name in columns:
        values = [r[name] for r in raw]
        kind = column_kind(name)
        if kind == "metric":
            typed[name] = [_metric_cell(v) for v in values]
        elif kind == "factor":
            typed[name] = _typed_factor_column(values)
        else:
            typed[name] = [v.strip() for v in values]
    rows = []
    for i, (line_no, _) in enumerate(body):
        row = {name: typed[name][i] for name in columns}
        row["_line"] = line_no
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------- analysis


@dataclass
class Point:
    row: dict[str, Any]
    config: tuple[Any, ...]
    metrics: dict[str, float]
    failed: bool
    reason: str
    line: int | None
    invalid: bool = False  # a metric value outside its range: failed, and named in a warning


@dataclass
class Analysis:
    metric: str
    factors: list[str]          # every factor column, file order
    config_factors: list[str]   # factors but fold and seed
    metrics: list[str]          # contract order, then other val_* columns in file order
    points: list[Point]
    superseded: list[Point] = field(default_factory=list)  # earlier rows of a point that a later row replaces
    groups: dict[tuple[Any, ...], list[Point]] = field(default_factory=dict)
    summary: list[dict[str, Any]] = field(default_factory=list)

    def levels(self, factor: str, points: Iterable[Point] | None = None) -> list[Any]:
        pts = self.points if points is None else points
        return sorted({_norm_factor(p.row.get(factor)) for p in pts}, key=_sort_key)

    @property
    def varying_config_factors(self) -> list[str]:
        return [f for f in self.config_factors if len(self.levels(f)) > 1]


def _sort_key(value: Any) -> tuple[int, Any]:
    """Numbers (numerically) before strings (alphabetically) before missing values."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return (2, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value)
    return (1, str(value))


def higher_is_better(metric: str) -> bool:
    return not metric.endswith(("loss", "seconds", "brier"))


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            if not key.startswith("_"):
                seen.setdefault(key, None)
    return list(seen)


def _failure(row: Mapping[str, Any], metrics: Sequence[str]) -> tuple[bool, str]:
    status = str(row.get("status") or "").strip()
    error = str(row.get("error") or "").strip()
    all_nan = all(math.isnan(_to_float(row.get(m))) for m in metrics)
    if status:
        if status.lower() not in OK_STATUS:
            return True, error or f"status {status}"
    else:
        for key in ("exitCode", "exitcode", "exit_code", "returnValue", "returncode"):
            code = _parse_number(str(row.get(key) or "").strip())
            if code is not None and code != 0:
                return True, error or f"exit code {_display(code)}"
    if all_nan:
        return True, error or "no metric value (all NaN)"
    return False, ""


def _invalid_values(row: Mapping[str, Any], metrics: Sequence[str]) -> list[str]:
    """``column = value (why)`` for each metric value of ``row`` that no run can produce: outside the metric's
    range (:func:`metric_range`), an infinity, or text that is no number. NaN (missing) is not invalid: an AUC is
    undefined on a fold with one class."""
    problems = []
    for name in metrics:
        value = row.get(name)
        if value is None or isinstance(value, bool):
            continue
        if not isinstance(value, (int, float, np.integer, np.floating)):
            parsed = _metric_cell(str(value))
            if isinstance(parsed, str):
                problems.append(f"{name} = {parsed!r} (not a number)")
                continue
            value = parsed
        value = float(value)
        if math.isnan(value):
            continue
        low, high = metric_range(name)
        if not math.isfinite(value):
            problems.append(f"{name} = {value} (not finite)")
        elif not low <= value <= high:
            problems.append(f"{name} = {_display(value)} (outside [{_display(low)}, {_display(high)}])")
    return problems


def _analyse(rows: Sequence[Mapping[str, Any]], metric: str) -> Analysis:
    columns = _columns(rows)
    metric_cols = [m for m in CONTRACT_METRICS if m in columns]
    metric_cols += [c for c in columns if column_kind(c) == "metric" and c not in metric_cols]
    if metric not in metric_cols:
        raise ConfigError("metric", f"{metric!r} is not a metric column of the results table (available: "
                                    f"{', '.join(metric_cols) or 'none'})")
    factors = [c for c in columns if column_kind(c) == "factor"]
    config_factors = [f for f in factors if f not in FACTOR_EXCLUDE]
    points = []
    for row in rows:
        invalid = _invalid_values(row, metric_cols)
        failed, reason = (True, "invalid: " + "; ".join(invalid)) if invalid else _failure(row, metric_cols)
        config = tuple(_norm_factor(row.get(f)) for f in config_factors)
        values = {m: (math.nan if failed else _to_float(row.get(m))) for m in metric_cols}
        line = row.get("_line")
        points.append(Point(dict(row), config, values, failed, reason, line if isinstance(line, int) else None,
                            invalid=bool(invalid)))
    points, superseded = _latest_per_point(points)
    an = Analysis(metric, factors, config_factors, metric_cols, points, superseded=superseded)
    for p in points:
        an.groups.setdefault(p.config, []).append(p)
    an.summary = _summary_rows(an)
    return an


def _latest_per_point(points: Sequence[Point]) -> tuple[list[Point], list[Point]]:
    """One row per point (configuration, fold, seed): a re-run of a plan appends its rows to the same table
    (OpenMOLE's CSVHook does), so the last completed row of a point wins, else its last row. Returns the kept
    points, in file order, and the superseded ones."""
    by_key: dict[tuple, list[Point]] = {}
    for p in points:
        by_key.setdefault((p.config, _norm_factor(p.row.get("fold")), _norm_factor(p.row.get("seed"))), []).append(p)
    keep = set()
    for rows in by_key.values():
        done = [p for p in rows if not p.failed]
        keep.add(id((done or rows)[-1]))
    return [p for p in points if id(p) in keep], [p for p in points if id(p) not in keep]


def _norm_factor(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str) and not value.strip():
        return None
    return value


def metric_range(metric: str) -> tuple[float, float]:
    """The values a metric can take: [0, 1] for AUCs, accuracies, rates, F1 and the threshold; [0, inf) for
    losses, counts and times; anything for an unknown column."""
    if metric.endswith(("loss", "seconds")) or metric.startswith("n_") or metric in ("epochs_run", "best_epoch"):
        return 0.0, math.inf
    if metric in RESULT_METRICS or metric.startswith(("val_", "tune_")):
        return 0.0, 1.0
    return -math.inf, math.inf


def describe(values: Sequence[float], bounds: tuple[float, float] = (-math.inf, math.inf)) -> dict[str, float]:
    """Mean, std (ddof=1), and the 95 % t-interval of the finite values, clipped to ``bounds`` (the metric's
    range: an AUC's interval never leaves [0, 1]); NaN where undefined."""
    from scipy import stats

    x = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    if n < 2:
        return {"mean": mean, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * std / math.sqrt(n)
    low, high = bounds
    return {"mean": mean, "std": std, "ci_low": max(low, mean - half), "ci_high": min(high, mean + half)}


def _summary_rows(an: Analysis) -> list[dict[str, Any]]:
    out = []
    for config, pts in an.groups.items():
        done = [p for p in pts if not p.failed]
        row: dict[str, Any] = dict(zip(an.config_factors, config))
        if "fold" in an.factors:
            folds = len({_norm_factor(p.row.get("fold")) for p in done})
        else:
            folds = len(done)
        row.update(n_points=len(pts), n_completed=len(done), n_folds_completed=folds,
                   n_failed=len(pts) - len(done))
        for m in an.metrics:
            for stat, value in describe([p.metrics[m] for p in done], metric_range(m)).items():
                row[f"{m}_{stat}"] = value
        out.append(row)
    def key(metric: str | None, r: dict[str, Any]) -> tuple[bool, float]:
        v = r.get(f"{metric}_mean", math.nan) if metric else math.nan
        sign = -1.0 if higher_is_better(metric or "") else 1.0
        return (math.isnan(v), sign * round(v, 9) if not math.isnan(v) else 0.0)

    second = tie_breaker(an)

    def order(r: dict[str, Any]) -> tuple:
        return (*key(an.metric, r), *key(second, r), -r["n_completed"],
                tuple(_sort_key(r[f]) for f in an.config_factors))

    out.sort(key=order)
    return [{"rank": i + 1, **r} for i, r in enumerate(out)]


def tie_breaker(an: Analysis) -> str | None:
    """The metric that orders configurations whose ranking metric is equal: the tile AUC, or the patient AUC
    when the tile AUC ranks."""
    for m in ("val_auc", "val_patient_auc"):
        if m != an.metric and m in an.metrics:
            return m
    return None


def ranking_tie(an: Analysis) -> str | None:
    """A sentence when every configuration with a value shares the same mean of the ranking metric (the patient AUC
    at 1.000 everywhere, say): the ranking then says nothing, and the sentence names the metric that ordered them
    and its spread. None when the ranking metric separates them or there are fewer than two configurations."""
    means = [r[f"{an.metric}_mean"] for r in an.summary if math.isfinite(r[f"{an.metric}_mean"])]
    if len(means) < 2 or max(means) - min(means) > 1e-9:
        return None
    second = tie_breaker(an)
    seconds = [r[f"{second}_mean"] for r in an.summary if second and math.isfinite(r[f"{second}_mean"])]
    head = (f"Every configuration has the same mean {an.metric} ({_fmt_metric(means[0], an.metric)}): the ranking "
            f"metric does not separate them")
    if not seconds:
        return head + ", and no other metric orders them."
    return (f"{head}. They are ordered by {second} (means from {_fmt_metric(min(seconds), second)} to "
            f"{_fmt_metric(max(seconds), second)}); look at the decisions (val_slide_accuracy, val_patient_accuracy) "
            f"before calling one better.")


def summarize(rows: Sequence[Mapping[str, Any]], *, metric: str = "val_patient_auc") -> list[dict[str, Any]]:
    """One row per configuration (every factor but fold and seed), best first.

    Keys: ``rank``, the configuration's factor values, ``n_points``, ``n_completed``, ``n_folds_completed``
    (distinct folds among completed points; completed points when there is no ``fold`` column), ``n_failed``,
    and for each metric ``<m>_mean``, ``<m>_std`` (ddof=1; NaN when fewer than 2 values), ``<m>_ci_low``,
    ``<m>_ci_high`` (95 % t-interval clipped to the metric's range; NaN when fewer than 2 values), over completed
    points with a finite value. Equal means of ``metric`` are ordered by :func:`tie_breaker`'s metric. A
    configuration whose points all failed has NaN statistics and comes last.
    """
    if not rows:
        return []
    return _analyse(rows, metric).summary


def summary_fieldnames(an: Analysis) -> list[str]:
    names = ["rank", *an.config_factors, "n_points", "n_completed", "n_folds_completed", "n_failed"]
    return names + [f"{m}_{s}" for m in an.metrics for s in STATS]


# --------------------------------------------------------------------------------------------- display


def _display(value: Any) -> str:
    """Compact text for a factor value or a count."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "NaN"
        if v.is_integer() and abs(v) < 1e15:
            return str(int(v))
        return format(v, ".4g")
    return str(value)


def _fmt_metric(value: float, metric: str) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    if metric == "n_params" or metric.startswith("n_"):
        return f"{value:,.0f}"
    if metric.endswith("seconds"):
        return f"{value:.1f} s"
    return f"{value:.3f}"


def _config_label(an: Analysis, values: Mapping[str, Any], factors: Sequence[str]) -> str:
    if not factors:
        return "all points"
    return ", ".join(f"{f}={_display(values.get(f))}" for f in factors)


def _safe_name(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "factor"
    candidate, i = base, 2
    while candidate.lower() in taken:
        candidate, i = f"{base}_{i}", i + 1
    taken.add(candidate.lower())
    return candidate


# --------------------------------------------------------------------------------------------- figures


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)  # the Agg backend, without touching pyplot's global state
    return fig


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _box_metric(an: Analysis) -> str:
    if "val_patient_auc" in an.metrics and any(math.isfinite(p.metrics["val_patient_auc"]) for p in an.points):
        return "val_patient_auc"
    return an.metric


def plot_box(an: Analysis, path: Path) -> tuple[Path, str]:
    """Box plot of the patient-level AUC (or the ranking metric when it is absent) per architecture, or per
    configuration (best first, at most ``MAX_BOXES``) without an ``arch`` column."""
    metric = _box_metric(an)
    groups: list[tuple[str, list[float]]] = []
    if "arch" in an.factors:
        by = "architecture"
        for level in an.levels("arch"):
            pts = [p for p in an.points if p.row.get("arch") == level]
            groups.append((_display(level) or "(none)", [p.metrics[metric] for p in pts if not p.failed]))
    else:
        by = "configuration"
        varying = an.varying_config_factors
        for row in an.summary[:MAX_BOXES]:
            config = tuple(row[f] for f in an.config_factors)
            pts = an.groups.get(config, [])
            label = f"#{row['rank']} " + (_config_label(an, row, varying) if varying else "")
            groups.append((label.strip(), [p.metrics[metric] for p in pts if not p.failed]))
    groups = [(name, [v for v in vals if math.isfinite(v)]) for name, vals in groups]
    width = max(5.5, min(16.0, 1.0 + 0.9 * len(groups)))
    fig = _new_figure(width, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    positions = list(range(1, len(groups) + 1))
    with_data = [(pos, vals) for pos, (_, vals) in zip(positions, groups) if vals]
    if with_data:
        ax.boxplot([v for _, v in with_data], positions=[p for p, _ in with_data], widths=0.5, showmeans=True)
        rng = np.random.default_rng(0)
        for pos, vals in with_data:
            ax.scatter(pos + rng.uniform(-0.12, 0.12, len(vals)), vals, s=14, color="tab:blue", alpha=0.6, zorder=3)
    for pos, (_, vals) in zip(positions, groups):
        if not vals:
            ax.text(pos, 0.5, "no data", ha="center", va="center", rotation=90, color="grey",
                    transform=ax.get_xaxis_transform())
    ax.set_xticks(positions)
    ax.set_xticklabels([f"{name}\n(n={len(vals)})" for name, vals in groups],
                       rotation=0 if by == "architecture" and len(groups) <= 6 else 35,
                       ha="center" if by == "architecture" and len(groups) <= 6 else "right", fontsize=8)
    ax.set_xlim(0.4, len(groups) + 0.6)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per {by}\n(one dot per completed point)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path), by


def plot_factor(an: Analysis, factor: str, path: Path) -> Path:
    """Mean ± std of the ranking metric per level of ``factor``, over every completed point at that level."""
    levels = an.levels(factor)
    means, stds, ns = [], [], []
    for level in levels:
        vals = [p.metrics[an.metric] for p in an.points if not p.failed and _norm_factor(p.row.get(factor)) == level]
        d = describe(vals)
        means.append(d["mean"])
        stds.append(0.0 if math.isnan(d["std"]) else d["std"])
        ns.append(sum(math.isfinite(v) for v in vals))
    fig = _new_figure(max(4.5, min(14.0, 1.5 + 0.8 * len(levels))), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(levels))
    ax.errorbar(x, means, yerr=stds, fmt="o", capsize=5, color="tab:blue", ecolor="tab:grey")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{_display(v) or '(none)'}\n(n={n})" for v, n in zip(levels, ns)],
                       rotation=0 if len(levels) <= 6 else 35, fontsize=8)
    ax.set_xlim(-0.6, len(levels) - 0.4)
    ax.set_xlabel(factor)
    ax.set_ylabel(f"{an.metric} (mean ± std)")
    ax.set_title(f"Effect of {factor}\n(all other factors pooled)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _resolve_out_dir(value: str, base: Path) -> Path | None:
    value = value.strip()
    if not value:
        return None
    p = Path(value)
    candidates = [p] if p.is_absolute() else [base / p]
    candidates.append(base / p.name)  # an OpenMOLE outDir absolute on another host, copied beside the table
    for c in candidates:
        if (c / "predictions.csv").is_file():
            return c
    return None


def read_predictions(path: Path) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """``(labels, probabilities, patient_ids or None)`` from a ``predictions.csv``; rows with NaN dropped."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        if "label" not in fields or "prob" not in fields:
            raise ValueError("needs columns label and prob")
        labels, probs, patients = [], [], []
        for r in reader:
            label_text = (r.get("label") or "").strip()
            label = _to_float(label_text)
            if math.isnan(label):
                label = 1.0 if label_text.lower() == "malignant" else 0.0 if label_text.lower() == "benign" else label
            prob = _to_float(r.get("prob"))
            if math.isnan(label) or math.isnan(prob):
                continue
            labels.append(label)
            probs.append(prob)
            patients.append((r.get("patient_id") or "").strip())
    has_patients = "patient_id" in fields and all(patients)
    return np.asarray(labels) > 0, np.asarray(probs, dtype=float), patients if has_patients else None


def plot_roc(an: Analysis, config: tuple[Any, ...], base: Path, path: Path) -> tuple[Path | None, list[str]]:
    """ROC curves (tile and patient level, one curve per fold) of one configuration; notes on what is missing."""
    notes: list[str] = []
    curves = []  # (label, tile (fpr, tpr, auc) or None, patient (...) or None)
    pts = [p for p in an.groups.get(config, []) if not p.failed]
    show_seed = "seed" in an.factors and len(an.levels("seed", pts)) > 1
    for i, p in enumerate(pts):
        name = f"fold {_display(p.row['fold'])}" if "fold" in p.row else f"point {i + 1}"
        if show_seed:
            name += f" seed {_display(p.row.get('seed'))}"
        out_value = next((str(p.row[k]) for k in ("out_dir", "outDir", "outdir") if p.row.get(k)), "")
        folder = _resolve_out_dir(out_value, base)
        if folder is None:
            notes.append(f"{name}: no predictions.csv found" + (f" under {out_value}" if out_value else
                                                                   " (no out_dir/outDir column)"))
            continue
        try:
            labels, probs, patients = read_predictions(folder / "predictions.csv")
        except (OSError, ValueError, csv.Error) as exc:
            notes.append(f"{name}: cannot read {folder / 'predictions.csv'}: {exc}")
            continue

        tile = _roc(labels, probs, f"{name}: tile", notes)
        patient = None
        if patients is None:
            notes.append(f"{name}: predictions.csv has no patient_id; no patient-level curve")
        else:
            # a patient's score is the mean probability of its tiles, its label the highest label of its tiles
            _, scores, patient_labels = aggregate(probs, labels, patients, "mean")
            patient = _roc(patient_labels > 0, scores, f"{name}: patient", notes)
        if tile or patient:
            curves.append((name, tile, patient))
    if not curves:
        return None, notes
    fig = _new_figure(10.0, 4.6)
    for k, (level, title) in enumerate((("tile", "Tile level"), ("patient", "Patient level (mean tile probability)"))):
        ax = fig.add_subplot(1, 2, k + 1)
        for name, tile, patient in curves:
            c = tile if level == "tile" else patient
            if c is not None:
                ax.plot(c[0], c[1], lw=1.5, label=f"{name} (AUC {c[2]:.3f})")
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_aspect("equal")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(title, fontsize=10)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize=7)
    return _save(fig, path), notes


RELIABILITY_BINS = 10


def plot_reliability(an: Analysis, config: tuple[Any, ...], base: Path, path: Path) -> tuple[Path | None, str]:
    """Reliability diagram of one configuration: its validation tiles of every fold pooled (each predicted by its
    fold's model, calibrated as the run calibrated them), the observed fraction of malignant tiles against the
    mean predicted probability in ten equal-width bins (scikit-learn ``calibration_curve``), the tiles per bin
    beneath; the sentence under the figure gives the Brier score. None when no ``predictions.csv`` is found."""
    from sklearn.calibration import calibration_curve

    labels, probs = [], []
    for p in (x for x in an.groups.get(config, []) if not x.failed):
        out_value = next((str(p.row[k]) for k in ("out_dir", "outDir", "outdir") if p.row.get(k)), "")
        folder = _resolve_out_dir(out_value, base)
        if folder is None:
            continue
        try:
            y, q, _ = read_predictions(folder / "predictions.csv")
        except (OSError, ValueError, csv.Error):
            continue
        labels.append(y.astype(int))
        probs.append(np.clip(q, 0.0, 1.0))
    if not labels or not len(np.concatenate(labels)):
        return None, ""
    y, q = np.concatenate(labels), np.concatenate(probs)
    observed, predicted = calibration_curve(y, q, n_bins=RELIABILITY_BINS, strategy="uniform")
    counts = np.histogram(q, bins=RELIABILITY_BINS, range=(0.0, 1.0))[0]
    brier = float(np.mean((q - y) ** 2))
    fig = _new_figure(5.2, 6.0)
    ax, hist = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3.2, 1]})
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    ax.plot(predicted, observed, marker="o", lw=1.5, label=f"validation tiles (Brier {brier:.3f})")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("mean predicted probability of malignancy")
    ax.set_ylabel("fraction of tiles malignant")
    ax.set_title("Reliability of the best configuration", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    hist.bar((np.arange(RELIABILITY_BINS) + 0.5) / RELIABILITY_BINS, counts, width=1 / RELIABILITY_BINS * 0.9,
             color="#888")
    hist.set_xlim(-0.01, 1.01)
    hist.set_ylabel("tiles")
    hist.set_xlabel("predicted probability")
    return _save(fig, path), (f"{len(q)} validation tiles of {len(labels)} fold(s), Brier score {brier:.3f} "
                              "(0 is perfect; 0.25 is a constant 0.5)")


def _roc(y: np.ndarray, scores: np.ndarray, what: str, notes: list[str]):
    """``(fpr, tpr, auc)`` of one ROC curve, or None (and a note) when only one class is present."""
    from sklearn.metrics import roc_auc_score, roc_curve

    if y.size == 0 or y.all() or not y.any():
        notes.append(f"{what}-level ROC undefined (one class only)")
        return None
    fpr, tpr, _ = roc_curve(y, scores)
    return fpr, tpr, float(roc_auc_score(y, scores))


# --------------------------------------------------------------------------------------------- honesty


def varying_or_all(an: Analysis) -> list[str]:
    return an.varying_config_factors or an.config_factors


def pooled_patient_auc(an: Analysis, config: tuple[Any, ...], base: Path) -> dict[str, Any] | None:
    """The configuration's validation patients of every fold pooled (each scored by its own fold's model, the mean
    probability of its tiles): patient AUC and its percentile-bootstrap interval over patients; None without
    ``predictions.csv`` files or a patient of each class."""
    labels, probs, patients = [], [], []
    for i, p in enumerate(x for x in an.groups.get(config, []) if not x.failed):
        out_value = next((str(p.row[k]) for k in ("out_dir", "outDir", "outdir") if p.row.get(k)), "")
        folder = _resolve_out_dir(out_value, base)
        if folder is None:
            return None
        try:
            y, q, ids = read_predictions(folder / "predictions.csv")
        except (OSError, ValueError, csv.Error):
            return None
        if ids is None:
            return None
        labels.append(y.astype(int))
        probs.append(q)
        patients += [f"{i}/{pid}" for pid in ids]  # a patient id per point: folds never share one anyway
    if not labels:
        return None
    y, q = np.concatenate(labels), np.concatenate(probs)
    _, scores, patient_labels = aggregate(q, y, patients)
    if len(np.unique(patient_labels)) < 2:
        return None
    from python_task.training.metrics import auc

    low, high = bootstrap_interval(y, q, patients, "patient_auc")
    return {"auc": auc(patient_labels, scores), "ci_low": low, "ci_high": high,
            "pos": int(patient_labels.sum()), "neg": int(len(patient_labels) - patient_labels.sum())}


TEST_ROWS = (("test_auc", "tile AUC"), ("test_patient_auc", "patient AUC"), ("test_slide_auc", "slide AUC"),
             ("test_balanced_accuracy", "tile balanced accuracy at the model's threshold"),
             ("test_slide_accuracy", "slide accuracy at the model's threshold"),
             ("test_patient_accuracy", "patient accuracy at the model's threshold"),
             ("test_slide_brier", "slide Brier score"), ("threshold", "threshold"))


def _tests_html(folders: Sequence[Path]) -> tuple[str, str]:
    """The test-set section and the sentence the optimism line ends with."""
    if not folders:
        return ('<p class="note" id="no-test">No test-set evaluation given. Hold patients out of every fold with '
                "<code>split --test-fraction 0.2</code>, train the chosen configuration on that split, score it "
                "once with <code>evaluate</code> and pass its folder with <code>report --test DIR</code>.</p>",
                "No test-set figure is given with this report: the unbiased estimate needs patients that no fold "
                "and no choice touched (split --test-fraction, then evaluate).")
    import json

    parts, names = [], []
    for folder in folders:
        path = folder / "test_metrics.json"
        try:
            m = {k: _to_float(v) for k, v in json.loads(path.read_text(encoding="utf-8")).items()}
            record = json.loads((folder / "evaluation.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TaskError(path, f"not an evaluate output ({exc})") from None
        names.append(folder.name)
        rows = []
        for key, label in TEST_ROWS:
            value = m.get(key, math.nan)
            low, high = m.get(f"{key}_ci_low", math.nan), m.get(f"{key}_ci_high", math.nan)
            ci = f"[{low:.3f}, {high:.3f}]" if math.isfinite(low) and math.isfinite(high) else ""
            rows.append([(label, ""), (_fmt_metric(value, key), "num"), (ci, "num")])
        behind = (f"{m.get('n_test_patients_pos', math.nan):.0f} malignant and {m.get('n_test_patients_neg', math.nan):.0f} "
                  f"benign patients ({m.get('n_test_slides', math.nan):.0f} slides, "
                  f"{m.get('n_test_tiles', math.nan):.0f} tiles)")
        parts.append(f'<h3>{_e(folder)}</h3><p class="note">Model {_e(record.get("model", "?"))}, scored once on '
                     f"{_e(behind)} that no fold trained, tuned or validated on. Intervals: 95% percentile "
                     "bootstrap over patients.</p>" + _table(f"test-{len(parts)}", ["metric", "value", "95% CI"],
                                                             rows))
    return ('<div id="tests">' + "\n".join(parts) + "</div>",
            f"The test-set figure, on patients no fold touched, is under Test set below ({', '.join(names)}).")


# --------------------------------------------------------------------------------------------- HTML

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em; color: #222;
       max-width: 1200px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best td { background: #eaf6ea; font-weight: 600; } tr.allfailed td { color: #999; }
.note { color: #555; font-size: 0.9em; } .warn { color: #a40; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #555; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(table_id: str, header: Sequence[str], rows: Sequence[Sequence[tuple[str, str]]],
           row_classes: Sequence[str] | None = None) -> str:
    """Rows are lists of (text, css class) cells; every text is escaped here."""
    out = [f'<table id="{_e(table_id)}">', "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) +
           "</tr></thead>", "<tbody>"]
    for i, row in enumerate(rows):
        cls = row_classes[i] if row_classes else ""
        cells = "".join(f'<td class="{_e(c)}">{_e(t)}</td>' if c else f"<td>{_e(t)}</td>" for t, c in row)
        out.append(f'<tr class="{_e(cls)}">{cells}</tr>' if cls else f"<tr>{cells}</tr>")
    out += ["</tbody>", "</table>"]
    return "\n".join(out)


def _img(name: str, alt: str, caption: str) -> str:
    return (f'<figure><img src="{_e(urllib.parse.quote(name))}" alt="{_e(alt)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


PATIENTS_BEHIND = "validation patients behind it (M malignant + B benign)"
SLIDES_BEHIND = "validation slides behind it"


def chance_of_perfect(pos: int, neg: int) -> int:
    """1 / the probability that a model ranking ``pos`` malignant and ``neg`` benign patients at random reaches an
    AUC of 1: C(pos + neg, pos)."""
    return math.comb(pos + neg, pos)


def _behind(an: Analysis, config: tuple[Any, ...], level: str) -> str:
    """How many validation patients (``level`` patients) or slides of each class lie behind a configuration's
    patient- or slide-level figures: summed over its completed folds, and the fewest of one fold."""
    pos, neg = f"n_val_{level}_pos", f"n_val_{level}_neg"
    if pos not in an.metrics or neg not in an.metrics:
        return "n/a"
    pts = [p for p in an.groups.get(config, []) if not p.failed]
    counts = [(p.metrics[pos], p.metrics[neg]) for p in pts if math.isfinite(p.metrics[pos])
              and math.isfinite(p.metrics[neg])]
    if not counts:
        return "n/a"
    total = f"{sum(c[0] for c in counts):.0f} M + {sum(c[1] for c in counts):.0f} B"
    if len(counts) == 1:
        return total
    few = min(counts, key=lambda c: (min(c), sum(c)))
    return f"{total} ({len(counts)} folds; fewest {few[0]:.0f} M + {few[1]:.0f} B)"


def _chance_note(an: Analysis) -> str:
    """What a perfect patient AUC on so few patients is worth: how often a useless model reaches it."""
    if "n_val_patients_pos" not in an.metrics or "n_val_patients_neg" not in an.metrics:
        return ""
    counts = {(int(p.metrics["n_val_patients_pos"]), int(p.metrics["n_val_patients_neg"])) for p in an.points
              if not p.failed and math.isfinite(p.metrics["n_val_patients_pos"])
              and math.isfinite(p.metrics["n_val_patients_neg"]) and min(p.metrics["n_val_patients_pos"],
                                                                         p.metrics["n_val_patients_neg"]) >= 1}
    if not counts:
        return ""
    pos, neg = min(counts, key=lambda c: chance_of_perfect(*c))
    return (f'<p class="note" id="chance">A fold\'s patient AUC rests on its few validation patients: with {pos} '
            f"malignant and {neg} benign patients a model that ranks patients at random still scores a patient AUC "
            f"of 1.000 once in {chance_of_perfect(pos, neg)} folds (1 / C({pos + neg}, {pos})). Read the tile AUC "
            "beside it, and the pooled patient AUC of the best configuration below.</p>")


def _few_patients(an: Analysis) -> list[Point]:
    """Completed points whose validation fold has fewer than 2 patients of a class."""
    if "n_val_patients_pos" not in an.metrics or "n_val_patients_neg" not in an.metrics:
        return []
    return [p for p in an.points if not p.failed and min(p.metrics["n_val_patients_pos"],
                                                          p.metrics["n_val_patients_neg"]) < 2]


def _ranking_html(an: Analysis, shown: Sequence[str]) -> str:
    m = an.metric
    header = ["rank", *shown, "folds completed", "failed points", f"{m} mean ± std",
              f"{m} 95% CI (t, clipped to the range)", PATIENTS_BEHIND]
    extra = [t for t in TABLE_METRICS if t in an.metrics and t != m]
    header += [f"{t} (mean)" for t in extra]
    header.insert(header.index("val_slide_auc (mean)") + 1 if "val_slide_auc (mean)" in header else len(header),
                  SLIDES_BEHIND)
    rows, classes = [], []
    for r in an.summary:
        mean, std = r[f"{m}_mean"], r[f"{m}_std"]
        ms = _fmt_metric(mean, m) + ("" if math.isnan(std) else f" ± {_fmt_metric(std, m)}")
        ci = "n/a" if math.isnan(r[f"{m}_ci_low"]) else \
            f"[{_fmt_metric(r[f'{m}_ci_low'], m)}, {_fmt_metric(r[f'{m}_ci_high'], m)}]"
        cells = [(str(r["rank"]), "num")] + [(_display(r[f]), "") for f in shown]
        config = tuple(r[f] for f in an.config_factors)
        cells += [(f"{r['n_folds_completed']}", "num"), (str(r["n_failed"]), "num"), (ms, "num"), (ci, "num"),
                  (_behind(an, config, "patients"), "")]
        for t in extra:
            cells.append((_fmt_metric(r[f"{t}_mean"], t), "num"))
            if t == "val_slide_auc":
                cells.append((_behind(an, config, "slides"), ""))
        if "val_slide_auc" not in extra:
            cells.append((_behind(an, config, "slides"), ""))
        rows.append(cells)
        classes.append("best" if r["rank"] == 1 and r["n_completed"] else "allfailed" if not r["n_completed"] else "")
    return _table("ranking", header, rows, classes)


def _failed_html(an: Analysis, shown: Sequence[str]) -> str:
    failed = [p for p in an.points if p.failed]
    if not failed:
        return '<p class="note">No failed points.</p>'
    cols = [*shown] + [f for f in ("fold", "seed") if f in an.factors]
    header = ["line", *cols, "status", "error"]
    rows = []
    for p in failed:
        status = "invalid" if p.invalid else str(p.row.get("status") or "")
        if not status:
            code = next((p.row.get(k) for k in ("exitCode", "returnValue") if p.row.get(k) not in (None, "")), None)
            status = f"exit code {code}" if code is not None else "failed"
        rows.append([(str(p.line or ""), "num")] + [(_display(p.row.get(c)), "") for c in cols] +
                    [(status, ""), (p.reason, "")])
    return _table("failed", header, rows)


def _nan_html(an: Analysis, shown: Sequence[str]) -> str:
    rows = []
    cols = [*shown] + [f for f in ("fold", "seed") if f in an.factors]
    for p in an.points:
        if p.failed:
            continue
        missing = [m for m in an.metrics if math.isnan(p.metrics[m])]
        if missing:
            rows.append([(str(p.line or ""), "num")] + [(_display(p.row.get(c)), "") for c in cols] +
                        [(", ".join(missing), "")])
    if not rows:
        return ""
    return ("<p>Completed points with NaN metrics (left out of those metrics' statistics):</p>\n" +
            _table("nan-metrics", ["line", *cols, "NaN metrics"], rows))


def make_report(results_csv: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                metric: str = "val_patient_auc", tests: Sequence[str | os.PathLike[str]] = ()) -> Path:
    """Write ``summary.csv``, the PNG figures and ``report.html`` (last) into ``out_dir``; return the HTML path.
    ``tests``: ``evaluate`` output folders, shown apart from the cross-validation ranking.

    Like every command, it holds ``out_dir``'s :func:`~python_task.fileio.folder_lock` while it writes (a second
    report into the same folder is refused at once) and first deletes the temporary files a killed report left
    there."""
    results_csv = Path(results_csv)
    out = Path(out_dir)
    rows = read_results(results_csv)
    try:
        an = _analyse(rows, metric)
    except TaskError as exc:
        raise TaskError(results_csv, exc.cause) from None
    _warn_invalid_rows(an, results_csv)
    with folder_lock(out, "report"):
        remove_stale_temporaries(out)
        return _write_report(an, results_csv, out, metric, tests)


def _warn_invalid_rows(an: Analysis, results_csv: Path) -> None:
    """One warning line per row of impossible metric values: the file, the line and the columns."""
    for p in sorted((p for p in [*an.points, *an.superseded] if p.invalid), key=lambda p: p.line or 0):
        log.warning("%s: line %s: %s: the row is left out of every statistic", results_csv, p.line or "?", p.reason)


def _write_report(an: Analysis, results_csv: Path, out: Path, metric: str, tests: Sequence[str | os.PathLike[str]]) \
        -> Path:
    """summary.csv, the figures and report.html (last) of an analysed table, into ``out`` (locked by the caller)."""
    write_csv_atomic(out / "summary.csv", an.summary, fieldnames=summary_fieldnames(an))

    varying = an.varying_config_factors
    shown = varying or an.config_factors
    constant = [f for f in an.config_factors if f not in varying]
    n_failed = sum(p.failed for p in an.points)
    body: list[str] = [f"<h1>Sweep report: {_e(results_csv.name)}</h1>"]
    second = tie_breaker(an)
    body.append(f'<p id="counts">{len(an.points)} points, {len(an.summary)} configurations, '
                f"{n_failed} failed points. Ranked by <b>{_e(metric)}</b> "
                f"({'highest' if higher_is_better(metric) else 'lowest'} mean first"
                f"{f'; equal means by the mean {_e(second)}' if second else ''}); mean ± standard deviation "
                f"and 95% t-interval over completed folds, clipped to the metric's range (an AUC's stays in "
                f"[0, 1]).</p>")
    tests_html, test_note = _tests_html([Path(t) for t in tests])
    n_configs = sum(1 for r in an.summary if r["n_completed"])
    body.append(f'<p class="warn" id="optimism">The best of {n_configs} configurations is an optimistic estimate: '
                "it was chosen because its mean was the highest on these same folds, so part of its lead is luck "
                "of the folds, the more so the more configurations and the fewer patients. Within each point, "
                "train chose the epoch and the threshold on a tuning set, never on the validation fold it reports "
                f"(selection_tuned 1; 0 = the fixed rule). {test_note}</p>")
    few = _few_patients(an)
    if few:
        items = "; ".join(f"line {p.line}: " + _config_label(an, p.row, [*varying_or_all(an), "fold"]) +
                          f" ({p.metrics['n_val_patients_pos']:.0f} malignant, {p.metrics['n_val_patients_neg']:.0f}"
                          " benign)" for p in few[:20]) + (" ..." if len(few) > 20 else "")
        body.append(f'<p class="warn" id="few-patients">{len(few)} point(s) validated on a fold with fewer than 2 '
                    "patients of a class: their patient AUC rests on a handful of patient pairs (each pair moves "
                    f"it by 1 / (malignant x benign)) or is undefined: {_e(items)}.</p>")
    elif "n_val_patients_pos" not in an.metrics:
        body.append('<p class="note" id="few-patients">The table has no patient counts (n_val_patients_pos, '
                    "n_val_patients_neg: a table from before they were recorded, or an OpenMOLE table without "
                    "them): the patients behind each figure cannot be shown.</p>")
    body.append(f'<p class="note">Source: {_e(results_csv.resolve())}. Full table: '
                f'<a href="summary.csv">summary.csv</a>.</p>')
    if constant and varying:
        body.append('<p class="note">Same for every configuration: ' +
                    _e(", ".join(f"{f}={_display(an.levels(f)[0])}" for f in constant)) + "</p>")
    if an.superseded:
        lines = ", ".join(str(p.line) for p in an.superseded[:20]) + (" ..." if len(an.superseded) > 20 else "")
        body.append(f'<p class="warn" id="superseded">{len(an.superseded)} row(s) superseded by a later row of the '
                    f"same point (same configuration, fold and seed: a re-run appended to the same table); each "
                    f"point counts once, with its last completed row, else its last row. Superseded lines: "
                    f"{_e(lines)}.</p>")

    body.append("<h2>Ranking</h2>")
    tie = ranking_tie(an)
    if tie:
        body.append(f'<p class="warn" id="tie">{_e(tie)}</p>')
    body.append(_ranking_html(an, shown))
    body.append(_chance_note(an))
    body.append("<h2>Failed points and missing metrics</h2>")
    body.append(_failed_html(an, shown))
    body.append(_nan_html(an, shown))

    body.append("<h2>AUC per architecture</h2>" if "arch" in an.factors else "<h2>AUC per configuration</h2>")
    box_path, by = plot_box(an, out / "auc_by_arch.png")
    bm = _box_metric(an)
    body.append(_img(box_path.name, f"{bm} per {by}",
                     f"{bm} of every completed point, per {by}; box = quartiles, line = median, triangle = mean."))

    body.append("<h2>Effect of each factor</h2>")
    taken: set[str] = {"auc_by_arch", "roc_best", "reliability_best", "summary"}
    if not varying:
        body.append('<p class="note">No factor takes more than one value: nothing to compare.</p>')
    for f in varying:
        name = f"factor_{_safe_name(f, taken)}.png"
        plot_factor(an, f, out / name)
        body.append(_img(name, f"{metric} per level of {f}",
                         f"{metric} (mean ± std over every completed point at that level, all other factors "
                         f"pooled) per level of {f}."))

    body.append("<h2>ROC curves of the best configuration</h2>")
    best = next((r for r in an.summary if r["n_completed"] > 0), None)
    if best is None:
        body.append('<p class="warn">Every point failed: no best configuration.</p>')
    else:
        config = tuple(best[f] for f in an.config_factors)
        body.append(f"<p>Best configuration (rank {best['rank']}): "
                    f"{_e(_config_label(an, best, shown) if shown else 'the only one')}.</p>")
        roc_path, notes = plot_roc(an, config, results_csv.parent, out / "roc_best.png")
        pooled = pooled_patient_auc(an, config, results_csv.parent)
        if pooled is not None:
            body.append(f'<p id="pooled">Patient AUC of the best configuration with every fold\'s validation '
                        f"patients pooled (each scored by its fold's model): {pooled['auc']:.3f}, 95% bootstrap "
                        f"interval over patients [{pooled['ci_low']:.3f}, {pooled['ci_high']:.3f}], from "
                        f"{pooled['pos']} malignant and {pooled['neg']} benign patients (a random ranking of that "
                        f"many patients scores 1.000 once in {chance_of_perfect(pooled['pos'], pooled['neg']):,}; "
                        "the interval cannot show the uncertainty of a perfect separation).</p>")
        if roc_path is None:
            body.append('<p class="warn" id="no-roc">No validation predictions (predictions.csv) found for the '
                        "best configuration: no ROC curve.</p>")
        else:
            body.append(_img(roc_path.name, "ROC curves of the best configuration",
                             "Validation ROC per fold: tile level (left) and patient level, scored by the mean "
                             "probability of the patient's tiles (right)."))
        if notes:
            body.append('<ul class="note">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
        reliability, sentence = plot_reliability(an, config, results_csv.parent, out / "reliability_best.png")
        body.append("<h2>Calibration of the best configuration</h2>")
        if reliability is None:
            body.append('<p class="warn" id="no-reliability">No validation predictions: no reliability curve.</p>')
        else:
            body.append(_img(reliability.name, "reliability diagram of the best configuration",
                             "Observed fraction of malignant tiles against the predicted probability (calibrated "
                             f"as each run calibrated them): on the diagonal, 0.7 means 7 in 10. {sentence}."))

    body.append("<h2>Test set</h2>")
    body.append(tests_html)

    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>Sweep report: {_e(results_csv.name)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
    html_path = out / "report.html"
    write_text_atomic(html_path, page)
    return html_path
