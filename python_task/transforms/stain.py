"""Stain normalisation of RGB H&E tiles to a reference: Macenko (2009) and Reinhard (2001), per tile, robust.

Both normalisers are fitted once on reference tiles, saved with a run as a small JSON-able dict
(:meth:`to_dict` / :func:`normalizer_from_dict`; :func:`read_normalizer` reads a run's ``stain.json`` back, naming
the file on any failure) and applied in the input pipeline by :class:`StainTransform`.
They are plain numpy (no backend), so they serve Keras on any backend.

**Robustness is the contract** (other tools crash here on background or small tiles): a tile that is background
or nearly so (fewer than ``min_tissue`` = 5 % of its pixels with optical density above ``beta`` = 0.15 in every
channel), whose stain estimate is degenerate (eigen-decomposition failing, non-finite or nearly parallel stain
vectors, vanishing concentrations) or whose result is not finite is returned **unchanged** and counted. No tile
ever raises and no NaN ever comes out. Fitting on a reference without tissue raises
:class:`~python_task.errors.TaskError`.

Speed: the stain estimate of a tile uses a strided subsample of its pixels (about 8k), and the normalisation
itself is one 3x3 linear map in optical density (Macenko: three 256-entry tables per tile, no per-pixel exp) or
in the CIELAB ``f`` space (Reinhard, with lookup tables for the sRGB and cube-root conversions). Measured on one
busy core for a 256-px tile: Macenko about 2.5-3 ms, Reinhard about 6-8 ms. Skinny matrix products run in
chunks so that a threaded BLAS does not oversubscribe the input pipeline's threads.

Optical density here is ``OD = -ln((I + 1) / 256)`` for 8-bit intensities ``I`` (white 255 -> 0), inverted
exactly by :func:`od_to_rgb`.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from python_task.errors import ConfigError, TaskError
from python_task.fileio import read_json_file

STAIN_METHODS = ("none", "macenko", "reinhard")

# Ruifrok & Johnston (2001) colour deconvolution, rows = stain OD vectors (haematoxylin, eosin, DAB), columns
# R, G, B; exactly as ``skimage.color.rgb_from_hed`` / ``hed_from_rgb``. ``hed = od @ HED_FROM_RGB``.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29],
                         [0.07, 0.99, 0.11],
                         [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)

BETA = 0.15  # OD below which a pixel is transparent (background), Macenko et al.
ALPHA = 1.0  # angle percentile for the stain vectors, Macenko et al.
MIN_TISSUE = 0.05  # a tile with a smaller fraction of tissue pixels passes through unchanged
MIN_TISSUE_PIXELS = 64  # ... and so does one with fewer tissue pixels in its estimation subsample
ESTIMATE_PIXELS = 16384  # pixels (strided subsample) used to estimate the stain of one tile
MIN_STAIN_ANGLE = math.radians(3.0)  # stain vectors closer than this are degenerate
MIN_CONCENTRATION = 0.02  # a 99th-percentile stain concentration below this is degenerate (OD units)
MIN_LAB_STD = 0.5  # Reinhard: a tile whose L*, a* or b* spread is below this is flat and passes through
MAX_FIT_PIXELS = 1_000_000  # pixels used to fit a reference (seeded subsample beyond)
REFERENCE_TILES = 16  # without a reference image, a normaliser is fitted on this many seeded training tiles
_REFERENCE_SEED_OFFSET = 17  # their draw's seed is the run's seed plus this (a stream of its own)

_OD_LUT = (-np.log((np.arange(256, dtype=np.float64) + 1.0) / 256.0)).astype(np.float32)


# --------------------------------------------------------------------------------------------- conversions

def rgb_to_od(rgb: np.ndarray) -> np.ndarray:
    """Optical density ``-ln((I + 1) / 256)`` of RGB intensities (uint8, or float in [0, 255]), float32."""
    rgb = np.asarray(rgb)
    if rgb.dtype == np.uint8:
        return _OD_LUT[rgb]
    rgb = np.clip(rgb.astype(np.float32, copy=False), 0.0, 255.0)
    return -np.log((rgb + 1.0) / 256.0)


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_od`: float32 intensities clipped to [0, 255] (not rounded)."""
    od = np.asarray(od, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        rgb = 256.0 * np.exp(-od) - 1.0
    return np.clip(np.nan_to_num(rgb, nan=255.0, posinf=255.0, neginf=0.0), 0.0, 255.0).astype(np.float32)


def _mm(a: np.ndarray, m: np.ndarray, chunk: int = 16384) -> np.ndarray:
    """``a (n, 3) @ m (3, k)`` in float32, in chunks small enough that BLAS stays on one thread: a threaded
    BLAS on such skinny products is 10x slower on a busy machine, and the input pipeline has its own threads."""
    m = np.asarray(m, dtype=np.float32)
    out = np.empty((a.shape[0], m.shape[1]), dtype=np.float32)
    for i in range(0, a.shape[0], chunk):
        np.matmul(a[i:i + chunk], m, out=out[i:i + chunk])
    return out


# sRGB <-> CIELAB (D65), own numpy implementation (no scikit-image)
_SRGB_LIN_LUT = np.where(np.arange(256) / 255.0 <= 0.04045, np.arange(256) / 255.0 / 12.92,
                         ((np.arange(256) / 255.0 + 0.055) / 1.055) ** 2.4).astype(np.float32)
_LIN_STEPS = 65535
_LIN_SRGB_LUT = np.clip(np.round(255.0 * np.where(
    np.linspace(0.0, 1.0, _LIN_STEPS + 1) <= 0.0031308, 12.92 * np.linspace(0.0, 1.0, _LIN_STEPS + 1),
    1.055 * np.linspace(0.0, 1.0, _LIN_STEPS + 1) ** (1 / 2.4) - 0.055)), 0, 255).astype(np.uint8)
_XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                          [0.212671, 0.715160, 0.072169],
                          [0.019334, 0.119193, 0.950227]])
