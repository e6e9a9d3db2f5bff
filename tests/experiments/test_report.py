"""``report``: results table -> summary (means, std, t-intervals, ranking), HTML, PNG figures.

The expected numbers are worked out by hand below, independently of the implementation.
"""

from __future__ import annotations

import csv
import math
import random
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from python_task.errors import TaskError
from python_task.experiments.report import make_report, read_results, summarize

# t quantiles (two-sided 95 %) from a printed table: t_{0.975, 1} and t_{0.975, 2}
T975_DF1 = 12.706204736
T975_DF2 = 4.302652730

# (arch, lr, fold, val_patient_auc, val_auc, val_slide_auc, failed)
POINTS = [
    ("simple_cnn", 0.001, 0, 0.80, 0.70, 0.75, False),
    ("simple_cnn", 0.001, 1, 0.90, 0.80, math.nan, False),   # completed, one NaN metric
    ("simple_cnn", 0.001, 2, 0.70, 0.60, 0.65, False),
    ("resnet50", 0.001, 0, 0.95, 0.91, 0.90, False),
    ("resnet50", 0.001, 1, 0.85, 0.89, 0.80, False),
    ("resnet50", 0.001, 2, math.nan, math.nan, math.nan, True),
    ("resnet50", 0.0001, 0, 0.60, 0.55, 0.58, False),
    ("resnet50", 0.0001, 1, math.nan, math.nan, math.nan, True),
    ("resnet50", 0.0001, 2, math.nan, math.nan, math.nan, True),
    ("vit_b16", 0.001, 0, math.nan, math.nan, math.nan, True),
    ("vit_b16", 0.001, 1, math.nan, math.nan, math.nan, True),
    ("vit_b16", 0.001, 2, math.nan, math.nan, math.nan, True),
]
N_FAILED = sum(p[-1] for p in POINTS)


def _point_dir(arch: str, lr: float, fold: int) -> str:
    return f"points/{arch}-lr{lr}-f{fold}"


def _local_rows() -> list[dict]:
    rows = []
    for i, (arch, lr, fold, pauc, auc, sauc, failed) in enumerate(POINTS):
        rows.append({
            "arch": arch, "lr": lr, "fold": fold, "seed": 0, "epochs": 5,
            "val_auc": auc, "val_slide_auc": sauc, "val_patient_auc": pauc,
            "val_balanced_accuracy": math.nan if failed else round(auc - 0.05, 4),
            "train_seconds": math.nan if failed else 10.0 + i, "n_params": math.nan if failed else 1000 * (i + 1),
            "status": "failed" if failed else "ok", "error": "exit 1: error: CUDA out of memory" if failed else "",
            "point_id": f"p{i}", "out_dir": _point_dir(arch, lr, fold), "wall_seconds": 12.5 + i,
        })
    return rows


def write_local(path: Path) -> Path:
    rows = _local_rows()
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _scala(v) -> str:
    """How OpenMOLE's CSVHook prints a value: Scala's Double.toString, ints bare, NaN as NaN."""
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if v != 0 and abs(v) < 1e-3:
            mant, exp = f"{v:.1E}".split("E")
            return f"{mant}E{int(exp)}"
        return repr(v)
    return str(v)


def write_csvhook(path: Path, *, base: Path | None = None) -> Path:
    """Same points, CSVHook style: columns sorted by name, openmole$experiment, exitCode, outDir, no status."""
    rows = []
    for r in _local_rows():
        failed = r.pop("status") != "ok"
        for k in ("error", "point_id", "wall_seconds"):
            r.pop(k)
        out = r.pop("out_dir")
        r["outDir"] = str(base / out) if base else out
        r["exitCode"] = 1 if failed else 0
        r["openmole$experiment"] = 7
        rows.append(r)
    names = sorted(rows[0])
    random.Random(3).shuffle(rows)  # completion order, not plan order
    lines = [",".join(names)] + [",".join(_scala(r[n]) for n in names) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _by_config(summary: list[dict]) -> dict[tuple, dict]:
    return {(r["arch"], r["lr"]): r for r in summary}


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12, abs=1e-12)
    return a == b


