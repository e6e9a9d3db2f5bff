"""Benchmark the training input pipeline against Keras ``image_dataset_from_directory`` over PNG files.

    python benchmarks/bench_input.py [--patients 4] [--slide-size 4096] [--stride 128] [--out bench_out] [--quick]

Extracts a synthetic cohort into JPEG shards (tiles of 256 px, by default with a stride of 128 px so that a small
cohort gives ~2,400 tiles), writes the same tiles once as PNG files into two class folders, and measures in one
run, on the TensorFlow backend, CPU:

(a) tiles/s delivered by our pipeline: ``iterate_batches(ShardBatches(batch 64, shuffle, no augmentation),
    threads=2)`` over an epoch, batches as ``train`` gets them (uint8: the model casts on its device), from the
    JPEG shards (the default codec; JPEG decoding is the bound: see the read + decode and decode-only rates);
(b) tiles/s of ``keras.utils.image_dataset_from_directory`` over the PNG files (batch 64, shuffle, image_size 256,
    each batch converted to numpy): the common practice, the baseline of every ratio. (a) and (b) alternate
    ``--repeats`` times and are averaged, since the machine is shared and noisy;
(c) the pipeline plus augmentation, one method at a time (flip, rot90, rotate, scale, elastic, grid, hed) and
    flip+rot90+elastic+hed together, on the engine ``train`` uses on a CPU (``--augment-on pipeline``: OpenCV in
    the reader threads, :class:`python_task.transforms.augment_cv.PipelineAugmenter`); and the combination on the Keras
    layers (``--augment-on model``, what a GPU node uses), run per batch in training mode and compiled by the
    backend (``augment_function``), with XLA and without (``train`` gets the latter on TensorFlow: its op
    determinism turns XLA off);
(d) the pipeline with stain normalisation off / Macenko / Reinhard (fitted on 16 tiles, applied in the reader
    threads);
(e) training images/s of ``simple_cnn`` and ``resnet50`` at the tile size (``train_on_batch``, batch 32, after
    warm-up, set up as ``train`` does: float32, op determinism);
(f) the fraction of a ``simple_cnn`` training step spent waiting for data, without and with flip+rot90+elastic+hed
    in the reader threads (does augmentation starve training?), measured two ways:
    - wait: a training loop as ``fit`` runs it (2 reader threads, 4 batches in flight, ``train_on_batch``), timing
      how long each step blocks on its next batch; fraction = blocked / loop time;
    - slowdown: Keras ``fit`` for N steps on the ShardBatches vs on an in-memory batch served the same way;
      1 - cached / real, clipped at 0. On a CPU-only machine this also counts the cores the reader threads take
      from the training step (decoding and augmenting are work: on two cores, every ms of it lengthens the step),
      which a GPU node does not pay.

Targets: (a) >= 5 x (b); flip+rot90+elastic+hed pipeline >= 3 x (b);
data wait < 10 % of a step, without and with that augmentation (the slowdown is reported beside it).
Also reported: read + decode on one thread (what one core delivers: the ceiling of (a) is about twice that on two
cores), the one-thread JPEG decode rate of 256 of the same tiles decoded again and again (cache-hot: the decoder
alone), the bytes per tile of both formats, and the one-thread cost per tile of each step of flip+rot90+elastic+hed
(HED, elastic field and fixed-point maps, remap) and of the whole.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import conclude, scratch_folder, write_report  # noqa: E402

AUG_SINGLE = ("flip", "rot90", "rotate", "scale", "elastic", "grid", "hed")
AUG_COMBINED = "flip,rot90,elastic,hed"
STAIN_METHODS = ("none", "macenko", "reinhard")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- data

def build_tiles(work: Path, args) -> tuple[Path, float]:
    """Synthetic cohort -> JPEG shards; returns the shard folder and the seconds it took."""
    from python_task.shards.extract import extract_cohort
    from python_task.shards.params import ExtractParams
    from python_task.synth.cohort import generate_cohort
    from python_task.synth.config import SynthConfig
    from python_task.wsi.cohort import read_cohort

    t0 = time.perf_counter()
    cohort = generate_cohort(work / "cohort", SynthConfig(patients=args.patients, seed=args.seed,
                                                          slide_size=args.slide_size))
    shards = work / "shards"
    params = ExtractParams(tile_size=args.tile_size, mpp=0.5, stride=args.stride, codec="jpeg")
    report = extract_cohort(read_cohort(cohort), shards, params, workers=2, progress=False)
    if not report.ok:
        raise RuntimeError(f"extract failed: {[r.message for r in report.failed]}")
    return shards, time.perf_counter() - t0


def subset(index, n: int, seed: int):
    """A seeded random subset of ``n`` tiles of a TileIndex (all of them when it is smaller)."""
    if len(index) <= n:
        return index
    keep = np.sort(np.random.default_rng(seed).choice(len(index), n, replace=False))
    return dataclasses.replace(index, shard=index.shard[keep], tile=index.tile[keep], labels=index.labels[keep],
                               slide_ids=index.slide_ids[keep], patient_ids=index.patient_ids[keep],
                               coords=index.coords[keep])


def write_png_folder(index, root: Path) -> tuple[float, float]:
    """Every tile of ``index`` as ``root/<class>/<n>.png`` (PIL defaults, two threads: PIL releases the GIL while
    it compresses). Returns (seconds, mean bytes per tile)."""
    from PIL import Image

    from python_task.data.dataset import TileFetcher

    for name in index.label_names:
        (root / name).mkdir(parents=True, exist_ok=True)
    fetcher = TileFetcher(index)

    def save(args) -> None:
        path, tile = args
        Image.fromarray(tile).save(path, format="PNG")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        for start in range(0, len(index), 256):
            pos = np.arange(start, min(start + 256, len(index)))
            tiles = fetcher.fetch(pos)
            jobs = [(root / index.label_names[index.labels[p]] / f"{p:07d}.png", t) for p, t in zip(pos, tiles)]
            list(pool.map(save, jobs))
    seconds = time.perf_counter() - t0
    total = sum(p.stat().st_size for p in root.rglob("*.png"))
    return seconds, total / len(index)


def jpeg_bytes(index, n: int = 256) -> list[bytes]:
    """The stored JPEG bytes of ``n`` tiles spread over the index (one per shard row)."""
    from python_task.shards.format import ShardReader

    out = []
    pos = np.linspace(0, len(index) - 1, min(n, len(index))).astype(int)
    by_shard: dict[int, list[int]] = {}
    for p in pos:
        by_shard.setdefault(int(index.shard[p]), []).append(int(index.tile[p]))
    for s, rows in by_shard.items():
        with ShardReader(index.shards[s].path) as r:
            ds = r.file["images"]
            out.extend(ds[row].tobytes() for row in rows)
    return out


# --------------------------------------------------------------------------------------------- measurements

def pipeline_rate(index, batch_size: int, seed: int, transform=None, augment=None) -> float:
    """Tiles/s of one epoch of ShardBatches (shuffled) through iterate_batches, optionally augmented per batch,
    batches as ``train`` gets them (``dtype=None``: uint8, cast by the model on its device)."""
    from python_task.data.dataset import ShardBatches, iterate_batches

    batches = ShardBatches(index, batch_size, shuffle=True, seed=seed, transform=transform, workers=2,
                           drop_remainder=augment is not None, dtype=None)
    n = 0
    t0 = time.perf_counter()
    for x, _y in iterate_batches(batches, threads=2):
        if augment is not None:
            x = augment(x)
        n += len(x)
    return n / (time.perf_counter() - t0)


def png_rate(root: Path, batch_size: int, tile_size: int, seed: int, batches: int | None = None) -> float:
    """Tiles/s of one epoch (or of ``batches`` batches) of ``image_dataset_from_directory`` over ``root``,
    batches converted to numpy."""
    import keras

    ds = keras.utils.image_dataset_from_directory(str(root), batch_size=batch_size, image_size=(tile_size, tile_size),
                                                  shuffle=True, seed=seed, verbose=False)
    if batches is not None:
        ds = ds.take(batches)
    n = 0
    t0 = time.perf_counter()
    for x, y in ds:
        x, y = x.numpy(), y.numpy()
        n += len(x)
    return n / (time.perf_counter() - t0)


def fetch_rate(index, batch_size: int, threads: int = 2) -> float:
    """Tiles/s of TileFetcher.fetch alone (uint8, no float32 conversion), shuffled batches on ``threads``
    threads: what the reading and decoding cost, for comparison with the whole pipeline."""
    from python_task.data.dataset import TileFetcher

    fetcher = TileFetcher(index)
    order = np.random.default_rng(7).permutation(len(index))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        n = sum(len(x) for x in pool.map(fetcher.fetch, chunks))
    return n / (time.perf_counter() - t0)


def decode_rate(data: list[bytes], seconds: float = 1.5) -> float:
    import imagecodecs

    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for d in data:
            imagecodecs.jpeg8_decode(d)
        n += len(data)
    return n / (time.perf_counter() - t0)


def augment_step_costs(sub, n: int = 64, seconds: float = 0.5) -> dict[str, float]:
    """Milliseconds per tile, one thread, of each step of flip+rot90+elastic+hed on the pipeline engine (OpenCV),
    and of the whole of it, on ``n`` real tiles of ``sub``: where the augmented pipeline's time goes."""
    import cv2

    from python_task.data.dataset import TileFetcher
    from python_task.transforms.augment_cv import PipelineAugmenter, _pixel_grid, apply_hed

    tiles = TileFetcher(sub).fetch(np.arange(min(n, len(sub))))
    h, w = tiles.shape[1:3]
    aug = PipelineAugmenter(AUG_COMBINED)
    rng = np.random.default_rng(0)
    std = aug.elastic_alpha / 4
    maps = cv2.add(_pixel_grid(h, w), aug._elastic_field(h, w, std, rng))
    xy, frac = cv2.convertMaps(maps, None, cv2.CV_16SC2)
    scale, shift = np.array([1.03, 0.97, 1.02]), np.array([0.01, -0.01, 0.0])
    steps = {
        "hed": lambda t: apply_hed(t, scale, shift),
        "elastic field + fixed-point maps": lambda t: cv2.convertMaps(
            cv2.add(_pixel_grid(h, w), aug._elastic_field(h, w, std, rng)), None, cv2.CV_16SC2),
        "remap": lambda t: cv2.remap(t, xy, frac, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101),
        AUG_COMBINED: lambda t: aug.augment_tile(t, rng),
    }
    out = {}
    for name, step in steps.items():
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for t in tiles:
                step(t)
            done += len(tiles)
        out[name] = 1000 * (time.perf_counter() - t0) / done
        log(f"  one thread, {name:<32}: {out[name]:.3f} ms a tile")
    return out


