"""Platt calibration: fitted on held-out tiles, monotone, each patient weighing the same, identity when it cannot
be fitted."""

from __future__ import annotations

import numpy as np
import pytest

from python_task.training.calibration import Calibration, fit_platt, logit, patient_weights


def _overconfident(seed: int = 0, n: int = 400):
    """Tiles of 4 patients whose network scores sit near 0 and 1 while a fifth of each class is on the wrong side:
    the true probability at a score near 1 is about 0.8, not 1."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n // 2)
    right = rng.random(n) > 0.2
    score = np.where(right == (y == 1), 0.99, 0.01) + rng.normal(0, 0.003, n)
    patients = np.array([f"p{i % 2 + 2 * yi}" for i, yi in enumerate(y)])
    return y, np.clip(score, 1e-4, 1 - 1e-4), patients


def test_platt_pulls_overconfident_scores_towards_the_observed_rate_and_keeps_the_order():
    y, p, patients = _overconfident()
    cal = fit_platt(y, p, patients)
    assert cal.method == "platt" and 0 < cal.slope < 1 and cal.n_tiles == len(y) and cal.n_patients == 4
    q = cal.apply(p)
    assert np.all(np.diff(q[np.argsort(p)]) >= 0)  # monotone: every AUC unchanged
    assert q[p > 0.5].mean() == pytest.approx(y[p > 0.5].mean(), abs=0.05)  # about 0.8, not 0.99
    assert np.mean((q - y) ** 2) < np.mean((p - y) ** 2)  # a better Brier score on these tiles


def test_identity_when_it_cannot_be_fitted():
    assert fit_platt([1, 1, 1], [0.2, 0.7, 0.9], ["a", "a", "b"]) == Calibration(n_tiles=3, n_patients=2)
    inverted = fit_platt([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1], ["a", "a", "b", "b"])  # a reversed ranking
    assert inverted.method == "none"
    assert fit_platt([0, 1], [0.2, float("nan")], ["a", "b"]).method == "none"
    p = np.array([0.0, 0.3, 1.0])
    assert np.array_equal(Calibration().apply(p), p)


def test_every_patient_and_class_weighs_the_same():
    labels = np.array([0] * 90 + [0] * 10 + [1] * 50)
    patients = np.array(["big"] * 90 + ["small"] * 10 + ["m"] * 50)
    w = patient_weights(labels, patients)
    assert w[:90].sum() == pytest.approx(w[90:100].sum())  # two benign patients: the same total
    assert w[:100].sum() == pytest.approx(w[100:].sum())  # each class half
    assert w.sum() == pytest.approx(len(w))


def test_json_round_trip_and_an_old_run_without_calibration():
    cal = Calibration("platt", 0.5, -0.25, 100, 4)
    assert Calibration.from_json(cal.to_json()) == cal
    assert Calibration.from_json(None) == Calibration() == Calibration.from_json({})
    assert logit([0.5])[0] == pytest.approx(0.0)


def test_two_patients_whose_tiles_are_perfectly_separated_do_not_run_the_map_off():
    """A benign patient's tiles at about 0.999 and a malignant one's at about 0.999999: a maximum-likelihood fit
    separates them with an intercept near -28 (a raw 0.9999 would become almost 0); the prior towards the identity,
    and two patients counting as little evidence, keep the map near it."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 200)
    p = np.where(y == 1, 1 - 10 ** rng.uniform(-6, -5, 400), 1 - 10 ** rng.uniform(-3, -2, 400))
    cal = fit_platt(y, p, np.where(y == 1, "m", "b"))
    assert cal.method == "platt" and 0.25 < cal.slope < 2 and abs(cal.intercept) < 6
    assert cal.apply([0.9999])[0] > 0.5


def test_more_patients_move_the_map_further_from_the_identity():
    y, p, patients = _overconfident(n=400)
    few = fit_platt(y, p, np.where(y == 1, "m", "b"))
    many = fit_platt(y, p, patients)  # the same tiles spread over 4 patients
    assert abs(many.slope - 1) > abs(few.slope - 1)
