"""The tile grid: anchoring, coverage, overlap between classes, tissue threshold, region of origin."""

from __future__ import annotations

import numpy as np
import pytest
from shapely.geometry import Polygon, box

from python_task.wsi.annotations import Region
from python_task.wsi.labels import LabelledRegion
from python_task.wsi.tiling import GridSpec, coverage_of, describe_drops, plan_tiles, tile_boxes


def _lr(index: int, geom, label: int) -> LabelledRegion:
    name = ["benign", "malignant"][label]
    return LabelledRegion(region=Region(index=index, class_name=name, geometry=geom, source_format="qupath"),
                          label=label, target=name)


class HalfTissue:
    """Tissue on the left half of the slide only (x < split)."""

    def __init__(self, split: float) -> None:
        self.split = split

    def fractions(self, xs, ys, size0):
        return np.clip((self.split - xs) / size0, 0.0, 1.0)


GRID = GridSpec(extent=100.0, step=100.0, width=1000, height=800)


def test_grid_is_anchored_at_the_slide_origin_and_inside_it():
    xs, ys = GRID.cells_in_bounds(150, 150, 420, 330)
    assert set(xs) == {100, 200, 300, 400} and set(ys) == {100, 200, 300}
    xs, ys = GRID.full_grid()
    assert len(xs) == 10 * 8 and xs.max() + 100 <= 1000 and ys.max() + 100 <= 800


def test_grid_with_fractional_extent_and_overlapping_stride():
    g = GridSpec(extent=200.4, step=100.2, width=1000, height=1000)
    xs, _ = g.cells_in_bounds(0, 0, 1000, 1000)
    assert xs.min() == 0 and (xs + 200.4 <= 1000).all()
    assert set(np.unique(xs)) >= {100, 200, 301}  # rounded multiples of the fractional step


def test_coverage_matches_geometry():
    boxes = tile_boxes(np.array([0, 50, 200]), np.array([0, 0, 0]), 100.0)
    cov = coverage_of(boxes, box(0, 0, 100, 100), 100.0**2)
    np.testing.assert_allclose(cov, [1.0, 0.5, 0.0])


def test_plan_keeps_covered_tiles_with_labels_and_roi():
    regions = [_lr(0, box(0, 0, 300, 300), 0), _lr(1, box(500, 0, 800, 250), 1)]
    plan = plan_tiles(regions, GRID, None, min_coverage=0.5, min_tissue=0.5, n_classes=2)
    coords = {tuple(c) for c in plan.coords}
    assert {(0, 0), (200, 200), (500, 0), (700, 100)} <= coords
    assert (500, 200) in coords  # half covered (y 200..250 of 200..300) is exactly the threshold
    assert plan.counts(2).tolist() == [9, 9]
    for (x, _), label, roi in zip(plan.coords, plan.labels, plan.roi):
        assert label == (1 if x >= 500 else 0) and roi == label
    assert np.all(np.diff(plan.coords[:, 1]) >= 0)  # row-major order


def test_low_coverage_tiles_are_dropped():
    plan = plan_tiles([_lr(0, box(0, 0, 330, 330), 0)], GRID, None, min_coverage=0.9, min_tissue=0.0, n_classes=2)
    assert len(plan) == 9 and plan.dropped["low coverage"] == 7
    assert plan.coverage.min() >= 0.9


def test_tiles_where_classes_overlap_are_dropped_and_counted():
    benign = _lr(0, box(0, 0, 400, 400), 0)
    malignant = _lr(1, box(250, 250, 600, 600), 1)
    plan = plan_tiles([benign, malignant], GRID, None, min_coverage=0.5, min_tissue=0.0, n_classes=2)
    assert plan.dropped["overlap"] > 0
    for x, y in plan.coords:
        tile = box(x, y, x + 100, y + 100)
        assert not (tile.intersection(benign.region.geometry).area > 0
                    and tile.intersection(malignant.region.geometry).area > 0)
    assert "overlap" in describe_drops(plan)


def test_regions_of_one_class_that_touch_make_no_overlap():
    left, right = _lr(0, box(0, 0, 250, 300), 0), _lr(1, box(250, 0, 500, 300), 0)
    plan = plan_tiles([left, right], GRID, None, min_coverage=1.0, min_tissue=0.0, n_classes=2)
    assert len(plan) == 15 and plan.dropped["overlap"] == 0  # the tile at x=200 is covered by the union
    assert set(plan.roi[plan.coords[:, 0] == 200]) == {0}  # 50 px in the left region vs 50 in the right: first wins


def test_background_tiles_are_dropped():
    plan = plan_tiles([_lr(0, box(0, 0, 600, 200), 0)], GRID, HalfTissue(350.0), min_coverage=0.5,
                      min_tissue=0.5, n_classes=2)
    assert sorted(set(plan.coords[:, 0])) == [0, 100, 200, 300]
    assert plan.dropped["background"] == 4
    np.testing.assert_allclose(plan.tissue[plan.coords[:, 0] == 300], 0.5)


def test_holes_and_regions_outside_the_slide():
    ring = Polygon([(0, 0), (500, 0), (500, 500), (0, 500)], holes=[[(100, 100), (400, 100), (400, 400), (100, 400)]])
    plan = plan_tiles([_lr(0, ring, 0)], GRID, None, min_coverage=0.5, min_tissue=0.0, n_classes=2)
    assert (200, 200) not in {tuple(c) for c in plan.coords} and len(plan) == 16
    big = plan_tiles([_lr(0, box(-500, -500, 5000, 5000), 1)], GRID, None, min_coverage=1.0, min_tissue=0.0,
                     n_classes=2)
    assert len(big) == 80  # the whole slide, nothing beyond it


@pytest.mark.parametrize("regions", [[], [_lr(0, Polygon(), 0)]])
def test_no_region_no_tile(regions):
    plan = plan_tiles(regions, GRID, None, min_coverage=0.5, min_tissue=0.5, n_classes=2)
    assert len(plan) == 0
