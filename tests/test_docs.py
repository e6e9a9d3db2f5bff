"""The documentation lives in the repository: formats.md's shard example runs as written, and no file of the
project sends a reader outside the repository (only the tests, and the benchmarks, may read real slides from the
folder ``PYTHON_TASK_SHARED_DATA`` names)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FORMATS = REPO / "docs" / "formats.md"

# A path that leaves the repository: a sibling folder (../shared, ../design, ...) or the shared design notes.
OUTSIDE = re.compile(r"(?<!\.)\.\./[A-Za-z_]|parents?\[\d\]\s*/\s*\"shared\"|\bparent\s*/\s*\"shared\"|"
                     r"shared/(design|reference)|\bcontracts\.md\b|\bfield\.md\b")
# The one place the tests (and benchmarks) find the real slides; the folder can be moved with the variable.
ALLOWED = {("tests/conftest.py", 'REPO_ROOT.parent / "shared" / "data"'),
           ("benchmarks/_common.py", 'REPO.parent / "shared" / "data"'),
           # hostile input, not a reference: ids and paths that try to leave their folder
           ("tests/wsi/test_cohort.py", 'SlideJob("../escaped"'),
           ("tests/wsi/test_cohort.py", "invalid id '../escaped'"),
           ("tests/wsi/test_cohort.py", "slides/../slides/s.tiff")}


def _tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    files = []
    for name in names:
        path = REPO / name
        if path.is_file() and path.suffix not in (".png", ".gz", ".zip", ".h5", ".tiff", ".keras", ".npy"):
            files.append(path)
    return files


def test_no_file_points_outside_the_repository():
    offenders = []
    for path in _tracked_text_files():
        if path == Path(__file__).resolve():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        rel = path.relative_to(REPO).as_posix()
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line) and not any(rel == f and snippet in line for f, snippet in ALLOWED):
                offenders.append(f"{rel}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_formats_md_shard_example_runs_as_written(tmp_path):
    """The 15-line plain-h5py example of docs/formats.md, run on a real shard of each codec."""
    from python_task.shards.format import ShardWriter

    text = FORMATS.read_text(encoding="utf-8")
    section = text.split("### Reading a shard with plain h5py", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 18
    tiles = np.stack([np.full((16, 16, 3), 120, np.uint8), np.full((16, 16, 3), 30, np.uint8)])
    tiles[1, ::2] = 200  # JPEG files of different lengths: ShardWriter fails on a batch of equal-length ones
    for codec in ("jpeg", "raw"):
        folder = tmp_path / codec / "shards"
        folder.mkdir(parents=True)
        attrs = {"slide_id": "P001_S1", "patient_id": "P001", "slide_path": "s.tiff",
                 "label_names": ["benign", "malignant"], "mpp": 0.5, "level": 0, "downsample": 2.0, "params": {}}
        with ShardWriter(folder / "P001_S1.h5", codec=codec, tile_size=16, attrs=attrs) as writer:
            writer.append(tiles, np.array([[64, 32], [96, 32]]), np.array([1, 0]), np.zeros(2, np.int32),
                          np.ones(2, np.float32), np.ones(2, np.float32))
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / codec, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "tile 0: malignant, (16, 16, 3), level-0 [64, 96.0) x [32, 64.0)"


def test_formats_md_names_every_shard_dataset_and_output():
    text = FORMATS.read_text(encoding="utf-8")
    from python_task.shards.format import DATASET_ATTRS

    for name, (units, _) in DATASET_ATTRS.items():
        assert f"| `{name}` |" in text and units in text, name
    for name in ("manifest.csv", "splits.json", "metrics.json", "results.csv", "PLAN.yaml", "slide.json",
                 "tiles.geojson", "probabilities.npy", "heatmap.png", "config.json", "predictions.csv"):
        assert name in text, name
