"""``demo`` end to end on a reduced configuration (the default one takes a few minutes)."""

from __future__ import annotations

import csv

from python_task.experiments.demo import DemoConfig, run_demo


def test_reduced_demo_runs_the_whole_chain(tmp_path):
    cfg = DemoConfig(patients=4, slide_size=2048, folds=2, archs=("simple_cnn",), stains=("none",), epochs=1)
    outputs = run_demo(tmp_path / "demo", cfg)
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
