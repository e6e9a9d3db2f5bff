"""Open a whole-slide image, pick a pyramid level for a target µm/px, and read pixels fast.

Two pixel readers (:mod:`python_task.wsi.backends`) share one :class:`Slide` front: ``'tiff'``, a direct JPEG
tile decoder for TIFF-family slides (several times faster than OpenSlide's RGBA path), and ``'openslide'`` for
everything else; ``'auto'`` picks the first where it can.

Geometry (level sizes, downsamples) and µm/px always come from OpenSlide, so both readers agree on where every
pixel is. Coordinates: ``read_region`` takes level-0 ``x0, y0`` like OpenSlide; :meth:`Slide.read_level` takes
coordinates in pixels of the level itself. Both readers snap a level-0 position to the nearest whole level
pixel (OpenSlide itself would interpolate a fractional position), so they return the same pixels.

A :class:`Slide` can be pickled: file handles are dropped and reopened lazily in the receiving process (or after
a fork), so the extractor can hand one to a worker process.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from types import TracebackType

import numpy as np
from PIL import Image

from python_task.errors import ConfigError, SlideError
from python_task.wsi.backends import DEFAULT_CACHE_BYTES, Backend, choose_backend, looks_like_tiff, tiff_damage

log = logging.getLogger(__name__)

READERS = ("auto", "tiff", "openslide")  # the first is the default
NO_MPP_CAUSE = "no µm/px (openslide.mpp-x) in the slide metadata; give it with `slide_mpp`"


# ------------------------------------------------------------------------------------------------------ Slide


class Slide:
    """An open whole-slide image: level-0 size, µm/px, pyramid geometry and an RGB pixel reader.

    Build it with :func:`open_slide`. ``read_region`` returns RGB uint8 with everything outside the slide white.
    """

    def __init__(self, path: Path, *, mpp: float, level_dimensions: tuple[tuple[int, int], ...],
                 level_downsamples: tuple[float, ...], properties: dict[str, str], backend: Backend,
                 mpp_source: str) -> None:
        self.path = path
        self.mpp = mpp
        self.mpp_source = mpp_source             # 'metadata' or 'user'
        self.level_dimensions = level_dimensions
        self.level_downsamples = level_downsamples
        self.dimensions = level_dimensions[0]
        self.properties = properties
        self._backend = backend

    @property
    def reader_name(self) -> str:
        return self._backend.name

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def vendor(self) -> str | None:
        return self.properties.get("openslide.vendor")

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    def read_level(self, level: int, x: int, y: int, width: int, height: int,
                   out: np.ndarray | None = None) -> np.ndarray:
        """RGB uint8 (height, width, 3) of ``level`` starting at LEVEL px (x, y); outside the slide is white.

        ``out``: an optional preallocated (height, width, 3) uint8 array to fill (saves an allocation per read).
        """
        self._check_level(level)
        _check_out(out, height, width)
        return self._backend.read_level(level, int(x), int(y), int(width), int(height), out)

    def read_region(self, x0: int, y0: int, level: int, width: int, height: int,
                    out: np.ndarray | None = None) -> np.ndarray:
        """Like OpenSlide's ``read_region`` but RGB on white: (x0, y0) in level-0 px, size in ``level`` px."""
        self._check_level(level)
        _check_out(out, height, width)
        if level == 0:
            x, y = int(x0), int(y0)
        else:
            ds = self.level_downsamples[level]
            x, y = math.floor(x0 / ds + 0.5), math.floor(y0 / ds + 0.5)
        return self._backend.read_level(level, x, y, int(width), int(height), out)

    def _check_level(self, level: int) -> None:
        if not 0 <= level < len(self.level_dimensions):
            raise ValueError(f"level {level} out of range 0..{len(self.level_dimensions) - 1}")

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return (f"Slide({str(self.path)!r}, {w}x{h}, mpp={self.mpp:g}, levels={self.level_count}, "
                f"reader={self.reader_name!r})")


def _check_out(out: np.ndarray | None, height: int, width: int) -> None:
    if out is not None and (out.shape != (height, width, 3) or out.dtype != np.uint8):
        raise ValueError(f"out must be uint8 of shape {(height, width, 3)}, not {out.dtype} {out.shape}")


