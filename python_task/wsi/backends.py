"""The pixel readers behind a :class:`~python_task.wsi.slides.Slide`: OpenSlide, and a direct JPEG tile decoder
for TIFF-family slides.

* ``'tiff'``: for slides whose pyramid levels are JPEG-compressed tiled TIFF pages (Aperio SVS, generic tiled TIFF,
  Philips TIFF): a tile's compressed bytes are read with ``os.pread`` and decoded with libjpeg-turbo
  (imagecodecs), skipping OpenSlide's per-tile RGBA conversion and cairo compositing. Decoded tiles are kept in
  a small LRU cache because neighbouring output tiles usually share source tiles.
* ``'openslide'``: everything else (JPEG 2000, LZW, strips, NDPI, MRXS, ...).

A backend implements :class:`Backend`; :func:`choose_backend` picks one for a slide. Backends can be pickled:
file handles are dropped and reopened lazily in the receiving process (or after a fork).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from python_task.errors import SlideError

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 64 << 20
# OpenSlide vendors whose levels are plain, non-overlapping tile grids of one TIFF page each; others (Ventana,
# Leica, Trestle, NDPI, ...) stitch, offset or crop tiles, so a 1:1 page mapping would misplace pixels.
_FAST_VENDORS = frozenset({"aperio", "generic-tiff", "philips"})
_JPEG = 7


class Backend(Protocol):
    """What a :class:`~python_task.wsi.slides.Slide` reads pixels through."""

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


def looks_like_tiff(path: Path) -> bool:
    """Whether the file starts with a TIFF or BigTIFF header."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def tiff_damage(path: Path) -> str | None:
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


def choose_backend(path: Path, reader: str, is_tiff: bool, properties: dict[str, str],
                    level_dimensions: tuple[tuple[int, int], ...], level_downsamples: tuple[float, ...],
                    cache_bytes: int) -> Backend:
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