# --------------------------------------------------------------------------------------------- summary


def test_known_values_give_expected_means_std_ci_and_ranking(tmp_path):
    rows = read_results(write_local(tmp_path / "results.csv"))
    summary = summarize(rows)
    assert [(r["arch"], r["lr"]) for r in summary] == [
        ("resnet50", 0.001), ("simple_cnn", 0.001), ("resnet50", 0.0001), ("vit_b16", 0.001)]
    assert [r["rank"] for r in summary] == [1, 2, 3, 4]
    s = _by_config(summary)

    cnn = s[("simple_cnn", 0.001)]  # 0.8, 0.9, 0.7: mean 0.8, deviations 0, .1, -.1 -> var .02/2 -> std .1
    assert cnn["val_patient_auc_mean"] == pytest.approx(0.8)
    assert cnn["val_patient_auc_std"] == pytest.approx(0.1)
    half = T975_DF2 * 0.1 / math.sqrt(3)
    assert cnn["val_patient_auc_ci_low"] == pytest.approx(0.8 - half, abs=1e-8)
    assert 0.8 + half > 1 and cnn["val_patient_auc_ci_high"] == 1.0  # the t-interval clipped to an AUC's range
    assert (cnn["n_points"], cnn["n_folds_completed"], cnn["n_failed"]) == (3, 3, 0)
    # the NaN slide AUC of fold 1 is left out: mean of .75 and .65, std sqrt(2 * .05^2 / 1)
    assert cnn["val_slide_auc_mean"] == pytest.approx(0.70)
    assert cnn["val_slide_auc_std"] == pytest.approx(0.05 * math.sqrt(2))
    assert cnn["val_slide_auc_ci_high"] == 1.0  # 0.70 + 0.635, clipped
    assert cnn["val_auc_mean"] == pytest.approx(0.70)

    res = s[("resnet50", 0.001)]  # .95, .85 (fold 2 failed): mean .9, std .05*sqrt2, half-width t1 * .05
    assert res["val_patient_auc_mean"] == pytest.approx(0.9)
    assert res["val_patient_auc_std"] == pytest.approx(0.05 * math.sqrt(2))
    assert res["val_patient_auc_ci_low"] == pytest.approx(0.9 - T975_DF1 * 0.05, abs=1e-7)
    assert res["val_patient_auc_ci_high"] == 1.0  # 0.9 + 0.635, clipped
    assert (res["n_points"], res["n_folds_completed"], res["n_failed"]) == (3, 2, 1)
    assert res["n_params_mean"] == pytest.approx(4500)  # 4000 and 5000

    one = s[("resnet50", 0.0001)]  # a single completed fold: mean, but no std or interval
    assert one["val_patient_auc_mean"] == pytest.approx(0.6)
    assert math.isnan(one["val_patient_auc_std"]) and math.isnan(one["val_patient_auc_ci_low"])
    assert (one["n_folds_completed"], one["n_failed"]) == (1, 2)

    dead = s[("vit_b16", 0.001)]
    assert (dead["n_points"], dead["n_folds_completed"], dead["n_failed"]) == (3, 0, 3)
    assert math.isnan(dead["val_patient_auc_mean"]) and dead["rank"] == 4

    # configuration = every factor but fold and seed; bookkeeping columns are not factors
    assert "fold" not in res and "seed" not in res and res["epochs"] == 5
    for bookkeeping in ("status", "error", "out_dir", "point_id", "wall_seconds"):
        assert bookkeeping not in res


