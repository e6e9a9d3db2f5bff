"""``split``: patient-level K folds, stratified by diagnosis, and the leak guard that ``train`` runs on them.

A split is made from the shards folder's ``manifest.csv`` alone (no shard is opened):

* **Patient diagnosis.** For every slide, the manifest's ``diagnosis`` when it is given (it must name one of the
  classes, case-insensitively), otherwise it is derived from the tiles: the positive class (the class named
  ``malignant``, else the last class) when the slide has tiles of it, else the negative class (``benign`` when
  present, else the first other class). A patient takes the most severe diagnosis of its slides: positive if any
  slide is, else the highest class index.
* **Folds.** :class:`sklearn.model_selection.StratifiedGroupKFold` (``shuffle=True, random_state=seed``) over one
  row per patient (patients sorted by id, so the split depends only on the manifest and the seed). Every slide
  follows its patient, so no patient is ever on both sides.
* **Test set** (``test_fraction`` > 0): before the folds, a seeded, stratified set of patients is held out of
  every fold (``round(test_fraction * n)`` patients of each diagnosis, at least one): no fold trains, tunes or
  validates on them; ``evaluate`` scores a finished model on them once.
* **Tuning set** (``tune_fraction`` > 0, default 0.25): in every fold, a seeded set of the fold's training
  patients, stratified by diagnosis (``round(tune_fraction * n)`` of each diagnosis, at least one), on which
  ``train`` chooses the epoch, stops early and sets the decision threshold; the network is fitted on the
  remaining ``train_patients``, and the validation fold is predicted once, at the end. A fold whose training
  patients cannot spare a tuning set (each diagnosis must keep :data:`MIN_FIT_PATIENTS` patients to fit on) gets
  none: ``train`` then uses the fixed rule (the last of ``epochs`` epochs, threshold 0.5) and says so; the fold's
  ``selection`` says which (``tuning set`` or ``fixed``).
* **Too few patients.** Errors only where a fold's *validation set* could not be non-empty: ``K < 2`` or more
  folds than patients (those left once the test set is held out). The error says what would work: the most folds
  the patients allow (never fewer than 2), the largest ``test_fraction`` (in steps of 0.01) that leaves ``K``
  patients, no test set, or that the cohort is too small for cross-validation at all. When every diagnosis has
  fewer patients than ``K`` (scikit-learn refuses to stratify then), patients are dealt round-robin, class by
  class, over the folds in a seeded order, which still puts at most ``ceil(n_class / K)`` patients of a class in
  one fold. When a class has fewer patients than ``K`` some validation folds lack it (their AUC is NaN); when it
  has a single patient (or the cohort one diagnosis only) some *training* sets lack it and ``train`` refuses those
  folds. Each such case is logged as a warning and listed in the JSON's ``warnings``: the split is still written,
  since the other folds are usable.

JSON written (format 2; extra keys beyond the contract: ``shards``, ``method``, ``warnings``, and per fold
``val_diagnoses``/``train_diagnoses``/``tune_diagnoses``)::

    {"format_version": 2, "seed": 0, "n_folds": 3, "manifest_digest": "<sha256>", "label_names": [...],
     "patients": {patient_id: diagnosis}, "slides": {slide_id: patient_id},
     "shards": {slide_id: {"shard": "S1.h5", "n_tiles": 120}}, "method": "StratifiedGroupKFold", "warnings": [],
     "tune_fraction": 0.25, "test_fraction": 0.0, "test_patients": [...], "test_slides": [...],
     "test_diagnoses": {diagnosis: n_patients},
     "folds": [{"fold": 0, "val_patients": [...], "val_slides": [...], "train_patients": [...],
                "train_slides": [...], "tune_patients": [...], "tune_slides": [...], "selection": "tuning set",
                "tile_counts": {"train": {class: n}, "tune": {...}, "val": {class: n}},
                "val_diagnoses": {diagnosis: n_patients}, "train_diagnoses": {...}, "tune_diagnoses": {...}},
               ...]}

:func:`check_splits_output` refuses a splits file that would replace what the split is made from (the manifest,
a shard).

``train_patients`` are the patients the network is fitted on; ``tune_patients`` (possibly none) choose its
epoch and threshold; ``val_patients`` are the held-out fold; ``test_patients`` are in no fold. The four are
disjoint and every slide is in exactly one of them. A format-1 file (before tuning and test sets) is read as
folds without a tuning set and without a test set.

:func:`load_fold` re-checks a split before training: valid JSON and structure, the fold index, no patient or
slide on two sides of the fold (training, tuning, validation, test), every slide on its patient's side, the
slide -> patient map and the shard set (slide ids and :func:`manifest_digest`) unchanged since the split was
made, and the fold's shard files present.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from python_task.errors import ConfigError, ShardError
from python_task.fileio import read_json_file, write_json_atomic
from python_task.shards.manifest import MANIFEST_NAME, SETTINGS_NAME, digest_rows, manifest_label_names, read_manifest

log = logging.getLogger(__name__)

SPLITS_FORMAT_VERSION = 2  # 2: tuning sets per fold and a test set; format 1 (neither) is still read
FOLD_LIST_KEYS = ("val_patients", "val_slides", "train_patients", "train_slides")
TUNE_LIST_KEYS = ("tune_patients", "tune_slides")  # format 2; absent from format 1 (no tuning set)
TEST_LIST_KEYS = ("test_patients", "test_slides")  # format 2, top level
DEFAULT_TUNE_FRACTION = 0.25
MIN_FIT_PATIENTS = 2  # patients of each diagnosis a fold must keep to fit on, besides its tuning set
SELECTION_TUNED = "tuning set"  # a fold's "selection": epoch and threshold chosen on its tuning set
SELECTION_FIXED = "fixed"  # no tuning set: the last epoch, threshold 0.5
_MAX_LISTED = 10  # ids named in one error message before "and N more"


# --------------------------------------------------------------------------------------------------- diagnosis

def positive_class(label_names: Sequence[str]) -> str:
    """The malignant class: the one named ``malignant`` (any case), else the last one."""
    for name in label_names:
        if name.lower() == "malignant":
            return name
    return label_names[-1]


def negative_class(label_names: Sequence[str]) -> str:
    """The class a slide without positive tiles gets: ``benign`` (any case) when present, else the first other."""
    pos = positive_class(label_names)
    others = [n for n in label_names if n != pos] or [pos]
    for name in others:
        if name.lower() == "benign":
            return name
    return others[0]


def slide_diagnoses(rows: Sequence[Mapping], label_names: Sequence[str], manifest: Path) -> dict[str, str]:
    """Each slide's diagnosis (a class name): the manifest's when given, else derived from its tile counts."""
    by_lower = {n.lower(): n for n in label_names}
    pos, neg = positive_class(label_names), negative_class(label_names)
    has_counts = f"n_{pos}" in rows[0]
    out: dict[str, str] = {}
    for row in rows:
        given = str(row.get("diagnosis") or "").strip()
        if given:
            if given.lower() not in by_lower:
                raise ShardError(manifest, f"slide {row['slide_id']}: diagnosis {given!r} is not one of the classes "
                                f"{', '.join(label_names)} (leave it empty to derive it from the tiles)")
            out[row["slide_id"]] = by_lower[given.lower()]
        elif has_counts:
            out[row["slide_id"]] = pos if int(row[f"n_{pos}"]) > 0 else neg
        else:
            raise ShardError(manifest, f"slide {row['slide_id']} has no diagnosis and there is no n_{pos} column "
                            "to derive it from the tiles")
    return out


def patient_diagnoses(rows: Sequence[Mapping], label_names: Sequence[str], manifest: Path) -> dict[str, str]:
    """Each patient's diagnosis: positive if any of its slides is, else its slides' highest class index."""
    slides = slide_diagnoses(rows, label_names, manifest)
    pos = positive_class(label_names)
    rank = {n: (len(label_names) if n == pos else i) for i, n in enumerate(label_names)}
    out: dict[str, str] = {}
    for row in rows:
        p, d = row["patient_id"], slides[row["slide_id"]]
        if p not in out or rank[d] > rank[out[p]]:
            out[p] = d
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------------------------------- folds

def make_splits(shards_dir: str | Path, folds: int, seed: int = 0, *, tune_fraction: float = DEFAULT_TUNE_FRACTION,
                test_fraction: float = 0.0) -> dict:
    """Patient-level stratified K folds of the shards in ``shards_dir``, each with a tuning set, and an optional
    test set held out of every fold (see the module doc for the rules)."""
    shards_dir = Path(shards_dir)
    manifest = shards_dir / MANIFEST_NAME
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ConfigError("folds", f"must be a whole number of at least 2 (got {folds!r})")
    for name, value in (("tune_fraction", tune_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ConfigError(name, f"must be a number in [0, 1) (got {value!r})")
    folds = int(folds)
    rows = read_manifest(shards_dir)
    label_names = manifest_label_names(rows)
    patients = patient_diagnoses(rows, label_names, manifest)
    slides = {r["slide_id"]: r["patient_id"] for r in sorted(rows, key=lambda r: r["slide_id"])}
    test = _stratified_pick(patients, sorted(patients), test_fraction, np.random.default_rng([seed, 0x7E57])) \
        if test_fraction > 0 else []
    development = {p: d for p, d in patients.items() if p not in set(test)}
    if folds > len(development):
        raise ShardError(manifest, _too_few_patients(patients, folds, test_fraction, len(test)))

    fold_of, method = _assign_folds(development, folds, seed)
    by_slide = {r["slide_id"]: r for r in rows}

    def slides_of(ids: Iterable[str]) -> list[str]:
        chosen = set(ids)
        return sorted(s for s, p in slides.items() if p in chosen)

    out_folds = []
    for k in range(folds):
        val_p = sorted(p for p, f in fold_of.items() if f == k)
        rest = sorted(p for p, f in fold_of.items() if f != k)
        tune_p = _tuning_set(development, rest, tune_fraction, np.random.default_rng([seed, k, 0x7E4E]))
        train_p = sorted(set(rest) - set(tune_p))
        val_s, train_s, tune_s = slides_of(val_p), slides_of(train_p), slides_of(tune_p)
        out_folds.append({
            "fold": k, "val_patients": val_p, "val_slides": val_s, "train_patients": train_p, "train_slides": train_s,
            "tune_patients": tune_p, "tune_slides": tune_s,
            "selection": SELECTION_TUNED if tune_p else SELECTION_FIXED,
            "tile_counts": {"train": _tile_counts(by_slide, train_s, label_names),
                            "tune": _tile_counts(by_slide, tune_s, label_names),
                            "val": _tile_counts(by_slide, val_s, label_names)},
            "val_diagnoses": _diagnosis_counts(patients, val_p, label_names),
            "train_diagnoses": _diagnosis_counts(patients, train_p, label_names),
            "tune_diagnoses": _diagnosis_counts(patients, tune_p, label_names)})
    notes = _fold_warnings(development, out_folds)
    for note in notes:
        log.warning("split: %s", note)
    for f in out_folds:
        if tune_fraction > 0 and not f["tune_patients"]:
            counts = ", ".join(f"{n} {c}" for c, n in f["train_diagnoses"].items())
            log.info("split: fold %d: too few training patients (%s) to set a tuning set aside and keep %d of each "
                     "diagnosis to fit on: train uses the fixed rule there (the last epoch, threshold 0.5)",
                     f["fold"], counts, MIN_FIT_PATIENTS)
    return {
        "format_version": SPLITS_FORMAT_VERSION, "seed": int(seed), "n_folds": folds,
        "manifest_digest": digest_rows(rows), "label_names": list(label_names),
        "patients": patients, "slides": slides,
        "shards": {s: {"shard": by_slide[s]["shard"], "n_tiles": int(by_slide[s]["n_tiles"])} for s in slides},
        "method": method, "warnings": notes, "tune_fraction": float(tune_fraction),
        "test_fraction": float(test_fraction), "test_patients": sorted(test), "test_slides": slides_of(test),
        "test_diagnoses": _diagnosis_counts(patients, test, label_names), "folds": out_folds}


def _pick_count(fraction: float, n: int) -> int:
    """How many of ``n`` patients of one diagnosis a stratified pick of ``fraction`` takes: at least one."""
    return max(1, round(fraction * n))


def _stratified_pick(patients: Mapping[str, str], ids: Sequence[str], fraction: float,
                     rng: np.random.Generator) -> list[str]:
    """``round(fraction * n)`` (at least one) seeded patients of each diagnosis among ``ids``."""
    picked: list[str] = []
    for diagnosis in sorted({patients[p] for p in ids}):
        members = sorted(p for p in ids if patients[p] == diagnosis)
        picked += [str(p) for p in rng.permutation(members)[:_pick_count(fraction, len(members))]]
    return sorted(picked)


def _developed_patients(class_sizes: Sequence[int], test_fraction: float) -> int:
    """Patients left for the folds once a test set of ``test_fraction`` is held out (none when it is 0)."""
    if test_fraction <= 0:
        return sum(class_sizes)
    return sum(n - min(n, _pick_count(test_fraction, n)) for n in class_sizes)


def _largest_test_fraction(class_sizes: Sequence[int], folds: int, below: float) -> float | None:
    """The largest test fraction in steps of 0.01, under ``below``, that leaves ``folds`` patients for the folds;
    None when even the smallest test set (one patient of each diagnosis) leaves too few."""
    for hundredths in range(math.ceil(below * 100) - 1, 0, -1):
        fraction = hundredths / 100
        if _developed_patients(class_sizes, fraction) >= folds:
            return fraction
    return None


def _too_few_patients(patients: Mapping[str, str], folds: int, test_fraction: float, n_test: int) -> str:
    """Why ``folds`` patient-level folds cannot be made, and what to change: fewer folds (never fewer than 2), a
    smaller test set, or none; or that the cohort has too few patients for cross-validation at all."""
    n = len(patients)
    n_dev = n - n_test
    sizes = [sum(d == c for d in patients.values()) for c in sorted(set(patients.values()))]
    if n_test:
        have = (f"only {n_dev} of the {n} patients {'is' if n_dev == 1 else 'are'} left for the folds ({n_test} "
                f"held out as the test set by `test_fraction` {test_fraction:g})")
    else:
        have = f"only {n} patient{'s' * (n != 1)}"
    problem = f"{have}: cannot make {folds} patient-level folds (each validation set needs at least one patient)"
    remedies = [f"`folds` {n_dev} or fewer"] if n_dev >= 2 else []
    if n_test:
        fraction = _largest_test_fraction(sizes, folds, test_fraction)
        if fraction is not None:
            remedies.append(f"`test_fraction` {fraction:g} or lower")
        elif n >= folds:
            remedies.append("`test_fraction` 0 (no test set)")
        elif not remedies and n >= 2:
            remedies.append(f"`test_fraction` 0 with `folds` {n} or fewer")
    if not remedies:
        return (f"{problem}: cross-validation needs at least 2 patients{' besides a test set' if n_test else ''}; "
                f"the manifest lists {n}: extract more slides")
    return f"{problem}; use {' or '.join(remedies)}"


def _tuning_set(patients: Mapping[str, str], training: Sequence[str], fraction: float,
                rng: np.random.Generator) -> list[str]:
    """A fold's tuning patients: a stratified pick of its training patients, or none when ``fraction`` is 0, the
    training patients have a single diagnosis, or a diagnosis would keep fewer than :data:`MIN_FIT_PATIENTS`."""
    if fraction <= 0 or len({patients[p] for p in training}) < 2:
        return []
    picked = _stratified_pick(patients, training, fraction, rng)
    for diagnosis in {patients[p] for p in training}:
        kept = sum(patients[p] == diagnosis for p in training if p not in picked)
        if kept < MIN_FIT_PATIENTS:
            return []
    return picked


def _assign_folds(patients: Mapping[str, str], folds: int, seed: int) -> tuple[dict[str, int], str]:
    """Patient -> fold index, and the method used."""
    from sklearn.model_selection import StratifiedGroupKFold

    ids = sorted(patients)
    y = np.array([patients[p] for p in ids])
    _, class_sizes = np.unique(y, return_counts=True)
    if folds <= class_sizes.max():
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        fold_of: dict[str, int] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "least populated class ...": reported by _fold_warnings
            for k, (_, val) in enumerate(splitter.split(np.zeros((len(ids), 1)), y, groups=np.array(ids))):
                fold_of.update({ids[i]: k for i in val})
        return fold_of, "StratifiedGroupKFold"
    # scikit-learn refuses when every class has fewer patients than folds: deal them round-robin instead, class
    # by class in a seeded order, continuing the count so folds fill evenly and each holds <= ceil(n_class / K).
    rng = np.random.default_rng(seed)
    order = [p for c in np.unique(y) for p in rng.permutation([q for q, d in zip(ids, y) if d == c])]
    start = int(rng.integers(folds))
    return {str(p): (start + i) % folds for i, p in enumerate(order)}, "round-robin (every class has fewer " \
        "patients than folds)"


def _tile_counts(by_slide: Mapping[str, Mapping], slides: Iterable[str], label_names: Sequence[str]) -> dict:
    return {c: int(sum(int(by_slide[s].get(f"n_{c}", 0) or 0) for s in slides)) for c in label_names}


def _diagnosis_counts(patients: Mapping[str, str], ids: Iterable[str], label_names: Sequence[str]) -> dict:
    ids = list(ids)
    return {c: sum(patients[p] == c for p in ids) for c in label_names if c in patients.values()}


def _fold_warnings(patients: Mapping[str, str], folds: Sequence[Mapping]) -> list[str]:
    present = sorted(set(patients.values()))
    notes = []
    if len(present) < 2:
        notes.append(f"all {len(patients)} patients are {present[0]}: no fold can train a classifier")
        return notes
    for f in folds:
        for side, key in (("training", "train_diagnoses"), ("validation", "val_diagnoses")):
            lacking = [c for c in present if not f[key].get(c)]
            if lacking:
                n = {c: sum(d == c for d in patients.values()) for c in lacking}
                why = ("train refuses this fold" if side == "training" else "its AUCs are undefined (NaN)")
                notes.append(f"fold {f['fold']}: no {'/'.join(lacking)} patient in {side} "
                             f"(only {', '.join(f'{n[c]} {c}' for c in lacking)} patient(s) for {len(folds)} folds): "
                             f"{why}")
    return notes


def write_splits(splits: Mapping, path: str | Path) -> None:
    """Write a split as JSON, atomically (the file appears under its name only once complete)."""
    write_json_atomic(Path(path), splits)


def check_splits_output(path: str | Path, shards_dir: str | Path) -> None:
    """Refuse to write a split over what it is made from: the shards folder's manifest, its ``extract.json`` or one
    of its shards.

    ``split --out shards/manifest.csv`` would otherwise replace the manifest with the split's JSON, and with it
    the only record of the shard set. Paths are compared once resolved (``..``, symbolic links), so another
    spelling of the same file is refused too. :class:`ConfigError` for ``out``, naming the path.
    """
    shards_dir = Path(shards_dir)
    target = os.path.realpath(path)
    for name, what in ((MANIFEST_NAME, "the manifest"), (SETTINGS_NAME, "the record of extract's settings")):
        if target == os.path.realpath(shards_dir / name):
            raise ConfigError("out", f"`out` would replace {what} of {shards_dir}, which split reads: write "
                              "the splits to another file (e.g. splits.json)", path=path)
    for row in read_manifest(shards_dir):
        if target == os.path.realpath(shards_dir / row["shard"]):
            raise ConfigError("out", f"`out` would replace the shard of slide {row['slide_id']} in "
                              f"{shards_dir}: write the splits to another file (e.g. splits.json)", path=path)


# --------------------------------------------------------------------------------------------------- loading

@dataclass(frozen=True)
class FoldAssignment:
    """One fold of a checked split: sorted slide and patient ids of each side (training = fitted on, tuning,
    validation = the held-out fold) and the split's test patients (in no fold)."""

    fold: int
    train_slides: tuple[str, ...]
    val_slides: tuple[str, ...]
    train_patients: tuple[str, ...]
    val_patients: tuple[str, ...]
    tune_slides: tuple[str, ...] = ()
    tune_patients: tuple[str, ...] = ()
    test_patients: tuple[str, ...] = ()
    format_version: int = SPLITS_FORMAT_VERSION


