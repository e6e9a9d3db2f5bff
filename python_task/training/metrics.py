"""Tile-, slide- and patient-level metrics (scikit-learn underneath), and the decision threshold.

Every function returns plain Python floats (never numpy scalars, so ``json.dump`` works) and gives NaN, never an
exception, when a metric is undefined: one class only, empty input, non-finite probabilities. Labels must be 0/1;
the positive class is label 1 (malignant); a tile is called malignant when ``prob >= threshold``.

Definitions where a choice was needed:

* ``val_balanced_accuracy`` = (sensitivity + specificity) / 2: NaN unless both classes are present.
* ``val_f1``: F1 of the positive class; NaN when it is 0/0 (no positive tile and no positive call).
* ``val_loss``: binary cross-entropy (``sklearn.metrics.log_loss``) on probabilities clipped to [1e-7, 1 - 1e-7],
  Keras' epsilon, unless the caller passes its own ``loss``.
* Slide/patient level: a group's score aggregates its tile probabilities (:func:`aggregate`: ``mean`` by default,
  ``median``, ``q90``, ``top10``, ``smoothed_max``); its label is the maximum tile label (malignant if any tile is).
  A group is called malignant when its score reaches the threshold (:func:`group_decisions`: accuracy, balanced
  accuracy, sensitivity, specificity; and the Brier score of the score against the label).
* :func:`choose_threshold`: the ROC cut-off maximising Youden's J (TPR - FPR), moved half-way down to the next
  lower score, so it separates the two scores around it instead of sitting on one of them; 0.5 when undefined.
* :func:`choose_slide_threshold`: the decision threshold ``train`` records, chosen on held-out (calibration) tiles
  for the decision it serves (``predict``'s ``slide.json`` calls a slide malignant when its score reaches it):
  each slide scored by the run's aggregation, the cut between two neighbouring slide scores that
  maximises Youden's J over slides, placed half-way between them; among equally good cuts, the one nearest 0.5.
  So with slides that separate, it lies half-way between the highest benign and the lowest malignant slide
  score, never at an extreme tile probability; 0.5 when the slides are of one class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

NAN = float("nan")
FIXED_THRESHOLD = 0.5  # the decision threshold without a tuning set (and whenever one cannot be chosen)
AGGREGATIONS = ("mean", "median", "q90", "top10", "smoothed_max")  # tiles -> slide or patient: see aggregate
TOP_FRACTION = 0.1  # ``top10``: a group's score is the mean of its highest 10 % of tile probabilities
QUANTILE = 0.9  # ``q90``: a group's score is this quantile of its tile probabilities
NEIGHBOUR_REACH = 1.01  # ``smoothed_max``: neighbours lie within this many tile sides (1.01: the 3 x 3 on a grid)
PROB_EPSILON = 1e-7
TILE_KEYS = ("val_auc", "val_accuracy", "val_balanced_accuracy", "val_sensitivity", "val_specificity", "val_f1",
             "val_loss")
# The contract's metrics (``metrics.json`` of every run, the metric columns of ``results.csv``), in order: what
# OpenMOLE parses into Vals of the same names and what the report ranks by.
CONTRACT_METRICS = (*TILE_KEYS, "val_slide_auc", "val_patient_auc", "threshold", "train_seconds", "epochs_run",
                    "n_train_tiles", "n_val_tiles", "n_params")
# Beyond the contract, in ``metrics.json`` since issue 14 and in the local runner's ``results.csv``: how the
# epoch and threshold were chosen and how many patients (per class) lie behind the patient- and slide-level
# figures; the report reads them where present (OpenMOLE's tables may lack them).
# The decisions a pathologist reads, at the run's threshold: per slide and per patient (a group's score as
# :func:`aggregate` gives it, called malignant when it reaches the threshold), and the Brier score of that score
# against the group's label (its calibration and sharpness in one number, lower is better).
DECISION_METRICS = tuple(f"val_{level}_{name}" for level in ("slide", "patient")
                         for name in ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "brier"))
SELECTION_METRICS = ("tune_auc", "selection_tuned", "best_epoch", "n_tune_patients", "n_calibration_patients",
                     "calibration_seconds")
COUNT_METRICS = ("n_val_patients", "n_val_patients_pos", "n_val_patients_neg", "n_val_slides", "n_val_slides_pos",
                 "n_val_slides_neg")
RESULT_METRICS = (*CONTRACT_METRICS, *DECISION_METRICS, *SELECTION_METRICS, *COUNT_METRICS)


def _arrays(y_true, prob) -> tuple[np.ndarray, np.ndarray]:
    """Labels as int64 0/1 and probabilities as float64, both 1-D and of the same length (ValueError otherwise)."""
    y_raw = np.asarray(y_true).reshape(-1)
    p = np.asarray(prob, dtype=np.float64).reshape(-1)
    if y_raw.shape != p.shape:
        raise ValueError(f"{len(y_raw)} labels but {len(p)} probabilities")
    if y_raw.size and not np.isin(y_raw, (0, 1)).all():
        raise ValueError(f"labels must be 0 (benign) or 1 (malignant), got {sorted(set(np.unique(y_raw).tolist()))}")
    return y_raw.astype(np.int64), p


def _defined(y: np.ndarray, p: np.ndarray) -> bool:
    """Both classes present and every probability finite: what ranking metrics and thresholds need."""
    return bool(len(np.unique(y)) == 2 and np.isfinite(p).all())


def auc(y_true, prob) -> float:
    """ROC AUC (sklearn ``roc_auc_score``); NaN with one class, no input or non-finite probabilities."""
    from sklearn.metrics import roc_auc_score

    y, p = _arrays(y_true, prob)
    return float(roc_auc_score(y, p)) if _defined(y, p) else NAN


def choose_threshold(y_true, prob) -> float:
    """Decision threshold maximising Youden's J (sensitivity + specificity - 1) on the ROC (sklearn ``roc_curve``).

    The best ROC cut-off ``t`` (highest one among ties) is moved half-way to the next lower probability, so
    ``prob >= threshold`` calls exactly the same tiles as ``prob >= t`` on these data but the threshold lies between
    the two classes' scores. 0.5 when only one class is present, the input is empty or not finite.
    """
    from sklearn.metrics import roc_curve

    y, p = _arrays(y_true, prob)
    if not _defined(y, p):
        return 0.5
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    # J * n_pos * n_neg in exact integers, so equal J values tie exactly (float TPR - FPR would not)
    j = np.rint(tpr * n_pos).astype(np.int64) * n_neg - np.rint(fpr * n_neg).astype(np.int64) * n_pos
    j = np.where(np.isfinite(thresholds), j, np.iinfo(np.int64).min)  # the first cut-off, +inf, calls nothing
    t = float(thresholds[int(np.argmax(j))])
    below = p[p < t]
    return float((t + below.max()) / 2) if below.size else t


def choose_slide_threshold(y_true, prob, slide_ids, how: str = "mean", layout: TileLayout | None = None) -> float:
    """The decision threshold chosen on (calibration) tiles for the slide-level decision: see the module doc."""
    _, scores, labels = aggregate(prob, y_true, slide_ids, how, layout)
    if not _defined(labels, scores):
        return FIXED_THRESHOLD
    values = np.unique(scores)
    # candidate cuts: half-way between neighbouring slide scores, and half-way to 0 and to 1 beyond the ends
    cuts = np.concatenate([[values[0] / 2], (values[:-1] + values[1:]) / 2, [(values[-1] + 1) / 2]])
    n_pos, n_neg = int(labels.sum()), int(len(labels) - labels.sum())
    pred = scores[None, :] >= cuts[:, None]
    tp = (pred & (labels[None, :] == 1)).sum(axis=1)
    fp = (pred & (labels[None, :] == 0)).sum(axis=1)
    j = tp * n_neg - fp * n_pos  # Youden's J * n_pos * n_neg, exact in integers
    best = np.flatnonzero(j == j.max())
    return float(cuts[best[np.argmin(np.abs(cuts[best] - 0.5))]])


def _confusion(y: np.ndarray, pred: np.ndarray) -> tuple[int, int, int, int]:
    from sklearn.metrics import confusion_matrix

    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    return int(tn), int(fp), int(fn), int(tp)


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else NAN


def tile_metrics(y_true, prob, threshold: float, loss: float | None = None) -> dict[str, float]:
    """Tile-level validation metrics at ``threshold``: the ``val_*`` keys of the metrics contract.

    ``loss``: the caller's validation loss; when None, binary cross-entropy of ``prob`` (sklearn ``log_loss``).
    """
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, log_loss

    y, p = _arrays(y_true, prob)
    if len(y) == 0:
        return {k: NAN for k in TILE_KEYS} | ({"val_loss": float(loss)} if loss is not None else {})
    finite = bool(np.isfinite(p).all())
    pred = (p >= threshold).astype(np.int64)
    tn, fp, fn, tp = _confusion(y, pred)
    both = tp + fn > 0 and tn + fp > 0
    if loss is None:
        loss = (float(log_loss(y, np.clip(p, PROB_EPSILON, 1 - PROB_EPSILON), labels=[0, 1])) if finite else NAN)
    out = {
        "val_auc": auc(y, p),
        "val_accuracy": float(accuracy_score(y, pred)) if finite else NAN,
        "val_balanced_accuracy": float(balanced_accuracy_score(y, pred)) if both and finite else NAN,
        "val_sensitivity": _ratio(tp, tp + fn) if finite else NAN,
        "val_specificity": _ratio(tn, tn + fp) if finite else NAN,
        "val_f1": float(f1_score(y, pred, pos_label=1, zero_division=np.nan)) if finite else NAN,
        "val_loss": float(loss),
    }
    return {k: float(v) for k, v in out.items()}


@dataclass(frozen=True)
class TileLayout:
    """Where tiles lie, for the ``smoothed_max`` aggregation: level-0 top-left corners (N x 2), a tile's level-0
    side (one for all, or one per tile) and, when groups span slides (patients), each tile's slide, so that
    neighbourhoods never cross from one slide to another."""

    coords: Any
    extent: Any
    slides: Any = None


def aggregate(prob, y_true, groups, how: str = "mean",
              layout: TileLayout | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group (slide or patient): sorted unique ids, score and label (1 if any of its tiles is malignant).

    ``how`` (:data:`AGGREGATIONS`): ``mean`` tile probability, ``median``, ``q90`` (the 90th percentile),
    ``top10`` (mean of the highest ceil(10 %) tiles, at least one) or ``smoothed_max`` (the highest of the tiles'
    neighbourhood means, :func:`smoothed_max`; needs the tiles' :class:`TileLayout`). A group with a non-finite
    probability gets a NaN score. Empty input gives three empty arrays.
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}; choose from {', '.join(AGGREGATIONS)}")
    y, p = _arrays(y_true, prob)
    g = np.asarray(groups).reshape(-1)
    if g.shape != p.shape:
        raise ValueError(f"{len(g)} group ids but {len(p)} probabilities")
    if len(g) == 0:
        return g.copy(), np.empty(0), np.empty(0, dtype=np.int64)
    ids, inverse = np.unique(g, return_inverse=True)
    inverse = inverse.reshape(-1)
    counts = np.bincount(inverse, minlength=len(ids))
    labels = np.zeros(len(ids), dtype=np.int64)
    np.maximum.at(labels, inverse, y)
    if how == "mean":
        return ids, np.bincount(inverse, weights=p, minlength=len(ids)) / counts, labels
    if how == "smoothed_max":
        if layout is None:
            raise ValueError("the smoothed_max aggregation needs the tiles' coordinates and extent")
        xy = np.asarray(layout.coords, dtype=np.float64).reshape(len(p), 2)
        ext = np.broadcast_to(np.asarray(layout.extent, dtype=np.float64), p.shape)
        section = (np.unique(np.asarray(layout.slides).reshape(-1), return_inverse=True)[1].reshape(-1)
                   if layout.slides is not None else np.zeros(len(p), np.int64))
    order = np.argsort(inverse, kind="stable")  # the tiles grouped, each group's rows in input order
    ends = np.cumsum(counts)
    scores = np.empty(len(ids))
    for k, (start, end) in enumerate(zip(ends - counts, ends)):
        rows = order[start:end]
        vals = p[rows]
        if not np.isfinite(vals).all():
            scores[k] = NAN
        elif how == "median":
            scores[k] = np.median(vals)
        elif how == "q90":
            scores[k] = np.quantile(vals, QUANTILE)
        elif how == "top10":
            scores[k] = top_fraction_mean(vals)
        else:
            scores[k] = smoothed_max(vals, xy[rows], float(ext[rows].max()), section[rows])
    return ids, scores.astype(np.float64), labels


def aggregate_tiles(prob, how: str, layout: TileLayout | None = None) -> float:
    """One group's score (a slide's, in ``predict``) by :func:`aggregate`'s rule ``how``."""
    p = np.asarray(prob, dtype=np.float64).reshape(-1)
    return float(aggregate(p, np.zeros(len(p), np.int64), np.zeros(len(p), np.int64), how, layout)[1][0]) \
        if len(p) else NAN


