"""QuPath's exports of every version, as QuPath writes them: object types, derived classes, gzip and ZIP.

The files in ``fixtures/qupath/`` were written by QuPath's own classes (v0.2.3, v0.3.2, v0.5.1, v0.7.0; see the
README there); ``qupath_exports`` writes the same structure for any content (its docstring cites the source).
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import re
import zipfile
from pathlib import Path

import pytest
from shapely.geometry import Polygon

from python_task.errors import TaskError
from python_task.wsi.annotations import read_annotations
from python_task.wsi.labels import build_label_map, label_regions, load_label_map
from tests.wsi.qupath_exports import QuPathObject, export, feature, packed_rgb, square, write_export

FIXTURES = Path(__file__).parent / "fixtures" / "qupath"
EXPORTS = ["qupath-0.2.3.json", "qupath-0.3.2.geojson", "qupath-0.3.2.zip", "qupath-0.5.1.geojson",
           "qupath-0.5.1.geojson.gz", "qupath-0.5.1.zip", "qupath-0.7.0.geojson.gz"]
ANNOTATION_CLASSES = ["Cholangiocarcinoma", "Cholangiocarcinoma: Grade 2", "Biliary adenoma"]
SKIPPED = "skipped 16 QuPath objects that are not annotations (6 cell, 5 detection, 5 tile)"
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _fixture_objects() -> list[QuPathObject]:
    """The 19 objects of ``fixtures/qupath`` (made by QuPath's own code, see ``fixtures/qupath/README.md``)."""
    objects = [
        QuPathObject("annotation", [square(0, 0, 1024), square(384, 384, 256)], ("Cholangiocarcinoma",),
                     name="CCA region", color=(0, 255, 0)),
        QuPathObject("annotation", [square(1024, 0, 1024)], ("Cholangiocarcinoma", "Grade 2")),
        QuPathObject("annotation", [[(0, 1024), (2048, 1024), (2048, 2048), (0, 2048), (0, 1024)]],
                     ("Biliary adenoma",)),
    ]
    k = 0
    for y in range(128, 2048, 512):
        for x in range(128, 2048, 512):
            cell = [square(x - 12, y - 12, 24)]
            if k % 3 == 0:
                obj = QuPathObject("cell", cell, ("Tumor", "Positive") if k % 2 == 0 else ("Tumor",),
                                   nucleus=[square(x - 5, y - 5, 10)])
            elif k % 3 == 1:
                obj = QuPathObject("detection", cell, ("Cholangiocarcinoma",))
            else:
                obj = QuPathObject("tile", [square(x - 16, y - 16, 32)], ("Biliary adenoma",))
            obj.measurements = {"Nucleus: Area": 78.5 + k}
            objects.append(obj)
            k += 1
    return objects


def _load_features(path: Path) -> list[dict]:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    elif path.suffix == ".zip":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            (name,) = archive.namelist()
            assert name == path.name[:-4] + ".geojson"  # QuPath's entry name
            data = archive.read(name)
    doc = json.loads(data)
    return doc if isinstance(doc, list) else doc["features"]


def _shape(value, key: str = ""):
    """A feature's structure and values with what differs between runs blanked: coordinates, UUIDs, and the
    random colours QuPath gives new classes."""
    if key == "coordinates":
        return "coordinates"
    if key in ("color", "colorRGB") and value != [0, 255, 0]:
        return "colour"
    if isinstance(value, dict):
        return [(k, _shape(v, k)) for k, v in value.items()]
    if isinstance(value, list):
        return [_shape(v) for v in value]
    if isinstance(value, str) and _UUID.fullmatch(value):
        return "uuid"
    return value


@pytest.mark.parametrize("name, version", [("qupath-0.2.3.json", "0.2"), ("qupath-0.3.2.geojson", "0.3"),
                                           ("qupath-0.5.1.geojson", "0.5"), ("qupath-0.7.0.geojson.gz", "0.7")])
def test_the_test_exporter_writes_what_qupath_writes(name: str, version: str) -> None:
    written = _load_features(FIXTURES / name)
    ours = [feature(obj, version) for obj in _fixture_objects()]
    assert [_shape(f) for f in ours] == [_shape(f) for f in written]
    if version == "0.2":
        assert (FIXTURES / name).read_text().startswith("[\n  {\n    \"type\": \"Feature\",")
        assert export(_fixture_objects(), version).startswith("[\n  {\n    \"type\": \"Feature\",")


# ---------------------------------------------------------------------------------------------------------
# Reading what each version writes


@pytest.mark.parametrize("name", EXPORTS)
def test_every_export_gives_the_annotations_only(name: str, caplog) -> None:
    path = FIXTURES / name
    with caplog.at_level(logging.INFO, logger="python_task"):
        regions = read_annotations(path)
    assert [r.class_name for r in regions] == ANNOTATION_CLASSES
    assert regions[1].class_parts == ("Cholangiocarcinoma", "Grade 2")
    assert regions[0].class_path == ("Cholangiocarcinoma",) and regions[0].class_parts == ()
    assert regions[0].name == "CCA region" and regions[0].color is not None
    cca = regions[0].geometry
    assert isinstance(cca, Polygon) and len(cca.interiors) == 1 and cca.area == 1024**2 - 256**2
    assert regions[2].geometry.bounds == (0, 1024, 2048, 2048)
    assert any(SKIPPED in r.getMessage() and path.name in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", ["qupath-0.2.3.json", "qupath-0.3.2.geojson", "qupath-0.5.1.geojson.gz"])
def test_detections_on_request(name: str) -> None:
    regions = read_annotations(FIXTURES / name, include_detections=True)
    assert len(regions) == 19
    assert {r.class_name for r in regions[3:]} == {"Tumor", "Tumor: Positive", "Cholangiocarcinoma",
                                                   "Biliary adenoma"}


def test_an_export_with_cells_extracts_like_annotations_alone(synth_cohort, tmp_path: Path) -> None:
    """The issue's case: QuPath 0.3's "export all objects" (annotations plus small classified cells and
    detections) gives the same tiles as the file of annotations alone."""
    from python_task.shards.extract import extract_slide
    from python_task.shards.format import ShardReader
    from python_task.wsi.cohort import read_cohort

    job = read_cohort(synth_cohort)[0]
    doc = json.loads(Path(job.annotation_path).read_text())
    objects = []
    for f in doc["features"]:
        rings = f["geometry"]["coordinates"]
        objects.append(QuPathObject("annotation", rings, (f["properties"]["classification"]["name"],)))
        x0, y0 = Polygon(rings[0]).representative_point().coords[0]
        for dx in range(0, 200, 40):  # cells of the other class inside the region: overlaps if read as regions
            cell = [square(x0 + dx - 6, y0 - 6, 12)]
            other = "Biliary adenoma" if objects[-1].classes[0] == "Cholangiocarcinoma" else "Cholangiocarcinoma"
            objects.append(QuPathObject("cell", cell, (other,), nucleus=[square(x0 + dx - 3, y0 - 3, 6)]))
            objects.append(QuPathObject("detection", cell, objects[-2].classes))
    reference = extract_slide(job, tmp_path / "reference")
    for version, name in (("0.2", "v02.json"), ("0.3", "v03.geojson"), ("0.5", "v05.geojson.gz")):
        exported = write_export(tmp_path / name, objects, version)
        result = extract_slide(type(job)(**{**job.__dict__, "annotation_path": exported}), tmp_path / version)
        assert result.n_tiles == reference.n_tiles > 0 and result.counts == reference.counts, version
        with ShardReader(tmp_path / version / f"{job.slide_id}.h5") as a, \
                ShardReader(tmp_path / "reference" / f"{job.slide_id}.h5") as b:
            assert (a.field("coords") == b.field("coords")).all()


# ---------------------------------------------------------------------------------------------------------
# The object type, as QuPath resolves it


def _typed(tmp_path: Path, features: list[dict]) -> list[str]:
    path = tmp_path / "typed.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return [r.name for r in read_annotations(path)]


def _f(name: str, feature_id=None, **props) -> dict:
    out = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square(0, 0, 10)]},
           "properties": {"name": name, **props}}
    if feature_id is not None:
        out["id"] = feature_id
    return out


