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
    from python_task.synth import SynthConfig, generate_cohort

    cfg = SynthConfig(patients=args.patients, seed=args.seed, slide_size=args.slide_size, mpp=args.mpp,
                      stain_variation=args.stain_variation)
    cohort_csv = generate_cohort(args.out, cfg)
    print(f"cohort written: {cohort_csv}")
    return 0


def _add_extract(sub: argparse._SubParsersAction) -> None:
    from python_task.extract import DEFAULT_PARAMS as d

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
    p.add_argument("--tile-size", type=int, default=d.tile_size, help=f"tile size in px (default {d.tile_size})")
    p.add_argument("--mpp", type=float, default=d.mpp, help=f"target µm per pixel (default {d.mpp})")
    p.add_argument("--slide-mpp", type=float, help="µm/px of level 0 when the slide's metadata lacks it")
    p.add_argument("--min-coverage", type=float, default=d.min_coverage,
                   help=f"least fraction of a tile inside its region (default {d.min_coverage})")
    p.add_argument("--min-tissue", type=float, default=d.min_tissue,
                   help=f"least fraction of a tile that is tissue (default {d.min_tissue})")
    p.add_argument("--stride", type=int, help="grid step in output px (default: the tile size, no overlap)")
    p.add_argument("--codec", choices=("jpeg", "raw"), default=d.codec, help=f"tile storage (default {d.codec})")
    p.add_argument("--quality", type=int, default=d.quality, help=f"JPEG quality (default {d.quality})")
    p.add_argument("--offset", type=float, nargs=2, metavar=("DX", "DY"), default=(0.0, 0.0),
                   help="add (DX, DY) level-0 px to every annotation coordinate (annotations drawn on a parent slide)")
    p.add_argument("--workers", type=int, default=1, help="slides processed in parallel (default 1)")
    p.add_argument("--reader", choices=("auto", "openslide", "tiff"), default="auto",
                   help="pixel reader: a direct TIFF tile decoder where possible (auto), or always openslide")
    p.add_argument("--overwrite", action="store_true", help="redo slides whose shard already exists")
    p.set_defaults(handler=_run_extract)


def _run_extract(args: argparse.Namespace) -> int:
    from python_task.extract import ExtractParams, SlideJob, extract_cohort, read_cohort

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


SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (_add_synth, _add_extract)


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
