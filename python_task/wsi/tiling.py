"""The tile grid: which tiles of a slide to cut or to score, with their label, region, coverage and tissue.

The grid is anchored at the slide origin (tile ``(i, j)`` starts at level-0 ``(i·step, j·step)``), so tiles of
different regions, and the tiles ``predict`` later scores, all fall on one lattice. Two planners share it:
:func:`plan_tiles` (``extract``: labelled tiles of annotated regions; a tile's coverage is the area of its
intersection with the union of the regions of its class) and :func:`plan_grid` (``predict``: every tissue tile,
or those inside the regions, with its cell in the probability grid). Geometry is vectorised with shapely 2.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from python_task.wsi.annotations import Region
from python_task.wsi.labels import LabelledRegion
from python_task.wsi.slides import TileReader
from python_task.wsi.tissue import TISSUE_MPP, TissueMask, detect_tissue

# Overlap below this fraction of a tile's area counts as touching, not overlapping (shared polygon edges).
OVERLAP_EPS = 1e-6


@dataclass(frozen=True)
class GridSpec:
    """A square lattice in level-0 pixels."""

    extent: float  # level-0 px covered by one tile
    step: float  # level-0 px between neighbouring tiles
    width: int  # slide level-0 width
    height: int  # slide level-0 height

    def cells_in_bounds(self, minx: float, miny: float, maxx: float, maxy: float) -> tuple[np.ndarray, np.ndarray]:
        """Top-left corners (level 0, rounded) of grid tiles that touch a box and lie wholly inside the slide."""
        i0 = max(0, math.floor((minx - self.extent) / self.step) + 1)
        j0 = max(0, math.floor((miny - self.extent) / self.step) + 1)
        i1 = math.floor((min(maxx, self.width - self.extent)) / self.step)
        j1 = math.floor((min(maxy, self.height - self.extent)) / self.step)
        if i1 < i0 or j1 < j0:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        jj, ii = np.meshgrid(np.arange(j0, j1 + 1), np.arange(i0, i1 + 1), indexing="ij")
        xs = np.round(ii.ravel() * self.step).astype(np.int64)
        ys = np.round(jj.ravel() * self.step).astype(np.int64)
        inside = (xs + self.extent <= self.width + 1e-6) & (ys + self.extent <= self.height + 1e-6)
        return xs[inside], ys[inside]

    def full_grid(self) -> tuple[np.ndarray, np.ndarray]:
        return self.cells_in_bounds(0, 0, self.width, self.height)

    @classmethod
    def for_reader(cls, reader: TileReader, stride: int | None = None) -> GridSpec:
        """The grid of ``reader``'s tiles over its slide, ``stride`` output px apart (default: the tile size)."""
        width, height = reader.slide.dimensions
        return cls(extent=reader.tile_extent0, step=(stride or reader.tile_size) * reader.downsample, width=width,
                   height=height)


@dataclass
class TilePlan:
    """The tiles to cut from one slide, sorted row by row (good for the reader's tile cache)."""

    coords: np.ndarray  # int64 (N, 2), level-0 x, y
    labels: np.ndarray  # int64 (N,)
    roi: np.ndarray  # int32 (N,)
    coverage: np.ndarray  # float32 (N,)
    tissue: np.ndarray  # float32 (N,)
    dropped: Counter[str] = field(default_factory=Counter)
    candidates: int = 0

    def __len__(self) -> int:
        return len(self.coords)

    def counts(self, n_classes: int) -> np.ndarray:
        return np.bincount(self.labels, minlength=n_classes)


def tile_boxes(xs: np.ndarray, ys: np.ndarray, extent: float) -> np.ndarray:
    return shapely.box(xs, ys, xs + extent, ys + extent)


def coverage_of(boxes: np.ndarray, geometry: BaseGeometry, box_area: float) -> np.ndarray:
    """Fraction of each box inside ``geometry`` (vectorised; contained boxes skip the intersection)."""
    cov = np.zeros(len(boxes), dtype=np.float64)
    if len(boxes) == 0 or geometry.is_empty:
        return cov
    shapely.prepare(geometry)
    hit = shapely.intersects(geometry, boxes)
    inside = hit & shapely.contains_properly(geometry, boxes)
    cov[inside] = 1.0
    partial = hit & ~inside
    if partial.any():
        cov[partial] = shapely.area(shapely.intersection(boxes[partial], geometry)) / box_area
    return np.clip(cov, 0.0, 1.0)


