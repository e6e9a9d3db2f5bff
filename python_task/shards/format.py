"""The HDF5 tile shard: one file per slide, written atomically, readable with plain h5py.

Layout (``docs/formats.md``): datasets ``images``, ``coords``, ``labels``, ``roi``, ``coverage``, ``tissue``, each
with ``units`` and ``description`` attributes (:data:`DATASET_ATTRS`), and file attributes ``codec``,
``slide_id``, ``patient_id``, ``slide_path``, ``label_names``, ``tile_size``, ``mpp``, ``level``, ``downsample``,
``format_version``, ``params``. Only HDF5's built-in filters are used (deflate and the Fletcher-32 checksum), so
plain h5py opens every dataset without plugins.

Integrity (format 2): every dataset HDF5 can filter carries its per-chunk Fletcher-32 checksum, which HDF5 checks
on every read; the JPEG bytes of a ``jpeg`` shard (variable-length data, which HDF5 cannot filter) have a CRC-32
each in ``images_crc32``, checked here whenever tiles are read. A failed check, or a tile that does not decode, is
a :class:`ShardError` naming the shard, the dataset and the tile. Format-1 shards (no checksums) still read.

Reading opens a shard as plain ``h5py.File(path, "r")`` does, with HDF5 file locking where the filesystem offers
it (``locking="best-effort"``, which HDF5 treats as the same setting), so a user's own h5py and this reader can
hold one shard open in the same process; where locking fails (NFS or Lustre without a lock service, a shard
another process holds locked, or one already open without locking in this process) it reads without locking:
shards are immutable once renamed into place.

Writing goes through :class:`GuardedFile` (h5py's file-object driver) rather than HDF5's own POSIX driver: HDF5
does not survive a failed write (a full disk, a quota): its metadata cache is left half-flushed, closing the file
fails, and freeing the objects of that file later crashes the process (SIGSEGV, measured with HDF5 1.14.6 on a
full tmpfs). The guard keeps what the operating system refuses in memory instead, so HDF5 finishes and closes
the file normally; the writer then reports the refusal (:class:`NoSpaceError` for a full disk) and deletes the
temporary file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import h5py
import imagecodecs
import numpy as np
from h5py import h5s, h5t

from python_task.errors import ConfigError, ShardError
from python_task.fileio import atomic_path, dumps_strict
from python_task.shards.params import CODECS

FORMAT_VERSION = 2  # the file attribute format_version of the shards written here (2: checksums)
# Units and meaning of each dataset, stored as its ``units`` and ``description`` attributes.
DATASET_ATTRS: dict[str, tuple[str, str]] = {
    "images": ("RGB, 8 bits per channel",
               "the tiles, row i = tile i: codec raw, uint8 (N, T, T, 3); codec jpeg, one JPEG file per row "
               "(variable-length uint8) that decodes to (T, T, 3); T = the tile_size file attribute, at mpp "
               "micrometres per pixel"),
    "images_crc32": ("CRC-32 (zlib)", "codec jpeg only: the CRC-32 of each row of images, checked on every read"),
    "coords": ("level-0 pixels",
               "x, y of each tile's top-left corner on the slide's level 0 (full resolution, origin top left); the "
               "tile covers [x, x + tile_size * downsample) x [y, y + tile_size * downsample) level-0 px"),
    "labels": ("class index", "the tile's target class: an index into the label_names file attribute (JSON list)"),
    "roi": ("region index",
            "the annotation region the tile was cut from: its position among the polygonal annotations read "
            "from the slide's annotation file, in file order, from 0"),
    "coverage": ("fraction, 0 to 1", "fraction of the tile's area inside its region"),
    "tissue": ("fraction, 0 to 1", "fraction of the tile's area that is tissue (the slide's tissue mask)"),
}
SHARD_SUFFIX = ".h5"
FIELDS = ("coords", "labels", "roi", "coverage", "tissue")  # the per-tile datasets beside ``images``
CHECKSUMS = "images_crc32"  # CRC-32 of each stored JPEG file (codec jpeg, format 2)
_RAW_GZIP_LEVEL = 4


def encode_jpeg(tile: np.ndarray, quality: int = 90) -> np.ndarray:
    """JPEG bytes of an RGB tile, 4:4:4 chroma (4:2:0 caps fidelity near 34 dB on H&E; 4:4:4 at quality 90 gives
    40 dB or more, tests/shards/test_format.py)."""
    data = imagecodecs.jpeg8_encode(np.ascontiguousarray(tile), level=quality, subsampling="444")
    return np.frombuffer(data, dtype=np.uint8)


def decode_jpeg(data: np.ndarray | bytes) -> np.ndarray:
    return imagecodecs.jpeg8_decode(np.asarray(data, dtype=np.uint8).tobytes())


def crc32(data: np.ndarray | bytes) -> int:
    """CRC-32 of a stored tile's bytes (``zlib``; releases the GIL on large buffers)."""
    return zlib.crc32(memoryview(np.ascontiguousarray(data)).cast("B") if isinstance(data, np.ndarray) else data)