def _ids(ids: Iterable[str]) -> str:
    ids = sorted(ids)
    shown = ", ".join(ids[:_MAX_LISTED])
    return shown + (f" and {len(ids) - _MAX_LISTED} more" if len(ids) > _MAX_LISTED else "")


def _plural(word: str, n: int) -> str:
    return word if n == 1 else word + "s"


def read_splits(splits_path: str | Path) -> dict:
    """The JSON of a splits file, with its structure checked; :class:`ShardError` naming the file otherwise."""
    path = Path(splits_path)
    data = read_json_file(path, missing="not found: make it with `python -m python_task split`",
                          damaged="make it again with `split`", error=ShardError)

    def bad(what: str) -> ShardError:
        return ShardError(path, f"not a splits file: {what}")

    if not isinstance(data, dict):
        raise bad("the top level is not a JSON object")
    version = data.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise bad(f"format_version {version!r} is not a positive whole number")
    if version > SPLITS_FORMAT_VERSION:
        raise ShardError(path, f"format_version {version!r} is newer than this program reads "
                        f"({SPLITS_FORMAT_VERSION}): update python_task or run split again")
    for key in TEST_LIST_KEYS:
        if key in data and (not isinstance(data[key], list) or not all(isinstance(x, str) for x in data[key])):
            raise bad(f"'{key}' must be a list of ids")
    slides = data.get("slides")
    if not isinstance(slides, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in slides.items()):
        raise bad("'slides' must map slide ids to patient ids")
    folds = data.get("folds")
    if not isinstance(folds, list) or not folds:
        raise bad("'folds' must be a non-empty list")
    for i, f in enumerate(folds):
        if not isinstance(f, dict):
            raise bad(f"fold {i} is not an object")
        for key in FOLD_LIST_KEYS:
            if not isinstance(f.get(key), list) or not all(isinstance(x, str) for x in f[key]):
                raise bad(f"fold {i}: '{key}' must be a list of ids")
        for key in TUNE_LIST_KEYS:
            if key in f and (not isinstance(f[key], list) or not all(isinstance(x, str) for x in f[key])):
                raise bad(f"fold {i}: '{key}' must be a list of ids")
        if ("tune_patients" in f) != ("tune_slides" in f):
            raise bad(f"fold {i}: 'tune_patients' and 'tune_slides' go together")
        if "fold" in f and f["fold"] != i:
            raise bad(f"the entry at position {i} of 'folds' says it is fold {f['fold']!r}")
    return data


