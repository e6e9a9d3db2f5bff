"""``demo``: the whole chain on the embedded default, a synthetic cohort, in a few minutes on a laptop.

synth (12 patients, 6 of each diagnosis) -> extract (64-px tiles at 1 µm/px) -> split (3 folds: every fold
validates on 2 malignant and 2 benign patients and tunes on 1 + 1 of its training patients) -> sweep (2
architectures x 2 stain choices x 3 folds, ``train``'s defaults otherwise) -> report -> predict: the best
configuration of the report (highest mean patient AUC, ties by tile AUC) drawn on two slides that its model never
saw: a malignant and a benign slide of the held-out patients of one of its folds (a malignant slide that also has
a benign region when there is one), with that fold's model. The log says how many held-out slides and patients
of that fold the model called right and, per heat-map slide, the mean probability of its malignant and of its
benign regions and the call. Every stage is resumable, so a re-run after an interruption continues
where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from python_task.data.splits import make_splits, write_splits
from python_task.errors import TaskError
from python_task.experiments.report import make_report, read_results, summarize
from python_task.experiments.sweep import run_sweep
from python_task.fileio import write_text_atomic
from python_task.inference.predict import predict_slide
from python_task.shards.extract import extract_cohort
from python_task.shards.params import ExtractParams
from python_task.synth.cohort import generate_cohort
from python_task.synth.config import MALIGNANT_CLASS, SynthConfig
from python_task.wsi.cohort import SlideJob, read_cohort

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    patients: int = 12
    slide_size: int = 2048
    seed: int = 0
    folds: int = 3
    archs: tuple[str, ...] = ("simple_cnn", "unet_encoder")
    stains: tuple[str, ...] = ("none", "macenko")
    epochs: int = 6
    input_size: int = 64
    tile_size: int = 64
    mpp: float = 1.0
    base_filters: int = 16  # 8 left simple_cnn under-trained at 6 epochs (held-out tile AUC 0.78-0.93, 12 patients)
    jobs: int = 2


def demo_plan(cfg: DemoConfig) -> dict:
    return {"shards": "shards", "splits": "splits.json",
            "factors": {"arch": list(cfg.archs), "stain": list(cfg.stains), "fold": list(range(cfg.folds))},
            "fixed": {"epochs": cfg.epochs, "input_size": cfg.input_size, "base_filters": cfg.base_filters,
                      "seed": cfg.seed}}


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
    for fold in json.loads(splits.read_text(encoding="utf-8"))["folds"]:
        if min(fold["val_diagnoses"].get(d, 0) for d in ("benign", "malignant")) < 2:
            log.warning("fold %d validates on %s patients: fewer than 2 of a diagnosis, its patient AUC says "
                        "little (use more `patients`)", fold["fold"], fold["val_diagnoses"])

    plan = out / "plan.yaml"
    write_text_atomic(plan, yaml.safe_dump(demo_plan(cfg), sort_keys=False))
    n_points = len(cfg.archs) * len(cfg.stains) * cfg.folds
    _stage(f"sweep: {n_points} training points ({plan})")
    sweep = run_sweep(plan, out / "sweep", jobs=cfg.jobs)
    outputs["results"] = sweep.results_csv

    _stage("report")
    outputs["report"] = make_report(sweep.results_csv, out / "report")

    _stage("predict: heat-maps of held-out slides with the best configuration's model")
    choice = heatmap_choice(sweep.results_csv, cohort_csv, splits)
    if choice is not None:
        point, jobs = choice
        log.info("%s", held_out_line(point))
        for job in jobs:
            target = out / "heatmaps" / job.slide_id
            if not (target / "slide.json").exists():
                predict_slide(out / "sweep" / point["out_dir"] / "model.keras", job.slide_path, target,
                              annotations=job.annotation_path, progress=False)
            log.info("%s", heatmap_line(job, point, json.loads((target / "slide.json").read_text(encoding="utf-8"))))
            outputs[f"heatmap {job.slide_id} ({job.diagnosis})"] = target / "heatmap.png"

    log.info("\ndemo finished in %.0f s. Outputs:", time.perf_counter() - t_all)
    return outputs


def best_configuration(results_csv: Path) -> list[dict]:
    """The completed points of the report's best configuration (highest mean patient AUC, ties by tile AUC), by
    fold."""
    rows = read_results(results_csv)
    summary = summarize(rows)
    best = next((r for r in summary if r["n_completed"]), None)
    if best is None:
        return []
    factors = [k for k in best if k in rows[0] and k not in ("fold", "seed", "rank")]
    points = [r for r in rows if r.get("status") == "ok" and all(r.get(f) == best[f] for f in factors)]
    return sorted(points, key=lambda r: r.get("fold", 0))


def heatmap_choice(results_csv: Path, cohort_csv: Path, splits: Path) -> tuple[dict, list[SlideJob]] | None:
    """A point of the best configuration and two slides of its held-out patients, one malignant and one benign:
    the first fold whose held-out malignant slides include one with a benign region too (so the heat-map shows
    both classes on one slide), else the first fold with both diagnoses."""
    jobs = read_cohort(cohort_csv)
    folds = {f["fold"]: f for f in json.loads(splits.read_text(encoding="utf-8"))["folds"]}
    choices = []
    for point in best_configuration(results_csv):
        held_out = set(folds[int(point["fold"])]["val_patients"])
        mine = [j for j in jobs if j.patient_id in held_out]
        malignant = sorted((j for j in mine if j.diagnosis == "malignant"),
                           key=lambda j: (not _has_benign_region(j), j.slide_id))
        benign = [j for j in mine if j.diagnosis == "benign"]
        if malignant and benign:
            choices.append((not _has_benign_region(malignant[0]), len(choices), point, [malignant[0], benign[0]]))
    if not choices:
        return None
    _, _, point, picked = min(choices, key=lambda c: (c[0], c[1]))
    return point, picked


def _has_benign_region(job: SlideJob) -> bool:
    features = json.loads(Path(job.annotation_path).read_text(encoding="utf-8"))["features"]
    return any(f["properties"]["classification"]["name"] != MALIGNANT_CLASS for f in features)


def held_out_line(point: dict) -> str:
    """How many held-out slides (and patients) of the drawn fold its model called right, from the point's
    metrics (the run's aggregation, calibration and threshold)."""
    parts = []
    for level in ("slide", "patient"):
        n, accuracy = float(point.get(f"n_val_{level}s", math.nan)), float(point.get(f"val_{level}_accuracy", math.nan))
        if math.isfinite(n) and math.isfinite(accuracy):
            parts.append(f"{round(accuracy * n)} of {int(n)} held-out {level}s")
    head = f"fold {point['fold']} of the best configuration"
    return f"{head}: {' and '.join(parts)} called right" if parts else f"{head}: no decision metrics recorded"


def heatmap_line(job: SlideJob, point: dict, summary: dict) -> str:
    """What a heat-map shows, in numbers: the mean probability of the slide's malignant and benign regions."""
    classes = summary.get("classes") or {}

    def mean(malignant: bool) -> float:
        tiles = [(c["n_tiles"], c["mean_probability"]) for name, c in classes.items()
                 if (name == MALIGNANT_CLASS) == malignant and c["n_tiles"] and c["mean_probability"] is not None]
        n = sum(t for t, _ in tiles)
        return sum(t * m for t, m in tiles) / n if n else math.nan

    parts = [f"{what} regions {value:.3f}" for what, value in (("malignant", mean(True)), ("benign", mean(False)))
             if math.isfinite(value)]
    return (f"heat-map {job.slide_id} ({job.diagnosis}, a held-out patient of fold {point['fold']}): mean probability "
            f"of {', '.join(parts)}; slide score {summary['slide_score']:.3f}, called "
            f"{summary['predicted_diagnosis']} at threshold {summary['threshold']:.3f}")
