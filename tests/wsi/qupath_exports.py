"""QuPath's GeoJSON as each version's own code writes it, to build test fixtures of any content.

Read in QuPath's source (github.com/qupath/qupath, ``qupath-core/src/main/java/qupath/lib/``):

* **v0.2.3** ``io/PathObjectTypeAdapters.java``, ``PathObjectTypeAdapter.write``: ``"id"`` is the Java class name
  (``PathAnnotationObject``, ``PathCellObject``, ...: "In v0.2 we unwisely stored object type in an id"); then
  ``geometry``, ``nucleusGeometry`` for a cell, and ``properties``: ``name``; ``color`` ``[r, g, b]``, written
  whenever the name is (an object with a name and no colour makes 0.2.3 fail); ``classification``, Gson's
  reflection of ``objects/classes/PathClass.java`` (fields ``parentClass``, ``name``, ``colorRGB``, a signed ARGB
  int; ``GsonTools.PathClassTypeAdapter``); ``isLocked``; ``measurements`` ``[{"name", "value"}]``, even empty.
  0.2 has no GeoJSON export command: the documented script ``GsonTools.getInstance(true).toJson(objects)`` writes
  a bare JSON array.
* **v0.3.2** same file: no ``id``; ``properties.object_type`` (``annotation``, ``detection``, ``cell``, ``tile``,
  ``tma_core``); ``color`` only when set; ``measurements`` only when not empty. ``io/PathIO.java``
  ``exportObjectsAsGeoJSON``: a FeatureCollection (the export dialog's default), or a ZIP archive with one entry
  ``<name>.geojson`` when the file name ends in ``.zip``.
* **v0.4.0 to v0.7.0** ``io/QuPathTypeAdapters.java``: ``id`` is the object's UUID; ``properties.objectType``;
  ``classification`` ``{"name": ..., "color": [r, g, b]}`` or, for a derived class, ``{"names": [base, ...,
  leaf], "color": ...}`` (``GsonTools.PathClassTypeAdapter.write``); ``isLocked`` only when locked;
  ``measurements`` an object ``{name: value}``. ``PathIO.exportObjectsAsGeoJSON``: ``.zip`` as above, and ``.gz``
  gzip-compressed (the export dialog offers ``.geojson.gz`` since 0.4, ``gui/commands/ExportObjectsCommand.java``).

``tests/wsi/fixtures/qupath/`` holds files written by QuPath's own classes (v0.2.3, v0.3.2, v0.5.1, compiled from
that source; see its README); ``test_qupath_files.py`` checks that this module writes the same structure.
"""

from __future__ import annotations

import gzip
import io
import json
import uuid
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JAVA_CLASSES = {"annotation": "PathAnnotationObject", "detection": "PathDetectionObject", "cell": "PathCellObject",
                "tile": "PathTileObject", "tma_core": "TMACoreObject"}
VERSIONS = ("0.2", "0.3", "0.4", "0.5", "0.6", "0.7")

Ring = Sequence[Sequence[float]]


@dataclass
class QuPathObject:
    """One QuPath object: its type, polygon rings (shell, then holes), class as its parts (base first)."""

    kind: str
    rings: Sequence[Ring]
    classes: tuple[str, ...] = ()
    name: str | None = None
    color: tuple[int, int, int] | None = None
    class_color: tuple[int, int, int] = (200, 0, 0)
    nucleus: Sequence[Ring] | None = None
    measurements: dict[str, float] = field(default_factory=dict)


def packed_rgb(rgb: Sequence[int]) -> int:
    """QuPath's colour int: opaque ARGB as a signed 32-bit Java int (``ColorTools.packRGB``)."""
    value = 0xFF000000 | (rgb[0] << 16) | (rgb[1] << 8) | rgb[2]
    return value - (1 << 32)


def _coords(rings: Sequence[Ring]) -> list[list[list[float]]]:
    return [[[x, y] for x, y in ring] for ring in rings]


def _gson_path_class(classes: Sequence[str], rgb: Sequence[int]) -> dict[str, Any]:
    """``PathClass`` as Gson's reflection writes it in v0.2/v0.3: ``parentClass`` (when derived), ``name``,
    ``colorRGB``."""
    out: dict[str, Any] = {}
    if len(classes) > 1:
        out["parentClass"] = _gson_path_class(classes[:-1], rgb)
    out["name"] = classes[-1]
    out["colorRGB"] = packed_rgb(rgb)
    return out


def feature(obj: QuPathObject, version: str) -> dict[str, Any]:
    """The GeoJSON Feature QuPath ``version`` writes for ``obj`` (keys in QuPath's order)."""
    v = tuple(int(p) for p in version.split(".")[:2])
    out: dict[str, Any] = {"type": "Feature"}
    if v < (0, 3):
        out["id"] = JAVA_CLASSES[obj.kind]
    elif v >= (0, 4):
        out["id"] = str(uuid.uuid4())
    out["geometry"] = {"type": "Polygon", "coordinates": _coords(obj.rings)}
    if obj.kind == "cell" and obj.nucleus is not None:
        out["nucleusGeometry"] = {"type": "Polygon", "coordinates": _coords(obj.nucleus)}
    props: dict[str, Any] = {}
    if v >= (0, 4):
        props["objectType"] = obj.kind
    elif v >= (0, 3):
        props["object_type"] = obj.kind
    if obj.name is not None:
        props["name"] = obj.name
    if v < (0, 3) and obj.name is not None:
        if obj.color is None:
            raise ValueError("QuPath 0.2.3 cannot export a named object without a colour")
        props["color"] = list(obj.color)
    elif v >= (0, 3) and obj.color is not None:
        props["color"] = list(obj.color)
    if obj.classes:
        if v < (0, 4):
            props["classification"] = _gson_path_class(obj.classes, obj.class_color)
        elif len(obj.classes) == 1:
            props["classification"] = {"name": obj.classes[0], "color": list(obj.class_color)}
        else:
            props["classification"] = {"names": list(obj.classes), "color": list(obj.class_color)}
    if v < (0, 4):
        props["isLocked"] = False
    if v < (0, 3):
        props["measurements"] = [{"name": k, "value": x} for k, x in obj.measurements.items()]
    elif obj.measurements:
        props["measurements"] = ([{"name": k, "value": x} for k, x in obj.measurements.items()] if v < (0, 4)
                                 else dict(obj.measurements))
    out["properties"] = props
    return out