def check_fold_leaks(data: Mapping, fold: int, path: str | Path) -> None:
    """Refuse a fold whose sides (training, tuning, validation, and the split's test set) share a patient or a
    slide, that puts a slide away from its patient, or that leaves a slide out of every side."""
    f = data["folds"][fold]
    slides = data["slides"]
    sides = {"training": (set(f["train_patients"]), set(f["train_slides"])),
             "tuning": (set(f.get("tune_patients", [])), set(f.get("tune_slides", []))),
             "validation": (set(f["val_patients"]), set(f["val_slides"])),
             "test": (set(data.get("test_patients", [])), set(data.get("test_slides", [])))}
    names = list(sides)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for k, what in ((0, "patient"), (1, "slide")):
                both = sides[a][k] & sides[b][k]
                if both:
                    where = f"{a} and {b} of fold {fold}" if b != "test" else f"{a} of fold {fold} and the test set"
                    raise ShardError(path, f"{_plural(what, len(both))} {_ids(both)} "
                                    f"{'is' if len(both) == 1 else 'are'} in both {where}: the split leaks")
    placed = set().union(*(s for _, s in sides.values()))
    unknown = placed - set(slides)
    if unknown:
        raise ShardError(path, f"fold {fold} lists {_plural('slide', len(unknown))} {_ids(unknown)} missing from "
                        "'slides' (slide -> patient): run split again")
    for side, (mine, own) in sides.items():
        others = set().union(*(p for n, (p, _) in sides.items() if n != side))
        for s in sorted(own):
            p = slides[s]
            if p in others:
                raise ShardError(path, f"slide {s} is in {side} of fold {fold} but its patient {p} is on the other "
                                "side: the split leaks")
            if p not in mine:
                raise ShardError(path, f"slide {s} is in {side} of fold {fold} but its patient {p} is not: "
                                "run split again")
    unplaced = set(slides) - placed
    if unplaced:
        raise ShardError(path, f"fold {fold} places {_plural('slide', len(unplaced))} {_ids(unplaced)} in none of "
                        "training, tuning, validation and test: run split again")


