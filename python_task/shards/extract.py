"""``extract``: annotated slides to one labelled tile shard per slide, plus ``manifest.csv``.

Each slide is one job: open the slide, read and label its regions, plan the tile grid, read the tiles and write
the shard under a temporary name, then rename it. Finished shards are skipped on a re-run, so a killed run
resumes where it stopped; a shard that does not open or fails its checksums is extracted again, and the
temporary files of an interrupted run are removed. Slides run in parallel processes (``workers``); one failing
slide does not stop the others, and the failures are listed at the end (logged, one line per slide).

One run writes to a folder at a time (:func:`~python_task.fileio.folder_lock`), and the folder records the
parameters its shards were made with (``extract.json``): a run with other parameters is refused unless
``overwrite``, so a folder never mixes shards made at two settings.

A worker process that dies (the out-of-memory killer, a crash in a C library) fails only its slide: the pool is
started again for the slides not yet done, the slides that were running when it died are retried one at a time,
and a slide whose worker dies again is failed and listed with the others. Workers end when the main process
does, however it ends. A pool whose workers die before any slide starts is started again, up to
:data:`POOL_STARTS` times in a row, before the slides left are failed.

A full disk (or quota) is the folder's problem, not a slide's: the first slide that meets it stops the run (no
new slide is started), the unfinished shard is removed, the manifest lists the shards finished, and the run
ends with one error naming the folder. A shard found from an earlier run is kept only when it was made from the
same cohort row (patient, diagnosis, slide and annotation files): a corrected row is extracted again.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import multiprocessing as mp
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from python_task.errors import AnnotationError, ConfigError, ShardError, SlideError, TaskError
from python_task.fileio import folder_lock, remove_stale_temporaries, write_json_atomic
from python_task.runtime import exit_with_parent
from python_task.shards.format import (
    NO_SPACE_ERRNOS,
    NoSpaceError,
    ShardInfo,
    ShardVersionError,
    ShardWriter,
    list_shards,
    shard_path,
)
from python_task.shards.manifest import MANIFEST_NAME, SETTINGS_NAME, write_manifest
from python_task.shards.params import ExtractParams
from python_task.shards.verify import check_shard
from python_task.wsi.annotations import place_regions, read_annotations
from python_task.wsi.cohort import SlideJob, check_job_ids
from python_task.wsi.labels import label_regions, load_label_map
from python_task.wsi.slides import TileReader, open_slide
from python_task.wsi.tiling import GridSpec, TilePlan, describe_drops, plan_tiles
from python_task.wsi.tissue import detect_tissue

log = logging.getLogger(__name__)

WRITE_BATCH = 128  # tiles read, then appended to the shard, at a time
POOL_STARTS = 3  # pools in a row whose workers all die before any slide starts, before the slides are failed

DEFAULT_PARAMS = ExtractParams()


@dataclass
class SlideResult:
    slide_id: str
    status: str  # 'done', 'skipped' or 'failed'
    message: str
    n_tiles: int = 0
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    no_space: tuple[str, str] | None = None  # the output folder is full (the folder, why): the run stops


@dataclass
class ExtractReport:
    results: list[SlideResult]
    manifest: Path | None
    left_out: list[str] = field(default_factory=list)  # shards present but not listed in the manifest, and why

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
    """Read the planned tiles in row order and stream them into a shard, ``WRITE_BATCH`` at a time.

    A tile that cannot be read is a :class:`SlideError` naming the slide; a shard that cannot be written (a full
    disk) a :class:`ShardError` naming the shard."""
    T = params.tile_size
    buf = np.empty((WRITE_BATCH, T, T, 3), dtype=np.uint8)
    bar = tqdm(total=len(plan), desc=desc, unit="tile", disable=None if progress else True, leave=False,
               file=sys.stderr)
    slide_path = attrs.get("slide_path", "slide")
    try:
        with ShardWriter(path, codec=params.codec, tile_size=T, attrs=attrs, quality=params.quality) as writer:
            for start in range(0, len(plan), WRITE_BATCH):
                stop = min(start + WRITE_BATCH, len(plan))
                for k, (x, y) in enumerate(plan.coords[start:stop]):
                    try:
                        buf[k] = reader.read(int(x), int(y))
                    except TaskError:
                        raise
                    except Exception as exc:  # noqa: BLE001 - a damaged tile of the slide, whatever the reader
                        raise SlideError(slide_path, f"cannot read the tile at level-0 ({int(x)}, {int(y)}): "
                                         f"{type(exc).__name__}: {' '.join(str(exc).split())}") from None
                sl = slice(start, stop)
                writer.append(buf[: stop - start], plan.coords[sl], plan.labels[sl], plan.roi[sl], plan.coverage[sl],
                              plan.tissue[sl])
                bar.update(stop - start)
    except (OSError, RuntimeError) as exc:  # reads are turned into SlideError above: what is left is writing
        code = getattr(exc, "errno", None)
        if code in NO_SPACE_ERRNOS:
            raise NoSpaceError(path.parent, f"{write_cause(exc)} while writing {path.name} (the unfinished shard is "
                               "removed)") from None
        raise ShardError(path, f"cannot be written: {write_cause(exc)}") from None
    finally:
        bar.close()


def write_cause(exc: Exception) -> str:
    """A short cause for a failed write: ``no space left on device (errno 28)`` rather than HDF5's paragraph."""
    code = getattr(exc, "errno", None)
    if code is None:
        found = re.search(r"errno = (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    if code:
        return f"{os.strerror(code).lower()} (errno {code})"
    return " ".join(str(exc).split())


def _summary(slide_id: str, plan: TilePlan, counts: dict[str, int]) -> str:
    per_class = ", ".join(f"{name} {n}" for name, n in counts.items())
    return f"{slide_id}: {len(plan)} tiles ({per_class}); dropped {describe_drops(plan)}"


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "nothing"


def _existing_shard_status(job: SlideJob, out_dir: Path, params: ExtractParams) -> tuple[SlideResult | None, str]:
    """A finished shard made with the same parameters means the slide is done (resume). A shard that does not
    open or fails its checksums is deleted, to be extracted again (the second value says why)."""
    path = shard_path(out_dir, job.slide_id)
    if not path.exists():
        return None, ""
    try:
        info = check_shard(path, decode=False).info
    except ShardVersionError:
        raise
    except ShardError as exc:
        path.unlink(missing_ok=True)
        return None, f"the shard found was damaged ({exc.cause}): extracted again"
    if info.params != json.loads(json.dumps(params.shard_params())):
        raise ShardError(path, "shard exists but was made with other parameters; use `overwrite` or another `out`")
    changed = row_changes(info, job)
    if changed:
        path.unlink(missing_ok=True)
        return None, f"the shard found was made from another cohort row ({changed}): extracted again"
    return SlideResult(job.slide_id, "skipped", f"{job.slide_id}: shard exists ({info.n_tiles} tiles), skipped",
                       n_tiles=info.n_tiles), ""


def row_changes(info: ShardInfo, job: SlideJob) -> str:
    """How the cohort row a shard was made from (its attributes) differs from ``job`` ("" when it does not): a
    corrected patient or diagnosis must reach the shard, and so the manifest and the splits. Files are compared by
    name, not by path: a cohort folder moved, or read from another working directory, keeps its shards."""
    def same_file(stored: str, now: Path) -> bool:
        return Path(stored).name == Path(now).name

    changes = [f"{name} {old!r} there, {new!r} now" for name, old, new in (
        ("patient_id", info.patient_id, job.patient_id), ("diagnosis", info.diagnosis, job.diagnosis)) if old != new]
    changes += [f"{name} {old} there, {new} now" for name, old, new in (
        ("slide_path", info.slide_path, job.slide_path), ("annotation_path", info.annotation_path,
                                                           job.annotation_path)) if not same_file(old, new)]
    return "; ".join(changes)


Runner = Callable[[SlideJob, Path, ExtractParams, bool, bool], SlideResult]


def _run_job(job: SlideJob, out_dir: Path, params: ExtractParams, overwrite: bool, progress: bool) -> SlideResult:
    """Worker entry point: never raises for bad input, returns a failed result instead."""
    start = time.perf_counter()
    try:
        note = ""
        if not overwrite:
            existing, note = _existing_shard_status(job, out_dir, params)
            if existing is not None:
                return existing
        result = extract_slide(job, out_dir, params, progress=progress)
        if note:
            result.message = f"{result.message} ({note})"
        return result
    except NoSpaceError as exc:
        return SlideResult(job.slide_id, "failed", str(exc), seconds=time.perf_counter() - start,
                           no_space=(str(exc.path), exc.cause))
    except TaskError as exc:
        return SlideResult(job.slide_id, "failed", str(exc), seconds=time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - one bad slide must not stop the cohort
        msg = " ".join(str(exc).split())
        return SlideResult(job.slide_id, "failed", f"{job.slide_path}: {type(exc).__name__}: {msg}",
                           seconds=time.perf_counter() - start)


def extract_cohort(jobs: Sequence[SlideJob], out_dir: str | os.PathLike[str], params: ExtractParams = DEFAULT_PARAMS,
                   *, workers: int = 1, overwrite: bool = False, progress: bool = True,
                   _runner: Runner = _run_job, _worker_start: Callable[[], None] | None = None) -> ExtractReport:
    """Extract every slide; write ``manifest.csv``; log a line per slide and the failures at the end.

    Holds ``out_dir``'s lock for the whole run (:class:`~python_task.errors.BusyError` when another run holds it).
    A full output folder ends the run with a :class:`NoSpaceError` naming it, after the manifest of the shards
    finished. ``_runner`` and ``_worker_start`` (tests only) replace the per-slide job run in the worker
    processes and add a step to each worker's start."""
    params.validate()
    if workers < 1:
        raise ConfigError("workers", f"must be at least 1, got {workers}")
    for job in jobs:  # ids name files: none may lead outside ``out_dir`` (a cohort table checks its own rows)
        check_job_ids(job)
    out = Path(out_dir)
    label_map = load_label_map(params.labels)  # a bad labels file fails once, before any slide
    with folder_lock(out, "extract"):
        remove_stale_temporaries(out)
        recorded = _check_settings(out, params, list(label_map.label_names), overwrite)
        results: list[SlideResult] = []
        show_bar = progress and len(jobs) > 1
        bar = tqdm(total=len(jobs), desc="slides", unit="slide", disable=None if show_bar else True,
                   file=sys.stderr)

        def record(result: SlideResult) -> None:
            results.append(result)
            line = result.message if result.status != "failed" else f"FAILED {result.slide_id}: {result.message}"
            if result.status == "done":
                line += f" [{result.seconds:.1f} s]"
            if progress and (result.status != "failed" or len(jobs) > 1) and result.no_space is None:
                log.info("%s", line)
            bar.update(1)

        with logging_redirect_tqdm():  # the per-slide lines above the bar, not through it
            if workers == 1 or len(jobs) == 1:
                for job in jobs:
                    record(_runner(job, out, params, overwrite, progress and len(jobs) == 1))
                    if results[-1].no_space is not None:
                        break
            else:
                _run_parallel(jobs, out, params, overwrite, workers, record, _runner, _worker_start)
        bar.close()
        remove_stale_temporaries(out)  # every writer is done: what a dead worker left is stale
        manifest = None
        left_out: list[ShardError] = []
        if list_shards(out) or (out / MANIFEST_NAME).exists():
            try:
                manifest = write_manifest(out, params=recorded, problems=left_out)
            except OSError as exc:
                if not any(r.no_space is not None for r in results):  # else the full folder is the error
                    raise ShardError(out / MANIFEST_NAME, f"cannot be written: {write_cause(exc)}") from None
    report = ExtractReport(results=sorted(results, key=lambda r: r.slide_id), manifest=manifest,
                           left_out=[str(e) for e in left_out])
    _raise_if_out_of_space(report, len(jobs))
    if len(jobs) == 1 and report.failed:
        raise TaskError(None, report.failed[0].message)  # a single slide: just its one-line error
    if progress:
        _log_closing(report)
    return report


def _raise_if_out_of_space(report: ExtractReport, n_jobs: int) -> None:
    """The folder filled up: one :class:`NoSpaceError` naming it, with what was finished and kept."""
    full = next((r for r in report.results if r.no_space is not None), None)
    if full is None:
        return
    folder, cause = full.no_space  # type: ignore[misc]
    done = sum(r.status != "failed" for r in report.results)
    kept = f"{report.manifest} lists them" if report.manifest is not None else "no manifest written"
    raise NoSpaceError(folder, f"{cause}; {done} of {n_jobs} slides have a shard ({kept}): free some space, or "
                       "choose another `out`, and run extract again (it resumes)")


def _check_settings(out: Path, params: ExtractParams, label_names: list[str], overwrite: bool) -> dict[str, Any]:
    """The folder's extraction parameters (``extract.json``, :meth:`ExtractParams.folder_params`): recorded by the
    run that makes its first shards; a run with others is refused unless ``overwrite``, which records its own.
    Returns the parameters the shards must share."""
    path = out / SETTINGS_NAME
    mine = {"params": json.loads(json.dumps(params.folder_params())), "label_names": label_names}
    if path.exists() and not overwrite and list_shards(out):  # settings only matter once there are shards
        try:
            theirs = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(theirs, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            raise ShardError(path, f"cannot be read ({exc}): delete it, or run with `overwrite`") from None
        if {k: theirs.get(k) for k in mine} != mine:
            raise ShardError(path, f"the shards of {out} were made with other settings ({_differences(theirs, mine)}):"
                             " a folder holds shards of one setting; use `overwrite` to extract every slide again "
                             "with these, or another `out`")
        return mine["params"]
    try:
        write_json_atomic(path, mine)
    except OSError as exc:
        raise ShardError(path, f"cannot be written: {write_cause(exc)}") from None
    return mine["params"]


def _differences(theirs: dict[str, Any], mine: dict[str, Any]) -> str:
    old, new = theirs.get("params") or {}, mine["params"]
    parts = [f"`{k}` {old.get(k)!r} there, {new.get(k)!r} now" for k in new if old.get(k) != new.get(k)]
    parts += [f"`{k}` {old.get(k)!r} there" for k in old if k not in new]
    if theirs.get("label_names") != mine["label_names"]:
        parts.append(f"classes {theirs.get('label_names')} there, {mine['label_names']} now")
    return "; ".join(parts) or "unknown"


# --------------------------------------------------------------------------------------------- worker processes

def _worker_init(parent_pid: int, start: Callable[[], None] | None = None) -> None:
    """In each worker process: end when the main process ends, however it ends (no orphan left running)."""
    exit_with_parent(parent_pid)
    if start is not None:
        start()


def _marked(runner: Runner, index: int, marks: str, job: SlideJob, out: Path, params: ExtractParams,
            overwrite: bool) -> SlideResult:
    """Run one job in a worker, leaving a mark that it started: after a worker dies, the slides marked but not
    finished are the ones that were running."""
    Path(marks, str(index)).touch()
    return runner(job, out, params, overwrite, False)


def _run_parallel(jobs: Sequence[SlideJob], out: Path, params: ExtractParams, overwrite: bool, workers: int,
                  record: Callable[[SlideResult], None], runner: Runner,
                  worker_start: Callable[[], None] | None = None) -> None:
    """Every job in a pool of ``workers`` processes that survives a dead worker (see the module doc)."""
    queue = list(range(len(jobs)))  # run in the shared pool
    suspects: list[int] = []  # running when a worker died: each retried alone, once
    failed_starts = 0  # pools in a row whose workers died before any slide started
    with tempfile.TemporaryDirectory(prefix="python_task-extract-") as marks:
        while queue or suspects:
            alone = not queue
            batch = queue if queue else [suspects.pop(0)]
            outcome = _pool_round(jobs, batch, 1 if alone else workers, out, params, overwrite, record, runner,
                                  marks, worker_start)
            if outcome.out_of_space:
                return  # no new slide: each would meet the full disk too
            if alone:
                for i in outcome.running + outcome.waiting:
                    record(SlideResult(jobs[i].slide_id, "failed", f"{jobs[i].slide_path}: the worker process "
                                       f"extracting this slide died ({outcome.death}), on its first try and again "
                                       "alone: it needs more memory than the machine has, or crashes the slide "
                                       "reader"))
                continue
            if outcome.death is None:
                queue = []
                continue
            nothing_ran = not outcome.done and not outcome.running
            failed_starts = failed_starts + 1 if nothing_ran else 0
            if failed_starts >= POOL_STARTS:  # the workers themselves cannot start: no slide is to blame
                for i in outcome.waiting:
                    record(SlideResult(jobs[i].slide_id, "failed", f"{jobs[i].slide_path}: worker processes could not "
                                       f"start ({outcome.death}; {POOL_STARTS} pools in a row)"))
                queue = []
                continue
            log.warning("a worker process died, %s, while extracting %s: the pool is started again%s",
                        outcome.death, ", ".join(jobs[i].slide_id for i in outcome.running) or "no slide",
                        "" if nothing_ran else "; " + ("they are" if len(outcome.running) != 1 else "it is")
                        + " retried one at a time")
            suspects += outcome.running
            queue = outcome.waiting


@dataclass
class _PoolOutcome:
    """How one pool's round ended: indexes into the jobs finished, running when a worker died and not started,
    how the dead worker died (None if none did), and whether a slide found the output folder full."""

    done: list[int]
    running: list[int]
    waiting: list[int]
    death: str | None
    out_of_space: bool = False


def _pool_round(jobs: Sequence[SlideJob], batch: list[int], workers: int, out: Path, params: ExtractParams,
                overwrite: bool, record: Callable[[SlideResult], None], runner: Runner, marks: str,
                worker_start: Callable[[], None] | None = None) -> _PoolOutcome:
    """Run ``batch`` (indexes into ``jobs``) in a new pool until done, until a worker dies, or until a slide finds
    the output folder full (the slides not started then are cancelled)."""
    for name in os.listdir(marks):
        os.unlink(os.path.join(marks, name))
    ctx = mp.get_context("spawn")
    done: list[int] = []
    broken = full = False
    pool = cf.ProcessPoolExecutor(max_workers=min(workers, len(batch)), mp_context=ctx, initializer=_worker_init,
                                  initargs=(os.getpid(), worker_start))
    try:
        futures = {pool.submit(_marked, runner, i, marks, jobs[i], out, params, overwrite): i for i in batch}
        processes = list(getattr(pool, "_processes", {}).values())  # to tell afterwards how a worker died
        for fut in cf.as_completed(futures):
            try:
                result = fut.result()
            except cf.process.BrokenProcessPool:
                broken = True
                continue
            except cf.CancelledError:
                continue
            done.append(futures[fut])
            record(result)
            if result.no_space is not None and not full:
                full = True
                for other in futures:
                    other.cancel()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if full or not broken:
        return _PoolOutcome(done, [], [], None, out_of_space=full)
    started = {int(name) for name in os.listdir(marks)}
    running = [i for i in batch if i in started and i not in done]
    waiting = [i for i in batch if i not in started and i not in done]
    return _PoolOutcome(done, running, waiting, _how_it_died(processes))


def _how_it_died(processes: list[Any]) -> str:
    """``killed by SIGKILL (the out-of-memory killer, or kill -9)`` from the pool's worker exit codes."""
    codes = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
    # the pool stops the surviving workers with SIGTERM once one has died: the other codes are the cause
    causes = [c for c in codes if c != -signal.SIGTERM] or codes
    if not causes:
        return "a worker process ended abruptly"
    code = causes[0]
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        why = {"SIGKILL": " (the out-of-memory killer, or kill -9)", "SIGSEGV": " (a crash in a C library)"}
        return f"killed by {name}{why.get(name, '')}"
    return f"exit status {code}"


def _log_closing(report: ExtractReport) -> None:
    done = [r for r in report.results if r.status != "failed"]
    log.info("%d of %d slides extracted, %d new tiles; manifest: %s", len(done), len(report.results),
             report.n_tiles, report.manifest)
    if report.failed:
        log.info("failed slides (%d):", len(report.failed))
        for r in report.failed:
            log.info("  %s: %s", r.slide_id, r.message)
    if report.left_out:
        log.info("shards not listed in the manifest (%d):", len(report.left_out))
        for line in report.left_out:
            log.info("  %s", line)