def test_object_type_precedence_follows_qupath(tmp_path: Path) -> None:
    """QuPathTypeAdapters.java (v0.4.0-v0.7.0), PathObjectTypeAdapter.read: objectType, else object_type, else
    type; the v0.2 class name in ``id`` counts only when none of them is there; an unknown name is an
    annotation."""
    features = [
        _f("cell 0.3", object_type="cell"), _f("cell 0.2", "PathCellObject"), _f("det", type="detection"),
        _f("tile", "PathTileObject"), _f("tma", objectType="tmaCore"), _f("tma 0.3", object_type="tma_core"),
        _f("kept: objectType wins", "PathCellObject", objectType="annotation", object_type="cell"),
        _f("kept: 0.2 annotation", "PathAnnotationObject"),
        _f("kept: unknown type", objectType="something"),
        _f("kept: uuid id", "0b5f5a2e-8c9c-4e0e-9a59-4f3f0a0e8f11"),
        _f("skipped: object_type over type", object_type="detection", type="annotation"),
    ]
    assert _typed(tmp_path, features) == ["kept: objectType wins", "kept: 0.2 annotation", "kept: unknown type",
                                          "kept: uuid id"]


def test_hierarchy_children_are_read(tmp_path: Path) -> None:
    """A hierarchy (the root object, v0.4+) nests objects in ``properties.childObjects``."""
    child = _f("child", objectType="annotation")
    cell = _f("cell", objectType="cell")
    parent = _f("parent", objectType="annotation", childObjects=[child, cell])
    root = {"type": "Feature", "geometry": None, "properties": {"objectType": "root", "childObjects": [parent]}}
    assert _typed(tmp_path, [root]) == ["parent", "child"]


