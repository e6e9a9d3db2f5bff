"""Benchmark what the CNNs learn: patient-level AUC over a full K-fold split, beside a colour-histogram baseline.

    python benchmarks/bench_learning.py [--patients 15] [--folds 3] [--archs simple_cnn,unet_encoder,mobilenet_v2]
                                        [--stain-compare] [--out bench_out] [--quick]

Generates a synthetic cohort with strong per-slide stain variation (``stain_variation`` 2.0), cuts it into tiles
of 128 px at 1.0 µm/px, makes a patient-level K-fold split (``make_splits``) and, for every architecture and fold,
runs ``train`` (input resized to 64 px inside the model, lr 2e-3, batch 32, no augmentation and no stain
normalisation by default: the fastest setting that reaches the target here; ``--stain-compare`` measures the
other three: mean patient AUC 0.83-0.89 here, a fold now and then stalling at its first epoch), early stopping with
patience 8 and the best epoch chosen on validation AUC, as ``train`` does; the validation AUC of the first epochs is
meaningless while the batch-norm moving statistics settle, hence the long patience). ``simple_cnn`` trains for
up to 15 epochs on all training tiles; the other architectures, which train at a few dozen tiles/s on 2 CPU cores,
get ``--heavy-epochs`` (3) on ``--heavy-max-train-tiles`` (512) so that the default run stays near 10 minutes:
they are under-trained there, raise both for a fair comparison. The patient-level AUC (mean tile probability per
patient, as ``train``'s ``val_patient_auc``) is averaged over the folds; the AUC with each patient scored by the
mean of its top 10 % tiles is reported beside it (malignant patients also have benign regions, which dilute the
mean).

Baseline, on the same folds: logistic regression on per-tile colour histograms (8 bins per RGB channel, the
feature of the synthetic cohort's own "colour is not enough" test), trained on the training tiles of the fold,
patient AUC from the mean tile probability.

Targets: best CNN mean patient AUC >= 0.95 while the baseline stays < 0.75.

``--stain-compare`` also trains ``simple_cnn`` without / with Macenko normalisation and without / with
flip,rot90,elastic,hed augmentation (four configurations, same folds) and reports their patient AUC (issue 4).

Note: the best epoch is chosen on the validation fold, which is also the fold the AUC is measured on (as in a
``train`` run); with few patients per fold the patient AUC moves in steps of 1 / (benign x malignant patients).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import conclude, scratch_folder, write_report  # noqa: E402

COMPARE_AUGMENT = "flip,rot90,elastic,hed"  # the combination of the input benchmark, in the reader threads on a CPU
COMPARE = (("none", "none"), ("none", "macenko"), (COMPARE_AUGMENT, "none"), (COMPARE_AUGMENT, "macenko"))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_data(work: Path, args) -> tuple[Path, Path, dict]:
    from python_task.data.splits import make_splits, write_splits
    from python_task.shards.extract import extract_cohort
    from python_task.shards.params import ExtractParams
    from python_task.synth.cohort import generate_cohort
    from python_task.synth.config import SynthConfig
    from python_task.wsi.cohort import read_cohort

    t0 = time.perf_counter()
    cohort = generate_cohort(work / "cohort", SynthConfig(patients=args.patients, seed=args.seed,
                                                          slide_size=args.slide_size,
                                                          stain_variation=args.stain_variation))
    synth_s = time.perf_counter() - t0
    shards = work / "shards"
    t0 = time.perf_counter()
    report = extract_cohort(read_cohort(cohort), shards, ExtractParams(tile_size=args.tile_size, mpp=args.mpp),
                            workers=2, progress=False)
    if not report.ok:
        raise RuntimeError(f"extract failed: {[r.message for r in report.failed]}")
    extract_s = time.perf_counter() - t0
    splits = make_splits(shards, args.folds, seed=args.seed)
    path = work / "splits.json"
    write_splits(splits, path)
    return shards, path, {"synth_seconds": synth_s, "extract_seconds": extract_s, "tiles": report.n_tiles}


def fold_slides(shards: Path, splits: Path, fold: int) -> tuple[list[str], list[str]]:
    """Training and validation slide ids of ``fold``, checked as ``train`` checks them."""
    from python_task.data.splits import load_fold

    f = load_fold(splits, shards, fold)
    return list(f.train_slides), list(f.val_slides)


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
    parts = []
    for start in range(0, len(index), 512):
        parts.append(colour_features(fetcher.fetch(np.arange(start, min(start + 512, len(index))))))
    return np.concatenate(parts)


def histogram_baseline(shards: Path, splits: Path, folds: int) -> list[dict]:
    """Per fold: logistic regression on colour histograms of the training tiles, AUCs on the validation tiles."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from python_task.data.dataset import build_index
    from python_task.training.metrics import auc, group_auc

    out = []
    for fold in range(folds):
        train_ids, val_ids = fold_slides(shards, splits, fold)
        tr, va = build_index(shards, train_ids), build_index(shards, val_ids)
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
        clf.fit(index_features(tr), tr.labels)
        prob = clf.predict_proba(index_features(va))[:, 1]
        out.append({"fold": fold, "val_auc": float(auc(va.labels, prob)),
                    "val_slide_auc": float(group_auc(va.labels, prob, va.slide_ids)),
                    "val_patient_auc": float(group_auc(va.labels, prob, va.patient_ids)),
                    "val_patient_auc_top10": float(group_auc(va.labels, prob, va.patient_ids, how="top10")),
                    "n_train_tiles": len(tr), "n_val_tiles": len(va)})
    return out


