"""Reading QuPath, ASAP and ImageScope annotation files into repaired shapely regions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from shapely.geometry import MultiPolygon, Polygon, box

from python_task.errors import TaskError
from python_task.wsi.annotations import (
    Region,
    clip_regions,
    detect_format,
    read_annotations,
    scale_regions,
    translate_regions,
)

CMU_CROP_ORIGIN = (42673, 5576)
CMU_CROP_SIZE = (2220, 2967)


def _parts(geom) -> list[Polygon]:
    return list(geom.geoms) if isinstance(geom, MultiPolygon) else [geom]


def _holes(geom) -> int:
    return sum(len(p.interiors) for p in _parts(geom))


def _write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _feature(geometry: dict, **properties) -> dict:
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def _square(x0: float, y0: float, size: float) -> list[list[float]]:
    return [[x0, y0], [x0 + size, y0], [x0 + size, y0 + size], [x0, y0 + size], [x0, y0]]


def _assert_one_line_error(excinfo: pytest.ExceptionInfo[TaskError], path: Path) -> None:
    message = str(excinfo.value)
    assert path.name in message
    assert "\n" not in message
    assert excinfo.value.path == str(path)


# ---------------------------------------------------------------------------------------------------------
# Real files


@pytest.fixture(scope="module")
def qupath_regions(shared_data: Path) -> list[Region]:
    return read_annotations(shared_data / "qupath_CMU-1.json")


def test_qupath_real_file(shared_data: Path, qupath_regions: list[Region]) -> None:
    assert detect_format(shared_data / "qupath_CMU-1.json") == "qupath"
    regions = qupath_regions
    assert len(regions) == 5
    assert [r.index for r in regions] == list(range(5))
    by_class = {r.class_name: r for r in regions}
    assert set(by_class) == {"Tissue", "Tumor_vital", "Makrophage", "mark", "Cyst"}
    for region in regions:
        assert region.source_format == "qupath"
        assert region.geometry.is_valid and not region.geometry.is_empty
        minx, miny, maxx, maxy = region.geometry.bounds
        assert 2486 <= minx and maxx <= 44516 and 1158 <= miny and maxy <= 31274
    tissue = by_class["Tissue"].geometry
    assert isinstance(tissue, MultiPolygon) and len(tissue.geoms) == 4
    assert _holes(tissue) == 3  # parts with 1/1/2/3 rings
    assert isinstance(by_class["Tumor_vital"].geometry, MultiPolygon)
    assert len(by_class["Tumor_vital"].geometry.geoms) == 2
    assert _holes(by_class["mark"].geometry) == 2 and _holes(by_class["Cyst"].geometry) == 2
    assert by_class["Tissue"].color == (83, 47, 31)
    assert by_class["Makrophage"].color == (0, 255, 0)
    assert by_class["Tumor_vital"].color == (26, 51, 153)


def test_qupath_real_file_paired_with_crop(qupath_regions: list[Region]) -> None:
    dx, dy = CMU_CROP_ORIGIN
    moved = translate_regions(qupath_regions, -dx, -dy)
    assert moved[0].geometry.bounds[0] == qupath_regions[0].geometry.bounds[0] - dx
    kept, warnings = clip_regions(moved, *CMU_CROP_SIZE, path="qupath_CMU-1.json")
    assert [r.class_name for r in kept] == ["Tissue"]
    tissue = kept[0]
    assert tissue.index == 0 and not tissue.geometry.is_empty and tissue.geometry.is_valid
    assert box(0, 0, *CMU_CROP_SIZE).buffer(1e-6).contains(tissue.geometry)
    assert 0 < tissue.geometry.area < 2220 * 2967
    assert len(warnings) == 5
    assert any("Tissue" in w and "clipped" in w and "2220x2967" in w for w in warnings)
    assert sum("dropped" in w for w in warnings) == 4


def test_clip_everything_outside_raises(qupath_regions: list[Region]) -> None:
    with pytest.raises(TaskError, match=r"every region lies outside the slide \(100x100\)") as excinfo:
        clip_regions(qupath_regions, 100, 100, path="ann.json")
    assert excinfo.value.path == "ann.json"


def test_clip_keeps_regions_inside_unchanged() -> None:
    inside = Region(0, "a", box(1, 1, 5, 5), "qupath")
    kept, warnings = clip_regions([inside], 10, 10)
    assert kept == [inside] and warnings == []


def test_asap_real_file(shared_data: Path) -> None:
    path = shared_data / "asap_camelyon17_patient_004_node_4.xml"
    assert detect_format(path) == "asap"
    regions = read_annotations(path)
    assert len(regions) == 3
    for region in regions:
        assert region.class_name == "Tumor" and region.source_format == "asap"
        assert isinstance(region.geometry, Polygon) and region.geometry.is_valid
        assert region.geometry.area > 0
        coords = list(region.geometry.exterior.coords)
        assert coords[0] == coords[-1]  # closed by shapely, though not in the file
        minx, miny, maxx, maxy = region.geometry.bounds
        assert 10626.2 <= minx and maxx <= 13482.8 and 75345.3 <= miny and maxy <= 89160.7
    assert regions[0].geometry.exterior.coords[0] == pytest.approx((12711.2998, 88778.1016))
    assert regions[0].name == "Annotation 0" and regions[0].color == (0xF4, 0xFA, 0x58)


def test_imagescope_real_file(shared_data: Path) -> None:
    path = shared_data / "imagescope_NP391-16_PLP_LVC_20x.xml"
    assert detect_format(path) == "imagescope"
    regions = read_annotations(path)
    assert len(regions) == 1  # the 10 zero-area Type=4 rulers of layer 2 are skipped
    region = regions[0]
    assert region.source_format == "imagescope" and region.class_name == ""
    assert region.color == (0, 255, 0)  # LineColor 65280
    geom = region.geometry
    assert geom.is_valid
    outer = Polygon(_parts(geom)[0].exterior)
    # Area="172764736.0" in the file; the three NegativeROA regions (one inside, two across the border)
    # remove about 98792 + 78594 + 48707 px.
    assert geom.area < 172764736.0 - 200_000
    assert geom.area < outer.area
    assert _holes(geom) >= 1
    minx, miny, maxx, maxy = geom.bounds
    assert 31475 <= minx and maxx <= 46966 and 25452 <= miny and maxy <= 41134


def test_broken_svs_is_refused(shared_data: Path) -> None:
    path = shared_data / "broken.svs"
    with pytest.raises(TaskError) as excinfo:
        read_annotations(path)
    _assert_one_line_error(excinfo, path)


# ---------------------------------------------------------------------------------------------------------
# QuPath, synthetic


def test_qupath_feature_collection_with_classes_and_colours(tmp_path: Path) -> None:
    doc = {"type": "FeatureCollection", "features": [
        _feature({"type": "Polygon", "coordinates": [_square(0, 0, 10), _square(2, 2, 2)]},
                 objectType="annotation", classification={"name": "CCA", "color": [255, 0, 0]}),
        _feature({"type": "Polygon", "coordinates": [_square(20, 0, 10)]}, name="Biliary adenoma"),
        _feature({"type": "Polygon", "coordinates": [_square(40, 0, 10)]},
                 classification={"name": "Tumor", "colorRGB": -16711936}),
        _feature({"type": "Point", "coordinates": [5, 5]}, classification={"name": "CCA"}),
        _feature({"type": "LineString", "coordinates": [[0, 0], [5, 5]]}),
        _feature({"type": "MultiPolygon", "coordinates": [[_square(60, 0, 5)], [_square(70, 0, 5)]]},
                 name="my drawing", colorRGB=-65536),
        _feature({"type": "Polygon", "coordinates": [_square(0, 50, 4)]},
                 objectType="detection", classification={"name": "CCA"}),
    ]}
    path = _write(tmp_path, "slide.geojson", json.dumps(doc))
    regions = read_annotations(path)
    assert [r.class_name for r in regions] == ["CCA", "Biliary adenoma", "Tumor", "my drawing"]
    assert [r.index for r in regions] == [0, 1, 2, 3]
    first = regions[0]
    assert first.color == (255, 0, 0) and first.name is None
    assert first.geometry.area == pytest.approx(100 - 4) and _holes(first.geometry) == 1
    assert regions[1].name == "Biliary adenoma" and regions[1].color is None
    assert regions[2].color == (0, 255, 0)  # signed ARGB 0xFF00FF00
    assert isinstance(regions[3].geometry, MultiPolygon) and regions[3].color == (255, 0, 0)
    assert regions[3].name == "my drawing"


def test_qupath_single_feature_and_unclosed_ring(tmp_path: Path) -> None:
    feature = _feature({"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10]]]},
                       classification={"name": "benign"})
    regions = read_annotations(_write(tmp_path, "one.json", json.dumps(feature)))
    assert len(regions) == 1 and regions[0].geometry.area == pytest.approx(50)


def test_qupath_only_points_is_an_error(tmp_path: Path) -> None:
    doc = [_feature({"type": "Point", "coordinates": [1, 2]}, classification={"name": "x"}),
           _feature({"type": "MultiPoint", "coordinates": [[1, 2], [3, 4]]})]
    path = _write(tmp_path, "points.json", json.dumps(doc))
    with pytest.raises(TaskError, match="no polygon annotation found") as excinfo:
        read_annotations(path)
    _assert_one_line_error(excinfo, path)


def test_bow_tie_is_repaired(tmp_path: Path) -> None:
    bow_tie = [[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]
    assert not Polygon(bow_tie).is_valid
    doc = [_feature({"type": "Polygon", "coordinates": [bow_tie]}, classification={"name": "CCA"})]
    regions = read_annotations(_write(tmp_path, "bowtie.json", json.dumps(doc)))
    geom = regions[0].geometry
    assert geom.is_valid and isinstance(geom, Polygon | MultiPolygon)
    assert geom.area == pytest.approx(50)  # two triangles of 25


def test_degenerate_polygon_is_dropped(tmp_path: Path) -> None:
    doc = [_feature({"type": "Polygon", "coordinates": [[[0, 0], [5, 5], [10, 10], [0, 0]]]}),
           _feature({"type": "Polygon", "coordinates": [_square(0, 0, 3)]}, name="ok")]
    regions = read_annotations(_write(tmp_path, "flat.json", json.dumps(doc)))
    assert [r.class_name for r in regions] == ["ok"] and regions[0].index == 0


def test_qupath_bad_coordinates_name_the_file(tmp_path: Path) -> None:
    doc = [_feature({"type": "Polygon", "coordinates": [[["a", 0], [1, 0], [1, 1]]]})]
    path = _write(tmp_path, "bad.json", json.dumps(doc))
    with pytest.raises(TaskError, match="feature 0") as excinfo:
        read_annotations(path)
    _assert_one_line_error(excinfo, path)


# ---------------------------------------------------------------------------------------------------------
# ASAP, synthetic

ASAP_XML = """<?xml version="1.0"?>
<ASAP_Annotations>
  <Annotations>
    <Annotation Name="rect" Type="Rectangle" PartOfGroup="Tumor" Color="#FF0000">
      <Coordinates>
        <Coordinate Order="2" X="100" Y="100" />
        <Coordinate Order="0" X="0" Y="0" />
        <Coordinate Order="3" X="0" Y="100" />
        <Coordinate Order="1" X="100" Y="0" />
      </Coordinates>
    </Annotation>
    <Annotation Name="spline" Type="Spline" PartOfGroup="Stroma" Color="#00FF00">
      <Coordinates>
        <Coordinate Order="0" X="200" Y="0" />
        <Coordinate Order="1" X="260" Y="0" />
        <Coordinate Order="2" X="260" Y="60" />
      </Coordinates>
    </Annotation>
    <Annotation Name="dot" Type="Dot" PartOfGroup="Tumor" Color="#0000FF">
      <Coordinates><Coordinate Order="0" X="5" Y="5" /></Coordinates>
    </Annotation>
    <Annotation Name="points" Type="PointSet" PartOfGroup="Tumor" Color="#0000FF">
      <Coordinates>
        <Coordinate Order="0" X="5" Y="5" /><Coordinate Order="1" X="6" Y="6" />
        <Coordinate Order="2" X="5" Y="7" />
      </Coordinates>
    </Annotation>
    <Annotation Name="hole" Type="Polygon" PartOfGroup="{exclusion}" Color="#000000">
      <Coordinates>
        <Coordinate Order="0" X="40" Y="40" /><Coordinate Order="1" X="60" Y="40" />
        <Coordinate Order="2" X="60" Y="60" /><Coordinate Order="3" X="40" Y="60" />
      </Coordinates>
    </Annotation>
    <Annotation Name="loose" Type="Polygon" PartOfGroup="None" Color="#000000">
      <Coordinates>
        <Coordinate Order="0" X="500" Y="500" /><Coordinate Order="1" X="510" Y="500" />
        <Coordinate Order="2" X="510" Y="510" />
      </Coordinates>
    </Annotation>
  </Annotations>
  <AnnotationGroups>
    <Group Name="Tumor" PartOfGroup="None" Color="#FF0000"><Attributes /></Group>
    <Group Name="{exclusion}" PartOfGroup="None" Color="#000000"><Attributes /></Group>
  </AnnotationGroups>
