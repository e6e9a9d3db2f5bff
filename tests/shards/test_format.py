"""The shard format: contract layout, both codecs, atomic writes, lock-free reads, manifest."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from python_task.errors import TaskError
from python_task.shards.format import (
    ShardReader,
    ShardWriter,
    decode_jpeg,
    encode_jpeg,
    list_shards,
    read_encoded_rows,
    read_shard_info,
)
from python_task.shards.manifest import write_manifest


def _tiles(n: int, t: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, t, dtype=np.float32)
    smooth = (base[None, :, None, None] + base[None, None, :, None]) / 2
    return np.clip(smooth + rng.normal(0, 3, (n, t, t, 3)), 0, 255).astype(np.uint8)


def _write(path, codec: str, tiles: np.ndarray, labels=None) -> None:
    n = len(tiles)
    labels = np.arange(n) % 2 if labels is None else labels
    attrs = {"slide_id": path.stem, "patient_id": "P1", "slide_path": "/x.tiff", "label_names": ["benign", "malignant"],
             "mpp": 0.5, "level": 0, "downsample": 1.0, "params": {"tile_size": tiles.shape[1]}, "diagnosis": ""}
    with ShardWriter(path, codec=codec, tile_size=tiles.shape[1], attrs=attrs) as w:
        half = n // 2
        for sl in (slice(0, half), slice(half, n)):
            w.append(tiles[sl], np.stack([np.arange(n)[sl] * 10, np.arange(n)[sl] * 20], 1), labels[sl],
                     np.zeros(sl.stop - sl.start, np.int32), np.ones(sl.stop - sl.start, np.float32),
                     np.full(sl.stop - sl.start, 0.9, np.float32))


@pytest.mark.parametrize("codec", ["raw", "jpeg"])
def test_contract_layout_and_roundtrip(tmp_path, codec):
    tiles = _tiles(7)
    path = tmp_path / "S1.h5"
    _write(path, codec, tiles)
    with h5py.File(path, "r") as f:  # plain h5py, no plugin
        checksums = {"images_crc32"} if codec == "jpeg" else set()  # HDF5 cannot checksum variable-length data
        assert set(f) == {"images", "coords", "labels", "roi", "coverage", "tissue"} | checksums
        assert all(f[name].fletcher32 for name in f if f[name].dtype.kind != "O")  # HDF5's per-chunk checksum
        assert f["coords"].dtype == np.int64 and f["coords"].shape == (7, 2)
        assert f["roi"].dtype == np.int32 and f["coverage"].dtype == np.float32 and f["tissue"].dtype == np.float32
        assert np.issubdtype(f["labels"].dtype, np.integer)
        for key in ("codec", "slide_id", "patient_id", "slide_path", "label_names", "tile_size", "mpp", "level",
                    "downsample", "format_version", "params"):
            assert key in f.attrs, key
        assert f.attrs["codec"] == codec
        assert json.loads(f.attrs["label_names"]) == ["benign", "malignant"]
        if codec == "raw":
            assert f["images"].shape == (7, 32, 32, 3) and f["images"].dtype == np.uint8
        else:
            assert f["images"].shape == (7,)
            assert bytes(f["images"][0][:2]) == b"\xff\xd8"  # each element is a JPEG file
    with ShardReader(path) as r:
        assert len(r) == 7 and r.info.codec == codec
        got = r.images()
        np.testing.assert_array_equal(r.field("coords")[:, 0], np.arange(7) * 10)
    if codec == "raw":
        np.testing.assert_array_equal(got, tiles)
    else:
        assert np.abs(got.astype(int) - tiles).mean() < 3


def test_reader_returns_requested_order(tmp_path):
    tiles = _tiles(6)
    path = tmp_path / "S1.h5"
    _write(path, "raw", tiles)
    with ShardReader(path) as r:
        np.testing.assert_array_equal(r.images([4, 1, 3]), tiles[[4, 1, 3]])
        np.testing.assert_array_equal(r.images([2, 2]), tiles[[2, 2]])


def test_encoded_rows_are_the_stored_jpeg_files(tmp_path):
    """The one-selection read of the reader threads returns exactly what h5py's indexing returns."""
    path = tmp_path / "S1.h5"
    _write(path, "jpeg", _tiles(9))
    with h5py.File(path, "r") as f:
        ds = f["images"]
        rows = np.array([0, 3, 4, 8])
        got = read_encoded_rows(ds, rows)
        assert len(got) == 4 and all(np.array_equal(a, ds[int(r)]) for a, r in zip(got, rows))
        assert bytes(got[1][:2]) == b"\xff\xd8" and got[1].dtype == np.uint8
        assert len(read_encoded_rows(ds, np.array([], np.int64))) == 0
    with ShardReader(path) as r:
        assert r.images_dataset is r.images_dataset  # opened once
        np.testing.assert_array_equal(decode_jpeg(read_encoded_rows(r.images_dataset, np.array([5]))[0]), r.image(5))