def pipeline_augment_rates(sub, batch_size: int, specs: list[str]) -> dict[str, float]:
    """Tiles/s of the pipeline over ``sub`` with each augmentation spec run in the reader threads (OpenCV)."""
    from python_task.transforms.augment_cv import PipelineAugmenter

    out = {}
    for k, spec in enumerate(specs):
        out[spec] = pipeline_rate(sub, batch_size, seed=150 + k, transform=PipelineAugmenter(spec))
        log(f"  augment {spec:<24} pipeline : {out[spec]:7.0f} tiles/s")
    return out


def augment_rates(sub, batch_size: int, jit: bool, specs: list[str]) -> dict[str, float]:
    """Tiles/s of the pipeline over ``sub`` with each augmentation spec run by the Keras layers after the
    pipeline (in the consuming thread), compiled once per spec before timing."""
    from python_task.data.dataset import TileFetcher
    from python_task.transforms.augment_layers import augment_function, build_augmenter
    from python_task.transforms.augmentations import parse_augment

    warm = TileFetcher(sub).fetch(np.arange(batch_size)).astype(np.float32)
    out = {}
    for k, spec in enumerate(specs):
        fn = augment_function(build_augmenter(parse_augment(spec), seed=k), jit_compile=jit)
        fn(warm)
        out[spec] = pipeline_rate(sub, batch_size, seed=100 + k, augment=fn)
        log(f"  augment {spec:<24} xla={jit!s:<5}: {out[spec]:7.0f} tiles/s")
    return out


