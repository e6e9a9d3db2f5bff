"""Benchmark ``extract`` against a naive openslide ``read_region`` loop over the same tiles.

    python benchmarks/bench_extract.py [--size 18000] [--slides 4] [--out bench_out]

Builds a JPEG-tiled pyramidal TIFF of about ``size`` x ``size`` px at 0.5 µm/px from real pixels (the shared
CMU-1 crop when the real-data folder exists (``SHARED_DATA`` in ``_common``), else a synthetic slide), copies it into a cohort of ``slides``
slides with one region covering the whole slide, and measures in one run:

(a) ``extract`` end to end (read, tissue check, labelling, shard write), 1 and 2 workers;
(b) a naive loop of openslide ``read_region`` over the same tiles, reading only, one process (run before and
    after (a), averaged, since the machine is shared and noisy).

Targets: (a, 1 worker) >= (b); (a, 2 workers) >= 1.7 x (b); peak memory of a worker < 1 GiB; default-codec shard
bytes per tile <= half the PNG bytes of the same tiles (both codecs reported).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from io import BytesIO
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, conclude, run_measured, scratch_folder, write_report  # noqa: E402

EXTRACT_CODE = """
import sys, time
from pathlib import Path
from python_task.shards.extract import extract_cohort
from python_task.shards.params import ExtractParams
from python_task.wsi.cohort import read_cohort
cohort, out, workers, codec = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
jobs = read_cohort(cohort)
t0 = time.perf_counter()
report = extract_cohort(jobs, out, ExtractParams(codec=codec), workers=workers, progress=False)
seconds = time.perf_counter() - t0
assert report.ok, [r.message for r in report.failed]
RESULT = {"seconds": seconds, "tiles": report.n_tiles}
"""

NAIVE_CODE = """
import sys, time, json
import numpy as np, openslide
plan = json.load(open(sys.argv[1]))
n = 0
t0 = time.perf_counter()
for path, coords in plan.items():
    slide = openslide.OpenSlide(path)
    for x, y in coords:
        slide.read_region((x, y), 0, (256, 256))
        n += 1
    slide.close()
