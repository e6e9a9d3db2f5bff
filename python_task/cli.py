"""The command line: argument parsing only. Each subcommand calls one library function.

Errors the user can fix (:class:`~python_task.errors.TaskError`) are printed as one line on stderr, prefixed by
``error:``, with exit status 1. Anything unexpected is also printed on one line (exit status 2) unless
``--debug`` is given, which shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from python_task.errors import TaskError

Handler = Callable[[argparse.Namespace], int]


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a synthetic cohort of pyramidal TIFF slides with QuPath GeoJSON annotations")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--patients", type=int, default=6, help="number of patients (default 6)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--slide-size", type=int, default=4096, help="level-0 width and height of each slide in px")
    p.add_argument("--mpp", type=float, default=0.5, help="µm per pixel written into the slides (default 0.5)")
    p.add_argument("--stain-variation", type=float, default=1.0,
                   help="strength of per-slide stain variation (0 = none, 1 = default, 2 = strong)")
    p.set_defaults(handler=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from python_task.synth.render import SynthConfig, generate_cohort

    cfg = SynthConfig(patients=args.patients, seed=args.seed, slide_size=args.slide_size, mpp=args.mpp,
                      stain_variation=args.stain_variation)
    cohort_csv = generate_cohort(args.out, cfg)
    print(f"cohort written: {cohort_csv}")
    return 0


def _add_extract(sub: argparse._SubParsersAction) -> None:
    import python_task as d

    p = sub.add_parser("extract", help="cut annotated regions into labelled tiles, one HDF5 shard per slide")
    src = p.add_argument_group("input: a cohort table, or a single slide")
    src.add_argument("--cohort", type=Path, help="cohort.csv (slide_id, patient_id, slide_path, annotation_path)")
    src.add_argument("--slide", type=Path, help="a single slide")
    src.add_argument("--annotations", type=Path, help="its annotation file (QuPath GeoJSON, ASAP XML, ImageScope XML)")
    src.add_argument("--slide-id", help="slide identifier (single slide; default: file stem)")
    src.add_argument("--patient-id", help="patient identifier (single slide; default: the slide id)")
    src.add_argument("--diagnosis", help="slide diagnosis (single slide; optional)")
    p.add_argument("--out", required=True, type=Path, help="output folder for shards and manifest.csv")
    p.add_argument("--labels", type=Path, help="labels YAML mapping annotation classes to target classes")
    p.add_argument("--ignore-unknown", action="store_true", help="skip regions whose class is not in the labels")
    p.add_argument("--tile-size", type=int, default=d.DEFAULT_TILE_SIZE, help=f"tile size in px (default {d.DEFAULT_TILE_SIZE})")
    p.add_argument("--mpp", type=float, default=d.DEFAULT_MPP, help=f"target µm per pixel (default {d.DEFAULT_MPP})")
    p.add_argument("--slide-mpp", type=float, help="µm/px of level 0 when the slide's metadata lacks it")
    p.add_argument("--min-coverage", type=float, default=d.DEFAULT_MIN_COVERAGE,
                   help=f"least fraction of a tile inside its region (default {d.DEFAULT_MIN_COVERAGE})")
    p.add_argument("--min-tissue", type=float, default=d.DEFAULT_MIN_TISSUE,
                   help=f"least fraction of a tile that is tissue (default {d.DEFAULT_MIN_TISSUE})")
    p.add_argument("--stride", type=int, help="grid step in output px (default: the tile size, no overlap)")
    p.add_argument("--codec", choices=("jpeg", "raw"), default=d.DEFAULT_CODEC, help=f"tile storage (default {d.DEFAULT_CODEC})")
    p.add_argument("--quality", type=int, default=d.DEFAULT_QUALITY, help=f"JPEG quality (default {d.DEFAULT_QUALITY})")
    p.add_argument("--offset", type=float, nargs=2, metavar=("DX", "DY"), default=(0.0, 0.0),
                   help="add (DX, DY) level-0 px to every annotation coordinate (annotations drawn on a parent slide)")
    p.add_argument("--workers", type=int, default=1, help="slides processed in parallel (default 1)")
    p.add_argument("--reader", choices=("auto", "openslide", "tiff"), default="auto",
                   help="pixel reader: a direct TIFF tile decoder where possible (auto), or always openslide")
    p.add_argument("--overwrite", action="store_true", help="redo slides whose shard already exists")
    p.set_defaults(handler=_run_extract)


def _run_extract(args: argparse.Namespace) -> int:
    from python_task.shards.extract import ExtractParams, SlideJob, extract_cohort, read_cohort

    params = ExtractParams(tile_size=args.tile_size, mpp=args.mpp, min_coverage=args.min_coverage,
                           min_tissue=args.min_tissue, stride=args.stride, codec=args.codec,
                           quality=args.quality, labels=args.labels, ignore_unknown=args.ignore_unknown,
                           slide_mpp=args.slide_mpp, reader=args.reader, offset=tuple(args.offset))
    if (args.cohort is None) == (args.slide is None):
        raise TaskError("extract", "give either --cohort CSV or --slide PATH with --annotations PATH")
    if args.cohort is not None:
        jobs = read_cohort(args.cohort)
    else:
        if args.annotations is None:
            raise TaskError(args.slide, "--annotations PATH is required with --slide")
        slide_id = args.slide_id or args.slide.stem
        jobs = [SlideJob(slide_id=slide_id, patient_id=args.patient_id or slide_id, slide_path=args.slide,
                         annotation_path=args.annotations, diagnosis=args.diagnosis or "")]
    report = extract_cohort(jobs, args.out, params, workers=args.workers, overwrite=args.overwrite)
    return 0 if report.ok else 1


def _add_split(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("split", help="patient-level K folds, stratified by diagnosis, saved as JSON")
    p.add_argument("--shards", required=True, type=Path, help="folder of shards with manifest.csv")
    p.add_argument("--folds", required=True, type=int, help="number of folds K")
    p.add_argument("--out", required=True, type=Path, help="splits JSON file to write")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(handler=_run_split)


def _run_split(args: argparse.Namespace) -> int:
    from python_task.data.splits import make_splits, write_splits

    splits = make_splits(args.shards, args.folds, seed=args.seed)
    write_splits(splits, args.out)
    for fold in splits["folds"]:
        counts = fold["tile_counts"]
        print(f"fold {fold['fold']}: validation patients {', '.join(fold['val_patients'])}; tiles train "
              f"{counts['train']}, val {counts['val']}", file=sys.stderr)
    print(f"splits written: {args.out}")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    from python_task.training.loop import AUGMENT_ENGINES as ENGINES
    from python_task.training.loop import OPTIMIZERS

    p = sub.add_parser("train", help="train and evaluate one model on one fold (one experiment point)")
    p.add_argument("--shards", required=True, type=Path, help="folder of shards with manifest.csv")
    p.add_argument("--splits", required=True, type=Path, help="splits JSON from `split`")
    p.add_argument("--fold", required=True, type=int, help="validation fold")
    p.add_argument("--arch", required=True, help="architecture name (see --list-archs)")
    p.add_argument("--out", required=True, type=Path, help="output folder (re-running resumes it)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--epochs", type=int, default=10, help="maximum epochs (default 10)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="optimiser (default adam)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="weight decay (default 0)")
    p.add_argument("--dropout", type=float, default=0.3, help="dropout before the classifier (default 0.3)")
    p.add_argument("--augment", default="none", help="comma-separated augmentations, e.g. flip,rot90,elastic,hed")
    p.add_argument("--augment-on", choices=ENGINES, default="auto",
                   help="where augmentation runs: pipeline (OpenCV in the reader threads, fast on a CPU), model "
                        "(Keras layers on the backend's device), auto (model with a GPU, else pipeline)")
    p.add_argument("--stain", default="none", help="stain normalisation: none, macenko, reinhard")
    p.add_argument("--stain-reference", type=Path, help="reference tile (image or .npy) for stain normalisation")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--weights", type=Path, help="pretrained weights from a local file (never downloaded)")
    p.add_argument("--freeze-backbone", action="store_true", help="train only the head")
    p.add_argument("--unfreeze-at", type=int, default=0, help="epoch at which a frozen backbone is fine-tuned")
    p.add_argument("--input-size", type=int, help="resize tiles to this size inside the model (default: tile size)")
    p.add_argument("--balance", choices=("none", "oversample", "undersample"), default="none",
                   help="class balancing of training batches")
    p.add_argument("--class-weights", action="store_true", help="weight the loss by inverse class frequency")
    p.add_argument("--patience", type=int, default=5, help="early-stopping patience in epochs, 0 = off (default 5)")
    p.add_argument("--mixed-precision", choices=("auto", "on", "off"), default="auto",
                   help="mixed float16 (auto: on when a GPU is present)")
    p.add_argument("--max-train-tiles", type=int, default=0, help="seeded random subset of training tiles (0 = all)")
    p.add_argument("--max-val-tiles", type=int, default=0, help="seeded random subset of validation tiles (0 = all)")
    p.add_argument("--base-filters", type=int, default=32, help="width of simple_cnn / unet_encoder (default 32)")
    p.add_argument("--workers", type=int, default=2, help="threads reading tiles (default 2)")
    p.add_argument("--elastic-alpha", type=float, help="elastic deformation magnitude in px")
    p.add_argument("--elastic-sigma", type=float, help="elastic deformation smoothness in px")
    p.add_argument("--rotate-degrees", type=float, help="range of free rotations in degrees")
    p.add_argument("--scale-range", type=float, help="range of random scaling (0.1 = ±10%%)")
    p.add_argument("--hed-sigma", type=float, help="HED jitter: multiplicative range per stain")
    p.add_argument("--hed-bias", type=float, help="HED jitter: additive range per stain")
    p.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard logs")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(handler=_run_train)


AUGMENT_OPTION_FLAGS = ("elastic_alpha", "elastic_sigma", "rotate_degrees", "scale_range", "hed_sigma", "hed_bias")


def _run_train(args: argparse.Namespace) -> int:
    from python_task.training.loop import TrainConfig, train

    options = {k: getattr(args, k) for k in AUGMENT_OPTION_FLAGS if getattr(args, k) is not None}
    cfg = TrainConfig(shards=args.shards, splits=args.splits, fold=args.fold, arch=args.arch, out=args.out,
                      lr=args.lr, batch_size=args.batch_size, epochs=args.epochs, optimizer=args.optimizer,
                      weight_decay=args.weight_decay, dropout=args.dropout, augment=args.augment,
                      augment_on=args.augment_on, stain=args.stain,
                      stain_reference=args.stain_reference, seed=args.seed, weights=args.weights,
                      freeze_backbone=args.freeze_backbone, unfreeze_at=args.unfreeze_at,
                      input_size=args.input_size, balance=args.balance, class_weights=args.class_weights,
                      patience=args.patience, mixed_precision=args.mixed_precision,
                      max_train_tiles=args.max_train_tiles, max_val_tiles=args.max_val_tiles,
                      base_filters=args.base_filters, workers=args.workers, tensorboard=not args.no_tensorboard,
                      verbose=not args.quiet, augment_options=options)
    train(cfg)
    print(f"metrics written: {args.out / 'metrics.json'}")
    return 0


def _add_augment_preview(sub: argparse._SubParsersAction) -> None:
    from python_task.training.loop import AUGMENT_ENGINES as ENGINES

    p = sub.add_parser("augment-preview", help="draw original and augmented tiles side by side (PNG)")
    p.add_argument("--shards", required=True, type=Path, help="folder of shards")
    p.add_argument("--out", required=True, type=Path, help="PNG file to write")
    p.add_argument("--augment", default="flip,rot90,elastic,hed", help="augmentations to show")
    p.add_argument("--augment-on", choices=ENGINES, default="auto",
                   help="which implementation draws them (as train's --augment-on)")
    p.add_argument("--stain", default="none", help="stain normalisation to apply first")
    p.add_argument("--tiles", type=int, default=6, help="number of original tiles (rows)")
    p.add_argument("--columns", type=int, default=4, help="augmented versions per tile")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.set_defaults(handler=_run_augment_preview)


def _run_augment_preview(args: argparse.Namespace) -> int:
    from python_task.transforms.preview import render_preview

    path = render_preview(args.shards, args.out, augment=args.augment, stain=args.stain, n=args.tiles,
                          columns=args.columns, seed=args.seed, engine=args.augment_on)
    print(f"preview written: {path}")
    return 0


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run a YAML plan of train points locally; results.csv with one row per point")
    p.add_argument("plan", type=Path, help="PLAN.yaml (shards, splits, factors, fixed, optional random)")
    p.add_argument("--out", required=True, type=Path, help="output folder: results.csv and points/")
    p.add_argument("--jobs", type=int, default=1, help="points run in parallel (default 1)")
    p.set_defaults(handler=_run_sweep)


def _run_sweep(args: argparse.Namespace) -> int:
    from python_task.experiments.sweep import run_sweep

    report = run_sweep(args.plan, args.out, jobs=args.jobs)
    print(f"results written: {report.results_csv}")
    return 1 if report.failed else 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="heat-map of the probability of malignancy over a whole slide")
    p.add_argument("--model", required=True, type=Path, help="model.keras from train (its config.json beside it)")
    p.add_argument("--slide", required=True, type=Path, help="the slide")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--annotations", type=Path, help="score only tiles inside these regions; outlines drawn")
    p.add_argument("--offset", type=float, nargs=2, metavar=("DX", "DY"), default=(0.0, 0.0),
                   help="add (DX, DY) level-0 px to every annotation coordinate")
    p.add_argument("--slide-mpp", type=float, help="µm/px of level 0 when the slide's metadata lacks it")
    p.add_argument("--batch-size", type=int, default=64, help="tiles per inference batch (default 64)")
    p.add_argument("--min-tissue", type=float, default=0.5, help="least tissue fraction of a scored tile")
    p.add_argument("--min-coverage", type=float, default=0.5, help="least fraction inside a region (--annotations)")
    p.add_argument("--stride", type=int, help="grid step in tile px (default: the tile size)")
    p.add_argument("--reader", choices=("auto", "openslide", "tiff"), default="auto", help="pixel reader")
    p.set_defaults(handler=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from python_task.inference.predict import predict_slide

    s = predict_slide(args.model, args.slide, args.out, annotations=args.annotations, slide_mpp=args.slide_mpp,
                      batch_size=args.batch_size, min_tissue=args.min_tissue, min_coverage=args.min_coverage,
                      stride=args.stride, offset=tuple(args.offset), reader_name=args.reader)
    print(f"{args.slide.name}: {s['n_tiles']} tiles, slide score {s['slide_score']:.3f}, predicted "
          f"{s['predicted_diagnosis']} ({s['tiles_per_second']:.0f} tiles/s); outputs in {args.out}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole chain on a synthetic cohort: synth, extract, split, sweep, report, "
                                    "predict")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--patients", type=int, default=6, help="synthetic patients (default 6)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per training point (default 3)")
    p.add_argument("--jobs", type=int, default=1, help="training points run in parallel (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from python_task.experiments.demo import DemoConfig, run_demo

    run_demo(args.out, DemoConfig(patients=args.patients, epochs=args.epochs, jobs=args.jobs, seed=args.seed))
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="summarise a sweep's results table: summary.csv, report.html, PNG figures")
    p.add_argument("results", type=Path, metavar="RESULTS.csv",
                   help="results table: results.csv from sweep, or an OpenMOLE CSVHook file (one row per point)")
    p.add_argument("--out", required=True, type=Path, help="output folder: report.html, summary.csv, *.png")
    p.add_argument("--metric", default="val_patient_auc",
                   help="metric that ranks the configurations (default val_patient_auc; *loss and *seconds "
                        "rank lowest first)")
    p.set_defaults(handler=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from python_task.experiments.report import make_report

    path = make_report(args.results, args.out, metric=args.metric)
    print(f"report written: {path}")
    return 0


SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_synth, _add_extract, _add_split, _add_train, _add_augment_preview, _add_sweep, _add_predict, _add_report, _add_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m python_task",
        description="Annotated whole-slide images to tile shards, CNN training, sweeps, heat-maps and reports.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="more log output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    handler: Handler = args.handler
    try:
        return handler(args)
    except TaskError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI promises one line, whatever the failure
        if args.debug or os.environ.get("PYTHON_TASK_DEBUG"):
            raise
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {args.command}: {type(exc).__name__}: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
