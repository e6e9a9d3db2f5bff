"""Benchmark ``predict`` (whole-slide heat-maps): tiles per second and peak memory, and how time scales.

    python benchmarks/bench_predict.py [--size 18000] [--out bench_out] [--quick]

Builds a JPEG-tiled pyramidal TIFF of ``size`` x ``size`` px at 0.5 µm/px from real pixels (the shared CMU-1 crop
mirrored, when the real-data folder exists (``SHARED_DATA`` in ``_common``), else a synthetic rendering; as ``bench_extract`` does) and one of
``2 size`` x ``2 size`` px (four times the area), trains a ``simple_cnn`` for one epoch on a small synthetic
cohort (tiles of 256 px at 0.5 µm/px: the model only has to exist), then runs ``predict_slide`` on every tissue
tile of each slide, each run in a fresh process so that its peak RSS is its own. The small slide runs before and
after the large one and its time is averaged (the machine is shared and noisy; only before in ``--quick``).

Targets: peak memory < 2 GiB for both slides; time(large) <= 4.4 x time(small) (linear in the area: no
quadratic step). The time is the whole ``predict_slide`` call (model load, tissue detection, scoring, the four
outputs), not the interpreter start. Peak memory is the predict process's own high-water mark (``VmHWM``; the
``getrusage`` figure, also in the report, counts the parent's pages copied at fork, before exec). ``--quick`` uses
6k and 12k px slides.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import conclude, run_measured, scratch_folder, write_report  # noqa: E402
from bench_extract import source_pixels  # noqa: E402

PREDICT_CODE = """
import sys, time
from python_task.inference.predict import predict_slide
model, slide, out, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
t0 = time.perf_counter()
s = predict_slide(model, slide, out, batch_size=batch, progress=False)
RESULT = {"seconds": time.perf_counter() - t0, "scoring_seconds": s["seconds"], "n_tiles": s["n_tiles"],
          "slide_dimensions": s["slide_dimensions"], "grid_shape": s["grid"]["shape"]}
try:  # this process's own high-water mark: ru_maxrss also counts the parent's pages copied at fork, before exec
    with open("/proc/self/status") as fh:
        RESULT["vm_hwm_mib"] = next(int(l.split()[1]) for l in fh if l.startswith("VmHWM:")) / 1024
except (OSError, StopIteration):
    pass
"""

TRAIN_CODE = """
import sys
from pathlib import Path
from python_task.data.splits import make_splits, write_splits
from python_task.shards.extract import extract_cohort
from python_task.shards.params import ExtractParams
from python_task.synth.cohort import generate_cohort
from python_task.synth.config import SynthConfig
from python_task.training.config import TrainConfig
from python_task.training.loop import train
from python_task.wsi.cohort import read_cohort
work, seed = Path(sys.argv[1]), int(sys.argv[2])
cohort = generate_cohort(work / "cohort", SynthConfig(patients=4, seed=seed, slide_size=2048))
shards = work / "shards"
report = extract_cohort(read_cohort(cohort), shards, ExtractParams(), workers=2, progress=False)
assert report.ok, [r.message for r in report.failed]
splits = work / "splits.json"
write_splits(make_splits(shards, 2, seed=seed), splits)
m = train(TrainConfig(shards=shards, splits=splits, fold=0, arch="simple_cnn", out=work / "model", epochs=1,
                      batch_size=32, lr=5e-4, seed=seed, max_train_tiles=128, max_val_tiles=64, patience=0,
                      workers=2, verbose=False, tensorboard=False))
