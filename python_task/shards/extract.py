"""``extract``: annotated slides to one labelled tile shard per slide, plus ``manifest.csv``.

Each slide is one job: open the slide, read and label its regions, plan the tile grid, read the tiles and write
the shard under a temporary name, then rename it. Finished shards are skipped on a re-run, so a killed run
resumes where it stopped. Slides run in parallel processes (``workers``); one failing slide does not stop the
others, and the failures are listed at the end.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import dataclasses
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

from python_task import (DEFAULT_CODEC, DEFAULT_MIN_COVERAGE, DEFAULT_MIN_TISSUE, DEFAULT_MPP, DEFAULT_QUALITY,
                         DEFAULT_TILE_SIZE)
from python_task.wsi.annotations import clip_regions, read_annotations, translate_regions
from python_task.errors import TaskError
from python_task.wsi.labels import label_regions, load_label_map
from python_task.shards.format import MANIFEST_NAME, ShardWriter, read_shard_info, shard_path, write_manifest
from python_task.wsi.slides import TileReader, open_slide
from python_task.wsi.tiling import GridSpec, TilePlan, describe_drops, plan_tiles
from python_task.wsi.tissue import detect_tissue

log = logging.getLogger(__name__)

WRITE_BATCH = 128


@dataclass(frozen=True)
class ExtractParams:
    """Every parameter that shapes a shard; stored as the shard's ``params`` attribute."""

    tile_size: int = DEFAULT_TILE_SIZE
    mpp: float = DEFAULT_MPP
    min_coverage: float = DEFAULT_MIN_COVERAGE
    min_tissue: float = DEFAULT_MIN_TISSUE
    stride: int | None = None  # grid step in output px; None = tile_size
    codec: str = DEFAULT_CODEC
    quality: int = DEFAULT_QUALITY
    labels: Path | None = None
    ignore_unknown: bool = False
    slide_mpp: float | None = None
    reader: str = "auto"
    offset: tuple[float, float] = (0.0, 0.0)
    tissue_mpp: float = 8.0

    def validate(self) -> None:
        if self.tile_size < 16:
            raise TaskError("--tile-size", f"must be at least 16 px, got {self.tile_size}")
        if not self.mpp > 0:
            raise TaskError("--mpp", f"must be positive, got {self.mpp}")
        if self.slide_mpp is not None and not self.slide_mpp > 0:
            raise TaskError("--slide-mpp", f"must be positive, got {self.slide_mpp}")
        for name, value in (("--min-coverage", self.min_coverage), ("--min-tissue", self.min_tissue)):
            if not 0.0 <= value <= 1.0:
                raise TaskError(name, f"must be between 0 and 1, got {value}")
        if self.stride is not None and self.stride < 1:
            raise TaskError("--stride", f"must be positive, got {self.stride}")
        if not 1 <= self.quality <= 100:
            raise TaskError("--quality", f"must be between 1 and 100, got {self.quality}")

    def shard_params(self) -> dict[str, Any]:
        """The parameters that make two shards comparable (what a resumed run must match)."""
        d = dataclasses.asdict(self)
        d["labels"] = None if self.labels is None else str(self.labels)
        d["offset"] = list(self.offset)
        d.pop("reader")  # both readers give the same pixels
        return d


DEFAULT_PARAMS = ExtractParams()


@dataclass(frozen=True)
class SlideJob:
    slide_id: str
    patient_id: str
    slide_path: Path
    annotation_path: Path
    diagnosis: str = ""


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


