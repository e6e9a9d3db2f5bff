"""``demo`` end to end on a reduced configuration (the default one takes a few minutes)."""

from __future__ import annotations

import csv
import os
import stat
from collections import Counter

from python_task.experiments.demo import DemoConfig, held_out_line, run_demo


def test_reduced_demo_runs_the_whole_chain(tmp_path):
    cfg = DemoConfig(patients=4, slide_size=2048, folds=2, archs=("simple_cnn",), stains=("none",), epochs=1)
    old_mask = os.umask(0o022)
    try:
        outputs = run_demo(tmp_path / "demo", cfg)
    finally:
        os.umask(old_mask)
    _assert_readable_by_all(tmp_path / "demo")
    for path in outputs.values():
        assert path.exists(), path
    with open(outputs["results"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    assert "ranking" in outputs["report"].read_text()
    heatmaps = [k for k in outputs if k.startswith("heatmap")]
    assert len(heatmaps) == 2  # one slide of each diagnosis
    again = run_demo(tmp_path / "demo", cfg)  # resumes: nothing to redo
    assert again == outputs


def _assert_readable_by_all(root):
    """Under umask 022 every output of every command the demo runs (synth: slides, GeoJSON, cohort.csv; extract:
    shards, manifest; split; sweep: train's model.keras, metrics.json, config.json, CSVs, logs; report: HTML, CSV,
    PNG; predict: heatmap.png, probabilities.npy, tiles.geojson, slide.json) is 0644 and every folder 0755, as
    ``open()`` and ``mkdir`` give: colleagues on a shared filesystem can read them."""
    modes, kinds = {}, Counter()
    for path in root.rglob("*"):
        modes[path.relative_to(root).as_posix()] = stat.S_IMODE(path.stat().st_mode)
        kinds[path.suffix] += path.is_file()
    wrong = {p: oct(m) for p, m in modes.items() if m != (0o755 if (root / p).is_dir() else 0o644)}
    assert not wrong, wrong
    for suffix in (".tiff", ".geojson", ".csv", ".h5", ".json", ".keras", ".png", ".html", ".npy", ".log"):
        assert kinds[suffix] > 0, suffix  # every kind of output was there to check


def test_the_held_out_line_counts_the_slides_and_patients_called_right():
    point = {"fold": 1, "n_val_slides": 6.0, "val_slide_accuracy": 5 / 6, "n_val_patients": "4",
             "val_patient_accuracy": "0.75"}
    assert held_out_line(point) == ("fold 1 of the best configuration: 5 of 6 held-out slides and 3 of 4 held-out "
                                    "patients called right")
    assert held_out_line({"fold": 0}) == "fold 0 of the best configuration: no decision metrics recorded"