_WHITE = np.array([0.95047, 1.0, 1.08883])
_T_FROM_LIN = (_XYZ_FROM_RGB / _WHITE[:, None]).T  # row vectors: t = lin @ _T_FROM_LIN
_LIN_FROM_T = np.linalg.inv(_T_FROM_LIN)
_DELTA = 6.0 / 29.0
# (L, a, b) = f @ _LAB_FROM_F + _LAB_OFFSET with f = (f(tx), f(ty), f(tz))
_LAB_FROM_F = np.array([[0.0, 500.0, 0.0], [116.0, -500.0, 200.0], [0.0, 0.0, -200.0]])
_LAB_OFFSET = np.array([-16.0, 0.0, 0.0])
_F_FROM_LAB = np.linalg.inv(_LAB_FROM_F)


def _f(t: np.ndarray) -> np.ndarray:
    return np.where(t > _DELTA ** 3, np.cbrt(np.maximum(t, _DELTA ** 3)), t / (3 * _DELTA ** 2) + 4.0 / 29.0)


_F_STEPS = 65536
_F_LUT = _f(np.linspace(0.0, 1.0, _F_STEPS + 1)).astype(np.float32)  # f on [0, 1]; t of sRGB colours is in [0, 1]


def _f_fast(t: np.ndarray) -> np.ndarray:
    """:func:`_f` by lookup (error below 1e-4 in f, 0.01 in L*): np.cbrt is slow."""
    idx = np.clip(t, 0.0, 1.0)
    idx *= _F_STEPS
    idx += 0.5
    return _F_LUT[idx.astype(np.int32)]


def _f_inv(f: np.ndarray) -> np.ndarray:
    return np.where(f > _DELTA, f * f * f, 3 * _DELTA ** 2 * (f - 4.0 / 29.0))


