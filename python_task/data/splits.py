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
* **Too few patients.** Errors only where a fold's *validation set* could not be non-empty: ``K < 2`` or more
  folds than patients. When every diagnosis has fewer patients than ``K`` (scikit-learn refuses to stratify
  then), patients are dealt round-robin, class by class, over the folds in a seeded order, which still puts at
  most ``ceil(n_class / K)`` patients of a class in one fold. When a class has fewer patients than ``K`` some
  validation folds lack it (their AUC is NaN); when it has a single patient (or the cohort one diagnosis only)
  some *training* sets lack it and ``train`` refuses those folds. Each such case is logged as a warning and listed
  in the JSON's ``warnings``: the split is still written, since the other folds are usable.

JSON written (extra keys beyond the contract: ``shards``, ``method``, ``warnings``, and per fold
``val_diagnoses``/``train_diagnoses``)::

    {"format_version": 1, "seed": 0, "n_folds": 3, "manifest_digest": "<sha256>", "label_names": [...],
     "patients": {patient_id: diagnosis}, "slides": {slide_id: patient_id},
     "shards": {slide_id: {"shard": "S1.h5", "n_tiles": 120}}, "method": "StratifiedGroupKFold", "warnings": [],
     "folds": [{"fold": 0, "val_patients": [...], "val_slides": [...], "train_patients": [...],
                "train_slides": [...], "tile_counts": {"train": {class: n}, "val": {class: n}},
                "val_diagnoses": {diagnosis: n_patients}, "train_diagnoses": {...}}, ...]}

:func:`load_fold` re-checks a split before training: valid JSON and structure, the fold index, no patient or
slide on both sides of the fold, every slide on its patient's side, the slide -> patient map and the shard set
(slide ids and :func:`manifest_digest`) unchanged since the split was made, and the fold's shard files present.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from python_task.errors import ConfigError, ShardError
from python_task.fileio import write_json_atomic
from python_task.shards.manifest import MANIFEST_NAME, digest_rows, manifest_label_names, read_manifest

log = logging.getLogger(__name__)

SPLITS_FORMAT_VERSION = 1
FOLD_LIST_KEYS = ("val_patients", "val_slides", "train_patients", "train_slides")
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

def make_splits(shards_dir: str | Path, folds: int, seed: int = 0) -> dict:
    """Patient-level stratified K folds of the shards in ``shards_dir`` (see the module doc for the rules)."""
    shards_dir = Path(shards_dir)
    manifest = shards_dir / MANIFEST_NAME
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ConfigError("folds", f"must be a whole number of at least 2 (got {folds!r})")
    folds = int(folds)
    rows = read_manifest(shards_dir)
    label_names = manifest_label_names(rows)
    patients = patient_diagnoses(rows, label_names, manifest)
    slides = {r["slide_id"]: r["patient_id"] for r in sorted(rows, key=lambda r: r["slide_id"])}
    if folds > len(patients):
        raise ShardError(manifest, f"only {len(patients)} patient{'s' * (len(patients) != 1)}: cannot make {folds} "
                        "patient-level folds (each validation set needs at least one patient); use `folds` "
                        f"{len(patients)} or fewer")

    fold_of, method = _assign_folds(patients, folds, seed)
    by_slide = {r["slide_id"]: r for r in rows}
    out_folds = []
    for k in range(folds):
        val_p = sorted(p for p, f in fold_of.items() if f == k)
        train_p = sorted(p for p, f in fold_of.items() if f != k)
        val_s = sorted(s for s, p in slides.items() if fold_of[p] == k)
        train_s = sorted(s for s, p in slides.items() if fold_of[p] != k)
        out_folds.append({
            "fold": k, "val_patients": val_p, "val_slides": val_s, "train_patients": train_p, "train_slides": train_s,
            "tile_counts": {"train": _tile_counts(by_slide, train_s, label_names),
                            "val": _tile_counts(by_slide, val_s, label_names)},
            "val_diagnoses": _diagnosis_counts(patients, val_p, label_names),
            "train_diagnoses": _diagnosis_counts(patients, train_p, label_names)})
    notes = _fold_warnings(patients, out_folds)
    for note in notes:
        log.warning("split: %s", note)
    return {
        "format_version": SPLITS_FORMAT_VERSION, "seed": int(seed), "n_folds": folds,
        "manifest_digest": digest_rows(rows), "label_names": list(label_names),
        "patients": patients, "slides": slides,
        "shards": {s: {"shard": by_slide[s]["shard"], "n_tiles": int(by_slide[s]["n_tiles"])} for s in slides},
        "method": method, "warnings": notes, "folds": out_folds}


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


