"""Pathologists' annotation files to shapely geometries in level-0 pixel coordinates.

Three formats are read, recognised from the file's content (never its name):

* QuPath GeoJSON: a ``FeatureCollection``, a bare JSON array of Features, or a single Feature, as every QuPath
  from 0.2 to 0.7 writes it (object types, classes and derived classes in each version's form, below).
* ASAP XML (``<ASAP_Annotations>``), as written by ASAP and the CAMELYON challenges.
* Aperio ImageScope XML (``<Annotations>`` of layers of ``<Region>``), usually without an ``<?xml?>`` line.

Any of them may come gzip-compressed (QuPath's ``.geojson.gz`` export, since 0.4) or in a ZIP archive (QuPath's
``.zip`` export, since 0.3: one ``<name>.geojson`` entry; the GeoJSON entries of an archive are read together).

QuPath's object types, as ``PathObjectTypeAdapter.read`` in ``qupath-core/.../io/QuPathTypeAdapters.java`` resolves
them (v0.4.0 to v0.7.0; ``PathObjectTypeAdapters.java`` in v0.3): ``properties.objectType`` (written since 0.4), else
``properties.object_type`` (written by 0.3), else ``properties.type``, else the feature's ``id`` when it is a Java
class name (0.2 wrote ``"id": "PathCellObject"``); anything else is an annotation. Only annotations are regions:
cells, detections, tiles, TMA cores and the root are skipped and counted.

QuPath's classes: ``{"name": "Tumor"}`` (every version), ``{"names": ["Tumor", "Positive"]}`` (a derived class, 0.4
and later, ``GsonTools.PathClassTypeAdapter``), ``{"parentClass": {"name": "Tumor"}, "name": "Positive"}`` (a
derived class as 0.2 and 0.3 serialise ``PathClass``), or a plain string ``"Tumor: Positive"``. A derived class is
kept whole: ``class_name`` ``"Tumor: Positive"`` (QuPath's own spelling) and ``class_parts`` ``("Tumor",
"Positive")``, so a labels file may name either the derived class or its base.

Every polygon is repaired (:func:`shapely.make_valid`, polygonal parts only); empty or zero-area shapes, points
and lines are skipped. Exclusions (ASAP exclusion groups, ImageScope ``NegativeROA`` regions) are subtracted
from the positive regions they overlap and are not returned themselves.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import functools
import gzip
import io
import json
import logging
import math
import os
import stat
import threading
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import shapely
import shapely.errors
from shapely import affinity
from shapely.geometry import MultiPolygon, Point, Polygon, box
from shapely.geometry.base import BaseGeometry

from python_task.errors import AnnotationError, ConfigError
from python_task.fileio import open_without_waiting

log = logging.getLogger(__name__)

FORMATS = ("qupath", "asap", "imagescope")
_NOT_ANNOTATIONS = "not a QuPath GeoJSON, ASAP XML or Aperio ImageScope XML file"

# ASAP group names that mark areas to cut out of the positive annotations (compared casefolded). CAMELYON16
# puts tumour in groups "_0"/"_1" and non-tumour areas inside them in "_2".
EXCLUSION_GROUPS = frozenset({"negative", "exclusion", "exclusions", "exclude", "excluded", "trash", "_2"})
_ASAP_AREA_TYPES = frozenset({"polygon", "rectangle", "spline"})
# QuPath's object types (casefolded) by the names its versions write: v0.3+ ``objectType``/``object_type`` values,
# and the Java class names v0.2 put in the feature's ``id`` (LEGACY_TYPE_IDS in QuPathTypeAdapters.java). An
# unrecognised name is an annotation, as in QuPath ("Unknown object type {}, I will create an annotation").
_QUPATH_TYPES = {"annotation": "annotation", "pathannotationobject": "annotation",
                 "detection": "detection", "pathdetectionobject": "detection",
                 "cell": "cell", "pathcellobject": "cell",
                 "tile": "tile", "pathtileobject": "tile",
                 "tma_core": "tma_core", "tmacore": "tma_core", "tmacoreobject": "tma_core",
                 "root": "root", "pathrootobject": "root"}
_QUPATH_LEGACY_IDS = frozenset({"PathAnnotationObject", "PathDetectionObject", "PathCellObject", "PathTileObject",
                                "TMACoreObject", "PathRootObject"})
# Machine output (e.g. predict's tiles.geojson), returned as regions only with ``include_detections``.
_QUPATH_DETECTIONS = frozenset({"detection", "cell", "tile"})
QUPATH_CLASS_DELIMITER = ":"  # PathClass.DELIMITER: "Tumor: Positive" is the class Positive derived from Tumor
# The most bytes an annotation file may hold, and a compressed one unpack to: parsing takes about ten times as much
# memory, and a damaged or hostile file must not fill it. PYTHON_TASK_MAX_ANNOTATION_BYTES overrides.
MAX_ANNOTATION_BYTES = 512 << 20
MAX_ANNOTATION_BYTES_ENV = "PYTHON_TASK_MAX_ANNOTATION_BYTES"


@dataclass(frozen=True)
class Region:
    """One annotated area.

    ``index`` is the region's position among those :func:`read_annotations` returned (file order); it is
    kept unchanged by :func:`translate_regions` and :func:`clip_regions` so it always points back to the file.
    """

    index: int
    class_name: str
    geometry: BaseGeometry
    source_format: str
    name: str | None = None
    color: tuple[int, int, int] | None = None
    class_parts: tuple[str, ...] = ()  # a QuPath derived class, base first: ("Tumor", "Positive")

    @property
    def class_path(self) -> tuple[str, ...]:
        """The class as its parts, base first; a class that is not derived is one part (none when unclassified)."""
        if self.class_parts:
            return self.class_parts
        return (self.class_name,) if self.class_name else ()

    def describe(self) -> str:
        """``region 3 (Tumor)``: how messages refer to this region."""
        label = self.class_name or self.name or ""
        return f"region {self.index} ({label})" if label else f"region {self.index}"


class _Invalid(Exception):
    """A malformed element inside a file; turned into a :class:`AnnotationError` naming the file."""


# --------------------------------------------------------------------------------------------------------------
# Public API


def detect_format(path: str | Path) -> str:
    """Return ``'qupath'``, ``'asap'`` or ``'imagescope'`` from the file's content; AnnotationError otherwise."""
    return _load_bounded(Path(path))[0]