def _lin_to_uint8(lin: np.ndarray) -> np.ndarray:
    idx = np.clip(lin, 0.0, 1.0)
    idx *= _LIN_STEPS
    idx += 0.5
    return _LIN_SRGB_LUT[idx.astype(np.int32)]


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB intensities (uint8, or float in [0, 255]), float32, same shape."""
    rgb = np.asarray(rgb)
    if rgb.dtype == np.uint8:
        lin = _SRGB_LIN_LUT[rgb]
    else:
        c = np.clip(rgb.astype(np.float32), 0, 255) / 255.0
        lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    f = _f(lin @ _T_FROM_LIN.astype(np.float32))
    return (f @ _LAB_FROM_F.astype(np.float32) + _LAB_OFFSET.astype(np.float32)).astype(np.float32)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """sRGB uint8 of CIELAB values (out-of-gamut colours clipped)."""
    lab = np.asarray(lab, dtype=np.float32)
    f = (lab - _LAB_OFFSET.astype(np.float32)) @ _F_FROM_LAB.astype(np.float32)
    return _lin_to_uint8(_f_inv(f) @ _LIN_FROM_T.astype(np.float32))


# --------------------------------------------------------------------------------------------- helpers

def _as_tiles(tiles: np.ndarray, what: str | None = None) -> tuple[np.ndarray, bool]:
    """``(N, H, W, 3)`` uint8 and whether a single ``(H, W, 3)`` tile was given (floats are rounded)."""
    a = np.asarray(tiles)
    single = a.ndim == 3
    if single:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3 or a.shape[1] == 0 or a.shape[2] == 0:
        msg = f"expected RGB tiles of shape (N, H, W, 3) or (H, W, 3), got {tuple(np.shape(tiles))}"
        if what is not None:
            raise TaskError(what, msg)
        raise ValueError(msg)
    if a.dtype != np.uint8:
        a = np.clip(np.rint(np.nan_to_num(a.astype(np.float32), nan=255.0)), 0, 255).astype(np.uint8)
    return a, single


def _stride(h: int, w: int) -> int:
    return max(1, int(math.ceil(math.sqrt(h * w / ESTIMATE_PIXELS))))


def _tissue(od: np.ndarray, beta: float) -> np.ndarray:
    """Pixels (rows of ``od``) that are not transparent: mean OD over the channels at least ``beta``.

    Macenko's own rule (OD >= beta in *every* channel) drops most eosin pixels, whose red OD is low (a pink
    stroma pixel of RGB 230, 150, 190 has OD 0.10, 0.53, 0.30): on stroma-rich tiles the eosin vector then comes
    out wrong. The mean keeps pale eosin and still drops near-white pixels, whose direction is mostly noise.
    """
    return (od[..., 0] + od[..., 1] + od[..., 2]) >= 3.0 * beta


def _subsample(tile: np.ndarray) -> np.ndarray:
    """A strided subsample of about ``ESTIMATE_PIXELS`` pixels of one tile, ``(n, 3)`` uint8."""
    s = _stride(tile.shape[0], tile.shape[1])
    return tile[::s, ::s].reshape(-1, 3)


def _percentiles(x: np.ndarray, q: list[float]) -> np.ndarray:
    """Nearest-rank percentiles along axis 0 (np.percentile is slow on small arrays)."""
    n = x.shape[0]
    ks = [min(n - 1, max(0, int(round(qi / 100.0 * (n - 1))))) for qi in q]
    return np.partition(x, ks, axis=0)[ks]


def _macenko_vectors(od: np.ndarray, alpha: float) -> np.ndarray | None:
    """Unit stain vectors ``(2, 3)`` (haematoxylin first) of tissue OD pixels ``(n, 3)``, or None if degenerate."""
    if od.shape[0] < 3:
        return None
    with np.errstate(all="ignore"):
        n = od.shape[0]
        od64 = od.astype(np.float64)
        mean = np.ones(n) @ od64 / n
        cov = (od64.T @ od64 - n * np.outer(mean, mean)) / (n - 1)
        if not np.all(np.isfinite(cov)):
            return None
        try:
            _, vecs = np.linalg.eigh(cov)
        except (np.linalg.LinAlgError, ValueError):
            return None
        if not np.all(np.isfinite(vecs)):
            return None
        e1, e2 = vecs[:, 2], vecs[:, 1]
        if e1.sum() < 0:
            e1 = -e1
        if e2.sum() < 0:
            e2 = -e2
        proj = od @ np.stack([e1, e2], axis=1).astype(od.dtype)
        phi = np.arctan2(proj[:, 1], proj[:, 0])
        lo, hi = (float(v) for v in _percentiles(phi, [alpha, 100.0 - alpha]))
        v1 = e1 * math.cos(lo) + e2 * math.sin(lo)
        v2 = e1 * math.cos(hi) + e2 * math.sin(hi)
        he = np.stack([v1, v2] if v1[0] > v2[0] else [v2, v1])  # haematoxylin absorbs more red
        he = np.where(he.sum(axis=1, keepdims=True) < 0, -he, he)
        he = np.maximum(he, 0.0)  # physical stains absorb, never emit: clip small negative noise
        norms = np.linalg.norm(he, axis=1, keepdims=True)
        if not np.all(np.isfinite(he)) or np.any(norms < 1e-6):
            return None
        he = he / norms
        if math.acos(float(np.clip(he[0] @ he[1], -1.0, 1.0))) < MIN_STAIN_ANGLE:
            return None
    return he


def _concentrations(od: np.ndarray, he: np.ndarray) -> np.ndarray:
    return od @ np.linalg.pinv(he).astype(od.dtype)


def _max_concentrations(od: np.ndarray, he: np.ndarray) -> np.ndarray | None:
    """99th-percentile concentrations ``(2,)`` of tissue OD pixels for stain vectors ``he``, or None."""
    with np.errstate(all="ignore"):
        max_c = _percentiles(_concentrations(od, he), [99.0])[0].astype(np.float64)
    if not np.all(np.isfinite(max_c)) or np.any(max_c < MIN_CONCENTRATION):
        return None
    return max_c


# --------------------------------------------------------------------------------------------- Macenko

class MacenkoNormalizer:
    """Macenko et al. 2009: stain vectors from the angular extremes of tissue OD in the plane of its two main
    eigenvectors; concentrations by least squares, scaled so that their 99th percentile matches the reference.
    """

    method = "macenko"

    def __init__(self, *, beta: float = BETA, alpha: float = ALPHA, min_tissue: float = MIN_TISSUE) -> None:
        self.beta = float(beta)
        self.alpha = float(alpha)
        self.min_tissue = float(min_tissue)
        self.stain_matrix: np.ndarray | None = None  # (2, 3) unit OD vectors, haematoxylin then eosin
        self.max_concentrations: np.ndarray | None = None  # (2,) 99th percentiles

    # -- fitting
    def fit(self, tiles: np.ndarray) -> MacenkoNormalizer:
        od = _reference_tissue_od(tiles, self.beta, self.min_tissue)
        he = _macenko_vectors(od, self.alpha)
        if he is None:
            raise TaskError("stain reference", "the stain vectors of the reference tiles cannot be estimated "
                            "(a single stain, or too little colour variation); choose another reference")
        max_c = _max_concentrations(od, he)
        if max_c is None:
            raise TaskError("stain reference", "the reference tiles hold almost no haematoxylin or eosin; "
                            "choose another reference")
        self.stain_matrix = he.astype(np.float64)
        self.max_concentrations = max_c.astype(np.float64)
        return self

    def _check_fitted(self) -> None:
        if self.stain_matrix is None or self.max_concentrations is None:
            raise RuntimeError("MacenkoNormalizer: call fit() (or from_dict()) before transform()")

    # -- per tile
    def estimate(self, tile: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Stain vectors ``(2, 3)`` and 99th-percentile concentrations ``(2,)`` of one uint8 tile, or None."""
        od = np.take(_OD_LUT, _subsample(tile))
        mask = _tissue(od, self.beta)
        n = int(np.count_nonzero(mask))
        if n < MIN_TISSUE_PIXELS or n < self.min_tissue * len(mask):
            return None
        od = od[mask]
        he = _macenko_vectors(od, self.alpha)
        if he is None:
            return None
        max_c = _max_concentrations(od, he)
        return None if max_c is None else (he, max_c)

    def tile_matrix(self, tile: np.ndarray) -> np.ndarray | None:
        """The 3x3 OD map ``od_out = od @ M`` normalising one tile, or None when the tile passes through."""
        self._check_fitted()
        est = self.estimate(tile)
        if est is None:
            return None
        he, max_c = est
        m = np.linalg.pinv(he) @ ((self.max_concentrations / max_c)[:, None] * self.stain_matrix)
        return m.astype(np.float32) if np.all(np.isfinite(m)) else None

    def transform_tile(self, tile: np.ndarray) -> tuple[np.ndarray, bool]:
        """One uint8 ``(H, W, 3)`` tile -> (normalised tile, passed through unchanged?)."""
        m = self.tile_matrix(tile)
        if m is None:
            return tile, True
        # out_d = 256 exp(-sum_c od_c m_cd) - 1 = 256 prod_c E_c[I_c, d] - 1 with E_c = exp(-OD m_c): three
        # 256-entry tables looked up per pixel instead of a matmul and an exp over the whole tile
        expo = np.clip(-_OD_LUT.astype(np.float64)[None, :, None] * m.astype(np.float64)[:, None, :], -80, 80)
        table = np.exp(expo).astype(np.float32)  # (channel in, 256, channel out), finite and > 0
        p = np.take(table[0], tile[..., 0], axis=0)
        p *= np.take(table[1], tile[..., 1], axis=0)
        p *= np.take(table[2], tile[..., 2], axis=0)  # may overflow to inf only where the result is > 255
        p *= 256.0
        p -= 0.5  # -1, then +0.5 so that the truncating cast rounds
        np.clip(p, 0.0, 255.0, out=p)
        return p.astype(np.uint8), False

    def transform(self, tiles: np.ndarray) -> tuple[np.ndarray, int]:
        """Normalise tiles ``(N, H, W, 3)`` or one ``(H, W, 3)``: uint8 out, same shape, and how many tiles
        passed through unchanged (background, too little tissue, degenerate estimate)."""
        self._check_fitted()
        return _transform_all(self, tiles)

    # -- persistence
    def to_dict(self) -> dict[str, Any]:
        self._check_fitted()
        return {"method": self.method, "beta": self.beta, "alpha": self.alpha, "min_tissue": self.min_tissue,
                "stain_matrix": self.stain_matrix.tolist(), "max_concentrations": self.max_concentrations.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MacenkoNormalizer:
        norm = cls(beta=_num(d, "beta", BETA), alpha=_num(d, "alpha", ALPHA),
                   min_tissue=_num(d, "min_tissue", MIN_TISSUE))
        norm.stain_matrix = _array(d, "stain_matrix", (2, 3))
        norm.max_concentrations = _array(d, "max_concentrations", (2,))
        return norm

    def __repr__(self) -> str:
        fitted = "unfitted" if self.stain_matrix is None else "fitted"
        return f"MacenkoNormalizer({fitted}, beta={self.beta}, alpha={self.alpha})"


# --------------------------------------------------------------------------------------------- Reinhard

class ReinhardNormalizer:
    """Reinhard et al. 2001 in CIELAB: per-channel mean and standard deviation of the tissue pixels are matched
    to the reference. Near-white pixels are blended back to their original value (weight ``max OD / beta``),
    so the glass stays white instead of taking the tint of the shift.
    """

    method = "reinhard"
    MAX_RATIO = 5.0  # std ratios are clipped to [1/5, 5]: a flat tile is not blown up

    def __init__(self, *, beta: float = BETA, min_tissue: float = MIN_TISSUE) -> None:
        self.beta = float(beta)
        self.min_tissue = float(min_tissue)
        self.mean: np.ndarray | None = None  # (3,) L, a, b
        self.std: np.ndarray | None = None  # (3,)

    def fit(self, tiles: np.ndarray) -> ReinhardNormalizer:
        a, _ = _as_tiles(tiles, "stain reference")
        pixels = a.reshape(-1, 3)
        if len(pixels) > MAX_FIT_PIXELS:
            pixels = pixels[np.random.default_rng(0).choice(len(pixels), MAX_FIT_PIXELS, replace=False)]
        mask = _tissue(_OD_LUT[pixels], self.beta)
        _require_tissue(int(mask.sum()), len(mask), self.beta, self.min_tissue)
        lab = rgb_to_lab(pixels[mask]).astype(np.float64)
        mean, std = lab.mean(axis=0), lab.std(axis=0)
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))) or np.any(std < MIN_LAB_STD):
            raise TaskError("stain reference", "the reference tiles have no colour variation; choose another "
                            "reference")
        self.mean, self.std = mean, std
        return self

    def _check_fitted(self) -> None:
        if self.mean is None or self.std is None:
            raise RuntimeError("ReinhardNormalizer: call fit() (or from_dict()) before transform()")

    def tile_map(self, tile: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The affine map ``f_out = f @ A + c`` in CIELAB ``f`` space for one tile, or None (pass through)."""
        self._check_fitted()
        sub = _subsample(tile)
        mask = _tissue(np.take(_OD_LUT, sub), self.beta)
        n = int(np.count_nonzero(mask))
        if n < MIN_TISSUE_PIXELS or n < self.min_tissue * len(mask):
            return None
        f = _f_fast(_mm(np.take(_SRGB_LIN_LUT, sub[mask]), _T_FROM_LIN))
        lab = np.ascontiguousarray((f.astype(np.float64) @ _LAB_FROM_F + _LAB_OFFSET).T)  # (3, n): fast rows
        mean, std = lab.mean(axis=1), lab.std(axis=1)
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))) or np.any(std < MIN_LAB_STD):
            return None  # a flat tile (one colour) has no statistics to match
        ratio = np.clip(self.std / np.maximum(std, 1e-6), 1.0 / self.MAX_RATIO, self.MAX_RATIO)
        # lab = f @ L + o ; lab' = (lab - mean) * r + mean_ref ; f' = (lab' - o) @ L^-1
        a = _LAB_FROM_F @ np.diag(ratio) @ _F_FROM_LAB
        c = ((_LAB_OFFSET - mean) * ratio + self.mean - _LAB_OFFSET) @ _F_FROM_LAB
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(c))):
            return None
        return a.astype(np.float32), c.astype(np.float32)

    def transform_tile(self, tile: np.ndarray) -> tuple[np.ndarray, bool]:
        mapping = self.tile_map(tile)
        if mapping is None:
            return tile, True
        a, c = mapping
        flat = tile.reshape(-1, 3)
        f = _mm(_f_fast(_mm(np.take(_SRGB_LIN_LUT, flat), _T_FROM_LIN)), a)
        f += c
        lin = _mm(_f_inv(f), _LIN_FROM_T)
        if not np.isfinite(lin).all():
            return tile, True
        out = _lin_to_uint8(lin).astype(np.float32)
        # blend back near-white pixels: weight 0 for pure white, 1 from OD >= beta in the darkest channel
        w = np.take(self._blend_lut, np.minimum(np.minimum(flat[:, 0], flat[:, 1]), flat[:, 2]))[:, None]
        out -= flat
        out *= w
        out += flat
        out += 0.5
        return out.astype(np.uint8).reshape(tile.shape), False

    @property
    def _blend_lut(self) -> np.ndarray:
        return np.minimum(_OD_LUT / max(self.beta, 1e-6), 1.0).astype(np.float32)

    def transform(self, tiles: np.ndarray) -> tuple[np.ndarray, int]:
        """Normalise tiles ``(N, H, W, 3)`` or one ``(H, W, 3)``: uint8 out, same shape, and how many tiles
        passed through unchanged."""
        self._check_fitted()
        return _transform_all(self, tiles)

    def to_dict(self) -> dict[str, Any]:
        self._check_fitted()
        return {"method": self.method, "beta": self.beta, "min_tissue": self.min_tissue,
                "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReinhardNormalizer:
        norm = cls(beta=_num(d, "beta", BETA), min_tissue=_num(d, "min_tissue", MIN_TISSUE))
        norm.mean = _array(d, "mean", (3,))
        norm.std = _array(d, "std", (3,))
        return norm

    def __repr__(self) -> str:
        fitted = "unfitted" if self.mean is None else "fitted"
        return f"ReinhardNormalizer({fitted}, beta={self.beta})"


Normalizer = MacenkoNormalizer | ReinhardNormalizer


def _transform_all(norm: Normalizer, tiles: np.ndarray) -> tuple[np.ndarray, int]:
    a, single = _as_tiles(tiles)
    out = np.empty_like(a)
    passed = 0
    for i, tile in enumerate(a):
        try:
            res, through = norm.transform_tile(tile)
        except (np.linalg.LinAlgError, ValueError, FloatingPointError, ZeroDivisionError):
            res, through = tile, True
        out[i] = res
        passed += through
    return (out[0] if single else out), passed


def _reference_tissue_od(tiles: np.ndarray, beta: float, min_tissue: float) -> np.ndarray:
    a, _ = _as_tiles(tiles, "stain reference")
    pixels = a.reshape(-1, 3)
    if len(pixels) > MAX_FIT_PIXELS:
        pixels = pixels[np.random.default_rng(0).choice(len(pixels), MAX_FIT_PIXELS, replace=False)]
    od = _OD_LUT[pixels]
    mask = _tissue(od, beta)
    _require_tissue(int(mask.sum()), len(mask), beta, min_tissue)
    return od[mask]


def _require_tissue(n: int, total: int, beta: float, min_tissue: float) -> None:
    needed = max(MIN_TISSUE_PIXELS, min(int(math.ceil(min_tissue * total)), 10_000))
    if n < needed:
        raise TaskError("stain reference", f"no tissue in the reference tiles: {n} of {total} pixels "
                        f"({100.0 * n / max(total, 1):.1f}%) have an optical density of at least {beta} in every "
                        f"channel, {needed} needed; give tiles that show stained tissue")


def _num(d: dict[str, Any], key: str, default: float) -> float:
    try:
        value = float(d.get(key, default))
    except (TypeError, ValueError):
        raise TaskError("stain", f"saved stain normaliser: {key!r} is not a number ({d.get(key)!r})") from None
    if not math.isfinite(value):
        raise TaskError("stain", f"saved stain normaliser: {key!r} is not finite")
    return value


def _array(d: dict[str, Any], key: str, shape: tuple[int, ...]) -> np.ndarray:
    try:
        a = np.asarray(d[key], dtype=np.float64)
    except KeyError:
        raise TaskError("stain", f"saved stain normaliser: {key!r} missing") from None
    except (TypeError, ValueError):
        raise TaskError("stain", f"saved stain normaliser: {key!r} is not numeric") from None
    if a.shape != shape or not np.all(np.isfinite(a)):
        raise TaskError("stain", f"saved stain normaliser: {key!r} must be {shape} finite numbers, got {a.shape}")
    return a


# --------------------------------------------------------------------------------------------- factory

def reference_positions(n_tiles: int, seed: int, n: int = REFERENCE_TILES) -> np.ndarray:
    """Sorted positions of the ``n`` seeded tiles (of ``n_tiles``) a normaliser is fitted on without a reference
    image: the same draw for training and for its preview."""
    rng = np.random.default_rng(seed + _REFERENCE_SEED_OFFSET)
    return np.sort(rng.choice(n_tiles, min(n, n_tiles), replace=False))


def make_normalizer(method: str) -> Normalizer | None:
    """A new (unfitted) normaliser by name; ``'none'`` -> None."""
    name = str(method).strip().lower()
    if name == "none":
        return None
    if name == "macenko":
        return MacenkoNormalizer()
    if name == "reinhard":
        return ReinhardNormalizer()
    raise ConfigError("stain", f"unknown stain method {method!r}; choose from: {', '.join(STAIN_METHODS)}")


def normalizer_from_dict(d: dict[str, Any]) -> Normalizer | None:
    """The normaliser saved by ``to_dict`` (``method`` picks the class; ``'none'`` -> None)."""
    if not isinstance(d, dict):
        raise TaskError("stain", f"saved stain normaliser must be a JSON object, got {type(d).__name__}")
    method = str(d.get("method", "")).strip().lower()
    if method == "none":
        return None
    if method == "macenko":
        return MacenkoNormalizer.from_dict(d)
    if method == "reinhard":
        return ReinhardNormalizer.from_dict(d)
    raise TaskError("stain", f"saved stain normaliser: unknown method {d.get('method')!r}; "
                    f"choose from: {', '.join(STAIN_METHODS)}")


def read_normalizer(path: str | os.PathLike[str]) -> Normalizer | None:
    """The normaliser saved with a run (``stain.json``, read back by a resumed train and by predict).

    Every failure is a :class:`TaskError` naming the file: missing or unreadable, not JSON (a copy cut short), or
    JSON that does not describe a normaliser (:func:`normalizer_from_dict`'s causes).
    """
    path = Path(path)
    saved = read_json_file(path, missing="missing: the run's saved stain normaliser (train writes it beside the "
                           "model; copy the whole run folder)",
                           damaged="the saved stain normaliser is damaged or cut short; copy the run folder again")
    try:
        return normalizer_from_dict(saved)
    except TaskError as exc:
        raise TaskError(path, exc.cause) from None


class StainTransform:
    """The ``transform`` of :class:`python_task.data.dataset.ShardBatches`: ``(batch, rng) -> float32 batch``.

    Counts tiles seen and tiles passed through unchanged (``seen``, ``passthrough``), safely across the pipeline
    threads; ``fraction`` is their ratio.
    """

    def __init__(self, normalizer: Normalizer) -> None:
        self.normalizer = normalizer
        self.seen = 0
        self.passthrough = 0
        self._lock = threading.Lock()

    def __call__(self, batch: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        out, passed = self.normalizer.transform(batch)
        n = 1 if np.ndim(batch) == 3 else len(out)
        with self._lock:
            self.seen += n
            self.passthrough += passed
        return out.astype(np.float32)

    @property
    def fraction(self) -> float:
        with self._lock:
            return self.passthrough / self.seen if self.seen else 0.0

    def reset(self) -> None:
        with self._lock:
            self.seen = self.passthrough = 0

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


# --------------------------------------------------------------------------------------------- measures

def stain_signature(tiles: np.ndarray, beta: float = BETA) -> np.ndarray:
    """Mean and 90th percentile of the Ruifrok HED concentrations of the tissue pixels (OD >= beta in some
    channel) of ``tiles``: 6 numbers in OD units, all zero if there is no tissue."""
    a, _ = _as_tiles(tiles)
    pixels = a.reshape(-1, 3)
    if len(pixels) > MAX_FIT_PIXELS:
        pixels = pixels[np.random.default_rng(0).choice(len(pixels), MAX_FIT_PIXELS, replace=False)]
    od = _OD_LUT[pixels]
    od = od[od.max(axis=1) >= beta]
    if len(od) == 0:
        return np.zeros(6)
    hed = od.astype(np.float64) @ HED_FROM_RGB
    return np.concatenate([hed.mean(axis=0), np.percentile(hed, 90, axis=0)])


def od_distance(a_tiles: np.ndarray, b_tiles: np.ndarray) -> float:
    """How far apart the stains of two tile sets are: Euclidean distance between their :func:`stain_signature`
    (mean and 90th percentile of the haematoxylin, eosin and DAB optical densities of tissue pixels)."""
    return float(np.linalg.norm(stain_signature(a_tiles) - stain_signature(b_tiles)))


def stain_vectors(tiles: np.ndarray, beta: float = BETA, alpha: float = ALPHA) -> np.ndarray | None:
    """Macenko stain vectors ``(2, 3)`` of the pooled tissue pixels of ``tiles`` (None when degenerate)."""
    a, _ = _as_tiles(tiles)
    od = _OD_LUT[a.reshape(-1, 3)]
    od = od[_tissue(od, beta)]
    if len(od) < MIN_TISSUE_PIXELS:
        return None
    return _macenko_vectors(od, alpha)


def stain_angle(a_tiles: np.ndarray, b_tiles: np.ndarray) -> float:
    """Largest angle in degrees between the Macenko haematoxylin / eosin vectors of two tile sets (nan when
    either estimate is degenerate)."""
    va, vb = stain_vectors(a_tiles), stain_vectors(b_tiles)
    if va is None or vb is None:
        return float("nan")
    cos = np.clip(np.sum(va * vb, axis=1), -1.0, 1.0)
    return float(np.degrees(np.arccos(cos)).max())
