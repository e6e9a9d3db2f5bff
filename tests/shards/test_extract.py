"""``extract`` end to end: shards per contract, pixels faithful to the slide, resume, bad input, real data."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from python_task.errors import TaskError
from python_task.shards.extract import extract_cohort, extract_slide
from python_task.shards.format import ShardReader, read_shard_info
from python_task.shards.params import ExtractParams
from python_task.wsi.cohort import SlideJob, read_cohort
from python_task.wsi.slides import TileReader, open_slide

CLI = [sys.executable, "-m", "python_task"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_manifest_and_shards_follow_the_contract(synth_cohort, synth_shards):
    jobs = read_cohort(synth_cohort)
    with open(synth_shards / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["slide_id"] for r in rows) == sorted(j.slide_id for j in jobs)
    diagnosis = {j.slide_id: j.diagnosis for j in jobs}
    for row in rows:
        info = read_shard_info(synth_shards / row["shard"])
        assert info.n_tiles == int(row["n_tiles"]) == int(row["n_benign"]) + int(row["n_malignant"]) > 0
        assert info.label_names == ("benign", "malignant") and info.codec == "jpeg" and info.tile_size == 256
        assert info.mpp == pytest.approx(0.5) and info.diagnosis == row["diagnosis"] == diagnosis[row["slide_id"]]
        if row["diagnosis"] == "benign":
            assert int(row["n_malignant"]) == 0
        with h5py.File(synth_shards / row["shard"], "r", locking=False) as f:
            assert f["coverage"][()].min() >= 0.5 and f["tissue"][()].min() >= 0.5
            assert json.loads(f.attrs["params"])["tile_size"] == 256
    assert {r["diagnosis"] for r in rows} == {"benign", "malignant"}


def _shard_vs_direct(job: SlideJob, out: Path, params: ExtractParams) -> tuple[np.ndarray, np.ndarray]:
    """Tiles read back from the shard, and the same tiles read directly from the slide at their coords."""
    extract_slide(job, out, params)
    with ShardReader(out / f"{job.slide_id}.h5") as shard, open_slide(job.slide_path) as slide:
        reader = TileReader(slide, params.mpp, params.tile_size)
        assert shard.info.downsample == pytest.approx(reader.downsample)
        assert shard.info.mpp == pytest.approx(reader.mpp)
        coords = shard.field("coords")
        idx = np.linspace(0, len(coords) - 1, min(24, len(coords))).astype(int)
        return shard.images(idx), np.stack([reader.read(int(x), int(y)) for x, y in coords[idx]])


@pytest.mark.parametrize("mpp", [0.5, 0.75])
def test_raw_tiles_are_identical_to_a_direct_read(synth_cohort, tmp_path, mpp):
    job = read_cohort(synth_cohort)[0]
    tiles, direct = _shard_vs_direct(job, tmp_path, ExtractParams(codec="raw", tile_size=128, mpp=mpp))
    np.testing.assert_array_equal(tiles, direct)


def test_jpeg_tiles_of_a_synthetic_slide_keep_40_db(synth_cohort, tmp_path):
    job = read_cohort(synth_cohort)[0]
    tiles, direct = _shard_vs_direct(job, tmp_path, ExtractParams(codec="jpeg"))
    assert _psnr(tiles, direct) >= 40.0


def test_jpeg_tiles_of_a_real_slide_keep_40_db(cmu_slide, shared_data, tmp_path):
    job = SlideJob("CMU", "CMU", cmu_slide, shared_data / "qupath_CMU-1.json")
    labels = tmp_path / "labels.yaml"
    labels.write_text("benign: [Tissue]\nmalignant: [Tumor_vital]\n")
    params = ExtractParams(codec="jpeg", labels=labels, ignore_unknown=True, offset=(-42673.0, -5576.0))
    tiles, direct = _shard_vs_direct(job, tmp_path, params)
    assert _psnr(tiles, direct) >= 40.0
    assert np.median([_psnr(a, b) for a, b in zip(tiles, direct)]) >= 40.0


def test_default_codec_is_smaller_than_png(synth_shards):
    from io import BytesIO

    from PIL import Image

    shard = sorted(synth_shards.glob("*.h5"))[0]
    with ShardReader(shard) as r:
        tiles = r.images(range(min(20, len(r))))
        jpeg_bytes = sum(len(r.file["images"][i]) for i in range(len(tiles)))
    png_bytes = 0
    for t in tiles:
        buf = BytesIO()
        Image.fromarray(t).save(buf, format="PNG")
        png_bytes += buf.tell()
    assert jpeg_bytes <= png_bytes / 2


def test_rerun_skips_finished_shards_and_resumes(synth_cohort, tmp_path):
    jobs = read_cohort(synth_cohort)[:3]
    first = extract_cohort(jobs[:2], tmp_path, ExtractParams(), progress=False)
    assert [r.status for r in first.results] == ["done", "done"]
    stamp = (tmp_path / f"{jobs[0].slide_id}.h5").stat().st_mtime_ns
    (tmp_path / f".{jobs[2].slide_id}.h5.dead.tmp").write_bytes(b"left by a killed run")
    second = extract_cohort(jobs, tmp_path, ExtractParams(), progress=False)
    status = {r.slide_id: r.status for r in second.results}
    assert status == {jobs[0].slide_id: "skipped", jobs[1].slide_id: "skipped", jobs[2].slide_id: "done"}
    assert (tmp_path / f"{jobs[0].slide_id}.h5").stat().st_mtime_ns == stamp
    with open(tmp_path / "manifest.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 3
    assert not list(tmp_path.glob(".*.tmp"))  # the killed run's temporary file is gone
    with pytest.raises(TaskError, match="other settings .*`tile_size` 256 there, 128 now"):
        extract_cohort(jobs[:1], tmp_path, ExtractParams(tile_size=128), progress=False)


def test_two_workers_give_the_same_shards(synth_cohort, synth_shards, tmp_path):
    jobs = read_cohort(synth_cohort)
    report = extract_cohort(jobs, tmp_path, ExtractParams(), workers=2, progress=False)
    assert report.ok
    for job in jobs:
        with ShardReader(tmp_path / f"{job.slide_id}.h5") as a, ShardReader(synth_shards / f"{job.slide_id}.h5") as b:
            np.testing.assert_array_equal(a.field("coords"), b.field("coords"))
            np.testing.assert_array_equal(a.field("labels"), b.field("labels"))


def _single(tmp_path: Path, slide: Path, annotations: Path, *extra: str) -> subprocess.CompletedProcess:
    return _run("extract", "--slide", slide, "--annotations", annotations, "--out", tmp_path / "out", *extra)


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def _no_shard_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert not out.exists() or not list(out.glob("*.h5")) and not list(out.glob(".*.tmp"))


def test_bad_inputs_each_give_one_line_errors(synth_cohort, shared_data, tmp_path):
    job = read_cohort(synth_cohort)[0]
    broken = shared_data / "broken.svs"
    proc = _single(tmp_path, broken, job.annotation_path)
    _assert_one_line_error(proc, "broken.svs")
    _no_shard_written(tmp_path)

    truncated = tmp_path / "truncated.tiff"
    truncated.write_bytes(job.slide_path.read_bytes()[: job.slide_path.stat().st_size // 3])
    proc = _single(tmp_path, truncated, job.annotation_path)
    _assert_one_line_error(proc, "truncated.tiff")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # no "ERROR tifffile: ..." beside it
    _no_shard_written(tmp_path)

    garbage = tmp_path / "notes.geojson"
    garbage.write_text("these are not annotations")
    _assert_one_line_error(_single(tmp_path, job.slide_path, garbage), "notes.geojson")

    points = tmp_path / "points.geojson"
    points.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [10, 10]},
         "properties": {"classification": {"name": "Cholangiocarcinoma"}}}]}))
    _assert_one_line_error(_single(tmp_path, job.slide_path, points), "points.geojson", "polygon")

    unknown = tmp_path / "unknown.geojson"
    unknown.write_text(json.dumps([{"type": "Feature", "geometry": {
        "type": "Polygon", "coordinates": [[[0, 0], [900, 0], [900, 900], [0, 900], [0, 0]]]},
        "properties": {"classification": {"name": "Necrosis"}}}]))
    _assert_one_line_error(_single(tmp_path, job.slide_path, unknown), "unknown.geojson", "Necrosis")
    ok = _single(tmp_path, job.slide_path, job.annotation_path, "--ignore-unknown", "--slide-id", "S")
    assert ok.returncode == 0, ok.stderr

    outside = tmp_path / "outside.geojson"
    outside.write_text(json.dumps([{"type": "Feature", "geometry": {
        "type": "Polygon", "coordinates": [[[50000, 50000], [51000, 50000], [51000, 51000], [50000, 50000]]]},
        "properties": {"classification": {"name": "Cholangiocarcinoma"}}}]))
    _assert_one_line_error(_single(tmp_path, job.slide_path, outside), "outside.geojson", "outside")


def test_slide_without_mpp(synth_cohort, tmp_path):
    import tifffile

    job = read_cohort(synth_cohort)[0]
    with open_slide(job.slide_path) as slide:
        rgb = slide.read_region(0, 0, 0, *slide.dimensions)
    bare = tmp_path / "bare.tiff"
    tifffile.imwrite(bare, rgb, tile=(256, 256), compression="jpeg", photometric="rgb")
    proc = _single(tmp_path, bare, job.annotation_path)
    _assert_one_line_error(proc, "bare.tiff", "--slide-mpp")
    proc = _single(tmp_path, bare, job.annotation_path, "--slide-mpp", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert read_shard_info(tmp_path / "out" / "bare.h5").n_tiles > 0


def test_empty_region_says_why(synth_cohort, tmp_path):
    job = read_cohort(synth_cohort)[0]
    tiny = tmp_path / "tiny.geojson"
    tiny.write_text(json.dumps([{"type": "Feature", "geometry": {
        "type": "Polygon", "coordinates": [[[10, 10], [60, 10], [60, 60], [10, 60], [10, 10]]]},
        "properties": {"classification": {"name": "Biliary adenoma"}}}]))
    proc = _single(tmp_path, job.slide_path, tiny)
    _assert_one_line_error(proc, "no tile kept")


def test_cohort_run_finishes_other_slides_and_lists_the_failure(synth_cohort, shared_data, tmp_path):
    cohort = tmp_path / "cohort.csv"
    rows = list(csv.DictReader(open(synth_cohort)))[:2]
    for row in rows:
        for key in ("slide_path", "annotation_path"):
            row[key] = str(synth_cohort.parent / row[key])
    rows.append({**rows[0], "slide_id": "BROKEN", "slide_path": str(shared_data / "broken.svs")})
    with open(cohort, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    proc = _run("extract", "--cohort", cohort, "--out", tmp_path / "out", "--workers", "2")
    assert proc.returncode == 1
    assert "failed slides (1)" in proc.stderr and "BROKEN" in proc.stderr.split("failed slides (1)")[1]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.h5")) == sorted(f"{r['slide_id']}.h5" for r in rows[:2])


def test_real_svs_with_real_qupath_annotation(cmu_slide, shared_data, tmp_path):
    labels = tmp_path / "labels.yaml"
    labels.write_text("malignant: [Tumor_vital]\nbenign: [Tissue]\nignore: [Makrophage, mark, Cyst]\n")
    job = SlideJob("CMU-1-crop", "CMU", cmu_slide, shared_data / "qupath_CMU-1.json")
    for reader in ("openslide", "tiff"):
        out = tmp_path / reader
        params = ExtractParams(labels=labels, offset=(-42673.0, -5576.0), reader=reader, codec="raw")
        result = extract_slide(job, out, params)
        assert result.n_tiles > 10 and result.counts["benign"] == result.n_tiles  # the crop shows Tissue only
    with ShardReader(tmp_path / "openslide" / "CMU-1-crop.h5") as a, ShardReader(tmp_path / "tiff" / "CMU-1-crop.h5") as b:
        np.testing.assert_array_equal(a.field("coords"), b.field("coords"))
        diff = np.abs(a.images().astype(int) - b.images().astype(int))
        assert diff.mean() < 0.5 and diff.max() <= 8
        assert a.info.mpp == pytest.approx(0.499, abs=1e-3)  # within tolerance of 0.5: no resampling


def test_cli_single_slide_defaults(synth_cohort, tmp_path):
    job = read_cohort(synth_cohort)[1]
    proc = _single(tmp_path, job.slide_path, job.annotation_path, "--patient-id", "PX")
    assert proc.returncode == 0, proc.stderr
    info = read_shard_info(tmp_path / "out" / f"{job.slide_path.stem}.h5")
    assert info.patient_id == "PX" and info.slide_id == job.slide_path.stem
    shutil.rmtree(tmp_path / "out")


# --------------------------------------------------------------------------------------------- crashes stay local

def _manifest_ids(folder: Path) -> list[str]:
    with open(folder / "manifest.csv", newline="") as fh:
        return sorted(r["slide_id"] for r in csv.DictReader(fh))


def test_a_killed_worker_fails_nothing_the_pool_is_rebuilt(synth_cohort, tmp_path, monkeypatch, caplog):
    import os
    import signal
    import threading
    import time

    from tests.shards import workers

    jobs = read_cohort(synth_cohort)
    victim = jobs[1].slide_id
    monkeypatch.setenv("TEST_EXTRACT_PIDS", str(tmp_path))
    monkeypatch.setenv("TEST_EXTRACT_PAUSE", victim)
    pid_file = tmp_path / f"{victim}.pid"

    def kill_when_paused() -> None:
        for _ in range(6000):  # the worker announces itself, then waits to be killed
            if pid_file.exists() and pid_file.read_text():
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_paused)
    killer.start()
    with caplog.at_level("WARNING", logger="python_task"):
        report = extract_cohort(jobs, tmp_path / "out", ExtractParams(), workers=2, progress=False,
                                _runner=workers.pause_once)
    killer.join()
    assert report.ok, report.failed
    assert sorted(r.slide_id for r in report.results) == sorted(j.slide_id for j in jobs)
    assert _manifest_ids(tmp_path / "out") == sorted(j.slide_id for j in jobs)
    assert "killed by SIGKILL" in caplog.text and victim in caplog.text
    assert not list((tmp_path / "out").glob(".*.tmp"))  # what the dead worker was writing is gone


def test_a_slide_that_kills_its_worker_twice_fails_alone(synth_cohort, tmp_path, monkeypatch):
    from tests.shards import workers

    jobs = read_cohort(synth_cohort)
    victim = jobs[2].slide_id
    monkeypatch.setenv("TEST_EXTRACT_DIE", victim)
    report = extract_cohort(jobs, tmp_path, ExtractParams(), workers=2, progress=False, _runner=workers.die)
    assert [r.slide_id for r in report.failed] == [victim]
    assert "died (killed by SIGKILL" in report.failed[0].message and str(jobs[2].slide_path) in report.failed[0].message
    others = sorted(j.slide_id for j in jobs if j.slide_id != victim)
    assert sorted(r.slide_id for r in report.results if r.status == "done") == others
    assert report.manifest is not None and _manifest_ids(tmp_path) == others


def test_workers_end_with_the_main_process(synth_cohort, tmp_path):
    import os
    import signal
    import time

    code = ("import sys; from python_task.shards.extract import extract_cohort; "
            "from python_task.shards.params import ExtractParams; from python_task.wsi.cohort import read_cohort; "
            "from tests.shards import workers; "
            "extract_cohort(read_cohort(sys.argv[1]), sys.argv[2], ExtractParams(), workers=2, progress=False, "
            "_runner=workers.pause_all)")
    env = {**os.environ, "TEST_EXTRACT_PIDS": str(tmp_path)}
    main = subprocess.Popen([sys.executable, "-c", code, str(synth_cohort), str(tmp_path / "out")], env=env,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        for _ in range(6000):
            pids = [p for p in tmp_path.glob("*.pid") if p.read_text()]
            if len(pids) == 2:
                break
            time.sleep(0.05)
        worker_pids = [int(p.read_text()) for p in pids]
        assert len(worker_pids) == 2
    finally:
        main.kill()
        main.wait()

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        stat = Path(f"/proc/{pid}/stat")
        return not (stat.exists() and stat.read_text().split()[2] == "Z")  # a zombie has ended

    for _ in range(600):
        if not any(alive(p) for p in worker_pids):
            break
        time.sleep(0.05)
    leftover = [p for p in worker_pids if alive(p)]
    for pid in leftover:
        os.kill(pid, signal.SIGKILL)
    assert not leftover, "workers outlived their main process"


def test_a_damaged_or_truncated_shard_is_redone(synth_cohort, tmp_path):
    jobs = read_cohort(synth_cohort)[:3]
    extract_cohort(jobs, tmp_path, ExtractParams(), progress=False)
    truncated, flipped = tmp_path / f"{jobs[0].slide_id}.h5", tmp_path / f"{jobs[1].slide_id}.h5"
    with open(truncated, "r+b") as fh:
        fh.truncate(truncated.stat().st_size // 3)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside the tiles' JPEG bytes
    flipped.write_bytes(bytes(data))
    report = extract_cohort(jobs, tmp_path, ExtractParams(), progress=False)
    status = {r.slide_id: r.status for r in report.results}
    assert status == {jobs[0].slide_id: "done", jobs[1].slide_id: "done", jobs[2].slide_id: "skipped"}
    assert "damaged" in next(r.message for r in report.results if r.slide_id == jobs[0].slide_id)
    assert _manifest_ids(tmp_path) == sorted(j.slide_id for j in jobs)
    from python_task.shards.verify import verify_shards

    assert verify_shards(tmp_path, progress=False).ok


def test_a_full_disk_is_blamed_on_the_folder_not_the_slide(synth_cohort, tmp_path, monkeypatch):
    import errno

    from python_task.shards import format as shard_format
    from python_task.shards.extract import write_cause
    from python_task.shards.format import NoSpaceError

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shard_format.ShardWriter, "append", full)
    job = read_cohort(synth_cohort)[0]
    with pytest.raises(NoSpaceError) as exc:
        extract_cohort([job, read_cohort(synth_cohort)[1]], tmp_path, ExtractParams(), progress=False)
    assert exc.value.path == str(tmp_path) and "no space left on device" in exc.value.cause
    assert f"while writing {job.slide_id}.h5" in exc.value.cause and str(job.slide_path) not in str(exc.value)
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / ".python_task.lock").exists()
    hdf5 = OSError("Can't write data (file write failed: time = x, filename = 'a.h5', file descriptor = 5, "
                   "errno = 28, error message = 'No space left on device', buf = 0x1)")
    assert write_cause(hdf5) == "no space left on device (errno 28)"


@pytest.mark.parametrize("workers", [1, 2])
def test_a_full_disk_stops_the_run_and_keeps_the_finished_shards(synth_cohort, tmp_path, monkeypatch, workers):
    from python_task.shards.format import NoSpaceError
    from tests.shards import workers as runners

    jobs = read_cohort(synth_cohort)[:3]
    monkeypatch.setenv("TEST_EXTRACT_FULL", jobs[1].slide_id)
    out = tmp_path / "out"
    with pytest.raises(NoSpaceError) as exc:
        extract_cohort(jobs, out, ExtractParams(), workers=workers, progress=False, _runner=runners.full_disk)
    cause = exc.value.cause
    assert exc.value.path == str(out) and cause.startswith("no space left on device (errno 28) while writing "
                                                           f"{jobs[1].slide_id}.h5")
    assert str(jobs[1].slide_path) not in str(exc.value) and "\n" not in str(exc.value)
    assert jobs[0].slide_id in _manifest_ids(out) and jobs[1].slide_id not in _manifest_ids(out)
    assert not (out / f"{jobs[1].slide_id}.h5").exists() and not list(out.glob(".*.tmp"))
    assert not (out / ".python_task.lock").exists()
    if workers == 1:  # the slide after the full one is not started
        assert "1 of 3 slides have a shard" in cause and not (out / f"{jobs[2].slide_id}.h5").exists()


def test_a_write_the_system_refuses_fails_the_shard_not_the_process(synth_cohort, tmp_path):
    # a real refusal from the kernel (a file-size limit: EFBIG), through HDF5: it used to end in SIGSEGV
    code = ("import resource, sys; from python_task.shards.extract import extract_cohort; "
            "from python_task.shards.params import ExtractParams; from python_task.wsi.cohort import read_cohort; "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (60000, resource.RLIM_INFINITY)); "
            "report = extract_cohort(read_cohort(sys.argv[1])[:2], sys.argv[2], ExtractParams(codec='raw', "
            "tile_size=64, mpp=2.0), progress=False); print(*(r.message for r in report.failed), sep='\\n')")
    proc = subprocess.run([sys.executable, "-c", code, str(synth_cohort), str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all("cannot be written: file too large (errno 27)" in line for line in lines)
    assert "Traceback" not in proc.stderr and not list((tmp_path / "out").glob("*.h5"))
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_a_corrected_cohort_row_is_extracted_again(synth_cohort, tmp_path):
    import dataclasses

    job = read_cohort(synth_cohort)[0]
    extract_cohort([job], tmp_path, ExtractParams(), progress=False)
    corrected = dataclasses.replace(job, patient_id="P999", diagnosis="benign" if job.diagnosis != "benign"
                                    else "malignant")
    report = extract_cohort([corrected], tmp_path, ExtractParams(), progress=False)
    result = report.results[0]
    assert result.status == "done" and "another cohort row" in result.message and "P999" in result.message
    info = read_shard_info(tmp_path / f"{job.slide_id}.h5")
    assert (info.patient_id, info.diagnosis) == (corrected.patient_id, corrected.diagnosis)
    with open(tmp_path / "manifest.csv", newline="") as fh:
        assert [(r["patient_id"], r["diagnosis"]) for r in csv.DictReader(fh)] == [("P999", corrected.diagnosis)]
    again = extract_cohort([corrected], tmp_path, ExtractParams(), progress=False)
    assert again.results[0].status == "skipped"  # the same row: resumed as before


def test_workers_that_die_before_any_slide_are_started_again(synth_cohort, tmp_path, monkeypatch, caplog):
    from tests.shards import workers

    jobs = read_cohort(synth_cohort)[:3]
    monkeypatch.setenv("TEST_EXTRACT_PIDS", str(tmp_path))
    with caplog.at_level("WARNING", logger="python_task"):
        report = extract_cohort(jobs, tmp_path / "out", ExtractParams(), workers=2, progress=False,
                                _worker_start=workers.die_at_start)
    assert report.ok, report.failed
    assert _manifest_ids(tmp_path / "out") == sorted(j.slide_id for j in jobs)
    assert "killed by SIGKILL" in caplog.text and "the pool is started again" in caplog.text


# --------------------------------------------------------------------------------------------- one writer per folder

def test_a_second_run_on_a_folder_in_use_is_refused(synth_cohort, tmp_path):
    import os

    from python_task.errors import BusyError
    from python_task.fileio import folder_lock

    jobs = read_cohort(synth_cohort)[:1]
    with folder_lock(tmp_path, "another extract"):
        with pytest.raises(BusyError, match=f"in use by another run \\(another extract, pid {os.getpid()}"):
            extract_cohort(jobs, tmp_path, ExtractParams(), progress=False)
    assert not list(tmp_path.glob("*.h5"))
    extract_cohort(jobs, tmp_path, ExtractParams(), progress=False)  # released: the folder is free again
    assert not (tmp_path / ".python_task.lock").exists()


def test_other_settings_need_overwrite_and_never_mix_in_the_manifest(synth_cohort, tmp_path, caplog):
    jobs = read_cohort(synth_cohort)[:2]
    extract_cohort(jobs, tmp_path, ExtractParams(), progress=False)
    strict = ExtractParams(min_coverage=0.9)
    with pytest.raises(TaskError, match=r"extract.json: .*other settings \(`min_coverage` 0.5 there, 0.9 now\)"):
        extract_cohort(jobs[:1], tmp_path, strict, progress=False)
    with caplog.at_level("WARNING", logger="python_task"):
        report = extract_cohort(jobs[:1], tmp_path, strict, overwrite=True, progress=False)
    assert json.loads((tmp_path / "extract.json").read_text())["params"]["min_coverage"] == 0.9
    assert _manifest_ids(tmp_path) == [jobs[0].slide_id]  # the other slide's shard, made at 0.5, is left out
    assert len(report.left_out) == 1 and jobs[1].slide_id in report.left_out[0] and "left out" in caplog.text
    single = ExtractParams(min_coverage=0.9, slide_mpp=0.5)  # a per-slide setting may differ between slides
    extract_cohort(jobs[1:2], tmp_path, single, overwrite=True, progress=False)
    assert _manifest_ids(tmp_path) == sorted(j.slide_id for j in jobs)
