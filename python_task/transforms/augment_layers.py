"""Tile augmentation as Keras layers, on the backend in use (TensorFlow or JAX), active only while training.

``build_augmenter(parse_augment("flip,rot90,elastic,hed"), seed=...)`` gives a ``keras.Sequential`` that training
puts in front of the model (``keras.Sequential([augmenter, model])``); with ``training=False`` every layer is the
identity, so the saved model is the inner one and prediction never augments. Input and output are float32 RGB
in [0, 255] with the shape kept; every layer clips its output to [0, 255].

Methods (names as in :data:`~python_task.transforms.augmentations.AUGMENTATIONS`):

* ``flip``, ``rot90``: the lossless symmetries of a square tile, exact pixel permutations (random bits per
  image for transpose / row flip / column flip, turned into one source index per pixel and a gather: pixels are
  copied, never interpolated);
* ``rotate``, ``scale``: small free rotations and scaling (affine), ``elastic``: Simard-style smoothed random
  displacement field, ``grid``: grid distortion (random displacement of a coarse grid of control points,
  Allender et al. 2022). These are **fused into one resampling**: one coordinate map per image, one bilinear
  lookup with reflected borders, so the tile is interpolated (and blurred) once, whatever the combination.
  When any of them is on, ``flip``/``rot90`` are folded into the same coordinate map (integer coordinates, so
  still exact permutations of the resampled grid) instead of costing full passes of their own;
* ``hed``: stain augmentation in HED space (Tellez et al. 2018): optical density -> Ruifrok haematoxylin,
  eosin, DAB concentrations, per image and stain ``c * (1 + U(-sigma, sigma)) + U(-bias, bias)``, back to RGB.
  It is one 3x3 linear map per image in optical density.

Randomness comes from ``keras.random.SeedGenerator`` per layer, seeded from ``build_augmenter``'s ``seed``: the
same seed gives the same sequence of augmented batches (the generator state is a layer variable, saved with
checkpoints). Only ``keras.ops`` / ``keras.random`` are used, so the layers run, and compile (XLA / ``jax.jit``),
on every backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from python_task.transforms.augmentations import (
    ELASTIC_SIGMAS,
    GEOMETRIC,
    AugmentOptions,
    as_options,
    linear_basis,
    parse_augment,
    smooth_basis,
)
from python_task.transforms.stain import HED_FROM_RGB, RGB_FROM_HED

PACKAGE = "python_task"


def _layer_seed(seed: int, k: int) -> int:
    return int((int(seed) * 1_000_003 + 7919 * (k + 1)) % (2**31 - 1))


def build_augmenter(names: str | Sequence[str] | None, *, seed: int,
                    options: AugmentOptions | dict[str, Any] | None = None) -> keras.Sequential | None:
    """The augmentation layers for ``names`` (a tuple of method names, or a ``flip,rot90`` list for
    :func:`~python_task.transforms.augmentations.parse_augment`), or None when there are none."""
    names = parse_augment(names)
    if not names:
        return None
    options = as_options(options)
    layers: list[keras.layers.Layer] = []
    flip, rot90 = "flip" in names, "rot90" in names
    geometric = {n: n in names for n in GEOMETRIC}
    if any(geometric.values()):
        layers.append(RandomDeform(
            rotate_degrees=options.rotate_degrees if geometric["rotate"] else 0.0,
            scale_range=options.scale_range if geometric["scale"] else 0.0,
            elastic_alpha=options.elastic_alpha if geometric["elastic"] else 0.0,
            elastic_sigma=options.elastic_sigma,
            grid_steps=int(options.grid_steps),
            grid_distort=options.grid_distort if geometric["grid"] else 0.0,
            flip=flip, rot90=rot90, seed=_layer_seed(seed, 1), name="deform"))
    elif flip or rot90:
        layers.append(RandomDihedral(flip=flip, rot90=rot90, seed=_layer_seed(seed, 0), name="dihedral"))
    if "hed" in names:
        layers.append(RandomHED(sigma=options.hed_sigma, bias=options.hed_bias, seed=_layer_seed(seed, 2),
                                name="hed_jitter"))
    return keras.Sequential(layers, name="augmenter")


def augment_function(augmenter: keras.Layer, *, jit_compile: bool | str = "auto") -> Callable[[Any], np.ndarray]:
    """``batch -> augmented numpy batch`` (training mode), compiled by the backend through a Keras model
    (``tf.function``, or XLA with ``jit_compile=True``, on TensorFlow; ``jax.jit`` on JAX), for previews and
    benchmarks. Training itself runs the augmenter inside its compiled train step."""
    models: dict[tuple[int, ...], keras.Model] = {}

    def run(batch: Any) -> np.ndarray:
        x = np.asarray(batch, dtype=np.float32)
        model = models.get(x.shape[1:])
        if model is None:
            inputs = keras.Input(x.shape[1:])
            model = keras.Model(inputs, _TrainingMode(augmenter)(inputs), name="augment_fn")
            model.compile(jit_compile=jit_compile)
            models[x.shape[1:]] = model
        return np.asarray(model.predict_on_batch(x))

    return run


class _TrainingMode(keras.layers.Layer):
    def __init__(self, inner: keras.Layer, **kwargs) -> None:
        super().__init__(**kwargs)
        self.inner = inner

    def call(self, inputs):
        return self.inner(inputs, training=True)

    def compute_output_shape(self, input_shape):
        return input_shape


# --------------------------------------------------------------------------------------------- layers

class _RandomTileLayer(keras.layers.Layer):
    """Base: float32 in and out, identity unless ``training``, clipped to [0, 255], seeded."""

    def __init__(self, seed: int | None = None, **kwargs) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=False):
        x = ops.cast(inputs, "float32")
        if not training:
            return x
        return ops.clip(self.augment(x), 0.0, 255.0)

    def augment(self, x):
        raise NotImplementedError

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["seed"] = self.seed
        return config


def _coin(shape, seed) -> Any:
    return keras.random.uniform(shape, seed=seed) < 0.5


def _dihedral_bits(batch, flip: bool, rot90: bool, square: bool, seed):
    """Per image booleans (transpose, flip rows, flip columns), applied in that order.

    flip: independent row / column flips; rot90: k in 0..3 quarter turns (k = 1 is ``np.rot90``); both: all 8
    elements of the dihedral group, uniformly. Without a square tile only k in {0, 2} is possible."""
    false = ops.zeros((batch,), dtype="bool")
    if rot90 and flip and square:
        return _coin((batch,), seed), _coin((batch,), seed), _coin((batch,), seed)
    t = a = b = false
    if rot90:
        if square:
            k = keras.random.randint((batch,), 0, 4, seed=seed)
            t = ops.logical_or(ops.equal(k, 1), ops.equal(k, 3))
            a = ops.logical_or(ops.equal(k, 1), ops.equal(k, 2))
            b = ops.logical_or(ops.equal(k, 2), ops.equal(k, 3))
        else:
            a = b = _coin((batch,), seed)
    if flip:
        fa, fb = _coin((batch,), seed), _coin((batch,), seed)
        a, b = ops.logical_xor(a, fa), ops.logical_xor(b, fb)
    return t, a, b


@keras.saving.register_keras_serializable(package=PACKAGE)
class RandomDihedral(_RandomTileLayer):
    """Random flips (``flip``) and/or quarter turns (``rot90``) per image: exact pixel permutations.

    The random transpose / row flip / column flip of each image are turned into one source index per pixel and
    applied by a single gather, which copies pixels and never interpolates (cheaper than ``where`` over
    ``flip`` / ``transpose`` candidates, which costs several full passes over the batch)."""

    def __init__(self, flip: bool = True, rot90: bool = True, seed: int | None = None, **kwargs) -> None:
        super().__init__(seed=seed, **kwargs)
        self.flip = bool(flip)
        self.rot90 = bool(rot90)

    def augment(self, x):
        if not (self.flip or self.rot90):
            return x
        h, w, c = x.shape[1], x.shape[2], x.shape[3]
        if h is None or w is None:
            raise ValueError("RandomDihedral needs tiles of static height and width")
        batch = ops.shape(x)[0]
        t, a, b = _dihedral_bits(batch, self.flip, self.rot90, h == w, self.seed_generator)
        a = ops.cast(a, "int32")[:, None, None]
        b = ops.cast(b, "int32")[:, None, None]
        yy = ops.reshape(ops.arange(h, dtype="int32"), (1, h, 1))
        xx = ops.reshape(ops.arange(w, dtype="int32"), (1, 1, w))
        y1 = yy + a * (h - 1 - 2 * yy)  # (B, H, 1): flipped rows
        x1 = xx + b * (w - 1 - 2 * xx)  # (B, 1, W): flipped columns
        src = y1 * w + x1
        if self.rot90 and h == w:
            src = ops.where(t[:, None, None], x1 * w + y1, src)  # transposed first
        base = ops.arange(batch, dtype="int32")[:, None, None] * (h * w)
        return ops.take(ops.reshape(x, (-1, c)), src + base, axis=0)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "flip": self.flip, "rot90": self.rot90}


def _reflect(c, size: int):
    """Mirror coordinates into [0, size - 1] (whole-sample symmetric: 2 1 | 0 1 2 ... n-1 | n-2 n-3), exact over
    one tile size beyond each border, clamped further out."""
    last = float(size - 1)
    if last <= 0:
        return ops.zeros_like(c)
    return ops.clip(last - ops.abs(last - ops.abs(c)), 0.0, last)


def bilinear_sample(images, ys, xs):
    """Sample ``images (B, H, W, C)`` at float source coordinates ``ys, xs (B, H', W')``, bilinearly, with
    reflected borders. Integer coordinates return the pixels exactly."""
    batch, h, w, c = ops.shape(images)[0], images.shape[1], images.shape[2], images.shape[3]
    ys, xs = _reflect(ys, h), _reflect(xs, w)
    y0, x0 = ops.floor(ys), ops.floor(xs)
    wy, wx = ys - y0, xs - x0
    step_y = ops.cast(y0 < h - 1, "int32") * w  # 0 on the last row (its weight is 0 there)
    step_x = ops.cast(x0 < w - 1, "int32")
    base = ops.arange(batch, dtype="int32")[:, None, None] * (h * w)
    i00 = ops.cast(y0 * w + x0, "int32") + base
    i01 = i00 + step_x
    i10 = i00 + step_y
    i11 = i10 + step_x
    w11 = wy * wx
    w10 = wy - w11
    w01 = wx - w11
    w00 = 1.0 - wy - w01
    flat = ops.reshape(images, (-1, c))

    def corner(idx, weight):
        return ops.take(flat, idx, axis=0) * weight[..., None]

    return corner(i00, w00) + corner(i01, w01) + corner(i10, w10) + corner(i11, w11)


def _expand(basis_y: np.ndarray, coarse, basis_x: np.ndarray):
    """``basis_y (H, n) @ coarse (B, n, m) @ basis_x (W, m).T`` -> ``(B, H, W)``."""
    return ops.einsum("yi,bij,xj->byx", ops.convert_to_tensor(basis_y), coarse, ops.convert_to_tensor(basis_x))


@keras.saving.register_keras_serializable(package=PACKAGE)
class RandomDeform(_RandomTileLayer):
    """Rotation, scaling, elastic and grid deformations (any of them, zero range = off), plus optionally the
    dihedral symmetries, as one coordinate map per image and one bilinear resampling with reflected borders.

    * rotation angle uniform in +-``rotate_degrees``, scale factor uniform in 1 +- ``scale_range``, about the
      tile centre;
    * elastic: a smooth random displacement field per axis, white noise smoothed by a gaussian of
      ``elastic_sigma`` px (as gaussian bumps on a coarse lattice, two small matrix products), with a standard
      deviation of ``elastic_alpha / 4`` px, so that ``elastic_alpha`` is about the largest displacement;
    * grid: ``(grid_steps + 1)^2`` control points, the border ones fixed, the others moved by uniform
      ``+-grid_distort`` cells, bilinear in between (piecewise-bilinear grid distortion).
    """

    def __init__(self, rotate_degrees: float = 0.0, scale_range: float = 0.0, elastic_alpha: float = 0.0,
                 elastic_sigma: float = 6.0, grid_steps: int = 5, grid_distort: float = 0.0, flip: bool = False,
                 rot90: bool = False, seed: int | None = None, **kwargs) -> None:
        super().__init__(seed=seed, **kwargs)
        self.rotate_degrees = float(rotate_degrees)
        self.scale_range = float(scale_range)
        self.elastic_alpha = float(elastic_alpha)
        self.elastic_sigma = float(elastic_sigma)
        self.grid_steps = int(grid_steps)
        self.grid_distort = float(grid_distort)
        self.flip = bool(flip)
        self.rot90 = bool(rot90)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "rotate_degrees": self.rotate_degrees, "scale_range": self.scale_range,
                "elastic_alpha": self.elastic_alpha, "elastic_sigma": self.elastic_sigma,
                "grid_steps": self.grid_steps, "grid_distort": self.grid_distort, "flip": self.flip,
                "rot90": self.rot90}

    def augment(self, x):
        h, w = x.shape[1], x.shape[2]
        if h is None or w is None:
            raise ValueError("RandomDeform needs tiles of static height and width")
        batch = ops.shape(x)[0]
        gen = self.seed_generator
        # affine part on centred coordinates: (source y, source x) = A @ (y, x)
        a00 = a11 = ops.ones((batch,), "float32")
        a01 = a10 = ops.zeros((batch,), "float32")
        if self.flip or self.rot90:
            t, fa, fb = _dihedral_bits(batch, self.flip, self.rot90, h == w, gen)
            # transpose, then flip rows (y -> -y) and columns (x -> -x), as RandomDihedral does
            tt = ops.cast(t, "float32")
            sa = 1.0 - 2.0 * ops.cast(fa, "float32")
            sb = 1.0 - 2.0 * ops.cast(fb, "float32")
            a00, a01, a10, a11 = sa * (1.0 - tt), sa * tt, sb * tt, sb * (1.0 - tt)
        if self.rotate_degrees > 0 or self.scale_range > 0:
            theta = keras.random.uniform((batch,), -1.0, 1.0, seed=gen) * (self.rotate_degrees * math.pi / 180.0)
            s = 1.0 + keras.random.uniform((batch,), -1.0, 1.0, seed=gen) * self.scale_range
            c, si = ops.cos(theta) * s, ops.sin(theta) * s
            a00, a01, a10, a11 = c * a00 - si * a10, c * a01 - si * a11, si * a00 + c * a10, si * a01 + c * a11
        cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
        yy = ops.reshape(ops.arange(h, dtype="float32") - cy, (1, h, 1))
        xx = ops.reshape(ops.arange(w, dtype="float32") - cx, (1, 1, w))

        def col(v):
            return ops.reshape(v, (-1, 1, 1))

        ys = (col(a00) * yy + cy) + col(a01) * xx
        xs = (col(a10) * yy + cx) + col(a11) * xx
        for field in self._displacements(batch, h, w):
            ys = ys + field[0]
            xs = xs + field[1]
        return bilinear_sample(x, ys, xs)

    def _displacements(self, batch, h: int, w: int) -> list[tuple[Any, Any]]:
        """Elastic and grid displacement fields ``(dy, dx)``, each ``(B, H, W)`` in px."""
        out = []
        gen = self.seed_generator
        if self.elastic_alpha > 0:
            by, bx = smooth_basis(h, self.elastic_sigma), smooth_basis(w, self.elastic_sigma)
            shape = (batch, by.shape[1], bx.shape[1])
            std = self.elastic_alpha / ELASTIC_SIGMAS
            out.append(tuple(_expand(by, keras.random.normal(shape, seed=gen) * std, bx) for _ in range(2)))
        if self.grid_distort > 0:
            g = self.grid_steps + 1
            ly, lx = linear_basis(h, self.grid_steps), linear_basis(w, self.grid_steps)
            inner = np.zeros((g, g), np.float32)
            inner[1:-1, 1:-1] = 1.0  # border control points stay on the border
            fields = []
            for cell in ((h - 1) / self.grid_steps, (w - 1) / self.grid_steps):
                nodes = keras.random.uniform((batch, g, g), -1.0, 1.0, seed=gen) * (self.grid_distort * cell)
                fields.append(_expand(ly, nodes * ops.convert_to_tensor(inner), lx))
            out.append(tuple(fields))
        return out


@keras.saving.register_keras_serializable(package=PACKAGE)
class RandomHED(_RandomTileLayer):
    """HED stain jitter: per image and stain, concentration ``c * (1 + U(-sigma, sigma)) + U(-bias, bias)``.

    Optical density ``-ln((x + 1) / 256)``, Ruifrok deconvolution (``HED_FROM_RGB``), perturbation, back to RGB;
    done as one 3x3 map per image in optical density. Zero ranges give the identity (to float error)."""

    def __init__(self, sigma: float = 0.05, bias: float = 0.02, seed: int | None = None, **kwargs) -> None:
        super().__init__(seed=seed, **kwargs)
        self.sigma = float(sigma)
        self.bias = float(bias)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "sigma": self.sigma, "bias": self.bias}

    def augment(self, x):
        batch = ops.shape(x)[0]
        scale = 1.0 + keras.random.uniform((batch, 3), -1.0, 1.0, seed=self.seed_generator) * self.sigma
        shift = keras.random.uniform((batch, 3), -1.0, 1.0, seed=self.seed_generator) * self.bias
        hed_from_rgb = ops.convert_to_tensor(HED_FROM_RGB.astype(np.float32))
        rgb_from_hed = ops.convert_to_tensor(RGB_FROM_HED.astype(np.float32))
        # od = ln 256 - L with L = ln(x + 1); od' = (od @ HED_FROM_RGB * scale + shift) @ RGB_FROM_HED = od @ M + s
        # out = 256 exp(-od') - 1 = exp(L @ M + k) - 1 with k = ln 256 (1 - 1 @ M) - s, per image
        m = ops.einsum("ck,bk,kd->bcd", hed_from_rgb, scale, rgb_from_hed)
        k = math.log(256.0) * (1.0 - ops.sum(m, axis=1)) - ops.matmul(shift, rgb_from_hed)
        log_x = ops.log(ops.maximum(x, 0.0) + 1.0)
        mixed = ops.reshape(ops.matmul(ops.reshape(log_x, (batch, -1, 3)), m), ops.shape(x))
        return ops.exp(mixed + k[:, None, None, :]) - 1.0
