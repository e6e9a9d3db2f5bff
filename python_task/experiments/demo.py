"""``demo``: the whole chain on the embedded default, a synthetic cohort, in a few minutes on a laptop.

synth -> extract -> split (3 folds) -> sweep (2 architectures x 2 stain choices x 3 folds) -> report -> predict
(the best configuration's model on a slide of each class). Every stage is resumable, so a re-run after an
interruption continues where it stopped.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from python_task.data.splits import make_splits, write_splits
from python_task.errors import TaskError
from python_task.experiments.report import make_report
from python_task.experiments.sweep import run_sweep
from python_task.fileio import write_text_atomic
from python_task.inference.predict import predict_slide
from python_task.shards.extract import extract_cohort
from python_task.shards.params import ExtractParams
from python_task.synth.cohort import generate_cohort
from python_task.synth.config import SynthConfig
from python_task.wsi.cohort import SlideJob, read_cohort

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    patients: int = 6
    slide_size: int = 3072
    seed: int = 0
    folds: int = 3
    archs: tuple[str, ...] = ("simple_cnn", "unet_encoder")
    stains: tuple[str, ...] = ("none", "macenko")
    epochs: int = 3
    input_size: int = 64
    tile_size: int = 128
    mpp: float = 1.0
    jobs: int = 1


def demo_plan(cfg: DemoConfig) -> dict:
    return {"shards": "shards", "splits": "splits.json",
            "factors": {"arch": list(cfg.archs), "stain": list(cfg.stains), "fold": list(range(cfg.folds))},
            "fixed": {"epochs": cfg.epochs, "input_size": cfg.input_size, "batch_size": 32, "lr": 0.001,
                      "augment": "flip,rot90", "base_filters": 8, "seed": cfg.seed, "patience": 0}}


def _stage(name: str) -> float:
    log.info("\n== %s", name)
    return time.perf_counter()


def run_demo(out_dir: str | os.PathLike[str], cfg: DemoConfig | None = None) -> dict[str, Path]:
    """Run (or resume) the whole chain under ``out_dir``; returns where each output is, by name."""
    cfg = cfg or DemoConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    outputs: dict[str, Path] = {}

    _stage(f"synth: {cfg.patients} patients")
    cohort_csv = out / "cohort" / "cohort.csv"
    if not cohort_csv.exists():
        generate_cohort(out / "cohort", SynthConfig(patients=cfg.patients, seed=cfg.seed, slide_size=cfg.slide_size))
    outputs["cohort"] = cohort_csv

    _stage(f"extract: {cfg.tile_size}-px tiles at {cfg.mpp} µm/px")
    report = extract_cohort(read_cohort(cohort_csv), out / "shards", ExtractParams(tile_size=cfg.tile_size,
                                                                                  mpp=cfg.mpp), workers=2)
    if not report.ok:
        raise TaskError(cohort_csv, f"{len(report.failed)} slide(s) failed to extract")
    outputs["shards"] = out / "shards" / "manifest.csv"

    _stage(f"split: {cfg.folds} patient-level folds")
    splits = out / "splits.json"
    if not splits.exists():
        write_splits(make_splits(out / "shards", cfg.folds, seed=cfg.seed), splits)
    outputs["splits"] = splits

    plan = out / "plan.yaml"
    write_text_atomic(plan, yaml.safe_dump(demo_plan(cfg), sort_keys=False))
    n_points = len(cfg.archs) * len(cfg.stains) * cfg.folds
    _stage(f"sweep: {n_points} training points ({plan})")
    sweep = run_sweep(plan, out / "sweep", jobs=cfg.jobs)
    outputs["results"] = sweep.results_csv

    _stage("report")
    outputs["report"] = make_report(sweep.results_csv, out / "report")

    _stage("predict: heat-maps with the best configuration's model")
    best = best_point(sweep.results_csv)
    if best is not None:
        for job in pick_slides(cohort_csv):
            target = out / "heatmaps" / job.slide_id
            if not (target / "slide.json").exists():
                predict_slide(out / "sweep" / best["out_dir"] / "model.keras", job.slide_path, target,
                              annotations=job.annotation_path, progress=False)
            outputs[f"heatmap {job.slide_id} ({job.diagnosis})"] = target / "heatmap.png"

    log.info("\ndemo finished in %.0f s. Outputs:", time.perf_counter() - t_all)
    return outputs


def best_point(results_csv: Path) -> dict | None:
    """The successful point with the highest patient-level AUC (tile AUC breaks ties)."""
    with open(results_csv, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("status") == "ok"]

    def key(r: dict) -> tuple[float, float]:
        vals = []
        for k in ("val_patient_auc", "val_auc"):
            v = float(r.get(k) or "nan")
            vals.append(v if math.isfinite(v) else -1.0)
        return vals[0], vals[1]

    return max(rows, key=key) if rows else None


def pick_slides(cohort_csv: Path) -> list[SlideJob]:
    """One slide of each diagnosis."""
    picked = {}
    for job in read_cohort(cohort_csv):
        picked.setdefault(job.diagnosis, job)
    return [picked[d] for d in sorted(picked)]
