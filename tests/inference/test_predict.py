"""``predict``: heat-map outputs, QuPath detections on the tile grid, malignant regions scoring higher."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from python_task.errors import TaskError
from python_task.inference.predict import PROBABILITY_KEY, predict_slide
from python_task.training.calibration import Calibration
from python_task.training.config import train_options
from python_task.training.metrics import TileLayout, aggregate_tiles
from python_task.wsi.annotations import read_annotations
from python_task.wsi.cohort import read_cohort
from tests.test_fileio import strict_loads
from tests.wsi.qupath_exports import VERSIONS, QuPathRefuses, qupath_import


@pytest.fixture(scope="module")
def val_jobs(learn_data):
    shards, splits = learn_data
    val = set(json.loads(splits.read_text())["folds"][0]["val_slides"])
    jobs = [j for j in read_cohort(shards.parent / "cohort" / "cohort.csv") if j.slide_id in val]
    assert {j.diagnosis for j in jobs} == {"benign", "malignant"}
    return jobs


@pytest.fixture(scope="module")
def predicted(trained_model, val_jobs, tmp_path_factory):
    """Predictions inside the annotations of every validation slide of the model's fold."""
    root = tmp_path_factory.mktemp("predict")
    return {job.slide_id: (job, predict_slide(trained_model / "model.keras", job.slide_path, root / job.slide_id,
                                              annotations=job.annotation_path, progress=False), root / job.slide_id)
            for job in val_jobs}


def test_outputs_exist_and_describe_the_slide(predicted):
    for _job, summary, out in predicted.values():
        for name in ("heatmap.png", "probabilities.npy", "tiles.geojson", "slide.json"):
            assert (out / name).stat().st_size > 0, name
        saved = json.loads((out / "slide.json").read_text())
        assert saved["n_tiles"] == summary["n_tiles"] > 0
        assert saved["predicted_diagnosis"] in ("benign", "malignant")
        assert 0.0 <= saved["slide_score"] <= 1.0 and 0.0 < saved["threshold"] < 1.0
        assert {r["class"] for r in saved["regions"]} == set(saved["classes"])
        import matplotlib.image

        img = matplotlib.image.imread(out / "heatmap.png")
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200


def test_geojson_detections_sit_on_the_tiles_that_produced_them(predicted):
    job, summary, out = next(iter(predicted.values()))
    grid = np.load(out / "probabilities.npy")
    geo = json.loads((out / "tiles.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == summary["n_tiles"]
    step, extent = summary["grid"]["step"], summary["grid"]["tile_extent"]
    assert grid.shape == tuple(summary["grid"]["shape"]) and np.isfinite(grid).sum() == summary["n_tiles"]
    for feature in geo["features"]:
        assert feature["properties"]["objectType"] == "detection" and feature["id"] == "PathDetectionObject"
        ring = np.asarray(feature["geometry"]["coordinates"][0])
        x0, y0 = ring.min(axis=0)
        assert np.allclose(ring.max(axis=0) - ring.min(axis=0), extent, atol=0.02)
        col, row = x0 / step, y0 / step
        assert col == pytest.approx(round(col), abs=1e-6) and row == pytest.approx(round(row), abs=1e-6)
        (measurement,) = feature["properties"]["measurements"]
        assert measurement["name"] == PROBABILITY_KEY
        p = measurement["value"]
        assert grid[round(row), round(col)] == pytest.approx(p, abs=1e-5)  # the heat-map cell of this tile
        expected = "malignant" if p >= summary["threshold"] else "benign"
        assert feature["properties"]["classification"]["name"] == expected
    back = read_annotations(out / "tiles.geojson", include_detections=True)
    assert len(back) == summary["n_tiles"]
    assert {r.class_name for r in back} <= {"benign", "malignant"}
    assert back[0].geometry.area == pytest.approx(extent**2, rel=1e-3)
    assert read_annotations(job.annotation_path)  # the inputs still read as annotations


@pytest.mark.parametrize("version", VERSIONS)
def test_every_qupath_imports_the_tiles_as_detections_with_their_probability(predicted, version):
    """tiles.geojson in the form QuPath 0.2 to 0.7 all read (QuPath's readers, emulated in qupath_exports and run
    for real by QuPath's own reader of each version): a detection, its class, the malignant_probability measurement."""
    _, summary, out = next(iter(predicted.values()))
    geo = json.loads((out / "tiles.geojson").read_text())
    for feature in geo["features"][:50]:
        kind, name, measurements = qupath_import(feature, version)
        assert kind == "PathDetectionObject" and name in ("benign", "malignant")
        assert set(measurements) == {PROBABILITY_KEY}
        expected = "malignant" if measurements[PROBABILITY_KEY] >= summary["threshold"] else "benign"
        assert name == expected


def test_the_former_tiles_form_fails_in_old_qupath(predicted):
    """What the former form did (seen with QuPath's own readers): 0.2 refuses it (no id),
    0.3 makes annotations without the measurement, 0.4+ read it."""
    _, _, out = next(iter(predicted.values()))
    feature = json.loads((out / "tiles.geojson").read_text())["features"][0]
    old = {"type": "Feature", "geometry": feature["geometry"], "properties": {
        "objectType": "detection", "classification": {"name": "benign", "color": [64, 160, 64]},
        "measurements": {PROBABILITY_KEY: 0.25}}}
    with pytest.raises(QuPathRefuses):
        qupath_import(old, "0.2")
    assert qupath_import(old, "0.3") == ("PathAnnotationObject", "benign", {})
    assert qupath_import(old, "0.4") == ("PathDetectionObject", "benign", {PROBABILITY_KEY: 0.25})


def test_slide_json_is_strict_json_with_null_for_a_region_without_tiles(trained_model, val_jobs, tmp_path):
    """A region too small for any tile has no mean probability: slide.json says null (valid JSON for every
    parser), and the summary returned in Python keeps NaN."""
    job = val_jobs[0]
    doc = json.loads(job.annotation_path.read_text())
    ring = doc["features"][0]["geometry"]["coordinates"][0]
    x, y = ring[0]
    tiny = [[x, y], [x + 8, y], [x + 8, y + 8], [x, y + 8], [x, y]]
    doc["features"].append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [tiny]},
                            "properties": {"objectType": "annotation", "classification": {"name": "Tiny"}}})
    annotations = tmp_path / "with_tiny.geojson"
    annotations.write_text(json.dumps(doc))
    summary = predict_slide(trained_model, job.slide_path, tmp_path / "out", annotations=annotations, progress=False)
    assert math.isnan(summary["regions"][-1]["mean_probability"])
    text = (tmp_path / "out" / "slide.json").read_text()
    saved = strict_loads(text)
    assert "NaN" not in text and saved["regions"][-1] == {"index": len(doc["features"]) - 1, "class": "Tiny",
                                                          "n_tiles": 0, "mean_probability": None}
    assert saved["classes"]["Tiny"] == {"n_tiles": 0, "mean_probability": None}
    assert strict_loads((tmp_path / "out" / "tiles.geojson").read_text())["type"] == "FeatureCollection"