# ---------------------------------------------------------------------------------------------------------
# Classes and derived classes, and the labels file


@pytest.mark.parametrize("classification", [
    {"names": ["Cholangiocarcinoma", "Grade 2"], "color": [1, 2, 3]},  # v0.4+
    {"parentClass": {"name": "Cholangiocarcinoma", "colorRGB": -8320558}, "name": "Grade 2",
     "colorRGB": -4125185},  # v0.2, v0.3
    {"name": "Cholangiocarcinoma: Grade 2", "color": [1, 2, 3]},  # PathClass.fromString
    {"name": "Cholangiocarcinoma:Grade 2", "color": [1, 2, 3]},
    "Cholangiocarcinoma: Grade 2",  # a classification given as a string
], ids=["names", "parentClass", "name", "name-no-space", "string"])
def test_derived_class_forms(tmp_path: Path, classification) -> None:
    path = tmp_path / "derived.geojson"
    path.write_text(json.dumps([_f("region", objectType="annotation", classification=classification)]))
    (region,) = read_annotations(path)
    assert region.class_name == "Cholangiocarcinoma: Grade 2"
    assert region.class_parts == ("Cholangiocarcinoma", "Grade 2")
    assert region.name == "region"  # the name no longer stands in for a class it could not read


def test_three_level_class_from_parent_chain(tmp_path: Path) -> None:
    classification = {"parentClass": {"parentClass": {"name": "A", "colorRGB": -1}, "name": "B", "colorRGB": -1},
                      "name": "C", "colorRGB": packed_rgb((1, 2, 3))}
    path = tmp_path / "three.json"
    path.write_text(json.dumps([_f("r", "PathAnnotationObject", classification=classification)]))
    (region,) = read_annotations(path)
    assert region.class_parts == ("A", "B", "C") and region.color == (1, 2, 3)


@pytest.mark.parametrize("name", ["qupath-0.2.3.json", "qupath-0.3.2.zip", "qupath-0.5.1.geojson.gz"])
@pytest.mark.parametrize("labels, expected", [
    # the base class maps every class derived from it
    ("malignant: [Cholangiocarcinoma]\nbenign: [Biliary adenoma]\n", ["malignant", "malignant", "benign"]),
    # the derived class listed by its full name, base unlisted: the base region is unknown -> ignored here
    ("malignant: ['Cholangiocarcinoma: Grade 2']\nbenign: [Biliary adenoma]\n", [None, "malignant", "benign"]),
    # the most specific name wins: the derived class ignored, its base mapped
    ("malignant: [Cholangiocarcinoma]\nbenign: [Biliary adenoma]\nignore: ['Cholangiocarcinoma:Grade 2']\n",
     ["malignant", "ignored", "benign"]),
    # a derived class mapped elsewhere than its base
    ("malignant: ['cholangiocarcinoma :  grade 2']\nbenign: [Biliary adenoma, Cholangiocarcinoma]\n",
     ["benign", "malignant", "benign"]),
])
def test_labels_map_derived_classes(tmp_path: Path, name: str, labels: str, expected: list) -> None:
    path = tmp_path / "labels.yaml"
    path.write_text(labels)
    regions = read_annotations(FIXTURES / name)
    labelled, skipped = label_regions(regions, load_label_map(path), ignore_unknown=True)
    got = {item.region.index: item.target for item in labelled}
    for index, want in enumerate(expected):
        assert got.get(index) == (want if want not in (None, "ignored") else None), (index, want)
    if "ignored" in expected:
        assert skipped.get("ignored") == 1


def test_unknown_derived_class_is_named_whole(tmp_path: Path) -> None:
    path = tmp_path / "unknown.geojson"
    path.write_text(json.dumps([_f("r", objectType="annotation",
                                   classification={"names": ["Stroma", "Grade 2"], "color": [1, 2, 3]})]))
    with pytest.raises(TaskError, match=r"unknown class names: 'Stroma: Grade 2'"):
        label_regions(read_annotations(path), build_label_map({"benign": [], "malignant": []}), path=path)