def plan_tiles(regions: Sequence[LabelledRegion], grid: GridSpec, tissue: TissueMask | None, *,
               min_coverage: float, min_tissue: float, n_classes: int) -> TilePlan:
    """Choose the tiles of one slide.

    A grid tile is a candidate when it touches a region. It is kept when the union of the regions of one class
    covers at least ``min_coverage`` of it, no region of another class overlaps it (such tiles are dropped as
    ``overlap``: their label would be ambiguous), and at least ``min_tissue`` of it is tissue.
    """
    by_class: dict[int, list[LabelledRegion]] = {}
    for lr in regions:
        by_class.setdefault(lr.label, []).append(lr)
    unions = {c: shapely.union_all([lr.region.geometry for lr in rs]) for c, rs in by_class.items()}
    all_geoms = shapely.union_all(list(unions.values())) if unions else shapely.Polygon()
    if all_geoms.is_empty:
        return _empty_plan()
    xs, ys = grid.cells_in_bounds(*all_geoms.bounds)
    boxes = tile_boxes(xs, ys, grid.extent)
    box_area = grid.extent**2
    classes = sorted(unions)
    cov = np.stack([coverage_of(boxes, unions[c], box_area) for c in classes], axis=1) if len(boxes) else np.zeros(
        (0, len(classes)))
    touching = cov.max(axis=1) > OVERLAP_EPS if len(classes) else np.zeros(len(boxes), bool)
    xs, ys, boxes, cov = xs[touching], ys[touching], boxes[touching], cov[touching]
    dropped: Counter[str] = Counter()
    best = cov.argmax(axis=1)
    best_cov = cov[np.arange(len(cov)), best]
    n_touching = (cov > OVERLAP_EPS).sum(axis=1)

    keep = best_cov >= min_coverage
    dropped["low coverage"] = int((~keep).sum())
    overlap = keep & (n_touching > 1)
    dropped["overlap"] = int(overlap.sum())
    keep &= ~overlap
    tissue_frac = tissue.fractions(xs.astype(np.float64), ys.astype(np.float64), grid.extent) if tissue is not None \
        else np.ones(len(xs))
    background = keep & (tissue_frac < min_tissue)
    dropped["background"] = int(background.sum())
    keep &= ~background

    idx = np.flatnonzero(keep)
    labels = np.array([classes[b] for b in best[idx]], dtype=np.int64)
    roi = _best_region(regions, boxes[idx], labels)
    order = np.lexsort((xs[idx], ys[idx]))
    return TilePlan(coords=np.stack([xs[idx], ys[idx]], axis=1)[order].astype(np.int64), labels=labels[order],
                    roi=roi[order], coverage=best_cov[idx][order].astype(np.float32),
                    tissue=np.asarray(tissue_frac)[idx][order].astype(np.float32),
                    dropped=+dropped, candidates=int(len(xs)))


def _best_region(regions: Sequence[LabelledRegion], boxes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """For each kept tile, the index of its class's region that overlaps it most."""
    roi = np.full(len(boxes), -1, dtype=np.int32)
    best = np.zeros(len(boxes))
    for lr in regions:
        mine = labels == lr.label
        if not mine.any():
            continue
        area = np.zeros(len(boxes))
        sel = np.flatnonzero(mine)
        area[sel] = shapely.area(shapely.intersection(boxes[sel], lr.region.geometry))
        better = area > best
        roi[better] = lr.region.index
        best[better] = area[better]
    return roi


def _empty_plan() -> TilePlan:
    return TilePlan(coords=np.empty((0, 2), np.int64), labels=np.empty(0, np.int64), roi=np.empty(0, np.int32),
                    coverage=np.empty(0, np.float32), tissue=np.empty(0, np.float32))


def describe_drops(plan: TilePlan) -> str:
    """``"12 background, 3 overlap"`` for a summary line (zero counts left out)."""
    parts = [f"{n} {why}" for why, n in sorted(plan.dropped.items(), key=lambda kv: -kv[1]) if n]
    return ", ".join(parts) if parts else "none"


@dataclass
class GridPlan:
    """Tiles to score: level-0 corners, grid cells, and (with regions) the region each one belongs to."""

    coords: np.ndarray  # (N, 2) int64
    cells: np.ndarray  # (N, 2) int64: column, row in the probability grid
    region: np.ndarray  # (N,) int32, -1 without regions
    tissue: np.ndarray  # (N,) float32
    grid_shape: tuple[int, int]  # rows, columns
    step: float
    extent: float


def plan_grid(reader: TileReader, *, regions: Sequence[Region] | None, min_tissue: float,
              min_coverage: float, stride: int | None = None, tissue_mpp: float = TISSUE_MPP) -> GridPlan:
    """Every tissue tile of the grid of ``reader``'s tiles over its slide, or only those that one of ``regions``
    covers at least ``min_coverage`` of (each tile then belongs to the region covering most of it)."""
    grid = GridSpec.for_reader(reader, stride)
    xs, ys = grid.full_grid()
    tissue = detect_tissue(reader.slide, target_mpp=tissue_mpp)
    frac = tissue.fractions(xs.astype(np.float64), ys.astype(np.float64), grid.extent)
    keep = frac >= min_tissue
    region = np.full(len(xs), -1, np.int32)
    if regions:
        boxes = tile_boxes(xs, ys, grid.extent)
        best = np.zeros(len(xs))
        for r in regions:
            cov = coverage_of(boxes, r.geometry, grid.extent**2)
            better = cov > best
            region[better], best[better] = r.index, cov[better]
        keep &= best >= min_coverage
    cols = np.round(xs / grid.step).astype(np.int64)
    rows = np.round(ys / grid.step).astype(np.int64)
    n_cols = int(cols.max()) + 1 if len(cols) else 0
    n_rows = int(rows.max()) + 1 if len(rows) else 0
    return GridPlan(coords=np.stack([xs, ys], 1)[keep], cells=np.stack([cols, rows], 1)[keep], region=region[keep],
                    tissue=frac[keep].astype(np.float32), grid_shape=(n_rows, n_cols), step=grid.step,
                    extent=grid.extent)