def smoothed_max(values, coords, extent: float, sections=None) -> float:
    """The highest neighbourhood mean: each tile's probability averaged with those of the tiles whose top-left
    corner lies within one tile side of its own (Chebyshev distance, so the 3 x 3 tiles around it on a grid whose
    step is the tile), then the maximum over tiles. One confident tile among benign neighbours is diluted by them;
    a lesion of a few adjacent tiles keeps its level (tiles absent from the grid, outside the tissue or the
    annotations, do not count; nor do tiles of another ``sections`` value: another slide). NaN without tiles."""
    from sklearn.neighbors import KDTree

    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        return NAN
    xy = np.asarray(coords, dtype=np.float64).reshape(len(v), 2)
    if sections is not None:  # a third axis on which two sections lie further apart than any reach
        xy = np.column_stack([xy, np.asarray(sections, dtype=np.float64) * 4 * max(extent, 1.0)])
    neighbours = KDTree(xy, metric="chebyshev").query_radius(xy, r=extent * NEIGHBOUR_REACH)
    return float(max(v[n].mean() for n in neighbours))


def top_fraction_mean(values, fraction: float = TOP_FRACTION) -> float:
    """Mean of the highest ceil(``fraction`` of the) values, at least one; NaN when there is none."""
    v = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))
    if v.size == 0:
        return NAN
    return float(v[-max(1, math.ceil(fraction * len(v))):].mean())


