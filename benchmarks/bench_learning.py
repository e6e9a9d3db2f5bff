"""Does ``train`` with its defaults learn the lesion on patients it has never seen, and are its numbers honest?

    python benchmarks/bench_learning.py [--sections cohorts,small,control,archs,decisions,demo]
                                        [--seeds 301,302,303,304,305]
                                        [--small-seeds 401,...] [--control-seeds 501,...] [--archs all]
                                        [--arch-epochs 3] [--arch-max-train-tiles 512] [--out bench_out] [--quick]

Every cohort is drawn fresh with ``SynthConfig(patients=P, seed=S, slide_size=2048)`` (default stain variation
1.0; none of these seeds is used by a test), cut into 64-px tiles at 1 µm/px (``ExtractParams(tile_size=64,
mpp=1.0)``) and split with ``make_splits(shards, K, seed=0)`` (its default tuning fraction: one tuning patient of
each diagnosis per fold when the fold's training patients can spare them, else the fixed rule). Each ``train``
runs with the package's defaults (``TrainConfig`` with only the data, fold, architecture and output given), in
this process, one after the other. Six sections:

* ``cohorts`` (issue 14's first proof): 12 patients, every fold of 3, ``simple_cnn``: held-out (validation
  fold) tile AUC of every fold, its patient AUC with the patients behind it (malignant + benign). Targets: median
  tile AUC >= 0.90, worst fold >= 0.75.
* ``small``: 8 patients, 2 folds (no tuning set fits: the fixed rule, the last of 10 epochs, threshold 0.5).
  Target: no fold below 0.70.
* ``control``: the honesty control. 12-patient cohorts whose labels no longer follow structure: for a seeded
  half of the patients of each diagnosis, the diagnosis is flipped and every region of the patient's slides
  takes the other diagnosis' class (a malignant patient's regions all become Biliary adenoma, a benign one's
  Cholangiocarcinoma), before extraction. Every fold is
  trained twice from the same start: as ``train`` does (selection on the tuning set) and with selection on the
  held-out fold, as ``train`` did before issue 14 (the benchmark hands ``train`` the held-out fold as its tuning
  set: epoch, early stopping and threshold chosen on the fold then reported). Target: the 95 % t-interval of the
  mean reported tile AUC (tuning-set selection) contains 0.5; the difference of the two means is the bias the
  tuning set removes.
* ``archs``: every registered architecture on the first ``--seeds`` cohort, every fold, beside a logistic
  regression on per-tile colour histograms (8 bins per RGB channel) trained on the same training tiles. Budget:
  ``simple_cnn`` and ``unet_encoder`` at the defaults (10 epochs, all tiles); the keras.applications networks
  (from scratch, no pretrained weights) ``--arch-epochs`` (3) epochs on ``--arch-max-train-tiles`` (512)
  training tiles, input 64 px (75 for inception_v3, its minimum). Target: each architecture's mean held-out tile
  AUC above the baseline's.

* ``decisions`` (issue 21): the calls a pathologist reads. For ``train``'s defaults and every configuration of
  the demo's plan (its architectures x stain choices with its fixed settings, taken from ``DemoConfig``), every
  fold of fresh cohorts: 12 patients in 3 folds (``--decision-seeds``) and 8 patients in 2 folds
  (``--decision-small-seeds``). Per point, the held-out slide and patient accuracy at the run's own threshold
  (its aggregation, calibration and cross-fitted threshold) and the slide Brier score, beside today's rule on the
  very same model (before issue 21: mean uncalibrated tile probability, threshold on the tuning slides alone, 0.5
  without them). Targets, per configuration at 12 patients: median slide accuracy >= 0.95 and worst point
  >= 0.85; patient accuracy likewise.
* ``demo``: ``demo`` as a user runs it, once per ``--demo-seeds`` seed and once more for the first seed with
  ``--demo-extra-jobs`` points in parallel (other threads per point: other rounding). Target: both heat-map
  slides called right in every run; each call is quoted, and how many held-out slides of the drawn fold were
  called right.

The control section also reports the mean held-out slide accuracy at the runs' own thresholds; target: its 95 %
t-interval contains 0.5.

``--quick`` (tests): one small cohort per section, 1 epoch on at most 128 tiles, ``simple_cnn`` only (the
decisions section: ``train``'s defaults only; no demo).

Ablations (the README's table): ``--set KEY=VALUE`` (repeatable) changes a ``train`` option for every run,
e.g. ``--set augment=none`` or ``--set input_scaling=architecture``; ``--tune-fraction 0`` makes splits without
tuning sets (every fold under the fixed rule). The targets are then reported for that variant.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import conclude, scratch_folder, write_report  # noqa: E402

SECTIONS = ("cohorts", "small", "control", "archs", "decisions", "demo")
TILE_SIZE, MPP, SLIDE_SIZE = 64, 1.0, 2048
SWAP = {"malignant": "Biliary adenoma", "benign": "Cholangiocarcinoma"}  # a swapped patient's every region
MIN_SIZE = {"inception_v3": 75}


logging.getLogger("tensorflow").setLevel(logging.ERROR)  # Keras' retracing notes, one per model built


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- cohorts

TUNE_FRACTION: list[float] = []  # --tune-fraction, when given


def make_cohort(work: Path, patients: int, seed: int, folds: int, *, swap: bool = False) -> tuple[Path, Path, dict]:
    """Synthetic cohort -> shards -> splits; with ``swap`` half the patients of each diagnosis get every class
    swapped and their diagnosis flipped (labels that do not follow structure)."""
    from python_task.data.splits import make_splits, write_splits
    from python_task.shards.extract import extract_cohort
    from python_task.shards.params import ExtractParams
    from python_task.synth.cohort import generate_cohort
    from python_task.synth.config import SynthConfig
    from python_task.wsi.cohort import read_cohort

    root = work / f"c{patients}_s{seed}{'_swapped' if swap else ''}"
    t0 = time.perf_counter()
    cohort = generate_cohort(root / "cohort", SynthConfig(patients=patients, seed=seed, slide_size=SLIDE_SIZE))
    swapped = swap_labels(cohort, seed) if swap else []
    report = extract_cohort(read_cohort(cohort), root / "shards", ExtractParams(tile_size=TILE_SIZE, mpp=MPP),
                            workers=1, progress=False)
    if not report.ok:
        raise RuntimeError(f"extract failed: {[r.message for r in report.failed]}")
    splits = make_splits(root / "shards", folds, seed=0, **({"tune_fraction": TUNE_FRACTION[0]} if TUNE_FRACTION
                                                           else {}))
    write_splits(splits, root / "splits.json")
    info = {"patients": patients, "seed": seed, "folds": folds, "tiles": report.n_tiles, "swapped": swapped,
            "seconds": time.perf_counter() - t0,
            "tuning_sets": [f["tune_patients"] for f in splits["folds"]]}
    return root / "shards", root / "splits.json", info


def swap_labels(cohort_csv: Path, seed: int) -> list[str]:
    """Swap the annotation classes and flip the diagnosis of a seeded half of each diagnosis' patients."""
    with open(cohort_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    diagnosis = {r["patient_id"]: r["diagnosis"] for r in rows}
    rng = np.random.default_rng([seed, 0x5A4B])
    chosen: set[str] = set()
    for d in sorted(set(diagnosis.values())):
        members = sorted(p for p, x in diagnosis.items() if x == d)
        chosen |= set(rng.permutation(members)[: len(members) // 2].tolist())
    for r in rows:
        if r["patient_id"] not in chosen:
            continue
        path = cohort_csv.parent / r["annotation_path"]
        data = json.loads(path.read_text())
        for feature in data["features"]:
            feature["properties"]["classification"]["name"] = SWAP[r["diagnosis"]]
        path.write_text(json.dumps(data))
        r["diagnosis"] = "benign" if r["diagnosis"] == "malignant" else "malignant"
    with open(cohort_csv, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return sorted(chosen)


# --------------------------------------------------------------------------------------------- training

@contextlib.contextmanager
def selection_on_held_out():
    """``train`` as before issue 14: its tuning set replaced by the held-out fold, so the epoch, early stopping and
    threshold are chosen on the very fold the metrics are then computed on."""
    import python_task.training.loop as loop

    real = loop.prepare_data

    def patched(*args, **kwargs):
        data = real(*args, **kwargs)
        data.tune_index, data.tune_batches = data.val_index, data.val_batches
        return data

    loop.prepare_data = patched
    try:
        yield
    finally:
        loop.prepare_data = real


def train_fold(shards: Path, splits: Path, fold: int, out: Path, arch: str = "simple_cnn", **overrides) -> dict:
    """One ``train`` with the package defaults (plus ``overrides``); the figures quoted, per fold."""
    import keras

    from python_task.training.config import TrainConfig
    from python_task.training.loop import train

    keras.backend.clear_session()
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(shards=shards, splits=splits, fold=fold, arch=arch, out=out, verbose=False, tensorboard=False,
                      **overrides)
    t0 = time.perf_counter()
    m = train(cfg)
    keys = ("val_auc", "val_patient_auc", "val_slide_auc", "val_patient_accuracy", "val_balanced_accuracy",
            "val_slide_accuracy", "val_slide_brier", "n_val_slides", "threshold", "tune_auc", "best_epoch",
            "epochs_run", "selection_tuned", "n_val_patients_pos", "n_val_patients_neg", "n_tune_patients",
            "n_calibration_patients", "n_train_tiles", "n_val_tiles", "train_seconds", "calibration_seconds",
            "n_params")
    row = {"fold": fold, **{k: float(m[k]) for k in keys}, "wall_seconds": time.perf_counter() - t0}
    shutil.rmtree(out, ignore_errors=True)
    return row


def fold_line(tag: str, r: dict) -> str:
    rule = (f"epoch {r['best_epoch']:.0f}/{r['epochs_run']:.0f} on tuning set" if r["selection_tuned"]
            else f"fixed rule, last epoch {r['epochs_run']:.0f}")
    return (f"  {tag:<24} fold {r['fold']}: tile AUC {r['val_auc']:.3f}, patient AUC {r['val_patient_auc']:.3f} "
            f"({r['n_val_patients_pos']:.0f} malignant + {r['n_val_patients_neg']:.0f} benign patients), "
            f"patient accuracy {r['val_patient_accuracy']:.3f} at threshold {r['threshold']:.3f}; {rule} "
            f"({r['train_seconds']:.0f} s)")


def cohort_runs(work: Path, seeds: list[int], patients: int, folds: int, overrides: dict) -> tuple[list, list]:
    cohorts, rows = [], []
    for seed in seeds:
        shards, splits, info = make_cohort(work, patients, seed, folds)
        cohorts.append(info)
        log(f"cohort {patients} patients seed {seed}: {info['tiles']} tiles, tuning sets {info['tuning_sets']}")
        for fold in range(folds):
            r = {"seed": seed, **train_fold(shards, splits, fold, work / "run", **overrides)}
            rows.append(r)
            log(fold_line(f"{patients} patients seed {seed}", r))
    return cohorts, rows


def summary(values: list[float]) -> dict:
    x = [v for v in values if math.isfinite(v)]
    return {"n": len(x), "median": statistics.median(x) if x else math.nan, "worst": min(x) if x else math.nan,
            "mean": statistics.fmean(x) if x else math.nan}


def t_interval(values: list[float]) -> dict:
    from scipy import stats

    x = np.asarray([v for v in values if math.isfinite(v)], float)
    if len(x) < 2:
        return {"n": len(x), "mean": float(x.mean()) if len(x) else math.nan, "ci_low": math.nan, "ci_high": math.nan}
    half = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return {"n": len(x), "mean": float(x.mean()), "sd": float(x.std(ddof=1)), "ci_low": float(x.mean() - half),
            "ci_high": float(x.mean() + half)}


# --------------------------------------------------------------------------------------------- baseline

def colour_features(tiles: np.ndarray) -> np.ndarray:
    """Normalised 8-bin histogram of each RGB channel, per tile: ``(n, 24)``."""
    n, t = len(tiles), tiles.shape[1]
    feats = np.empty((n, 24))
    for c in range(3):
        idx = tiles[..., c].reshape(n, -1) >> 5  # 8 bins of 32 levels
        feats[:, 8 * c:8 * c + 8] = np.stack([np.bincount(row, minlength=8) for row in idx]) / (t * t)
    return feats


def index_features(index) -> np.ndarray:
    from python_task.data.dataset import TileFetcher

    fetcher = TileFetcher(index)
    return np.concatenate([colour_features(fetcher.fetch(np.arange(s, min(s + 512, len(index)))))
                           for s in range(0, len(index), 512)])


def histogram_baseline(shards: Path, splits: Path, folds: int) -> list[dict]:
    """Per fold: logistic regression on colour histograms of the fitting tiles, AUCs on the held-out tiles."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from python_task.data.dataset import build_index
    from python_task.data.splits import load_fold
    from python_task.training.metrics import auc, group_auc

    out = []
    for fold in range(folds):
        f = load_fold(splits, shards, fold)
        tr, va = build_index(shards, f.train_slides), build_index(shards, f.val_slides)
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
        clf.fit(index_features(tr), tr.labels)
        prob = clf.predict_proba(index_features(va))[:, 1]
        out.append({"fold": fold, "val_auc": float(auc(va.labels, prob)),
                    "val_patient_auc": float(group_auc(va.labels, prob, va.patient_ids))})
    return out


# --------------------------------------------------------------------------------------------- decisions

def decision_configs(names: list[str]) -> dict[str, dict]:
    """``train``'s defaults ("defaults") and every configuration of the demo's plan ("demo": its architectures x
    stain choices with its fixed settings, from :class:`DemoConfig`, so the benchmark follows the demo)."""
    from python_task.experiments.demo import DemoConfig, demo_plan

    out: dict[str, dict] = {}
    if "defaults" in names:
        out["train defaults (simple_cnn)"] = {}
    if "demo" in names:
        cfg = DemoConfig()
        fixed = {k: v for k, v in demo_plan(cfg)["fixed"].items()}
        for arch in cfg.archs:
            for stain in cfg.stains:
                out[f"demo {arch} stain {stain}"] = {"arch": arch, "stain": stain, **fixed}
    return out


@contextlib.contextmanager
def raw_predictions(store: dict):
    """While it is active, ``train`` leaves in ``store`` its uncalibrated tuning probabilities (``tune``, None
    without a tuning set), its run data (``data``) and its uncalibrated held-out probabilities (``val``): what
    today's rule (before issue 21) would have decided from the same model."""
    import python_task.training.loop as loop

    real_tiles, real_predict = loop.calibration_tiles, loop.predict_index

    def tiles(cfg, data, state, engine, tune_prob):
        store.update(data=data, tune=tune_prob)
        return real_tiles(cfg, data, state, engine, tune_prob)

    def predict(model, batches):
        prob = real_predict(model, batches)
        if "data" in store and batches is store["data"].val_batches:
            store["val"] = prob
        return prob

    loop.calibration_tiles, loop.predict_index = tiles, predict
    try:
        yield
    finally:
        loop.calibration_tiles, loop.predict_index = real_tiles, real_predict


def todays_rule(store: dict) -> dict:
    """The decisions of the rule before issue 21 on the same model: slides and patients scored by their mean
    uncalibrated tile probability, the threshold chosen on the tuning slides alone (0.5 without them)."""
    from python_task.training.metrics import FIXED_THRESHOLD, choose_slide_threshold, group_decisions

    data, tune = store["data"], store.get("tune")
    threshold = (choose_slide_threshold(data.tune_index.labels, tune, data.tune_index.slide_ids, "mean")
                 if tune is not None else FIXED_THRESHOLD)
    v = data.val_index
    slide = group_decisions(v.labels, store["val"], v.slide_ids, threshold, "mean")
    patient = group_decisions(v.labels, store["val"], v.patient_ids, threshold, "mean")
    return {"old_threshold": threshold, "old_slide_accuracy": slide["accuracy"],
            "old_patient_accuracy": patient["accuracy"], "old_slide_brier": slide["brier"]}


def decision_section(work: Path, seeds: list[int], patients: int, folds: int, configs: dict[str, dict],
                     overrides: dict) -> dict:
    """Every fold of a fresh cohort per seed, for every configuration: the held-out decisions at the run's own
    threshold (the run's aggregation and calibration) beside today's rule on the same model."""
    rows = []
    for seed in seeds:
        shards, splits, info = make_cohort(work, patients, seed, folds)
        log(f"decisions: cohort {patients} patients seed {seed}: {info['tiles']} tiles, tuning sets "
            f"{info['tuning_sets']}")
        for name, kw in configs.items():
            for fold in range(folds):
                store: dict = {}
                with raw_predictions(store):
                    r = {"seed": seed, "config": name, **train_fold(shards, splits, fold, work / "run",
                                                                     **{**kw, **overrides})}
                r.update(todays_rule(store))
                rows.append(r)
                log(decision_line(r))
    by_config = {}
    for name in configs:
        mine = [r for r in rows if r["config"] == name]
        by_config[name] = {key: summary([r[key] for r in mine]) for key in (
            "val_slide_accuracy", "val_patient_accuracy", "val_slide_brier", "old_slide_accuracy",
            "old_patient_accuracy", "old_slide_brier", "val_auc", "train_seconds", "calibration_seconds")}
    return {"seeds": seeds, "patients": patients, "folds": folds, "points": rows, "by_config": by_config}


def decision_line(r: dict) -> str:
    return (f"  {r['config']:<34} seed {r['seed']} fold {r['fold']}: tile AUC {r['val_auc']:.3f}; slides right "
            f"{r['val_slide_accuracy']:.3f} (today's rule {r['old_slide_accuracy']:.3f}), patients "
            f"{r['val_patient_accuracy']:.3f} ({r['old_patient_accuracy']:.3f}), slide Brier {r['val_slide_brier']:.3f} "
            f"({r['old_slide_brier']:.3f}); threshold {r['threshold']:.3f} ({r['old_threshold']:.3f}) from "
            f"{r['n_calibration_patients']:.0f} patients; {r['train_seconds']:.0f} s training + "
            f"{r['calibration_seconds']:.0f} s calibration")


def decision_summary_lines(section: dict) -> list[str]:
    lines = []
    for name, s in section["by_config"].items():
        lines.append(f"  {name:<34} slide accuracy median {s['val_slide_accuracy']['median']:.3f} worst "
                     f"{s['val_slide_accuracy']['worst']:.3f} (today's rule {s['old_slide_accuracy']['median']:.3f} / "
                     f"{s['old_slide_accuracy']['worst']:.3f}); patient accuracy median "
                     f"{s['val_patient_accuracy']['median']:.3f} worst {s['val_patient_accuracy']['worst']:.3f} "
                     f"({s['old_patient_accuracy']['median']:.3f} / {s['old_patient_accuracy']['worst']:.3f}); slide "
                     f"Brier median {s['val_slide_brier']['median']:.3f} ({s['old_slide_brier']['median']:.3f}); "
                     f"tile AUC median {s['val_auc']['median']:.3f}; {s['val_slide_accuracy']['n']} points")
    return lines


def demo_runs(work: Path, seeds: list[int], extra_jobs: int | None) -> list[dict]:
    """The demo as a user runs it, once per seed (and once more for the first seed with ``extra_jobs`` points in
    parallel: another number of threads per point, other rounding): each heat-map slide's call."""
    from python_task.experiments.demo import DemoConfig, run_demo

    runs = [(seed, DemoConfig().jobs) for seed in seeds] + ([(seeds[0], extra_jobs)] if extra_jobs else [])
    out = []
    for seed, jobs in runs:
        folder = work / f"demo_s{seed}_j{jobs}"
        t0 = time.perf_counter()
        outputs = run_demo(folder, DemoConfig(seed=seed, jobs=jobs))
        calls = []
        for name, path in outputs.items():
            if not name.startswith("heatmap "):
                continue
            summary_ = json.loads((path.parent / "slide.json").read_text())
            truth = name.rsplit("(", 1)[1].rstrip(")")
            calls.append({"slide": path.parent.name, "diagnosis": truth, "called": summary_["predicted_diagnosis"],
                          "score": summary_["slide_score"], "threshold": summary_["threshold"],
                          "aggregation": summary_.get("aggregation", "mean")})
        threads = max(1, (os.cpu_count() or 1) // jobs)
        out.append({"seed": seed, "jobs": jobs, "threads_per_point": threads, "calls": calls,
                    "held_out": held_out_summary(folder), "seconds": time.perf_counter() - t0})
        log(f"demo seed {seed} ({threads} thread(s) a point): " + "; ".join(
            f"{c['slide']} ({c['diagnosis']}) called {c['called']}, score {c['score']:.3f} at {c['threshold']:.3f}"
            for c in calls) + f"; {out[-1]['held_out']}")
    return out


def held_out_summary(folder: Path) -> str:
    from python_task.experiments.demo import heatmap_choice, held_out_line

    choice = heatmap_choice(folder / "sweep" / "results.csv", folder / "cohort" / "cohort.csv",
                            folder / "splits.json")
    return "no heat-map fold" if choice is None else held_out_line(choice[0])


# --------------------------------------------------------------------------------------------- main

def cohort_section(work: Path, seeds: list[int], patients: int, folds: int, overrides: dict) -> dict:
    """Every fold of a fresh cohort per seed trained with ``train``'s defaults: the section's report entry."""
    cohorts, rows = cohort_runs(work, seeds, patients, folds, overrides)
    return {"seeds": seeds, "cohorts": cohorts, "folds": rows, "tile_auc": summary([r["val_auc"] for r in rows]),
            "patient_auc": summary([r["val_patient_auc"] for r in rows])}


def main() -> int:
    from python_task.training.architectures import architecture_names

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    ap.add_argument("--seeds", default="301,302,303,304,305", help="12-patient cohort seeds (cohorts, archs)")
    ap.add_argument("--small-seeds", default="401,402,403,404,405", help="8-patient cohort seeds (small)")
    ap.add_argument("--control-seeds", default="501,502,503,504", help="12-patient shuffled cohort seeds (control)")
    ap.add_argument("--decision-seeds", default="601,602,603,604,605",
                    help="12-patient cohort seeds of the decisions section (3 folds)")
    ap.add_argument("--decision-small-seeds", default="611,612,613,614,615",
                    help="8-patient cohort seeds of the decisions section (2 folds)")
    ap.add_argument("--decision-configs", default="defaults,demo",
                    help="configurations of the decisions section: defaults (train's), demo (the demo's plan)")
    ap.add_argument("--demo-seeds", default="0,1,2,3,4", help="seeds of the demo section")
    ap.add_argument("--demo-extra-jobs", type=int, default=1,
                    help="the first demo seed once more with this many points in parallel (other threads per "
                         "point, other rounding); 0 = not")
    ap.add_argument("--archs", default="all", help="architectures of the archs section (default all registered)")
    ap.add_argument("--arch-epochs", type=int, default=3, help="epochs of the keras.applications networks (3)")
    ap.add_argument("--arch-max-train-tiles", type=int, default=512,
                    help="training tiles of the keras.applications networks (512)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a train option for every run (an ablation), e.g. augment=none; repeatable")
    ap.add_argument("--tune-fraction", type=float, help="split's tuning fraction (default: split's own, 0.25)")
    ap.add_argument("--out", type=Path, default=Path("bench_out"), help="where the JSON report goes")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--quick", action="store_true", help="small and fast (tests): one small cohort per section, "
                    "1 epoch on at most 128 tiles, simple_cnn only")
    args = ap.parse_args()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown section(s) {', '.join(sorted(unknown))}")
    seeds = [int(s) for s in args.seeds.split(",")]
    small_seeds = [int(s) for s in args.small_seeds.split(",")]
    control_seeds = [int(s) for s in args.control_seeds.split(",")]
    archs = architecture_names() if args.archs == "all" else [a.strip() for a in args.archs.split(",")]
    overrides: dict = {}
    for item in args.set:
        key, _, value = item.partition("=")
        from python_task.training.config import train_options

        option = train_options()[key.strip()]
        overrides[option.field] = option.kind(value) if option.kind is not bool else value.lower() == "true"
    if args.tune_fraction is not None:
        TUNE_FRACTION.append(args.tune_fraction)
    decision_seeds = [int(x) for x in args.decision_seeds.split(",") if x.strip()]
    decision_small_seeds = [int(x) for x in args.decision_small_seeds.split(",") if x.strip()]
    demo_seeds = [int(x) for x in args.demo_seeds.split(",") if x.strip()]
    configs = decision_configs([c.strip() for c in args.decision_configs.split(",")])
    if args.quick:
        seeds, small_seeds, control_seeds, archs = seeds[:1], small_seeds[:1], control_seeds[:1], ["simple_cnn"]
        decision_seeds, decision_small_seeds = decision_seeds[:1], decision_small_seeds[:1]
        configs = dict(list(configs.items())[:1])
        overrides.update(epochs=1, max_train_tiles=128, max_val_tiles=128)

    t_start = time.perf_counter()
    report: dict = {"quick": args.quick, "sections": sections, "defaults": "TrainConfig defaults",
                    "tune_fraction": args.tune_fraction,
                    "cohort_recipe": {"slide_size": SLIDE_SIZE, "stain_variation": 1.0, "tile_size": TILE_SIZE,
                                      "mpp": MPP, "split_seed": 0}, "overrides": overrides,
                    "loadavg_start": list(os.getloadavg())}
    targets: dict[str, bool] = {}
    lines: list[str] = []
    with scratch_folder("bench_learning_", keep=args.keep) as work:
        if "cohorts" in sections:
            report["cohorts"] = cohort_section(work, seeds, 12, 3, overrides)
            s, rows = report["cohorts"]["tile_auc"], report["cohorts"]["folds"]
            targets["12 patients x 3 folds: median held-out tile AUC >= 0.90"] = bool(s["median"] >= 0.90)
            targets["12 patients x 3 folds: worst fold >= 0.75"] = bool(s["worst"] >= 0.75)
            lines.append(f"12 patients, 3 folds, seeds {seeds}: held-out tile AUC median {s['median']:.3f}, worst "
                         f"{s['worst']:.3f} ({s['n']} folds); patient AUC median "
                         f"{report['cohorts']['patient_auc']['median']:.3f}, worst "
                         f"{report['cohorts']['patient_auc']['worst']:.3f}")
            lines += [fold_line(f"seed {r['seed']}", r) for r in rows]
        if "small" in sections:
            report["small"] = cohort_section(work, small_seeds, 8, 2, overrides)
            s, rows = report["small"]["tile_auc"], report["small"]["folds"]
            targets["8 patients x 2 folds: no fold below 0.70"] = bool(s["worst"] >= 0.70)
            lines.append(f"8 patients, 2 folds, seeds {small_seeds}: held-out tile AUC median {s['median']:.3f}, "
                         f"worst {s['worst']:.3f} ({s['n']} folds)")
            lines += [fold_line(f"seed {r['seed']}", r) for r in rows]
        if "control" in sections:
            tuned, held_out = [], []
            for seed in control_seeds:
                shards, splits, info = make_cohort(work, 12, seed, 3, swap=True)
                log(f"shuffled cohort seed {seed}: swapped {info['swapped']}")
                for fold in range(3):
                    a = {"seed": seed, **train_fold(shards, splits, fold, work / "run", **overrides)}
                    with selection_on_held_out():
                        b = {"seed": seed, **train_fold(shards, splits, fold, work / "run", **overrides)}
                    tuned.append(a)
                    held_out.append(b)
                    log(fold_line(f"shuffled {seed} tuning", a))
                    log(fold_line(f"shuffled {seed} held-out", b))
            ta, tb = t_interval([r["val_auc"] for r in tuned]), t_interval([r["val_auc"] for r in held_out])
            pa, pb = (t_interval([r["val_patient_auc"] for r in tuned]),
                      t_interval([r["val_patient_auc"] for r in held_out]))
            diffs = [b["val_auc"] - a["val_auc"] for a, b in zip(tuned, held_out)]
            sa = t_interval([r["val_slide_accuracy"] for r in tuned])
            targets["shuffled diagnoses: 0.5 inside the 95 % interval of the mean slide accuracy"] = bool(
                sa["ci_low"] <= 0.5 <= sa["ci_high"])
            lines.append(f"shuffled diagnoses: mean held-out slide accuracy {sa['mean']:.3f} [{sa['ci_low']:.3f}, "
                         f"{sa['ci_high']:.3f}] at the runs' own thresholds")
            report["control"] = {"seeds": control_seeds, "tuning_set_selection": tuned,
                                 "held_out_selection": held_out, "tile_auc_tuning": ta, "tile_auc_held_out": tb,
                                 "patient_auc_tuning": pa, "patient_auc_held_out": pb,
                                 "bias_tile_auc": t_interval(diffs), "bias_max": max(diffs), "slide_accuracy": sa}
            targets["shuffled diagnoses: 0.5 inside the 95 % interval of the mean tile AUC"] = bool(
                ta["ci_low"] <= 0.5 <= ta["ci_high"])
            lines.append(f"shuffled diagnoses, seeds {control_seeds}, {ta['n']} runs: mean held-out tile AUC "
                         f"{ta['mean']:.3f} [{ta['ci_low']:.3f}, {ta['ci_high']:.3f}] with selection on the tuning "
                         f"set; {tb['mean']:.3f} [{tb['ci_low']:.3f}, {tb['ci_high']:.3f}] with selection on the "
                         f"held-out fold: bias {tb['mean'] - ta['mean']:+.3f} on average, up to {max(diffs):+.3f}; "
                         f"patient AUC {pa['mean']:.3f} vs {pb['mean']:.3f}")
            lines += [f"  seed {a['seed']} fold {a['fold']}: tile AUC {a['val_auc']:.3f} (tuning set, epoch "
                      f"{a['best_epoch']:.0f}) vs {b['val_auc']:.3f} (held-out fold, epoch {b['best_epoch']:.0f}); "
                      f"patient AUC {a['val_patient_auc']:.3f} vs {b['val_patient_auc']:.3f}"
                      for a, b in zip(tuned, held_out)]
        if "archs" in sections:
            shards, splits, info = make_cohort(work, 12, seeds[0], 3)
            base = histogram_baseline(shards, splits, 3)
            base_auc = statistics.fmean(r["val_auc"] for r in base)
            results = {}
            for arch in archs:
                light = arch in ("simple_cnn", "unet_encoder")
                kw = dict(overrides)
                if not light and not args.quick:
                    kw.update(epochs=args.arch_epochs, max_train_tiles=args.arch_max_train_tiles)
                if arch in MIN_SIZE:
                    kw["input_size"] = MIN_SIZE[arch]
                rows = []
                for fold in range(3):
                    r = train_fold(shards, splits, fold, work / "run", arch=arch, **kw)
                    rows.append(r)
                    log(fold_line(arch, r))
                results[arch] = {"budget": kw, "folds": rows,
                                 "mean_tile_auc": statistics.fmean(r["val_auc"] for r in rows),
                                 "mean_patient_auc": statistics.fmean(r["val_patient_auc"] for r in rows),
                                 "train_seconds": sum(r["train_seconds"] for r in rows)}
                targets[f"{arch}: mean tile AUC above the colour-histogram baseline"] = bool(
                    results[arch]["mean_tile_auc"] > base_auc)
            report["archs"] = {"cohort": info, "baseline_colour_histogram": base, "baseline_mean_tile_auc": base_auc,
                               "baseline_mean_patient_auc": statistics.fmean(r["val_patient_auc"] for r in base),
                               "architectures": results}
            lines.append(f"every architecture, 12 patients seed {seeds[0]}, 3 folds (mean held-out tile AUC / "
                         "patient AUC, training seconds):")
            lines.append(f"  {'colour histogram + logistic regression':<40} {base_auc:.3f} / "
                         f"{report['archs']['baseline_mean_patient_auc']:.3f}")
            for arch, r in results.items():
                lines.append(f"  {arch:<40} {r['mean_tile_auc']:.3f} / {r['mean_patient_auc']:.3f}  "
                             f"({r['train_seconds']:.0f} s; budget {r['budget'] or 'defaults'})")
        if "decisions" in sections:
            big = decision_section(work, decision_seeds, 12, 3, configs, overrides)
            small = decision_section(work, decision_small_seeds, 8, 2, configs, overrides)
            report["decisions"] = {"12_patients": big, "8_patients": small}
            for name, c in big["by_config"].items():
                if not big["points"]:
                    continue  # no 12-patient seeds asked for: no target to judge
                for level in ("slide", "patient"):
                    acc = c[f"val_{level}_accuracy"]
                    targets[f"decisions, 12 patients, {name}: median {level} accuracy >= 0.95"] = bool(
                        acc["median"] >= 0.95)
                    targets[f"decisions, 12 patients, {name}: worst {level} accuracy >= 0.85"] = bool(
                        acc["worst"] >= 0.85)
            lines.append(f"decisions at the runs' own thresholds, 12 patients x 3 folds, seeds {decision_seeds} "
                         "(each fold's held-out 4 patients; today's rule in brackets):")
            lines += decision_summary_lines(big)
            lines.append(f"decisions, 8 patients x 2 folds, seeds {decision_small_seeds}:")
            lines += decision_summary_lines(small)
            lines += [decision_line(r) for r in big["points"] + small["points"]]
        if "demo" in sections and not args.quick:
            runs = demo_runs(work, demo_seeds, args.demo_extra_jobs or None)
            report["demo"] = runs
            targets["demo: both heat-map slides called right in every run"] = all(
                len(r["calls"]) == 2 and all(c["called"] == c["diagnosis"] for c in r["calls"]) for r in runs)
            lines.append("the demo (its heat-map slides' calls):")
            lines += [f"  seed {r['seed']}, {r['threads_per_point']} thread(s) a point: " + "; ".join(
                f"{c['slide']} ({c['diagnosis']}) called {c['called']}, score {c['score']:.3f} ({c['aggregation']}) "
                f"at threshold {c['threshold']:.3f}" for c in r["calls"]) + f"; {r['held_out']} ({r['seconds']:.0f} s)"
                for r in runs]
    report.update(targets=targets, seconds=time.perf_counter() - t_start, loadavg_end=list(os.getloadavg()))
    path = write_report(args.out, "bench_learning", report)
    print("bench_learning: train's defaults on fresh synthetic cohorts (64-px tiles at 1 um/px, 2048-px slides)")
    for line in lines:
        print(line)
    return conclude(targets, path, report["seconds"])


if __name__ == "__main__":
    raise SystemExit(main())
