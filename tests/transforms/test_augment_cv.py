"""The pipeline augmentation engine (numpy + OpenCV in the reader threads): shape/dtype/range kept, exact
symmetries, HED identity at zero range, the same statistics as the Keras layers, repeatable per batch seed,
and wired into train (``--augment-on``)."""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from python_task.errors import TaskError
from python_task.transforms.augment_cv import PipelineAugmenter, apply_hed, as_uint8
from python_task.transforms.augmentations import AugmentOptions, resolve_engine
from tests.transforms.test_augment_layers import ALL, METHODS, dihedral, he_tiles


def tiles_u8(n: int = 6, size: int = 48, seed: int = 0) -> np.ndarray:
    return he_tiles(n, size, seed).astype(np.uint8)


@pytest.mark.parametrize("names", [*METHODS, ALL])
def test_each_method_keeps_shape_dtype_range_and_changes_the_tiles(names):
    x = tiles_u8()
    y = PipelineAugmenter(names)(x, np.random.default_rng(0))
    assert y.shape == x.shape and y.dtype == np.uint8  # uint8: every value in [0, 255] by construction
    assert not np.array_equal(y, x)
    assert np.array_equal(x, tiles_u8())  # the input is never modified in place
    one = PipelineAugmenter(names)(x[0], np.random.default_rng(0))
    assert one.shape == x[0].shape and one.dtype == np.uint8


def test_float_input_is_rounded_and_clipped_first():
    x = he_tiles(n=2, size=16)
    wild = x.copy()
    wild[0, :2] = -40.0
    wild[1, :2] = 700.0
    u = as_uint8(wild)
    assert u.dtype == np.uint8 and u[0, 0, 0, 0] == 0 and u[1, 0, 0, 0] == 255
    assert np.array_equal(as_uint8(x), x.astype(np.uint8))
    y = PipelineAugmenter("hed,elastic")(wild, np.random.default_rng(1))
    assert y.dtype == np.uint8 and y.shape == wild.shape


@pytest.mark.parametrize("names,expected", [("flip", {0, 2, 4, 6}), ("rot90", {0, 1, 2, 3}),
                                            ("flip,rot90", set(range(8)))])
def test_flips_and_quarter_turns_are_exact_pixel_permutations(names, expected):
    x = np.concatenate([tiles_u8(n=4, size=24)] * 8)
    aug = PipelineAugmenter(names)
    used = set()
    for seed in range(3):
        y = aug(x, np.random.default_rng(seed))
        for a, b in zip(x, y):
            matches = [k for k, d in enumerate(dihedral(a)) if np.array_equal(d, b)]
            assert matches, "not one of the 8 symmetries of the input"
            used.add(matches[0])
    assert used == expected


def test_symmetries_with_a_warp_are_exact_too():
    """Zero deformation ranges with flips and rotations on: the remap's integer coordinates copy pixels, then
    the symmetry permutes them."""
    opts = AugmentOptions(rotate_degrees=0.0, scale_range=0.0)
    aug = PipelineAugmenter("flip,rot90,rotate,scale", opts)
    assert aug.geometric
    x = np.concatenate([tiles_u8(n=4, size=20)] * 4)
    y = aug(x, np.random.default_rng(3))
    for a, b in zip(x, y):
        assert any(np.array_equal(d, b) for d in dihedral(a))


def test_hed_jitter_with_zero_range_is_the_identity():
    x = tiles_u8(n=3, size=32)
    x[0, 0, 0] = (0, 255, 128)
    x[1] = 255
    assert np.array_equal(apply_hed(x[0], np.ones(3), np.zeros(3)), x[0])
    same = PipelineAugmenter("hed", AugmentOptions(hed_sigma=0.0, hed_bias=0.0))(x, np.random.default_rng(0))
    assert np.array_equal(same, x)
    strong = PipelineAugmenter("hed", AugmentOptions(hed_sigma=0.2, hed_bias=0.05))(x, np.random.default_rng(0))
    assert np.abs(strong[0].astype(float) - x[0]).mean() > 1.0
    white = np.full((8, 8, 3), 255, np.uint8)  # a pure scale of the stains leaves white white
    assert np.array_equal(apply_hed(white, np.array([1.3, 0.7, 1.2]), np.zeros(3)), white)