def export(objects: Sequence[QuPathObject], version: str) -> str:
    """The text QuPath ``version`` exports: a FeatureCollection (0.3+, the export dialog's default) or, for 0.2,
    the pretty-printed bare array of its export script."""
    features = [feature(obj, version) for obj in objects]
    if version.startswith("0.2"):
        return json.dumps(features, indent=2)
    return json.dumps({"type": "FeatureCollection", "features": features}, separators=(",", ":"))


def write_export(path: Path, objects: Sequence[QuPathObject], version: str) -> Path:
    """Write as QuPath's export does for ``path``'s name: ``.zip`` (one ``<stem>.geojson`` entry), ``.gz``
    (gzip), otherwise plain text."""
    text = export(objects, version)
    if path.name.lower().endswith(".zip"):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(path.name[:-4] + ".geojson", text)
        path.write_bytes(buffer.getvalue())
    elif path.name.lower().endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode("utf-8")))
    else:
        path.write_text(text, encoding="utf-8")
    return path


def square(x: float, y: float, size: float) -> list[tuple[float, float]]:
    return [(x, y), (x + size, y), (x + size, y + size), (x, y + size), (x, y)]


# ---------------------------------------------------------------------------------------------------------
# How each version imports a feature


class QuPathRefuses(Exception):
    """Where QuPath's import throws (its exception named in the message)."""


_LEGACY_IDS = {"PathAnnotationObject", "PathDetectionObject", "PathCellObject", "PathTileObject", "TMACoreObject",
               "PathRootObject"}
_TYPE_CLASSES = {"annotation": "PathAnnotationObject", "detection": "PathDetectionObject", "cell": "PathCellObject",
                 "tile": "PathTileObject", "tma_core": "TMACoreObject", "tmaCore": "TMACoreObject",
                 "root": "PathRootObject", **{name: name for name in _LEGACY_IDS}}


def _gson_class_name(c: dict[str, Any]) -> str:
    parent = c.get("parentClass")
    return f"{_gson_class_name(parent)}: {c['name']}" if isinstance(parent, dict) else str(c.get("name"))


def qupath_import(feature_: dict[str, Any], version: str) -> tuple[str, str | None, dict[str, float]]:
    """The object QuPath ``version`` makes of a feature: its Java class, its class's string and its measurements,
    following ``PathObjectTypeAdapter.read``, ``MeasurementListTypeAdapter.read`` and ``PathClassTypeAdapter.read``
    of that version (files as in the module docstring). Checked against the real readers, run by
    QuPath's own readers, on the two forms of ``tiles.geojson`` (see ``tests/inference/test_predict.py``)."""
    v = tuple(int(p) for p in version.split(".")[:2])
    props = feature_.get("properties") or {}
    feature_id = feature_.get("id")
    if v < (0, 3):
        if feature_id is None:  # String id = obj.get("id").getAsString();
            raise QuPathRefuses("NullPointerException: the feature has no id")
        kind = _TYPE_CLASSES.get(feature_id, "PathAnnotationObject")  # switch (id) ... default: annotation
    else:
        kind_name = feature_id if feature_id in _LEGACY_IDS else "unknown"
        keys = ("objectType", "object_type", "type") if v >= (0, 4) else ("object_type", "type")
        for key in keys:
            if key in props:
                kind_name = props[key]
                break
        kind = _TYPE_CLASSES.get(kind_name, "PathAnnotationObject")
    measurements: dict[str, float] = {}
    raw = props.get("measurements")
    if isinstance(raw, list):
        measurements = {m["name"]: float(m["value"]) for m in raw}
    elif isinstance(raw, dict) and v >= (0, 4):
        measurements = {k: float(x) for k, x in raw.items()}
    if v < (0, 3) and kind == "PathAnnotationObject":
        measurements = {}  # PathObjects.createAnnotationObject(roi, pathClass): no measurement list
    cls = props.get("classification")
    name: str | None = None
    if cls is not None:
        if v < (0, 4):  # Gson's reflection into PathClass
            if not isinstance(cls, dict):
                raise QuPathRefuses("JsonSyntaxException: Expected BEGIN_OBJECT")
            name = _gson_class_name(cls)
        elif isinstance(cls, str):
            name = ": ".join(p.strip() for p in cls.split(":"))
        elif isinstance(cls, dict) and (not cls or "colorRGB" in cls or "parentClass" in cls):
            name = _gson_class_name(cls) if cls else None
        elif isinstance(cls, dict) and ("name" in cls or "names" in cls) and "color" in cls:
            name = cls["name"] if "name" in cls else ": ".join(cls["names"])
        else:
            raise QuPathRefuses("JsonParseException: Unable to parse PathClass")
    return kind, name, measurements