RESULT = {"seconds": time.perf_counter() - t0, "tiles": n}
"""


def source_pixels() -> tuple[np.ndarray, str]:
    """Real pixels from the shared CMU-1 crop when present, else a rendered synthetic slide."""
    cmu = SHARED_DATA / "cmu-1-small-region.svs"
    if cmu.exists():
        import openslide

        with openslide.OpenSlide(str(cmu)) as s:
            rgba = np.asarray(s.read_region((0, 0), 0, s.dimensions))
        return np.ascontiguousarray(rgba[..., :3]), f"real pixels of {cmu.name}"
    from python_task.synth.render import render_slide

    rgb, _ = render_slide(np.random.default_rng(0), 2048, "malignant")
    return rgb, "synthetic pixels (shared data absent)"


def build_cohort(work: Path, size: int, n_slides: int) -> tuple[Path, str]:
    from python_task.synth.tiff import write_mirrored_copy

    pixels, origin = source_pixels()
    slides = work / "slides"
    slides.mkdir(parents=True)
    first = slides / "B0.tiff"
    t0 = time.perf_counter()
    write_mirrored_copy(first, pixels, size, size, 0.5)
    print(f"built {first.name}: {size}x{size} px from {origin} in {time.perf_counter() - t0:.1f} s "
          f"({first.stat().st_size / 2**20:.0f} MiB)", file=sys.stderr)
    for k in range(1, n_slides):
        shutil.copyfile(first, slides / f"B{k}.tiff")
    geo = {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {
        "objectType": "annotation", "classification": {"name": "Cholangiocarcinoma"}}, "geometry": {
        "type": "Polygon", "coordinates": [[[0, 0], [size, 0], [size, size], [0, size], [0, 0]]]}}]}
    (work / "region.geojson").write_text(json.dumps(geo))
    cohort = work / "cohort.csv"
    with open(cohort, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "patient_id", "slide_path", "annotation_path", "diagnosis"])
        for k in range(n_slides):
            w.writerow([f"B{k}", f"P{k}", f"slides/B{k}.tiff", "region.geojson", "malignant"])
    return cohort, origin


def tile_plan(shards: Path, cohort: Path) -> dict[str, list[list[int]]]:
    from python_task.shards.format import ShardReader
    from python_task.wsi.cohort import read_cohort

    plan = {}
    for job in read_cohort(cohort):
        with ShardReader(shards / f"{job.slide_id}.h5") as r:
            plan[str(job.slide_path)] = r.field("coords").tolist()
    return plan


def png_bytes_per_tile(shards: Path, n: int = 200) -> float:
    from PIL import Image

    from python_task.shards.format import ShardReader

    shard = sorted(shards.glob("*.h5"))[0]
    with ShardReader(shard) as r:
        idx = np.linspace(0, len(r) - 1, min(n, len(r))).astype(int)
        tiles = r.images(idx)
    total = 0
    for t in tiles:
        buf = BytesIO()
        Image.fromarray(t).save(buf, format="PNG")
        total += buf.tell()
    return total / len(tiles)


def shard_bytes_per_tile(shards: Path, slide_ids: list[str] | None = None) -> float:
    paths = [p for p in shards.glob("*.h5") if slide_ids is None or p.stem in slide_ids]
    from python_task.shards.format import read_shard_info

    return sum(p.stat().st_size for p in paths) / sum(read_shard_info(p).n_tiles for p in paths)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=18000, help="slide width and height in px (default 18000)")
    ap.add_argument("--slides", type=int, default=4, help="slides in the cohort (default 4)")
    ap.add_argument("--out", type=Path, default=Path("bench_out"), help="where the JSON report goes")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()

    with scratch_folder("bench_extract_", keep=args.keep) as work:
        cohort, origin = build_cohort(work, args.size, args.slides)
        naive_code_plan = work / "plan.json"
        runs = {}
        # warm the page cache for everyone alike
        for p in (work / "slides").glob("*.tiff"):
            p.read_bytes()
        runs["extract_1"] = run_measured(EXTRACT_CODE, str(cohort), str(work / "s1"), "1", "jpeg")
        naive_code_plan.write_text(json.dumps(tile_plan(work / "s1", cohort)))
        runs["naive_a"] = run_measured(NAIVE_CODE, str(naive_code_plan))
        runs["extract_2"] = run_measured(EXTRACT_CODE, str(cohort), str(work / "s2"), "2", "jpeg")
        runs["naive_b"] = run_measured(NAIVE_CODE, str(naive_code_plan))
        one = work / "one.csv"
        lines = cohort.read_text().splitlines()
        one.write_text("\n".join(lines[:2]) + "\n")
        runs["extract_raw"] = run_measured(EXTRACT_CODE, str(one), str(work / "raw"), "1", "raw")

        tiles = runs["extract_1"]["tiles"]
        assert runs["extract_2"]["tiles"] == tiles == runs["naive_a"]["tiles"]
        naive_tps = 2 * tiles / (runs["naive_a"]["seconds"] + runs["naive_b"]["seconds"])
        tps1 = tiles / runs["extract_1"]["seconds"]
        tps2 = tiles / runs["extract_2"]["seconds"]
        worker_peak = max(runs["extract_1"]["peak_rss_mib"], runs["extract_2"]["children_peak_rss_mib"])
        jpeg_bpt = shard_bytes_per_tile(work / "s1")
        raw_bpt = shard_bytes_per_tile(work / "raw")
        png_bpt = png_bytes_per_tile(work / "s1")
        report = {
            "slide": f"{args.size}x{args.size} px at 0.5 um/px, JPEG tiles 256, {origin}", "slides": args.slides,
            "tiles": tiles, "naive_read_region_tiles_per_s": naive_tps,
            "extract_1_worker_tiles_per_s": tps1, "extract_2_workers_tiles_per_s": tps2,
            "ratio_1_worker_vs_naive": tps1 / naive_tps, "ratio_2_workers_vs_naive": tps2 / naive_tps,
            "peak_rss_mib_worker": worker_peak, "peak_rss_mib_1_worker_process": runs["extract_1"]["peak_rss_mib"],
            "peak_rss_mib_2_workers_largest_child": runs["extract_2"]["children_peak_rss_mib"],
            "bytes_per_tile_jpeg": jpeg_bpt, "bytes_per_tile_raw": raw_bpt, "bytes_per_tile_png": png_bpt,
            "ratio_jpeg_vs_png_bytes": jpeg_bpt / png_bpt, "ratio_raw_vs_png_bytes": raw_bpt / png_bpt,
            "runs": runs,
        }
        targets = {"1 worker >= naive": tps1 >= naive_tps, "2 workers >= 1.7 x naive": tps2 >= 1.7 * naive_tps,
                   "worker peak < 1 GiB": worker_peak < 1024, "jpeg bytes <= PNG / 2": jpeg_bpt <= png_bpt / 2}
        report["targets"] = targets
        path = write_report(args.out, "bench_extract", report)
        print(f"bench_extract: {report['slide']}, {args.slides} slides, {tiles} tiles")
        print(f"  naive openslide read_region loop : {naive_tps:8.0f} tiles/s (baseline, mean of 2 runs)")
        print(f"  extract, 1 worker                : {tps1:8.0f} tiles/s = {tps1 / naive_tps:.2f} x baseline")
        print(f"  extract, 2 workers               : {tps2:8.0f} tiles/s = {tps2 / naive_tps:.2f} x baseline")
        print(f"  peak memory of a worker          : {worker_peak:8.0f} MiB")
        print(f"  bytes per tile: jpeg {jpeg_bpt / 1024:.1f} KiB, raw {raw_bpt / 1024:.1f} KiB, PNG "
              f"{png_bpt / 1024:.1f} KiB (jpeg/PNG = {jpeg_bpt / png_bpt:.2f}, raw/PNG = {raw_bpt / png_bpt:.2f})")
        return conclude(targets, path)


if __name__ == "__main__":
    raise SystemExit(main())