class ShardVersionError(ShardError):
    """A shard written by a newer version of the program: not damaged, only unreadable here."""


NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # a full disk, or the user's quota


class NoSpaceError(ShardError):
    """The output folder ran out of space (or quota) while a shard was written: ``path`` is the folder. Not the
    slide's fault, and every other slide would meet it too."""


class GuardedFile:
    """The file a shard is written through (h5py's ``fileobj`` driver), which never lets HDF5 see a failed write.

    After the first write the operating system refuses (``error``), this write and every later one are kept in
    memory (``held``) and reads see them, so HDF5's state stays consistent and it closes the file normally; the
    caller checks ``error`` and discards the file. What is held is bounded by what HDF5 writes after the failure:
    the rest of one batch and the file's metadata."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0))
        self._pos = 0
        self._size = 0
        self.error: OSError | None = None
        self.held: list[tuple[int, bytes]] = []

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = base + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        written = 0
        if self.error is None:
            try:
                while written < len(view):
                    written += os.pwrite(self._fd, view[written:], self._pos + written)
            except OSError as exc:
                self.error = exc
        if written < len(view):
            self.held.append((self._pos + written, bytes(view[written:])))
        self._pos += len(view)
        self._size = max(self._size, self._pos)
        return len(view)

    def readinto(self, buffer: bytearray | memoryview) -> int:
        view = memoryview(buffer).cast("B")
        n = len(view)
        data = os.pread(self._fd, n, self._pos)
        view[:len(data)] = data
        view[len(data):] = bytes(n - len(data))  # beyond the end of what reached the disk: zeros, as HDF5's POSIX driver
        for offset, data in self.held:
            lo, hi = max(offset, self._pos), min(offset + len(data), self._pos + n)
            if lo < hi:
                view[lo - self._pos:hi - self._pos] = data[lo - offset:hi - offset]
        self._pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        buffer = bytearray(max(0, self._size - self._pos) if size < 0 else size)
        self.readinto(buffer)
        return bytes(buffer)

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        self._size = size
        self.held = [(o, d[:max(0, size - o)]) for o, d in self.held if o < size]
        if self.error is None:
            try:
                os.ftruncate(self._fd, size)
            except OSError as exc:
                self.error = exc
        return size

    def flush(self) -> None:
        """Nothing to do: writes go straight to the file descriptor."""

    def close(self) -> None:
        os.close(self._fd)
        self.held = []


@dataclass(frozen=True)
class ShardInfo:
    """The file attributes of a shard, typed."""

    path: Path
    slide_id: str
    patient_id: str
    slide_path: str
    diagnosis: str
    codec: str
    label_names: tuple[str, ...]
    tile_size: int
    mpp: float
    level: int
    downsample: float
    n_tiles: int
    params: dict[str, Any]
    annotation_path: str = ""


class ShardWriter:
    """Append tiles to a new shard; it appears under its final name only when :meth:`close` succeeds.

    Use as a context manager: an exception inside the block deletes the temporary file.
    """

    def __init__(self, path: str | os.PathLike[str], *, codec: str, tile_size: int, attrs: dict[str, Any],
                 quality: int = 90) -> None:
        if codec not in CODECS:
            raise ConfigError("codec", f"unknown codec {codec!r}; choose from {', '.join(CODECS)}", path=path)
        self.path = Path(path)
        self.codec = codec
        self.tile_size = tile_size
        self.quality = quality
        self._attrs = attrs
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        self._guard: GuardedFile | None = None
        try:
            self._guard = GuardedFile(self._tmp)
            self._file = h5py.File(self._guard, "w")
        except BaseException:
            self._discard()
            raise
        self._n = 0
        self._create_datasets()
        self._create_checksums()
        self._describe_datasets()

    def _create_datasets(self) -> None:
        t = self.tile_size
        f = self._file
        if self.codec == "raw":
            f.create_dataset("images", shape=(0, t, t, 3), maxshape=(None, t, t, 3), dtype=np.uint8,
                             chunks=(1, t, t, 3), compression="gzip", compression_opts=_RAW_GZIP_LEVEL,
                             shuffle=True, fletcher32=True)
        else:
            f.create_dataset("images", shape=(0,), maxshape=(None,), dtype=h5py.vlen_dtype(np.uint8),
                             chunks=(64,))
        for name, dtype, extra in (("coords", np.int64, (2,)), ("labels", np.int64, ()), ("roi", np.int32, ()),
                                   ("coverage", np.float32, ()), ("tissue", np.float32, ())):
            f.create_dataset(name, shape=(0, *extra), maxshape=(None, *extra), dtype=dtype,
                             chunks=(1024, *extra), fletcher32=True)

    def _create_checksums(self) -> None:
        """HDF5 cannot filter (checksum) variable-length data: a CRC-32 per JPEG file instead."""
        if self.codec == "jpeg":
            self._file.create_dataset(CHECKSUMS, shape=(0,), maxshape=(None,), dtype=np.uint32, chunks=(1024,),
                                      fletcher32=True)

    def _describe_datasets(self) -> None:
        """Units and meaning on every dataset, for a reader with plain h5py (:data:`DATASET_ATTRS`)."""
        for name, (units, description) in DATASET_ATTRS.items():
            if name in self._file:
                self._file[name].attrs["units"] = units
                self._file[name].attrs["description"] = description

    def append(self, tiles: np.ndarray | Sequence[np.ndarray], coords: np.ndarray, labels: np.ndarray,
               roi: np.ndarray, coverage: np.ndarray, tissue: np.ndarray) -> None:
        """Append a batch of RGB tiles (each ``(T, T, 3)`` uint8) with their per-tile fields."""
        n = len(coords)
        if n == 0:
            return
        start, stop = self._n, self._n + n
        f = self._file
        for name in ("images", *FIELDS, *([CHECKSUMS] if CHECKSUMS in f else [])):
            f[name].resize(stop, axis=0)
        if self.codec == "raw":
            f["images"][start:stop] = np.asarray(tiles, dtype=np.uint8)
        else:
            encoded = np.empty(n, dtype=object)
            for i, tile in enumerate(tiles):
                encoded[i] = encode_jpeg(tile, self.quality)
            if n == 1:  # h5py would try to broadcast a lone vlen element
                f["images"][start] = encoded[0]
            else:
                f["images"][start:stop] = encoded
            f[CHECKSUMS][start:stop] = np.array([crc32(e) for e in encoded], dtype=np.uint32)
        f["coords"][start:stop] = np.asarray(coords, dtype=np.int64).reshape(n, 2)
        f["labels"][start:stop] = labels
        f["roi"][start:stop] = roi
        f["coverage"][start:stop] = coverage
        f["tissue"][start:stop] = tissue
        self._n = stop
        self._raise_refused_write()

    def _raise_refused_write(self) -> None:
        """A write the operating system refused (see :class:`GuardedFile`): :class:`NoSpaceError` naming the
        folder for a full disk or quota, else the ``OSError`` itself, naming the shard."""
        error = self._guard.error if self._guard is not None else None
        if error is None:
            return
        code = error.errno or 0
        if code in NO_SPACE_ERRNOS:
            raise NoSpaceError(self.path.parent, f"{os.strerror(code).lower()} (errno {code}) while writing "
                               f"{self.path.name} (the unfinished shard is removed)")
        raise OSError(code, error.strerror or str(error), str(self.path))

    def close(self) -> Path:
        """Write the attributes, close and rename into place (on any failure: delete the temporary file)."""
        try:
            return self._finish()
        except BaseException:
            self.abort()
            raise

    def _finish(self) -> Path:
        attrs = dict(self._attrs)
        attrs.update(codec=self.codec, tile_size=self.tile_size, format_version=FORMAT_VERSION, n_tiles=self._n)
        for key, value in attrs.items():
            if isinstance(value, (dict, list, tuple)):
                value = dumps_strict(value)
            self._file.attrs[key] = value
        self._file.close()  # the guard saw every write HDF5 made at closing: check them before the rename
        self._raise_refused_write()
        self._guard.close()  # type: ignore[union-attr]
        self._guard = None
        self._atomic.__exit__(None, None, None)
        return self.path

    def abort(self) -> None:
        """Close and delete the temporary file."""
        try:
            if self._file.id.valid:
                self._file.close()
        finally:
            self._discard()

    def _discard(self) -> None:
        """Release the guard's file descriptor and delete the temporary file."""
        if self._guard is not None:
            self._guard.close()
            self._guard = None
        err = RuntimeError("shard writing aborted")
        try:
            self._atomic.__exit__(type(err), err, None)
        except RuntimeError:
            pass

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