def _parse_mpp(properties: dict[str, str]) -> float | None:
    try:
        value = float(properties["openslide.mpp-x"])
    except (KeyError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def open_slide(path: str | os.PathLike[str], *, mpp: float | None = None, reader: str = "auto",
               cache_bytes: int = DEFAULT_CACHE_BYTES) -> Slide:
    """Open a slide; ``mpp`` overrides the metadata µm/px; ``reader`` is 'auto', 'tiff' or 'openslide'.

    'auto' uses the fast TIFF reader when every OpenSlide level maps to a JPEG-tiled TIFF page of the same size,
    otherwise OpenSlide. ``cache_bytes`` bounds the fast reader's decoded-tile cache.
    """
    import openslide

    path = Path(path)
    if reader not in READERS:
        raise ConfigError("reader", f"unknown slide reader {reader!r}; choose one of {', '.join(READERS)}",
                          path=path)
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise ConfigError("slide_mpp", f"the µm/px given for it (`slide_mpp`) must be a positive number, not {mpp}",
                          path=path)
    if not path.exists():
        raise SlideError(path, "file not found")
    if not path.is_file():
        raise SlideError(path, "not a file")
    try:
        is_tiff = looks_like_tiff(path)
    except OSError as exc:
        raise SlideError(path, f"cannot read it ({exc.strerror or exc})") from exc
    try:
        osr = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError as exc:
        damage = tiff_damage(path) if is_tiff else None
        extra = f"; {damage}" if damage else ""
        raise SlideError(path, f"not a slide openslide can read (OpenSlideUnsupportedFormatError){extra}") from exc
    except (openslide.OpenSlideError, OSError) as exc:
        raise SlideError(path, f"openslide cannot open it ({type(exc).__name__}: {exc})") from exc
    try:
        properties = dict(osr.properties)
        level_dimensions = tuple((int(w), int(h)) for w, h in osr.level_dimensions)
        level_downsamples = tuple(float(d) for d in osr.level_downsamples)
    finally:
        osr.close()
    if mpp is None:
        mpp = _parse_mpp(properties)
        if mpp is None:
            raise SlideError(path, NO_MPP_CAUSE)
        mpp_source = "metadata"
    else:
        mpp_source = "user"
    if is_tiff:
        damage = tiff_damage(path)
        if damage:
            raise SlideError(path, damage)
    backend = choose_backend(path, reader, is_tiff, properties, level_dimensions, level_downsamples, cache_bytes)
    return Slide(path, mpp=float(mpp), level_dimensions=level_dimensions, level_downsamples=level_downsamples,
                 properties=properties, backend=backend, mpp_source=mpp_source)


# --------------------------------------------------------------------------------------- levels and resampling


def level_for_mpp(slide: Slide, target_mpp: float, tolerance: float = 0.02) -> tuple[int, float]:
    """(level to read, resample factor = level px per output px) for output tiles at ``target_mpp``.

    The chosen level is the coarsest one still at least as fine as the target (within ``tolerance``). The factor
    is exactly 1.0 when that level's µm/px is within ``tolerance`` (relative) of the target, so e.g. a 0.499 µm/px
    slide read at 0.5 is not resampled. A target finer than level 0 is allowed (factor < 1: upsampling) with a
    warning.
    """
    if not (math.isfinite(target_mpp) and target_mpp > 0):
        raise ConfigError("mpp", f"the target µm/px must be a positive number, not {target_mpp}")
    target_ds = target_mpp / slide.mpp
    level = 0
    for index, ds in enumerate(slide.level_downsamples):
        if ds <= target_ds * (1 + tolerance) and ds >= slide.level_downsamples[level]:
            level = index
    level_ds = slide.level_downsamples[level]
    if abs(level_ds - target_ds) <= tolerance * target_ds:
        return level, 1.0
    factor = target_ds / level_ds
    if factor < 1:
        log.warning("%s: target %.4g µm/px is finer than the slide's %.4g µm/px; tiles will be upsampled %.3gx",
                    slide.path, target_mpp, slide.mpp, 1 / factor)
    return level, factor


def _resample(region: np.ndarray, size: tuple[int, int], box: tuple[float, float, float, float]) -> np.ndarray:
    """Resize the ``box`` (fractional px of ``region``) to ``size`` = (w, h): area (BOX) down, BILINEAR up."""
    scale = (box[2] - box[0]) / size[0]
    resample = Image.Resampling.BOX if scale >= 1 else Image.Resampling.BILINEAR
    return np.array(Image.fromarray(region).resize(size, resample, box=box))


def _integral(value: float) -> int | None:
    nearest = round(value)
    return int(nearest) if abs(value - nearest) < 1e-9 else None


def _read_resampled(slide: Slide, level: int, x: float, y: float, factor: float,
                    width: int, height: int) -> np.ndarray:
    """Output px (width, height) covering LEVEL px [x, x + width*factor) x [y, y + height*factor)."""
    k, ix, iy = _integral(factor), _integral(x), _integral(y)
    if k is not None and k > 1 and ix is not None and iy is not None:
        # Whole k x k blocks on the pixel grid: PIL's reduce() is the exact block mean, ~5x faster than resize().
        region = slide.read_level(level, ix, iy, width * k, height * k)
        return np.array(Image.fromarray(region).reduce(k))
    pad = 1  # one extra level px each side: the bilinear kernel reaches half a pixel past the box
    ix0, iy0 = math.floor(x) - pad, math.floor(y) - pad
    ix1, iy1 = math.ceil(x + width * factor) + pad, math.ceil(y + height * factor) + pad
    region = slide.read_level(level, ix0, iy0, ix1 - ix0, iy1 - iy0)
    box = (x - ix0, y - iy0, x - ix0 + width * factor, y - iy0 + height * factor)
    return _resample(region, (width, height), box)


class TileReader:
    """Reads square output tiles at a target µm/px. Built once per slide + target.

    Tile ``read(x0, y0)`` covers level-0 ``[x0, x0 + tile_extent0) x [y0, y0 + tile_extent0)``.
    """

    def __init__(self, slide: Slide, target_mpp: float, tile_size: int, tolerance: float = 0.02) -> None:
        if tile_size <= 0:
            raise ConfigError("tile_size", f"must be a positive number of pixels, not {tile_size}")
        self.slide = slide
        self.target_mpp = target_mpp
        self.tile_size = int(tile_size)
        self.level, self.factor = level_for_mpp(slide, target_mpp, tolerance)
        self.level_downsample = slide.level_downsamples[self.level]
        self.downsample = self.level_downsample * self.factor   # level-0 px per output px
        self.mpp = slide.mpp * self.downsample                   # actual µm/px of the output tiles
        self.tile_extent0 = self.tile_size * self.downsample     # level-0 px covered by one tile

    def read(self, x0: float, y0: float, out: np.ndarray | None = None) -> np.ndarray:
        """(tile_size, tile_size, 3) uint8 RGB tile whose top-left corner is level-0 (x0, y0).

        ``out``: an optional preallocated (tile_size, tile_size, 3) uint8 array (e.g. a slot of a batch) to fill.
        """
        t = self.tile_size
        if self.factor == 1.0:
            return self.slide.read_region(int(round(x0)), int(round(y0)), self.level, t, t, out)
        tile = _read_resampled(self.slide, self.level, x0 / self.level_downsample, y0 / self.level_downsample,
                               self.factor, t, t)
        if out is None:
            return tile
        _check_out(out, t, t)
        out[...] = tile
        return out


def read_downsampled(slide: Slide, downsample: float, *, tolerance: float = 0.02,
                     block: int = 2048) -> tuple[np.ndarray, float]:
    """The whole slide at ~``downsample`` level-0 px per output px, and the exact downsample used.

    Reads the coarsest pyramid level that is fine enough, in blocks of about ``block`` level px with area
    averaging, so memory stays bounded even for a 40k x 40k single-level slide (only the output and one block are
    held). Output pixel (i, j) covers level-0 [j*ds, (j+1)*ds) x [i*ds, (i+1)*ds); the part of the last row and
    column past the slide's edge is white.
    """
    downsample = max(float(downsample), 1.0)
    level, factor = level_for_mpp(slide, downsample * slide.mpp, tolerance)
    level_ds = slide.level_downsamples[level]
    lw, lh = slide.level_dimensions[level]
    if factor == 1.0:
        out = np.empty((lh, lw, 3), dtype=np.uint8)
        for y in range(0, lh, block):
            for x in range(0, lw, block):
                w, h = min(block, lw - x), min(block, lh - y)
                slide.read_level(level, x, y, w, h, out=out[y:y + h, x:x + w])
        return out, level_ds
    width0, height0 = slide.dimensions
    ds = level_ds * factor
    ow, oh = math.ceil(width0 / ds - 1e-9), math.ceil(height0 / ds - 1e-9)
    step = max(8, int(block / factor))
    out = np.empty((oh, ow, 3), dtype=np.uint8)
    for oy in range(0, oh, step):
        for ox in range(0, ow, step):
            w, h = min(step, ow - ox), min(step, oh - oy)
            out[oy:oy + h, ox:ox + w] = _read_resampled(slide, level, ox * factor, oy * factor, factor, w, h)
    return out, ds


def thumbnail(slide: Slide, max_size: int = 1024) -> tuple[np.ndarray, float]:
    """RGB thumbnail whose longer side is at most ``max_size``, and level-0 px per thumbnail px.

    Uses the coarsest pyramid level that is still at least as large as the thumbnail (no upsampling).
    """
    downsample = max(1.0, max(slide.dimensions) / max_size)
    return read_downsampled(slide, downsample, tolerance=1e-6)
