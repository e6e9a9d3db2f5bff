"""Augmentation layers: shape/dtype/range kept, exact symmetries, identity at inference, seeded, serialisable;
and the preview figure."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from python_task.errors import TaskError  # noqa: E402
from python_task.transforms.augment_layers import (
    RandomDeform,
    RandomDihedral,
    RandomHED,
    augment_function,
    bilinear_sample,
    build_augmenter,
)
from python_task.transforms.augmentations import AUGMENTATIONS, AugmentOptions, parse_augment

METHODS = ("flip", "rot90", "rotate", "scale", "elastic", "grid", "hed")
ALL = ",".join(METHODS)


def he_tiles(n: int = 6, size: int = 48, seed: int = 0) -> np.ndarray:
    """H&E-like float32 tiles in [0, 255] (integer valued, as tiles from shards are), all different."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for _ in range(n):
        e = 0.5 + 0.2 * np.sin(xx / 5.0 + rng.uniform(0, 6)) + rng.normal(0, 0.05, (size, size))
        h = np.zeros((size, size))
        for _ in range(6):
            cy, cx = rng.uniform(0, size, 2)
            h[(yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(4, 25)] = rng.uniform(0.5, 1.2)
        od = h[..., None] * np.array([0.65, 0.70, 0.29]) + e[..., None] * np.array([0.07, 0.99, 0.11])
        out.append(np.clip(np.rint(256 * np.exp(-od) - 1), 0, 255))
    return np.stack(out).astype(np.float32)


def dihedral(img: np.ndarray) -> list[np.ndarray]:
    """The 8 symmetries of a square image (H, W, C)."""
    rots = [np.rot90(img, k, axes=(0, 1)) for k in range(4)]
    return rots + [r[:, ::-1] for r in rots]


def run(aug, x, training=True) -> np.ndarray:
    return keras.ops.convert_to_numpy(aug(x, training=training))


# --------------------------------------------------------------------------------------------- names, options

def test_parse_augment():
    assert set(AUGMENTATIONS) == set(METHODS) and all(AUGMENTATIONS.values())
    assert parse_augment("flip,rot90,elastic") == ("flip", "rot90", "elastic")
    assert parse_augment(" Flip , rot90,flip,") == ("flip", "rot90")
    assert parse_augment(["hed", "grid,scale"]) == ("hed", "grid", "scale")
    for nothing in ("none", "", None, [], "none,"):
        assert parse_augment(nothing) == ()
    with pytest.raises(TaskError, match=r"augment: unknown augmentation 'blur'; choose from: none, flip, rot90"):
        parse_augment("flip,blur")
    assert build_augmenter("none", seed=0) is None


def test_options_are_validated():
    with pytest.raises(TaskError, match="elastic_sigma"):
        build_augmenter("elastic", seed=0, options=AugmentOptions(elastic_sigma=0))
    with pytest.raises(TaskError, match="scale_range"):
        build_augmenter("scale", seed=0, options=AugmentOptions(scale_range=-0.1))
    with pytest.raises(TaskError, match="hed_sigma"):
        build_augmenter("hed", seed=0, options=AugmentOptions(hed_sigma=float("nan")))
    with pytest.raises(TaskError, match="unknown option"):
        build_augmenter("hed", seed=0, options={"hue": 1.0})
    assert build_augmenter("hed", seed=0, options={"hed_sigma": 0.1}) is not None


# --------------------------------------------------------------------------------------------- contract

@pytest.mark.parametrize("names", [*METHODS, ALL])
def test_each_method_keeps_shape_dtype_range_and_is_identity_at_inference(names):
    x = he_tiles()
    aug = build_augmenter(names, seed=3)
    y = run(aug, x)
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.all(np.isfinite(y)) and y.min() >= 0 and y.max() <= 255
    assert not np.array_equal(y, x)  # it did something
    assert np.array_equal(run(aug, x, training=False), x)
    assert np.array_equal(run(aug, x[:1], training=False), x[:1])
    # inputs outside [0, 255] come back clipped, never NaN
    wild = x.copy()
    wild[0, :4] = -50.0
    wild[1, :4] = 900.0
    y = run(aug, wild)
    assert np.all(np.isfinite(y)) and y.min() >= 0 and y.max() <= 255


@pytest.mark.parametrize("flip,rot90", [(True, False), (False, True), (True, True)])
def test_flips_and_quarter_turns_are_exact_pixel_permutations(flip, rot90):
    x = he_tiles(n=4, size=24)
    x = np.concatenate([x] * 8)  # 32 images: every image gets its own random transform
    layer = RandomDihedral(flip=flip, rot90=rot90, seed=5)
    used = set()
    for _ in range(3):
        y = run(layer, x)
        for a, b in zip(x, y):
            assert np.array_equal(np.sort(a, axis=None), np.sort(b, axis=None))
            matches = [k for k, d in enumerate(dihedral(a)) if np.array_equal(d, b)]
            assert matches, "not one of the 8 symmetries of the input"
            used.add(matches[0])
    if flip and rot90:
        assert used == set(range(8))
    elif rot90:
        assert used == {0, 1, 2, 3}  # rotations only
    else:
        assert used == {0, 2, 4, 6}  # identity, flips, and their product (a half turn)


def test_folded_symmetries_in_the_resampler_are_exact_too():
    """With no deformation range, the fused resampler applies the dihedral symmetry exactly (integer
    coordinates, bilinear weights 0/1)."""
    x = he_tiles(n=8, size=20)
    y = run(RandomDeform(flip=True, rot90=True, seed=2), x)
    for a, b in zip(x, y):
        assert any(np.array_equal(d, b) for d in dihedral(a))


def test_bilinear_sampler_is_exact_on_integers_and_reflects_at_borders():
    x = he_tiles(n=2, size=8)
    ys, xs = np.meshgrid(np.arange(8.0), np.arange(8.0), indexing="ij")
    ident = keras.ops.convert_to_numpy(bilinear_sample(x, np.stack([ys] * 2).astype("float32"),
                                                       np.stack([xs] * 2).astype("float32")))
    assert np.array_equal(ident, x)
    shifted = keras.ops.convert_to_numpy(bilinear_sample(x, np.stack([ys - 2] * 2).astype("float32"),
                                                         np.stack([xs + 0.5] * 2).astype("float32")))
    np.testing.assert_allclose(shifted[:, 0, 0], (x[:, 2, 0] + x[:, 2, 1]) / 2, atol=1e-4)  # row -2 -> row 2
    np.testing.assert_allclose(shifted[:, 3, 7], x[:, 1, 6] * 0.5 + x[:, 1, 7] * 0.5, atol=1e-4)  # 7.5 -> 6.5


def test_same_seed_same_output_different_seed_different():
    x = he_tiles()
    a = run(build_augmenter(ALL, seed=11), x)
    b = run(build_augmenter(ALL, seed=11), x)
    c = run(build_augmenter(ALL, seed=12), x)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)
    aug = build_augmenter(ALL, seed=11)
    first, second = run(aug, x), run(aug, x)
    assert np.array_equal(first, a) and not np.allclose(first, second)  # the generator moves on between batches


