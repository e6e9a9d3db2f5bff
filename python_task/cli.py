"""The command line: argument parsing only. Each subcommand calls one library function.

The ``train`` options are generated from :class:`~python_task.training.config.TrainConfig`, the ``extract``
defaults come from :class:`~python_task.shards.params.ExtractParams` and ``synth``'s from
:class:`~python_task.synth.config.SynthConfig`; only light modules are imported to build the parser.

Errors the user can fix (:class:`~python_task.errors.TaskError`) are printed as one line on stderr,
``error: <file or flag>: <cause>``, with exit status 1: the library names settings by field (``batch_size``)
and this module turns them, and the settings quoted in causes, into flags (``--batch-size``). Anything
unexpected is also printed on one line (exit status 2) unless ``--debug`` is given, which shows the traceback.
Log records of the package are printed on stderr: progress lines as they are, warnings with their level. Other
libraries' log records (tifffile's, Python warnings, TensorFlow's C++ log) are shown only with ``--verbose``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from python_task.errors import EXIT_OUT_OF_MEMORY, ErrorList, TaskError, is_out_of_memory
from python_task.experiments import plan_limits
from python_task.runtime import PARENT_PID_ENV, exit_with_parent, filter_native_notices
from python_task.shards.params import CODECS, ExtractParams
from python_task.synth.config import SynthConfig
from python_task.training import config as train_config
from python_task.transforms.augmentations import AUGMENT_ENGINES
from python_task.wsi.slides import READERS

Handler = Callable[[argparse.Namespace], int]
EXTRACT = ExtractParams()
SYNTH = SynthConfig()
PACKAGE_LOGGER = "python_task"
# multiprocessing's resource tracker (its own process) warns of the semaphores a killed extract worker held, which
# it then cleans up: nothing for the user to do
RESOURCE_TRACKER_WARNING = "ignore::UserWarning:multiprocessing.resource_tracker"


def _default(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _tiling_options(p: argparse.ArgumentParser, *, stride_help: str) -> None:
    """The options extract and predict share: how tiles are laid on the slide and read."""
    p.add_argument("--slide-mpp", type=float, help="µm/px of level 0 when the slide's metadata lacks it")
    p.add_argument("--min-coverage", type=float, default=EXTRACT.min_coverage,
                   help=f"least fraction of a tile inside its region (default {_default(EXTRACT.min_coverage)})")
    p.add_argument("--min-tissue", type=float, default=EXTRACT.min_tissue,
                   help=f"least fraction of a tile that is tissue (default {_default(EXTRACT.min_tissue)})")
    p.add_argument("--stride", type=int, help=stride_help)
    p.add_argument("--offset", type=float, nargs=2, metavar=("DX", "DY"), default=EXTRACT.offset,
                   help="add (DX, DY) level-0 px to every annotation coordinate (annotations drawn on a parent slide)")
    p.add_argument("--reader", choices=READERS, default=EXTRACT.reader,
                   help="pixel reader: a direct TIFF tile decoder where possible (auto), or always openslide")


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a synthetic cohort of pyramidal TIFF slides with QuPath GeoJSON annotations")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--patients", type=int, default=SYNTH.patients, help=f"number of patients (default {SYNTH.patients})")
    p.add_argument("--seed", type=int, default=SYNTH.seed, help=f"random seed (default {SYNTH.seed})")
    p.add_argument("--slide-size", type=int, default=SYNTH.slide_size, help="level-0 width and height of each slide "
                                                                           f"in px (default {SYNTH.slide_size})")
    p.add_argument("--mpp", type=float, default=SYNTH.mpp,
                   help=f"µm per pixel written into the slides (default {_default(SYNTH.mpp)})")
    p.add_argument("--stain-variation", type=float, default=SYNTH.stain_variation,
                   help="strength of per-slide stain variation (0 = none, 1 = default, 2 = strong)")
    p.set_defaults(handler=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from python_task.synth.cohort import generate_cohort

    cfg = SynthConfig(patients=args.patients, seed=args.seed, slide_size=args.slide_size, mpp=args.mpp,
                      stain_variation=args.stain_variation)
    cohort_csv = generate_cohort(args.out, cfg)
    print(f"cohort written: {cohort_csv}")
    return 0


def _add_extract(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--tile-size", type=int, default=EXTRACT.tile_size,
                   help=f"tile size in px (default {EXTRACT.tile_size})")
    p.add_argument("--mpp", type=float, default=EXTRACT.mpp, help=f"target µm per pixel (default {EXTRACT.mpp:g})")
    _tiling_options(p, stride_help="grid step in output px (default: the tile size, no overlap)")
    p.add_argument("--codec", choices=CODECS, default=EXTRACT.codec, help=f"tile storage (default {EXTRACT.codec})")
    p.add_argument("--quality", type=int, default=EXTRACT.quality, help=f"JPEG quality (default {EXTRACT.quality})")
    p.add_argument("--workers", type=int, default=1, help="slides processed in parallel (default 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo slides whose shard already exists (also: replace the folder's recorded settings)")
    p.set_defaults(handler=_run_extract)


def _run_extract(args: argparse.Namespace) -> int:
    from python_task.shards.extract import extract_cohort
    from python_task.wsi.cohort import SlideJob, read_cohort

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


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check a shards folder end to end: checksums, labels, manifest, every tile "
                                      "decoded (after copying shards between machines)")
    p.add_argument("--shards", required=True, type=Path, help="folder of shards with manifest.csv")
    p.add_argument("--no-decode", action="store_true",
                   help="check the checksums only, without decoding every JPEG tile (faster)")
    p.set_defaults(handler=_run_verify)


def _run_verify(args: argparse.Namespace) -> int:
    from python_task.shards.verify import verify_shards

    report = verify_shards(args.shards, decode=not args.no_decode)
    if report.problems:
        raise ErrorList(list(report.problems))
    print(f"verified: {report.shards} shards, {report.tiles} tiles in {args.shards}")
    return 0


# split's tuning fraction, as python_task.data.splits.DEFAULT_TUNE_FRACTION (a test keeps them equal; importing
# that module here would load h5py for every command)
DEFAULT_TUNE_FRACTION = 0.25


def _add_split(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("split", help="patient-level K folds, stratified by diagnosis, saved as JSON")
    p.add_argument("--shards", required=True, type=Path, help="folder of shards with manifest.csv")
    p.add_argument("--folds", required=True, type=int, help="number of folds K")
    p.add_argument("--out", required=True, type=Path, help="splits JSON file to write")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--tune-fraction", type=float, default=DEFAULT_TUNE_FRACTION,
                   help="share of each fold's training patients (per diagnosis, at least one) set aside as its "
                        "tuning set, on which train chooses the epoch and threshold; 0 = none (default "
                        f"{_default(DEFAULT_TUNE_FRACTION)})")
    p.add_argument("--test-fraction", type=float, default=0.0,
                   help="share of the patients (per diagnosis, at least one) held out of every fold as a test set "
                        "for `evaluate` (default 0: none)")
    p.set_defaults(handler=_run_split)


def _run_split(args: argparse.Namespace) -> int:
    from python_task.data.splits import check_splits_output, make_splits, write_splits

    check_splits_output(args.out, args.shards)  # before anything is made: --out must not replace an input
    splits = make_splits(args.shards, args.folds, seed=args.seed, tune_fraction=args.tune_fraction,
                         test_fraction=args.test_fraction)
    write_splits(splits, args.out)
    if splits["test_patients"]:
        print(f"test patients (in no fold): {', '.join(splits['test_patients'])}", file=sys.stderr)
    for fold in splits["folds"]:
        counts = fold["tile_counts"]
        tune = (f"tuning patients {', '.join(fold['tune_patients'])}" if fold["tune_patients"] else
                "no tuning set (train's fixed rule: last epoch, threshold 0.5)")
        print(f"fold {fold['fold']}: validation patients {', '.join(fold['val_patients'])}; {tune}; tiles train "
              f"{counts['train']}, tune {counts['tune']}, val {counts['val']}", file=sys.stderr)
    print(f"splits written: {args.out}")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    """Every option comes from :func:`python_task.training.config.train_options` (that is, from TrainConfig)."""
    p = sub.add_parser("train", help="train and evaluate one model on one fold (one experiment point)")
    for option in train_config.train_options().values():
        notes = [f"one of {', '.join(option.setting.choices)}"] if option.setting.choices else []
        kwargs: dict = {"dest": option.key, "required": option.required}
        if option.kind is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=option.kind, default=option.default)
            if option.fallback is not None and not option.required:
                notes.append(f"default {_default(option.fallback)}")
        text = option.setting.help + (f" ({'; '.join(notes)})" if notes else "")
        p.add_argument(option.flag, help=text.replace("%", "%%"), **kwargs)
    p.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    cfg = train_config.config_from_options(vars(args))  # checked before Keras is loaded: bad options fail fast
    from python_task.training.loop import train

    train(cfg)
    print(f"metrics written: {args.out / 'metrics.json'}")
    return 0


def _add_augment_preview(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("augment-preview", help="draw original and augmented tiles side by side (PNG)")
    p.add_argument("--shards", required=True, type=Path, help="folder of shards")
    p.add_argument("--out", required=True, type=Path, help="PNG file to write")
    p.add_argument("--augment", default="flip,rot90,elastic,hed", help="augmentations to show")
    p.add_argument("--augment-on", choices=AUGMENT_ENGINES, default="auto",
                   help="which implementation draws them (as train's --augment-on)")
    p.add_argument("--stain", default="none", help="stain normalisation to apply first")
    p.add_argument("--tiles", type=int, default=6, help="number of original tiles (rows)")
    p.add_argument("--columns", type=int, default=4, help="augmented versions per tile")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.set_defaults(handler=_run_augment_preview)


def _run_augment_preview(args: argparse.Namespace) -> int:
    from python_task.transforms.preview import render_preview

    path = render_preview(args.shards, args.out, augment=args.augment, stain=args.stain, tiles=args.tiles,
                          columns=args.columns, seed=args.seed, engine=args.augment_on)
    print(f"preview written: {path}")
    return 0


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run a YAML plan of train points locally; results.csv with one row per point")
    p.add_argument("plan", type=Path, help="PLAN.yaml (shards, splits, factors, fixed, optional random)")
    p.add_argument("--out", required=True, type=Path, help="output folder: results.csv and points/")
    p.add_argument("--jobs", type=int, default=1, help="points run in parallel (default 1)")
    p.add_argument("--max-points", type=int, default=plan_limits.MAX_POINTS,
                   help=f"refuse a plan of more points (default {plan_limits.MAX_POINTS})")
    p.add_argument("--max-plan-nodes", type=int, default=plan_limits.MAX_PLAN_NODES,
                   help=f"refuse a plan whose YAML holds more values, aliases written out "
                        f"(default {plan_limits.MAX_PLAN_NODES})")
    p.add_argument("--overwrite", action="store_true",
                   help="let a plan with other shards, splits or fixed settings replace the folder's earlier results")
    p.set_defaults(handler=_run_sweep)


def _run_sweep(args: argparse.Namespace) -> int:
    from python_task.experiments.sweep import run_sweep

    report = run_sweep(args.plan, args.out, jobs=args.jobs, overwrite=args.overwrite, max_points=args.max_points,
                       max_plan_nodes=args.max_plan_nodes)
    print(f"results written: {report.results_csv}")
    return 1 if report.failed else 0


# predict's own defaults, as in python_task.inference.predict.predict_slide (a test keeps them equal; importing
# that module here would load Keras for every command)
PREDICT_BATCH_SIZE = 64


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="heat-map of the probability of malignancy over a whole slide")
    p.add_argument("--model", required=True, type=Path, help="model.keras from train (its config.json beside it)")
    p.add_argument("--slide", required=True, type=Path, help="the slide")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--annotations", type=Path, help="score only tiles inside these regions; outlines drawn")
    p.add_argument("--batch-size", type=int, default=PREDICT_BATCH_SIZE,
                   help=f"tiles per inference batch (default {PREDICT_BATCH_SIZE})")
    _tiling_options(p, stride_help="grid step in tile px (default: the tile size)")
    p.set_defaults(handler=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from python_task.inference.predict import predict_slide

    s = predict_slide(args.model, args.slide, args.out, annotations=args.annotations, slide_mpp=args.slide_mpp,
                      batch_size=args.batch_size, min_tissue=args.min_tissue, min_coverage=args.min_coverage,
                      stride=args.stride, offset=tuple(args.offset), reader_name=args.reader)
    print(f"{args.slide.name}: {s['n_tiles']} tiles, slide score {s['slide_score']:.3f}, predicted "
          f"{s['predicted_diagnosis']} ({s['tiles_per_second']:.0f} tiles/s); outputs in {args.out}")
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a trained model once on the split's test patients (in no fold)")
    p.add_argument("--model", required=True, type=Path, help="model.keras of a train run (its config.json beside it)")
    p.add_argument("--shards", required=True, type=Path, help="folder of shards with manifest.csv")
    p.add_argument("--splits", required=True, type=Path, help="the splits JSON, made with --test-fraction")
    p.add_argument("--out", required=True, type=Path, help="output folder: test_metrics.json, test_predictions.csv")
    p.add_argument("--batch-size", type=int, default=PREDICT_BATCH_SIZE,
                   help=f"tiles per inference batch (default {PREDICT_BATCH_SIZE})")
    p.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from python_task.inference.evaluate import evaluate_model

    m = evaluate_model(args.model, args.shards, args.splits, args.out, batch_size=args.batch_size)
    print(f"test set: tile AUC {m['test_auc']:.3f} [{m['test_auc_ci_low']:.3f}, {m['test_auc_ci_high']:.3f}], "
          f"patient AUC {m['test_patient_auc']:.3f} [{m['test_patient_auc_ci_low']:.3f}, "
          f"{m['test_patient_auc_ci_high']:.3f}] ({m['n_test_patients_pos']:.0f} malignant + "
          f"{m['n_test_patients_neg']:.0f} benign patients); metrics written: {args.out / 'test_metrics.json'}")
    return 0


# demo's own defaults, as in python_task.experiments.demo.DemoConfig (a test keeps them equal)
DEMO_DEFAULTS = {"patients": 12, "epochs": 6, "jobs": 2, "seed": 0}


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole chain on a synthetic cohort: synth, extract, split, sweep, report, "
                                    "predict")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--patients", type=int, default=DEMO_DEFAULTS["patients"],
                   help=f"synthetic patients (default {DEMO_DEFAULTS['patients']})")
    p.add_argument("--epochs", type=int, default=DEMO_DEFAULTS["epochs"],
                   help=f"epochs per training point (default {DEMO_DEFAULTS['epochs']})")
    p.add_argument("--jobs", type=int, default=DEMO_DEFAULTS["jobs"],
                   help=f"training points run in parallel (default {DEMO_DEFAULTS['jobs']})")
    p.add_argument("--seed", type=int, default=DEMO_DEFAULTS["seed"],
                   help=f"random seed (default {DEMO_DEFAULTS['seed']})")
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from python_task.experiments.demo import DemoConfig, run_demo

    outputs = run_demo(args.out, DemoConfig(patients=args.patients, epochs=args.epochs, jobs=args.jobs,
                                            seed=args.seed))
    for name, path in outputs.items():
        print(f"  {name:<32} {path}")
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="summarise a sweep's results table: summary.csv, report.html, PNG figures")
    p.add_argument("results", type=Path, metavar="RESULTS.csv",
                   help="results table: results.csv from sweep, or an OpenMOLE CSVHook file (one row per point)")
    p.add_argument("--out", required=True, type=Path, help="output folder: report.html, summary.csv, *.png")
    p.add_argument("--metric", default="val_patient_auc",
                   help="metric that ranks the configurations (default val_patient_auc; *loss and *seconds "
                        "rank lowest first)")
    p.add_argument("--test", type=Path, action="append", default=[], metavar="DIR",
                   help="an evaluate output folder (test_metrics.json): shown apart from the cross-validation "
                        "ranking; may be repeated")
    p.set_defaults(handler=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from python_task.experiments.report import make_report

    path = make_report(args.results, args.out, metric=args.metric, tests=args.test)
    print(f"report written: {path}")
    return 0


SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_synth, _add_extract, _add_verify, _add_split, _add_train, _add_augment_preview, _add_sweep, _add_predict,
    _add_evaluate, _add_report, _add_demo)


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


# --------------------------------------------------------------------------------------------- library -> flags

def option_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """``{dest: flag}`` of every option of every subcommand (``batch_size`` -> ``--batch-size``)."""
    flags: dict[str, str] = {}
    for action in parser._actions:  # noqa: SLF001 - argparse keeps its subparsers here
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for sub in action.choices.values():
                for a in sub._actions:  # noqa: SLF001
                    if a.option_strings and a.dest != "help":
                        flags.setdefault(a.dest, a.option_strings[-1])
    return flags


def speak_flags(text: str, flags: Mapping[str, str]) -> str:
    """Settings quoted in a library message (```lr```) as the command line spells them (``--lr``)."""
    return re.sub(r"`(\w+)`", lambda m: flags.get(m.group(1), m.group(0)), text)


def error_line(exc: TaskError, flags: Mapping[str, str]) -> str:
    """``error: <file or flag>: <cause>``: the one line the command line prints for a library error."""
    subject = exc.path if exc.path is not None else (flags.get(exc.setting, exc.setting) if exc.setting else None)
    cause = speak_flags(exc.cause, flags)
    return f"error: {subject}: {cause}" if subject is not None else f"error: {cause}"


class _LogFormatter(logging.Formatter):
    """Progress lines (INFO and below) as they are, warnings and errors with their level and logger; settings
    quoted in messages as flags."""

    def __init__(self, flags: Mapping[str, str]) -> None:
        super().__init__()
        self.flags = flags

    def format(self, record: logging.LogRecord) -> str:
        message = speak_flags(record.getMessage(), self.flags)
        if record.levelno >= logging.WARNING:
            message = f"{record.levelname} {record.name}: {message}"
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        return message


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is at the time (a test may have replaced it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _own_records(record: logging.LogRecord) -> bool:
    """The package's own log records (other libraries' are shown with ``-v`` only)."""
    return record.name == PACKAGE_LOGGER or record.name.startswith(PACKAGE_LOGGER + ".")


def configure_logging(verbose: bool, flags: Mapping[str, str]) -> None:
    """The package's log records on stderr: its progress lines (INFO) always, DEBUG with ``-v`` (or the level in
    ``PYTHON_TASK_LOG``). Other libraries' records (``ERROR tifffile: ...``) and Python warnings only with ``-v``,
    and TensorFlow's C++ log (absl, cpu_feature_guard) is silenced unless ``-v`` or ``TF_CPP_MIN_LOG_LEVEL`` says
    otherwise: a normal run's stderr holds the package's lines alone."""
    handler = _StderrHandler()
    handler.setFormatter(_LogFormatter(flags))
    if not verbose:
        handler.addFilter(_own_records)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # read when TensorFlow loads, after this
        if RESOURCE_TRACKER_WARNING not in sys.warnoptions:  # -W options reach the helper processes too
            sys.warnoptions.append(RESOURCE_TRACKER_WARNING)
    logging.captureWarnings(True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    level = os.environ.get("PYTHON_TASK_LOG") or (logging.DEBUG if verbose else logging.INFO)
    logging.getLogger(PACKAGE_LOGGER).setLevel(level)


def _native_level() -> int:
    """TF_CPP_MIN_LOG_LEVEL as the user (or the image) set it; 2 when unset or unreadable."""
    value = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")
    return int(value) if value.strip().isdigit() else 2


def main(argv: Sequence[str] | None = None, *, program: bool = False) -> int:
    """The command line. ``program``: this is the process's own ``python -m python_task`` (not a call from a
    notebook or a test), whose stderr may then be filtered of TensorFlow's native notices."""
    parser = build_parser()
    args = parser.parse_args(argv)
    flags = option_flags(parser)
    if program and not args.verbose and _native_level() >= 2:  # what TF_CPP_MIN_LOG_LEVEL=2 means: no INFO, WARNING
        filter_native_notices()
    configure_logging(args.verbose, flags)
    parent = os.environ.pop(PARENT_PID_ENV, "")
    if parent.isdigit():  # started by a runner (sweep) that must not leave this process behind when it dies
        exit_with_parent(int(parent))
    handler: Handler = args.handler
    try:
        return handler(args)
    except TaskError as exc:
        if args.debug:
            raise
        for one in exc.errors if isinstance(exc, ErrorList) else [exc]:
            print(error_line(one, flags), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI promises one line, whatever the failure
        if args.debug or os.environ.get("PYTHON_TASK_DEBUG"):
            raise
        if is_out_of_memory(exc):
            print(f"error: {args.command}: out of memory: {type(exc).__name__}", file=sys.stderr)
            return EXIT_OUT_OF_MEMORY
        if isinstance(exc, OSError) and exc.filename:  # a file that failed unexpectedly (a full disk): name it
            print(f"error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {args.command}: {type(exc).__name__}: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