def run_config(shards: Path, splits: Path, work: Path, args, name: str, arch: str, augment: str,
               stain: str) -> list[dict]:
    """``train`` on every fold; the metrics that matter here, per fold."""
    import keras

    from python_task.training.config import TrainConfig
    from python_task.training.loop import train

    rows = []
    for fold in range(args.folds):
        keras.backend.clear_session()
        base = args.unet_filters if arch == "unet_encoder" else 32
        light = arch == "simple_cnn"
        cfg = TrainConfig(shards=shards, splits=splits, fold=fold, arch=arch, out=work / "runs" / f"run{fold}",
                          lr=args.lr, batch_size=args.batch_size, epochs=args.epochs if light else args.heavy_epochs,
                          augment=augment, stain=stain, seed=args.seed, input_size=args.input_size,
                          max_train_tiles=args.max_train_tiles if light else args.heavy_max_train_tiles,
                          max_val_tiles=args.max_val_tiles, patience=args.patience, workers=2, verbose=False,
                          tensorboard=False, base_filters=base)
        shutil.rmtree(cfg.out, ignore_errors=True)
        m = train(cfg)
        row = {"fold": fold, **{k: float(m[k]) for k in ("val_patient_auc", "val_slide_auc", "val_auc",
                                                       "val_balanced_accuracy", "train_seconds", "epochs_run",
                                                       "best_epoch", "n_train_tiles", "n_val_tiles", "n_params")}}
        row["val_patient_auc_top10"] = top10_patient_auc(cfg.out / "predictions.csv")
        rows.append(row)
        log(f"  {name:<34} fold {fold}: patient AUC {row['val_patient_auc']:.3f}, tile AUC {row['val_auc']:.3f}, "
            f"best epoch {row['best_epoch']:.0f}/{row['epochs_run']:.0f}, {row['train_seconds']:.0f} s")
        shutil.rmtree(cfg.out, ignore_errors=True)
    return rows