def test_hed_jitter_with_zero_range_is_the_identity():
    x = he_tiles()
    x[0, 0, 0] = (0, 255, 128)
    y = run(RandomHED(sigma=0.0, bias=0.0, seed=1), x)
    assert np.abs(y - x).max() < 0.01
    z = run(RandomHED(sigma=0.2, bias=0.05, seed=1), x)
    assert np.abs(z - x).mean() > 1.0
    # a pure scale of the haematoxylin channel leaves white white
    white = np.full((2, 8, 8, 3), 255.0, np.float32)
    assert np.abs(run(RandomHED(sigma=0.3, bias=0.0, seed=1), white) - 255).max() < 0.01


def test_deformations_move_pixels_but_keep_the_picture():
    x = he_tiles(n=8, size=64)
    for names, opts in [("rotate", AugmentOptions()), ("scale", AugmentOptions()), ("grid", AugmentOptions()),
                        ("elastic", AugmentOptions())]:
        y = run(build_augmenter(names, seed=4, options=opts), x)
        diff = np.abs(y - x).mean()
        assert 0.5 < diff < 40, (names, diff)
        # colours are preserved (interpolation, no colour change): per-image mean within a few levels
        assert np.abs(y.mean(axis=(1, 2)) - x.mean(axis=(1, 2))).max() < 12, names
    strong = run(build_augmenter("elastic", seed=4, options=AugmentOptions(elastic_alpha=24)), x)
    mild = run(build_augmenter("elastic", seed=4, options=AugmentOptions(elastic_alpha=4)), x)
    assert np.abs(strong - x).mean() > np.abs(mild - x).mean()