def stain_rates(sub, batch_size: int) -> tuple[dict[str, float], dict[str, float]]:
    from python_task.data.dataset import TileFetcher
    from python_task.transforms.stain import StainTransform, make_normalizer

    reference = TileFetcher(sub).fetch(np.sort(np.random.default_rng(17).choice(len(sub), min(16, len(sub)),
                                                                                  replace=False)))
    rates, passthrough = {}, {}
    for k, method in enumerate(STAIN_METHODS):
        transform = None
        if method != "none":
            transform = StainTransform(make_normalizer(method).fit(reference))
        rates[method] = pipeline_rate(sub, batch_size, seed=200 + k, transform=transform)
        passthrough[method] = transform.fraction if transform is not None else 0.0
        log(f"  stain {method:<9}: {rates[method]:7.0f} tiles/s")
    return rates, passthrough


def train_rates(index, archs: list[str], tile_size: int, batch: int, steps: int) -> tuple[dict, dict]:
    """Training images/s per architecture (train_on_batch on a real batch, after warm-up) and the models."""
    import keras

    from python_task.data.dataset import TileFetcher
    from python_task.training.models import build_model

    x = TileFetcher(index).fetch(np.arange(min(batch, len(index)))).astype(np.float32)
    y = index.labels[:len(x)].astype(np.float32)[:, None]
    rates, models = {}, {}
    for arch in archs:
        t0 = time.perf_counter()
        model = build_model(arch, tile_size, seed=0)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.BinaryCrossentropy(),
                      jit_compile="auto")
        model.train_on_batch(x, y)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(steps):
            model.train_on_batch(x, y)
        rates[arch] = {"images_per_s": steps * len(x) / (time.perf_counter() - t0), "batch": len(x),
                       "steps": steps, "warmup_s": warm}
        log(f"  train {arch:<12}: {rates[arch]['images_per_s']:7.2f} images/s (warm-up {warm:.0f} s)")
        models[arch] = model
    return rates, models