def test_hed_matches_the_optical_density_formula():
    """Scale and shift in HED space computed directly (float64, Ruifrok deconvolution), against the fused
    look-up-table + 3x3 map: equal to rounding."""
    from python_task.transforms.stain import HED_FROM_RGB, RGB_FROM_HED

    x = tiles_u8(n=1, size=32)[0]
    scale, shift = np.array([1.1, 0.92, 1.05]), np.array([0.03, -0.02, 0.01])
    od = -np.log((x.astype(np.float64) + 1.0) / 256.0)
    expected = np.clip(256.0 * np.exp(-((od @ HED_FROM_RGB * scale + shift) @ RGB_FROM_HED)) - 1.0, 0, 255)
    got = apply_hed(x, scale, shift).astype(np.float64)
    assert np.abs(got - expected).max() <= 0.51 + 1e-3
    assert np.abs(got - x).mean() > 1.0


def test_deformations_move_pixels_but_keep_the_picture():
    x = tiles_u8(n=8, size=64)
    for names in ("rotate", "scale", "grid", "elastic"):
        y = PipelineAugmenter(names)(x, np.random.default_rng(4)).astype(float)
        diff = np.abs(y - x).mean()
        assert 0.5 < diff < 40, (names, diff)
        assert np.abs(y.mean(axis=(1, 2)) - x.mean(axis=(1, 2))).max() < 12, names
    strong = PipelineAugmenter("elastic", AugmentOptions(elastic_alpha=24))(x, np.random.default_rng(4))
    mild = PipelineAugmenter("elastic", AugmentOptions(elastic_alpha=4))(x, np.random.default_rng(4))
    assert np.abs(strong.astype(float) - x).mean() > np.abs(mild.astype(float) - x).mean()


def test_elastic_field_has_the_layers_magnitude_and_smoothness():
    """The coarse-lattice field: standard deviation elastic_alpha / 4 px, correlated over about sigma px."""
    opts = AugmentOptions(elastic_alpha=8.0, elastic_sigma=6.0)
    aug = PipelineAugmenter("elastic", opts)
    rng = np.random.default_rng(0)
    pairs = np.stack([aug._elastic_field(128, 128, opts.elastic_alpha / 4, rng) for _ in range(100)])
    assert pairs.shape == (100, 128, 128, 2) and pairs.dtype == np.float32  # (x, y) displacements per pixel
    assert abs(np.corrcoef(pairs[:, 64, 64, 0], pairs[:, 64, 64, 1])[0, 1]) < 0.3  # drawn independently
    fields = np.concatenate([pairs[..., 0], pairs[..., 1]])
    std = fields[:, 8:-8, 8:-8].std()
    assert 1.6 < std < 2.4, std
    near = np.corrcoef(fields[:, 64, 64], fields[:, 64, 66])[0, 1]  # 2 px apart: nearly the same displacement
    far = np.corrcoef(fields[:, 64, 64], fields[:, 64, 100])[0, 1]  # 36 px = 6 sigma apart: independent
    assert near > 0.85 and abs(far) < 0.25, (near, far)


def test_same_generator_same_output_and_threads_do_not_matter():
    x = tiles_u8(n=16, size=48)
    aug = PipelineAugmenter(ALL)
    a = aug(x, np.random.default_rng([5, 0, 1]))
    assert np.array_equal(a, aug(x, np.random.default_rng([5, 0, 1])))
    assert not np.array_equal(a, aug(x, np.random.default_rng([5, 0, 2])))
    with ThreadPoolExecutor(max_workers=4) as pool:  # per-batch generators: scheduling cannot change the result
        outs = list(pool.map(lambda k: aug(x, np.random.default_rng([5, 0, k])), [1, 2, 1, 2, 1]))
    assert all(np.array_equal(outs[0], o) for o in outs[::2])
    assert np.array_equal(outs[0], a)