def _sampling_factors(jpeg: bytes) -> list[int]:
    """Per-component sampling bytes of the JPEG frame header (0x11 = no chroma subsampling)."""
    i = 2
    while i < len(jpeg):
        marker, length = jpeg[i + 1], int.from_bytes(jpeg[i + 2:i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            n = jpeg[i + 9]
            return [jpeg[i + 11 + 3 * k] for k in range(n)]
        i += 2 + length
    raise AssertionError("no frame header")


def test_jpeg_is_444_high_fidelity():
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 64)
    tile = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, -ramp) / 2 + 128,
                     np.full((64, 64), 200.0)], -1)
    tile = np.clip(tile + rng.normal(0, 1, tile.shape), 0, 255).astype(np.uint8)
    data = encode_jpeg(tile, 90)
    assert _sampling_factors(data.tobytes()) == [0x11, 0x11, 0x11]
    mse = np.mean((decode_jpeg(data).astype(float) - tile) ** 2)
    assert 10 * np.log10(255**2 / mse) > 40


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "S1.h5"
    with pytest.raises(RuntimeError):
        with ShardWriter(path, codec="jpeg", tile_size=32, attrs={"slide_id": "S1"}) as w:
            w.append(_tiles(2), np.zeros((2, 2)), np.zeros(2), np.zeros(2), np.ones(2), np.ones(2))
            raise RuntimeError("crash in the middle")
    assert list(tmp_path.iterdir()) == []


def test_unknown_codec_is_refused(tmp_path):
    with pytest.raises(TaskError, match="unknown codec"):
        ShardWriter(tmp_path / "a.h5", codec="png", tile_size=32, attrs={})


def test_reads_without_file_locking(tmp_path):
    """Another process holding an exclusive HDF5 lock (as a writer, or a broken NFS lock) must not block reads."""
    path = tmp_path / "S1.h5"
    _write(path, "jpeg", _tiles(3))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, h5py; f = h5py.File(sys.argv[1], 'r+', locking=True); "
         "print('locked', flush=True); time.sleep(60)", str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OSError):  # a locking reader is refused...
            h5py.File(path, "r", locking=True)
        with ShardReader(path) as r:  # ...ours is not
            assert r.images().shape == (3, 32, 32, 3)
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("codec", ["raw", "jpeg"])
def test_datasets_carry_units_and_meaning(tmp_path, codec):
    """Plain h5py finds each dataset's units and meaning on the dataset itself (docs/formats.md)."""
    path = tmp_path / "S1.h5"
    _write(path, codec, _tiles(3))
    with h5py.File(path, "r") as f:
        for name in ("images", "coords", "labels", "roi", "coverage", "tissue"):
            assert f[name].attrs["units"] and f[name].attrs["description"], name
        assert f["coords"].attrs["units"] == "level-0 pixels"
        assert "top-left corner" in f["coords"].attrs["description"]
        assert "tile_size * downsample" in f["coords"].attrs["description"]
        assert "label_names" in f["labels"].attrs["description"]
        assert f["coverage"].attrs["units"] == f["tissue"].attrs["units"] == "fraction, 0 to 1"


@pytest.mark.parametrize("first", ["reader", "plain", "plain-unlocked"])
def test_plain_h5py_and_the_reader_share_an_open_shard(tmp_path, first):
    """A user's ``h5py.File(path, "r")`` in a process where the reader holds the shard open (and the other way
    round) opens it: HDF5 refuses a second open whose locking setting differs ("file locking flag values don't
    match"), so the reader opens as plain h5py does, and falls back to no locking only when locking fails."""
    path = tmp_path / "S1.h5"
    _write(path, "jpeg", _tiles(3))
    if first == "reader":
        with ShardReader(path) as r:
            r.images([0])
            with h5py.File(path, "r") as f:
                assert f["coords"].shape == (3, 2)
            assert r.images([1]).shape == (1, 32, 32, 3)
    else:
        with h5py.File(path, "r", **({"locking": False} if first == "plain-unlocked" else {})) as f:
            with ShardReader(path) as r:
                assert r.images().shape == (3, 32, 32, 3)
                assert read_shard_info(path).n_tiles == 3
            assert f["labels"].shape == (3,)


def test_manifest_lists_shards_with_counts(tmp_path):
    _write(tmp_path / "S1.h5", "jpeg", _tiles(4), labels=np.array([0, 0, 0, 1]))
    _write(tmp_path / "S2.h5", "raw", _tiles(2), labels=np.array([1, 1]))
    (tmp_path / ".S3.h5.abc.tmp").write_bytes(b"partial")  # an interrupted write is not a shard
    assert [p.name for p in list_shards(tmp_path)] == ["S1.h5", "S2.h5"]
    manifest = write_manifest(tmp_path)
    lines = manifest.read_text().splitlines()
    assert lines[0].startswith("slide_id,patient_id,diagnosis,shard,n_tiles,n_benign,n_malignant")
    assert lines[1].startswith("S1,P1,,S1.h5,4,3,1,jpeg,32")
    assert lines[2].startswith("S2,P1,,S2.h5,2,0,2,raw,32")


def test_not_a_shard_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_text("hello")
    with pytest.raises(TaskError, match="bad.h5"):
        read_shard_info(bad)
    with pytest.raises(TaskError, match="not found"):
        read_shard_info(tmp_path / "missing.h5")
