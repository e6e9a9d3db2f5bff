"""The synthetic cohort on disk: one pyramidal TIFF and one QuPath GeoJSON per slide, and ``cohort.csv``."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shapely.geometry import Polygon

from python_task.errors import TaskError
from python_task.fileio import write_csv_atomic, write_json_atomic
from python_task.synth.config import CLASS_COLORS, SynthConfig, plan_cohort
from python_task.synth.render import render_spec
from python_task.synth.tiff import write_array_tiff
from python_task.wsi.cohort import COHORT_COLUMNS

log = logging.getLogger(__name__)


def generate_cohort(out: str | Path, cfg: SynthConfig | None = None) -> Path:
    """Write ``out/slides/*.tiff``, ``out/annotations/*.geojson`` and ``out/cohort.csv``; return the CSV path.

    Every file appears under its final name only once complete; ``cohort.csv`` is written last, so a cohort
    whose CSV exists is whole.
    """
    out = Path(out)
    cfg = cfg or SynthConfig()
    specs = plan_cohort(cfg)
    try:
        (out / "slides").mkdir(parents=True, exist_ok=True)
        (out / "annotations").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TaskError(out, f"cannot create the output folder: {exc.strerror or exc}") from None
    rows = []
    for spec in specs:
        rgb, regions = render_spec(spec)
        slide_rel = f"slides/{spec.slide_id}.tiff"
        ann_rel = f"annotations/{spec.slide_id}.geojson"
        try:
            write_array_tiff(out / slide_rel, rgb, spec.mpp, tile_size=cfg.tile_size, quality=cfg.quality)
            write_json_atomic(out / ann_rel, regions_to_geojson(regions, spec.slide_id))
        except OSError as exc:
            cause = f"cannot write the synthetic cohort: {exc.strerror or exc}"
            raise TaskError(exc.filename or out, cause) from None
        rows.append({"slide_id": spec.slide_id, "patient_id": spec.patient_id, "slide_path": slide_rel,
                     "annotation_path": ann_rel, "diagnosis": spec.diagnosis})
        log.debug("synth: %s (%s, %d regions)", spec.slide_id, spec.diagnosis, len(regions))
    cohort_csv = out / "cohort.csv"
    write_csv_atomic(cohort_csv, rows, COHORT_COLUMNS)
    return cohort_csv


def regions_to_geojson(regions: Sequence[tuple[str, Polygon]], slide_id: str = "") -> dict[str, Any]:
    """QuPath-style GeoJSON FeatureCollection of annotation polygons (level-0 px, closed rings)."""
    features = []
    for i, (class_name, polygon) in enumerate(regions):
        rings = [_ring(polygon.exterior.coords)] + [_ring(r.coords) for r in polygon.interiors]
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"python_task-synth/{slide_id}/{i}")),
            "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": {
                "objectType": "annotation",
                "classification": {"name": class_name, "color": list(CLASS_COLORS.get(class_name, (255, 0, 0)))},
                "isLocked": False,
            },
        })
    return {"type": "FeatureCollection", "features": features}


def _ring(coords: Sequence[Sequence[float]]) -> list[list[float]]:
    ring = [[round(float(x), 2), round(float(y), 2)] for x, y in coords]
    if ring[0] != ring[-1]:
        ring.append(list(ring[0]))
    return ring