def read_annotations(path: str | Path, *, include_detections: bool = False) -> list[Region]:
    """Read every polygonal annotation in ``path`` (format detected from content), repaired and non-empty.

    QuPath objects that are not annotations (cells, detections, tiles, TMA cores: machine output such as a cell
    detection or ``predict``'s tiles) are skipped, and their count logged; with ``include_detections`` cells,
    detections and tiles are returned too.

    Raises :class:`AnnotationError` naming the file when it is missing, unreadable, of another format, malformed,
    or holds no polygonal annotation at all.
    """
    path = Path(path)
    fmt, content = _load_bounded(path)
    skipped: Counter[str] = Counter()
    try:
        if fmt == "qupath":
            shapes = list(_parse_qupath(content, include_detections=include_detections, skipped=skipped))
        elif fmt == "asap":
            shapes = _parse_asap(content)
        else:
            shapes = _parse_imagescope(content)
    except _Invalid as exc:
        raise AnnotationError(path, str(exc)) from None
    except shapely.errors.GEOSException as exc:  # a geometry GEOS cannot process: the file is at fault
        raise AnnotationError(path, f"a region's geometry cannot be processed ({' '.join(str(exc).split())})") \
            from None
    except MemoryError:
        raise AnnotationError(path, "out of memory while reading its regions: simplify its largest polygons") \
            from None
    if skipped:
        log.info("%s: skipped %d QuPath objects that are not annotations (%s)", path, sum(skipped.values()),
                 ", ".join(f"{n} {kind}" for kind, n in skipped.most_common()))
    regions = []
    for i, (cls, geom, name, color) in enumerate(shapes):
        parts = cls if isinstance(cls, tuple) else ((cls,) if cls else ())  # QuPath gives a class's parts
        regions.append(Region(index=i, class_name=": ".join(parts), geometry=geom, source_format=fmt, name=name,
                              color=color, class_parts=parts if len(parts) > 1 else ()))
    if not regions:
        raise AnnotationError(path, f"no polygon annotation found in this {_FORMAT_NAMES[fmt]} file "
                              "(points, lines and zero-area shapes are ignored)")
    return regions


def translate_regions(regions: Sequence[Region], dx: float, dy: float) -> list[Region]:
    """Shift every region by ``(dx, dy)`` pixels, e.g. ``(-x0, -y0)`` to pair a whole-slide annotation
    with a crop whose origin is at level-0 ``(x0, y0)``."""
    return [dataclasses.replace(r, geometry=affinity.translate(r.geometry, xoff=dx, yoff=dy)) for r in regions]


def scale_regions(regions: Sequence[Region], factor: float) -> list[Region]:
    """Multiply every coordinate by ``factor`` (about the origin), e.g. to move annotations between scans."""
    return [dataclasses.replace(r, geometry=affinity.scale(r.geometry, factor, factor, origin=(0, 0)))
            for r in regions]


def clip_regions(regions: Sequence[Region], width: int, height: int,
                 path: str | Path | None = None) -> tuple[list[Region], list[str]]:
    """Clip regions to the slide ``[0, width] x [0, height]``.

    Returns the regions that keep some area (indices unchanged) and one warning per region clipped or
    dropped. Raises ``AnnotationError(path, ...)`` when every region lies outside the slide.
    """
    bounds = box(0, 0, width, height)
    size = f"{width}x{height}"
    kept: list[Region] = []
    warnings: list[str] = []
    for region in regions:
        if bounds.contains(region.geometry):
            kept.append(region)
            continue
        try:
            clipped = _polygonal(region.geometry.intersection(bounds), region.describe())
        except _Invalid as exc:
            raise AnnotationError(path, str(exc)) from None
        if clipped.is_empty:
            warnings.append(f"{region.describe()} lies outside the slide ({size}): dropped")
        else:
            warnings.append(f"{region.describe()} lies partly outside the slide ({size}): clipped")
            kept.append(dataclasses.replace(region, geometry=clipped))
    if regions and not kept:
        raise AnnotationError(path, f"every region lies outside the slide ({size})")
    return kept, warnings