def loop_wait(model, index, batch: int, steps: int, repeats: int, transform=None, label: str = "") -> dict:
    """A training loop fed as ``fit`` feeds it (2 reader threads, 4 batches in flight): the share of the loop's
    time spent blocked on the next batch. The first batch (pipeline start-up) is not counted."""
    from python_task.data.dataset import ShardBatches, iterate_batches

    waited, total, done = 0.0, 0.0, 0
    for r in range(repeats):
        batches = ShardBatches(index, batch, shuffle=True, seed=400 + r, workers=2, drop_remainder=True,
                               transform=transform, dtype=None)
        n = min(steps, len(batches) - 1)
        gen = iterate_batches(batches, threads=2)
        next(gen)
        t_start = time.perf_counter()
        for _ in range(n):
            t0 = time.perf_counter()
            x, y = next(gen)
            waited += time.perf_counter() - t0
            model.train_on_batch(x, y)
        total += time.perf_counter() - t_start
        done += n
        gen.close()
    fraction = waited / total if total > 0 else 0.0
    log(f"  loop {done} steps{label}: {total / max(done, 1):.3f} s/step, blocked on data "
        f"{1000 * waited / max(done, 1):.1f} ms/step -> wait {100 * fraction:.1f} %")
    return {"steps": done, "batch": batch, "repeats": repeats, "seconds": total, "waited_seconds": waited,
            "step_seconds": total / max(done, 1), "fraction": fraction}


def fit_slowdown(model, index, batch: int, steps: int, repeats: int, transform=None, label: str = "") -> dict:
    """Keras fit on the ShardBatches (as ``train`` makes them, optionally with a reader-thread ``transform``) vs
    on one cached batch served by a PyDataset the same way (2 threads)."""
    import keras

    from python_task.data.dataset import ShardBatches, TileFetcher

    x = TileFetcher(index).fetch(np.arange(batch))
    y = index.labels[:batch].astype(np.float32)[:, None]

    class Cached(keras.utils.PyDataset):
        def __init__(self, n: int) -> None:
            super().__init__(workers=2, use_multiprocessing=False, max_queue_size=4)
            self.n = n

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, i):
            return x, y

    def timed_fit(data) -> float:
        t0 = time.perf_counter()
        model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
        return time.perf_counter() - t0

    timed_fit(Cached(2 * steps))  # traces the fit path once
    real, cached = [], []
    for r in range(repeats):  # alternate which goes first, so that a drift in the machine's load cancels
        for kind in (("real", "cached") if r % 2 == 0 else ("cached", "real")):
            if kind == "real":
                real.append(timed_fit(ShardBatches(index, batch, shuffle=True, seed=300 + r, workers=2,
                                                   drop_remainder=True, transform=transform, dtype=None)))
            else:
                cached.append(timed_fit(Cached(2 * steps)))
    fraction = max(0.0, 1.0 - sum(cached) / sum(real))
    log(f"  fit {steps} steps{label}: real data {np.mean(real):.2f} s, cached batch {np.mean(cached):.2f} s "
        f"-> fit slowdown {100 * fraction:.1f} %")
    return {"steps": steps, "batch": batch, "repeats": repeats, "real_seconds": real, "cached_seconds": cached,
            "step_seconds_real": sum(real) / (steps * repeats), "step_seconds_cached": sum(cached) / (steps * repeats),
            "fraction": fraction}