# ---------------------------------------------------------------------------------------------------------
# Compressed files


def test_zip_with_several_geojson_entries_is_merged(tmp_path: Path) -> None:
    objects = _fixture_objects()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.geojson", export(objects[:1], "0.5"))
        archive.writestr("__MACOSX/._a.geojson", b"\x00\x05\x16\x07")
        archive.writestr("sub/b.json", export(objects[1:3], "0.3"))
        archive.writestr("notes.txt", "not annotations")
    path = tmp_path / "two.zip"
    path.write_bytes(buffer.getvalue())
    assert [r.class_name for r in read_annotations(path)] == ANNOTATION_CLASSES


def test_gzip_of_xml_and_zip_of_one_xml(tmp_path: Path) -> None:
    from tests.wsi.test_annotations import ASAP_XML

    xml = ASAP_XML.replace("{exclusion}", "_2").encode()
    gz = tmp_path / "asap.xml.gz"
    gz.write_bytes(gzip.compress(xml))
    assert read_annotations(gz)[0].source_format == "asap"
    archive = tmp_path / "asap.zip"
    with zipfile.ZipFile(archive, "w") as fh:
        fh.writestr("asap.xml", xml)
    assert read_annotations(archive)[0].source_format == "asap"
    with zipfile.ZipFile(archive, "a") as fh:
        fh.writestr("again.xml", xml)
    with pytest.raises(TaskError, match="holds 2 XML annotation files"):
        read_annotations(archive)


@pytest.mark.parametrize("name, content, cause", [
    ("damaged.geojson.gz", gzip.compress(b'{"type": "FeatureCollection", "features": []}')[:-12],
     "damaged gzip file"),
    ("text.gz", gzip.compress(b"hello"), "unpacked content is neither JSON nor XML"),
    ("empty.zip", b"PK\x05\x06" + bytes(18), "ZIP archive without an annotation file"),
    ("truncated.zip", b"PK\x03\x04" + bytes(40), "damaged or unsupported ZIP archive"),
])
def test_bad_compressed_files_are_named(tmp_path: Path, name: str, content: bytes, cause: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(TaskError, match=cause) as excinfo:
        read_annotations(path)
    assert excinfo.value.path == str(path) and "\n" not in str(excinfo.value)


def test_zip_of_text_names_its_entries(tmp_path: Path) -> None:
    path = tmp_path / "notes.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "nothing here")
    with pytest.raises(TaskError, match=r"without an annotation file \(1 entries: readme.txt\)"):
        read_annotations(path)


@pytest.mark.parametrize("version", ["0.2", "0.3", "0.4", "0.5", "0.6", "0.7"])
@pytest.mark.parametrize("name", ["qupath-0.2.3.json", "qupath-0.3.2.zip", "qupath-0.5.1.geojson.gz"])
def test_import_emulation_agrees_with_qupath(version: str, name: str) -> None:
    """``qupath_import`` gives what QuPath's own readers made of these files (run for real, every
    version from 0.2.3 to 0.7.0: 3 annotations, 6 cells, 5 detections, 5 tiles, derived classes whole,
    ``Nucleus: Area`` on the 16 others), for the versions that can open each file at all."""
    from collections import Counter

    from tests.wsi.qupath_exports import qupath_import

    if (name.endswith(".gz") and version < "0.4") or (not name.endswith(".json") and version == "0.2"):
        pytest.skip("this QuPath cannot open that file (no gzip before 0.4; 0.2 reads a JSON text only)")
    made = [qupath_import(f, version) for f in _load_features(FIXTURES / name)]
    assert Counter(kind for kind, _, _ in made) == {"PathAnnotationObject": 3, "PathCellObject": 6,
                                                    "PathDetectionObject": 5, "PathTileObject": 5}
    assert {cls for _, cls, _ in made} == {"Cholangiocarcinoma", "Cholangiocarcinoma: Grade 2", "Biliary adenoma",
                                            "Tumor", "Tumor: Positive"}
    assert sum(1 for _, _, m in made if set(m) == {"Nucleus: Area"}) == 16


def test_encrypted_zip_is_named(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("a.geojson", export(_fixture_objects()[:1], "0.5"))
    data = bytearray(buffer.getvalue())
    data[6] |= 1  # general-purpose flag bit 0 (encrypted), local header ...
    central = data.rfind(b"PK\x01\x02")
    data[central + 8] |= 1  # ... and central directory
    path = tmp_path / "locked.zip"
    path.write_bytes(bytes(data))
    with pytest.raises(TaskError, match="damaged or unsupported ZIP archive .*encrypted"):
        read_annotations(path)
