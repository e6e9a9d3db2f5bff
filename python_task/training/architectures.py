"""The architecture registry as data: every name ``arch`` accepts, how its input is scaled, its smallest tile.

Plain data without Keras, so settings can be checked (and the command line built) without importing it. The
builders that turn an entry into a Keras model are in :mod:`python_task.training.models`; adding an
architecture is an entry here and a builder there.
"""

from __future__ import annotations

from dataclasses import dataclass

PREPROCESSING_MODES: dict[str, str] = {
    "unit": "x / 255",
    "symmetric": "x / 127.5 - 1",
    "caffe": "RGB -> BGR, minus the ImageNet mean (0-255 scale)",
    "torch": "(x / 255 - ImageNet mean) / ImageNet std",
    "raw": "x unchanged (the backbone rescales by itself)",
    "tile": "per tile and channel: (x / 255 - tile mean) / (tile std + 0.02); removes each slide's stain offset "
            "and contrast, keeps its hue",
    "grey": "per tile: grey = mean of R, G, B (x / 255), then (grey - tile mean) / (tile std + 0.02), repeated on "
            "the 3 channels; removes each slide's stain: hue, offset and contrast",
}
# Input scaling a run may ask for (``TrainConfig.input_scaling``): ``grey`` and ``tile`` (the modes above),
# ``architecture`` (the entry's own ``preprocessing``, what pretrained weights expect), ``auto`` (architecture for
# a keras.applications backbone with pretrained weights, else grey).
INPUT_SCALINGS = ("auto", "grey", "tile", "architecture")


def resolve_input_scaling(arch: str, input_scaling: str, pretrained: bool) -> str:
    """The preprocessing mode a model gets: see :data:`INPUT_SCALINGS`."""
    if input_scaling in ("grey", "tile"):
        return input_scaling
    if input_scaling == "auto" and not pretrained:
        return "grey"
    return ARCHITECTURES[arch].preprocessing


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry."""

    name: str
    preprocessing: str  # a key of PREPROCESSING_MODES: how raw [0, 255] RGB is scaled for this architecture
    description: str
    min_size: int  # smallest tile (px) the architecture accepts
    pretrained_file: str = ""  # the usual name of the Keras ImageNet 'notop' weights file, when there is one


ARCHITECTURES: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("simple_cnn", "unit", "small fast baseline: 4 conv-BN-ReLU-pool blocks, global average pooling", 32),
        ModelSpec("unet_encoder", "unit", "U-Net contracting path (double 3x3 conv-BN-ReLU, 2x2 max-pool, "
                  "widths 32..512), global average pooling", 16),
        ModelSpec("resnet50", "caffe", "ResNet-50 (He et al. 2016), keras.applications", 32,
                  "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        ModelSpec("efficientnet_b0", "raw", "EfficientNet-B0 (Tan & Le 2019), keras.applications; rescales inside",
                  32, "efficientnetb0_notop.h5"),
        ModelSpec("densenet121", "torch", "DenseNet-121 (Huang et al. 2017), keras.applications", 32,
                  "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        ModelSpec("mobilenet_v2", "symmetric", "MobileNetV2 (Sandler et al. 2018), keras.applications", 32,
                  "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"),
        ModelSpec("inception_v3", "symmetric", "Inception-v3 (Szegedy et al. 2016), keras.applications", 75,
                  "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        ModelSpec("convnext_tiny", "raw", "ConvNeXt-Tiny (Liu et al. 2022), keras.applications; rescales inside",
                  32, "convnext_tiny_notop.h5"),
    )
}


def architecture_names() -> list[str]:
    """The names ``arch`` accepts, in registry order."""
    return list(ARCHITECTURES)