# --------------------------------------------------------------------------------------------------- loading

@dataclass(frozen=True)
class FoldAssignment:
    """One fold of a checked split: sorted slide and patient ids of each side."""

    fold: int
    train_slides: tuple[str, ...]
    val_slides: tuple[str, ...]
    train_patients: tuple[str, ...]
    val_patients: tuple[str, ...]


def _ids(ids: Iterable[str]) -> str:
    ids = sorted(ids)
    shown = ", ".join(ids[:_MAX_LISTED])
    return shown + (f" and {len(ids) - _MAX_LISTED} more" if len(ids) > _MAX_LISTED else "")


def _plural(word: str, n: int) -> str:
    return word if n == 1 else word + "s"


def read_splits(splits_path: str | Path) -> dict:
    """The JSON of a splits file, with its structure checked; :class:`ShardError` naming the file otherwise."""
    path = Path(splits_path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ShardError(path, "not found: make it with `python -m python_task split`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ShardError(path, f"cannot be read: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ShardError(path, f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}): "
                        "make it again with `split`") from None

    def bad(what: str) -> ShardError:
        return ShardError(path, f"not a splits file: {what}")

    if not isinstance(data, dict):
        raise bad("the top level is not a JSON object")
    version = data.get("format_version", SPLITS_FORMAT_VERSION)
    if not isinstance(version, int) or version > SPLITS_FORMAT_VERSION:
        raise ShardError(path, f"format_version {version!r} is newer than this program reads "
                        f"({SPLITS_FORMAT_VERSION}): update python_task or run split again")
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
        if "fold" in f and f["fold"] != i:
            raise bad(f"the entry at position {i} of 'folds' says it is fold {f['fold']!r}")
    return data


def check_fold_leaks(data: Mapping, fold: int, path: str | Path) -> None:
    """Refuse a fold whose two sides share a patient or a slide, or that puts a slide away from its patient."""
    f = data["folds"][fold]
    slides = data["slides"]
    train_p, val_p = set(f["train_patients"]), set(f["val_patients"])
    train_s, val_s = set(f["train_slides"]), set(f["val_slides"])
    both = train_p & val_p
    if both:
        raise ShardError(path, f"{_plural('patient', len(both))} {_ids(both)} {'is' if len(both) == 1 else 'are'} in "
                        f"both training and validation of fold {fold}: the split leaks")
    both = train_s & val_s
    if both:
        raise ShardError(path, f"{_plural('slide', len(both))} {_ids(both)} {'is' if len(both) == 1 else 'are'} in "
                        f"both training and validation of fold {fold}: the split leaks")
    unknown = (train_s | val_s) - set(slides)
    if unknown:
        raise ShardError(path, f"fold {fold} lists {_plural('slide', len(unknown))} {_ids(unknown)} missing from "
                        "'slides' (slide -> patient): run split again")
    for side, own, other, mine in (("training", train_s, val_p, train_p), ("validation", val_s, train_p, val_p)):
        for s in sorted(own):
            p = slides[s]
            if p in other:
                raise ShardError(path, f"slide {s} is in {side} of fold {fold} but its patient {p} is on the other "
                                "side: the split leaks")
            if p not in mine:
                raise ShardError(path, f"slide {s} is in {side} of fold {fold} but its patient {p} is not: "
                                "run split again")
    unplaced = set(slides) - train_s - val_s
    if unplaced:
        raise ShardError(path, f"fold {fold} places {_plural('slide', len(unplaced))} {_ids(unplaced)} in neither "
                        "training nor validation: run split again")


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
    for s in sorted(set(f["train_slides"]) | set(f["val_slides"])):
        if not (shards_dir / shard_of[s]).is_file():
            raise ShardError(shards_dir / shard_of[s], f"shard of slide {s} is listed in {MANIFEST_NAME} but missing: "
                            "run extract again, then split")
    return FoldAssignment(fold=fold, train_slides=tuple(sorted(f["train_slides"])),
                          val_slides=tuple(sorted(f["val_slides"])), train_patients=tuple(sorted(f["train_patients"])),
                          val_patients=tuple(sorted(f["val_patients"])))


__all__ = ["FoldAssignment", "load_fold", "make_splits", "write_splits", "read_splits", "patient_diagnoses",
           "positive_class"]