def test_malignant_regions_score_higher_than_benign(predicted):
    """Held-out slides: annotated malignant regions get higher mean probabilities than benign ones."""
    from sklearn.metrics import roc_auc_score

    labels, means = [], []
    for _, summary, _ in predicted.values():
        for region in summary["regions"]:
            if region["n_tiles"]:
                labels.append(int(region["class"] == "Cholangiocarcinoma"))
                means.append(region["mean_probability"])
    assert 0 < sum(labels) < len(labels)
    assert roc_auc_score(labels, means) > 0.8
    malignant = np.mean([m for m, y in zip(means, labels) if y])
    assert malignant > np.mean([m for m, y in zip(means, labels) if not y])


def _grid_layout(out) -> tuple[np.ndarray, TileLayout]:
    """The scored tiles of a predict output folder: probabilities and where they lie (from slide.json's grid)."""
    grid = np.load(out / "probabilities.npy")
    geometry = json.loads((out / "slide.json").read_text())["grid"]
    rows, cols = np.nonzero(np.isfinite(grid))
    coords = np.stack([cols * geometry["step"], rows * geometry["step"]], 1)
    return grid[rows, cols].astype(np.float64), TileLayout(coords, geometry["tile_extent"])


def test_the_slide_call_uses_the_runs_aggregation_and_calibration(trained_model, val_jobs, predicted, tmp_path):
    """predict applies the calibration and the aggregation its run recorded: the same run re-labelled as
    uncalibrated with smoothed_max gives the raw probabilities and their smoothed maximum as the slide score."""
    import shutil

    config = json.loads((trained_model / "config.json").read_text())
    calibration = Calibration.from_json(config["resolved"]["calibration"])
    assert config["aggregation"] == config["resolved"]["aggregation"] == train_options()["aggregation"].default
    assert calibration.method == "platt"  # the run calibrated: the test below compares two different maps
    copy = tmp_path / "relabelled"
    shutil.copytree(trained_model, copy)
    config["resolved"].update(aggregation="smoothed_max", calibration=Calibration().to_json())
    (copy / "config.json").write_text(json.dumps(config))
    job = val_jobs[0]
    raw_summary = predict_slide(copy, job.slide_path, tmp_path / "raw", annotations=job.annotation_path,
                                progress=False)
    raw, layout = _grid_layout(tmp_path / "raw")
    calibrated, _ = _grid_layout(predicted[job.slide_id][2])
    assert calibrated == pytest.approx(calibration.apply(raw), abs=1e-5)
    assert raw_summary["aggregation"] == "smoothed_max" and raw_summary["calibration"] == "none"
    assert raw_summary["slide_score"] == pytest.approx(aggregate_tiles(raw, "smoothed_max", layout), abs=1e-6)
    summary = predicted[job.slide_id][1]
    assert summary["slide_score"] == pytest.approx(aggregate_tiles(calibrated, config["aggregation"], layout),
                                                   abs=1e-6)
    called = "malignant" if summary["slide_score"] >= summary["threshold"] else "benign"
    assert summary["predicted_diagnosis"] == called