def place_regions(regions: Sequence[Region], width: int, height: int, *, offset: tuple[float, float] = (0.0, 0.0),
                  path: str | Path | None = None) -> list[Region]:
    """The regions as they lie on a slide of ``width`` x ``height`` level-0 px: shifted by ``offset`` (annotations
    drawn on a parent slide), then clipped to the slide, with a logged warning per region clipped or dropped.
    Raises ``AnnotationError(path, ...)`` when every region lies outside the slide."""
    if tuple(offset) != (0.0, 0.0):
        regions = translate_regions(regions, *offset)
    kept, warnings = clip_regions(regions, width, height, path=path)
    for warning in warnings:
        log.warning("%s: %s", path, warning)
    return kept


# --------------------------------------------------------------------------------------------------------------
# Reading and format detection

_FORMAT_NAMES = {"qupath": "QuPath GeoJSON", "asap": "ASAP XML", "imagescope": "Aperio ImageScope XML"}


def _load_bounded(path: Path) -> tuple[str, Any]:
    """:func:`_load`, with an allocation that fails blamed on the annotation file (not on the slide it goes with)."""
    try:
        return _load(path)
    except MemoryError:
        raise AnnotationError(path, "out of memory while reading this annotation file: simplify or split it "
                              f"(its size is bounded by {MAX_ANNOTATION_BYTES_ENV})") from None


def _load(path: Path) -> tuple[str, Any]:
    """Read ``path`` and return its format with the parsed document (JSON object or XML root element); a gzip file
    or a ZIP archive is unpacked first."""
    limit = max_annotation_bytes()
    data = _read_bytes(path, limit)
    if data.startswith(_GZIP_MAGIC):
        return _parse_bytes(path, _gunzip(path, data, limit), packed=True)
    if data.startswith(_ZIP_MAGIC):
        return _load_zip(path, data, limit)
    return _parse_bytes(path, data)


def max_annotation_bytes() -> int:
    """The most bytes an annotation file may hold or unpack to: :data:`MAX_ANNOTATION_BYTES`, or the whole number
    of bytes ``PYTHON_TASK_MAX_ANNOTATION_BYTES`` gives (``ConfigError`` naming it when that is not one)."""
    text = os.environ.get(MAX_ANNOTATION_BYTES_ENV, "").strip()
    if not text:
        return MAX_ANNOTATION_BYTES
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value.is_integer() and value >= 1):
        raise ConfigError(MAX_ANNOTATION_BYTES_ENV, f"must be a positive whole number of bytes, got {text!r}")
    return int(value)


def _too_large(path: Path, what: str, limit: int) -> AnnotationError:
    return AnnotationError(path, f"{what} more than the {_size(limit)} an annotation file may hold: simplify or split "
                           f"it, or raise {MAX_ANNOTATION_BYTES_ENV} (bytes)")


def _size(n: int) -> str:
    """``512 MiB``, ``1.5 GiB``, ``100 bytes``: a byte count as messages show it."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.4g} {unit}"
    return f"{n} bytes"


_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # an archive with entries, an empty archive


def _gunzip(path: Path, data: bytes, limit: int) -> bytes:
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as fh:
            out = fh.read(limit + 1)
    except (OSError, EOFError, ValueError) as exc:  # BadGzipFile is an OSError; a truncated stream an EOFError
        raise AnnotationError(path, f"damaged gzip file ({exc})") from None
    if len(out) > limit:
        raise _too_large(path, "gzip file unpacks to", limit)
    return out


def _load_zip(path: Path, data: bytes, limit: int) -> tuple[str, Any]:
    """A ZIP archive, as QuPath's export writes it (one ``<name>.geojson`` entry) or holding several files: every
    entry that is an annotation file is read; GeoJSON entries are merged, in archive order. An archive of XML
    files must hold exactly one."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        entries = [info for info in archive.infolist() if not info.is_dir()
                   and not any(part.startswith((".", "__MACOSX")) for part in info.filename.split("/"))]
        documents: list[tuple[str, str, Any]] = []
        total = 0
        for info in entries:
            with archive.open(info) as fh:
                content = fh.read(limit + 1 - total)
            total += len(content)
            if total > limit:
                raise _too_large(path, "ZIP archive unpacks to", limit)
            if content.startswith(_GZIP_MAGIC):
                content = _gunzip(path, content, limit)
            try:
                fmt, doc = _parse_bytes(path, content)
            except AnnotationError as exc:
                log.debug("%s: ZIP entry %s skipped: %s", path, info.filename, exc.cause)
                continue
            documents.append((info.filename, fmt, doc))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, OSError,
            EOFError) as exc:  # RuntimeError: an encrypted entry
        raise AnnotationError(path, f"damaged or unsupported ZIP archive ({exc})") from None
    names = ", ".join(info.filename for info in entries[:5]) + (" ..." if len(entries) > 5 else "")
    if not documents:
        raise AnnotationError(path, f"ZIP archive without an annotation file ({len(entries)} entries"
                              f"{': ' + names if entries else ''})")
    geojson = [doc for _, fmt, doc in documents if fmt == "qupath"]
    if geojson:
        for name, fmt, _ in documents:
            if fmt != "qupath":
                log.warning("%s: ZIP entry %s (%s) ignored beside the GeoJSON entries", path, name, _FORMAT_NAMES[fmt])
        return "qupath", [feature for doc in geojson for feature in _all_features(doc)]
    if len(documents) > 1:
        raise AnnotationError(path, f"ZIP archive holds {len(documents)} XML annotation files "
                              f"({', '.join(name for name, _, _ in documents[:5])}); unpack it and give one")
    return documents[0][1], documents[0][2]