def test_ranking_metric_can_be_chosen(tmp_path):
    rows = read_results(write_local(tmp_path / "results.csv"))
    by_slide = summarize(rows, metric="val_auc")  # resnet .90 > cnn .70 > resnet 1e-4 .55
    assert [(r["arch"], r["lr"]) for r in by_slide][:3] == [
        ("resnet50", 0.001), ("simple_cnn", 0.001), ("resnet50", 0.0001)]
    by_time = summarize(rows, metric="train_seconds")  # lower is better: cnn 11 (10, 11, 12), 13.5 (13, 14), 16
    assert [(r["arch"], r["lr"]) for r in by_time][:3] == [
        ("simple_cnn", 0.001), ("resnet50", 0.001), ("resnet50", 0.0001)]
    with pytest.raises(TaskError, match="val_nope"):
        summarize(rows, metric="val_nope")


def test_csvhook_layout_gives_the_same_summary(tmp_path):
    local = summarize(read_results(write_local(tmp_path / "results.csv")))
    hook_csv = write_csvhook(tmp_path / "runs.csv")
    text = hook_csv.read_text()
    assert text.startswith("arch,epochs,exitCode,fold,lr,n_params,openmole$experiment,outDir,seed,")
    assert "1.0E-4" in text and "status" not in text
    hook = summarize(read_results(hook_csv))
    assert len(hook) == len(local)
    for a, b in zip(local, hook):
        assert set(a) == set(b), set(a) ^ set(b)
        bad = {k: (a[k], b[k]) for k in a if not _same(a[k], b[k])}
        assert not bad
    assert "openmole$experiment" not in hook[0] and "exitCode" not in hook[0] and "outDir" not in hook[0]


def test_without_status_all_nan_metrics_mean_failed(tmp_path):
    path = tmp_path / "runs.csv"
    path.write_text("arch,fold,val_auc,val_patient_auc\n"
                    "a,0,0.7,0.8\n"
                    "a,1,NaN,NaN\n"      # no status, no exit code, nothing measured: failed
                    "a,2,0.6,\n"         # completed, patient AUC missing
                    "b,0,0.9,0.95\n")
    s = {r["arch"]: r for r in summarize(read_results(path))}
    assert (s["a"]["n_points"], s["a"]["n_folds_completed"], s["a"]["n_failed"]) == (3, 2, 1)
    assert s["a"]["val_patient_auc_mean"] == pytest.approx(0.8)
    assert s["a"]["val_auc_mean"] == pytest.approx(0.65)
    assert s["b"]["rank"] == 1


def test_a_rerun_appended_to_the_table_counts_each_point_once(tmp_path):
    """OpenMOLE's CSVHook appends a second execution's rows to the same file: each point (configuration, fold,
    seed) counts once, with its last completed row, else its last row."""
    path = tmp_path / "points.csv"
    path.write_text("arch,exitCode,fold,openmole$experiment,seed,status,val_auc,val_patient_auc\n"
                    "a,-1,0,2,0,failed,NaN,NaN\n"      # first run: a node without the data
                    "a,-1,1,3,0,failed,NaN,NaN\n"
                    "a,0,0,2,0,ok,0.7,0.8\n"           # second run of the same plan, appended
                    "a,0,1,3,0,ok,0.9,1.0\n"
                    "a,0,1,3,1,ok,0.5,0.5\n"           # another seed: another point
                    "a,1,1,4,1,failed,NaN,NaN\n")     # a later failure does not hide a completed row
    (row,) = summarize(read_results(path))
    assert (row["n_points"], row["n_completed"], row["n_failed"]) == (3, 3, 0)
    assert row["val_patient_auc_mean"] == pytest.approx((0.8 + 1.0 + 0.5) / 3)
    html = make_report(path, tmp_path / "report").read_text()
    assert "3 row(s) superseded" in html and "lines: 2, 3, 7" in html