def test_whole_slide_scores_every_tissue_tile(trained_model, val_jobs, predicted, tmp_path):
    job = val_jobs[0]
    summary = predict_slide(trained_model, job.slide_path, tmp_path / "whole", progress=False, batch_size=7)
    inside = predicted[job.slide_id][1]
    assert summary["n_tiles"] >= inside["n_tiles"]
    assert "regions" not in summary
    grid = np.load(tmp_path / "whole" / "probabilities.npy")
    assert np.isnan(grid).any() and np.nanmax(grid) <= 1.0  # background cells stay empty


def test_bad_inputs(trained_model, val_jobs, tmp_path, shared_data):
    job = val_jobs[0]
    with pytest.raises(TaskError, match="model not found"):
        predict_slide(tmp_path / "nope.keras", job.slide_path, tmp_path / "o")
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "model.keras").write_bytes((trained_model / "model.keras").read_bytes())
    with pytest.raises(TaskError, match="config.json"):
        predict_slide(lone / "model.keras", job.slide_path, tmp_path / "o")
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "config.json").write_bytes((trained_model / "config.json").read_bytes())
    (fake / "model.keras").write_text("not a model")  # exists: never "not found"
    for model in (fake / "model.keras", fake / "config.json"):
        with pytest.raises(TaskError, match="not a Keras model") as err:
            predict_slide(model, job.slide_path, tmp_path / "o")
        assert err.value.path == str(model) and "not found" not in str(err.value)
    proc = subprocess.run([sys.executable, "-m", "python_task", "predict", "--model", str(trained_model / "model.keras"),
                           "--slide", str(shared_data / "broken.svs"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "broken.svs" in errors[0]
    assert not (tmp_path / "o" / "slide.json").exists()


def _contents(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_folder_holding_another_slides_outputs_is_refused_and_left_whole(trained_model, val_jobs, predicted):
    """One folder per slide: predicting a second slide into the first one's folder is refused before any work
    (most likely a mistyped --out), naming the folder and the slide it holds; nothing there changes."""
    from tests.conftest import cli_line

    first, second = val_jobs[0], val_jobs[1]
    out = predicted[first.slide_id][2]
    before = _contents(out)
    with pytest.raises(TaskError, match="holds the predictions of another slide") as err:
        predict_slide(trained_model, second.slide_path, out, annotations=second.annotation_path, progress=False)
    assert err.value.path == str(out) and str(first.slide_path) in err.value.cause
    assert cli_line(err.value) == (f"error: {out}: holds the predictions of another slide ({first.slide_path}): "
                                   "choose another --out (one folder per slide), or remove the folder to replace them")
    assert _contents(out) == before


def test_an_interrupted_predict_leaves_the_previous_outputs_whole(trained_model, val_jobs, predicted, tmp_path,
                                                                  monkeypatch):
    """A predict of the same slide (here: the whole slide, where the first run scored its annotations) stopped
    while drawing the heat-map leaves the four earlier outputs as they were, with no temporary behind; run to
    the end, it replaces all four."""
    import shutil

    from python_task.inference import predict

    job = val_jobs[0]
    out = tmp_path / "out"
    shutil.copytree(predicted[job.slide_id][2], out)
    before = _contents(out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # a Ctrl-C (or a kill) arriving part-way

    with monkeypatch.context() as patch:
        patch.setattr(predict, "draw_heatmap", interrupted)
        with pytest.raises(KeyboardInterrupt):
            predict_slide(trained_model, job.slide_path, out, progress=False)
    assert _contents(out) == before
    summary = predict_slide(trained_model, job.slide_path, out, progress=False)
    assert "regions" not in summary and json.loads((out / "slide.json").read_text())["n_tiles"] == summary["n_tiles"]
    assert np.isfinite(np.load(out / "probabilities.npy")).sum() == summary["n_tiles"]
    assert sorted(p.name for p in out.iterdir()) == ["heatmap.png", "probabilities.npy", "slide.json", "tiles.geojson"]