def test_resolve_engine():
    assert resolve_engine("auto", accelerator=False) == "pipeline"
    assert resolve_engine("auto", accelerator=True) == "model"
    assert resolve_engine("model", accelerator=False) == "model"
    assert resolve_engine("pipeline", accelerator=True) == "pipeline"
    with pytest.raises(TaskError, match="augment_on"):
        resolve_engine("gpu", accelerator=False)
    assert not PipelineAugmenter("none")


def test_shard_batches_augment_in_the_reader_threads(synth_shards):
    from python_task.data.dataset import ShardBatches, build_index

    index = build_index(synth_shards)
    plain = ShardBatches(index, 8, shuffle=True, seed=1, workers=1)
    aug = ShardBatches(index, 8, shuffle=True, seed=1, workers=1, transform=PipelineAugmenter("flip,rot90"))
    x0, y0 = plain[0]
    x1, y1 = aug[0]
    assert x1.dtype == np.float32 and x1.shape == x0.shape and np.array_equal(y0, y1)
    for a, b in zip(x0, x1):  # the same tiles, each one of its own 8 symmetries
        assert any(np.array_equal(d, b) for d in dihedral(a))
    assert np.array_equal(aug[0][0], x1)  # the same batch again: the same draws


def test_train_with_pipeline_augmentation_records_the_engine(learn_data, tmp_path):
    pytest.importorskip("keras")
    from python_task.training.config import TrainConfig
    from python_task.training.loop import train

    shards, splits = learn_data
    cfg = TrainConfig(shards=shards, splits=splits, fold=0, arch="simple_cnn", out=tmp_path / "run", epochs=1,
                      batch_size=16, augment="flip,rot90,elastic,hed", augment_on="pipeline", stain="macenko",
                      max_train_tiles=64, max_val_tiles=48, base_filters=8, workers=2, verbose=False,
                      tensorboard=False, patience=0)
    metrics = train(cfg)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["augment_on"] == "pipeline" and config["resolved"]["augment_on"] == "pipeline"
    assert config["augment"] == "flip,rot90,elastic,hed" and config["stain"] == "macenko"
    assert 0.0 <= metrics["stain_passthrough_fraction"] <= 1.0
    import keras

    saved = keras.saving.load_model(tmp_path / "run" / "model.keras", compile=False)
    assert not any("augmenter" in layer.name for layer in saved.layers)  # nothing of it in the saved model
    with pytest.raises(TaskError, match="augment_on"):
        train(TrainConfig(shards=shards, splits=splits, fold=0, arch="simple_cnn", out=tmp_path / "bad",
                          augment_on="gpu"))


def test_a_resumed_run_keeps_the_engine_its_checkpoint_was_made_with(tmp_path):
    keras = pytest.importorskip("keras")
    from python_task.training.checkpoints import checkpoint_engine
    from python_task.training.config import TrainConfig
    from python_task.transforms.augment_layers import build_augmenter

    cfg = TrainConfig(shards=tmp_path, splits=tmp_path / "s.json", fold=0, arch="simple_cnn", out=tmp_path,
                      augment="flip,hed", augment_on="auto")
    inner = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1)])
    wrapper = keras.Sequential([keras.Input((8, 8, 3)), build_augmenter("flip,hed", seed=0), inner],
                               name="train_wrapper")
    assert checkpoint_engine(cfg, wrapper) == "model"  # layers in the checkpoint: never augment twice
    assert checkpoint_engine(cfg, inner) == "pipeline"
    assert checkpoint_engine(dataclasses.replace(cfg, augment="none"), inner) == "model"
