"""Tissue mask at low resolution: Otsu on HSV saturation, plus O(1) tissue fractions of level-0 boxes.

Stained tissue is saturated, glass and background are grey-white, so saturation separates them better than
brightness does. The Otsu threshold is clamped to at least ``min_saturation``, so a blank slide (whose
saturation is only noise) gives an empty mask instead of half its noise. Near-black pixels (pen, dust, folds
read as black) are never tissue.

Fractions use a summed-area table read by bilinear interpolation: the mask is piecewise constant per pixel, so its
integral over [0, x] x [0, y] is bilinear inside each pixel and the interpolation is exact, also for boxes whose
edges cut through mask pixels. Everything outside the mask counts as non-tissue.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from python_task.errors import ConfigError
from python_task.wsi.slides import Slide, read_downsampled

log = logging.getLogger(__name__)

METHODS = ("otsu", "fixed")
TISSUE_MPP = 8.0        # µm per mask pixel: the resolution tissue is detected at (extract's and predict's default)
MIN_SATURATION = 0.05   # the Otsu threshold on saturation is never below this (a blank slide stays empty)
MIN_VALUE = 0.15        # HSV value below this is near-black: pen, dust, not tissue
MAX_HOLE_PX = 64        # holes in the mask smaller than this (mask px) are filled


@dataclass(eq=False)
class TissueMask:
    """A boolean tissue mask; mask pixel (i, j) covers level-0 [j*ds, (j+1)*ds) x [i*ds, (i+1)*ds)."""

    mask: np.ndarray          # bool (h, w)
    downsample: float         # level-0 px per mask px
    threshold: float          # saturation threshold used
    _sat: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def tissue_fraction(self) -> float:
        """Fraction of mask pixels that are tissue (0 for an empty mask)."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def _table(self) -> np.ndarray:
        """Summed-area table with a zero first row and column: S[i, j] = mask[:i, :j].sum()."""
        if self._sat is None:
            h, w = self.mask.shape
            sat = np.zeros((h + 1, w + 1), dtype=np.float64)
            if h and w:
                sat[1:, 1:] = self.mask.astype(np.int64).cumsum(0).cumsum(1)
            self._sat = sat
        return self._sat

    def _integral(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Tissue area (mask px) in [0, x] x [0, y] for mask coordinates x, y (exact bilinear read of the SAT)."""
        sat = self._table()
        h, w = self.mask.shape
        if h == 0 or w == 0:
            return np.zeros(np.broadcast(x, y).shape)
        x = np.clip(x, 0.0, w)
        y = np.clip(y, 0.0, h)
        i = np.minimum(np.floor(x).astype(np.intp), w - 1)
        j = np.minimum(np.floor(y).astype(np.intp), h - 1)
        fx, fy = x - i, y - j
        top = sat[j, i] * (1 - fx) + sat[j, i + 1] * fx
        bottom = sat[j + 1, i] * (1 - fx) + sat[j + 1, i + 1] * fx
        return top * (1 - fy) + bottom * fy

    def _box_fractions(self, x0: np.ndarray, y0: np.ndarray, w0: np.ndarray, h0: np.ndarray) -> np.ndarray:
        ds = self.downsample
        a, b = x0 / ds, (x0 + w0) / ds
        c, d = y0 / ds, (y0 + h0) / ds
        area = (b - a) * (d - c)
        inside = self._integral(b, d) - self._integral(a, d) - self._integral(b, c) + self._integral(a, c)
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(area > 0, inside / np.where(area > 0, area, 1.0), 0.0)
        return np.clip(frac, 0.0, 1.0)

    def fraction(self, x0: float, y0: float, width0: float, height0: float) -> float:
        """Tissue fraction of the level-0 box [x0, x0+width0) x [y0, y0+height0); outside the mask is not tissue."""
        arr = self._box_fractions(np.array([x0], float), np.array([y0], float),
                                  np.array([width0], float), np.array([height0], float))
        return float(arr[0])

    def fractions(self, xs: np.ndarray, ys: np.ndarray, size0: float) -> np.ndarray:
        """Tissue fractions of many square level-0 boxes [x, x+size0) x [y, y+size0), as float64."""
        xs = np.asarray(xs, dtype=np.float64)
        ys = np.asarray(ys, dtype=np.float64)
        size = np.full(np.broadcast(xs, ys).shape, float(size0))
        return self._box_fractions(xs, ys, size, size)


def _saturation(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """HSV saturation (float32) from the per-pixel max and min channel (uint8), 0 where the pixel is black."""
    sat = np.subtract(hi, lo, dtype=np.float32)
    np.divide(sat, hi, out=sat, where=hi > 0)
    return sat


def saturation_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation and value in [0, 1] (float32) of an RGB uint8 image."""
    rgb = np.asarray(rgb)
    hi = rgb.max(axis=-1)
    return _saturation(hi, rgb.min(axis=-1)), hi.astype(np.float32) / 255.0


def otsu_threshold(values: np.ndarray, bins: int = 256, value_range: tuple[float, float] = (0.0, 1.0)) -> float:
    """Otsu's threshold of ``values``: the bin edge maximising between-class variance (numpy only)."""
    values = np.asarray(values).ravel()
    if values.size == 0:
        return value_range[1]
    hist, edges = np.histogram(values, bins=bins, range=value_range)
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)                      # weight of class "<= bin k"
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mean0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mean1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mean0 - mean1) ** 2
    first = int(np.argmax(between))
    # Empty bins between the two modes give a plateau of equal scores: take its middle, not its left end.
    last = first
    while last + 1 < bins and between[last + 1] >= between[first]:
        last += 1
    return float(edges[(first + last) // 2 + 1])


def _clean(mask: np.ndarray, max_hole: int) -> np.ndarray:
    """Remove specks (opening), bridge one-pixel gaps (closing), fill holes smaller than ``max_hole`` px."""
    if mask.size == 0 or not mask.any():
        return mask
    from scipy import ndimage  # on first use: reading this module's settings (the command line does) stays cheap

    structure = np.ones((3, 3), dtype=bool)
    mask = ndimage.binary_opening(mask, structure=structure)
    # Pad before closing so the erosion step does not eat tissue touching the image border.
    padded = ndimage.binary_closing(np.pad(mask, 1), structure=structure)
    mask = padded[1:-1, 1:-1] | mask
    holes = ndimage.binary_fill_holes(mask) & ~mask
    if holes.any():
        labels, count = ndimage.label(holes)
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        small = sizes < max_hole
        small[0] = False
        mask = mask | small[labels]
    return mask


def tissue_mask_from_rgb(rgb: np.ndarray, min_saturation: float = MIN_SATURATION, *, method: str = "otsu",
                         max_hole: int = MAX_HOLE_PX) -> tuple[np.ndarray, float]:
    """(mask, threshold) of an RGB uint8 image: saturated, not near-black pixels, lightly cleaned up.

    ``method='otsu'`` thresholds saturation at Otsu's level (never below ``min_saturation``); ``'fixed'`` uses
    ``min_saturation`` itself. Pure-white pixels (padding outside the slide) take no part in the Otsu histogram.
    """
    if method not in METHODS:
        raise ConfigError("tissue_method", f"unknown tissue method {method!r}; choose one of {', '.join(METHODS)}")
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"expected an RGB image (h, w, 3), got shape {rgb.shape}")
    rgb = rgb[..., :3]
    # uint8 max/min and one float32 plane: ~6 bytes a pixel, so a 2500 x 2500 thumbnail stays small.
    hi = rgb.max(axis=-1)
    lo = rgb.min(axis=-1)
    sat = _saturation(hi, lo)
    dark = hi < MIN_VALUE * 255
    if method == "otsu":
        white = lo == 255
        threshold = max(otsu_threshold(sat[~dark & ~white]), float(min_saturation))
    else:
        threshold = float(min_saturation)
    mask = (sat > threshold) & ~dark
    return _clean(mask, max_hole), threshold


def detect_tissue(slide: Slide, *, target_mpp: float = TISSUE_MPP, min_saturation: float = MIN_SATURATION,
                  method: str = "otsu") -> TissueMask:
    """Tissue mask of a whole slide at about ``target_mpp`` µm/px (never finer than level 0).

    The slide is read through :func:`python_task.wsi.slides.read_downsampled`: the coarsest fine-enough pyramid
    level, area-averaged in blocks, so even a large single-level slide needs little memory.
    """
    if not target_mpp > 0:
        raise ConfigError("tissue_mpp", f"must be a positive number, not {target_mpp}")
    rgb, downsample = read_downsampled(slide, target_mpp / slide.mpp)
    mask, threshold = tissue_mask_from_rgb(rgb, min_saturation, method=method)
    result = TissueMask(mask=mask, downsample=downsample, threshold=threshold)
    if not mask.any():
        log.warning("%s: no tissue found (saturation threshold %.3f); every tile will have tissue fraction 0",
                    slide.path, threshold)
    return result
