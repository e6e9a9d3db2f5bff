"""The input pipeline: index, shuffling across shards, balancing, determinism, parallel fetches."""

from __future__ import annotations

import numpy as np
import pytest

from python_task.data.dataset import ShardBatches, build_index, iterate_batches
from python_task.data.sampling import epoch_order
from python_task.errors import TaskError
from python_task.shards.format import ShardWriter


def _make_shard(folder, slide_id: str, patient: str, labels: list[int], codec: str = "raw", t: int = 16) -> None:
    n = len(labels)
    # Every tile encodes its identity in its pixels: slide number in channel 0, row in channel 1.
    tiles = np.zeros((n, t, t, 3), np.uint8)
    tiles[..., 0] = int(slide_id[1:]) * 10
    tiles[..., 1] = np.arange(n)[:, None, None] * 5
    attrs = {"slide_id": slide_id, "patient_id": patient, "slide_path": "", "label_names": ["benign", "malignant"],
             "mpp": 0.5, "level": 0, "downsample": 1.0, "params": {}, "diagnosis": ""}
    with ShardWriter(folder / f"{slide_id}.h5", codec=codec, tile_size=t, attrs=attrs) as w:
        w.append(tiles, np.stack([np.arange(n), np.zeros(n)], 1), np.array(labels), np.zeros(n, np.int32),
                 np.ones(n, np.float32), np.ones(n, np.float32))


@pytest.fixture()
def shards(tmp_path):
    _make_shard(tmp_path, "S1", "P1", [0] * 12)
    _make_shard(tmp_path, "S2", "P1", [0] * 8, codec="jpeg")
    _make_shard(tmp_path, "S3", "P2", [1] * 5)
    return tmp_path


def test_index_covers_every_tile(shards):
    index = build_index(shards)
    assert len(index) == 25 and index.class_counts() == {"benign": 20, "malignant": 5}
    assert set(index.patient_ids) == {"P1", "P2"}
    sub = build_index(shards, ["S3", "S1"])
    assert len(sub) == 17 and set(sub.slide_ids) == {"S1", "S3"}
    with pytest.raises(TaskError, match="S9"):
        build_index(shards, ["S9"])


def test_batches_cover_an_epoch_once_and_mix_shards(shards):
    index = build_index(shards)
    ds = ShardBatches(index, batch_size=8, shuffle=True, seed=3, workers=1)
    seen = []
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == np.float32 and x.shape[1:] == (16, 16, 3) and y.shape == (len(x), 1)
        ids = [(int(round(p[0, 0, 0])) // 10, int(round(p[0, 0, 1])) // 5) for p in x]
        seen += ids
        # pixels really belong to the tile whose label is returned
        assert all((slide == 3) == bool(label) for (slide, _), label in zip(ids, y[:, 0]))
    assert len(seen) == 25 and len(set(seen)) == 25
    first_batch_slides = {s for s, _ in seen[:8]}
    assert len(first_batch_slides) > 1  # shuffled across shards, not shard by shard


def test_same_seed_same_order_new_epoch_new_order(shards):
    index = build_index(shards)
    a = ShardBatches(index, batch_size=5, seed=1, workers=1)
    b = ShardBatches(index, batch_size=5, seed=1, workers=1)
    np.testing.assert_array_equal(a[0][0], b[0][0])
    first = a.labels_in_order().copy(), a._order.copy()
    a.on_epoch_end()
    assert not np.array_equal(first[1], a._order)
    assert ShardBatches(index, batch_size=5, seed=2, workers=1)._order.tolist() != first[1].tolist()


def test_balancing():
    labels = np.array([0] * 90 + [1] * 10)
    rng = np.random.default_rng(0)
    over = epoch_order(labels, shuffle=True, balance="oversample", rng=rng)
    assert np.bincount(labels[over]).tolist() == [90, 90]
    under = epoch_order(labels, shuffle=True, balance="undersample", rng=rng)
    assert np.bincount(labels[under]).tolist() == [10, 10] and len(set(under)) == 20
    with pytest.raises(TaskError, match="balance"):
        epoch_order(labels, shuffle=True, balance="smote", rng=rng)


def test_unshuffled_order_and_threaded_iteration(shards):
    index = build_index(shards)
    ds = ShardBatches(index, batch_size=4, shuffle=False, workers=1)
    xs = np.concatenate([x for x, _ in iterate_batches(ds, threads=3)])
    assert len(xs) == 25
    expected = np.concatenate([np.full(12, 10), np.full(8, 20), np.full(5, 30)])
    np.testing.assert_allclose(xs[:, 0, 0, 0], expected, atol=2)


def test_transform_is_seeded_per_batch(shards):
    index = build_index(shards)

    def noise(x, rng):
        return x + rng.integers(0, 3, size=x.shape).astype(np.float32)

    a = ShardBatches(index, batch_size=4, seed=5, transform=noise, workers=1)
    b = ShardBatches(index, batch_size=4, seed=5, transform=noise, workers=1)
    np.testing.assert_array_equal(a[2][0], b[2][0])
    np.testing.assert_array_equal(a[1][0], a[1][0])


def test_mismatched_shards_refused(tmp_path):
    _make_shard(tmp_path, "S1", "P1", [0, 1], t=16)
    _make_shard(tmp_path, "S2", "P2", [0, 1], t=32)
    with pytest.raises(TaskError, match="tile size"):
        build_index(tmp_path)
