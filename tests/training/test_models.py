"""The architecture registry: every entry builds, saves, reloads and scales its input as documented.

Big architectures are built at small tiles (64 px, 75 for inception_v3) and run one tiny forward pass each, so
the whole file stays around a minute on two CPU cores.
"""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from python_task.errors import TaskError  # noqa: E402
from python_task.training.architectures import ARCHITECTURES, architecture_names
from python_task.training.models import InputNormalization, backbone_of, build_model, count_params, unfreeze_backbone
from tests.conftest import cli_line  # noqa: E402

SMALL = {"inception_v3": 75}  # every other architecture is built at 64 px
EXPECTED_PREPROCESSING = {"simple_cnn": "unit", "unet_encoder": "unit", "resnet50": "caffe",
                          "efficientnet_b0": "raw", "densenet121": "torch", "mobilenet_v2": "symmetric",
                          "inception_v3": "symmetric", "convnext_tiny": "raw"}
HEAD_WEIGHTS = 2  # Dense(1): kernel and bias


def small(arch: str) -> int:
    return SMALL.get(arch, 64)


def tiles(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype("float32")


def weights_of(model) -> list[np.ndarray]:
    return [np.asarray(w) for w in model.weights]


def assert_one_line(err: pytest.ExceptionInfo, *fragments: str) -> None:
    assert "\n" not in str(err.value)
    text = cli_line(err.value)  # as the command line prints it: settings named by their flags
    for fragment in fragments:
        assert fragment in text, text


# --------------------------------------------------------------------------------------------- registry

def test_registry_names_and_specs():
    assert architecture_names() == list(ARCHITECTURES)
    assert set(architecture_names()) == set(EXPECTED_PREPROCESSING)
    for name, spec in ARCHITECTURES.items():
        assert spec.name == name
        assert spec.preprocessing == EXPECTED_PREPROCESSING[name]
        assert spec.description
    assert ARCHITECTURES["inception_v3"].min_size == 75


@pytest.mark.parametrize("arch", architecture_names())
def test_build_predict_save_load_seed_freeze(arch, tmp_path):
    size = small(arch)
    model = build_model(arch, size, seed=7)
    x = tiles(2, size)
    p = np.asarray(model(x, training=False))  # eager: no tf.function tracing of a big graph
    assert p.shape == (2, 1)
    assert np.all((p > 0) & (p < 1)), p
    assert model.get_layer("preprocess").mode == ARCHITECTURES[arch].preprocessing
    assert model.output.dtype == "float32"
    assert count_params(model) == model.count_params() > 0

    # a saved model.keras reloads (custom layer registered) and predicts the same
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    np.testing.assert_allclose(np.asarray(loaded(x, training=False)), p, rtol=1e-5, atol=1e-6)
    assert loaded.get_layer("preprocess").mode == ARCHITECTURES[arch].preprocessing

    # the same seed gives the same initial weights; freeze_backbone leaves only the head trainable
    frozen = build_model(arch, size, seed=7, freeze_backbone=True)
    for a, b in zip(weights_of(model), weights_of(frozen), strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(frozen.trainable_weights) == HEAD_WEIGHTS
    assert {w.path.split("/")[0] for w in frozen.trainable_weights} == {"malignant"}
    assert len(model.trainable_weights) > HEAD_WEIGHTS
    assert backbone_of(frozen).trainable is False


def test_different_seeds_differ():
    a, b = build_model("simple_cnn", 32, seed=1), build_model("simple_cnn", 32, seed=2)
    assert any(not np.array_equal(u, v) for u, v in zip(weights_of(a), weights_of(b)))


def test_unfreeze_backbone_keeps_batchnorm_frozen():
    model = build_model("simple_cnn", 32, freeze_backbone=True)
    unfreeze_backbone(model)
    assert backbone_of(model).trainable
    bns = [layer for layer in backbone_of(model).layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and all(not layer.trainable for layer in bns)
    assert len(model.trainable_weights) > HEAD_WEIGHTS


def test_unet_encoder_depth_and_width():
    model = build_model("unet_encoder", 64, base_filters=8, depth=3)
    convs = [layer for layer in backbone_of(model).layers if isinstance(layer, keras.layers.Conv2D)]
    assert [c.filters for c in convs] == [8, 8, 16, 16, 32, 32]
    assert all(c.kernel_size == (3, 3) for c in convs)
    pools = [layer for layer in backbone_of(model).layers if isinstance(layer, keras.layers.MaxPooling2D)]
    assert len(pools) == 2


def test_mixed_precision_head_is_float32():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_model("simple_cnn", 32, seed=0)
        assert backbone_of(model).compute_dtype == "float16"
        p = model(tiles(2, 32), training=False)
        assert keras.backend.standardize_dtype(p.dtype) == "float32"
        assert np.all(np.isfinite(np.asarray(p)))
    finally:
        keras.mixed_precision.set_global_policy("float32")


# --------------------------------------------------------------------------------------------- input scaling

WHITE = {"unit": [1.0, 1.0, 1.0], "symmetric": [1.0, 1.0, 1.0],
         "caffe": [255 - 103.939, 255 - 116.779, 255 - 123.68],  # BGR order
         "torch": [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225],
         "raw": [255.0, 255.0, 255.0]}
BLACK = {"unit": [0.0] * 3, "symmetric": [-1.0] * 3, "caffe": [-103.939, -116.779, -123.68],
         "torch": [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225], "raw": [0.0] * 3}


@pytest.mark.parametrize("mode", sorted(WHITE))
def test_input_normalization_white_and_black(mode):
    layer = InputNormalization(mode)
    x = np.stack([np.full((2, 2, 3), 255.0), np.zeros((2, 2, 3))]).astype("float32")
    y = np.asarray(layer(x))
    np.testing.assert_allclose(y[0, 0, 0], WHITE[mode], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y[1, 1, 1], BLACK[mode], rtol=1e-5, atol=1e-5)
    clone = InputNormalization.from_config(layer.get_config())
    assert clone.mode == mode


@pytest.mark.parametrize("mode,module", [("caffe", "resnet50"), ("torch", "densenet"),
                                         ("symmetric", "mobilenet_v2")])
def test_input_normalization_matches_keras_applications(mode, module):
    import importlib

    preprocess_input = importlib.import_module(f"keras.applications.{module}").preprocess_input
    x = tiles(2, 8, seed=3)
    expected = preprocess_input(x.copy())
    np.testing.assert_allclose(np.asarray(InputNormalization(mode)(x)), expected, rtol=1e-5, atol=1e-4)


def test_unknown_preprocessing_mode():
    with pytest.raises(ValueError, match="unknown preprocessing mode"):
        InputNormalization("zscore")


# --------------------------------------------------------------------------------------------- weights files

def test_weights_h5_of_whole_model_reproduces_predictions(tmp_path):
    source = build_model("simple_cnn", 48, seed=1)
    path = tmp_path / "run.weights.h5"
    source.save_weights(path)
    target = build_model("simple_cnn", 48, seed=2, weights=path)
    x = tiles(3, 48)
    np.testing.assert_allclose(target(x, training=False), source(x, training=False), rtol=1e-6, atol=1e-7)
    # the tile size does not matter: convolution weights fit any size
    build_model("simple_cnn", 96, weights=path)


def test_weights_h5_of_backbone_only(tmp_path):
    source = build_model("mobilenet_v2", 32, seed=1)
    path = tmp_path / "backbone.weights.h5"
    backbone_of(source).save_weights(path)
    target = build_model("mobilenet_v2", 32, seed=2, weights=path, freeze_backbone=True)
    for a, b in zip(weights_of(backbone_of(source)), weights_of(backbone_of(target)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(target.trainable_weights) == HEAD_WEIGHTS


def test_imagenet_style_notop_h5_loads_through_keras_applications(tmp_path):
    """A legacy Keras .h5 of the include_top=False network (the layout of the distributed ImageNet files)."""
    keras.utils.set_random_seed(5)
    app = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg")
    path = tmp_path / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    app.save(path)
    target = build_model("mobilenet_v2", 48, seed=2, weights=path)
    for a, b in zip(weights_of(app), weights_of(backbone_of(target)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_model_keras_weights_by_name(tmp_path):
    source = build_model("simple_cnn", 48, seed=1)
    path = tmp_path / "model.keras"
    source.save(path)
    target = build_model("simple_cnn", 48, seed=2, weights=path)
    x = tiles(2, 48)
    np.testing.assert_allclose(target(x, training=False), source(x, training=False), rtol=1e-6, atol=1e-7)


def test_model_keras_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "model.keras"
    build_model("simple_cnn", 32, base_filters=4).save(path)
    with pytest.raises(TaskError) as err:
        build_model("unet_encoder", 32, base_filters=4, depth=2, weights=path)
    assert_one_line(err, str(path), "unet_encoder")


def test_weights_of_other_shapes_are_refused(tmp_path):
    path = tmp_path / "narrow.weights.h5"
    build_model("simple_cnn", 32, base_filters=8).save_weights(path)
    with pytest.raises(TaskError) as err:
        build_model("simple_cnn", 32, base_filters=16, weights=path)
    assert_one_line(err, str(path), "simple_cnn")
    assert err.value.path == str(path)


# --------------------------------------------------------------------------------------------- errors

def test_unknown_architecture():
    with pytest.raises(TaskError) as err:
        build_model("vgg99", 64)
    assert_one_line(err, "--arch", "unknown architecture 'vgg99'", "choose from:", "simple_cnn", "convnext_tiny")
    assert err.value.setting == "arch" and err.value.path is None


def test_missing_weights_file(tmp_path):
    missing = tmp_path / "nope.weights.h5"
    with pytest.raises(TaskError) as err:
        build_model("simple_cnn", 32, weights=missing)
    assert_one_line(err, str(missing), "not found")


@pytest.mark.parametrize("arch", ["resnet50", "simple_cnn"])
def test_imagenet_download_is_refused(arch):
    with pytest.raises(TaskError) as err:
        build_model(arch, 64, weights="imagenet")
    assert_one_line(err, "--weights", "no downloads: give a local weights file")


def test_unsupported_weights_suffix(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"\0")
    with pytest.raises(TaskError) as err:
        build_model("simple_cnn", 32, weights=path)
    assert_one_line(err, str(path), "unsupported weights file")


def test_corrupt_weights_file(tmp_path):
    path = tmp_path / "broken.weights.h5"
    path.write_bytes(b"not an hdf5 file")
    with pytest.raises(TaskError) as err:
        build_model("simple_cnn", 32, weights=path)
    assert_one_line(err, str(path))


def test_inception_v3_too_small():
    with pytest.raises(TaskError) as err:
        build_model("inception_v3", 64)
    assert_one_line(err, "--tile-size", "inception_v3", "at least 75 px", "64")


@pytest.mark.parametrize("kwargs,option", [({"dropout": 1.0}, "--dropout"), ({"base_filters": 0}, "--base-filters"),
                                           ({"tile_size": 8}, "--tile-size")])
def test_bad_options(kwargs, option):
    args = {"tile_size": 32, **kwargs}
    with pytest.raises(TaskError) as err:
        build_model("simple_cnn", args.pop("tile_size"), **args)
    assert_one_line(err, option)


def test_tile_and_grey_scaling_remove_each_tiles_stain():
    """``tile``: zero mean per tile and channel, the same output for a tile whose stain is shifted and scaled per
    channel (what a different slide's staining does, to first order). ``grey``: the three channels equal (no hue
    left), zero mean, the same output after a change of the tile's intensity and contrast. Blank glass stays
    finite in both."""
    x = 60 + 0.5 * tiles(3, 16, seed=5)  # 60..188: the shifted copies below stay inside 0..255
    y = np.asarray(InputNormalization("tile")(x))
    np.testing.assert_allclose(y.mean(axis=(1, 2)), 0.0, atol=1e-4)
    shifted = np.clip(x * np.array([0.8, 0.9, 1.1], "float32") + np.array([20, -5, 3], "float32"), 0, 255)
    assert (shifted > 0).all() and (shifted < 255).all()
    np.testing.assert_allclose(np.asarray(InputNormalization("tile")(shifted)), y, atol=0.05)
    g = np.asarray(InputNormalization("grey")(x))
    assert g.shape == x.shape and np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 0], g[..., 2])
    np.testing.assert_allclose(g.mean(axis=(1, 2)), 0.0, atol=1e-4)
    contrasted = np.repeat(20 + 0.8 * tiles(3, 16, seed=6)[..., :1], 3, axis=-1)  # grey, std ~0.27 of the scale
    np.testing.assert_allclose(np.asarray(InputNormalization("grey")(contrasted * 0.7 + 30)),
                               np.asarray(InputNormalization("grey")(contrasted)), atol=0.1)  # up to the std floor
    blank = np.full((1, 16, 16, 3), 240.0, "float32")
    for mode in ("tile", "grey"):
        assert np.all(np.isfinite(np.asarray(InputNormalization(mode)(blank))))


@pytest.mark.parametrize("arch", ["simple_cnn", "unet_encoder", "mobilenet_v2"])
def test_networks_from_scratch_use_fast_batchnorm_statistics(arch):
    """Keras' momentum 0.99 left the moving statistics far off after a small cohort's few hundred steps."""
    from python_task.training.models import BN_MOMENTUM

    model = build_model(arch, 32, base_filters=4)
    bns = [layer for layer in _all_layers(backbone_of(model)) if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and all(layer.momentum == BN_MOMENTUM for layer in bns)


def _all_layers(layer):
    for sub in getattr(layer, "layers", []) or []:
        yield sub
        yield from _all_layers(sub)


def test_input_scaling_resolves_by_weights():
    from python_task.training.architectures import resolve_input_scaling

    assert resolve_input_scaling("simple_cnn", "auto", pretrained=False) == "grey"
    assert resolve_input_scaling("resnet50", "auto", pretrained=True) == "caffe"
    assert resolve_input_scaling("resnet50", "auto", pretrained=False) == "grey"
    assert resolve_input_scaling("resnet50", "tile", pretrained=True) == "tile"
    assert resolve_input_scaling("simple_cnn", "architecture", pretrained=False) == "unit"


def test_tile_scaling_survives_a_backbone_that_rescales_inside():
    """EfficientNet and ConvNeXt divide by 255 and subtract ImageNet's mean inside: the grey/tile-standardised
    input is handed to them on that pixel scale, so their own scaling gives back the standardised tile (before the
    fix it reached the first convolution 58 to 255 times flatter, and neither network learnt: held-out AUC 0.48-0.51)."""
    from python_task.training.models import _TORCH_MEAN, _TORCH_STD, PREPROCESS

    x = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3)).astype("float32")
    plain = np.asarray(InputNormalization("grey")(x))
    scaled = np.asarray(InputNormalization("grey", pixel_scale=True)(x))
    np.testing.assert_allclose((scaled / 255.0 - np.array(_TORCH_MEAN)) / np.array(_TORCH_STD), plain, atol=1e-4)
    assert InputNormalization.from_config(InputNormalization("tile", pixel_scale=True).get_config()).pixel_scale
    for arch, expected in (("efficientnet_b0", True), ("simple_cnn", False), ("mobilenet_v2", False)):
        model = build_model(arch, 32, preprocessing="grey")
        assert model.get_layer(PREPROCESS).pixel_scale is expected, arch
    pretrained_style = build_model("efficientnet_b0", 32, preprocessing="raw")
    assert pretrained_style.get_layer(PREPROCESS).pixel_scale is False
