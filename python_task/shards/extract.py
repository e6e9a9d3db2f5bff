"""``extract``: annotated slides to one labelled tile shard per slide, plus ``manifest.csv``.

Each slide is one job: open the slide, read and label its regions, plan the tile grid, read the tiles and write
the shard under a temporary name, then rename it. Finished shards are skipped on a re-run, so a killed run
resumes where it stopped. Slides run in parallel processes (``workers``); one failing slide does not stop the
others, and the failures are listed at the end (logged, one line per slide).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from python_task.errors import AnnotationError, ConfigError, ShardError, SlideError, TaskError
from python_task.shards.format import ShardWriter, read_shard_info, shard_path
from python_task.shards.manifest import MANIFEST_NAME, write_manifest
from python_task.shards.params import ExtractParams
from python_task.wsi.annotations import place_regions, read_annotations
from python_task.wsi.cohort import SlideJob
from python_task.wsi.labels import label_regions, load_label_map
from python_task.wsi.slides import TileReader, open_slide
from python_task.wsi.tiling import GridSpec, TilePlan, describe_drops, plan_tiles
from python_task.wsi.tissue import detect_tissue

log = logging.getLogger(__name__)

WRITE_BATCH = 128  # tiles read, then appended to the shard, at a time

DEFAULT_PARAMS = ExtractParams()


@dataclass
class SlideResult:
    slide_id: str
    status: str  # 'done', 'skipped' or 'failed'
    message: str
    n_tiles: int = 0
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class ExtractReport:
    results: list[SlideResult]
    manifest: Path | None

    @property
    def failed(self) -> list[SlideResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def n_tiles(self) -> int:
        return sum(r.n_tiles for r in self.results if r.status == "done")


def extract_slide(job: SlideJob, out_dir: str | os.PathLike[str], params: ExtractParams = DEFAULT_PARAMS, *,
                  progress: bool = False) -> SlideResult:
    """Cut one slide into a shard at ``out_dir/<slide_id>.h5``. Raises :class:`TaskError` on bad input."""
    start = time.perf_counter()
    label_map = load_label_map(params.labels)
    regions = read_annotations(job.annotation_path)
    with open_slide(job.slide_path, mpp=params.slide_mpp, reader=params.reader) as slide:
        width, height = slide.dimensions
        regions = place_regions(regions, width, height, offset=params.offset, path=job.annotation_path)
        labelled, skipped = label_regions(regions, label_map, ignore_unknown=params.ignore_unknown,
                                          path=job.annotation_path)
        if not labelled:
            raise AnnotationError(job.annotation_path, "no region with a class of the labels file "
                                  f"({', '.join(label_map.label_names)}); skipped: {_fmt_counts(skipped)}")
        reader = TileReader(slide, params.mpp, params.tile_size)
        grid = GridSpec.for_reader(reader, params.stride)
        tissue = detect_tissue(slide, target_mpp=params.tissue_mpp)
        plan = plan_tiles(labelled, grid, tissue, min_coverage=params.min_coverage, min_tissue=params.min_tissue,
                          n_classes=len(label_map.label_names))
        if len(plan) == 0:
            raise SlideError(job.slide_path, f"no tile kept: {plan.candidates} grid tiles touch the regions, "
                             f"dropped {describe_drops(plan)} (tissue found on {100 * tissue.mask.mean():.0f}% of the "
                             "slide; check the annotations or lower `min_coverage`/`min_tissue`)")
        attrs = {"slide_id": job.slide_id, "patient_id": job.patient_id, "slide_path": str(job.slide_path),
                 "annotation_path": str(job.annotation_path), "diagnosis": job.diagnosis,
                 "label_names": list(label_map.label_names), "mpp": reader.mpp, "level": reader.level,
                 "downsample": reader.downsample, "slide_mpp": slide.mpp, "slide_width": width,
                 "slide_height": height, "reader": slide.reader_name,
                 "params": params.shard_params(), "dropped": dict(plan.dropped)}
        write_plan(reader, plan, shard_path(out_dir, job.slide_id), params, attrs, progress=progress,
                   desc=job.slide_id)
    counts = {name: int(n) for name, n in zip(label_map.label_names, plan.counts(len(label_map.label_names)))}
    return SlideResult(job.slide_id, "done", _summary(job.slide_id, plan, counts), n_tiles=len(plan),
                       seconds=time.perf_counter() - start, counts=counts)


def write_plan(reader: TileReader, plan: TilePlan, path: Path, params: ExtractParams, attrs: dict[str, Any], *,
               progress: bool = False, desc: str = "") -> None:
    """Read the planned tiles in row order and stream them into a shard, ``WRITE_BATCH`` at a time."""
    T = params.tile_size
    buf = np.empty((WRITE_BATCH, T, T, 3), dtype=np.uint8)
    bar = tqdm(total=len(plan), desc=desc, unit="tile", disable=None if progress else True, leave=False,
               file=sys.stderr)
    with ShardWriter(path, codec=params.codec, tile_size=T, attrs=attrs, quality=params.quality) as writer:
        for start in range(0, len(plan), WRITE_BATCH):
            stop = min(start + WRITE_BATCH, len(plan))
            for k, (x, y) in enumerate(plan.coords[start:stop]):
                buf[k] = reader.read(int(x), int(y))
            sl = slice(start, stop)
            writer.append(buf[: stop - start], plan.coords[sl], plan.labels[sl], plan.roi[sl], plan.coverage[sl],
                          plan.tissue[sl])
            bar.update(stop - start)
    bar.close()


def _summary(slide_id: str, plan: TilePlan, counts: dict[str, int]) -> str:
    per_class = ", ".join(f"{name} {n}" for name, n in counts.items())
    return f"{slide_id}: {len(plan)} tiles ({per_class}); dropped {describe_drops(plan)}"


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "nothing"


def _existing_shard_status(job: SlideJob, out_dir: Path, params: ExtractParams) -> SlideResult | None:
    """A finished shard made with the same parameters means the slide is done (resume)."""
    path = shard_path(out_dir, job.slide_id)
    if not path.exists():
        return None
    info = read_shard_info(path)
    if info.params != json.loads(json.dumps(params.shard_params())):
        raise ShardError(path, "shard exists but was made with other parameters; use `overwrite` or another `out`")
    return SlideResult(job.slide_id, "skipped", f"{job.slide_id}: shard exists ({info.n_tiles} tiles), skipped",
                       n_tiles=info.n_tiles)


def _run_job(job: SlideJob, out_dir: Path, params: ExtractParams, overwrite: bool, progress: bool) -> SlideResult:
    """Worker entry point: never raises for bad input, returns a failed result instead."""
    start = time.perf_counter()
    try:
        if not overwrite:
            existing = _existing_shard_status(job, out_dir, params)
            if existing is not None:
                return existing
        return extract_slide(job, out_dir, params, progress=progress)
    except TaskError as exc:
        return SlideResult(job.slide_id, "failed", str(exc), seconds=time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - one bad slide must not stop the cohort
        msg = " ".join(str(exc).split())
        return SlideResult(job.slide_id, "failed", f"{job.slide_path}: {type(exc).__name__}: {msg}",
                           seconds=time.perf_counter() - start)


def extract_cohort(jobs: Sequence[SlideJob], out_dir: str | os.PathLike[str], params: ExtractParams = DEFAULT_PARAMS,
                   *, workers: int = 1, overwrite: bool = False, progress: bool = True) -> ExtractReport:
    """Extract every slide; write ``manifest.csv``; log a line per slide and the failures at the end."""
    params.validate()
    if workers < 1:
        raise ConfigError("workers", f"must be at least 1, got {workers}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    load_label_map(params.labels)  # a bad labels file fails once, before any slide
    results: list[SlideResult] = []
    show_bar = progress and len(jobs) > 1
    bar = tqdm(total=len(jobs), desc="slides", unit="slide", disable=None if show_bar else True, file=sys.stderr)

    def record(result: SlideResult) -> None:
        results.append(result)
        line = result.message if result.status != "failed" else f"FAILED {result.slide_id}: {result.message}"
        if result.status == "done":
            line += f" [{result.seconds:.1f} s]"
        if progress and (result.status != "failed" or len(jobs) > 1):
            log.info("%s", line)
        bar.update(1)

    with logging_redirect_tqdm():  # the per-slide lines above the bar, not through it
        if workers == 1 or len(jobs) == 1:
            for job in jobs:
                record(_run_job(job, out, params, overwrite, progress and len(jobs) == 1))
        else:
            ctx = mp.get_context("spawn")
            with cf.ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
                futures = [pool.submit(_run_job, job, out, params, overwrite, False) for job in jobs]
                for fut in cf.as_completed(futures):
                    record(fut.result())
    bar.close()
    has_shards = any(r.status != "failed" for r in results) or (out / MANIFEST_NAME).exists()
    manifest = write_manifest(out) if has_shards else None
    report = ExtractReport(results=sorted(results, key=lambda r: r.slide_id), manifest=manifest)
    if len(jobs) == 1 and report.failed:
        raise TaskError(None, report.failed[0].message)  # a single slide: just its one-line error
    if progress:
        _log_closing(report)
    return report


def _log_closing(report: ExtractReport) -> None:
    done = [r for r in report.results if r.status != "failed"]
    log.info("%d of %d slides extracted, %d new tiles; manifest: %s", len(done), len(report.results),
             report.n_tiles, report.manifest)
    if report.failed:
        log.info("failed slides (%d):", len(report.failed))
        for r in report.failed:
            log.info("  %s: %s", r.slide_id, r.message)