def test_factor_values_keep_their_type(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("stain,lr,batch_size,augment,val_auc,status\n"
                    "none,1.0E-4,32,\"flip,rot90\",0.5,ok\n"
                    "macenko,0.001,64.0,none,0.6,ok\n")
    rows = read_results(path)
    assert [r["stain"] for r in rows] == ["none", "macenko"]  # "none" is a level, not a missing value
    assert [r["lr"] for r in rows] == [0.0001, 0.001]
    assert [r["batch_size"] for r in rows] == [32, 64] and all(type(r["batch_size"]) is int for r in rows)
    assert rows[0]["augment"] == "flip,rot90"


# --------------------------------------------------------------------------------------------- HTML


class Tables(HTMLParser):
    """Collects every <table id=...> as a list of rows of cell texts, and every <img src>."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id", "")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(a["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _parse(html_path: Path) -> Tables:
    p = Tables()
    p.feed(html_path.read_text(encoding="utf-8"))
    p.close()
    return p


def _write_predictions(folder: Path, rng: np.random.Generator, n_patients: int = 6, tiles: int = 20) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "predictions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "patient_id", "x", "y", "label", "prob"])
        for p in range(n_patients):
            label = p % 2
            for t in range(tiles):
                w.writerow([f"S{p}", f"P{p}", 256 * t, 0, label, float(np.clip(rng.normal(0.3 + 0.4 * label, 0.2),
                                                                                   0, 1))])


def test_html_ranking_failed_points_and_figures(tmp_path):
    from matplotlib.image import imread

    results = write_local(tmp_path / "results.csv")
    rng = np.random.default_rng(0)
    for arch, lr, fold, *_, failed in POINTS:
        if arch == "resnet50" and lr == 0.001 and not failed:  # the best configuration's validation predictions
            _write_predictions(tmp_path / _point_dir(arch, lr, fold), rng)
    out = tmp_path / "deep" / "report"  # created
    html_path = make_report(results, out)
    assert html_path == out / "report.html" and html_path.exists()
    parsed = _parse(html_path)

    ranking = parsed.tables["ranking"]
    header, body = ranking[0], ranking[1:]
    assert header[:3] == ["rank", "arch", "lr"]  # epochs is constant: not a ranking column
    assert "folds completed" in header and any(h.startswith("val_patient_auc mean") for h in header)
    assert [r[0] for r in body] == ["1", "2", "3", "4"]
    assert [(r[1], r[2]) for r in body] == [("resnet50", "0.001"), ("simple_cnn", "0.001"),
                                            ("resnet50", "0.0001"), ("vit_b16", "0.001")]
    col = header.index("folds completed")
    assert [r[col] for r in body] == ["2", "3", "1", "0"]
    auc = body[0][header.index("val_patient_auc mean ± std")]
    assert auc == "0.900 ± 0.071"
    ci = body[0][header.index("val_patient_auc 95% CI (t, clipped to the range)")]
    assert ci == f"[{0.9 - T975_DF1 * 0.05:.3f}, 1.000]"  # 0.9 + 0.635 clipped to an AUC's range

    failed = parsed.tables["failed"]
    assert len(failed) - 1 == N_FAILED
    assert failed[0][:3] == ["line", "arch", "lr"] and "error" in failed[0]
    listed = {(r[1], r[2], r[failed[0].index("fold")]) for r in failed[1:]}
    assert listed == {(a, f"{lr:g}", str(f)) for a, lr, f, *_, bad in POINTS if bad}
    assert all("CUDA out of memory" in r[-1] for r in failed[1:])
    nan_rows = parsed.tables["nan-metrics"]
    assert len(nan_rows) == 2 and "val_slide_auc" in nan_rows[1][-1]

    text = html_path.read_text()
    assert "12 points, 4 configurations, 6 failed points" in text
    assert "<script" not in text.lower()
    expected_pngs = {"auc_by_arch.png", "factor_arch.png", "factor_lr.png", "roc_best.png", "reliability_best.png"}
    assert set(parsed.images) == expected_pngs  # no plot for fold, seed or the constant epochs
    for name in expected_pngs:
        img = imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert float(img[..., :3].std()) > 0.01  # something was drawn
    assert not list(out.glob(".*.tmp"))  # atomic writes left nothing behind

    with open(out / "summary.csv", newline="") as fh:
        summary = list(csv.DictReader(fh))
    assert [(r["rank"], r["arch"], r["lr"]) for r in summary] == [
        ("1", "resnet50", "0.001"), ("2", "simple_cnn", "0.001"), ("3", "resnet50", "0.0001"),
        ("4", "vit_b16", "0.001")]
    assert float(summary[1]["val_patient_auc_std"]) == pytest.approx(0.1)
    assert summary[3]["n_folds_completed"] == "0"
    for key in ("val_auc_mean", "val_auc_std", "val_auc_ci_low", "val_auc_ci_high", "n_points", "n_failed"):
        assert key in summary[0]


def test_roc_needs_predictions(tmp_path):
    results = write_local(tmp_path / "results.csv")
    html_path = make_report(results, tmp_path / "out")
    text = html_path.read_text()
    assert not (tmp_path / "out" / "roc_best.png").exists()
    assert 'id="no-roc"' in text and "roc_best.png" not in text
    assert 'id="no-reliability"' in text and not (tmp_path / "out" / "reliability_best.png").exists()
    assert (tmp_path / "out" / "auc_by_arch.png").exists()


def test_csvhook_table_with_absolute_outdir_gets_roc(tmp_path):
    from matplotlib.image import imread

    hook_csv = write_csvhook(tmp_path / "runs.csv", base=tmp_path / "elsewhere")
    rng = np.random.default_rng(1)
    for arch, lr, fold, *_, failed in POINTS:
        if arch == "resnet50" and lr == 0.001 and not failed:
            _write_predictions(tmp_path / "elsewhere" / _point_dir(arch, lr, fold), rng)
    html_path = make_report(hook_csv, tmp_path / "out")
    parsed = _parse(html_path)
    assert [(r[1], r[2]) for r in parsed.tables["ranking"][1:]][0] == ("resnet50", "0.001")
    assert len(parsed.tables["failed"]) - 1 == N_FAILED
    assert "roc_best.png" in parsed.images
    assert imread(tmp_path / "out" / "roc_best.png").ndim == 3


def test_no_arch_column_boxes_per_configuration_and_values_are_escaped(tmp_path):
    path = tmp_path / "r.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["model", "fold", "val_patient_auc", "status"])
        for fold, (a, b) in enumerate([(0.6, 0.9), (0.7, 0.8)]):
            w.writerow(['<b>cnn</b> & "x"', fold, a, "ok"])
            w.writerow(["other", fold, b, "ok"])
    html_path = make_report(path, tmp_path / "out")
    text = html_path.read_text()
    assert "<b>cnn</b>" not in text and "&lt;b&gt;cnn&lt;/b&gt; &amp; &quot;x&quot;" in text
    parsed = _parse(html_path)
    assert parsed.tables["ranking"][1][1] == "other"
    assert parsed.tables["ranking"][2][1] == '<b>cnn</b> & "x"'
    assert "auc_by_arch.png" in parsed.images and "factor_model.png" in parsed.images
    assert (tmp_path / "out" / "auc_by_arch.png").exists()


def test_reliability_diagram_pools_the_best_configurations_folds_with_their_brier_score(tmp_path):
    """Two folds of one configuration: benign tiles at 0.2 and malignant at 0.6, so the Brier score is
    (0.2² + 0.4²) / 2 = 0.100 and the diagram has two points, (0.2, 0.0) and (0.6, 1.0)."""
    from matplotlib.image import imread

    path = tmp_path / "r.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["arch", "fold", "val_patient_auc", "status", "out_dir"])
        for fold in (0, 1):
            w.writerow(["simple_cnn", fold, 1.0, "ok", f"p{fold}"])
            (tmp_path / f"p{fold}").mkdir()
            with open(tmp_path / f"p{fold}" / "predictions.csv", "w", newline="") as pf:
                pw = csv.writer(pf)
                pw.writerow(["slide_id", "patient_id", "x", "y", "label", "prob"])
                for t in range(10):
                    pw.writerow([f"S{fold}a", f"P{fold}a", 64 * t, 0, 0, 0.2])
                    pw.writerow([f"S{fold}b", f"P{fold}b", 64 * t, 0, 1, 0.6])
    text = make_report(path, tmp_path / "out").read_text()
    assert "reliability_best.png" in _parse(tmp_path / "out" / "report.html").images
    assert "40 validation tiles of 2 fold(s), Brier score 0.100" in text
    img = imread(tmp_path / "out" / "reliability_best.png")
    assert img.ndim == 3 and float(img[..., :3].std()) > 0.01


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("content", [
    None,                                        # missing
    b"",                                         # empty
    b"\n\n",                                     # blank
    b"hello world\nthis is not a results table\n",
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe",  # binary
    b"arch,fold,val_auc\n",                      # header only
    b"arch,fold,val_auc\ncnn,0,0.5,extra\n",      # unquoted comma in a value
], ids=["missing", "empty", "blank", "text", "binary", "header-only", "extra-field"])
def test_bad_results_file_is_a_one_line_error_naming_it(tmp_path, content):
    path = tmp_path / "results.csv"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TaskError) as err:
        make_report(path, tmp_path / "out")
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg
    assert err.value.path == str(path)
    assert not (tmp_path / "out" / "report.html").exists()


def test_unknown_metric_names_the_file(tmp_path):
    path = write_local(tmp_path / "results.csv")
    with pytest.raises(TaskError) as err:
        make_report(path, tmp_path / "out", metric="val_nope")
    assert err.value.path == str(path) and "val_nope" in err.value.cause


# --------------------------------------------------------------------------------------------- outside checks


def test_command_line(tmp_path, capsys):
    from python_task import cli

    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    if "report" not in sub.choices:
        pytest.skip("the report command is not wired into the CLI yet")
    results = write_local(tmp_path / "results.csv")
    assert cli.main(["report", str(results), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.html").exists() and (tmp_path / "out" / "summary.csv").exists()
    assert cli.main(["report", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o2")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.csv" in err[0]


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")
def test_report_renders_in_headless_chromium(tmp_path):
    html_path = make_report(write_local(tmp_path / "results.csv"), tmp_path / "out")
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          html_path.resolve().as_uri()], capture_output=True, text=True, timeout=120).stdout
    p = Tables()
    p.feed(dom)
    rows = p.tables["ranking"]
    assert rows[0][0] == "rank" and rows[1][1:3] == ["resnet50", "0.001"]


# ------------------------------------------------------------------------------- what a number is worth (issue 14)

def _honest_rows() -> list[dict]:
    """Two configurations with the same mean patient AUC (1.0) but different tile AUCs; fold 2 of "a" has one
    benign validation patient only."""
    rows = []
    for arch, tile_aucs in (("a", (0.60, 0.62, 0.64)), ("b", (0.90, 0.92, 0.94))):
        for fold, tile_auc in enumerate(tile_aucs):
            neg = 1 if (arch, fold) == ("a", 2) else 2
            rows.append({"arch": arch, "fold": fold, "val_auc": tile_auc, "val_patient_auc": 1.0,
                         "val_slide_auc": 1.0, "n_val_patients": 2 + neg, "n_val_patients_pos": 2,
                         "n_val_patients_neg": neg, "n_val_slides": 5, "n_val_slides_pos": 3, "n_val_slides_neg": 2,
                         "selection_tuned": 1.0, "tune_auc": 1.0, "status": "ok", "out_dir": f"p/{arch}{fold}"})
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_counts_are_metrics_and_ties_break_on_the_tile_auc(tmp_path):
    summary = summarize(read_results(_write(tmp_path / "r.csv", _honest_rows())))
    assert [r["arch"] for r in summary] == ["b", "a"]  # equal patient AUC 1.0: the higher tile AUC first
    assert "n_val_patients_pos_mean" in summary[0] and "fold" not in summary[0]  # counts are metrics, not factors
    for r in summary:
        for key in ("val_auc", "val_patient_auc"):
            assert 0.0 <= r[f"{key}_ci_low"] <= r[f"{key}_ci_high"] <= 1.0


def test_a_ranking_metric_that_ties_everywhere_is_said_and_the_decisions_are_shown(tmp_path):
    """Patient AUC 1.000 for every configuration ranks nothing: the report says so, names the metric that ordered
    them, and its table shows the slide and patient calls beside the AUCs."""
    rows = _honest_rows()
    for row in rows:
        row.update(val_slide_accuracy=0.8 if row["arch"] == "b" else 1.0, val_patient_accuracy=0.75,
                   val_slide_brier=0.1)
    html = make_report(_write(tmp_path / "r.csv", rows), tmp_path / "report").read_text()
    tie = html[html.index('id="tie"'):].split("</p>")[0]
    assert "Every configuration has the same mean val_patient_auc (1.000)" in tie
    assert "ordered by val_auc (means from 0.620 to 0.920)" in tie
    ranking = html[html.index('<table class="ranking"') if '<table class="ranking"' in html else
                   html.index("ranking"):].split("</table>")[0]
    for column in ("val_slide_accuracy (mean)", "val_patient_accuracy (mean)", "val_slide_brier (mean)"):
        assert column in ranking, column
    rows[0]["val_patient_auc"] = 0.9  # a configuration the ranking metric separates: no notice
    html = make_report(_write(tmp_path / "s.csv", rows), tmp_path / "report2").read_text()
    assert 'id="tie"' not in html


def test_report_shows_the_patients_behind_each_figure_few_patient_folds_and_the_optimism(tmp_path):
    parsed_path = make_report(_write(tmp_path / "r.csv", _honest_rows()), tmp_path / "out")
    parsed = _parse(parsed_path)
    header, body = parsed.tables["ranking"][0], parsed.tables["ranking"][1:]
    behind = header.index("validation patients behind it (M malignant + B benign)")
    assert behind == header.index("val_patient_auc 95% CI (t, clipped to the range)") + 1
    assert body[0][behind] == "6 M + 6 B (3 folds; fewest 2 M + 2 B)"
    assert body[1][behind] == "6 M + 5 B (3 folds; fewest 2 M + 1 B)"
    slides = header.index("validation slides behind it")
    assert slides == header.index("val_slide_auc (mean)") + 1 and body[0][slides].startswith("9 M + 6 B")
    text = parsed_path.read_text()
    assert "once in 3 folds (1 / C(3, 2))" in text  # the fold with 2 malignant + 1 benign patients
    warn = text[text.index('id="few-patients"'):]
    assert "fewer than 2 patients of a class" in warn[:400] and "fold=2" in warn[:400]
    optimism = text[text.index('id="optimism"'):]
    assert "best of 2 configurations is an optimistic estimate" in optimism[:300]
    assert "No test-set figure" in optimism[:1000] and 'id="no-test"' in text


def test_report_shows_a_test_set_evaluation_apart(tmp_path):
    import json

    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "test_metrics.json").write_text(json.dumps({
        "test_auc": 0.91, "test_auc_ci_low": 0.80, "test_auc_ci_high": 0.97, "test_patient_auc": 1.0,
        "test_patient_auc_ci_low": 1.0, "test_patient_auc_ci_high": 1.0, "test_slide_auc": None, "threshold": 0.4,
        "n_test_patients_pos": 1, "n_test_patients_neg": 1, "n_test_slides": 3, "n_test_tiles": 300}))
    (folder / "evaluation.json").write_text(json.dumps({"model": "/runs/best/model.keras"}))
    html_path = make_report(_write(tmp_path / "r.csv", _honest_rows()), tmp_path / "out", tests=[folder])
    parsed = _parse(html_path)
    table = parsed.tables["test-0"]
    assert table[1] == ["tile AUC", "0.910", "[0.800, 0.970]"]
    assert ["slide AUC", "n/a", ""] in table
    text = html_path.read_text()
    assert "1 malignant and 1 benign patients" in text and "under Test set below (eval)" in text
    assert text.index('id="ranking"') < text.index('id="tests"')


# --------------------------------------------------------------------------------------------- one writer, no
#                                                                                               leftovers, no nonsense

def test_report_holds_its_folder_and_removes_a_killed_reports_temporaries(tmp_path):
    """A second writer of the report's folder is refused, as for every command; the temporaries a killed report
    left (the hidden ``.NAME.XXXXXXXX.tmp`` of its atomic writes) are deleted by the next report."""
    from python_task.errors import BusyError
    from python_task.fileio import folder_lock

    results = write_local(tmp_path / "results.csv")
    out = tmp_path / "out"
    out.mkdir()
    with folder_lock(out, "report"):
        with pytest.raises(BusyError, match="in use by another run") as err:
            make_report(results, out)
        assert err.value.path == str(out)
    assert not (out / "report.html").exists()
    left = [out / ".summary.csv.k1ll3d00.tmp", out / ".auc_by_arch.png.k1ll3d01.tmp"]
    for path in left:
        path.write_bytes(b"half-written")
    make_report(results, out)
    assert (out / "report.html").exists() and not any(p.exists() for p in left)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_impossible_metric_values_are_flagged_and_never_averaged(tmp_path, caplog):
    """An AUC of -5 or inf, a Brier score above 1, text in a metric column: each such row is named in a one-line
    warning (file, line, column) and counted as failed, none of its values averaged; NaN stays a missing value."""
    import logging

    path = tmp_path / "results.csv"
    path.write_text("arch,fold,seed,status,val_auc,val_patient_auc,val_slide_brier\n"
                    "a,0,0,ok,0.8,0.9,0.1\n"
                    "a,1,0,ok,0.7,-5,0.2\n"        # line 3: impossible AUC
                    "a,2,0,ok,0.75,inf,0.2\n"      # line 4: not finite
                    "a,3,0,ok,0.6,0.85,1.5\n"      # line 5: a Brier score above 1
                    "a,4,0,ok,abc,0.8,0.3\n"       # line 6: no number
                    "a,5,0,ok,0.9,nan,0.1\n")      # missing patient AUC: a completed point
    with caplog.at_level(logging.WARNING, logger="python_task"):
        html = make_report(path, tmp_path / "out")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{path}: line 3: invalid: val_patient_auc = -5 (outside [0, 1]): the row is left out of "
                        "every statistic",
                        f"{path}: line 4: invalid: val_patient_auc = inf (not finite): the row is left out of every "
                        "statistic",
                        f"{path}: line 5: invalid: val_slide_brier = 1.5 (outside [0, 1]): the row is left out of "
                        "every statistic",
                        f"{path}: line 6: invalid: val_auc = 'abc' (not a number): the row is left out of every "
                        "statistic"]
    (row,) = summarize(read_results(path))
    assert (row["n_points"], row["n_completed"], row["n_failed"]) == (6, 2, 4)
    assert row["val_patient_auc_mean"] == pytest.approx(0.9)  # line 7's NaN is missing, not invalid
    assert row["val_auc_mean"] == pytest.approx(0.85) and row["val_slide_brier_mean"] == pytest.approx(0.1)
    failed = _parse(html).tables["failed"]
    assert [r[0] for r in failed[1:]] == ["3", "4", "5", "6"] and all(r[-2] == "invalid" for r in failed[1:])


def test_a_read_only_output_folder_is_named_not_a_temporary_file(tmp_path, monkeypatch, capsys):
    from python_task import cli
    from tests.test_fileio import _read_only

    results = write_local(tmp_path / "results.csv")
    out = tmp_path / "ro"
    out.mkdir()
    _read_only(monkeypatch, out)
    assert cli.main(["report", str(results), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {out}: cannot write in this output folder (Read-only file system)"]
    assert list(out.iterdir()) == []