def _parse_bytes(path: Path, data: bytes, packed: bool = False) -> tuple[str, Any]:
    """The format and parsed document of an annotation file's bytes (UTF-8 or UTF-16, with or without a byte-order
    mark: the JSON and XML parsers read the encoding from the bytes themselves)."""
    first = _first_character(data)
    if not first:
        raise AnnotationError(path, "empty file")
    if first in ("{", "["):
        return "qupath", _load_geojson(path, data)
    if first == "<":
        root = _load_xml(path, data)
        tag = _local(root.tag)
        if tag == "ASAP_Annotations":
            return "asap", root
        if tag == "Annotations" and all(_local(child.tag) == "Annotation" for child in root):
            return "imagescope", root
        raise AnnotationError(path, f"{_NOT_ANNOTATIONS} (XML root element <{tag}>)")
    raise AnnotationError(path, f"{_NOT_ANNOTATIONS} ({'unpacked content is ' if packed else ''}neither JSON "
                          "nor XML)")


_BLANK = " \t\r\n\ufeff"  # what may come before a document's first character (a byte-order mark, whitespace)


def _first_character(data: bytes) -> str:
    """The first character that is not blank, in the encoding the first bytes show (a byte-order mark, or the
    zero bytes of UTF-16 and UTF-32 text, as ``json.detect_encoding`` and the XML spec's appendix F read them);
    ``""`` for a blank file."""
    decoder = codecs.getincrementaldecoder(json.detect_encoding(data[:4]))(errors="replace")
    step = 1 << 16
    for start in range(0, len(data), step):
        text = decoder.decode(data[start:start + step]).lstrip(_BLANK)
        if text:
            return text[0]
    return ""


def _check_regular_file(path: Path, status: os.stat_result, limit: int) -> int:
    """The size of a regular file within the limit; AnnotationError for anything else."""
    if stat.S_ISDIR(status.st_mode):
        raise AnnotationError(path, "is a directory, not an annotation file")
    if not stat.S_ISREG(status.st_mode):
        raise AnnotationError(path, "not a regular file (a device, FIFO or socket): give the annotation file itself")
    if status.st_size > limit:
        raise _too_large(path, f"{_size(status.st_size)},", limit)
    return status.st_size