</ASAP_Annotations>
"""


@pytest.mark.parametrize("exclusion", ["_2", "Negative", "trash", "exclusion"])
def test_asap_shapes_and_exclusion_group(tmp_path: Path, exclusion: str) -> None:
    path = _write(tmp_path, "asap.xml", ASAP_XML.replace("{exclusion}", exclusion))
    regions = read_annotations(path)
    assert [(r.name, r.class_name) for r in regions] == [("rect", "Tumor"), ("spline", "Stroma"),
                                                        ("loose", "")]
    rect, spline, _ = regions
    assert rect.geometry.area == pytest.approx(100 * 100 - 20 * 20)  # the exclusion cut a hole
    assert _holes(rect.geometry) == 1 and rect.color == (255, 0, 0)
    assert spline.geometry.area == pytest.approx(60 * 60 / 2)  # polygon through the control points
    assert spline.geometry.area == pytest.approx(1800)


def test_asap_ordinary_group_is_not_an_exclusion(tmp_path: Path) -> None:
    regions = read_annotations(_write(tmp_path, "asap.xml", ASAP_XML.replace("{exclusion}", "_1")))
    assert [r.class_name for r in regions] == ["Tumor", "Stroma", "_1", ""]
    assert regions[0].geometry.area == pytest.approx(10_000)


def test_asap_exclusion_covering_whole_region_drops_it(tmp_path: Path) -> None:
    xml = ASAP_XML.replace("{exclusion}", "_2").replace('X="40" Y="40"', 'X="-10" Y="-10"') \
        .replace('X="60" Y="40"', 'X="150" Y="-10"').replace('X="60" Y="60"', 'X="150" Y="150"') \
        .replace('X="40" Y="60"', 'X="-10" Y="150"')
    regions = read_annotations(_write(tmp_path, "asap.xml", xml))
    assert [r.name for r in regions] == ["spline", "loose"] and [r.index for r in regions] == [0, 1]


def test_asap_bad_coordinate(tmp_path: Path) -> None:
    path = _write(tmp_path, "asap.xml", ASAP_XML.replace('X="100" Y="100"', 'X="1e" Y="100"'))
    with pytest.raises(TaskError, match="rect") as excinfo:
        read_annotations(path)
    _assert_one_line_error(excinfo, path)


# ---------------------------------------------------------------------------------------------------------
# ImageScope, synthetic

IMAGESCOPE_XML = """<Annotations MicronsPerPixel="0.25">
  <Annotation Id="1" Name="CCA" LineColor="255" Type="4">
    <Attributes/>
    <Regions>
      <RegionAttributeHeaders/>
      <Region Id="1" Type="0" NegativeROA="0" Text="">
        <Vertices>
          <Vertex X="0" Y="0" Z="0"/><Vertex X="100" Y="0" Z="0"/>
          <Vertex X="100" Y="100" Z="0"/><Vertex X="0" Y="100" Z="0"/><Vertex X="0" Y="0" Z="0"/>
        </Vertices>
      </Region>
      <Region Id="2" Type="0" NegativeROA="1" Text="">
        <Vertices>
          <Vertex X="10.5" Y="10.5" Z="0"/><Vertex X="20.5" Y="10.5" Z="0"/>
          <Vertex X="20.5" Y="20.5" Z="0"/><Vertex X="10.5" Y="20.5" Z="0"/>
        </Vertices>
      </Region>
      <Region Id="3" Type="1" NegativeROA="0" Text="second">
        <Vertices>
          <Vertex X="200" Y="0"/><Vertex X="210" Y="0"/><Vertex X="210" Y="10"/><Vertex X="200" Y="10"/>
        </Vertices>
      </Region>
      <Region Id="4" Type="4" NegativeROA="0" Text="ruler">
        <Vertices><Vertex X="0" Y="0"/><Vertex X="50" Y="50"/></Vertices>
      </Region>
    </Regions>
    <Plots/>
  </Annotation>
  <Annotation Id="2" Name="" LineColor="65280">
    <Attributes/>
    <Regions><RegionAttributeHeaders/></Regions>
  </Annotation>
  <Annotation Id="3" Name="" LineColor="16711680">
    <Attributes><Attribute Name="Description" Id="0" Value=""/><Attribute Name="Dx" Id="1" Value="benign"/>
    </Attributes>
    <Regions>
      <Region Id="1" Type="0" NegativeROA="0" Text="">
        <Vertices><Vertex X="300" Y="300"/><Vertex X="310" Y="300"/><Vertex X="310" Y="310"/></Vertices>
      </Region>
    </Regions>
  </Annotation>
  <Annotation Id="4" Name="">
    <Regions>
      <Region Id="1" Type="0" NegativeROA="0" Text="Tumor">
        <Vertices><Vertex X="400" Y="400"/><Vertex X="410" Y="400"/><Vertex X="410" Y="410"/></Vertices>
      </Region>
    </Regions>
  </Annotation>
