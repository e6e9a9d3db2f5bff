"""The architectures' builders: every registry entry (:mod:`python_task.training.architectures`) becomes a binary
tile classifier (one sigmoid output = P(malignant)).

Every model built here takes RGB tiles as floats in ``[0, 255]`` (uint8 range, shape ``(T, T, 3)``) and applies
its own architecture-matching input scaling as its first layer (:class:`InputNormalization`, named
``preprocess``), so a saved ``model.keras`` needs no outside preprocessing at prediction time.

Layout of every model (names are part of the interface; ``train`` and ``predict`` rely on them)::

    tile (Input, T x T x 3, 0-255) -> preprocess -> backbone (sub-model, ends in global average pooling)
                                   -> dropout -> malignant (Dense(1, sigmoid), float32 even under mixed precision)

``freeze_backbone=True`` sets ``backbone.trainable = False`` (only the head trains); fine-tuning later sets it back
(:func:`unfreeze_backbone`). Only ``keras.ops`` / ``keras.layers`` are used, so the models build and run under the
TensorFlow and the JAX backends alike. Nothing is ever downloaded: pretrained weights come from a local file only.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import keras
import numpy as np
from keras import layers, ops

import python_task.transforms.augment_layers  # noqa: F401 - registers the layers a saved training wrapper may hold
from python_task.errors import ConfigError
from python_task.training.architectures import ARCHITECTURES, PREPROCESSING_MODES, ModelSpec

__all__ = [
    "InputNormalization",
    "backbone_of",
    "build_model",
    "count_params",
    "unfreeze_backbone",
]

BACKBONE = "backbone"
HEAD = "malignant"
PREPROCESS = "preprocess"

# ImageNet statistics as used by keras.applications' 'caffe' (BGR order) and 'torch' (RGB order) modes.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
TILE_STD_FLOOR = 0.02  # "tile"/"grey" scaling: added to the tile's standard deviation (unit scale): blank glass stays
# finite
# Keras' default BatchNormalization momentum, 0.99, left the moving variance of simple_cnn's first layer 7-40x too
# large after 8 epochs of 8-12 synthetic patients (a few hundred steps), so every evaluation ran with wrong
# statistics; 0.9 tracks them within 2 % (README, "Defaults that learn the lesion").
BN_MOMENTUM = 0.9


# --------------------------------------------------------------------------------------------- input scaling

@keras.saving.register_keras_serializable(package="python_task")
class InputNormalization(keras.layers.Layer):
    """Scale RGB in [0, 255] the way a backbone expects; see :data:`PREPROCESSING_MODES`.

    Serialisable (``get_config``), so a saved ``model.keras`` keeps its input scaling.
    """

    def __init__(self, mode: str = "unit", pixel_scale: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        if mode not in PREPROCESSING_MODES:
            raise ValueError(f"unknown preprocessing mode {mode!r}; choose from: {', '.join(PREPROCESSING_MODES)}")
        self.mode = mode
        # "tile"/"grey" in front of a backbone that rescales inside (EfficientNet, ConvNeXt: x / 255, then ImageNet
        # mean and std): the standardised tile is put back on that pixel scale, so the backbone's own scaling
        # returns it unchanged. Without this the tile's contrast would reach the first layer 58 (ConvNeXt) to 255 (EfficientNet) times flatter.
        self.pixel_scale = bool(pixel_scale)

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.mode == "unit":
            return x / 255.0
        if self.mode in ("tile", "grey"):  # each tile's colour offset and contrast removed (grey: its hue too)
            x = x / 255.0
            if self.mode == "grey":
                x = ops.mean(x, axis=-1, keepdims=True)
            mean = ops.mean(x, axis=(1, 2), keepdims=True)
            std = ops.std(x, axis=(1, 2), keepdims=True)
            x = (x - mean) / (std + TILE_STD_FLOOR)
            if self.mode == "grey":
                x = ops.concatenate([x, x, x], axis=-1)
            if self.pixel_scale:
                x = x * ops.convert_to_tensor([255.0 * s for s in _TORCH_STD], dtype=self.compute_dtype) + \
                    ops.convert_to_tensor([255.0 * m for m in _TORCH_MEAN], dtype=self.compute_dtype)
            return x
        if self.mode == "symmetric":
            return x / 127.5 - 1.0
        if self.mode == "caffe":
            x = ops.flip(x, axis=-1)  # RGB -> BGR
            return x - ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=self.compute_dtype)
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_TORCH_MEAN, dtype=self.compute_dtype)
            std = ops.convert_to_tensor(_TORCH_STD, dtype=self.compute_dtype)
            return (x / 255.0 - mean) / std
        return x  # raw

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(mode=self.mode, pixel_scale=self.pixel_scale)
        return config


# --------------------------------------------------------------------------------------------- backbones

def _conv_bn_relu(x, filters: int, name: str, strides: int = 1):
    x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def _simple_cnn(tile_size: int, base_filters: int, **_) -> keras.Model:
    """Four conv-BN-ReLU-pool blocks: widths base/2, base, 2 base, 4 base; the first conv has stride 2.

    At 256 px and base 32 that is ~0.1 M parameters and ~65 M multiply-adds per tile: fast on a CPU.
    """
    inputs = keras.Input((tile_size, tile_size, 3), name="backbone_input")
    widths = [max(1, base_filters // 2), base_filters, 2 * base_filters, 4 * base_filters]
    x = inputs
    for i, width in enumerate(widths, start=1):
        x = _conv_bn_relu(x, width, f"block{i}", strides=2 if i == 1 else 1)
        x = layers.MaxPooling2D(2, name=f"block{i}_pool")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, x, name=BACKBONE)


def _unet_encoder(tile_size: int, base_filters: int, depth: int = 5, **_) -> keras.Model:
    """U-Net contracting path (Ronneberger et al. 2015): ``depth`` levels of (3x3 conv-BN-ReLU) x 2, a 2x2
    max-pool between levels, widths doubling from ``base_filters`` (32, 64, 128, 256, 512 by default)."""
    inputs = keras.Input((tile_size, tile_size, 3), name="backbone_input")
    x = inputs
    for level in range(1, depth + 1):
        width = base_filters * 2 ** (level - 1)
        if level > 1:
            x = layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)
        x = _conv_bn_relu(x, width, f"enc{level}_a")
        x = _conv_bn_relu(x, width, f"enc{level}_b")
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, x, name=BACKBONE)


def _keras_app(constructor_name: str) -> Callable[..., keras.Model]:
    def build(tile_size: int, weights: str | None = None, **_) -> keras.Model:
        constructor = getattr(keras.applications, constructor_name)
        kwargs = dict(include_top=False, weights=weights, input_shape=(tile_size, tile_size, 3), pooling="avg")
        if "name" in inspect.signature(constructor).parameters:
            return constructor(**kwargs, name=BACKBONE)
        app = constructor(**kwargs)  # Keras < 3.6 applications take no name argument
        app.name = BACKBONE
        return app

    build.__name__ = f"_{constructor_name}"
    return build


_APPS = {"resnet50": "ResNet50", "efficientnet_b0": "EfficientNetB0", "densenet121": "DenseNet121",
         "mobilenet_v2": "MobileNetV2", "inception_v3": "InceptionV3", "convnext_tiny": "ConvNeXtTiny"}

_BUILDERS: dict[str, Callable[..., keras.Model]] = {
    "simple_cnn": _simple_cnn,
    "unet_encoder": _unet_encoder,
    **{name: _keras_app(constructor) for name, constructor in _APPS.items()},
}
assert set(_BUILDERS) == set(ARCHITECTURES), "every registry entry needs a builder, and only those"


# --------------------------------------------------------------------------------------------- public API

def build_model(arch: str, tile_size: int, *, dropout: float = 0.3, weights: str | Path | None = None,
                freeze_backbone: bool = False, base_filters: int = 32, seed: int | None = None,
                depth: int = 5, preprocessing: str | None = None) -> keras.Model:
    """A binary tile classifier: input ``(tile_size, tile_size, 3)`` floats in [0, 255], output ``(batch, 1)``
    sigmoid probability of malignant.

    ``weights``: a local file only (never downloaded). ``*.weights.h5`` saved from a model built here (whole model)
    or from its backbone; a Keras ImageNet 'notop' ``*.h5`` for the keras.applications entries; or a
    ``model.keras`` of the same architecture (weights copied layer by layer where names and shapes match).
    ``base_filters`` and ``depth`` apply to ``simple_cnn`` / ``unet_encoder`` (depth: unet_encoder only).
    ``seed`` makes the initial weights reproducible. ``preprocessing``: a mode of :data:`PREPROCESSING_MODES` for
    the input scaling layer (default: the registry entry's own). Every batch-norm layer of ``simple_cnn`` and
    ``unet_encoder``, and of a keras.applications backbone built without pretrained weights, uses momentum
    :data:`BN_MOMENTUM`. Bad options or files raise :class:`ConfigError`.
    """
    spec = _spec(arch)
    if preprocessing is not None and preprocessing not in PREPROCESSING_MODES:
        raise ConfigError("input_scaling", f"unknown input scaling {preprocessing!r}; choose from: "
                          f"{', '.join(PREPROCESSING_MODES)}")
    _check_options(spec, tile_size, dropout, base_filters, depth)
    weights_path = _weights_path(weights)
    if seed is not None:
        keras.utils.set_random_seed(int(seed))

    legacy_app_file = (weights_path is not None and arch in _APPS and _weights_kind(weights_path) == "legacy")
    try:
        backbone = _BUILDERS[arch](int(tile_size), base_filters=int(base_filters), depth=int(depth),
                                   weights=str(weights_path) if legacy_app_file else None)
    except (ValueError, OSError, KeyError) as exc:
        if legacy_app_file:
            raise ConfigError("weights", f"cannot load these weights into {arch}: {_short(exc)}",
                              path=weights_path) from exc
        raise ConfigError("arch", f"cannot build {arch} at {tile_size} px: {_short(exc)}") from exc
    if arch in _APPS and weights_path is None:  # from scratch: statistics that settle within a small cohort's steps
        for layer in _walk(backbone):
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = BN_MOMENTUM

    inputs = keras.Input((int(tile_size), int(tile_size), 3), name="tile")
    mode = preprocessing or spec.preprocessing
    x = InputNormalization(mode, pixel_scale=mode in ("tile", "grey") and spec.preprocessing == "raw",
                           name=PREPROCESS)(inputs)
    x = backbone(x)
    x = layers.Dropout(float(dropout), name="dropout")(x)
    outputs = layers.Dense(1, activation="sigmoid", dtype="float32", name=HEAD)(x)
    model = keras.Model(inputs, outputs, name=arch)

    if weights_path is not None and not legacy_app_file:
        _load_weights(model, backbone, weights_path, arch)
    if freeze_backbone:
        backbone.trainable = False
    return model


def count_params(model) -> int:
    """All parameters (trainable and not, e.g. batch-norm statistics) of a built model."""
    return int(sum(int(np.prod(w.shape)) for w in model.weights))


def backbone_of(model) -> keras.layers.Layer:
    """The layer named ``backbone`` anywhere inside ``model`` (e.g. behind a resize or augmentation wrapper)."""
    for layer in _walk(model):
        if layer.name == BACKBONE:
            return layer
    raise ValueError(f"model {model.name!r} has no layer named {BACKBONE!r}")


def unfreeze_backbone(model, *, keep_batchnorm_frozen: bool = True) -> None:
    """Make the backbone trainable again for fine-tuning.

    With ``keep_batchnorm_frozen`` (the usual transfer-learning advice) its batch-norm layers stay non-trainable,
    which in Keras 3 also keeps them in inference mode, so small fine-tuning batches do not wreck pretrained
    statistics.
    """
    backbone = backbone_of(model)
    backbone.trainable = True
    if keep_batchnorm_frozen:
        for layer in _walk(backbone):
            if isinstance(layer, layers.BatchNormalization):
                layer.trainable = False


# --------------------------------------------------------------------------------------------- helpers

def _spec(arch: str) -> ModelSpec:
    if arch not in ARCHITECTURES:
        raise ConfigError("arch", f"unknown architecture {arch!r}; choose from: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def _check_options(spec: ModelSpec, tile_size: int, dropout: float, base_filters: int, depth: int) -> None:
    if isinstance(tile_size, bool) or not isinstance(tile_size, (int, np.integer)) or tile_size < 1:
        raise ConfigError("tile_size", f"tile size must be a positive integer, got {tile_size!r}")
    min_size = spec.min_size
    if spec.name == "unet_encoder":
        if not 1 <= depth <= 8:
            raise ConfigError("depth", f"unet_encoder depth must be 1-8, got {depth}")
        min_size = max(min_size, 2 ** (depth - 1))
    if tile_size < min_size:
        raise ConfigError("tile_size", f"{spec.name} needs tiles of at least {min_size} px, got {tile_size} px; "
                          f"use a larger `tile_size` (or `input_size`) or another `arch`")
    if not 0.0 <= float(dropout) < 1.0:
        raise ConfigError("dropout", f"dropout must be in [0, 1), got {dropout}")
    if int(base_filters) < 1:
        raise ConfigError("base_filters", f"base filters must be >= 1, got {base_filters}")


def _weights_path(weights: str | Path | None) -> Path | None:
    if weights is None or (isinstance(weights, str) and not weights.strip()):
        return None
    if str(weights).strip().lower() == "imagenet":
        raise ConfigError("weights", "no downloads: give a local weights file (e.g. "
                          "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5), not 'imagenet'")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError("weights", "weights file not found", path=path)
    if _weights_kind(path) is None:
        raise ConfigError("weights", "unsupported weights file: expected *.weights.h5, a Keras ImageNet *.h5 or *.keras",
                          path=path)
    return path


def _weights_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".weights.h5"):
        return "keras3"
    if name.endswith((".h5", ".hdf5")):
        return "legacy"
    if name.endswith(".keras"):
        return "model"
    return None


def _load_weights(model: keras.Model, backbone: keras.Model, path: Path, arch: str) -> None:
    kind = _weights_kind(path)
    if kind == "model":
        _load_by_name(model, backbone, path, arch)
        return
    # A *.weights.h5 saved from a whole model built here, else from its backbone alone; a legacy *.h5
    # (custom architectures only: applications take it in their constructor) into the backbone.
    targets = [model, backbone] if kind == "keras3" else [backbone, model]
    errors = []
    for target in targets:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                target.load_weights(str(path))
            return
        except (ValueError, OSError, KeyError, TypeError) as exc:
            errors.append(exc)
    raise ConfigError("weights", f"these weights fit neither the {arch} model nor its backbone (saved from another "
                      f"architecture or `base_filters`?): {_short(errors[-1])}", path=path)


def _load_by_name(model: keras.Model, backbone: keras.Model, path: Path, arch: str) -> None:
    """Copy weights from a saved model, layer by layer, where the layer names and all weight shapes match."""
    try:
        source = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # noqa: BLE001 - any failure to read the file is the user's to fix
        raise ConfigError("weights", f"cannot read this model: {_short(exc)}", path=path) from exc
    saved = {}
    for layer in _leaf_layers(source):
        if layer.weights:
            saved.setdefault(layer.name, [np.asarray(w) for w in layer.weights])
    backbone_layers = {id(layer) for layer in _leaf_layers(backbone)}
    loaded = loaded_backbone = 0
    for layer in _leaf_layers(model):
        values = saved.get(layer.name)
        if not layer.weights or values is None or len(values) != len(layer.weights):
            continue
        if any(tuple(v.shape) != tuple(w.shape) for v, w in zip(values, layer.weights)):
            continue
        for w, v in zip(layer.weights, values):
            w.assign(v)
        loaded += 1
        loaded_backbone += id(layer) in backbone_layers
    if not loaded_backbone:
        raise ConfigError("weights", f"no layer of this model matches the {arch} backbone by name and shape "
                          "(a model of another architecture or `base_filters`?)", path=path)


def _walk(layer) -> Iterator:
    for sub in getattr(layer, "layers", []) or []:
        yield sub
        yield from _walk(sub)


def _leaf_layers(model) -> Iterator:
    for layer in _walk(model):
        if not getattr(layer, "layers", None):
            yield layer


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