def top10_patient_auc(predictions: Path) -> float:
    """Patient AUC from the validation predictions of a run, each patient scored by the mean of its top 10 %
    tiles (malignant patients also have benign regions, which dilute the mean)."""
    import csv

    from python_task.training.metrics import group_auc

    with open(predictions, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return float(group_auc(np.array([int(r["label"]) for r in rows]), np.array([float(r["prob"]) for r in rows]),
                           np.array([r["patient_id"] for r in rows]), how="top10"))


def _nanmean(values: list[float]) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan


def summarise(rows: list[dict]) -> dict:
    pa = [r["val_patient_auc"] for r in rows]
    return {"mean_patient_auc": _nanmean(pa),
            "mean_patient_auc_top10": _nanmean([r["val_patient_auc_top10"] for r in rows]),
            "min_patient_auc": float(np.nanmin(pa)) if np.isfinite(pa).any() else math.nan,
            "mean_tile_auc": float(np.nanmean([r["val_auc"] for r in rows])),
            "train_seconds": float(sum(r.get("train_seconds", 0.0) for r in rows)), "folds": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=15, help="patients of the synthetic cohort (default 15)")
    ap.add_argument("--slide-size", type=int, default=3072, help="synthetic slide size in px at 0.5 µm/px")
    ap.add_argument("--stain-variation", type=float, default=2.0, help="per-slide stain variation (default 2.0)")
    ap.add_argument("--tile-size", type=int, default=128, help="tile size in px (default 128)")
    ap.add_argument("--mpp", type=float, default=1.0, help="tile resolution in µm/px (default 1.0)")
    ap.add_argument("--input-size", type=int, default=64, help="model input size, resized in the model (64)")
    ap.add_argument("--folds", type=int, default=3, help="patient-level folds (default 3)")
    ap.add_argument("--archs", default="simple_cnn,unet_encoder,mobilenet_v2", help="comma-separated architectures")
    ap.add_argument("--epochs", type=int, default=15, help="maximum epochs of simple_cnn (default 15)")
    ap.add_argument("--patience", type=int, default=8, help="early-stopping patience in epochs (default 8)")
    ap.add_argument("--heavy-epochs", type=int, default=3,
                    help="maximum epochs of every other architecture (default 3: they train at a few dozen "
                         "tiles/s on 2 cores; raise it, e.g. to 15, for a fair comparison)")
    ap.add_argument("--heavy-max-train-tiles", type=int, default=512,
                    help="training tiles per fold for the other architectures (default 512; 0 = all)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--augment", default="none", help="augmentation for the architecture runs (none)")
    ap.add_argument("--stain", default="none", help="stain normalisation for the architecture runs (none)")
    ap.add_argument("--unet-filters", type=int, default=16, help="base filters of unet_encoder (default 16)")
    ap.add_argument("--max-train-tiles", type=int, default=0, help="cap on training tiles per fold (0 = all)")
    ap.add_argument("--max-val-tiles", type=int, default=0, help="cap on validation tiles per fold (0 = all)")
    ap.add_argument("--stain-compare", action="store_true",
                    help="also run simple_cnn with / without macenko and with / without flip,rot90,hed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench_out"), help="where the JSON report goes")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--quick", action="store_true", help="small and fast (tests): 6 patients, 2 folds, simple_cnn, "
                    "1 epoch, at most 256 tiles per set")
    args = ap.parse_args()
    if args.quick:
        args.patients, args.slide_size, args.folds, args.archs = 6, 2048, 2, "simple_cnn"
        args.epochs, args.heavy_epochs, args.patience = 1, 1, 0
        args.max_train_tiles = args.heavy_max_train_tiles = args.max_val_tiles = 256
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]

    load_start = os.getloadavg()
    t_start = time.perf_counter()
    with scratch_folder("bench_learning_", keep=args.keep) as work:
        shards, splits, data = build_data(work, args)
        log(f"cohort: {args.patients} patients, {data['tiles']} tiles of {args.tile_size} px at {args.mpp} µm/px, "
            f"{args.folds} folds (synth {data['synth_seconds']:.0f} s, extract {data['extract_seconds']:.0f} s)")
        baseline = summarise(histogram_baseline(shards, splits, args.folds))
        log(f"  colour-histogram baseline: patient AUC {baseline['mean_patient_auc']:.3f}")
        results = {}
        for arch in archs:
            name = f"{arch} augment={args.augment} stain={args.stain}"
            results[arch] = summarise(run_config(shards, splits, work, args, name, arch, args.augment, args.stain))
        compare = {}
        if args.stain_compare:
            for augment, stain in COMPARE:
                key = f"augment={augment} stain={stain}"
                if "simple_cnn" in results and (augment, stain) == (args.augment, args.stain):
                    compare[key] = results["simple_cnn"]
                else:
                    compare[key] = summarise(run_config(shards, splits, work, args, f"simple_cnn {key}",
                                                        "simple_cnn", augment, stain))
        best_arch = max(results, key=lambda a: -1 if math.isnan(results[a]["mean_patient_auc"])
                        else results[a]["mean_patient_auc"]) if results else None
        best = results[best_arch]["mean_patient_auc"] if best_arch else math.nan
        base_auc = baseline["mean_patient_auc"]
        splits_data = json.loads(splits.read_text())
        report = {
            "cohort": {"patients": args.patients, "slide_size": args.slide_size,
                       "stain_variation": args.stain_variation, "seed": args.seed, **data},
            "tiles": {"tile_size": args.tile_size, "mpp": args.mpp, "input_size": args.input_size},
            "folds": args.folds,
            "fold_patients": [f["val_patients"] for f in splits_data["folds"]],
            "training": {"epochs": args.epochs, "patience": args.patience, "lr": args.lr,
                         "heavy_epochs": args.heavy_epochs, "heavy_max_train_tiles": args.heavy_max_train_tiles,
                         "batch_size": args.batch_size, "augment": args.augment, "stain": args.stain,
                         "unet_filters": args.unet_filters, "max_train_tiles": args.max_train_tiles,
                         "max_val_tiles": args.max_val_tiles},
            "quick": args.quick,
            "architectures": results, "baseline_colour_histogram": baseline,
            "patient_auc": {**{a: r["mean_patient_auc"] for a, r in results.items()}, "colour_histogram": base_auc},
            "train_seconds": {a: r["train_seconds"] for a, r in results.items()},
            "best_arch": best_arch, "best_cnn_patient_auc": best, "baseline_patient_auc": base_auc,
            "patient_auc_top10": {**{a: r["mean_patient_auc_top10"] for a, r in results.items()},
                                  "colour_histogram": baseline["mean_patient_auc_top10"]},
            "stain_compare": {k: {"mean_patient_auc": v["mean_patient_auc"],
                                  "mean_patient_auc_top10": v["mean_patient_auc_top10"],
                                  "mean_tile_auc": v["mean_tile_auc"],
                                  "train_seconds": v["train_seconds"], "folds": v["folds"]}
                              for k, v in compare.items()} if args.stain_compare else None,
            "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
            "seconds": time.perf_counter() - t_start,
        }
        targets = {"best CNN patient AUC >= 0.95": bool(best >= 0.95),
                   "colour-histogram baseline patient AUC < 0.75": bool(base_auc < 0.75)}
        report["targets"] = targets
        path = write_report(args.out, "bench_learning", report)

        print(f"bench_learning: {args.patients} synthetic patients (stain variation {args.stain_variation}), "
              f"{data['tiles']} tiles of {args.tile_size} px at {args.mpp} um/px -> {args.input_size} px input, "
              f"{args.folds} patient-level folds; augment={args.augment} stain={args.stain}")
        head = f"  {'':<46} {'patient AUC mean / min':>17} {'top10':>6} {'tile AUC':>9} {'train s':>8}"
        print(head)

        def line(label: str, r: dict) -> None:
            print(f"  {label:<46} {r['mean_patient_auc']:>9.3f} / {r['min_patient_auc']:.3f} "
                  f"{r['mean_patient_auc_top10']:>6.3f} {r['mean_tile_auc']:>9.3f} {r['train_seconds']:>8.0f}")

        for a, r in results.items():
            line(a, r)
        line("colour histogram + logistic regression", {**baseline, "train_seconds": math.nan})
        if compare:
            print("  simple_cnn, stain normalisation / augmentation:")
            for k, r in compare.items():
                line(k, r)
        return conclude(targets, path, report["seconds"])


if __name__ == "__main__":
    raise SystemExit(main())