def binary_cross_entropy(y_true, prob) -> float:
    """Mean binary cross-entropy of probabilities clipped to [``PROB_EPSILON``, 1 - ``PROB_EPSILON``] (Keras'
    epsilon); NaN for no input. The per-epoch validation loss of training."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.clip(np.asarray(prob, dtype=np.float64), PROB_EPSILON, 1 - PROB_EPSILON)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))) if len(y) else NAN


def group_auc(y_true, prob, groups, how: str = "mean", layout: TileLayout | None = None) -> float:
    """ROC AUC over groups (slides or patients) of their aggregated scores; NaN when undefined."""
    _, scores, labels = aggregate(prob, y_true, groups, how, layout)
    return auc(labels, scores)


def group_decisions(y_true, prob, groups, threshold: float, how: str = "mean",
                    layout: TileLayout | None = None) -> dict[str, float]:
    """The decisions on groups (slides or patients) at ``threshold``: ``accuracy``, ``balanced_accuracy``,
    ``sensitivity``, ``specificity`` of their aggregated scores against their labels, and ``brier``, the mean squared
    difference between score and label. NaN where undefined (no group, a non-finite score; balanced accuracy,
    sensitivity or specificity without a group of the class they need)."""
    _, scores, labels = aggregate(prob, y_true, groups, how, layout)
    names = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "brier")
    if len(scores) == 0 or not np.isfinite(scores).all():
        return dict.fromkeys(names, NAN)
    called = (scores >= threshold).astype(np.int64)
    tn, fp, fn, tp = _confusion(labels, called)
    sensitivity, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    return {"accuracy": float(np.mean(called == labels)),
            "balanced_accuracy": (sensitivity + specificity) / 2,
            "sensitivity": sensitivity, "specificity": specificity,
            "brier": float(np.mean((scores - labels) ** 2))}


def evaluation_metrics(y_true, prob, slide_ids: Sequence[str], patient_ids: Sequence[str],
                       threshold: float | None = None, loss: float | None = None, how: str = "mean",
                       layout: TileLayout | None = None) -> dict[str, float]:
    """Tile metrics plus ``val_slide_auc``, ``val_patient_auc``, the decisions per slide and per patient
    (:data:`DECISION_METRICS`, mean tile probability per group) and ``threshold``.

    ``threshold`` defaults to :func:`choose_threshold` on these same predictions, so the thresholded metrics are
    optimistic for them; ``train`` passes the threshold chosen on its tuning set (:func:`choose_slide_threshold`)
    for an unbiased estimate. The AUCs do not depend on it.
    """
    t = choose_threshold(y_true, prob) if threshold is None else float(threshold)
    out = tile_metrics(y_true, prob, t, loss)
    if layout is not None and layout.slides is None:
        layout = TileLayout(layout.coords, layout.extent, slide_ids)
    out.update(val_slide_auc=group_auc(y_true, prob, slide_ids, how, layout),
               val_patient_auc=group_auc(y_true, prob, patient_ids, how, layout), threshold=t)
    for level, groups in (("slide", slide_ids), ("patient", patient_ids)):
        out.update({f"val_{level}_{k}": v for k, v in group_decisions(y_true, prob, groups, t, how, layout).items()})
    return {k: float(v) for k, v in out.items()}


BOOTSTRAP_REPLICATES = 2000


def bootstrap_interval(y_true, prob, patient_ids, statistic: str = "patient_auc", *, confidence: float = 0.95,
                       replicates: int = BOOTSTRAP_REPLICATES, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval over patients of ``statistic`` (``patient_auc``: AUC of the patients' mean
    tile probability; ``tile_auc``: AUC over the resampled patients' tiles). Patients are resampled with
    replacement within each class (a patient's class: malignant when any of its tiles is), so every replicate has
    both; the interval lies inside [0, 1] by construction. NaN, NaN without a patient of each class."""
    y, p = _arrays(y_true, prob)
    g = np.asarray(patient_ids).reshape(-1)
    ids, scores, labels = aggregate(p, y, g, "mean")
    if len(ids) == 0 or len(np.unique(labels)) < 2 or not np.isfinite(scores).all():
        return NAN, NAN
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    members = [np.flatnonzero(g == pid) for pid in ids] if statistic == "tile_auc" else []
    values = np.empty(replicates)
    for b in range(replicates):
        pick = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        if statistic == "patient_auc":
            values[b] = auc(labels[pick], scores[pick])
        else:
            rows = np.concatenate([members[i] for i in pick])
            values[b] = auc(y[rows], p[rows])
    values = values[np.isfinite(values)]
    if not len(values):
        return NAN, NAN
    tail = (1 - confidence) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))
