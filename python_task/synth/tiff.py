"""Writing a slide as a tiled, JPEG-compressed, pyramidal TIFF that OpenSlide opens (``generic-tiff``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from python_task.fileio import atomic_path

_ENCODE_BUFFER = 4 << 20  # bytes of tiles tifffile may hold while its threads compress them


ReadBlock = Callable[[int, int, int, int], np.ndarray]


def write_pyramidal_tiff(path: str | Path, width: int, height: int, read_block: ReadBlock, mpp: float, *,
                         tile_size: int = 256, quality: int = 90, min_level_size: int = 512) -> None:
    """Write a tiled, JPEG-compressed (RGB 4:4:4), pyramidal TIFF that OpenSlide opens as ``generic-tiff``
    with ``openslide.mpp-x`` = ``mpp``.

    ``read_block(x, y, w, h)`` returns level-0 RGB uint8 pixels of shape (h, w, 3); it is called once per
    tile, row by row, with ``w, h <= tile_size`` (smaller only at the right and bottom edges). Level 0 is
    streamed tile by tile; level 1 (2x smaller) is accumulated in memory (a quarter of level 0) and the
    smaller levels are built from it, halving until the largest side is at most ``min_level_size``. Levels
    are successive pages (resolution tags in pixels/cm). The file appears under ``path`` only once complete.
    """
    if width < 1 or height < 1:
        raise ValueError(f"bad slide size {width}x{height}")
    if tile_size % 16 or tile_size < 16:
        raise ValueError("tile_size must be a positive multiple of 16")
    if not (mpp > 0 and math.isfinite(mpp)):
        raise ValueError(f"bad mpp {mpp}")
    level1 = np.empty(((height + 1) // 2, (width + 1) // 2, 3), dtype=np.uint8)
    bigtiff = width * height * 3 > 2**31  # JPEG makes it smaller, but stay safe
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tiff:
        tiles = _level0_tiles(width, height, read_block, tile_size, level1)
        _write_level(tiff, tiles, width, height, mpp, 0, tile_size, quality)
        last, level, current = max(width, height), 1, level1
        while last > min_level_size:
            h, w = current.shape[:2]
            _write_level(tiff, _array_tiles(current, tile_size), w, h, mpp * 2**level, level, tile_size, quality)
            last, level = max(w, h), level + 1
            if last > min_level_size:
                current = _half(current)


def _write_level(tiff: tifffile.TiffWriter, tiles: Iterator[np.ndarray], width: int, height: int, mpp: float,
                 level: int, tile_size: int, quality: int) -> None:
    per_cm = 1e4 / mpp
    tiff.write(tiles, shape=(height, width, 3), dtype=np.uint8, tile=(tile_size, tile_size),
               photometric="rgb", compression="jpeg", compressionargs={"level": quality}, subsampling=(1, 1),
               resolution=(per_cm, per_cm), resolutionunit="CENTIMETER", subfiletype=0 if level == 0 else 1,
               description="python_task pyramidal TIFF" if level == 0 else None, metadata=None,
               buffersize=_ENCODE_BUFFER)


def _level0_tiles(width: int, height: int, read_block: ReadBlock, tile_size: int,
                  level1: np.ndarray) -> Iterator[np.ndarray]:
    """Level-0 tiles in row-major order, filling ``level1`` with their 2x2 means on the way."""
    for y in range(0, height, tile_size):
        for x in range(0, width, tile_size):
            w, h = min(tile_size, width - x), min(tile_size, height - y)
            block = np.asarray(read_block(x, y, w, h))
            if block.shape != (h, w, 3) or block.dtype != np.uint8:
                raise ValueError(f"read_block({x}, {y}, {w}, {h}) returned {block.dtype} {block.shape}, "
                                 f"expected uint8 {(h, w, 3)}")
            small = _half(block)
            level1[y // 2:y // 2 + small.shape[0], x // 2:x // 2 + small.shape[1]] = small
            yield _pad(block, tile_size)


def _array_tiles(image: np.ndarray, tile_size: int) -> Iterator[np.ndarray]:
    height, width = image.shape[:2]
    for y in range(0, height, tile_size):
        for x in range(0, width, tile_size):
            yield _pad(image[y:y + tile_size, x:x + tile_size], tile_size)


def _pad(block: np.ndarray, tile_size: int) -> np.ndarray:
    """Edge tiles padded by repeating the last row/column (no JPEG ringing at the image border)."""
    h, w = block.shape[:2]
    if h == tile_size and w == tile_size:
        return np.ascontiguousarray(block)
    return np.pad(block, ((0, tile_size - h), (0, tile_size - w), (0, 0)), mode="edge")


def _half(image: np.ndarray, rows: int = 64) -> np.ndarray:
    """2x2 mean (rounded), ``rows`` output rows at a time to keep the 16-bit temporaries small; an odd last
    row/column is averaged with itself."""
    h, w = image.shape[:2]
    out = np.empty(((h + 1) // 2, (w + 1) // 2) + image.shape[2:], dtype=np.uint8)
    for y in range(0, out.shape[0], rows):
        block = image[2 * y:2 * (y + rows)]
        bh, bw = block.shape[:2]
        if bh % 2 or bw % 2:
            block = np.pad(block, ((0, bh % 2), (0, bw % 2)) + ((0, 0),) * (block.ndim - 2), mode="edge")
        a = block.astype(np.uint16)
        s = a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]
        out[y:y + rows] = (s + 2) >> 2
        del a, s  # before the next strip is allocated
    return out


def write_array_tiff(path: str | Path, rgb: np.ndarray, mpp: float, **kw: Any) -> None:
    """:func:`write_pyramidal_tiff` of an in-memory RGB image (height, width, 3)."""
    rgb = _as_rgb(rgb)
    height, width = rgb.shape[:2]
    write_pyramidal_tiff(path, width, height, lambda x, y, w, h: rgb[y:y + h, x:x + w], mpp, **kw)


def write_mirrored_copy(path: str | Path, source_rgb: np.ndarray, width: int, height: int, mpp: float,
                        **kw: Any) -> None:
    """A ``width`` x ``height`` slide tiling ``source_rgb`` with mirror reflections (so no seam shows),
    streamed through :func:`write_pyramidal_tiff`: makes large benchmark slides from real pixels."""
    source = _as_rgb(source_rgb)
    sh, sw = source.shape[:2]

    def read_block(x: int, y: int, w: int, h: int) -> np.ndarray:
        return source[np.ix_(_mirror_index(y, h, sh), _mirror_index(x, w, sw))]

    write_pyramidal_tiff(path, width, height, read_block, mpp, **kw)


def _mirror_index(start: int, length: int, period: int) -> np.ndarray:
    """Indices ``start .. start+length`` folded into ``[0, period)`` as 0,1,..,p-1,p-1,..,1,0,0,1,.."""
    i = np.arange(start, start + length) % (2 * period)
    return np.where(i < period, i, 2 * period - 1 - i)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB(A) uint8 image, got {image.dtype} {image.shape}")
    return image[..., :3]