# --------------------------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=4, help="patients of the synthetic cohort (default 4)")
    ap.add_argument("--slide-size", type=int, default=4096, help="synthetic slide size in px (default 4096)")
    ap.add_argument("--tile-size", type=int, default=256, help="tile size in px (default 256)")
    ap.add_argument("--stride", type=int, default=128, help="tiling stride in px (default 128: overlapping tiles)")
    ap.add_argument("--batch-size", type=int, default=64, help="pipeline batch size (default 64)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating epochs of (a) and (b) (default 3)")
    ap.add_argument("--aug-batches", type=int, default=12,
                    help="batches per augmentation / stain measurement (default 12)")
    ap.add_argument("--train-archs", default="simple_cnn,resnet50", help="architectures for training images/s")
    ap.add_argument("--train-batch", type=int, default=32, help="training batch (default 32)")
    ap.add_argument("--train-steps", type=int, default=2, help="timed train_on_batch steps (default 2)")
    ap.add_argument("--resnet-steps", type=int, default=1, help="timed steps for resnet50 (slow on CPU; default 1)")
    ap.add_argument("--wait-steps", type=int, default=20,
                    help="training steps per data-wait measurement (default 20)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench_out"), help="where the JSON report goes")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--quick", action="store_true",
                    help="small and fast (tests): 2 patients of 2048 px, tiles of 128 px, simple_cnn only")
    args = ap.parse_args()
    if args.quick:
        args.patients, args.slide_size, args.tile_size, args.stride = 2, 2048, 128, 64
        args.repeats, args.aug_batches, args.train_archs = 1, 2, "simple_cnn"
        args.train_steps, args.wait_steps = 1, 2

    load_start = os.getloadavg()
    t_start = time.perf_counter()
    with scratch_folder("bench_input_", keep=args.keep) as work:
        shards, build_s = build_tiles(work, args)
        from python_task.data.dataset import build_index

        index = build_index(shards)
        n = len(index)
        log(f"built {n} tiles of {args.tile_size} px ({index.class_counts()}) in {build_s:.0f} s")
        png_root = work / "png"
        png_write_s, png_bpt = write_png_folder(index, png_root)
        jpeg_data = jpeg_bytes(index, 256)
        jpeg_bpt = float(np.mean([len(d) for d in jpeg_data]))
        log(f"wrote {n} PNG files in {png_write_s:.0f} s")

        # (a) and (b), alternating; the first pipeline epoch after a short warm-up of the page cache
        # (and of the PNG path: its first batches trace TensorFlow's input graph)
        pipeline_rate(subset(index, 4 * args.batch_size, 1), args.batch_size, seed=99)
        png_rate(png_root, args.batch_size, args.tile_size, seed=99, batches=4)
        pipe, png = [], []
        for r in range(args.repeats):
            pipe.append(pipeline_rate(index, args.batch_size, seed=r))
            png.append(png_rate(png_root, args.batch_size, args.tile_size, seed=r))
            log(f"  epoch {r + 1}: pipeline {pipe[-1]:.0f} tiles/s, PNG folder {png[-1]:.0f} tiles/s")
        pipe_tps, png_tps = float(np.mean(pipe)), float(np.mean(png))
        decode_tps = decode_rate(jpeg_data)
        fetch_tps = fetch_rate(index, args.batch_size)
        fetch1_tps = fetch_rate(index, args.batch_size, threads=1)

        # (c) augmentation and (d) stain, on a fixed random subset of whole batches
        sub = subset(index, args.aug_batches * args.batch_size, seed=5)
        base_a = pipeline_rate(sub, args.batch_size, seed=50, augment=lambda b: b)
        aug = pipeline_augment_rates(sub, args.batch_size, [*AUG_SINGLE, AUG_COMBINED])
        step_ms = augment_step_costs(sub)
        base_b = pipeline_rate(sub, args.batch_size, seed=51, augment=lambda b: b)
        aug = {"none": (base_a + base_b) / 2, **aug}
        log(f"  augment none (before / after): {base_a:.0f} / {base_b:.0f} tiles/s")
        aug_xla = augment_rates(sub, args.batch_size, True, [AUG_COMBINED])
        aug_nojit = augment_rates(sub, args.batch_size, False, [AUG_COMBINED])
        stain, passthrough = stain_rates(sub, args.batch_size)

        # (e) training speed and (f) data wait, set up as train does (float32, op determinism)
        from python_task.training.loop import configure_backend

        configure_backend(args.seed, "off")
        archs = [a.strip() for a in args.train_archs.split(",") if a.strip()]
        rates = {}
        models = {}
        for arch in archs:
            steps = args.resnet_steps if arch == "resnet50" else args.train_steps
            r, m = train_rates(index, [arch], args.tile_size, args.train_batch, steps)
            rates.update(r)
            if arch == "simple_cnn":
                models.update(m)
        model = models.get("simple_cnn")
        if model is None:
            _, m = train_rates(index, ["simple_cnn"], args.tile_size, args.train_batch, 1)
            model = m["simple_cnn"]
        from python_task.transforms.augment_cv import PipelineAugmenter

        combined_aug = PipelineAugmenter(AUG_COMBINED)
        loop = loop_wait(model, index, args.train_batch, args.wait_steps, args.repeats)
        loop_aug = loop_wait(model, index, args.train_batch, args.wait_steps, args.repeats, transform=combined_aug,
                             label=f" + {AUG_COMBINED}")
        slow = fit_slowdown(model, index, args.train_batch, args.wait_steps, args.repeats)
        slow_aug = fit_slowdown(model, index, args.train_batch, args.wait_steps, args.repeats, transform=combined_aug,
                                label=f" + {AUG_COMBINED}")

        combined = aug[AUG_COMBINED]
        report = {
            "tiles": n, "tile_size": args.tile_size, "class_counts": index.class_counts(),
            "cohort": {"patients": args.patients, "slide_size": args.slide_size, "stride": args.stride,
                       "seed": args.seed, "codec": "jpeg"},
            "batch_size": args.batch_size, "quick": args.quick, "backend": os.environ.get("KERAS_BACKEND"),
            "pipeline_tiles_per_s": pipe_tps, "png_folder_tiles_per_s": png_tps,
            "ratio_pipeline_vs_png": pipe_tps / png_tps,
            "pipeline_epochs_tiles_per_s": pipe, "png_epochs_tiles_per_s": png,
            "jpeg_decode_1_thread_tiles_per_s": decode_tps, "fetch_uint8_2_threads_tiles_per_s": fetch_tps,
            "fetch_uint8_1_thread_tiles_per_s": fetch1_tps,
            "bytes_per_tile_jpeg": jpeg_bpt, "bytes_per_tile_png": png_bpt, "png_write_seconds": png_write_s,
            "augment_tiles": len(sub), "augment_pipeline_tiles_per_s": aug, "augment_step_ms_per_tile": step_ms,
            "augment_pipeline_ratio_vs_png": {k: v / png_tps for k, v in aug.items()},
            "augment_combined": AUG_COMBINED, "augment_combined_tiles_per_s": combined,
            "ratio_augment_combined_vs_png": combined / png_tps,
            "augment_combined_layers_xla_tiles_per_s": aug_xla[AUG_COMBINED],
            "augment_combined_layers_no_xla_tiles_per_s": aug_nojit[AUG_COMBINED],
            "ratio_augment_combined_layers_no_xla_vs_png": aug_nojit[AUG_COMBINED] / png_tps,
            "stain_tiles_per_s": stain, "stain_ratio_vs_png": {k: v / png_tps for k, v in stain.items()},
            "stain_passthrough_fraction": passthrough,
            "train_images_per_s": rates, "data_wait": loop, "data_wait_fraction": loop["fraction"],
            "data_wait_augmented": loop_aug, "data_wait_augmented_fraction": loop_aug["fraction"],
            "slowdown": slow, "slowdown_fraction": slow["fraction"],
            "slowdown_augmented": slow_aug, "slowdown_augmented_fraction": slow_aug["fraction"],
            "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
            "seconds": time.perf_counter() - t_start,
        }
        targets = {"pipeline >= 5 x PNG folder": pipe_tps >= 5 * png_tps,
                   f"pipeline + {AUG_COMBINED} >= 3 x PNG folder": combined >= 3 * png_tps,
                   "data wait < 10 % of a simple_cnn step": loop["fraction"] < 0.10,
                   f"data wait with {AUG_COMBINED} < 10 % of a simple_cnn step": loop_aug["fraction"] < 0.10}
        report["targets"] = targets
        path = write_report(args.out, "bench_input", report)

        print(f"bench_input: {n} synthetic tiles of {args.tile_size} px (JPEG shards / PNG files), batch "
              f"{args.batch_size}, {args.repeats} alternating epochs, load average {load_start[0]:.1f}")
        print(f"  Keras image_dataset_from_directory, PNG : {png_tps:8.0f} tiles/s (baseline)")
        print(f"  our pipeline, shards (no augmentation)  : {pipe_tps:8.0f} tiles/s = {pipe_tps / png_tps:.2f} x "
              f"baseline")
        print(f"  read + decode only (uint8), 2 threads   : {fetch_tps:8.0f} tiles/s = {fetch_tps / png_tps:.2f} x "
              f"baseline (no float32 batch)")
        print(f"  read + decode only (uint8), 1 thread    : {fetch1_tps:8.0f} tiles/s = {1000 / fetch1_tps:.3f} ms a "
              f"tile (2 threads: x{fetch_tps / fetch1_tps:.2f})")
        print(f"  JPEG decode alone, 1 thread, cache-hot  : {decode_tps:8.0f} tiles/s; bytes/tile JPEG "
              f"{jpeg_bpt / 1024:.1f} KiB, PNG {png_bpt / 1024:.1f} KiB")
        print(f"  augmentation in the reader threads, OpenCV (--augment-on pipeline; {len(sub)} tiles each):")
        for k, v in aug.items():
            print(f"    {k:<24}: {v:8.0f} tiles/s = {v / png_tps:.2f} x baseline")
        print("  where the combination's time goes, one thread, ms a tile (JPEG decode alone: "
              f"{1000 / decode_tps:.3f}):")
        for k, v in step_ms.items():
            print(f"    {k:<32}: {v:6.3f}")
        print("  the same combination on the Keras layers (--augment-on model), after the pipeline:")
        for label, v in ((f"{AUG_COMBINED} XLA", aug_xla[AUG_COMBINED]),
                         (f"{AUG_COMBINED} no XLA", aug_nojit[AUG_COMBINED])):
            print(f"    {label:<24}: {v:8.0f} tiles/s = {v / png_tps:.2f} x baseline")
        print("  stain normalisation in the reader threads:")
        for k, v in stain.items():
            print(f"    {k:<24}: {v:8.0f} tiles/s = {v / png_tps:.2f} x baseline "
                  f"(passed through {100 * passthrough[k]:.1f} %)")
        print(f"  training at {args.tile_size} px, CPU:")
        for k, v in rates.items():
            print(f"    {k:<24}: {v['images_per_s']:8.2f} images/s (batch {v['batch']}, {v['steps']} steps)")
        for label, lw, sw in (("", loop, slow), (f" + {AUG_COMBINED}", loop_aug, slow_aug)):
            print(f"  simple_cnn{label}: data wait {100 * lw['fraction']:.1f} % of a step "
                  f"({1000 * lw['waited_seconds'] / max(lw['steps'], 1):.1f} ms of {lw['step_seconds']:.3f} s); "
                  f"fit slowdown vs a cached batch {100 * sw['fraction']:.1f} % "
                  f"({sw['step_seconds_real']:.3f} / {sw['step_seconds_cached']:.3f} s a step: the cores the "
                  f"readers share)")
        return conclude(targets, path, report["seconds"])


if __name__ == "__main__":
    raise SystemExit(main())
