"""The heat-map figure: a map that cannot pass for the stain, tissue kept visible, outlines by class with holes."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
from shapely.geometry import Polygon, box

from python_task.inference.heatmap import (
    HEATMAP_ALPHA,
    OUTLINE_COLORS,
    class_colors,
    draw_heatmap,
    grey_tissue,
    heatmap_colormap,
)
from python_task.wsi.annotations import Region

# Hues (degrees) of the stains: eosin's pinks and magentas, haematoxylin's purples and violets.
STAIN_HUES = (255.0, 350.0)


def _hue(rgb) -> tuple[float, float, float]:
    h, s, v = colorsys.rgb_to_hsv(*rgb[:3])
    return h * 360, s, v


def _blend(rgb, grey: float) -> np.ndarray:
    return HEATMAP_ALPHA * np.asarray(rgb[:3]) + (1 - HEATMAP_ALPHA) * grey


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.8, 0.9994])
def test_the_map_has_no_stain_colour_and_no_dark_veil(threshold):
    """Every probability, drawn over any grey tissue, stays off the stain's hues and never darkens the tissue to
    a veil (inferno's 0 was black); the threshold is the map's pale-yellow centre."""
    from matplotlib.colors import TwoSlopeNorm

    cmap = heatmap_colormap()
    norm = TwoSlopeNorm(vmin=0.0, vcenter=threshold, vmax=1.0)
    for p in np.linspace(0, 1, 201):
        rgb = cmap(norm(p))
        for grey in (0.25, 0.6, 1.0):
            h, s, v = _hue(_blend(rgb, grey))
            assert s < 0.15 or not (STAIN_HUES[0] <= h <= STAIN_HUES[1]), (p, grey, h, s)
            luminance = np.dot(_blend(rgb, grey), [0.299, 0.587, 0.114])
            assert luminance >= min(0.3, 0.9 * grey), (p, grey, luminance)
    centre = cmap(norm(threshold))
    h, s, v = _hue(centre)
    assert 45 <= h <= 70 and v > 0.9  # pale yellow: uncertain
    assert _hue(cmap(norm(0.0)))[0] == pytest.approx(210, abs=10)  # benign blue
    assert _hue(cmap(norm(1.0)))[0] <= 15  # malignant orange-red, not eosin's crimson


def test_tissue_stays_visible_in_grey():
    rgb = np.array([[[255, 255, 255], [200, 120, 170], [90, 40, 120], [0, 0, 0]]], np.uint8)
    grey = grey_tissue(rgb)
    assert grey.shape == (1, 4) and np.all(np.diff(grey[0]) < 0)  # contrast kept, in order
    assert grey.min() >= 0.25 and grey.max() <= 1.0


def test_outline_colours_are_neither_map_nor_stain():
    for color in OUTLINE_COLORS:
        rgb = tuple(int(color[i:i + 2], 16) / 255 for i in (1, 3, 5))
        h, s, v = _hue(rgb)
        if s > 0.2 and v > 0.2:
            assert not (STAIN_HUES[0] <= h <= STAIN_HUES[1]) and not (180 <= h <= 250), color  # nor map blue
            assert not (h <= 15 or 40 <= h <= 70), color  # nor map red or yellow



def test_outline_colours_follow_the_target_class_on_every_slide():
    """A class keeps its colour whatever else is on the slide: the colour is its target's (benign first)."""
    def regions(*names):
        return [Region(i, n, box(i, 0, i + 1, 1), "qupath") for i, n in enumerate(names)]

    benign, malignant, other = OUTLINE_COLORS[0], OUTLINE_COLORS[1], OUTLINE_COLORS[-1]
    assert class_colors(regions("CCA", "Biliary adenoma", "CCA")) == {"Biliary adenoma": benign, "CCA": malignant}
    assert class_colors(regions("Bile duct hamartoma", "Biliary adenoma")) == {"Bile duct hamartoma": benign,
                                                                               "Biliary adenoma": benign}
    assert class_colors(regions("Cholangiocarcinoma", "Tissue")) == {"Cholangiocarcinoma": malignant,
                                                                     "Tissue": other}
    derived = [Region(0, "Cholangiocarcinoma: Grade 2", box(0, 0, 1, 1), "qupath",
                      class_parts=("Cholangiocarcinoma", "Grade 2"))]
    assert class_colors(derived) == {"Cholangiocarcinoma: Grade 2": malignant}


def test_figure_with_legend_holes_and_threshold(tmp_path):
    import matplotlib.image

    rng = np.random.default_rng(0)
    thumb = (rng.uniform(150, 230, (300, 350, 3))).astype(np.uint8)
    grid = np.full((6, 8), np.nan, np.float32)
    grid[1:5, 1:7] = np.linspace(0, 1, 24).reshape(4, 6)
    with_hole = Polygon([(100, 100), (700, 100), (700, 500), (100, 500)], [[(300, 200), (400, 200), (400, 300)]])
    regions = [Region(0, "Cholangiocarcinoma", with_hole, "qupath"),
               Region(1, "Biliary adenoma", box(900, 100, 1400, 500), "qupath")]
    legend = draw_heatmap(tmp_path / "h.png", thumb, 4.0, grid, 200, regions, "title", 0.42)
    assert legend == ["Biliary adenoma (1)", "Cholangiocarcinoma (1)", "hole"]
    image = matplotlib.image.imread(tmp_path / "h.png")
    assert image.shape[1] > image.shape[0] > 300  # the slide beside its heat-map
    assert draw_heatmap(tmp_path / "none.png", thumb, 4.0, grid, 200, None, "title", 0.5) == []