</Annotations>
"""


def test_imagescope_negative_roa_and_empty_layer(tmp_path: Path) -> None:
    path = _write(tmp_path, "layers.xml", IMAGESCOPE_XML)
    assert detect_format(path) == "imagescope"
    regions = read_annotations(path)
    assert [r.class_name for r in regions] == ["CCA", "CCA", "benign", "Tumor"]
    assert [r.index for r in regions] == [0, 1, 2, 3]
    first = regions[0]
    assert first.geometry.area == pytest.approx(100 * 100 - 10 * 10)
    assert _holes(first.geometry) == 1
    assert first.color == (255, 0, 0)  # LineColor is 0x00BBGGRR
    assert regions[1].geometry.area == pytest.approx(100) and regions[1].name == "second"
    assert regions[2].color == (0, 0, 255)
    assert regions[3].name == "Tumor" and regions[3].color is None


def test_imagescope_only_rulers_is_an_error(tmp_path: Path) -> None:
    xml = ('<Annotations><Annotation Id="1"><Regions><Region Id="1" Type="4" NegativeROA="0">'
           '<Vertices><Vertex X="0" Y="0"/><Vertex X="50" Y="50"/></Vertices></Region></Regions>'
           '</Annotation></Annotations>')
    path = _write(tmp_path, "rulers.xml", xml)
    with pytest.raises(TaskError, match="no polygon annotation found") as excinfo:
        read_annotations(path)
    _assert_one_line_error(excinfo, path)


# ---------------------------------------------------------------------------------------------------------
# Format detection and refused files


def test_format_detection_ignores_the_extension(tmp_path: Path) -> None:
    geojson = json.dumps([_feature({"type": "Polygon", "coordinates": [_square(0, 0, 1)]}, name="a")])
    json_as_xml = _write(tmp_path, "annotations.xml", geojson)
    asap_as_json = _write(tmp_path, "annotations.json", ASAP_XML.replace("{exclusion}", "_2"))
    imagescope_as_geojson = _write(tmp_path, "x.geojson", "\ufeff" + IMAGESCOPE_XML)
    assert detect_format(json_as_xml) == "qupath"
    assert detect_format(asap_as_json) == "asap"
    assert detect_format(imagescope_as_geojson) == "imagescope"
    assert read_annotations(json_as_xml)[0].source_format == "qupath"
    assert read_annotations(asap_as_json)[0].source_format == "asap"


@pytest.mark.parametrize("name, content, cause", [
    ("garbage.svs", "SUkqAAgAAAAQAP4ABAABAAAAAAAAAAABBAABAAAAQAIAAAEBBAABAAAA", "not a QuPath GeoJSON"),
    ("empty.json", "", "empty file"),
    ("blank.xml", "  \n\t\n", "empty file"),
    ("random.bin", os.urandom(0) + bytes(range(1, 256)) * 4, "not a QuPath GeoJSON"),
    ("foo.xml", "<foo/>", "root element <foo>"),
    ("truncated.xml", "<ASAP_Annotations><Annotations>", "malformed XML"),
    ("bad.json", '[{"type": "Feature", "geometry": ', "invalid JSON"),
    ("other.json", '{"cells": [1, 2, 3]}', "not a QuPath GeoJSON"),
    ("number.json", "[1, 2]", "not a QuPath GeoJSON"),
])
def test_unreadable_content_is_refused(tmp_path: Path, name: str, content: str | bytes, cause: str) -> None:
    path = _write(tmp_path, name, content)
    with pytest.raises(TaskError, match=cause) as excinfo:
        read_annotations(path)
    _assert_one_line_error(excinfo, path)
    with pytest.raises(TaskError):
        detect_format(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope.geojson"
    with pytest.raises(TaskError, match="file not found") as excinfo:
        read_annotations(missing)
    _assert_one_line_error(excinfo, missing)
    with pytest.raises(TaskError, match="directory"):
        read_annotations(tmp_path)


def test_translate_and_scale_keep_everything_else() -> None:
    region = Region(7, "CCA", box(0, 0, 10, 10), "asap", name="n", color=(1, 2, 3))
    (moved,) = translate_regions([region], 5, -5)
    assert moved.geometry.bounds == (5, -5, 15, 5)
    assert (moved.index, moved.class_name, moved.name, moved.color) == (7, "CCA", "n", (1, 2, 3))
    (scaled,) = scale_regions([region], 0.5)
    assert scaled.geometry.bounds == (0, 0, 5, 5)
    assert region.geometry.bounds == (0, 0, 10, 10)  # frozen input untouched


# --------------------------------------------------------------------------------------------------------------
# Bounded work on pathological polygons


def _outline(n: int, *, jitter: float = 0.0, loops: int = 0, seed: int = 0) -> list[list[float]]:
    """A closed outline of ``n`` vertices around (5000, 5000): smooth, with ``loops`` short stretches run backwards
    (the brush crossing itself), or with angular ``jitter`` (a jagged outline crossing itself everywhere)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = 3000 + 200 * np.sin(7 * t)
    if jitter:
        t = t + rng.normal(0, jitter, n)
        r = r + rng.normal(0, 150, n)
    xy = np.c_[5000 + r * np.cos(t), 5000 + r * np.sin(t)]
    for k in range(loops):
        s = (k + 1) * n // (loops + 1)
        xy[s:s + n // 500] = xy[s:s + n // 500][::-1]
    return [*xy.round(3).tolist(), xy[0].round(3).tolist()]


def test_the_common_self_intersection_is_repaired_to_the_outlined_area(tmp_path: Path) -> None:
    ring = _outline(20_000, loops=3)
    assert not Polygon(ring).is_valid
    doc = [_feature({"type": "Polygon", "coordinates": [ring]}, classification={"name": "CCA"})]
    (region,) = read_annotations(_write(tmp_path, "loops.json", json.dumps(doc)))
    smooth = Polygon(_outline(20_000))
    assert region.geometry.is_valid
    assert abs(region.geometry.area - smooth.area) < 0.001 * smooth.area  # the outline's area, loops and all
    # an outline that runs over itself: the area covered twice is inside (structure), not cut out (linework: 44)
    overlap = [[0, 0], [6, 0], [6, 6], [2, 6], [2, 2], [8, 2], [8, 8], [0, 8], [0, 0]]
    doc = [_feature({"type": "Polygon", "coordinates": [overlap]}, classification={"name": "CCA"})]
    (region,) = read_annotations(_write(tmp_path, "overlap.json", json.dumps(doc)))
    assert region.geometry.area == 60 and len(region.geometry.interiors) == 0


def test_too_many_vertices_name_the_file_and_the_region(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PYTHON_TASK_MAX_VERTICES", "1000")
    doc = [_feature({"type": "Polygon", "coordinates": [_square(0, 0, 10)]}, classification={"name": "CCA"}),
           _feature({"type": "Polygon", "coordinates": [_outline(5000)]}, classification={"name": "CCA"})]
    path = _write(tmp_path, "big.json", json.dumps(doc))
    with pytest.raises(TaskError, match=r"feature 1: 5,001 vertices, more than the 1,000") as err:
        read_annotations(path)
    _assert_one_line_error(err, path)


def test_a_repair_past_its_time_budget_names_the_file_and_the_region(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PYTHON_TASK_REPAIR_SECONDS", "0.01")
    jagged = _outline(20_000, jitter=0.02)  # takes GEOS many seconds to repair
    doc = [_feature({"type": "Polygon", "coordinates": [jagged]}, classification={"name": "CCA"})]
    path = _write(tmp_path, "jagged.json", json.dumps(doc))
    with pytest.raises(TaskError, match=r"feature 0: repairing this self-intersecting polygon \(20,001 vertices\) "
                                        r"took more than 0.01 s") as err:
        read_annotations(path)
    _assert_one_line_error(err, path)
    bow_tie = [[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]  # GEOS is not left interrupted for the next repair
    doc = [_feature({"type": "Polygon", "coordinates": [bow_tie]}, classification={"name": "CCA"})]
    assert read_annotations(_write(tmp_path, "bowtie.json", json.dumps(doc)))[0].geometry.area == 50


# --------------------------------------------------------------------------------------------------------------
# Bounded reading: regular files of a limited size only; encodings; holes outside their shell


def test_only_a_regular_file_is_read(tmp_path: Path) -> None:
    """A device never ends (``/dev/zero`` filled 23 GB) and a FIFO waits for a writer for ever: both are refused
    before a byte is read."""
    fifo = tmp_path / "annotations.fifo"
    os.mkfifo(fifo)
    for path in (Path("/dev/zero"), fifo):
        with pytest.raises(TaskError, match="not a regular file") as excinfo:
            read_annotations(path)
        _assert_one_line_error(excinfo, path)


def test_an_annotation_file_above_the_size_limit_is_refused(tmp_path: Path, monkeypatch) -> None:
    import gzip

    doc = json.dumps([_feature({"type": "Polygon", "coordinates": [_square(0, 0, 10)]}, name="CCA")])
    path = _write(tmp_path, "big.geojson", doc + " " * 500)
    packed = _write(tmp_path, "big.geojson.gz", gzip.compress((doc + " " * 500).encode()))
    assert len(packed.read_bytes()) < 500
    monkeypatch.setenv("PYTHON_TASK_MAX_ANNOTATION_BYTES", "500")
    for refused, cause in ((path, r"\d+ bytes, more than the 500 bytes an annotation file may hold"),
                           (packed, "gzip file unpacks to more than the 500 bytes")):
        with pytest.raises(TaskError, match=cause) as excinfo:
            read_annotations(refused)
        _assert_one_line_error(excinfo, refused)
        assert "PYTHON_TASK_MAX_ANNOTATION_BYTES" in str(excinfo.value)
    assert read_annotations(_write(tmp_path, "small.geojson", doc))[0].class_name == "CCA"
    monkeypatch.setenv("PYTHON_TASK_MAX_ANNOTATION_BYTES", "lots")
    with pytest.raises(TaskError, match="must be a positive whole number of bytes") as excinfo:
        read_annotations(path)
    assert excinfo.value.setting == "PYTHON_TASK_MAX_ANNOTATION_BYTES"


def test_out_of_memory_while_parsing_blames_the_annotation_file(tmp_path: Path, monkeypatch) -> None:
    def out_of_memory(*args, **kwargs):
        raise MemoryError

    path = _write(tmp_path, "huge.geojson", json.dumps([_feature({"type": "Polygon",
                                                                  "coordinates": [_square(0, 0, 10)]})]))
    monkeypatch.setattr(json, "loads", out_of_memory)
    with pytest.raises(TaskError, match="out of memory while reading this annotation file") as excinfo:
        read_annotations(path)
    _assert_one_line_error(excinfo, path)


def test_utf16_and_bom_xml_is_read(tmp_path: Path) -> None:
    """ASAP and ImageScope XML as Windows tools save it: a byte-order mark, then UTF-16 (or UTF-8) text whose
    declaration names that encoding; GeoJSON the same way."""
    for codec, bom in (("utf-16-le", b"\xff\xfe"), ("utf-16-be", b"\xfe\xff"), ("utf-8", b"\xef\xbb\xbf")):
        declared = "UTF-16" if codec.startswith("utf-16") else "UTF-8"
        declaration = f'<?xml version="1.0" encoding="{declared}"?>\n'
        asap_xml = ASAP_XML.replace("{exclusion}", "_2").replace('<?xml version="1.0"?>\n', declaration)
        asap = _write(tmp_path, f"asap-{codec}.xml", bom + asap_xml.encode(codec))
        assert [r.name for r in read_annotations(asap)] == ["rect", "spline", "loose"], codec
        imagescope = _write(tmp_path, f"imagescope-{codec}.xml", bom + (declaration + IMAGESCOPE_XML).encode(codec))
        regions = read_annotations(imagescope)
        assert [r.class_name for r in regions] == ["CCA", "CCA", "benign", "Tumor"], codec
        assert regions[0].geometry.area == pytest.approx(100 * 100 - 10 * 10)
        geojson = json.dumps([_feature({"type": "Polygon", "coordinates": [_square(0, 0, 1)]}, name="a")])
        assert read_annotations(_write(tmp_path, f"{codec}.geojson", bom + geojson.encode(codec)))[0].class_name == "a"


def test_a_hole_outside_its_shell_adds_no_area_and_no_tile(tmp_path: Path) -> None:
    """A 500 x 500 px region with a "hole" drawn beside it: 250,000 px², 25 tiles of 100 px (not the 1,096,400
    px² and 106 tiles of the hole's area added)."""
    from python_task.wsi.labels import LabelledRegion
    from python_task.wsi.tiling import GridSpec, plan_tiles

    outside, across = _square(1000, 1000, 920), _square(400, 400, 200)
    doc = [_feature({"type": "Polygon", "coordinates": [_square(0, 0, 500), outside]}, name="malignant"),
           _feature({"type": "Polygon", "coordinates": [_square(3000, 0, 500), across]}, name="across"),
           _feature({"type": "MultiPolygon", "coordinates": [[_square(0, 3000, 500), outside]]}, name="multi")]
    regions = read_annotations(_write(tmp_path, "holes.geojson", json.dumps(doc)))
    assert [r.geometry.area for r in regions] == [250_000, 250_000, 250_000]
    assert all(r.geometry.is_valid for r in regions)
    across_shell = _write(tmp_path, "across.geojson", json.dumps(
        [_feature({"type": "Polygon", "coordinates": [_square(0, 0, 500), _square(400, 400, 200)]})]))
    assert read_annotations(across_shell)[0].geometry.area == 250_000 - 100 * 100  # only its part inside cuts
    grid = GridSpec(extent=100.0, step=100.0, width=2000, height=2000)
    labelled = [LabelledRegion(region=regions[0], label=1, target="malignant")]
    plan = plan_tiles(labelled, grid, None, min_coverage=0.5, min_tissue=0.0, n_classes=2)
    assert len(plan) == 25 and plan.coords.max() < 500
