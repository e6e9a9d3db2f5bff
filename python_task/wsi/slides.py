"""Open a whole-slide image, pick a pyramid level for a target µm/px, and read pixels fast.

Two readers share one :class:`Slide` front:

* ``'tiff'``: a direct tile decoder for TIFF-family slides (Aperio SVS, generic tiled TIFF, Philips TIFF) whose
  pyramid levels are JPEG-compressed tiled pages. It reads a tile's compressed bytes with ``os.pread`` and decodes
  them with libjpeg-turbo (imagecodecs), skipping OpenSlide's per-tile RGBA conversion and cairo compositing,
  which cost several times the JPEG decode itself. Decoded tiles are kept in a small LRU cache because
  neighbouring output tiles usually share source tiles (e.g. 240-px source tiles under 256-px output tiles).
* ``'openslide'``: everything else (JPEG 2000, LZW, strips, NDPI, MRXS, ...).

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
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import numpy as np
from PIL import Image

from python_task.errors import ConfigError, SlideError

log = logging.getLogger(__name__)

READERS = ("auto", "tiff", "openslide")  # the first is the default
NO_MPP_CAUSE = "no µm/px (openslide.mpp-x) in the slide metadata; give it with `slide_mpp`"
DEFAULT_CACHE_BYTES = 64 << 20
# OpenSlide vendors whose levels are plain, non-overlapping tile grids of one TIFF page each; others (Ventana,
# Leica, Trestle, NDPI, ...) stitch, offset or crop tiles, so a 1:1 page mapping would misplace pixels.
_FAST_VENDORS = frozenset({"aperio", "generic-tiff", "philips"})
_JPEG = 7


# --------------------------------------------------------------------------------------------------- backends


class _Backend(Protocol):
    name: str

    def read_level(self, level: int, x: int, y: int, width: int, height: int,
                   out: np.ndarray | None = None) -> np.ndarray: ...

    def close(self) -> None: ...


def _white(height: int, width: int) -> np.ndarray:
    return np.full((height, width, 3), 255, dtype=np.uint8)


def _rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite OpenSlide's (non-premultiplied) RGBA on white; transparent = outside the slide or no tile."""
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha[..., None].astype(np.uint16)
    rgb = (rgba[..., :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return rgb.astype(np.uint8)


class _OpenSlideBackend:
    """OpenSlide's ``read_region`` converted to RGB on white; the handle is opened lazily per process."""

    name = "openslide"

    def __init__(self, path: Path, downsamples: tuple[float, ...]) -> None:
        self.path = path
        self.downsamples = downsamples
        self._osr: Any = None
        self._pid = -1

    def _handle(self) -> Any:
        if self._osr is None or self._pid != os.getpid():
            import openslide

            try:
                self._osr = openslide.OpenSlide(str(self.path))
            except (openslide.OpenSlideError, OSError) as exc:
                raise SlideError(self.path, f"openslide cannot reopen it ({type(exc).__name__}: {exc})") from exc
            self._pid = os.getpid()
        return self._osr

    def read_level(self, level: int, x: int, y: int, width: int, height: int,
                   out: np.ndarray | None = None) -> np.ndarray:
        import openslide

        if width <= 0 or height <= 0:
            return _white(max(height, 0), max(width, 0)) if out is None else out
        ds = self.downsamples[level]
        x0, y0 = (x, y) if level == 0 else (round(x * ds), round(y * ds))
        try:
            image = self._handle().read_region((x0, y0), level, (width, height))
        except openslide.OpenSlideError as exc:
            raise SlideError(self.path, f"cannot read pixels, the file may be truncated or corrupt "
                                       f"(OpenSlideError: {exc})") from exc
        rgb = _rgba_to_rgb(np.asarray(image))
        if out is None:
            return rgb
        out[...] = rgb
        return out

    def close(self) -> None:
        if self._osr is not None and self._pid == os.getpid():
            self._osr.close()
        self._osr = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "downsamples": self.downsamples}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["downsamples"])  # type: ignore[misc]