DAMAGED = "the file changed after extract wrote it (a damaged copy?): copy it again or extract the slide again"


@contextlib.contextmanager
def reading(path: str | os.PathLike[str], dataset: str) -> Iterator[None]:
    """Turn HDF5's read failures inside the block (a chunk failing its Fletcher-32 checksum, damaged metadata)
    into a :class:`ShardError` naming the shard and ``dataset``."""
    try:
        yield
    except ShardError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        text = " ".join(str(exc).split())
        if "filter returned failure" in text:
            cause = f"a chunk fails its Fletcher-32 checksum: {DAMAGED}"
        else:
            cause = f"cannot be read ({type(exc).__name__}: {text}): {DAMAGED}"
        raise ShardError(path, f"dataset {dataset}: {cause}") from None


def check_encoded(path: str | os.PathLike[str], rows: np.ndarray, data: np.ndarray,
                  checksums: np.ndarray | None) -> None:
    """Refuse stored JPEG files (``data``, the bytes of ``rows``) whose CRC-32 differs from ``checksums``
    (the shard's ``images_crc32``; None for a format-1 shard, which has none)."""
    if checksums is None:
        return
    for row, blob in zip(rows, data):
        if crc32(blob) != int(checksums[row]):
            raise ShardError(path, f"dataset images, tile {int(row)}: fails its CRC-32 checksum: {DAMAGED}")