def check_shard_set(data: Mapping, rows: Sequence[Mapping], path: str | Path, shards_dir: Path) -> None:
    """Refuse a split made from another shard set than the manifest's (slide ids, patients, digest)."""
    split_slides, now = data["slides"], {r["slide_id"]: r for r in rows}
    added, missing = set(now) - set(split_slides), set(split_slides) - set(now)
    if added or missing:
        parts = ([f"added {_ids(added)}"] if added else []) + ([f"missing {_ids(missing)}"] if missing else [])
        raise ShardError(path, f"shards in {shards_dir} changed since the split was made: {'; '.join(parts)} — "
                        "run split again")
    for s in sorted(now):
        if now[s]["patient_id"] != split_slides[s]:
            raise ShardError(path, f"slide {s} belongs to patient {now[s]['patient_id']} in "
                            f"{shards_dir / MANIFEST_NAME} but to {split_slides[s]} in the split — run split again")
    digest = data.get("manifest_digest")
    if digest is not None and digest != digest_rows(rows):
        recorded = data.get("shards") if isinstance(data.get("shards"), dict) else {}
        changed = []
        for s in sorted(now):
            old = recorded.get(s)
            if isinstance(old, dict) and (old.get("shard"), old.get("n_tiles")) != (now[s]["shard"], now[s]["n_tiles"]):
                changed.append(f"{s} ({old.get('shard')}, {old.get('n_tiles')} tiles -> {now[s]['shard']}, "
                               f"{now[s]['n_tiles']} tiles)")
        detail = f": {', '.join(changed[:_MAX_LISTED])}" if changed else " (tile counts or shard files differ)"
        raise ShardError(path, f"shards in {shards_dir} changed since the split was made{detail} — run split again")