# --------------------------------------------------------------------------------------------- Keras integration

def test_layers_serialise_and_train_inside_a_model(tmp_path):
    aug = build_augmenter(ALL, seed=7, options=AugmentOptions(grid_steps=3, elastic_sigma=4.0))
    assert all(layer.compute_dtype == "float32" for layer in aug.layers)
    for layer in aug.layers:
        clone = type(layer).from_config(layer.get_config())
        assert clone.get_config() == layer.get_config()
    inner = keras.Sequential([keras.Input((24, 24, 3)), keras.layers.Rescaling(1 / 255.0),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1, activation="sigmoid")])
    model = keras.Sequential([keras.Input((24, 24, 3)), aug, inner], name="train_wrapper")
    model.compile(optimizer="adam", loss="binary_crossentropy")
    x = he_tiles(n=8, size=24)
    y = (np.arange(8) % 2).astype("float32")[:, None]
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)  # graph mode, dynamic batch
    path = tmp_path / "wrapper.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert [type(layer).__name__ for layer in loaded.layers[0].layers] == \
        [type(layer).__name__ for layer in aug.layers]
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    compiled = augment_function(build_augmenter("flip,rot90,hed", seed=1))
    out = compiled(x)
    assert out.shape == x.shape and out.dtype == np.float32 and not np.array_equal(out, x)


# --------------------------------------------------------------------------------------------- preview

@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    from python_task.shards.format import ShardWriter

    folder = tmp_path_factory.mktemp("shards")
    for k, (slide, labels) in enumerate([("S1", [0, 0, 1]), ("S2", [1, 1, 0]), ("S3", [0, 1])]):
        tiles = he_tiles(n=len(labels), size=64, seed=k).astype(np.uint8)
        n = len(labels)
        attrs = {"slide_id": slide, "patient_id": f"P{k}", "slide_path": "", "label_names": ["benign", "malignant"],
                 "mpp": 0.5, "level": 0, "downsample": 1.0, "params": {}, "diagnosis": ""}
        with ShardWriter(folder / f"{slide}.h5", codec="raw", tile_size=64, attrs=attrs) as w:
            w.append(tiles, np.stack([np.arange(n), np.zeros(n)], 1), np.array(labels), np.zeros(n, np.int32),
                     np.ones(n, np.float32), np.ones(n, np.float32))
    return folder


def test_render_preview_writes_a_png(tiny_shards, tmp_path):
    import matplotlib.image

    from python_task.data.dataset import build_index
    from python_task.transforms.preview import pick_tiles, render_preview

    out = render_preview(tiny_shards, tmp_path / "grid.png", augment="flip,rot90,elastic,hed", tiles=4, columns=3)
    assert out == tmp_path / "grid.png" and out.stat().st_size > 0
    img = matplotlib.image.imread(out)
    assert img.ndim == 3 and img.shape[2] in (3, 4) and img.shape[0] > 200 and img.shape[1] > 200
    assert img.shape[1] > img.shape[0]  # 4 columns (original + 3) by 4 rows, plus the labels
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]  # written atomically, no leftovers
    out2 = render_preview(tiny_shards, tmp_path / "stain.png", augment="rotate,grid", stain="macenko", tiles=2,
                          columns=1)
    assert matplotlib.image.imread(out2).shape[1] > 0
    index = build_index(tiny_shards)
    picked = pick_tiles(index, 4, seed=0)
    assert len(set(index.labels[picked])) == 2 and len(set(index.slide_ids[picked])) >= 2
    with pytest.raises(TaskError, match="tiles"):
        render_preview(tiny_shards, tmp_path / "x.png", tiles=0)
    with pytest.raises(TaskError, match="nothing to preview"):
        render_preview(tiny_shards, tmp_path / "x.png", augment="none")
    with pytest.raises(TaskError, match="unknown augmentation"):
        render_preview(tiny_shards, tmp_path / "x.png", augment="warp")
