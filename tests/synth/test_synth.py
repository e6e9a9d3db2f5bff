"""The synthetic cohort: readable pyramidal slides, a valid cohort table and annotations, determinism, a
streaming TIFF writer, and the scientific property that matters: colour alone does not tell benign from
malignant tiles, structure does."""

from __future__ import annotations

import csv
import json
import tracemalloc
from pathlib import Path

import numpy as np
import openslide
import pytest
import shapely
from scipy import ndimage
from shapely.geometry import box, shape
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from python_task.errors import TaskError
from python_task.synth import config, render, tiff
from python_task.synth.cohort import generate_cohort
from python_task.synth.config import SynthConfig
from tests.conftest import cli_line

SMALL = SynthConfig(patients=4, seed=3, slide_size=1024, mpp=0.5, stain_variation=1.0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_cohort(tmp_path_factory.mktemp("cohort"), SMALL)


def _rows(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------------------------------------------
# Cohort files


def test_cohort_csv_columns_paths_and_patients(cohort: Path) -> None:
    with open(cohort, newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh))
    assert header == ["slide_id", "patient_id", "slide_path", "annotation_path", "diagnosis"]
    rows = _rows(cohort)
    assert len({r["slide_id"] for r in rows}) == len(rows)
    for row in rows:
        for key in ("slide_path", "annotation_path"):
            assert not Path(row[key]).is_absolute()
            assert (cohort.parent / row[key]).is_file()
    per_patient: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    for row in rows:
        per_patient.setdefault(row["patient_id"], set()).add(row["diagnosis"])
        counts[row["patient_id"]] = counts.get(row["patient_id"], 0) + 1
    assert len(per_patient) == SMALL.patients
    assert all(len(d) == 1 for d in per_patient.values()), "one diagnosis per patient"
    assert {d for ds in per_patient.values() for d in ds} == {"benign", "malignant"}
    assert max(counts.values()) >= 2, "some patient has several slides"
    # no temporary files left behind
    assert not [p for p in cohort.parent.rglob("*") if p.name.startswith(".")]


def test_slides_open_in_openslide_with_mpp_and_pyramid(cohort: Path) -> None:
    for row in _rows(cohort):
        with openslide.OpenSlide(cohort.parent / row["slide_path"]) as slide:
            assert slide.dimensions == (SMALL.slide_size, SMALL.slide_size)
            assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(SMALL.mpp)
            assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(SMALL.mpp)
            assert slide.level_count > 1
            assert max(slide.level_dimensions[-1]) <= 512
            for k, (w, h) in enumerate(slide.level_dimensions):
                assert (w, h) == (-(-SMALL.slide_size // 2**k),) * 2
            level0 = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"), dtype=np.float32)
            level1 = np.asarray(slide.read_region((0, 0), 1, slide.level_dimensions[1]).convert("RGB"),
                                dtype=np.float32)
            expected = level0.reshape(level1.shape[0], 2, level1.shape[1], 2, 3).mean(axis=(1, 3))
            assert np.abs(level1 - expected).mean() < 3.0  # both JPEG-compressed
            assert np.abs(level1 - expected[::-1]).mean() > 4 * np.abs(level1 - expected).mean()
            assert level0.std() > 20, "not a blank slide"


def test_annotations_are_qupath_polygons_inside_the_slide(cohort: Path) -> None:
    known = {config.MALIGNANT_CLASS, *config.BENIGN_CLASSES}
    for row in _rows(cohort):
        doc = json.loads((cohort.parent / row["annotation_path"]).read_text(encoding="utf-8"))
        assert doc["type"] == "FeatureCollection"
        classes = []
        assert len(doc["features"]) >= 2
        for feature in doc["features"]:
            assert feature["type"] == "Feature"
            assert feature["geometry"]["type"] == "Polygon"
            for ring in feature["geometry"]["coordinates"]:
                assert ring[0] == ring[-1], "closed ring"
            props = feature["properties"]
            assert props["objectType"] == "annotation"
            name, color = props["classification"]["name"], props["classification"]["color"]
            assert name in known
            assert len(color) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in color)
            polygon = shape(feature["geometry"])
            assert polygon.is_valid and polygon.area > 0.01 * SMALL.slide_size**2
            assert box(0, 0, SMALL.slide_size, SMALL.slide_size).contains(polygon)
            classes.append(name)
        polygons = [shape(f["geometry"]) for f in doc["features"]]
        assert sum(a.intersection(b).area for i, a in enumerate(polygons) for b in polygons[i + 1:]) == 0
        if row["diagnosis"] == "malignant":
            assert config.MALIGNANT_CLASS in classes
        else:
            assert set(classes) <= set(config.BENIGN_CLASSES)


def test_same_seed_same_cohort(cohort: Path, tmp_path: Path) -> None:
    again = generate_cohort(tmp_path / "again", SMALL)
    assert again.read_bytes() == cohort.read_bytes()
    for row in _rows(cohort):
        assert (again.parent / row["annotation_path"]).read_bytes() == \
            (cohort.parent / row["annotation_path"]).read_bytes()
        with openslide.OpenSlide(cohort.parent / row["slide_path"]) as a, \
                openslide.OpenSlide(again.parent / row["slide_path"]) as b:
            assert np.array_equal(np.asarray(a.read_region((0, 0), 0, a.dimensions)),
                                  np.asarray(b.read_region((0, 0), 0, b.dimensions)))
    other = config.plan_cohort(SynthConfig(patients=4, seed=4, slide_size=1024))
    rgb_other, _ = render.render_spec(other[0])
    rgb_same, _ = render.render_spec(config.plan_cohort(SMALL)[0])
    assert not np.array_equal(rgb_other, rgb_same)


def test_plan_is_balanced_and_deterministic() -> None:
    for seed in range(5):
        cfg = SynthConfig(patients=7, seed=seed)
        plan = config.plan_cohort(cfg)
        assert plan == config.plan_cohort(cfg)
        diagnoses = {s.patient_id: s.diagnosis for s in plan}
        assert sorted(diagnoses.values()).count("benign") in (3, 4)
        counts = [sum(s.patient_id == p for s in plan) for p in diagnoses]
        assert set(counts) <= {1, 2} and 2 in counts


def test_default_slide_layout_gives_over_a_hundred_tiles() -> None:
    """A 4096-px slide: at least 100 grid tiles of 256 px lie mostly (>= 50 %) inside an annotated region."""
    for diagnosis, seed in (("benign", 0), ("malignant", 1), ("malignant", 2)):
        _, styles = render.layout_slide(np.random.default_rng(seed), 4096, diagnosis)
        regions = shapely.union_all([s.polygon for s in styles])
        tiles = [box(x, y, x + 256, y + 256) for y in range(0, 4096, 256) for x in range(0, 4096, 256)]
        assert sum(regions.intersection(t).area >= 0.5 * 256**2 for t in tiles) >= 100


def test_bad_options_raise_task_error(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="patients") as err:
        generate_cohort(tmp_path, SynthConfig(patients=0))
    assert err.value.setting == "patients" and cli_line(err.value) == "error: --patients: must be at least 1"
    with pytest.raises(TaskError, match="mpp") as err:
        generate_cohort(tmp_path, SynthConfig(mpp=-1))
    assert cli_line(err.value).startswith("error: --mpp: ")
    assert not (tmp_path / "cohort.csv").exists()


def test_cli_synth(tmp_path: Path) -> None:
    from python_task import cli

    out = tmp_path / "cli"
    assert cli.main(["synth", "--out", str(out), "--patients", "2", "--slide-size", "512", "--seed", "1"]) == 0
    assert len(_rows(out / "cohort.csv")) >= 2


# --------------------------------------------------------------------------------------------------------------
# The pyramidal TIFF writer


def _pattern(x: int, y: int, w: int, h: int) -> np.ndarray:
    """Smooth level-0 test pattern (JPEG-friendly) with a few sharp-ish features."""
    yy, xx = np.mgrid[y:y + h, x:x + w].astype(np.float32)
    r = 128 + 100 * np.sin(xx / 37.0) * np.cos(yy / 53.0)
    g = (xx + 2 * yy) % 256
    b = 255 * ((xx // 64 + yy // 64) % 2) * 0.5 + 60
    return np.stack([r, g, b], axis=-1).astype(np.uint8)


def test_write_pyramidal_tiff_streams_tiles_and_round_trips(tmp_path: Path) -> None:
    width, height = 1000, 700
    calls: list[tuple[int, int, int, int]] = []

    def read_block(x: int, y: int, w: int, h: int) -> np.ndarray:
        calls.append((x, y, w, h))
        return _pattern(x, y, w, h)

    path = tmp_path / "pattern.tiff"
    tiff.write_pyramidal_tiff(path, width, height, read_block, 0.25, tile_size=256, quality=90)
    assert all(w <= 256 and h <= 256 and x % 256 == 0 and y % 256 == 0 for x, y, w, h in calls)
    assert len(calls) == 4 * 3 and len(set(calls)) == len(calls), "each tile read once"
    assert sum(w * h for _, _, w, h in calls) == width * height
    assert [p.name for p in tmp_path.iterdir()] == ["pattern.tiff"]
    with openslide.OpenSlide(path) as slide:
        assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
        assert slide.level_dimensions == ((1000, 700), (500, 350))
        got = np.asarray(slide.read_region((0, 0), 0, (width, height)).convert("RGB"), dtype=np.int16)
        diff = np.abs(got - _pattern(0, 0, width, height).astype(np.int16))
        assert diff.mean() < 2.0 and np.percentile(diff, 99.9) < 25
        small = np.asarray(slide.read_region((0, 0), 1, (500, 350)).convert("RGB"), dtype=np.float32)
        expected = _pattern(0, 0, width, height).astype(np.float32).reshape(350, 2, 500, 2, 3).mean(axis=(1, 3))
        assert np.abs(small - expected).mean() < 3.0


def test_write_pyramidal_tiff_memory_stays_well_below_level_zero(tmp_path: Path) -> None:
    side = 4096
    tile = np.zeros((256, 256, 3), dtype=np.uint8)

    def read_block(x: int, y: int, w: int, h: int) -> np.ndarray:
        tile[...] = (x // 16 + y // 16) % 256  # cheap but varying
        return tile[:h, :w]

    tracemalloc.start()
    try:
        tiff.write_pyramidal_tiff(tmp_path / "big.tiff", side, side, read_block, 0.5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    level0 = side * side * 3
    assert peak < 0.45 * level0, f"peak {peak / 1e6:.1f} MB for a {level0 / 1e6:.1f} MB level 0"
    with openslide.OpenSlide(tmp_path / "big.tiff") as slide:
        assert slide.level_dimensions[-1] == (512, 512) and slide.level_count == 4


def test_write_mirrored_copy_has_no_seams(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    source = ndimage.gaussian_filter(rng.uniform(0, 255, (150, 200, 3)), (4, 4, 0)).astype(np.uint8)
    path = tmp_path / "mirror.tiff"
    tiff.write_mirrored_copy(path, source, 700, 450, 0.5)
    expected = np.pad(source, ((0, 450 - 150), (0, 700 - 200), (0, 0)), mode="symmetric")
    with openslide.OpenSlide(path) as slide:
        assert slide.dimensions == (700, 450)
        got = np.asarray(slide.read_region((0, 0), 0, (700, 450)).convert("RGB"), dtype=np.int16)
    assert np.abs(got - expected).mean() < 2.0


# --------------------------------------------------------------------------------------------------------------
# Colour is not enough; structure is


TILE = 256


def _region_tiles(rgb: np.ndarray, regions: list) -> list[tuple[str, np.ndarray]]:
    """Grid tiles (native resolution) at least 75 % inside one labelled region."""
    out = []
    for class_name, polygon in regions:
        minx, miny, maxx, maxy = polygon.bounds
        for y in range(int(miny) // TILE * TILE, int(maxy), TILE):
            for x in range(int(minx) // TILE * TILE, int(maxx), TILE):
                if y + TILE <= rgb.shape[0] and x + TILE <= rgb.shape[1] and \
                        polygon.intersection(box(x, y, x + TILE, y + TILE)).area >= 0.75 * TILE * TILE:
                    out.append((class_name, rgb[y:y + TILE, x:x + TILE]))
    return out


def _colour_features(tile: np.ndarray) -> np.ndarray:
    """Normalised 8-bin histogram of each RGB channel."""
    return np.concatenate([np.histogram(tile[..., c], bins=8, range=(0, 256))[0] for c in range(3)]) / TILE**2


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=64)
    mids = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * mids) / np.maximum(w0, 1)
    m1 = (np.sum(hist * mids) - np.cumsum(hist * mids)) / np.maximum(w1, 1)
    return float(mids[np.argmax(w0 * w1 * (m0 - m1) ** 2)])


def _structure_features(tile: np.ndarray) -> np.ndarray:
    """Nuclear object statistics (red optical density thresholded with Otsu inside the tissue, then
    connected components) and lumen shape irregularity (perimeter² / 4π area of enclosed white spaces)."""
    od = -np.log10((tile.astype(np.float32) + 1) / 256)
    tissue = od.sum(axis=-1) > 0.25
    red = od[..., 0]
    threshold = _otsu(red[tissue]) if tissue.sum() > 100 else 1.0
    nuclei = ndimage.binary_opening((red > threshold) & tissue)
    labels, _ = ndimage.label(nuclei)
    areas = np.bincount(labels.ravel())[1:]
    areas = areas[areas >= 10]
    if len(areas) < 2:
        areas = np.array([10, 10])
    clumped = areas[areas > 150].sum() / areas.sum()
    white = od.sum(axis=-1) < 0.15
    wl, _ = ndimage.label(white)
    sizes = np.bincount(wl.ravel())
    perimeter = np.bincount(wl[white & ~ndimage.binary_erosion(white)], minlength=len(sizes))
    touching = np.unique(np.concatenate([wl[0], wl[-1], wl[:, 0], wl[:, -1]]))
    inner = np.setdiff1d(np.arange(1, len(sizes)), touching)
    inner = inner[sizes[inner] >= 30]
    irregular = float(np.median(perimeter[inner] ** 2 / (4 * np.pi * sizes[inner]))) if len(inner) else 1.0
    return np.array([np.log(len(areas)), np.log(np.median(areas)), np.log(np.percentile(areas, 90)), clumped,
                     np.log(irregular)])


def _slide_colour(rgb: np.ndarray) -> np.ndarray:
    """A slide's colour statistics over its tissue: mean RGB, mean optical density per channel, median RGB."""
    od = -np.log10((rgb.astype(np.float32) + 1) / 256)
    tissue = od.sum(axis=-1) > 0.25
    pixels = rgb[tissue].astype(np.float32)
    return np.concatenate([pixels.mean(axis=0), od[tissue].mean(axis=0), np.median(pixels, axis=0)])


@pytest.fixture(scope="module")
def tile_set() -> tuple[np.ndarray, ...]:
    """Colour and structure features of labelled tiles from a small cohort with strong stain variation:
    24 patients, one 1536-px slide each (many patients keep the patient-grouped estimate stable); and each
    slide's colour statistics, its patient's diagnosis and id."""
    cfg = SynthConfig(patients=24, seed=0, slide_size=1536, stain_variation=2.0, max_slides_per_patient=1)
    colour, structure, labels, groups = [], [], [], []
    slide_colour, diagnosis, patients = [], [], []
    for spec in config.plan_cohort(cfg):
        rgb, regions = render.render_spec(spec)
        for class_name, tile in _region_tiles(rgb, regions):
            colour.append(_colour_features(tile))
            structure.append(_structure_features(tile))
            labels.append(class_name == config.MALIGNANT_CLASS)
            groups.append(spec.patient_id)
        slide_colour.append(_slide_colour(rgb))
        diagnosis.append(spec.diagnosis == "malignant")
        patients.append(spec.patient_id)
    return (np.array(colour), np.array(structure), np.array(labels), np.array(groups), np.array(slide_colour),
            np.array(diagnosis), np.array(patients))


def _grouped_auc(features: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    scores = cross_val_predict(model, features, labels, groups=groups, cv=GroupKFold(4),
                               method="predict_proba")[:, 1]
    return float(roc_auc_score(labels, scores))


def test_enough_labelled_tiles_of_both_classes(tile_set: tuple) -> None:
    _, _, labels, groups, *_ = tile_set
    assert len(labels) >= 120 and 0.25 < labels.mean() < 0.75
    assert len(set(groups)) == 24


def test_colour_alone_does_not_separate_the_classes(tile_set: tuple) -> None:
    colour, _, labels, groups, *_ = tile_set
    assert _grouped_auc(colour, labels, groups) < 0.75


def test_structure_separates_the_classes(tile_set: tuple) -> None:
    _, structure, labels, groups, *_ = tile_set
    assert _grouped_auc(structure, labels, groups) > 0.9


def test_slide_colour_does_not_predict_the_diagnosis_across_patients(tile_set: tuple) -> None:
    """Each slide gets its own stain, drawn independently of the diagnosis: a classifier on a slide's colour
    statistics (mean and median RGB, mean optical density over its tissue), cross-validated by patient, cannot
    tell a malignant patient from a benign one (issue 14: no non-structural per-slide cue of the diagnosis)."""
    *_, slide_colour, diagnosis, patients = tile_set
    assert len(set(patients)) == 24 and diagnosis.sum() == 12
    assert _grouped_auc(slide_colour, diagnosis, patients) < 0.75