def decode_tile(path: str | os.PathLike[str], row: int, blob: np.ndarray, tile_size: int,
                out: np.ndarray | None = None) -> np.ndarray:
    """Decode one stored JPEG file into a ``(T, T, 3)`` tile (into ``out`` when given); a :class:`ShardError`
    naming the shard and the tile when it does not decode to that shape."""
    try:
        tile = imagecodecs.jpeg8_decode(blob, out=out)
    except Exception as exc:  # noqa: BLE001 - imagecodecs raises its own types (Jpeg8Error) and ValueError
        raise ShardError(path, f"dataset images, tile {int(row)}: does not decode "
                         f"({type(exc).__name__}: {' '.join(str(exc).split())}): {DAMAGED}") from None
    if tile.shape != (tile_size, tile_size, 3):
        raise ShardError(path, f"dataset images, tile {int(row)}: decodes to {tile.shape}, not "
                         f"({tile_size}, {tile_size}, 3): {DAMAGED}")
    return tile


def check_labels(path: str | os.PathLike[str], labels: np.ndarray, label_names: Sequence[str]) -> None:
    """Refuse labels that are not indexes into ``label_names`` (naming the shard and its ``labels`` dataset)."""
    bad = (labels < 0) | (labels >= len(label_names))
    if bad.any():
        values = ", ".join(map(str, np.unique(labels[bad])[:5]))
        raise ShardError(path, f"dataset labels: {int(bad.sum())} of {len(labels)} values ({values}) are not class "
                         f"indexes 0..{len(label_names) - 1} of label_names ({', '.join(label_names)}): the shard "
                         "is damaged; extract the slide again")