@dataclass(frozen=True)
class _TiffLevel:
    """Where one pyramid level's JPEG tiles live in the file and how to decode them (plain data: picklable)."""

    width: int
    height: int
    tile_width: int
    tile_height: int
    tiles_across: int
    offsets: np.ndarray        # int64, one per tile, row-major
    bytecounts: np.ndarray     # int64; 0 = sparse tile (white)
    jpegtables: bytes | None
    colorspace: int | None     # JPEG colour space for imagecodecs (2 = RGB for Aperio's untransformed RGB JPEG)


def _jpeg_colorspace(page: Any) -> int | None:
    """Aperio writes RGB (not YCbCr) JPEG data without a JFIF/Adobe marker; libjpeg must be told so."""
    if int(page.photometric) == 2 and not getattr(page, "is_jfif", False):
        return 2
    return None


def _fast_page_problem(page: Any) -> str | None:
    """Why ``page`` cannot use the direct decoder, or None when it can."""
    if int(page.compression) != _JPEG:
        return f"compression {int(page.compression)} is not JPEG"
    if not page.is_tiled:
        return "not tiled"
    if page.samplesperpixel != 3 or page.extrasamples or int(page.planarconfig) != 1:
        return "not 3-sample contiguous RGB"
    if int(page.photometric) not in (2, 6) or page.bitspersample != 8:
        return f"photometric {int(page.photometric)}, {page.bitspersample} bits"
    if getattr(page, "imagedepth", 1) != 1:
        return "volumetric tiles"
    across = -(-page.imagewidth // page.tilewidth)
    down = -(-page.imagelength // page.tilelength)
    if len(page.dataoffsets) != across * down:
        return "unexpected tile count"
    return None


def _candidate_pages(tif: Any) -> list[Any]:
    """Pyramid pages in preference order: series levels (incl. SubIFDs), then every top-level page."""
    pages: list[Any] = []
    seen: set[int] = set()

    def add(page: Any) -> None:
        if page is not None and page.offset not in seen:
            seen.add(page.offset)
            pages.append(page)

    for series in tif.series:
        for lvl in series.levels:
            add(lvl.keyframe)
    for page in tif.pages:
        add(page)
    return pages


def _map_tiff_levels(tif: Any, level_dimensions: tuple[tuple[int, int], ...]) -> tuple[list[_TiffLevel] | None, str]:
    """Match every OpenSlide level to a JPEG-tiled page of the same size; (None, why) when one has none."""
    pages = _candidate_pages(tif)
    levels: list[_TiffLevel] = []
    for index, (width, height) in enumerate(level_dimensions):
        same_size = [p for p in pages if (p.imagewidth, p.imagelength) == (width, height)]
        if not same_size:
            return None, f"no TIFF page of {width}x{height} px for level {index}"
        problems = [_fast_page_problem(p) for p in same_size]
        if None not in problems:
            return None, f"level {index}: {problems[0]}"
        page = same_size[problems.index(None)]
        levels.append(_TiffLevel(
            width=width, height=height, tile_width=page.tilewidth, tile_height=page.tilelength,
            tiles_across=-(-width // page.tilewidth),
            offsets=np.asarray(page.dataoffsets, dtype=np.int64),
            bytecounts=np.asarray(page.databytecounts, dtype=np.int64),
            jpegtables=page.jpegtables, colorspace=_jpeg_colorspace(page)))
    return levels, ""


class _TiffBackend:
    """Direct JPEG tile decoder: pread the tile bytes, decode with libjpeg-turbo, paste into the output.

    Decoded tiles live in a preallocated pool of tile-sized slots (an LRU over slots) and are decoded straight
    into their slot: no allocation per tile, which matters because fresh large allocations page-fault on every
    use. One lock serialises cache and decode, so a Slide may be shared by threads, but decodes then run one at a
    time: give each decoding thread (or process) its own Slide for parallel reads.
    """

    name = "tiff"

    def __init__(self, path: Path, levels: list[_TiffLevel], cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.path = path
        self.levels = levels
        self.cache_bytes = cache_bytes
        self._fd = -1
        self._pid = -1
        self._lock = threading.Lock()
        self._reset_cache()

    def _reset_cache(self) -> None:
        self._pools: dict[tuple[int, int], np.ndarray] = {}          # (tile_h, tile_w) -> (slots, h, w, 3)
        self._free: dict[tuple[int, int], list[int]] = {}
        self._lru: OrderedDict[tuple[int, int], int] = OrderedDict()  # (level, tile index) -> pool slot

    def _file(self) -> int:
        if self._fd < 0 or self._pid != os.getpid():
            if self._fd >= 0:                    # inherited through fork: this process's copy, safe to close
                os.close(self._fd)
                self._fd = -1
            try:
                self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            except OSError as exc:
                raise SlideError(self.path, f"cannot open it ({exc.strerror or exc})") from exc
            self._pid = os.getpid()
            self._reset_cache()
        return self._fd

    def _pool(self, spec: _TiffLevel) -> tuple[np.ndarray, list[int]]:
        shape = (spec.tile_height, spec.tile_width)
        pool = self._pools.get(shape)
        if pool is None:
            slots = max(8, self.cache_bytes // (shape[0] * shape[1] * 3))
            pool = self._pools[shape] = np.empty((slots, *shape, 3), dtype=np.uint8)
            self._free[shape] = list(range(slots - 1, -1, -1))
        return pool, self._free[shape]

    def _take_slot(self, spec: _TiffLevel) -> tuple[np.ndarray, int]:
        """A free slot of this tile shape, evicting the least recently used tile of that shape if needed."""
        pool, free = self._pool(spec)
        if not free:
            shape = pool.shape[1:3]
            for key, slot in self._lru.items():
                if (self.levels[key[0]].tile_height, self.levels[key[0]].tile_width) == shape:
                    del self._lru[key]
                    free.append(slot)
                    break
        return pool, free.pop()

    def _decode_into(self, level: int, index: int, target: np.ndarray) -> None:
        """Decode one (present) tile into ``target`` (tile_h, tile_w, 3)."""
        import imagecodecs

        spec = self.levels[level]
        count = int(spec.bytecounts[index])
        offset = int(spec.offsets[index])
        fd = self._file()
        try:
            data = os.pread(fd, count, offset)
        except OSError as exc:
            raise SlideError(self.path, f"cannot read tile {index} of level {level} ({exc.strerror or exc})") from exc
        if len(data) != count:
            raise SlideError(self.path, f"truncated: tile {index} of level {level} needs bytes {offset}-"
                                       f"{offset + count} but the file ends at {os.fstat(fd).st_size}")
        try:
            imagecodecs.jpeg8_decode(data, tables=spec.jpegtables, colorspace=spec.colorspace, outcolorspace=2,
                                     out=target)
            return
        except Exception:  # imagecodecs raises its own types; retry without `out` to tell size from corruption
            pass
        try:
            tile = imagecodecs.jpeg8_decode(data, tables=spec.jpegtables, colorspace=spec.colorspace,
                                            outcolorspace=2)
        except Exception as exc:
            raise SlideError(self.path, f"corrupt JPEG tile {index} of level {level} "
                                       f"({type(exc).__name__}: {exc})") from exc
        if tile.ndim != 3 or tile.shape[2] != 3:
            raise SlideError(self.path, f"tile {index} of level {level} decodes to shape {tile.shape}, not RGB")
        # A JPEG stream smaller than its grid cell (some writers crop edge tiles): the rest of the cell is white.
        target.fill(255)
        h, w = min(tile.shape[0], target.shape[0]), min(tile.shape[1], target.shape[1])
        target[:h, :w] = tile[:h, :w]

    def _tile(self, level: int, index: int) -> np.ndarray | None:
        """The decoded tile (a view into the pool, valid until the next call) or None when sparse (bytecount 0).

        The caller holds the lock.
        """
        spec = self.levels[level]
        if spec.bytecounts[index] == 0:
            return None
        key = (level, index)
        slot = self._lru.get(key)
        if slot is not None:
            self._lru.move_to_end(key)
            return self._pools[(spec.tile_height, spec.tile_width)][slot]
        pool, slot = self._take_slot(spec)
        try:
            self._decode_into(level, index, pool[slot])
        except BaseException:
            self._free[pool.shape[1:3]].append(slot)
            raise
        self._lru[key] = slot
        return pool[slot]

    def read_level(self, level: int, x: int, y: int, width: int, height: int,
                   out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            out = np.empty((max(height, 0), max(width, 0), 3), dtype=np.uint8)
        spec = self.levels[level]
        tw, th = spec.tile_width, spec.tile_height
        xa, xb = max(x, 0), min(x + width, spec.width)
        ya, yb = max(y, 0), min(y + height, spec.height)
        if xa >= xb or ya >= yb:
            out.fill(255)
            return out
        if (xa, ya, xb, yb) != (x, y, x + width, y + height):
            out.fill(255)                                   # part of the region lies outside the level
        with self._lock:
            self._file()
            for ty in range(ya // th, (yb - 1) // th + 1):
                top = ty * th
                sy0, sy1 = max(ya, top), min(yb, top + th)
                for tx in range(xa // tw, (xb - 1) // tw + 1):
                    left = tx * tw
                    sx0, sx1 = max(xa, left), min(xb, left + tw)
                    tile = self._tile(level, ty * spec.tiles_across + tx)
                    if tile is None:
                        out[sy0 - y:sy1 - y, sx0 - x:sx1 - x] = 255
                    else:
                        out[sy0 - y:sy1 - y, sx0 - x:sx1 - x] = tile[sy0 - top:sy1 - top, sx0 - left:sx1 - left]
        return out

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0 and self._pid == os.getpid():
                os.close(self._fd)
            self._fd = -1
            self._reset_cache()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "levels": self.levels, "cache_bytes": self.cache_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["levels"], state["cache_bytes"])  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------------ Slide


class Slide:
    """An open whole-slide image: level-0 size, µm/px, pyramid geometry and an RGB pixel reader.

    Build it with :func:`open_slide`. ``read_region`` returns RGB uint8 with everything outside the slide white.
    """

    def __init__(self, path: Path, *, mpp: float, level_dimensions: tuple[tuple[int, int], ...],
                 level_downsamples: tuple[float, ...], properties: dict[str, str], backend: _Backend,
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


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _tiff_damage(path: Path) -> str | None:
    """A one-line reason when a TIFF's structure or tile data run past the end of the file (cheap: no decode)."""
    import tifffile

    size = path.stat().st_size
    try:
        with tifffile.TiffFile(path) as tif:
            if len(tif.pages) == 0:
                return "damaged TIFF: no readable image directory (truncated?)"
            for page in _candidate_pages(tif):
                offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                counts = np.asarray(page.databytecounts, dtype=np.int64)
                if offsets.size and int((offsets + counts).max()) > size:
                    return (f"truncated: image data runs to byte {int((offsets + counts).max())} "
                            f"but the file has {size} bytes")
    except Exception as exc:  # tifffile raises many types on damaged files
        return f"damaged TIFF ({type(exc).__name__}: {exc})"
    return None


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
        is_tiff = _is_tiff(path)
    except OSError as exc:
        raise SlideError(path, f"cannot read it ({exc.strerror or exc})") from exc
    try:
        osr = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError as exc:
        damage = _tiff_damage(path) if is_tiff else None
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
        damage = _tiff_damage(path)
        if damage:
            raise SlideError(path, damage)
    backend = _choose_backend(path, reader, is_tiff, properties, level_dimensions, level_downsamples, cache_bytes)
    return Slide(path, mpp=float(mpp), level_dimensions=level_dimensions, level_downsamples=level_downsamples,
                 properties=properties, backend=backend, mpp_source=mpp_source)


def _choose_backend(path: Path, reader: str, is_tiff: bool, properties: dict[str, str],
                    level_dimensions: tuple[tuple[int, int], ...], level_downsamples: tuple[float, ...],
                    cache_bytes: int) -> _Backend:
    if reader == "openslide":
        return _OpenSlideBackend(path, level_downsamples)
    why = ""
    levels = None
    vendor = properties.get("openslide.vendor", "?")
    if not is_tiff:
        why = "not a TIFF file"
    elif vendor not in _FAST_VENDORS:
        why = f"openslide vendor {vendor!r} is not a plain tiled TIFF layout"
    else:
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                levels, why = _map_tiff_levels(tif, level_dimensions)
        except Exception as exc:  # tifffile raises many types on odd files: fall back to openslide
            levels, why = None, f"tifffile cannot parse it ({type(exc).__name__}: {exc})"
    if levels is not None:
        return _TiffBackend(path, levels, cache_bytes)
    if reader == "tiff":
        raise SlideError(path, f"the fast TIFF reader cannot read it: {why}")
    log.debug("%s: using openslide (%s)", path, why)
    return _OpenSlideBackend(path, level_downsamples)


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
