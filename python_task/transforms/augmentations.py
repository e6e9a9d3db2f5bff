"""The augmentation methods by name, their ranges, and where they run: what both implementations share.

Two engines implement the same methods with the same options and semantics: Keras layers in front of the model
(:mod:`python_task.transforms.augment_layers`, on the backend's device) and numpy + OpenCV in the input
pipeline's reader threads (:mod:`python_task.transforms.augment_cv`). This module holds what they agree on,
without importing either: the names (:data:`AUGMENTATIONS`), the ranges (:class:`AugmentOptions`), the parsing
of a ``flip,rot90,elastic`` list, the choice of engine, and the smoothing and interpolation bases of the elastic
and grid deformations.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from python_task.errors import ConfigError
from python_task.settings import check_settings, setting

AUGMENTATIONS: dict[str, str] = {
    "flip": "random horizontal and vertical flips, per image (exact pixel permutation)",
    "rot90": "random rotation by a multiple of 90 degrees, per image (exact pixel permutation)",
    "rotate": "small free rotation, uniform in +-rotate_degrees (bilinear, reflected borders)",
    "scale": "random scaling by a factor uniform in 1 +- scale_range (bilinear, reflected borders)",
    "elastic": "elastic deformation (Simard 2003): gaussian-smoothed random displacement field, displacement up "
               "to about elastic_alpha px, smoothness elastic_sigma px",
    "grid": "grid distortion (Allender 2022): grid_steps x grid_steps cells whose control points move by up to "
            "+-grid_distort of a cell, bilinear in between",
    "hed": "HED stain jitter (Tellez 2018): per stain, concentration * (1 +- hed_sigma) +- hed_bias in optical "
           "density",
}
GEOMETRIC = ("rotate", "scale", "elastic", "grid")
# the elastic displacement is gaussian with a standard deviation of elastic_alpha / ELASTIC_SIGMAS per axis, so
# elastic_alpha is about the largest displacement (exceeded by one pixel in ~16,000); with RMS = elastic_alpha
# the field folds over itself (tissue turns into marble) as soon as elastic_alpha nears elastic_sigma
ELASTIC_SIGMAS = 4.0
# where augmentation runs (train's augment_on): Keras layers on the backend's device, OpenCV in the reader
# threads, or auto: the layers where there is an accelerator, else the pipeline
AUGMENT_ENGINES = ("auto", "pipeline", "model")


@dataclass(frozen=True)
class AugmentOptions:
    """Ranges of the augmentations (the defaults are mild: the tiles must still look like tissue)."""

    rotate_degrees: float = setting(15.0, help="range of free rotations in degrees",
                                    check=(lambda v: 0 <= v <= 180, "must be in [0, 180]"))
    scale_range: float = setting(0.1, help="range of random scaling (0.1 = ±10%)",
                                 check=(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    elastic_alpha: float = setting(8.0, help="elastic deformation magnitude in px (about the largest displacement)",
                                   check=(lambda v: 0 <= v <= 1000, "must be in [0, 1000] px"))
    elastic_sigma: float = setting(6.0, help="elastic deformation smoothness in px (gaussian sigma of the field)",
                                   check=(lambda v: 0 < v <= 1000, "must be in (0, 1000] px"))
    grid_steps: int = setting(5, help="grid distortion: cells per side",
                              check=(lambda v: float(v).is_integer() and 2 <= v <= 64,
                                     "must be a whole number in [2, 64]"))
    grid_distort: float = setting(0.3, help="grid distortion: control-point displacement, fraction of a cell "
                                            "(< 0.5 keeps the grid unfolded)",
                                  check=(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    hed_sigma: float = setting(0.05, help="HED jitter: multiplicative range per stain",
                               check=(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    hed_bias: float = setting(0.02, help="HED jitter: additive range per stain (optical density)",
                              check=(lambda v: 0 <= v <= 5, "must be in [0, 5]"))

    def validate(self) -> AugmentOptions:
        check_settings(self)
        return self

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AugmentOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError("augment_options",
                              f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)


def as_options(options: AugmentOptions | dict[str, Any] | None = None) -> AugmentOptions:
    """Checked ranges from an :class:`AugmentOptions`, a ``{name: value}`` dict of some of them, or None (the
    defaults)."""
    if options is None:
        return AugmentOptions()
    return (AugmentOptions.from_dict(options) if isinstance(options, dict) else options).validate()


def parse_augment(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """``'flip,rot90,elastic'`` -> ``('flip', 'rot90', 'elastic')``; ``'none'``, ``''`` or None -> ``()``.

    Names are case-insensitive, duplicates dropped, the order kept (the augmenter applies them in a fixed
    order: flips and rotations by 90 degrees, then the geometric deformations, then the stain jitter).
    """
    if spec is None:
        return ()
    # ',' or '+' between names ('+' survives unquoted CSV columns, e.g. OpenMOLE's CSVHook)
    items = re.split(r"[,+]", spec) if isinstance(spec, str) else [p for s in spec for p in re.split(r"[,+]", str(s))]
    names: list[str] = []
    for item in items:
        name = item.strip().lower()
        if not name or name == "none":
            continue
        if name not in AUGMENTATIONS:
            raise ConfigError("augment", f"unknown augmentation {item.strip()!r}; choose from: none, "
                              f"{', '.join(AUGMENTATIONS)}")
        if name not in names:
            names.append(name)
    return tuple(names)


def resolve_engine(engine: str, accelerator: bool) -> str:
    """``auto`` -> ``model`` (the Keras layers, on the accelerator) where there is one, else ``pipeline``."""
    if engine not in AUGMENT_ENGINES:
        raise ConfigError("augment_on", f"unknown engine {engine!r}; choose from {', '.join(AUGMENT_ENGINES)}")
    if engine == "auto":
        return "model" if accelerator else "pipeline"
    return engine


def smooth_basis(size: int, sigma: float, max_nodes: int = 48, at: np.ndarray | None = None) -> np.ndarray:
    """``(size, n)``: gaussian bumps of ``sigma`` px on nodes spaced ``1.5 sigma`` (at most ``max_nodes`` of
    them, widening the bumps if needed) covering the tile plus ``3 sigma`` on each side; each row has unit L2
    norm, so ``G @ noise @ G'.T`` with standard normal ``noise`` is a smooth field of unit variance everywhere:
    white noise smoothed by a gaussian, the elastic field of Simard et al. 2003. ``at``: evaluate the rows at
    these pixel positions instead of ``0 .. size - 1`` (a coarse lattice, upsampled afterwards)."""
    span = size - 1 + 6.0 * sigma
    spacing = max(1.5 * sigma, span / (max_nodes - 1))
    sigma = max(sigma, spacing / 1.5)
    n = int(math.ceil(span / spacing)) + 1
    nodes = (np.arange(n) - (n - 1) / 2.0) * spacing + (size - 1) / 2.0
    positions = np.arange(size) if at is None else np.asarray(at, dtype=np.float64)
    g = np.exp(-0.5 * ((positions[:, None] - nodes[None, :]) / sigma) ** 2)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    # bumps beyond ~6 sigma are zero, not float32 denormals: products of those run ~20x slower on x86 (a 0.2 ms
    # matrix product per tile instead of 0.01 ms) and add nothing to the field
    g[g < 1e-8] = 0.0
    return g.astype(np.float32)


def linear_basis(size: int, steps: int) -> np.ndarray:
    """``(size, steps + 1)`` linear interpolation from ``steps + 1`` control points on the tile's first and last
    pixels and evenly in between (align-corners)."""
    pos = np.arange(size) * (steps / max(size - 1, 1))
    i0 = np.minimum(np.floor(pos).astype(int), steps - 1)
    frac = pos - i0
    m = np.zeros((size, steps + 1))
    m[np.arange(size), i0] = 1.0 - frac
    m[np.arange(size), i0 + 1] += frac
    return m.astype(np.float32)