def open_shard_file(path: str | os.PathLike[str]) -> h5py.File:
    """Open a shard read-only: with file locking as plain ``h5py.File(path, "r")`` has it where the filesystem
    allows (so both can hold the file open in one process), else without (NFS, a lock held elsewhere)."""
    try:
        return h5py.File(path, "r", locking="best-effort")
    except FileNotFoundError:
        raise ShardError(path, "shard not found") from None
    except ValueError:  # an HDF5 older than 1.10.7 / 1.12.1 has no best-effort locking
        pass
    except OSError as exc:
        if "lock" not in str(exc).lower():
            raise ShardError(path, f"not a readable HDF5 shard ({exc})") from None
    try:
        return h5py.File(path, "r", locking=False)
    except FileNotFoundError:
        raise ShardError(path, "shard not found") from None
    except OSError as exc:
        raise ShardError(path, f"not a readable HDF5 shard ({exc})") from None


def _attr_str(attrs: h5py.AttributeManager, key: str, default: str = "") -> str:
    value = attrs.get(key, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def read_shard_info(path: str | os.PathLike[str]) -> ShardInfo:
    with open_shard_file(path) as f:
        return shard_info_from_file(f, Path(path))


def shard_info_from_file(f: h5py.File, path: Path) -> ShardInfo:
    a = f.attrs
    version = a.get("format_version", 1)
    if isinstance(version, (int, np.integer)) and version > FORMAT_VERSION:
        raise ShardVersionError(path, f"written in shard format {int(version)}, newer than this program reads "
                         f"({FORMAT_VERSION}): update python_task")
    try:
        names = json.loads(_attr_str(a, "label_names", "[]"))
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"label_names {names!r} is not a JSON list of class names")
        return ShardInfo(
            path=path, slide_id=_attr_str(a, "slide_id"), patient_id=_attr_str(a, "patient_id"),
            slide_path=_attr_str(a, "slide_path"), diagnosis=_attr_str(a, "diagnosis"), codec=_attr_str(a, "codec"),
            label_names=tuple(names), tile_size=int(a["tile_size"]),
            mpp=float(a["mpp"]), level=int(a["level"]), downsample=float(a["downsample"]),
            n_tiles=int(f["labels"].shape[0]), params=json.loads(_attr_str(a, "params", "{}")),
            annotation_path=_attr_str(a, "annotation_path"))
    except KeyError as exc:
        raise ShardError(path, f"not a tile shard: missing {exc}") from None
    except (OSError, RuntimeError, ValueError) as exc:
        raise ShardError(path, f"damaged attributes ({type(exc).__name__}: {' '.join(str(exc).split())}): "
                         f"{DAMAGED}") from None