RESULT = {"n_params": m["n_params"]}
"""

GIB = 1024.0  # MiB


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_model(work: Path, seed: int) -> tuple[Path, float]:
    """A simple_cnn trained for one epoch on a small synthetic cohort (256-px tiles at 0.5 µm/px), in a child
    process, so that this process stays small (TensorFlow is never imported here)."""
    r = run_measured(TRAIN_CODE, str(work / "train"), str(seed))
    return work / "train" / "model" / "model.keras", r["wall_s"]


def warm_cache(path: Path) -> None:
    """Read a file once (in chunks: nothing stays in this process) so that every run finds it in the page cache."""
    with open(path, "rb") as fh:
        while fh.read(16 << 20):
            pass


def build_slide(path: Path, pixels, size: int) -> float:
    from python_task.synth.tiff import write_mirrored_copy

    t0 = time.perf_counter()
    write_mirrored_copy(path, pixels, size, size, 0.5)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=18000, help="small slide side in px (default 18000); the large "
                    "one is twice that")
    ap.add_argument("--batch-size", type=int, default=64, help="predict batch size (default 64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench_out"), help="where the JSON report goes")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--quick", action="store_true", help="6k and 12k px slides (tests)")
    args = ap.parse_args()
    if args.quick:
        args.size = 6000
    large_size = 2 * args.size

    load_start = os.getloadavg()
    t_start = time.perf_counter()
    with scratch_folder("bench_predict_", keep=args.keep) as work:
        pixels, origin = source_pixels()
        slides = {"small": work / f"S{args.size}.tiff", "large": work / f"S{large_size}.tiff"}
        build_s = {"small": build_slide(slides["small"], pixels, args.size),
                   "large": build_slide(slides["large"], pixels, large_size)}
        del pixels
        for key, p in slides.items():
            log(f"built {p.name} from {origin} in {build_s[key]:.0f} s ({p.stat().st_size / 2**20:.0f} MiB)")
            warm_cache(p)
        model, train_s = train_model(work, args.seed)
        log(f"trained simple_cnn for one epoch in {train_s:.0f} s")

        def predict(key: str, tag: str) -> dict:
            r = run_measured(PREDICT_CODE, str(model), str(slides[key]), str(work / f"pred_{tag}"),
                             str(args.batch_size))
            r["tiles_per_s"] = r["n_tiles"] / r["seconds"]
            r["peak_mib"] = r.get("vm_hwm_mib", r["peak_rss_mib"])
            log(f"  predict {key} ({tag}): {r['n_tiles']} tiles in {r['seconds']:.1f} s = {r['tiles_per_s']:.0f} "
                f"tiles/s, peak RSS {r['peak_mib']:.0f} MiB")
            return r

        runs = {"small_a": predict("small", "a"), "large": predict("large", "l")}
        if not args.quick:  # the small slide again after the large one, against drifts in the machine's load
            runs["small_b"] = predict("small", "b")
        small_runs = [r for k, r in runs.items() if k.startswith("small")]
        small_s = sum(r["seconds"] for r in small_runs) / len(small_runs)
        small_tiles = runs["small_a"]["n_tiles"]
        large_s, large_tiles = runs["large"]["seconds"], runs["large"]["n_tiles"]
        outputs = {p.name: p.stat().st_size for p in (work / "pred_l").iterdir()}
        peak_small = max(r["peak_mib"] for r in small_runs)
        peak_large = runs["large"]["peak_mib"]
        time_ratio = large_s / small_s
        report = {
            "origin": origin, "model": "simple_cnn, 256-px tiles at 0.5 um/px, one epoch", "quick": args.quick,
            "batch_size": args.batch_size,
            "small": {"size": args.size, "n_tiles": small_tiles, "seconds": small_s,
                      "tiles_per_s": small_tiles / small_s, "peak_rss_mib": peak_small,
                      "slide_bytes": slides["small"].stat().st_size, "build_seconds": build_s["small"]},
            "large": {"size": large_size, "n_tiles": large_tiles, "seconds": large_s,
                      "tiles_per_s": large_tiles / large_s, "peak_rss_mib": peak_large,
                      "slide_bytes": slides["large"].stat().st_size, "build_seconds": build_s["large"]},
            "time_ratio_large_vs_small": time_ratio, "tile_ratio_large_vs_small": large_tiles / small_tiles,
            "time_per_tile_ratio": time_ratio / (large_tiles / small_tiles),
            "large_output_bytes": outputs, "runs": runs, "train_seconds": train_s,
            "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
            "seconds": time.perf_counter() - t_start,
        }
        targets = {"peak memory < 2 GiB (small)": peak_small < 2 * GIB,
                   "peak memory < 2 GiB (large)": peak_large < 2 * GIB,
                   "time(large) <= 4.4 x time(small)": time_ratio <= 4.4}
        report["targets"] = targets
        path = write_report(args.out, "bench_predict", report)
        print(f"bench_predict: simple_cnn over every tissue tile (256 px at 0.5 um/px, batch {args.batch_size}); "
              f"slides from {origin}; load average {load_start[0]:.1f}")
        for key in ("small", "large"):
            r = report[key]
            print(f"  {r['size']:>6} x {r['size']:<6} px: {r['n_tiles']:7d} tiles in {r['seconds']:7.1f} s = "
                  f"{r['tiles_per_s']:6.1f} tiles/s, peak RSS {r['peak_rss_mib']:6.0f} MiB")
        print(f"  large / small: time x {time_ratio:.2f}, tiles x {large_tiles / small_tiles:.2f}, time per tile "
              f"x {report['time_per_tile_ratio']:.2f}")
        return conclude(targets, path, report["seconds"])


if __name__ == "__main__":
    raise SystemExit(main())