def load_fold(splits_path: str | Path, shards_dir: str | Path, fold: int) -> FoldAssignment:
    """Fold ``fold`` of a split, after checking it against leaks and against the shards it will be trained on."""
    path, shards_dir = Path(splits_path), Path(shards_dir)
    data = read_splits(path)
    n = len(data["folds"])
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 0 <= fold < n:
        raise ShardError(path, f"fold {fold} is out of range: this split has {n} {_plural('fold', n)} "
                        f"(0 to {n - 1})")
    fold = int(fold)
    check_fold_leaks(data, fold, path)
    rows = read_manifest(shards_dir)
    check_shard_set(data, rows, path, shards_dir)
    f = data["folds"][fold]
    shard_of = {r["slide_id"]: r["shard"] for r in rows}
    for s in sorted(set(f["train_slides"]) | set(f["val_slides"]) | set(f.get("tune_slides", []))):
        if not (shards_dir / shard_of[s]).is_file():
            raise ShardError(shards_dir / shard_of[s], f"shard of slide {s} is listed in {MANIFEST_NAME} but missing: "
                            "run extract again, then split")
    return FoldAssignment(fold=fold, train_slides=tuple(sorted(f["train_slides"])),
                          val_slides=tuple(sorted(f["val_slides"])), train_patients=tuple(sorted(f["train_patients"])),
                          val_patients=tuple(sorted(f["val_patients"])),
                          tune_slides=tuple(sorted(f.get("tune_slides", []))),
                          tune_patients=tuple(sorted(f.get("tune_patients", []))),
                          test_patients=tuple(sorted(data.get("test_patients", []))),
                          format_version=int(data.get("format_version", 1)))


__all__ = ["FoldAssignment", "load_fold", "make_splits", "write_splits", "check_splits_output", "read_splits",
           "patient_diagnoses", "positive_class", "check_shard_set", "SPLITS_FORMAT_VERSION"]