class ShardReader:
    """Random access to the tiles of one shard. Opens lazily, so instances can cross process boundaries."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file: h5py.File | None = None
        self._images: h5py.Dataset | None = None
        self._checksums: np.ndarray | bool | None = None
        self.info = read_shard_info(self.path)

    @classmethod
    def from_info(cls, info: ShardInfo) -> ShardReader:
        """A reader for a shard already described by ``info`` (no file opened until the first read)."""
        reader = cls.__new__(cls)
        reader.path, reader.info, reader._file, reader._images = info.path, info, None, None
        reader._checksums = None
        return reader

    @property
    def file(self) -> h5py.File:
        if self._file is None:
            self._file = open_shard_file(self.path)
        return self._file

    @property
    def images_dataset(self) -> h5py.Dataset:
        """The ``images`` dataset, opened once (re-opening it per read costs a lookup and its chunk cache)."""
        if self._images is None:
            with reading(self.path, "images"):
                self._images = self.file["images"]
        return self._images

    @property
    def checksums(self) -> np.ndarray | None:
        """The CRC-32 of each stored JPEG file (``images_crc32``), read once; None where the shard has none."""
        if self._checksums is None:
            self._checksums = self.field(CHECKSUMS) if CHECKSUMS in self.file else False
        return None if self._checksums is False else self._checksums  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.info.n_tiles

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = state["_images"] = state["_checksums"] = None
        return state

    def field(self, name: str) -> np.ndarray:
        """A whole per-tile field (``coords``, ``labels``, ``roi``, ``coverage``, ``tissue``), checksums checked."""
        with reading(self.path, name):
            return self.file[name][()]

    def images(self, indices: Iterable[int] | slice | None = None) -> np.ndarray:
        """Decoded RGB tiles ``(n, T, T, 3)`` uint8, in the order of ``indices``."""
        ds = self.images_dataset
        if indices is None:
            indices = slice(None)
        if isinstance(indices, slice):
            idx = np.arange(len(self))[indices]
        else:
            idx = np.asarray(list(indices), dtype=np.int64)
        T = self.info.tile_size
        if self.info.codec == "raw":
            order = np.argsort(idx, kind="stable")
            out = np.empty((len(idx), T, T, 3), dtype=np.uint8)
            if len(idx):
                with reading(self.path, "images"):
                    out[order] = ds[idx[order]] if _strictly_increasing(idx[order]) else np.stack(
                        [ds[i] for i in idx[order]])
            return out
        uniq, inverse = np.unique(idx, return_inverse=True)
        with reading(self.path, "images"):
            data = read_encoded_rows(ds, uniq)
        check_encoded(self.path, uniq, data, self.checksums)
        out = np.empty((len(idx), T, T, 3), dtype=np.uint8)
        for k, j in enumerate(inverse):
            decode_tile(self.path, uniq[j], data[j], T, out=out[k])
        return out

    def image(self, i: int) -> np.ndarray:
        return self.images([i])[0]

    def close(self) -> None:
        self._images = self._checksums = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_encoded_rows(images: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """The stored bytes of ``rows`` (sorted, no repeats) of a ``jpeg`` shard's variable-length ``images``: an
    object array of uint8 arrays, one JPEG file each.

    One point selection and one ``H5Dread``, as ``images[rows]`` does but without h5py's fancy-index machinery
    (a hyperslab per row, built in Python), which costs about half as much again as the read itself and, like
    the read, runs under h5py's global lock: the serial part of the reader threads."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty(len(rows), dtype=images.dtype)
    if len(rows):
        fspace = images.id.get_space()
        fspace.select_elements(rows.reshape(-1, 1))
        images.id.read(h5s.create_simple((len(rows),)), fspace, out, _vlen_memory_type(images.dtype))
    return out


@lru_cache(maxsize=4)
def _vlen_memory_type(dtype: np.dtype) -> h5t.TypeID:
    return h5t.py_create(dtype)


def _strictly_increasing(a: np.ndarray) -> bool:
    return bool(np.all(np.diff(a) > 0))


def tile_setting(info: ShardInfo) -> tuple[tuple[str, ...], int, float]:
    """What the shards one model learns from must share: classes, tile size and µm/px."""
    return info.label_names, info.tile_size, round(info.mpp, 6)


def describe_setting(info: ShardInfo) -> str:
    return f"tile size {info.tile_size} px, {info.mpp:g} µm/px, classes {', '.join(info.label_names)}"


def odd_shards(infos: Sequence[ShardInfo]) -> list[tuple[ShardInfo, ShardInfo]]:
    """The shards whose :func:`tile_setting` differs from the one most shards share (ties: the first shard's),
    each with a shard of that common setting: the odd one out is named, never the good ones."""
    if not infos:
        return []
    counts: dict[tuple, int] = {}
    for info in infos:
        counts[tile_setting(info)] = counts.get(tile_setting(info), 0) + 1
    common = max(counts, key=lambda key: (counts[key], key == tile_setting(infos[0])))
    example = next(info for info in infos if tile_setting(info) == common)
    return [(info, example) for info in infos if tile_setting(info) != common]


def odd_shard_cause(odd: ShardInfo, example: ShardInfo, n_common: int) -> str:
    """Why ``odd`` does not belong with the others (one line)."""
    return (f"{describe_setting(odd)}, where {n_common} other shard{'s' * (n_common != 1)} ({example.path.name}"
            f"{', ...' if n_common > 1 else ''}) {'hold' if n_common > 1 else 'holds'} {describe_setting(example)}: a folder holds shards of one "
            "setting; extract this slide again with the folder's settings, or move the shard away")


def shard_path(out_dir: str | os.PathLike[str], slide_id: str) -> Path:
    return Path(out_dir) / f"{slide_id}{SHARD_SUFFIX}"


def list_shards(shards_dir: str | os.PathLike[str]) -> list[Path]:
    """Finished shards in a folder (temporary files of an interrupted run are ignored)."""
    return sorted(p for p in Path(shards_dir).glob(f"*{SHARD_SUFFIX}") if not p.name.startswith("."))