def read_cohort(path: str | os.PathLike[str]) -> list[SlideJob]:
    """Rows of ``cohort.csv``; relative paths are resolved against the CSV's folder."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            columns = set(reader.fieldnames or [])
    except FileNotFoundError:
        raise TaskError(path, "cohort table not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TaskError(path, f"not a readable CSV ({exc})") from None
    missing = {"slide_id", "patient_id", "slide_path", "annotation_path"} - columns
    if missing:
        raise TaskError(path, f"missing column(s) {', '.join(sorted(missing))}")
    if not rows:
        raise TaskError(path, "no slides listed")
    jobs, seen = [], set()
    for n, row in enumerate(rows, start=2):
        slide_id = (row["slide_id"] or "").strip()
        if not slide_id or any(c in slide_id for c in "/\\"):
            raise TaskError(path, f"line {n}: invalid slide_id {slide_id!r}")
        if slide_id in seen:
            raise TaskError(path, f"line {n}: slide_id {slide_id!r} listed twice")
        seen.add(slide_id)
        jobs.append(SlideJob(slide_id=slide_id, patient_id=(row["patient_id"] or "").strip() or slide_id,
                             slide_path=_resolve(path.parent, row["slide_path"]),
                             annotation_path=_resolve(path.parent, row["annotation_path"]),
                             diagnosis=(row.get("diagnosis") or "").strip()))
    return jobs


def _resolve(base: Path, value: str) -> Path:
    p = Path((value or "").strip())
    return p if p.is_absolute() else base / p


def extract_slide(job: SlideJob, out_dir: str | os.PathLike[str], params: ExtractParams = DEFAULT_PARAMS, *,
                  progress: bool = False) -> SlideResult:
    """Cut one slide into a shard at ``out_dir/<slide_id>.h5``. Raises :class:`TaskError` on bad input."""
    start = time.perf_counter()
    label_map = load_label_map(params.labels)
    regions = read_annotations(job.annotation_path)
    with open_slide(job.slide_path, mpp=params.slide_mpp, reader=params.reader) as slide:
        if params.offset != (0.0, 0.0):
            regions = translate_regions(regions, *params.offset)
        width, height = slide.dimensions
        regions, warnings = clip_regions(regions, width, height, path=job.annotation_path)
        for w in warnings:
            log.warning("%s: %s", job.annotation_path, w)
        labelled, skipped = label_regions(regions, label_map, ignore_unknown=params.ignore_unknown,
                                          path=job.annotation_path)
        if not labelled:
            raise TaskError(job.annotation_path, "no region with a class of the labels file "
                            f"({', '.join(label_map.label_names)}); skipped: {_fmt_counts(skipped)}")
        reader = TileReader(slide, params.mpp, params.tile_size)
        stride = params.stride or params.tile_size
        grid = GridSpec(extent=reader.tile_extent0, step=stride * reader.downsample, width=width, height=height)
        tissue = detect_tissue(slide, target_mpp=params.tissue_mpp)
        plan = plan_tiles(labelled, grid, tissue, min_coverage=params.min_coverage, min_tissue=params.min_tissue,
                          n_classes=len(label_map.label_names))
        if len(plan) == 0:
            raise TaskError(job.slide_path, f"no tile kept: {plan.candidates} grid tiles touch the regions, dropped "
                            f"{describe_drops(plan)} (tissue found on {100 * tissue.mask.mean():.0f}% of the "
                            "slide; check the annotations or lower --min-coverage/--min-tissue)")
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
        raise TaskError(path, "shard exists but was made with other parameters; use --overwrite or another --out")
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
    """Extract every slide; write ``manifest.csv``; print a line per slide and the failures at the end."""
    params.validate()
    if workers < 1:
        raise TaskError("--workers", f"must be at least 1, got {workers}")
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
            tqdm.write(line, file=sys.stderr)
        bar.update(1)

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
        _print_closing(report)
    return report


def _print_closing(report: ExtractReport) -> None:
    done = [r for r in report.results if r.status != "failed"]
    print(f"{len(done)} of {len(report.results)} slides extracted, {report.n_tiles} new tiles; manifest: "
          f"{report.manifest}", file=sys.stderr)
    if report.failed:
        print(f"failed slides ({len(report.failed)}):", file=sys.stderr)
        for r in report.failed:
            print(f"  {r.slide_id}: {r.message}", file=sys.stderr)
