"""``predict``: a trained model over a whole slide -> a heat-map of the probability of malignancy.

The model's ``config.json`` (written by ``train`` beside ``model.keras``) fixes the tile size, µm/px, stain
normalisation and decision threshold, so inference sees tiles exactly as training did. Tiles are planned on the
same origin-anchored grid as ``extract`` (every tissue tile, or only those inside ``annotations``), read in
row order by a background thread while the model scores the previous batch, so memory is bounded by a few
batches whatever the slide size.

Outputs in ``out``: ``heatmap.png`` (the slide beside the probability map over its tissue in grey, colour bar,
annotation outlines by class; see :mod:`python_task.inference.heatmap`),
``probabilities.npy`` (float32 grid, NaN where no tile; its geometry is in ``slide.json``), ``tiles.geojson``
(one QuPath detection per tile with a ``malignant_probability`` measurement: QuPath's measurement maps show it)
and ``slide.json`` (slide score, predicted diagnosis, tile counts, per-region and per-class means).

The four outputs of one slide appear together or not at all (:func:`~python_task.fileio.atomic_paths`): they are
written under temporary names and renamed only once all four are complete, ``slide.json`` last, so a predict
killed part-way leaves the folder's previous outputs as they were (and hidden temporaries, deleted by the next
run). One folder holds one slide: a folder whose ``slide.json`` names another slide is refused before any work
(:func:`refuse_another_slide`), since a second slide sent to the same ``--out`` is far more often a mistyped
folder than a wish to lose the first slide's heat-map; predicting the same slide again replaces its outputs.
"""

from __future__ import annotations

import json
import math
import os
import queue
import sys
import threading
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from python_task.errors import ConfigError, SlideError, TaskError
from python_task.fileio import (
    atomic_paths,
    dumps_strict,
    folder_lock,
    remove_stale_temporaries,
)
from python_task.inference.heatmap import draw_heatmap, format_probability
from python_task.shards.params import ExtractParams
from python_task.training.calibration import Calibration
from python_task.training.checkpoints import load_model
from python_task.training.metrics import AGGREGATIONS, TileLayout, aggregate_tiles
from python_task.training.scoring import predict_padded
from python_task.transforms.stain import read_normalizer
from python_task.wsi.annotations import Region, place_regions, read_annotations
from python_task.wsi.labels import DEFAULT_CLASSES
from python_task.wsi.slides import Slide, TileReader, open_slide, thumbnail
from python_task.wsi.tiling import GridPlan, plan_grid

PROBABILITY_KEY = "malignant_probability"
TILING = ExtractParams()  # tissue and coverage thresholds, grid and reader default to extract's
DEFAULT_THRESHOLD = 0.5  # for a model whose run recorded no usable threshold
HEATMAP_SIZE = 2048  # longer side of the thumbnail under the heat-map, px
TILE_CLASS_COLORS = ((64, 160, 64), (200, 40, 40))  # tiles.geojson classes in QuPath: benign green, malignant red
SUMMARY_NAME = "slide.json"  # written last: it names the slide the folder's outputs belong to
OUTPUT_NAMES = ("probabilities.npy", "tiles.geojson", "heatmap.png", SUMMARY_NAME)  # the summary last


@dataclass(frozen=True)
class ModelBundle:
    """A trained model and the settings it was trained with."""

    model: Any
    tile_size: int
    mpp: float
    threshold: float
    label_names: tuple[str, ...]
    normalizer: Any
    source: Path
    aggregation: str = "mean"  # tiles -> slide score, the run's (config.json), mean for a run that recorded none
    calibration: Calibration = Calibration()  # the run's calibration of tile probabilities (identity when none)


