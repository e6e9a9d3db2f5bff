"""Tile, slide and patient metrics against hand-computed values; NaN (not an exception) when undefined."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from python_task.training.metrics import (
    AGGREGATIONS,
    DECISION_METRICS,
    FIXED_THRESHOLD,
    RESULT_METRICS,
    TileLayout,
    aggregate,
    aggregate_tiles,
    choose_threshold,
    evaluation_metrics,
    group_auc,
    group_decisions,
    tile_metrics,
)

TILE_KEYS = {"val_auc", "val_accuracy", "val_balanced_accuracy", "val_sensitivity", "val_specificity", "val_f1",
             "val_loss"}
EVAL_KEYS = TILE_KEYS | {"val_slide_auc", "val_patient_auc", "threshold"} | set(DECISION_METRICS)

# 3 benign and 4 malignant tiles; at threshold 0.5: TN 2, FP 1 (0.6), FN 1 (0.3), TP 3
Y = [0, 0, 0, 1, 1, 1, 1]
P = [0.1, 0.4, 0.6, 0.3, 0.7, 0.8, 0.9]


def plain_floats(d: dict) -> None:
    assert all(type(v) is float for v in d.values()), {k: type(v) for k, v in d.items()}
    json.dumps(d)


def test_tile_metrics_at_a_threshold_by_hand():
    m = tile_metrics(Y, P, 0.5)
    assert set(m) == TILE_KEYS
    plain_floats(m)
    assert m["val_sensitivity"] == pytest.approx(3 / 4)
    assert m["val_specificity"] == pytest.approx(2 / 3)
    assert m["val_accuracy"] == pytest.approx(5 / 7)
    assert m["val_balanced_accuracy"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert m["val_f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    # AUC: of the 12 (malignant, benign) pairs, 0.3 outranks only 0.1; 0.7, 0.8, 0.9 outrank all three
    assert m["val_auc"] == pytest.approx(10 / 12)
    bce = -np.mean([math.log(1 - p) if y == 0 else math.log(p) for y, p in zip(Y, P)])
    assert m["val_loss"] == pytest.approx(bce)
    assert tile_metrics(Y, P, 0.5, loss=0.25)["val_loss"] == 0.25
    # a tile exactly at the threshold is called malignant
    assert tile_metrics(Y, P, 0.7)["val_sensitivity"] == pytest.approx(3 / 4)
    assert tile_metrics(Y, P, 0.71)["val_sensitivity"] == pytest.approx(2 / 4)


def test_auc_of_perfect_and_reversed_rankings():
    y = [0, 0, 1, 1]
    assert tile_metrics(y, [0.1, 0.2, 0.8, 0.9], 0.5)["val_auc"] == 1.0
    assert tile_metrics(y, [0.9, 0.8, 0.2, 0.1], 0.5)["val_auc"] == 0.0
    assert tile_metrics(y, [0.5, 0.5, 0.5, 0.5], 0.5)["val_auc"] == 0.5


def test_one_class_gives_nan_not_an_error():
    m = tile_metrics([1, 1, 1], [0.2, 0.7, 0.9], 0.5)
    plain_floats(m)
    assert math.isnan(m["val_auc"]) and math.isnan(m["val_specificity"]) and math.isnan(m["val_balanced_accuracy"])
    assert m["val_sensitivity"] == pytest.approx(2 / 3) and m["val_accuracy"] == pytest.approx(2 / 3)
    assert math.isfinite(m["val_loss"])
    benign = tile_metrics([0, 0], [0.1, 0.2], 0.5)
    assert math.isnan(benign["val_sensitivity"]) and benign["val_specificity"] == 1.0
    assert math.isnan(benign["val_f1"])  # no malignant tile, none called: 0/0
    assert choose_threshold([1, 1, 1], [0.2, 0.7, 0.9]) == 0.5
    e = evaluation_metrics([1, 1, 1], [0.2, 0.7, 0.9], ["a", "a", "b"], ["p", "p", "p"])
    assert set(e) == EVAL_KEYS and e["threshold"] == 0.5
    assert math.isnan(e["val_auc"]) and math.isnan(e["val_slide_auc"]) and math.isnan(e["val_patient_auc"])
    plain_floats(e)


def test_empty_and_non_finite_inputs_give_nan():
    m = evaluation_metrics([], [], [], [])
    assert set(m) == EVAL_KEYS and m["threshold"] == 0.5
    assert all(math.isnan(v) for k, v in m.items() if k != "threshold")
    plain_floats(m)
    ids, scores, labels = aggregate([], [], [])
    assert len(ids) == len(scores) == len(labels) == 0
    bad = evaluation_metrics([0, 1, 1], [0.1, float("nan"), 0.8], ["a", "b", "b"], ["p", "q", "q"])
    assert math.isnan(bad["val_auc"]) and math.isnan(bad["val_loss"]) and math.isnan(bad["val_patient_auc"])
    assert bad["threshold"] == 0.5


def test_labels_must_be_binary():
    with pytest.raises(ValueError, match="0 .* or 1"):
        tile_metrics([0, 2], [0.1, 0.9], 0.5)
    with pytest.raises(ValueError, match="labels"):
        tile_metrics([0, 1, 1], [0.1, 0.9], 0.5)


def test_aggregation_by_group():
    groups = ["B"] * 4 + ["A"] * 20
    prob = [0.1, 0.2, 0.3, 0.9] + [i / 20 for i in range(20)]
    y = [0, 0, 0, 1] + [0] * 20
    ids, mean, labels = aggregate(prob, y, groups)
    assert list(ids) == ["A", "B"] and list(labels) == [0, 1]
    assert mean == pytest.approx([np.mean(prob[4:]), 0.375])
    _, median, _ = aggregate(prob, y, groups, how="median")
    assert median == pytest.approx([(9 / 20 + 10 / 20) / 2, 0.25])
    _, top, _ = aggregate(prob, y, groups, how="top10")
    assert top == pytest.approx([(18 / 20 + 19 / 20) / 2, 0.9])  # top 10 % of 20 = 2 tiles; of 4 = 1 tile
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(prob, y, groups, how="max")


def test_slide_and_patient_auc_by_hand():
    # slide means: s1 0.2 (benign), s2 0.6 (malignant), s3 0.7 (benign), s4 0.9 (malignant)
    slides = ["s1", "s1", "s2", "s2", "s3", "s4"]
    patients = ["p1", "p1", "p1", "p1", "p2", "p2"]
    y = [0, 0, 1, 0, 0, 1]
    prob = [0.1, 0.3, 0.8, 0.4, 0.7, 0.9]
    # slide ranking: malignant {0.6, 0.9} vs benign {0.2, 0.7}: pairs won 0.6>0.2, 0.9>0.2, 0.9>0.7 -> 3/4
    assert group_auc(y, prob, slides) == pytest.approx(3 / 4)
    # both patients are malignant (each has a malignant tile): patient AUC undefined
    assert math.isnan(group_auc(y, prob, patients))
    m = evaluation_metrics(y, prob, slides, ["p1", "p1", "p2", "p2", "p3", "p4"], threshold=0.65)
    # patients p1 {s1} 0.2 benign, p2 {s2} 0.6 malignant, p3 0.7 benign, p4 0.9 malignant: same as slides
    assert m["val_slide_auc"] == pytest.approx(3 / 4) and m["val_patient_auc"] == pytest.approx(3 / 4)
    # at 0.65: s1 right, s2 wrong (0.6 < 0.65), s3 wrong, s4 right
    assert m["val_slide_accuracy"] == pytest.approx(2 / 4) and m["threshold"] == 0.65
    # malignant s2 missed, s4 called: sensitivity 1/2; benign s1 right, s3 called malignant: specificity 1/2
    assert m["val_slide_sensitivity"] == m["val_slide_specificity"] == m["val_slide_balanced_accuracy"] == 0.5
    # Brier: ((0.2-0)^2 + (0.6-1)^2 + (0.7-0)^2 + (0.9-1)^2) / 4
    assert m["val_slide_brier"] == pytest.approx((0.04 + 0.16 + 0.49 + 0.01) / 4)
    plain_floats(m)
    two = evaluation_metrics(y, prob, slides, ["q1", "q1", "q2", "q2", "q2", "q2"], threshold=0.5)
    # q1: tiles 0.1, 0.3, benign, mean 0.2; q2: 0.8, 0.4, 0.7, 0.9 malignant, mean 0.7 -> perfectly ranked
    assert two["val_patient_auc"] == 1.0 and two["val_patient_accuracy"] == 1.0


def test_youden_threshold_lies_between_separable_classes():
    y = [0, 0, 0, 1, 1]
    p = [0.1, 0.2, 0.3, 0.7, 0.8]
    t = choose_threshold(y, p)
    assert 0.3 < t < 0.7 and type(t) is float
    m = tile_metrics(y, p, t)
    assert m["val_sensitivity"] == 1.0 and m["val_specificity"] == 1.0
    assert evaluation_metrics(y, p, list("abcde"), list("abcde"))["threshold"] == t


def test_youden_threshold_on_overlapping_classes():
    # cut-offs: 0.8 -> J 1/3, 0.6 -> J 2/3, 0.4 -> 1/3, 0.35 -> 2/3, 0.3 -> 1/3; ties go to the higher cut-off,
    # moved half-way down to the next score (0.4)
    y = [0, 0, 1, 0, 1, 1]
    p = [0.1, 0.3, 0.35, 0.4, 0.6, 0.8]
    assert choose_threshold(y, p) == pytest.approx(0.5)
    m = tile_metrics(y, p, choose_threshold(y, p))
    assert m["val_sensitivity"] + m["val_specificity"] - 1 == pytest.approx(2 / 3)


def test_group_decisions_are_the_calls_a_pathologist_reads():
    # slides: a 0.9 (malignant), b 0.55 (malignant), c 0.3 (benign), d 0.6 (benign); at 0.5: b and d called malignant
    y = [1, 1, 0, 1, 0, 0, 0, 0]
    prob = [0.9, 0.9, 0.5, 0.6, 0.3, 0.3, 0.6, 0.6]
    slides = ["a", "a", "b", "b", "c", "c", "d", "d"]
    d = group_decisions(y, prob, slides, 0.5)
    assert d["sensitivity"] == 1.0 and d["specificity"] == 0.5 and d["accuracy"] == 0.75
    assert d["balanced_accuracy"] == 0.75 and d["brier"] == pytest.approx((0.01 + 0.2025 + 0.09 + 0.36) / 4)
    one_class = group_decisions([0, 0], [0.2, 0.7], ["a", "b"], 0.5)
    assert one_class["specificity"] == 0.5 and math.isnan(one_class["sensitivity"])
    assert math.isnan(one_class["balanced_accuracy"]), "undefined without a malignant group"
    assert all(math.isnan(v) for v in group_decisions([], [], [], 0.5).values())
    assert set(DECISION_METRICS) <= set(RESULT_METRICS), "they travel to results.csv and the OpenMOLE table"


def _grid(n: int, step: float = 128.0) -> np.ndarray:
    return np.array([[c * step, r * step] for r in range(n) for c in range(n)])


@pytest.mark.parametrize("how", AGGREGATIONS)
def test_one_isolated_high_tile_does_not_call_a_benign_slide(how):
    coords = _grid(5)
    prob = np.full(25, 0.1)
    prob[12] = 0.99  # the centre tile: one confident false positive among benign neighbours
    layout = TileLayout(coords, 128.0)
    assert aggregate_tiles(prob, how, layout) < FIXED_THRESHOLD
    d = group_decisions(np.zeros(25, int), prob, ["s"] * 25, FIXED_THRESHOLD, how, layout)
    assert d["accuracy"] == 1.0 and d["specificity"] == 1.0


def test_the_default_aggregation_is_a_known_rule_and_a_lesion_of_adjacent_tiles_calls_the_slide():
    from python_task.training.config import train_options

    assert train_options()["aggregation"].default in AGGREGATIONS
    coords = _grid(6)
    prob = np.full(36, 0.1)
    focus = [0, 1, 6, 7]  # a 2 x 2 focus in a corner: a ninth of the slide
    prob[focus] = 0.97
    layout = TileLayout(coords, 128.0)
    assert aggregate_tiles(prob, "smoothed_max", layout) == pytest.approx(0.97)  # a corner tile's 4 are all focus
    assert aggregate_tiles(prob, "mean") == pytest.approx((4 * 0.97 + 32 * 0.1) / 36)
    assert aggregate_tiles(prob, "q90") == pytest.approx(np.quantile(prob, 0.9))


def test_smoothed_max_never_mixes_two_slides_of_a_patient():
    coords = np.vstack([_grid(3), _grid(3)])  # two slides, the same coordinates
    prob = np.concatenate([np.full(9, 0.1), np.full(9, 0.1)])
    prob[4] = 0.9  # slide a's centre
    slides = ["a"] * 9 + ["b"] * 9
    by_slide = aggregate(prob, np.zeros(18, int), slides, "smoothed_max", TileLayout(coords, 128.0))[1]
    by_patient = aggregate(prob, np.zeros(18, int), ["p"] * 18, "smoothed_max", TileLayout(coords, 128.0, slides))[1]
    # a corner tile of slide a sees 4 tiles, the high centre among them: (0.9 + 3 * 0.1) / 4
    assert by_slide == pytest.approx([0.3, 0.1])
    assert by_patient == pytest.approx([0.3])  # slide b's tiles are not slide a's neighbours
    with pytest.raises(ValueError, match="coordinates"):
        aggregate(prob, np.zeros(18, int), slides, "smoothed_max")
