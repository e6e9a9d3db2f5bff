"""Calibration of tile probabilities: Platt scaling fitted on patients the model was not fitted on.

A network's tile probabilities are not probabilities on new patients: trained to near-zero loss, its scores
crowd towards 0 and 1, and by how much differs from one patient to the next. :func:`fit_platt` maps a score
``p`` to ``sigmoid(slope * logit(p) + intercept)``, the logistic regression of the labels on ``logit(p)``
(scikit-learn), fitted on calibration tiles: predictions for patients the model did not fit on (``train``'s
tuning patients, and the out-of-fold predictions of its inner cross-fitting). Each patient weighs the same
whatever its number of tiles, and each diagnosis half, so a patient with many tiles cannot set the scale alone and
0.5 is where a tile is as likely one class as the other. The slope is kept positive (a calibration never reverses
the model's ranking): when the fit gives a slope of 0 or less, or the calibration tiles hold one class only, the
identity is kept and ``method`` says ``none``. The map is monotone, so every AUC is unchanged by it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

CALIBRATIONS = ("platt", "none")  # train's calibration setting
PROB_CLIP = 1e-6  # probabilities are clipped to [PROB_CLIP, 1 - PROB_CLIP] before the logit
MIN_SLOPE = 1e-3  # a fitted slope below this is no calibration (the scores carry no ranking)
PLATT_C = 1e4  # inverse regularisation of the logistic fit: almost none, two parameters on many tiles


@dataclass(frozen=True)
class Calibration:
    """``sigmoid(slope * logit(p) + intercept)``; identity when ``method`` is ``none``."""

    method: str = "none"
    slope: float = 1.0
    intercept: float = 0.0
    n_tiles: int = 0
    n_patients: int = 0

    def apply(self, prob) -> np.ndarray:
        p = np.asarray(prob, dtype=np.float64)
        if self.method == "none":
            return p
        z = self.slope * logit(p) + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Calibration:
        """From ``config.json``'s ``resolved.calibration``; the identity for a run that recorded none."""
        if not data:
            return cls()
        return cls(method=str(data.get("method", "none")), slope=float(data.get("slope", 1.0)),
                   intercept=float(data.get("intercept", 0.0)), n_tiles=int(data.get("n_tiles", 0)),
                   n_patients=int(data.get("n_patients", 0)))


def logit(prob) -> np.ndarray:
    p = np.clip(np.asarray(prob, dtype=np.float64), PROB_CLIP, 1 - PROB_CLIP)
    return np.log(p) - np.log1p(-p)


def patient_weights(labels: np.ndarray, patients: np.ndarray) -> np.ndarray:
    """Per tile: 1 / (its patient's tiles), then each class's weights rescaled to the same total."""
    _, inverse, counts = np.unique(patients, return_inverse=True, return_counts=True)
    w = 1.0 / counts[inverse.reshape(-1)]
    for c in (0, 1):
        total = w[labels == c].sum()
        if total > 0:
            w[labels == c] *= 0.5 / total
    return w * len(w)


def fit_platt(labels, prob, patients) -> Calibration:
    """Platt scaling fitted on calibration tiles (see the module doc); the identity when it cannot be fitted."""
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(labels).reshape(-1).astype(np.int64)
    p = np.asarray(prob, dtype=np.float64).reshape(-1)
    g = np.asarray(patients).reshape(-1)
    n_patients = len(np.unique(g))
    if len(np.unique(y)) < 2 or not np.isfinite(p).all():
        return Calibration(n_tiles=len(y), n_patients=n_patients)
    fit = LogisticRegression(C=PLATT_C, max_iter=1000).fit(logit(p)[:, None], y,
                                                           sample_weight=patient_weights(y, g))
    slope, intercept = float(fit.coef_[0, 0]), float(fit.intercept_[0])
    if not (np.isfinite(slope) and np.isfinite(intercept)) or slope < MIN_SLOPE:
        return Calibration(n_tiles=len(y), n_patients=n_patients)
    return Calibration("platt", slope, intercept, len(y), n_patients)