def _read_bytes(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes. Anything else is refused before it is read: a
    device (``/dev/zero`` never ends), a FIFO (it waits for a writer for ever), a directory, a larger file."""
    try:
        fd, status = open_without_waiting(path)
    except FileNotFoundError:
        raise AnnotationError(path, "file not found") from None
    except OSError as exc:
        raise AnnotationError(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        size = _check_regular_file(path, status, limit)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as fh:
        try:
            data = fh.read(size)  # a read of `limit` bytes would reserve them all at once
            while len(data) <= limit and (more := fh.read(min(1 << 20, limit + 1 - len(data)))):
                data += more  # the file grew since it was measured (or, like /proc's, has no size)
        except OSError as exc:
            raise AnnotationError(path, f"cannot read: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise _too_large(path, "the file is", limit)
    return data


def _load_geojson(path: Path, data: bytes) -> Any:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise AnnotationError(path, f"{_NOT_ANNOTATIONS} (invalid JSON: {exc})") from None
    if not _looks_like_geojson(doc):
        raise AnnotationError(path, f"{_NOT_ANNOTATIONS} (JSON without GeoJSON features)")
    return doc


def _looks_like_geojson(doc: Any) -> bool:
    if isinstance(doc, list):
        return all(isinstance(f, dict) and ("geometry" in f or f.get("type") == "Feature") for f in doc)
    if isinstance(doc, dict):
        return doc.get("type") in ("FeatureCollection", "Feature", "Polygon", "MultiPolygon",
                                   "GeometryCollection") or "features" in doc
    return False


def _load_xml(path: Path, data: bytes) -> ET.Element:
    try:
        return ET.fromstring(data)
    except ET.ParseError as exc:
        raise AnnotationError(path, f"{_NOT_ANNOTATIONS} (malformed XML: {exc})") from None


def _local(tag: Any) -> str:
    """Tag name without an XML namespace (``{ns}Region`` -> ``Region``)."""
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _children(element: ET.Element, name: str) -> Iterator[ET.Element]:
    return (child for child in element if _local(child.tag) == name)


def _child(element: ET.Element, name: str) -> ET.Element | None:
    return next(_children(element, name), None)


# --------------------------------------------------------------------------------------------------------------
# Geometry helpers

# class (a name, or for QuPath the parts of a derived class), geometry, name, colour
_Shape = tuple[str | tuple[str, ...], BaseGeometry, str | None, tuple[int, int, int] | None]


MAX_VERTICES = 1_000_000  # per region; PYTHON_TASK_MAX_VERTICES overrides
REPAIR_SECONDS = 20.0  # per region repair; PYTHON_TASK_REPAIR_SECONDS overrides (0: no limit)


def _limit(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def _check_vertices(n: int, where: str) -> None:
    """Refuse a region with more vertices than the limit, before any geometry work on it."""
    limit = int(_limit("PYTHON_TASK_MAX_VERTICES", MAX_VERTICES))
    if n > limit:
        raise _Invalid(f"{where}: {n:,} vertices, more than the {limit:,} a region may have: simplify it in the "
                       "annotation tool (or raise PYTHON_TASK_MAX_VERTICES)")


@functools.lru_cache(maxsize=1)
def _geos_c() -> Any:
    """The GEOS C library shapely runs on (found among the process's mapped files), whose
    ``GEOS_interruptRequest`` stops a running operation; None where it cannot be found (then no time budget)."""
    try:
        import ctypes

        with open("/proc/self/maps", encoding="utf-8") as fh:
            paths = sorted({line.split()[-1] for line in fh if "libgeos_c" in line and "/" in line})
        for path in paths:
            lib = ctypes.CDLL(path)
            if hasattr(lib, "GEOS_interruptRequest") and hasattr(lib, "GEOS_interruptCancel"):
                return lib
    except OSError:
        pass
    return None


@contextlib.contextmanager
def _time_budget(seconds: float) -> Iterator[Callable[[], bool]]:
    """Interrupt the GEOS operation running in the block after ``seconds`` (it then raises a GEOSException);
    yields a function telling whether the budget ran out. GEOS's interrupt flag is process-wide: geometry work
    of other threads at that instant would be interrupted too (annotations are read in one thread)."""
    lib = _geos_c()
    if lib is None or not seconds > 0:
        yield lambda: False
        return
    fired = threading.Event()

    def interrupt() -> None:
        fired.set()
        lib.GEOS_interruptRequest()

    timer = threading.Timer(seconds, interrupt)
    timer.daemon = True
    timer.start()
    try:
        yield fired.is_set
    finally:
        timer.cancel()
        timer.join()
        if fired.is_set():
            lib.GEOS_interruptCancel()  # the operation may have ended just before: no later one must see it


def _bounded(operation: Callable[[], BaseGeometry], geom: BaseGeometry, where: str, what: str) -> BaseGeometry:
    """``operation()`` on ``geom`` within the vertex limit and the time budget (a clear :class:`_Invalid`
    naming the region otherwise)."""
    n = int(shapely.get_num_coordinates(geom))
    _check_vertices(n, where)
    seconds = _limit("PYTHON_TASK_REPAIR_SECONDS", REPAIR_SECONDS)
    with _time_budget(seconds) as expired:
        try:
            return operation()
        except shapely.errors.GEOSException:
            if not expired():
                raise
    raise _Invalid(f"{where}: {what} ({n:,} vertices) took more than {seconds:g} s: the polygon crosses itself "
                   "too often; simplify or redraw it in the annotation tool (or raise PYTHON_TASK_REPAIR_SECONDS)")


def _polygonal(geom: BaseGeometry, where: str = "a region") -> BaseGeometry:
    """Repair ``geom`` and keep only its polygonal parts: a valid Polygon or MultiPolygon, or an empty Polygon.

    The repair is ``make_valid`` with the ``structure`` method (shells united, holes subtracted: what an annotator
    means by a self-crossing outline, and some hundred times faster than ``linework`` on a large polygon with a few
    crossings), bounded by :data:`MAX_VERTICES` and :data:`REPAIR_SECONDS` per region."""
    if geom.is_empty:
        return Polygon()
    if not geom.is_valid:
        geom = _bounded(lambda: shapely.make_valid(geom, method="structure", keep_collapsed=False), geom, where,
                        "repairing this self-intersecting polygon")
    if isinstance(geom, Polygon | MultiPolygon):
        return geom if geom.area > 0 else Polygon()
    parts = [p for p in shapely.get_parts(geom) if isinstance(p, Polygon | MultiPolygon) and p.area > 0]
    if not parts:
        return Polygon()
    merged = _bounded(lambda: shapely.unary_union(parts), geom, where, "merging the repaired parts")
    return merged if isinstance(merged, Polygon | MultiPolygon) else _polygonal(merged, where)


def _ring(points: Iterable[Any], where: str) -> list[tuple[float, float]]:
    """Coordinates as ``(x, y)`` floats; raises :class:`_Invalid` for anything that is not a number."""
    ring = []
    for point in points:
        try:
            x, y = float(point[0]), float(point[1])
        except (TypeError, ValueError, IndexError, KeyError):
            raise _Invalid(f"{where}: coordinate {point!r} is not an [x, y] pair of numbers") from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise _Invalid(f"{where}: coordinate {point!r} is not finite")
        ring.append((x, y))
    return ring


def _polygon(shell: list[tuple[float, float]], holes: Sequence[list[tuple[float, float]]] = (),
             where: str = "a region") -> BaseGeometry:
    """A repaired polygon, or an empty one when the shell cannot enclose any area.

    A polygon whose rings are valid together is kept as it is. Otherwise its shell and its holes are repaired
    apart and the holes cut out of the shell: a hole only ever removes area, the part of it outside the shell
    none. (Repairing the rings together, ``make_valid`` adds a hole lying outside its shell to the area.)"""
    _check_vertices(len(shell) + sum(map(len, holes)), where)
    if len(set(shell)) < 3:
        return Polygon()
    holes = [h for h in holes if len(set(h)) >= 3]
    polygon = Polygon(shell, holes)
    if not holes or polygon.is_valid:
        return _polygonal(polygon, where)
    area = _polygonal(Polygon(shell), where)
    cut = [part for part in (_polygonal(Polygon(hole), where) for hole in holes) if not part.is_empty]
    if area.is_empty or not cut:
        return area
    merged = _bounded(lambda: shapely.unary_union(cut), polygon, where, "merging its holes")
    return _subtract(area, _polygonal(merged, where), where)


def _subtract(positive: BaseGeometry, negative: BaseGeometry | None, where: str = "a region") -> BaseGeometry:
    if negative is None or negative.is_empty or not positive.intersects(negative):
        return positive
    return _polygonal(_bounded(lambda: positive.difference(negative), positive, where, "cutting out the exclusions"),
                      where)


def _argb_to_rgb(value: int) -> tuple[int, int, int]:
    """QuPath 0.2 packs colours in a signed 32-bit ARGB int (``-16711936`` is opaque green)."""
    value &= 0xFFFFFFFF
    return (value >> 16) & 255, (value >> 8) & 255, value & 255


def _rgb(value: Any) -> tuple[int, int, int] | None:
    """``[r, g, b]`` (optionally with alpha) or a packed ARGB int; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return _argb_to_rgb(value)
    if isinstance(value, list | tuple) and len(value) >= 3:
        try:
            rgb = tuple(int(c) for c in value[:3])
        except (TypeError, ValueError):
            return None
        if all(0 <= c <= 255 for c in rgb):
            return rgb[0], rgb[1], rgb[2]
    return None


def _hex_rgb(value: str | None) -> tuple[int, int, int] | None:
    """``#F4FA58`` (ASAP) to ``(244, 250, 88)``."""
    text = (value or "").strip().lstrip("#")
    if len(text) not in (6, 8):
        return None
    try:
        packed = int(text[-6:], 16)
    except ValueError:
        return None
    return (packed >> 16) & 255, (packed >> 8) & 255, packed & 255


# --------------------------------------------------------------------------------------------------------------
# QuPath GeoJSON


def _parse_qupath(doc: Any, *, include_detections: bool = False,
                  skipped: Counter[str] | None = None) -> Iterator[_Shape]:
    for number, feature in enumerate(_all_features(doc)):
        if not isinstance(feature, dict):
            raise _Invalid(f"feature {number} is not a JSON object")
        props = feature.get("properties") or {}
        if not isinstance(props, dict):
            props = {}
        object_type = _qupath_object_type(feature, props)
        if object_type != "annotation" and not (include_detections and object_type in _QUPATH_DETECTIONS):
            log.debug("feature %d skipped: QuPath %s object, not an annotation", number, object_type)
            if skipped is not None:
                skipped[object_type] += 1
            continue
        geometry = _geojson_geometry(feature.get("geometry"), f"feature {number}")
        if geometry is None:
            log.debug("feature %d skipped: no polygon geometry", number)
            continue
        if geometry.is_empty:
            log.debug("feature %d skipped: empty or zero-area polygon", number)
            continue
        parts, color = _qupath_class(props)
        name = props.get("name")
        yield parts, geometry, (str(name) if name not in (None, "") else None), color


def _all_features(doc: Any) -> list[Any]:
    """Every Feature of a GeoJSON document, with the ``childObjects`` (or ``children``) QuPath nests inside a
    feature's properties when it writes a hierarchy (v0.4+) listed after their parent."""
    out: list[Any] = []
    stack = list(reversed(_features(doc)))
    while stack:
        feature = stack.pop()
        out.append(feature)
        props = feature.get("properties") if isinstance(feature, dict) else None
        if isinstance(props, dict):
            children = props.get("childObjects", props.get("children"))
            if isinstance(children, list):
                stack.extend(reversed(children))
    return out


def _features(doc: Any) -> list[Any]:
    if isinstance(doc, list):
        return doc
    if doc.get("type") == "Feature":
        return [doc]
    if "features" in doc:
        features = doc["features"]
        if not isinstance(features, list):
            raise _Invalid("'features' is not a list")
        return features
    return [{"type": "Feature", "geometry": doc, "properties": {}}]  # a bare geometry


def _geojson_geometry(geom: Any, where: str) -> BaseGeometry | None:
    """A repaired (Multi)Polygon, an empty Polygon when it encloses no area, or None for other types."""
    if not isinstance(geom, dict):
        return None
    kind = geom.get("type")
    coords = geom.get("coordinates")
    if kind == "Polygon":
        return _geojson_polygon(coords, where)
    if kind == "MultiPolygon":
        if not isinstance(coords, list):
            raise _Invalid(f"{where}: MultiPolygon coordinates are not a list")
        parts = [_geojson_polygon(p, where) for p in coords]
        return _polygonal(shapely.unary_union([p for p in parts if not p.is_empty]), where) if parts else Polygon()
    if kind == "GeometryCollection":
        parts = [_geojson_geometry(g, where) for g in geom.get("geometries") or []]
        polygons = [p for p in parts if p is not None and not p.is_empty]
        if not polygons:
            return None if all(p is None for p in parts) else Polygon()
        return _polygonal(shapely.unary_union(polygons), where)
    log.debug("%s: %s geometry is not an area", where, kind)
    return None


def _geojson_polygon(coords: Any, where: str) -> BaseGeometry:
    if not isinstance(coords, list) or not all(isinstance(ring, list) for ring in coords):
        raise _Invalid(f"{where}: Polygon coordinates are not a list of rings")
    if not coords:
        return Polygon()
    rings = [_ring(ring, where) for ring in coords]
    return _polygon(rings[0], rings[1:], where)


def _qupath_object_type(feature: dict[str, Any], props: dict[str, Any]) -> str:
    """``annotation``, ``detection``, ``cell``, ``tile``, ``tma_core`` or ``root``, read as QuPath reads it: the
    first of ``objectType``, ``object_type`` and ``type`` in the properties, else a v0.2 class name in ``id``."""
    for key in ("objectType", "object_type", "type"):
        if key in props:
            value = props[key]
            return _QUPATH_TYPES.get(str(value).strip().casefold(), "annotation")
    feature_id = feature.get("id")
    if isinstance(feature_id, str) and feature_id in _QUPATH_LEGACY_IDS:
        return _QUPATH_TYPES[feature_id.casefold()]
    return "annotation"


def _qupath_class(props: dict[str, Any]) -> tuple[tuple[str, ...], tuple[int, int, int] | None]:
    """A feature's class as its parts (base first) and its colour: the classification's, else the object's own
    name and colour. Reads every form QuPath writes (see the module docstring)."""
    classification = props.get("classification")
    parts: tuple[str, ...] = ()
    color = None
    if isinstance(classification, dict):
        parts = _qupath_class_parts(classification)
        color = _rgb(classification.get("color")) or _rgb(classification.get("colorRGB"))
    elif isinstance(classification, str):
        parts = _split_class(classification)
    if not parts:
        name = str(props.get("name") or "").strip()
        parts = (name,) if name else ()
    color = color or _rgb(props.get("color")) or _rgb(props.get("colorRGB"))
    return parts, color


def _qupath_class_parts(classification: dict[str, Any]) -> tuple[str, ...]:
    names = classification.get("names")
    if isinstance(names, list):  # v0.4+: a derived class as the list of its names
        return tuple(part for name in names for part in _split_class(name))
    parts: list[str] = []
    seen = 0
    node: Any = classification
    while isinstance(node, dict) and seen < 64:  # v0.2/v0.3: the leaf, its parentClass, and so on up to the base
        parts[:0] = _split_class(node.get("name"))
        node = node.get("parentClass")
        seen += 1
    return tuple(parts)


def _split_class(value: Any) -> tuple[str, ...]:
    """``"Tumor: Positive"`` -> ``("Tumor", "Positive")``, as ``PathClass.fromString`` splits a class name."""
    if value is None or isinstance(value, dict | list):
        return ()
    return tuple(part for part in (" ".join(p.split()) for p in str(value).split(QUPATH_CLASS_DELIMITER)) if part)


# --------------------------------------------------------------------------------------------------------------
# ASAP XML


def _parse_asap(root: ET.Element) -> list[_Shape]:
    groups = _asap_groups(root)
    positives: list[_Shape] = []
    exclusions: list[BaseGeometry] = []
    for number, annotation in enumerate(root.iter("Annotation")):
        name = annotation.get("Name")
        where = f"annotation {name!r}" if name else f"annotation {number}"
        kind = (annotation.get("Type") or "").strip().lower()
        if kind not in _ASAP_AREA_TYPES:
            log.debug("%s skipped: type %r is not an area", where, annotation.get("Type"))
            continue
        geometry = _asap_geometry(annotation, kind, where)
        if geometry.is_empty:
            log.debug("%s skipped: encloses no area", where)
            continue
        group = (annotation.get("PartOfGroup") or "").strip()
        if _is_exclusion(group, groups):
            exclusions.append(geometry)
            continue
        color = _hex_rgb(annotation.get("Color")) or _hex_rgb(groups.get(group, (None, None))[1])
        positives.append(("" if group.lower() == "none" else group, geometry, name, color))
    if not exclusions:
        return positives
    cut = shapely.unary_union(exclusions)
    out = []
    for class_name, geometry, name, color in positives:
        geometry = _subtract(geometry, cut, f"annotation {name!r}")
        if geometry.is_empty:
            log.debug("annotation %r skipped: entirely inside an exclusion", name)
            continue
        out.append((class_name, geometry, name, color))
    return out


def _asap_groups(root: ET.Element) -> dict[str, tuple[str, str | None]]:
    """Group name -> (parent group name, colour) from ``<AnnotationGroups>``."""
    groups = {}
    for group in root.iter("Group"):
        name = (group.get("Name") or "").strip()
        if name:
            groups[name] = ((group.get("PartOfGroup") or "").strip(), group.get("Color"))
    return groups


def _is_exclusion(group: str, groups: dict[str, tuple[str, str | None]]) -> bool:
    """True when ``group`` or one of the groups it belongs to is an exclusion group."""
    seen = set()
    while group and group not in seen:
        if group.casefold() in EXCLUSION_GROUPS:
            return True
        seen.add(group)
        group = groups.get(group, ("", None))[0]
    return False


def _asap_geometry(annotation: ET.Element, kind: str, where: str) -> BaseGeometry:
    coordinates = annotation.find("Coordinates")
    items = [] if coordinates is None else list(coordinates.iter("Coordinate"))
    keyed = []
    for position, item in enumerate(items):
        order_text = item.get("Order")
        try:
            order = float(order_text) if order_text is not None else position
        except ValueError:
            raise _Invalid(f"{where}: coordinate Order={order_text!r} is not a number") from None
        keyed.append((order, position, (item.get("X"), item.get("Y"))))
    keyed.sort(key=lambda k: (k[0], k[1]))
    points = _ring((xy for _, _, xy in keyed), where)
    if kind == "rectangle" and len(points) == 2:  # two opposite corners
        (x0, y0), (x1, y1) = points
        return _polygonal(box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), where)
    # A spline is approximated by the polygon through its control points.
    return _polygon(points, where=where)


# --------------------------------------------------------------------------------------------------------------
# Aperio ImageScope XML


def _parse_imagescope(root: ET.Element) -> list[_Shape]:
    shapes: list[_Shape] = []
    for layer_number, layer in enumerate(_children(root, "Annotation"), start=1):
        layer_class = (layer.get("Name") or "").strip() or _first_attribute_value(layer)
        color = _bgr_to_rgb(layer.get("LineColor"))
        regions_element = _child(layer, "Regions")
        regions = [] if regions_element is None else list(_children(regions_element, "Region"))
        positives: list[tuple[str, BaseGeometry, str | None]] = []
        holes: list[BaseGeometry] = []
        for region in regions:
            where = f"layer {layer.get('Id', layer_number)} region {region.get('Id', '?')}"
            geometry = _imagescope_geometry(region, where)
            if geometry.is_empty:
                log.debug("%s skipped: encloses no area (ruler, arrow or line)", where)
                continue
            if (region.get("NegativeROA") or "0").strip() == "1":
                holes.append(geometry)
                continue
            text = (region.get("Text") or "").strip()
            positives.append((layer_class or text, geometry, text or None))
        if not positives:
            log.debug("layer %s skipped: no positive region with an area", layer.get("Id", layer_number))
            continue
        cut = shapely.unary_union(holes) if holes else None
        for class_name, geometry, name in positives:
            geometry = _subtract(geometry, cut, f"layer {layer.get('Id', layer_number)} region {name or class_name!r}")
            if not geometry.is_empty:
                shapes.append((class_name, geometry, name, color))
    return shapes


def _first_attribute_value(layer: ET.Element) -> str:
    attributes = _child(layer, "Attributes")
    for attribute in [] if attributes is None else _children(attributes, "Attribute"):
        value = (attribute.get("Value") or "").strip()
        if value:
            return value
    return ""


def _bgr_to_rgb(value: str | None) -> tuple[int, int, int] | None:
    """ImageScope's ``LineColor`` is a Windows COLORREF, 0x00BBGGRR (``65280`` is green, ``255`` red)."""
    try:
        packed = int((value or "").strip())
    except ValueError:
        return None
    return packed & 255, (packed >> 8) & 255, (packed >> 16) & 255


def _imagescope_geometry(region: ET.Element, where: str) -> BaseGeometry:
    vertices_element = _child(region, "Vertices")
    vertices = [] if vertices_element is None else list(_children(vertices_element, "Vertex"))
    points = _ring(((v.get("X"), v.get("Y")) for v in vertices), where)
    kind = (region.get("Type") or "").strip().lower()
    shape = (region.get("GeoShape") or "").strip().lower()
    if len(points) == 2 and (kind == "2" or shape == "ellipse"):  # ellipse given by its bounding box
        (x0, y0), (x1, y1) = points
        rx, ry = abs(x1 - x0) / 2, abs(y1 - y0) / 2
        if rx == 0 or ry == 0:
            return Polygon()
        circle = Point((x0 + x1) / 2, (y0 + y1) / 2).buffer(1.0, quad_segs=32)
        return _polygonal(affinity.scale(circle, rx, ry), where)
    return _polygon(points, where=where)
