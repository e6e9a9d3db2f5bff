"""Tile augmentation in the input pipeline's reader threads: numpy + OpenCV on uint8 tiles.

The same methods, options and semantics as the Keras layers of :mod:`python_task.transforms.augment_layers`
(``flip``, ``rot90``, ``rotate``, ``scale``, ``elastic``, ``grid``, ``hed``), run where the tiles are decoded
instead of inside the model. On a CPU this is several times faster than the layers (OpenCV's SIMD ``remap`` and table look-ups on
``uint8`` against float gathers in the compiled graph) and it overlaps with the training step, which runs in
other threads; on a GPU node the layers are the better choice (the GPU does the work, the few CPU cores only
decode). :func:`~python_task.transforms.augmentations.resolve_engine` picks between them (``augment_on`` auto).

Per tile, in this order:

* ``hed``: optical density ``-ln((x + 1) / 256)``, Ruifrok deconvolution, per stain ``c * (1 + U(-sigma, sigma))
  + U(-bias, bias)``, back to RGB: one 3x3 map in log space, done as a 256-entry look-up table (``ln(x + 1)``),
  ``cv2.transform`` (the 3x3 map plus offset), ``cv2.exp`` and one rounding subtraction back to ``uint8``. It
  comes before the spatial deformation (the layers put it after): a per-pixel colour map commutes with pixel
  permutations exactly and with bilinear interpolation up to rounding, and on ``uint8`` it is cheaper;
* ``rotate`` / ``scale`` / ``elastic`` / ``grid``: one source coordinate per pixel (the affine part plus the
  displacement fields, as one ``(H, W, 2)`` map) and one bilinear ``cv2.remap`` with reflected borders
  (``BORDER_REFLECT_101``, the layers' whole-sample mirror) through fixed-point maps. The elastic field is the
  layers' (white noise smoothed by a gaussian of ``elastic_sigma`` px, standard deviation ``elastic_alpha / 4``),
  computed on a lattice of ``elastic_sigma / 2`` px and upsampled bilinearly (it is smooth at that scale);
* ``flip`` / ``rot90``: ``cv2.transpose`` / ``cv2.flip`` (after the remap, if any): exact pixel permutations.

Per 256 px tile on one core of the 2-core machine this is about 0.7-0.9 ms for flip+rot90+elastic+hed together
(remap ~0.2, HED ~0.23, elastic field and fixed-point maps ~0.18), against about 0.5 ms to read and decode the
tile (``benchmarks/bench_input.py`` measures the pipeline).

Randomness comes from the generator the pipeline hands to each batch, seeded from (seed, epoch, batch)
(:class:`python_task.data.dataset.ShardBatches`): a run is repeatable whatever the thread scheduling, and a
resumed run draws the same augmentations as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import cv2
import numpy as np

from python_task.transforms.augmentations import (
    ELASTIC_SIGMAS,
    GEOMETRIC,
    AugmentOptions,
    as_options,
    linear_basis,
    parse_augment,
    smooth_basis,
)
from python_task.transforms.stain import HED_FROM_RGB, RGB_FROM_HED

_LOG_LUT = np.log(np.arange(256, dtype=np.float64) + 1.0).astype(np.float32).reshape(256, 1)
_LN256 = math.log(256.0)


def as_uint8(batch: np.ndarray) -> np.ndarray:
    """Tiles as ``uint8`` (float tiles, e.g. stain-normalised ones, are rounded and clipped to [0, 255])."""
    x = np.asarray(batch)
    if x.dtype == np.uint8:
        return x
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


class PipelineAugmenter:
    """``(batch, rng) -> uint8 batch``: the ``transform`` of :class:`python_task.data.dataset.ShardBatches`.

    ``names``: a tuple of method names, or a ``flip,rot90`` list for
    :func:`~python_task.transforms.augmentations.parse_augment`; ``options`` the ranges. Shape is kept; the
    result is ``uint8``, so every value stays in [0, 255].
    """

    def __init__(self, names: str | Sequence[str] | None,
                 options: AugmentOptions | dict[str, float] | None = None) -> None:
        self.names = parse_augment(names)
        self.options = options = as_options(options)
        self.flip = "flip" in self.names
        self.rot90 = "rot90" in self.names
        self.hed = "hed" in self.names
        on = {n: n in self.names for n in GEOMETRIC}
        self.rotate_degrees = options.rotate_degrees if on["rotate"] else 0.0
        self.scale_range = options.scale_range if on["scale"] else 0.0
        self.elastic_alpha = options.elastic_alpha if on["elastic"] else 0.0
        self.grid_distort = options.grid_distort if on["grid"] else 0.0
        self.geometric = any(on.values())
        # the reader threads parallelise over batches; OpenCV's own pool would only oversubscribe the cores
        cv2.setNumThreads(1)

    def __bool__(self) -> bool:
        return bool(self.names)

    def __call__(self, batch: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        x = as_uint8(batch)
        rng = rng if rng is not None else np.random.default_rng()
        if x.ndim == 3:
            return self.augment_tile(x, rng)
        out = np.empty_like(x)
        for i in range(len(x)):
            out[i] = self.augment_tile(x[i], rng)
        return out

    def augment_tile(self, tile: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One ``(H, W, 3)`` uint8 tile, augmented with draws from ``rng`` (in a fixed order)."""
        tile = np.ascontiguousarray(tile)
        if self.hed:
            tile = self._hed(tile, rng)
        if self.geometric:
            return self._warp(tile, rng)
        if self.flip or self.rot90:
            return self._dihedral(tile, rng)
        return tile

    # ------------------------------------------------------------------------------------------ colour

    def _hed(self, tile: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        o = self.options
        scale = 1.0 + rng.uniform(-1.0, 1.0, 3) * o.hed_sigma
        shift = rng.uniform(-1.0, 1.0, 3) * o.hed_bias
        return apply_hed(tile, scale, shift)

    # ------------------------------------------------------------------------------------------ geometry

    def _dihedral_bits(self, rng: np.random.Generator, square: bool) -> tuple[bool, bool, bool]:
        """(transpose, flip rows, flip columns), as the layers draw them (all 8 symmetries with both on)."""
        if self.rot90 and self.flip and square:
            t, a, b = (bool(v) for v in rng.random(3) < 0.5)
            return t, a, b
        t = a = b = False
        if self.rot90:
            if square:
                k = int(rng.integers(0, 4))  # k quarter turns, k = 1 is np.rot90
                t, a, b = k in (1, 3), k in (1, 2), k in (2, 3)
            else:
                a = b = bool(rng.random() < 0.5)
        if self.flip:
            fa, fb = (bool(v) for v in rng.random(2) < 0.5)
            a, b = a != fa, b != fb
        return t, a, b

    def _dihedral(self, tile: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return _apply_dihedral(tile, self._dihedral_bits(rng, tile.shape[0] == tile.shape[1]))

    def _warp(self, tile: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One bilinear remap through ``(H, W, 2)`` source coordinates (x, y), then the drawn symmetry.

        Flipping or turning the warped tile samples the source at ``A D p + f(D p)`` instead of ``D A p + f(p)``
        for the symmetry ``D``: the same distribution, since the rotation angle, the scale and the fields are
        drawn symmetrically, and the symmetry stays an exact pixel permutation."""
        h, w = tile.shape[:2]
        bits = self._dihedral_bits(rng, h == w) if (self.flip or self.rot90) else None
        if self.rotate_degrees > 0 or self.scale_range > 0:
            theta = rng.uniform(-1.0, 1.0) * math.radians(self.rotate_degrees)
            s = 1.0 + rng.uniform(-1.0, 1.0) * self.scale_range
            c, si = math.cos(theta) * s, math.sin(theta) * s
            cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
            # x' = c x + si y + cx, y' = -si x + c y + cy about the centre (the layers' convention)
            maps = cv2.transform(_centred_grid(h, w), np.array([[c, si, cx], [-si, c, cy]], np.float32))
        else:
            maps = _pixel_grid(h, w)
        if self.elastic_alpha > 0:
            maps = cv2.add(maps, self._elastic_field(h, w, self.elastic_alpha / ELASTIC_SIGMAS, rng))
        if self.grid_distort > 0:
            maps = cv2.add(maps, self._grid_field(h, w, rng))
        # fixed-point maps (1/32 px, what remap itself uses inside): converting first is faster than float maps
        xy, frac = cv2.convertMaps(maps, None, cv2.CV_16SC2)
        out = cv2.remap(tile, xy, frac, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        return out if bits is None else _apply_dihedral(out, bits)

    def _elastic_field(self, h: int, w: int, std: float, rng: np.random.Generator) -> np.ndarray:
        """``(H, W, 2)`` float32 displacements (x, y): each white noise smoothed by a gaussian, on the coarse
        lattice, resized bilinearly to every pixel."""
        sigma = self.options.elastic_sigma
        by, bx = _coarse_smooth_basis(h, sigma), _coarse_smooth_basis(w, sigma)
        (ny, my), (_, mx) = by.shape, bx.shape
        noise = rng.standard_normal((my, mx * 2), dtype=np.float32)  # (my, mx, 2): the x and y fields interleaved
        noise *= np.float32(std)
        # by @ noise_c @ bx.T for both fields at once, already interleaved: two products, no merge
        coarse = np.matmul(bx, (by @ noise).reshape(ny, mx, 2))
        return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR)

    def _grid_field(self, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
        """``(H, W, 2)`` float32 displacements (x, y): the inner control points moved uniformly by up to
        ``grid_distort`` cells, interpolated linearly in between."""
        steps = int(self.options.grid_steps)
        ly, lx = _grid_basis(h, steps), _grid_basis(w, steps)
        inner = _grid_inner(steps + 1)
        fields = []
        for cell in ((w - 1) / steps, (h - 1) / steps):
            nodes = rng.uniform(-1.0, 1.0, inner.shape).astype(np.float32) * np.float32(self.grid_distort * cell)
            fields.append(ly @ (nodes * inner) @ lx.T)
        return cv2.merge(fields)


def _apply_dihedral(tile: np.ndarray, bits: tuple[bool, bool, bool]) -> np.ndarray:
    """(transpose, flip rows, flip columns) as ``cv2.transpose`` / ``cv2.flip``: exact pixel permutations."""
    t, a, b = bits
    if t:
        tile = cv2.transpose(tile)
    if a and b:
        return cv2.flip(tile, -1)
    if a:
        return cv2.flip(tile, 0)
    if b:
        return cv2.flip(tile, 1)
    return tile if t else tile.copy()


def apply_hed(tile: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """HED jitter of one uint8 tile with per-stain ``scale`` and ``shift`` (optical density); uint8 out.

    ``od' = (od @ HED_FROM_RGB * scale + shift) @ RGB_FROM_HED``; with ``L = ln(x + 1)`` and ``od = ln 256 - L``
    this is ``out = exp(L @ M + k) - 1``, ``M = HED_FROM_RGB diag(scale) RGB_FROM_HED``,
    ``k = ln 256 (1 - 1 @ M) - shift @ RGB_FROM_HED``."""
    m = (HED_FROM_RGB * np.asarray(scale, dtype=np.float64)[None, :]) @ RGB_FROM_HED
    k = _LN256 * (1.0 - m.sum(axis=0)) - np.asarray(shift, dtype=np.float64) @ RGB_FROM_HED
    affine = np.concatenate([m.T, k[:, None]], axis=1).astype(np.float32)  # out_d = sum_c m[c, d] L_c + k_d
    log_x = cv2.LUT(tile, _LOG_LUT)
    mixed = cv2.transform(log_x, affine)
    out = cv2.exp(mixed, dst=mixed)
    return cv2.subtract(out, (1.0, 1.0, 1.0, 0.0), dtype=cv2.CV_8U)  # - 1, rounded and clipped to uint8 in one pass


@lru_cache(maxsize=16)
def _centred_grid(h: int, w: int) -> np.ndarray:
    """``(H, W, 2)`` float32 pixel coordinates (x, y) minus the tile centre (read-only, shared by threads)."""
    grid = _pixel_grid(h, w) - np.array([(w - 1) / 2.0, (h - 1) / 2.0], np.float32)
    grid.setflags(write=False)
    return grid


@lru_cache(maxsize=16)
def _pixel_grid(h: int, w: int) -> np.ndarray:
    """``(H, W, 2)`` float32 pixel coordinates (x, y): the identity map (read-only, shared by threads)."""
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    grid = np.ascontiguousarray(np.stack([xx, yy], axis=-1))
    grid.setflags(write=False)
    return grid


@lru_cache(maxsize=16)
def _grid_basis(size: int, steps: int) -> np.ndarray:
    """The layers' linear interpolation from the grid's control points, cached (read-only, shared by threads)."""
    basis = linear_basis(size, steps)
    basis.setflags(write=False)
    return basis


@lru_cache(maxsize=4)
def _grid_inner(g: int) -> np.ndarray:
    """1 on the inner control points of a ``g`` x ``g`` grid, 0 on the border ones, which stay on the border."""
    inner = np.zeros((g, g), np.float32)
    inner[1:-1, 1:-1] = 1.0
    inner.setflags(write=False)
    return inner


@lru_cache(maxsize=16)
def _coarse_smooth_basis(size: int, sigma: float) -> np.ndarray:
    """The elastic basis on a lattice of ``sigma / 2`` px placed as ``cv2.resize`` expects (cell centres), so
    that resizing the coarse field to ``size`` evaluates it at every pixel."""
    stride = max(1, int(sigma // 2))
    n = max(2, math.ceil(size / stride))
    at = (np.arange(n) + 0.5) * (size / n) - 0.5
    basis = smooth_basis(size, sigma, at=at)
    basis.setflags(write=False)
    return basis
