"""Calibration of tile probabilities: Platt scaling fitted on patients the model was not fitted on.

A network's tile probabilities are not probabilities on new patients: trained to near-zero loss, its scores
crowd towards 0 and 1, and by how much differs from one patient to the next. :func:`fit_platt` maps a score
``p`` to ``sigmoid(slope * logit(p) + intercept)``, a logistic regression of the labels on ``logit(p)``
fitted on calibration tiles: predictions for patients the model did not fit on (``train``'s tuning patients, and
the out-of-fold predictions of its inner cross-fitting). Each patient weighs the same whatever its number of tiles,
and each diagnosis half, so a patient with many tiles cannot set the scale alone and 0.5 is where a tile is as
likely one class as the other.

The fit is a maximum a posteriori one, with a normal prior centred on the identity (slope 1 ± 0.5, intercept
0 ± 1), and the tiles count as at most ``TILES_PER_PATIENT`` independent observations per patient: the tiles of
one patient are not independent evidence of how the model errs on the next. Fitted by maximum likelihood on the
1 + 1 tuning patients of a small fold, whose tiles a network separates perfectly, the map ran off (slope 1.41,
intercept -14.5: a raw 0.9999 became 0.17, and the demo called its carcinoma slide benign); with the prior the
intercept stays within 2.9 on every development point (20.5 without it), at the same calls. The slope is kept
positive (a calibration never reverses the model's ranking): when the scores do not rank the classes, or the
calibration tiles hold one class only, the identity is kept and ``method`` says ``none``. The map is monotone,
so every AUC is unchanged by it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

CALIBRATIONS = ("platt", "none")  # train's calibration setting
PROB_CLIP = 1e-6  # probabilities are clipped to [PROB_CLIP, 1 - PROB_CLIP] before the logit
MIN_SLOPE = 1e-3  # a fitted slope at or below this is no calibration (the scores carry no ranking)
PRIOR_SLOPE_SD = 0.5  # the prior on the slope: normal around 1 (the identity) with this spread
PRIOR_INTERCEPT_SD = 1.0  # the prior on the intercept: normal around 0 with this spread
TILES_PER_PATIENT = 50  # the evidence one patient's tiles carry, counted in independent tiles


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
    from scipy.optimize import minimize

    y = np.asarray(labels).reshape(-1).astype(np.float64)
    p = np.asarray(prob, dtype=np.float64).reshape(-1)
    g = np.asarray(patients).reshape(-1)
    n_patients = len(np.unique(g))
    identity = Calibration(n_tiles=len(y), n_patients=n_patients)
    if len(np.unique(y)) < 2 or not np.isfinite(p).all():
        return identity
    x = logit(p)
    w = patient_weights(y.astype(np.int64), g)
    if np.sum(w * (x - np.average(x, weights=w)) * y) <= 0:  # the scores do not rank the classes
        return identity
    w *= min(len(y), TILES_PER_PATIENT * n_patients) / w.sum()

    def neg_log_posterior(theta: np.ndarray) -> tuple[float, np.ndarray]:
        slope, intercept = theta
        z = slope * x + intercept
        residual = w * (1.0 / (1.0 + np.exp(-z)) - y)
        value = np.sum(w * (np.logaddexp(0.0, z) - y * z)) + (slope - 1.0) ** 2 / (2 * PRIOR_SLOPE_SD ** 2) \
            + intercept ** 2 / (2 * PRIOR_INTERCEPT_SD ** 2)
        grad = np.array([np.sum(residual * x) + (slope - 1.0) / PRIOR_SLOPE_SD ** 2,
                         np.sum(residual) + intercept / PRIOR_INTERCEPT_SD ** 2])
        return float(value), grad

    fit = minimize(neg_log_posterior, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B",
                   bounds=[(MIN_SLOPE, None), (None, None)])
    slope, intercept = (float(v) for v in fit.x)
    if not (np.isfinite(slope) and np.isfinite(intercept)) or slope <= MIN_SLOPE:
        return identity
    return Calibration("platt", slope, intercept, len(y), n_patients)