def load_bundle(model_path: str | os.PathLike[str]) -> ModelBundle:
    """``model.keras`` and its ``config.json`` (and ``stain.json`` when training normalised stains)."""
    path = Path(model_path)
    if path.is_dir():
        path = path / "model.keras"
    if not path.exists():
        raise TaskError(path, "model not found")
    if not path.is_file() or not zipfile.is_zipfile(path):
        raise TaskError(path, "not a Keras model: give the model.keras (a .keras zip archive) that train writes")
    config_path = path.parent / "config.json"
    if not config_path.exists():
        raise TaskError(config_path, "missing: predict needs the config.json that train writes beside the model")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        resolved = config["resolved"]
        tile_size, mpp = int(resolved["tile_size"]), float(resolved["mpp"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise TaskError(config_path, f"not a train config.json ({exc})") from None
    threshold = _training_threshold(path.parent, resolved)
    aggregation = str(resolved.get("aggregation", config.get("aggregation", "mean")))
    if aggregation not in AGGREGATIONS:
        raise TaskError(config_path, f"unknown aggregation {aggregation!r}; this version knows "
                        f"{', '.join(AGGREGATIONS)}")
    try:
        calibration = Calibration.from_json(resolved.get("calibration"))
    except (AttributeError, TypeError, ValueError) as exc:
        raise TaskError(config_path, f"unreadable calibration ({exc})") from None
    normalizer = None
    if resolved.get("stain_file"):
        normalizer = read_normalizer(path.parent / resolved["stain_file"])
    try:
        model = load_model(path, compile=False)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad model file for the user
        raise TaskError(path, f"cannot load the model ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") \
            from None
    return ModelBundle(model, tile_size, mpp, threshold, tuple(resolved.get("label_names", DEFAULT_CLASSES)),
                       normalizer, path, aggregation, calibration)


def _training_threshold(folder: Path, resolved: dict[str, Any]) -> float:
    value = resolved.get("threshold")
    if value is None and (folder / "metrics.json").exists():
        value = json.loads((folder / "metrics.json").read_text(encoding="utf-8")).get("threshold")
    try:
        value = float(value)
    except (TypeError, ValueError):
        return DEFAULT_THRESHOLD
    return value if math.isfinite(value) else DEFAULT_THRESHOLD


def _batches(reader: TileReader, coords: np.ndarray, batch_size: int, normalizer) -> Iterator[tuple[int, np.ndarray]]:
    """Read tiles in a background thread, ``batch_size`` at a time, at most two batches ahead."""
    q: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def produce() -> None:
        try:
            T = reader.tile_size
            for start in range(0, len(coords), batch_size):
                if stop.is_set():
                    return
                chunk = coords[start:start + batch_size]
                batch = np.empty((len(chunk), T, T, 3), np.uint8)
                for k, (x, y) in enumerate(chunk):
                    batch[k] = reader.read(int(x), int(y))
                if normalizer is not None:
                    batch, _ = normalizer.transform(batch)
                q.put((start, batch))
            q.put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put(exc)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)


def score_tiles(bundle: ModelBundle, reader: TileReader, coords: np.ndarray, *, batch_size: int = 64,
                progress: bool = True) -> np.ndarray:
    """Calibrated probabilities (the run's calibration) for the tiles at ``coords``, read and normalised in a
    background thread."""
    probs = np.empty(len(coords), np.float32)
    bar = tqdm(total=len(coords), unit="tile", desc="predict", disable=None if progress else True, file=sys.stderr)
    for start, batch in _batches(reader, coords, batch_size, bundle.normalizer):
        probs[start:start + len(batch)] = predict_padded(bundle.model, batch.astype(np.float32), batch_size)
        bar.update(len(batch))
    bar.close()
    return bundle.calibration.apply(probs).astype(np.float32)


def probability_grid(plan: GridPlan, probs: np.ndarray) -> np.ndarray:
    grid = np.full(plan.grid_shape, np.nan, np.float32)
    if len(probs):
        grid[plan.cells[:, 1], plan.cells[:, 0]] = probs
    return grid


def tiles_geojson(plan: GridPlan, probs: np.ndarray, threshold: float, label_names: Sequence[str]) -> dict:
    """One QuPath detection per tile: its box in level-0 px, a class by threshold, the probability measurement.

    Written in the one form every QuPath from 0.2 to 0.7 imports as detections with the measurement (checked by
    running each version's own reader): ``"id": "PathDetectionObject"`` (0.2 reads the type
    there and fails without an id; 0.3 and later still honour it), ``properties.objectType`` (0.4+), a
    classification with both ``colorRGB`` (how 0.2 and 0.3 serialise a class, read by every version) and
    ``color``, and measurements as a list of ``{"name", "value"}`` (0.2 and 0.3 read only that form; 0.4+ read
    it too)."""
    negative, positive = label_names[0], label_names[-1]
    colors = {negative: TILE_CLASS_COLORS[0], positive: TILE_CLASS_COLORS[1]}
    features = []
    e = plan.extent
    for (x, y), p in zip(plan.coords.tolist(), probs.tolist()):
        x1, y1 = round(x + e, 2), round(y + e, 2)
        name = positive if p >= threshold else negative
        features.append({"type": "Feature", "id": "PathDetectionObject", "geometry": {"type": "Polygon", "coordinates": [
            [[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]]}, "properties": {
            "objectType": "detection",
            "classification": {"name": name, "color": list(colors[name]), "colorRGB": _packed_rgb(colors[name])},
            "measurements": [{"name": PROBABILITY_KEY, "value": round(float(p), 6)}]}})
    return {"type": "FeatureCollection", "features": features}


def _packed_rgb(rgb: Sequence[int]) -> int:
    """QuPath's colour int: opaque ARGB as a signed 32-bit Java int."""
    return (0xFF000000 | (rgb[0] << 16) | (rgb[1] << 8) | rgb[2]) - (1 << 32)


def slide_summary(plan: GridPlan, probs: np.ndarray, bundle: ModelBundle, slide: Slide, reader: TileReader,
                  regions: Sequence[Region] | None) -> dict[str, Any]:
    threshold = bundle.threshold
    score = aggregate_tiles(probs, bundle.aggregation, TileLayout(plan.coords, plan.extent))
    summary: dict[str, Any] = {
        "slide_path": str(slide.path), "model": str(bundle.source), "slide_score": score,
        "aggregation": bundle.aggregation, "calibration": bundle.calibration.method,
        "fraction_malignant_tiles": float(np.mean(probs >= threshold)) if len(probs) else float("nan"),
        "threshold": threshold,
        "predicted_diagnosis": (bundle.label_names[-1] if score >= threshold else bundle.label_names[0])
        if len(probs) else "unknown",
        "n_tiles": int(len(probs)), "n_tiles_malignant": int(np.sum(probs >= threshold)),
        "tile_size": reader.tile_size, "mpp": reader.mpp, "level": reader.level, "downsample": reader.downsample,
        "grid": {"origin": [0, 0], "step": plan.step, "tile_extent": plan.extent, "shape": list(plan.grid_shape),
                 "note": "probabilities.npy[row, col] is the tile whose level-0 top-left corner is "
                         "(col * step, row * step); it covers tile_extent level-0 px"},
        "slide_dimensions": list(slide.dimensions), "slide_mpp": slide.mpp,
    }
    if regions:
        per_region, per_class = [], {}
        for r in regions:
            sel = plan.region == r.index
            mean = float(np.mean(probs[sel])) if sel.any() else float("nan")
            per_region.append({"index": r.index, "class": r.class_name, "n_tiles": int(sel.sum()),
                               "mean_probability": mean})
            per_class.setdefault(r.class_name, []).append(probs[sel])
        summary["regions"] = per_region
        summary["classes"] = {c: {"n_tiles": int(sum(len(a) for a in arrs)),
                                  "mean_probability": float(np.mean(np.concatenate(arrs)))
                                  if sum(len(a) for a in arrs) else float("nan")} for c, arrs in per_class.items()}
    return summary


def predict_slide(model_path: str | os.PathLike[str], slide_path: str | os.PathLike[str],
                  out_dir: str | os.PathLike[str], *, annotations: str | os.PathLike[str] | None = None,
                  slide_mpp: float | None = None, batch_size: int = 64, min_tissue: float = TILING.min_tissue,
                  min_coverage: float = TILING.min_coverage, stride: int | None = TILING.stride,
                  offset: tuple[float, float] = TILING.offset, reader_name: str = TILING.reader,
                  progress: bool = True) -> dict[str, Any]:
    """Score every tissue tile (or every annotated tile) of a slide and write the four outputs."""
    if batch_size < 1:
        raise ConfigError("batch_size", f"must be at least 1, got {batch_size}")
    t0 = time.perf_counter()
    bundle = load_bundle(model_path)
    out = Path(out_dir)
    with folder_lock(out, "predict"):
        remove_stale_temporaries(out)
        refuse_another_slide(out, slide_path)
        return _predict(bundle, slide_path, out, annotations, slide_mpp, batch_size, min_tissue, min_coverage,
                        stride, offset, reader_name, progress, t0)


def refuse_another_slide(out: Path, slide_path: str | os.PathLike[str]) -> None:
    """A :class:`TaskError` naming ``out`` when it holds the outputs of another slide than ``slide_path`` (its
    ``slide.json`` says which), or a ``slide.json`` that predict did not write; nothing when it holds none, or
    this slide's (replaced by the new run)."""
    summary_path = out / SUMMARY_NAME
    if not summary_path.exists():
        return
    try:
        previous = json.loads(summary_path.read_text(encoding="utf-8"))["slide_path"]
        previous = os.fspath(previous)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise TaskError(summary_path, f"not a predict summary ({type(exc).__name__}): this folder holds other "
                                      "outputs; choose another `out`") from None
    if Path(previous).resolve() != Path(slide_path).resolve():
        raise TaskError(out, f"holds the predictions of another slide ({previous}): choose another `out` (one "
                             "folder per slide), or remove the folder to replace them")


def _predict(bundle: ModelBundle, slide_path: str | os.PathLike[str], out: Path,
             annotations: str | os.PathLike[str] | None, slide_mpp: float | None, batch_size: int, min_tissue: float,
             min_coverage: float, stride: int | None, offset: tuple[float, float], reader_name: str, progress: bool,
             t0: float) -> dict[str, Any]:
    regions = None
    with open_slide(slide_path, mpp=slide_mpp, reader=reader_name) as slide:
        if annotations is not None:
            regions = place_regions(read_annotations(annotations), *slide.dimensions, offset=offset,
                                    path=annotations)
        reader = TileReader(slide, bundle.mpp, bundle.tile_size)
        plan = plan_grid(reader, regions=regions, min_tissue=min_tissue, min_coverage=min_coverage, stride=stride,
                         tissue_mpp=TILING.tissue_mpp)
        if len(plan.coords) == 0:
            where = "inside the annotations" if regions else "on the slide"
            raise SlideError(slide_path, f"no tissue tile {where} (min tissue {min_tissue}); nothing to predict")
        probs = score_tiles(bundle, reader, plan.coords, batch_size=batch_size, progress=progress)
        grid = probability_grid(plan, probs)
        summary = slide_summary(plan, probs, bundle, slide, reader, regions)
        summary["seconds"] = time.perf_counter() - t0
        summary["tiles_per_second"] = len(probs) / summary["seconds"]
        title = (f"{Path(slide_path).name}: slide score {format_probability(summary['slide_score'])} -> "
                 f"{summary['predicted_diagnosis']} (threshold {format_probability(bundle.threshold)})")
        with atomic_paths([out / name for name in OUTPUT_NAMES]) as (npy, geojson, png, summary_tmp):
            with open(npy, "wb") as fh:
                np.save(fh, grid)
            geojson.write_text(dumps_strict(tiles_geojson(plan, probs, bundle.threshold, bundle.label_names)) + "\n",
                               encoding="utf-8")
            thumb, ds = thumbnail(slide, HEATMAP_SIZE)
            draw_heatmap(png, thumb, ds, grid, plan.step, regions, title, bundle.threshold)
            summary_tmp.write_text(dumps_strict(summary, indent=2) + "\n", encoding="utf-8")
    return summary
