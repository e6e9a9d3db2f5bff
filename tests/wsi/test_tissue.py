"""Tissue masks: Otsu on saturation, empty on blank slides, exact box fractions."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile

from python_task.errors import TaskError
from python_task.wsi.slides import open_slide
from python_task.wsi.tissue import (
    TissueMask,
    detect_tissue,
    otsu_threshold,
    saturation_value,
    tissue_mask_from_rgb,
)


def pink_disc(size: int = 200, radius: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy H&E-pink disc on a slightly noisy off-white background, and the disc's true mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = (xx - size / 2) ** 2 + (yy - size / 2) ** 2 < radius ** 2
    image = np.clip(rng.normal(238, 3, (size, size, 3)), 0, 255)
    image[disc] = np.clip(rng.normal((200, 120, 170), 12, (disc.sum(), 3)), 0, 255)
    return image.astype(np.uint8), disc


# ------------------------------------------------------------------------------------------------ real slide


@pytest.mark.parametrize("reader", ["tiff", "openslide"])
def test_cmu_tissue(cmu_slide: Path, reader: str) -> None:
    with open_slide(cmu_slide, reader=reader) as slide:
        tissue = detect_tissue(slide)
    assert tissue.mask.dtype == bool
    assert tissue.downsample == pytest.approx(8.0 / 0.499)
    assert tissue.mask.shape == (int(np.ceil(2967 / tissue.downsample)), int(np.ceil(2220 / tissue.downsample)))
    assert 0.2 < tissue.tissue_fraction < 0.95
    assert 0.05 <= tissue.threshold < 0.5
    assert tissue.fraction(0, 1600, 400, 1280) < 0.02          # glass at the lower left
    assert tissue.fraction(0, 0, 600, 300) < 0.02              # glass at the top left
    assert tissue.fraction(1000, 2000, 400, 800) > 0.9         # the body of the section
    assert tissue.fraction(0, 0, 2220, 2967) == pytest.approx(tissue.tissue_fraction, abs=0.02)


# ------------------------------------------------------------------------------------------------ masks from RGB


def test_blank_images_give_empty_masks() -> None:
    white = np.full((120, 160, 3), 255, np.uint8)
    mask, threshold = tissue_mask_from_rgb(white)
    assert mask.shape == (120, 160) and not mask.any() and threshold >= 0.05
    rng = np.random.default_rng(1)
    glass = np.clip(rng.normal(235, 2, (120, 160, 3)), 0, 255).astype(np.uint8)   # noise only
    mask, threshold = tissue_mask_from_rgb(glass)
    assert not mask.any() and threshold >= 0.05


def test_disc_is_found_and_black_pen_is_not() -> None:
    image, disc = pink_disc()
    image[20:26, 10:190] = (10, 12, 32)          # a dark blue-black pen line: saturated, but near-black
    mask, threshold = tissue_mask_from_rgb(image)
    assert 0.05 <= threshold < 0.3
    iou = (mask & disc).sum() / (mask | disc).sum()
    assert iou > 0.95
    assert not mask[20:26].any()


def test_small_holes_filled_and_specks_removed() -> None:
    image, disc = pink_disc()
    image[98:102, 98:102] = 238                  # a 4x4 px hole inside the tissue
    image[10, 10] = (200, 100, 170)              # one saturated speck on the glass
    mask, _ = tissue_mask_from_rgb(image)
    assert mask[98:102, 98:102].all()
    assert not mask[5:15, 5:15].any()


def test_fixed_method_and_bad_method() -> None:
    image, disc = pink_disc()
    mask, threshold = tissue_mask_from_rgb(image, 0.1, method="fixed")
    assert threshold == 0.1 and (mask == disc).mean() > 0.98
    with pytest.raises(TaskError):
        tissue_mask_from_rgb(image, method="magic")


def test_otsu_and_saturation() -> None:
    rng = np.random.default_rng(2)
    values = np.concatenate([rng.normal(0.1, 0.02, 5000), rng.normal(0.6, 0.05, 3000)])
    assert 0.2 < otsu_threshold(np.clip(values, 0, 1)) < 0.5
    sat, value = saturation_value(np.array([[[255, 0, 0], [128, 128, 128], [0, 0, 0]]], np.uint8))
    np.testing.assert_allclose(sat[0], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(value[0], [1.0, 128 / 255, 0.0])


# ------------------------------------------------------------------------------------------------ fractions


def brute_force_fraction(fine: np.ndarray, x0: int, y0: int, w: int, h: int) -> float:
    """Mean of a level-0 boolean array over a box, counting everything outside as 0."""
    h_img, w_img = fine.shape
    xa, xb = max(x0, 0), min(x0 + w, w_img)
    ya, yb = max(y0, 0), min(y0 + h, h_img)
    inside = fine[ya:yb, xa:xb].sum() if xa < xb and ya < yb else 0
    return inside / (w * h)


def test_fractions_match_brute_force() -> None:
    rng = np.random.default_rng(3)
    ds = 4
    mask = rng.random((30, 40)) < 0.4
    tissue = TissueMask(mask=mask, downsample=float(ds), threshold=0.1)
    fine = np.kron(mask, np.ones((ds, ds), dtype=bool))          # the mask at level 0
    size = 37                                                    # not a multiple of ds: boxes cut mask px
    xs = rng.integers(-60, 180, 300)
    ys = rng.integers(-60, 140, 300)
    expected = np.array([brute_force_fraction(fine, x, y, size, size) for x, y in zip(xs, ys)])
    got = tissue.fractions(xs, ys, size)
    assert got.shape == (300,)
    np.testing.assert_allclose(got, expected, atol=1e-9)
    for x, y, e in list(zip(xs, ys, expected))[:20]:
        assert tissue.fraction(float(x), float(y), size, size) == pytest.approx(e, abs=1e-9)
    # rectangles too
    assert tissue.fraction(13, 7, 51, 23) == pytest.approx(brute_force_fraction(fine, 13, 7, 51, 23), abs=1e-9)


def test_fraction_outside_counts_as_background() -> None:
    tissue = TissueMask(mask=np.ones((10, 10), bool), downsample=8.0, threshold=0.1)   # 80 x 80 level-0 px
    assert tissue.fraction(0, 0, 80, 80) == pytest.approx(1.0)
    assert tissue.fraction(40, 0, 80, 80) == pytest.approx(0.5)          # half past the right edge
    assert tissue.fraction(-40, -40, 80, 80) == pytest.approx(0.25)      # a quarter inside
    assert tissue.fraction(100, 100, 50, 50) == 0.0
    assert tissue.fraction(10, 10, 0, 20) == 0.0                         # empty box
    np.testing.assert_allclose(tissue.fractions(np.array([0, 40, 200]), np.array([0, 0, 0]), 80), [1, 0.5, 0])
    empty = TissueMask(mask=np.zeros((0, 0), bool), downsample=8.0, threshold=0.1)
    assert empty.fraction(0, 0, 10, 10) == 0.0


# ------------------------------------------------------------------------------------------------ synthetic slides


def write_slide(path: Path, image: np.ndarray, mpp: float = 0.5) -> Path:
    px_per_cm = 1e4 / mpp
    with tifffile.TiffWriter(path) as tw:
        tw.write(image, tile=(256, 256), photometric="rgb", compression="jpeg", compressionargs={"level": 95},
                 resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")
    return path


def test_detect_tissue_on_blank_slide_is_empty(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_slide(tmp_path / "blank.tiff", np.full((700, 900, 3), 250, np.uint8))
    with open_slide(path) as slide, caplog.at_level(logging.WARNING, logger="python_task.wsi.tissue"):
        tissue = detect_tissue(slide)
    assert not tissue.mask.any()
    assert "no tissue" in caplog.text


def test_detect_tissue_on_synthetic_slide(tmp_path: Path) -> None:
    image, disc = pink_disc(size=800, radius=250)
    path = write_slide(tmp_path / "disc.tiff", image)
    with open_slide(path) as slide:
        tissue = detect_tissue(slide, target_mpp=4.0)          # 8 level-0 px per mask px
    assert tissue.downsample == pytest.approx(8.0)
    assert tissue.mask.shape == (100, 100)
    assert tissue.fraction(0, 0, 800, 800) == pytest.approx(disc.mean(), abs=0.02)
    assert tissue.fraction(400 - 100, 400 - 100, 200, 200) == pytest.approx(1.0)
    assert tissue.fraction(0, 0, 100, 100) == 0.0
