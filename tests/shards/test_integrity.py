"""Damaged shards are found, named and never trained on: labels outside ``label_names``, a manifest that no longer
matches, flipped bytes in a JPEG tile (CRC-32) or in a chunk (HDF5's Fletcher-32), and ``verify`` end to end."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from python_task.data.dataset import ShardBatches, TileFetcher, build_index, check_one_setting
from python_task.errors import ShardError
from python_task.shards.format import ShardReader, ShardWriter, read_encoded_rows
from python_task.shards.manifest import MANIFEST_NAME, read_manifest

CLI = [sys.executable, "-m", "python_task"]


@pytest.fixture
def shards(synth_shards, tmp_path) -> Path:
    """A private copy of the synthetic cohort's (jpeg) shards, free to damage."""
    return Path(shutil.copytree(synth_shards, tmp_path / "shards"))


def _first(folder: Path) -> Path:
    return sorted(folder.glob("*.h5"))[0]


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _tile_bytes(path: Path, row: int) -> tuple[int, bytes]:
    """Where tile ``row``'s JPEG file starts in the shard file, and its bytes."""
    with ShardReader(path) as r:
        blob = read_encoded_rows(r.images_dataset, np.array([row]))[0].tobytes()
    data = path.read_bytes()
    middle = blob[len(blob) // 2:len(blob) // 2 + 64]  # headers repeat from tile to tile, the scan does not
    assert data.count(middle) == 1
    return data.index(middle) - len(blob) // 2, blob


def _offset_of_tile(path: Path, row: int) -> int:
    """An offset inside tile ``row``'s JPEG scan data."""
    start, blob = _tile_bytes(path, row)
    return start + len(blob) // 2 + 8


def _offset_of_chunk(path: Path, dataset: str) -> int:
    with h5py.File(path, "r") as f:
        return f[dataset].id.get_chunk_info(0).byte_offset + 8


def _manifest_rows(folder: Path) -> dict:
    return {r["slide_id"]: r for r in read_manifest(folder)}


def test_labels_outside_label_names_are_refused_naming_shard_and_dataset(shards):
    from python_task.shards.verify import verify_shards

    path = _first(shards)
    with h5py.File(path, "r+") as f:  # h5py rewrites the chunk's checksum: only the labels check can see this
        f["labels"][:] = 7
    with pytest.raises(ShardError, match=r"labels: .* \(7\) are not class indexes 0\.\.1") as err:
        build_index(shards, manifest=_manifest_rows(shards), manifest_path=shards / MANIFEST_NAME)
    assert err.value.path == str(path)
    report = verify_shards(shards, progress=False)
    assert [p.path for p in report.problems] == [str(path)]


def test_manifest_counts_must_match_the_shards(shards):
    from python_task.shards.verify import verify_shards

    rows = list(csv.DictReader(open(shards / MANIFEST_NAME, newline="")))
    rows[0]["n_tiles"] = str(int(rows[0]["n_tiles"]) + 1)
    rows[0]["n_benign"] = str(int(rows[0]["n_benign"]) + 1)
    with open(shards / MANIFEST_NAME, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(ShardError, match="does not match .*manifest.csv: n_tiles") as err:
        build_index(shards, manifest=_manifest_rows(shards), manifest_path=shards / MANIFEST_NAME)
    assert err.value.path == str(shards / rows[0]["shard"])
    assert not verify_shards(shards, progress=False).ok


def test_a_flipped_bit_in_a_jpeg_tile_fails_its_crc(shards):
    from python_task.shards.verify import check_shard

    path = _first(shards)
    before = ShardReader(path).images()
    _flip_byte(path, _offset_of_tile(path, 3))
    with pytest.raises(ShardError, match="dataset images, tile 3: fails its CRC-32 checksum") as err:
        ShardReader(path).images()
    assert err.value.path == str(path)
    index = build_index(shards)
    with pytest.raises(ShardError, match="tile 3: fails its CRC-32"):
        TileFetcher(index).fetch(np.flatnonzero(index.shard == 0))
    batches = ShardBatches(index, 512, shuffle=False, workers=1)
    with pytest.raises(ShardError):
        batches[0]
    assert isinstance(batches.error, ShardError)  # kept for the training loop, whatever the backend raises
    with pytest.raises(ShardError, match="tile 3"):
        check_shard(path, decode=False)
    assert before.shape[0] > 3


def test_a_flipped_bit_in_a_chunk_fails_its_fletcher32(shards):
    path = _first(shards)
    _flip_byte(path, _offset_of_chunk(path, "labels"))
    with pytest.raises(ShardError, match="dataset labels: a chunk fails its Fletcher-32 checksum") as err:
        build_index(shards)
    assert err.value.path == str(path)


def test_raw_tiles_are_covered_by_fletcher32(tmp_path):
    from python_task.shards.verify import check_shard

    path = tmp_path / "S1.h5"
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    attrs = {"slide_id": "S1", "patient_id": "P1", "slide_path": "/x", "label_names": ["benign", "malignant"],
             "mpp": 0.5, "level": 0, "downsample": 1.0, "params": {}, "diagnosis": ""}
    with ShardWriter(path, codec="raw", tile_size=32, attrs=attrs) as w:
        w.append(tiles, np.zeros((3, 2)), np.array([0, 1, 0]), np.zeros(3), np.ones(3), np.ones(3))
    _flip_byte(path, _offset_of_chunk(path, "images"))
    with pytest.raises(ShardError, match="dataset images: a chunk fails its Fletcher-32"):
        ShardReader(path).images([0])
    with pytest.raises(ShardError, match="dataset images"):
        check_shard(path)


def test_a_tile_that_does_not_decode_names_shard_and_tile(shards):
    from python_task.shards.verify import check_shard

    path = _first(shards)
    at, blob = _tile_bytes(path, 2)
    data = bytearray(path.read_bytes())
    data[at:at + 64] = bytes(64)  # the JPEG header gone
    path.write_bytes(bytes(data))
    with h5py.File(path, "r+") as f:  # the CRC made to agree: the decoder is the last line of defence
        import zlib

        f["images_crc32"][2] = zlib.crc32(bytes(data[at:at + len(blob)]))
    with pytest.raises(ShardError, match="dataset images, tile 2: does not decode"):
        ShardReader(path).images([2])
    check_shard(path, decode=False)  # the bytes are as recorded...
    with pytest.raises(ShardError, match="tile 2: does not decode"):
        check_shard(path)  # ...but they are not a tile


def test_verify_command(shards):
    ok = subprocess.run([*CLI, "verify", "--shards", str(shards)], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert f"verified: {len(list(shards.glob('*.h5')))} shards" in ok.stdout and "error" not in ok.stderr
    damaged = _first(shards)
    _flip_byte(damaged, _offset_of_tile(damaged, 1))
    extra = shards / "EXTRA.h5"
    shutil.copy(sorted(shards.glob("*.h5"))[1], extra)  # a shard the manifest does not list
    missing = sorted(shards.glob("*.h5"))[-1]
    missing.unlink()  # a shard the manifest lists
    proc = subprocess.run([*CLI, "verify", "--shards", str(shards)], capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1
    assert len(errors) == 3, proc.stderr
    assert any(str(damaged) in e and "tile 1: fails its CRC-32" in e for e in errors)
    assert any(str(extra) in e and "not listed" in e for e in errors)
    assert any(str(missing) in e and "listed in" in e and "missing" in e for e in errors)


def test_a_shard_of_another_tile_size_is_the_one_named(shards, synth_cohort, tmp_path):
    from python_task.shards.extract import extract_cohort
    from python_task.shards.params import ExtractParams
    from python_task.shards.verify import verify_shards
    from python_task.wsi.cohort import read_cohort

    odd = _first(shards)  # first in name order: the shard a first-one-read rule would take as the reference
    job = next(j for j in read_cohort(synth_cohort) if f"{j.slide_id}.h5" == odd.name)
    extract_cohort([job], tmp_path / "small", ExtractParams(tile_size=128), progress=False)
    shutil.copyfile(tmp_path / "small" / odd.name, odd)
    found = [p for p in verify_shards(shards, decode=False, progress=False).problems if "tile size 128 px" in p.cause]
    assert [p.path for p in found] == [str(odd)]
    assert "tile size 256 px, 0.5 µm/px" in found[0].cause and "\n" not in str(found[0])
    with pytest.raises(ShardError) as exc:
        build_index(shards)
    assert exc.value.path == str(odd) and "tile size 128 px" in exc.value.cause
    # a run's sides are compared together: the odd shard and one good shard alone tie, and the good one was named
    good = sorted(p for p in shards.glob("*.h5") if p != odd)
    with pytest.raises(ShardError) as exc:
        check_one_setting(shards, [odd.stem, good[0].stem, *[p.stem for p in good[1:]]])
    assert exc.value.path == str(odd) and "other shards" in exc.value.cause


def test_a_manifest_with_one_slide_file_under_two_patients_is_refused(shards):
    path = shards / MANIFEST_NAME
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["slide_path"] and rows[0]["patient_id"] != rows[-1]["patient_id"]
    rows[-1]["slide_path"] = rows[0]["slide_path"]  # shards of two cohort tables, one file under two patients
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(ShardError) as exc:
        read_manifest(shards)
    assert exc.value.path == str(path) and "listed under two patients" in exc.value.cause
    assert rows[0]["patient_id"] in exc.value.cause and rows[-1]["patient_id"] in exc.value.cause
