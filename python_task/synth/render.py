"""Drawing one synthetic H&E slide: tissue outline and annotated regions, ducts and glands, nuclei and stroma,
turned into RGB by a Beer–Lambert stain model (see :mod:`python_task.synth`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage
from shapely.geometry import MultiPoint, Polygon, box
from shapely.geometry.base import BaseGeometry

from python_task.synth.config import BENIGN_CLASSES, DIAGNOSES, HAMARTOMA_CLASS, MALIGNANT_CLASS, SlideSpec

# Reference optical-density vectors (Macenko et al. 2009), one row per stain, columns R, G, B.
H_REF = np.array([0.5626, 0.7201, 0.4062], dtype=np.float32)
E_REF = np.array([0.2159, 0.8012, 0.5581], dtype=np.float32)

# Every size below is in pixels at this resolution; slides at another mpp are drawn at the same physical size.
_DESIGN_MPP = 0.5
_STRIP = 256  # rows composed at a time: keeps the float temporaries small


# --------------------------------------------------------------------------------------------------------------
# Slide layout: tissue outline and annotated regions


@dataclass(frozen=True)
class RegionStyle:
    """How one annotated region is drawn. The composition ranges are shared by benign and malignant regions
    on purpose (see the module docstring)."""

    class_name: str
    polygon: Polygon
    stroma_gain: float  # eosin density of the region's stroma
    cytoplasm: float  # eosin of the epithelial cytoplasm
    hema_factor: float  # uneven staining: scales the hematoxylin of the region's stromal cells
    spacing: float  # gland centre spacing, in units of the mean gland diameter
    lumen: float  # lumen radius / gland radius
    darkness: float  # mean nuclear hematoxylin
    nuclear_target: float  # share of the region covered by nuclei, reached by adding stromal cells
    white_target: float  # share of the region that is empty space, reached by adding small vessels
    retraction: float  # share of glands with a white retraction cleft around them
    vesicular: float  # share of malignant nuclei with pale chromatin and a nucleolus


def layout_slide(rng: np.random.Generator, size: int, diagnosis: str) -> tuple[Polygon, list[RegionStyle]]:
    """An irregular tissue outline and 3–6 annotated regions covering most of it.

    The tissue is cut into Voronoi cells; each cell, shrunk by a stroma gap and rounded like a hand-drawn
    outline, becomes one region.
    """
    tissue = _tissue_outline(rng, size)
    n_cells = int(rng.integers(3, 7))
    minx, miny, maxx, maxy = tissue.bounds
    seeds = []
    while len(seeds) < n_cells:
        x, y = rng.uniform(minx, maxx), rng.uniform(miny, maxy)
        if tissue.contains(shapely.Point(x, y)) and all(math.dist((x, y), s) > 0.2 * size for s in seeds):
            seeds.append((x, y))
        elif rng.random() < 0.01:  # give up on spreading them when the outline is small
            seeds.append((x, y))
    cells = shapely.voronoi_polygons(MultiPoint(seeds), extend_to=box(0, 0, size, size))
    gap, rounding = 0.012 * size, 0.04 * size
    inner = tissue.buffer(-0.02 * size)
    polygons = []
    for cell in cells.geoms:
        shape = cell.intersection(inner).buffer(-gap).buffer(-rounding).buffer(rounding)
        shape = _largest_polygon(shape)
        if shape is not None and shape.area > 0.01 * size * size:
            polygons.append(shapely.Polygon(shape.exterior).simplify(size / 2000))
    if not polygons:  # a tiny or odd outline: one region in the middle of the tissue
        polygons = [shapely.Polygon(_largest_polygon(tissue.buffer(-0.1 * size)).exterior)]
    polygons.sort(key=lambda p: (round(p.centroid.y), round(p.centroid.x)))
    classes = _region_classes(rng, diagnosis, len(polygons))
    return tissue, [_region_style(rng, c, p) for c, p in zip(classes, polygons)]


def _tissue_outline(rng: np.random.Generator, size: int) -> Polygon:
    """A smooth irregular blob filling most of the slide, inside a small margin."""
    theta = np.linspace(0, 2 * np.pi, 240, endpoint=False)
    radius = np.ones_like(theta)
    for k in range(2, 9):
        radius += rng.normal(0, 0.10 / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    radius = 0.46 * size * radius / radius.max()
    aspect = rng.uniform(0.8, 1.0)
    rot = rng.uniform(0, np.pi)
    x, y = radius * np.cos(theta), aspect * radius * np.sin(theta)
    xr, yr = x * np.cos(rot) - y * np.sin(rot), x * np.sin(rot) + y * np.cos(rot)
    cx, cy = size / 2 + rng.normal(0, 0.02 * size, 2)
    outline = shapely.Polygon(np.stack([cx + xr, cy + yr], 1)).buffer(0)
    return _largest_polygon(outline.intersection(box(0.02 * size, 0.02 * size, 0.98 * size, 0.98 * size)))


def _largest_polygon(geom: BaseGeometry) -> Polygon | None:
    parts = [g for g in getattr(geom, "geoms", [geom]) if isinstance(g, Polygon) and not g.is_empty]
    return max(parts, key=lambda g: g.area) if parts else None


def _region_classes(rng: np.random.Generator, diagnosis: str, n: int) -> list[str]:
    """Malignant slides: cholangiocarcinoma, sometimes with one benign region; benign slides: mostly one
    benign type with some of the other."""
    if diagnosis == "malignant":
        classes = [MALIGNANT_CLASS] * n
        if n >= 3 and rng.random() < 0.5:
            classes[int(rng.integers(n))] = BENIGN_CLASSES[int(rng.integers(2))]
        return classes
    main = int(rng.integers(2))
    return [BENIGN_CLASSES[main if rng.random() < 0.7 else 1 - main] for _ in range(n)]


def _region_style(rng: np.random.Generator, class_name: str, polygon: Polygon) -> RegionStyle:
    """Composition of one region.

    The glands differ by class; the share of nuclei and of empty space is drawn from one distribution for
    every class and reached by topping up with lymphocytes, fibroblasts and small vessels (see
    :func:`_balance_region`), so that both classes show about the same amounts of dark, pink and white.
    """
    malignant = class_name == MALIGNANT_CLASS
    hamartoma = class_name == HAMARTOMA_CLASS
    if malignant:
        lumen, spacing = rng.uniform(0.3, 0.5), rng.uniform(0.85, 1.15)
    elif hamartoma:
        lumen, spacing = rng.uniform(0.45, 0.6), rng.uniform(1.1, 1.4)
    else:
        lumen, spacing = rng.uniform(0.3, 0.45), rng.uniform(1.0, 1.3)
    return RegionStyle(
        class_name=class_name, polygon=polygon,
        stroma_gain=float(rng.uniform(0.6, 1.4)),
        cytoplasm=float(rng.uniform(0.28, 0.44)),
        hema_factor=float(rng.uniform(0.85, 1.15)),
        spacing=float(spacing),
        lumen=float(lumen),
        darkness=float(rng.uniform(0.62, 0.85) if malignant else rng.uniform(0.6, 0.82)),
        nuclear_target=float(rng.uniform(0.16, 0.22)),
        white_target=float(rng.uniform(0.08, 0.13)),
        retraction=float(rng.uniform(0.0, 0.25) if malignant else 0.0),
        vesicular=float(rng.uniform(0.3, 0.7) if malignant else 0.0),
    )


# --------------------------------------------------------------------------------------------------------------
# Drawing: a canvas of compartment codes, eosin and nuclear-hematoxylin maps

GLASS, STROMA, EPITHELIUM, LUMEN = 0, 1, 2, 3


class _Canvas:
    """Full-resolution drawing surfaces, 8-bit PIL images drawn in C: compartment codes, epithelial/lumen
    eosin, nuclear hematoxylin and the regions' stroma density (each value times its ``*_UNIT`` code).
    Stroma eosin is a texture added when composing."""

    EOSIN_UNIT = 400.0  # code per unit eosin concentration
    NUCLEI_UNIT = 150.0
    GAIN_UNIT = 100.0

    def __init__(self, size: int) -> None:
        self.size = size
        self.comp = Image.new("L", (size, size), GLASS)
        self.eosin = Image.new("L", (size, size), 0)
        self.nuclei = Image.new("L", (size, size), 0)
        self.stroma_gain = Image.new("L", (size, size), round(self.GAIN_UNIT))
        self._comp = ImageDraw.Draw(self.comp)
        self._eosin = ImageDraw.Draw(self.eosin)
        self._nuclei = ImageDraw.Draw(self.nuclei)
        self._gain = ImageDraw.Draw(self.stroma_gain)

    def tissue(self, polygon: Polygon) -> None:
        self._comp.polygon(_flat(polygon.exterior.coords), fill=STROMA)

    def region_stroma(self, polygon: Polygon, gain: float) -> None:
        self._gain.polygon(_flat(polygon.exterior.coords), fill=_code(gain, self.GAIN_UNIT))

    def structure(self, polys: np.ndarray, code: int, eosin: np.ndarray) -> None:
        """Fill polygons (N, V, 2) with a compartment code and eosin, erasing nuclei under them."""
        if len(polys) == 0:
            return
        for verts, e in zip(polys.reshape(len(polys), -1).tolist(), _codes(eosin, self.EOSIN_UNIT)):
            self._comp.polygon(verts, fill=code)
            self._eosin.polygon(verts, fill=e)
            self._nuclei.polygon(verts, fill=0)

    def nuclei_polys(self, polys: np.ndarray, darkness: np.ndarray) -> None:
        if len(polys) == 0:
            return
        for verts, h in zip(polys.reshape(len(polys), -1).tolist(), _codes(darkness, self.NUCLEI_UNIT)):
            self._nuclei.polygon(verts, fill=h)


def _code(value: float, unit: float) -> int:
    return int(np.clip(round(value * unit), 0, 255))


def _codes(values: np.ndarray, unit: float) -> list[int]:
    return np.clip(np.rint(np.asarray(values) * unit), 0, 255).astype(int).tolist()


def _flat(coords: Any) -> list[float]:
    return np.asarray(coords, dtype=np.float64)[:, :2].ravel().tolist()


def _shapes(cx: np.ndarray, cy: np.ndarray, radius: np.ndarray, aspect: np.ndarray, rot: np.ndarray,
            radial: np.ndarray) -> np.ndarray:
    """Star-shaped polygons (N, V, 2): ``radial`` (N, V) is each vertex's radius relative to ``radius``."""
    n, v = radial.shape
    theta = np.linspace(0, 2 * np.pi, v, endpoint=False)[None, :]
    r = radius[:, None] * radial
    x, y = r * np.cos(theta), aspect[:, None] * r * np.sin(theta)
    c, s = np.cos(rot)[:, None], np.sin(rot)[:, None]
    return np.stack([cx[:, None] + c * x - s * y, cy[:, None] + s * x + c * y], axis=-1)


def _ellipses(rng: np.random.Generator, cx: np.ndarray, cy: np.ndarray, radius: np.ndarray, aspect: np.ndarray,
              rot: np.ndarray, jag: float, vertices: int = 10) -> np.ndarray:
    radial = 1 + jag * rng.standard_normal((len(cx), vertices))
    return _shapes(cx, cy, radius, aspect, rot, np.clip(radial, 0.6, 1.5))


def _scatter_in(rng: np.random.Generator, polygon: BaseGeometry, density: float) -> tuple[np.ndarray, np.ndarray]:
    """Uniform random points inside ``polygon``, ``density`` per 10^4 px²."""
    minx, miny, maxx, maxy = polygon.bounds
    n = rng.poisson(density * (maxx - minx) * (maxy - miny) / 1e4)
    x, y = rng.uniform(minx, maxx, n), rng.uniform(miny, maxy, n)
    inside = shapely.contains_xy(polygon, x, y)
    return x[inside], y[inside]


def _grid_in(rng: np.random.Generator, polygon: BaseGeometry, spacing: float,
             jitter: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Jittered hexagonal grid points inside ``polygon``, in random order."""
    if polygon.is_empty:
        return np.empty(0), np.empty(0)
    minx, miny, maxx, maxy = polygon.bounds
    ys = np.arange(miny, maxy + spacing, spacing * math.sqrt(3) / 2)
    xs = np.arange(minx, maxx + spacing, spacing)
    gx, gy = np.meshgrid(xs, ys)
    gx = gx + (np.arange(len(ys))[:, None] % 2) * spacing / 2
    x = gx.ravel() + rng.normal(0, jitter * spacing, gx.size)
    y = gy.ravel() + rng.normal(0, jitter * spacing, gy.size)
    inside = shapely.contains_xy(polygon, x, y)
    order = rng.permutation(int(inside.sum()))
    return x[inside][order], y[inside][order]


def _stromal_cells(rng: np.random.Generator, canvas: _Canvas, area: BaseGeometry, scale: float,
                   fibroblasts: float, lymphocytes: float) -> None:
    """Spindle-shaped fibroblast nuclei and small, round, dark lymphocytes scattered over ``area``."""
    x, y = _scatter_in(rng, area, fibroblasts / scale**2)
    n = len(x)
    polys = _ellipses(rng, x, y, rng.uniform(5.5, 8.0, n) * scale, rng.uniform(0.25, 0.4, n),
                      rng.uniform(0, np.pi, n), 0.05, 8)
    canvas.nuclei_polys(polys, rng.uniform(0.5, 0.7, n))
    x, y = _scatter_in(rng, area, lymphocytes / scale**2)
    # lymphocytes come in loose clusters: half of them are pulled towards a few centres
    if len(x) > 10:
        k = max(1, len(x) // 40)
        centres = rng.integers(0, len(x), k)
        pull = rng.random(len(x)) < 0.5
        target = rng.integers(0, k, len(x))
        x = np.where(pull, x[centres][target] + rng.normal(0, 25 * scale, len(x)), x)
        y = np.where(pull, y[centres][target] + rng.normal(0, 25 * scale, len(x)), y)
    n = len(x)
    polys = _ellipses(rng, x, y, rng.uniform(2.8, 3.6, n) * scale, rng.uniform(0.85, 1.0, n),
                      rng.uniform(0, np.pi, n), 0.04, 8)
    canvas.nuclei_polys(polys, rng.uniform(0.75, 0.95, n))


def _balance_region(rng: np.random.Generator, canvas: _Canvas, style: RegionStyle, scale: float) -> None:
    """Top the region up to its target shares of empty space (small vessels in the stroma) and of nuclei
    (lymphocytes, some in clusters, and fibroblasts in the stroma).

    This is what keeps colour from telling the classes apart: whatever the glands brought, every region ends
    with shares drawn from the same distribution."""
    bbox, mask = _region_mask(canvas.size, style.polygon)
    area = max(1, int(mask.sum()))
    for _ in range(3):  # cells overlap or fall on glands: measure again and add more
        comp, nuclei = np.asarray(canvas.comp.crop(bbox)), np.asarray(canvas.nuclei.crop(bbox))
        missing = style.white_target * area - int(((comp == LUMEN) & (nuclei == 0) & mask).sum())
        if missing < 0.005 * area:
            break
        x, y = _free_stroma(rng, comp, nuclei, mask, bbox, int(missing / (150 * scale**2)) + 1)
        n = len(x)
        radius = rng.uniform(5, 13, n) * scale
        aspect = rng.uniform(0.35, 1.0, n)
        rot = rng.uniform(0, np.pi, n)
        canvas.structure(_ellipses(rng, x, y, radius, aspect, rot, 0.08, 16), LUMEN,
                         _lumen_eosin(rng, n))
        # a flat endothelial nucleus on the rim of each vessel
        phi = rng.uniform(0, 2 * np.pi, n)
        ex, ey = radius * np.cos(phi), aspect * radius * np.sin(phi)
        rim_x = x + np.cos(rot) * ex - np.sin(rot) * ey
        rim_y = y + np.sin(rot) * ex + np.cos(rot) * ey
        endothelium = _ellipses(rng, rim_x, rim_y, rng.uniform(4, 6, n) * scale, np.full(n, 0.3),
                                rot + phi + np.pi / 2, 0.05, 8)
        canvas.nuclei_polys(endothelium, rng.uniform(0.55, 0.75, n) * style.hema_factor)
    for _ in range(3):
        comp, nuclei = np.asarray(canvas.comp.crop(bbox)), np.asarray(canvas.nuclei.crop(bbox))
        missing = style.nuclear_target * area - int(((nuclei > 0) & (comp != GLASS) & mask).sum())
        if missing < 0.005 * area:
            break
        x, y = _free_stroma(rng, comp, nuclei, mask, bbox, int(missing / (30 * scale**2)) + 1)
        n = len(x)
        lymph = rng.random(n) < 0.75
        clustered = lymph & (rng.random(n) < 0.4)  # pulled towards a few lymphoid aggregates
        if clustered.any():
            k = max(1, int(clustered.sum()) // 30)
            centre = rng.integers(0, n, k)[rng.integers(0, k, int(clustered.sum()))]
            x[clustered] = x[centre] + rng.normal(0, 20 * scale, int(clustered.sum()))
            y[clustered] = y[centre] + rng.normal(0, 20 * scale, int(clustered.sum()))
        radius = np.where(lymph, rng.uniform(2.8, 3.6, n), rng.uniform(5.5, 8.0, n)) * scale
        aspect = np.where(lymph, rng.uniform(0.85, 1.0, n), rng.uniform(0.25, 0.4, n))
        darkness = np.where(lymph, rng.uniform(0.75, 0.95, n), rng.uniform(0.5, 0.7, n)) * style.hema_factor
        canvas.nuclei_polys(_ellipses(rng, x, y, radius, aspect, rng.uniform(0, np.pi, n), 0.05, 8), darkness)


def _lumen_eosin(rng: np.random.Generator, n: int) -> np.ndarray:
    """Eosin of ``n`` lumens or vessels, from one distribution for every class: a faint haze of fluid, or
    in a quarter of them, pink secretions."""
    return np.where(rng.random(n) < 0.25, rng.uniform(0.05, 0.25, n), rng.uniform(0.0, 0.06, n))


def _region_mask(size: int, polygon: Polygon) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """The region's pixel bounding box (left, top, right, bottom) and a boolean mask of it."""
    minx, miny, maxx, maxy = polygon.bounds
    bbox = (max(0, int(minx)), max(0, int(miny)), min(size, int(maxx) + 1), min(size, int(maxy) + 1))
    image = Image.new("L", (bbox[2] - bbox[0], bbox[3] - bbox[1]), 0)
    coords = np.asarray(polygon.exterior.coords)[:, :2] - [bbox[0], bbox[1]]
    ImageDraw.Draw(image).polygon(coords.ravel().tolist(), fill=1)
    return bbox, np.asarray(image).astype(bool)


def _free_stroma(rng: np.random.Generator, comp: np.ndarray, nuclei: np.ndarray, mask: np.ndarray,
                 bbox: tuple[int, int, int, int], n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random points (slide coordinates) on stroma free of nuclei inside the region."""
    free = np.flatnonzero(((comp == STROMA) & (nuclei == 0) & mask).ravel())
    if len(free) == 0 or n <= 0:
        return np.empty(0), np.empty(0)
    pick = free[rng.integers(0, len(free), n)]
    y, x = np.divmod(pick, comp.shape[1])
    return (x + bbox[0] + rng.random(n)).astype(np.float64), (y + bbox[1] + rng.random(n)).astype(np.float64)


def _benign_region(rng: np.random.Generator, canvas: _Canvas, style: RegionStyle,
                   scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Round ducts with a round lumen, lined by one layer of small uniform round nuclei.

    Adenoma: small packed tubules; hamartoma: dilated ducts with flat lining in more stroma. Returns the
    nuclei to draw once every region's structures are down: (N, V, 2) polygons with darkness in a tuple.
    """
    hamartoma = style.class_name == HAMARTOMA_CLASS
    mean_r = (rng.uniform(45, 70) if hamartoma else rng.uniform(26, 36)) * scale
    x, y = _grid_in(rng, style.polygon.buffer(-0.8 * mean_r), 2 * mean_r * style.spacing)
    n = len(x)
    radius = mean_r * rng.uniform(0.85, 1.15, n)
    aspect = rng.uniform(0.8, 1.0, n) if not hamartoma else rng.uniform(0.65, 0.95, n)
    rot = rng.uniform(0, np.pi, n)
    radial = 1 + 0.025 * rng.standard_normal((n, 32))
    if hamartoma:  # gently lobulated, still smooth
        theta = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        radial = radial + 0.06 * np.cos(2 * theta[None] + rng.uniform(0, 6.3, (n, 1)))
    outer = _shapes(x, y, radius, aspect, rot, radial)
    lumen_ratio = style.lumen * rng.uniform(0.9, 1.1, n)
    inner = _shapes(x, y, radius * lumen_ratio, aspect, rot, radial)
    canvas.structure(outer, EPITHELIUM, style.cytoplasm * rng.uniform(0.92, 1.08, n))
    canvas.structure(inner, LUMEN, _lumen_eosin(rng, n))

    # one layer of nuclei on a ring between lumen and basement membrane
    nuc_r = (3.4 if hamartoma else 3.9) * scale
    ring = radius * (lumen_ratio + (1 - lumen_ratio) * 0.52)
    counts = np.maximum(4, (2 * np.pi * ring * (1 + aspect) / 2 / (nuc_r * 2.7)).astype(int))
    gland = np.repeat(np.arange(n), counts)
    k = np.concatenate([np.arange(c) for c in counts]) if n else np.empty(0, int)
    phi = (k + rng.uniform(-0.12, 0.12, len(k))) * 2 * np.pi / counts[gland] + rng.uniform(0, 6.3, n)[gland]
    lx, ly = ring[gland] * np.cos(phi), aspect[gland] * ring[gland] * np.sin(phi)
    c, s = np.cos(rot[gland]), np.sin(rot[gland])
    nx, ny = x[gland] + c * lx - s * ly, y[gland] + s * lx + c * ly
    m = len(nx)
    tangent = rot[gland] + np.arctan2(aspect[gland] * np.cos(phi), -np.sin(phi))
    polys = _ellipses(rng, nx, ny, nuc_r * rng.uniform(0.92, 1.08, m),
                      rng.uniform(0.55, 0.7, m) if hamartoma else rng.uniform(0.8, 0.95, m), tangent, 0.03)
    darkness = style.darkness * rng.uniform(0.92, 1.08, m)
    return polys, darkness


def _malignant_region(rng: np.random.Generator, canvas: _Canvas, style: RegionStyle,
                      scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Irregular angular glands, often branching (several fused lobes), with crowded multilayered large
    pleomorphic hyperchromatic nuclei; some solid nests without a lumen."""
    mean_r = rng.uniform(42, 60) * scale
    x, y = _grid_in(rng, style.polygon.buffer(-0.8 * mean_r), 2 * mean_r * style.spacing, jitter=0.3)
    lobes_x, lobes_y, lobe_gland = [], [], []
    for i in range(len(x)):  # each gland: 1-3 lobes offset along a random walk -> branching shapes
        n_lobes = int(rng.choice([1, 2, 2, 3]))
        px, py = x[i], y[i]
        for _ in range(n_lobes):
            lobes_x.append(px)
            lobes_y.append(py)
            lobe_gland.append(i)
            angle = rng.uniform(0, 2 * np.pi)
            px, py = px + 0.8 * mean_r * np.cos(angle), py + 0.8 * mean_r * np.sin(angle)
    lx, ly = np.array(lobes_x), np.array(lobes_y)
    n = len(lx)
    radius = mean_r * rng.uniform(0.7, 1.05, n)
    aspect = rng.uniform(0.45, 0.95, n)
    rot = rng.uniform(0, np.pi, n)
    vertices = 9
    radial = np.clip(1 + 0.22 * rng.standard_normal((n, vertices)), 0.55, 1.5)  # few vertices: angular
    outer = _shapes(lx, ly, radius, aspect, rot, radial)
    cleft = rng.random(n) < style.retraction
    halo = _shapes(lx, ly, radius * rng.uniform(1.08, 1.2, n), aspect, rot, radial)[cleft]
    canvas.structure(halo, LUMEN, _lumen_eosin(rng, len(halo)))
    solid = rng.random(n) < 0.15
    lumen_ratio = np.where(solid, 0.0, style.lumen * rng.uniform(0.7, 1.3, n))
    lumen_radial = radial * np.clip(1 + 0.25 * rng.standard_normal((n, vertices)), 0.5, 1.4)
    inner = _shapes(lx, ly, radius * lumen_ratio, aspect, rot, lumen_radial)
    canvas.structure(outer, EPITHELIUM, style.cytoplasm * rng.uniform(0.92, 1.08, n))
    has_lumen = ~solid
    canvas.structure(inner[has_lumen], LUMEN, _lumen_eosin(rng, n)[has_lumen])

    # multilayered nuclei filling the band between lumen and outline
    nuc_mean = rng.uniform(5.8, 7.0) * scale
    band = np.pi * radius**2 * aspect * (1 - lumen_ratio**2)
    counts = rng.poisson(0.45 * band / (np.pi * nuc_mean**2 * 0.75))
    lobe = np.repeat(np.arange(n), counts)
    m = len(lobe)
    phi = rng.uniform(0, 2 * np.pi, m)
    pos = phi / (2 * np.pi) * vertices
    j0 = pos.astype(int) % vertices
    j1 = (j0 + 1) % vertices
    f = pos - np.floor(pos)
    r_out = radius[lobe] * ((1 - f) * radial[lobe, j0] + f * radial[lobe, j1])
    r_in = radius[lobe] * lumen_ratio[lobe] * ((1 - f) * lumen_radial[lobe, j0] + f * lumen_radial[lobe, j1])
    lo = r_in + 0.5 * nuc_mean
    hi = np.maximum(lo, r_out - 0.7 * nuc_mean)
    rr = lo + (hi - lo) * np.sqrt(rng.random(m))
    px, py = rr * np.cos(phi), aspect[lobe] * rr * np.sin(phi)
    c, s = np.cos(rot[lobe]), np.sin(rot[lobe])
    nx, ny = lx[lobe] + c * px - s * py, ly[lobe] + s * px + c * py
    sizes = nuc_mean * np.exp(rng.normal(0, 0.22, m))  # pleomorphic
    aspect_n, rot_n = rng.uniform(0.5, 1.0, m), rng.uniform(0, np.pi, m)
    polys = _ellipses(rng, nx, ny, sizes, aspect_n, rot_n, 0.12)
    darkness = style.darkness * rng.uniform(0.85, 1.15, m)
    # vesicular nuclei: paler chromatin inside a dark membrane, with a prominent nucleolus
    ves = rng.random(m) < style.vesicular
    k = int(ves.sum())
    cores = _ellipses(rng, nx[ves], ny[ves], sizes[ves] * rng.uniform(0.55, 0.75, k), aspect_n[ves], rot_n[ves],
                      0.08)
    nucleoli = _ellipses(rng, nx[ves] + rng.normal(0, 1, k), ny[ves] + rng.normal(0, 1, k),
                         np.full(k, 1.3 * scale), np.ones(k), np.zeros(k), 0.05)
    polys = np.concatenate([polys, cores, nucleoli])
    darkness = np.concatenate([darkness, darkness[ves] * rng.uniform(0.4, 0.55, k),
                               np.full(k, style.darkness * 1.15)])
    return polys, darkness


# --------------------------------------------------------------------------------------------------------------
# Stain model


@dataclass(frozen=True)
class Stain:
    """One slide's stain: optical density per unit concentration (rows H, E; columns R, G, B), and the
    light that passes through bare glass."""

    h_vector: np.ndarray
    e_vector: np.ndarray
    background: np.ndarray  # (3,) float32, 0-255


def sample_stain(rng: np.random.Generator, variation: float = 1.0) -> Stain:
    """Reference H&E stain turned and scaled at random; ``variation`` 0 gives the reference exactly.

    At ``variation`` 1 each stain vector turns by about 5° (a hue shift) and each intensity changes by about
    18 %; 2 doubles both. Turns are capped at 2.5 standard deviations so a slide always looks like H&E."""

    def turned(ref: np.ndarray) -> np.ndarray:
        axis = np.cross(ref, rng.standard_normal(3))
        axis /= max(1e-9, float(np.linalg.norm(axis)))
        angle = math.radians(5.0) * variation * float(np.clip(rng.standard_normal(), -2.5, 2.5))
        v = np.clip(ref / np.linalg.norm(ref) * math.cos(angle) + axis * math.sin(angle), 0.02, None)
        return v / np.linalg.norm(v)

    def vector(ref: np.ndarray, intensity_sd: float, plausible: Callable[[np.ndarray], bool]) -> np.ndarray:
        for _ in range(50):  # keep hematoxylin blue-purple and eosin pink
            v = turned(ref)
            if plausible(v):
                break
        else:
            v = ref / np.linalg.norm(ref)
        scale = math.exp(intensity_sd * variation * float(np.clip(rng.standard_normal(), -2.5, 2.5)))
        return (v * scale).astype(np.float32)

    h = vector(H_REF, 0.18, lambda v: v[2] < min(v[0], v[1]) - 0.1)  # transmits blue most
    e = vector(E_REF, 0.18, lambda v: v[1] > v[2] > v[0])  # absorbs green most, transmits red most
    tint = 0.95 + 0.012 * variation * np.clip(rng.standard_normal(3), -2.5, 2.5)
    return Stain(h_vector=h, e_vector=e, background=(255 * np.clip(tint, 0.82, 1.0)).astype(np.float32))


def stain_to_rgb(hema: np.ndarray, eosin: np.ndarray, stain: Stain, noise: np.ndarray | float = 0.0) -> np.ndarray:
    """Beer–Lambert: ``I = I0 · 10^-(cH·h + cE·e)`` per channel (plus additive sensor ``noise``), uint8 (..., 3).

    Computed one channel at a time on contiguous arrays (much faster than broadcasting over a last axis of 3).
    """
    hema = np.asarray(hema, dtype=np.float32)
    eosin = np.asarray(eosin, dtype=np.float32)
    out = np.empty(hema.shape + (3,), dtype=np.uint8)
    minus_ln10 = np.float32(-math.log(10))
    for c in range(3):
        od = hema * (stain.h_vector[c] * minus_ln10) + eosin * (stain.e_vector[c] * minus_ln10)
        channel = np.exp(od, out=od)
        channel *= stain.background[c]
        channel += np.float32(0.5)
        channel += noise
        out[..., c] = np.clip(channel, 0, 255)
    return out


# --------------------------------------------------------------------------------------------------------------
# Rendering


def render_spec(spec: SlideSpec) -> tuple[np.ndarray, list[tuple[str, Polygon]]]:
    """Render the slide of a cohort plan entry (see :func:`render_slide`)."""
    return render_slide(spec.rng(), spec.size, spec.diagnosis, mpp=spec.mpp, stain_variation=spec.stain_variation)


def render_slide(rng: np.random.Generator, size: int, diagnosis: str, *, mpp: float = 0.5,
                 stain_variation: float = 1.0) -> tuple[np.ndarray, list[tuple[str, Polygon]]]:
    """Draw one square H&E slide of ``size`` px at ``mpp``.

    Returns the RGB pixels (size, size, 3) uint8 and the annotated regions as ``(class name, polygon)`` in
    pixel coordinates.
    """
    if diagnosis not in DIAGNOSES:
        raise ValueError(f"diagnosis must be one of {DIAGNOSES}, not {diagnosis!r}")
    scale = _DESIGN_MPP / mpp
    tissue, styles = layout_slide(rng, size, diagnosis)
    canvas = _Canvas(size)
    canvas.tissue(tissue)
    for style in styles:
        canvas.region_stroma(style.polygon, style.stroma_gain)
    # stromal cells everywhere; glands drawn next erase those under them
    _stromal_cells(rng, canvas, tissue, scale, fibroblasts=2.0, lymphocytes=0.6)
    pending = []
    for style in styles:
        draw = _malignant_region if style.class_name == MALIGNANT_CLASS else _benign_region
        pending.append(draw(rng, canvas, style, scale))
    for polys, darkness in pending:
        canvas.nuclei_polys(polys, darkness.astype(np.float32))
    for style in styles:
        _balance_region(rng, canvas, style, scale)
    stain = sample_stain(rng, stain_variation)
    rgb = _compose(rng, canvas, stain, scale)
    return rgb, [(s.class_name, s.polygon) for s in styles]


def _compose(rng: np.random.Generator, canvas: _Canvas, stain: Stain, scale: float) -> np.ndarray:
    """Concentration maps -> RGB, strip by strip, then a slight blur."""
    size = canvas.size
    comp = np.asarray(canvas.comp)
    eosin = np.asarray(canvas.eosin)
    nuclei = np.asarray(canvas.nuclei)
    gain = np.asarray(canvas.stroma_gain)
    fibres = _fibre_texture(rng, size, scale)
    noise = rng.random((512, 512), dtype=np.float32) - np.float32(0.5)
    # lookup tables: base hematoxylin per compartment code (stroma, cytoplasm), and 8-bit codes to concentrations
    base_h = np.array([0.0, 0.06, 0.14, 0.0] + [0.0] * 252, dtype=np.float32)
    e_lut = np.arange(256, dtype=np.float32) / np.float32(canvas.EOSIN_UNIT)
    n_lut = np.arange(256, dtype=np.float32) / np.float32(canvas.NUCLEI_UNIT)
    g_lut = np.arange(256, dtype=np.float32) / np.float32(canvas.GAIN_UNIT)
    out = np.empty((size, size, 3), dtype=np.uint8)
    for y0 in range(0, size, _STRIP):
        y1 = min(size, y0 + _STRIP)
        c = comp[y0:y1]
        nz = _tiled(noise, y0, y1 - y0, size, int(rng.integers(512)))
        tissue = (c != GLASS).astype(np.float32)
        nuc = n_lut[nuclei[y0:y1]]
        e = e_lut[eosin[y0:y1]] + (c == STROMA) * g_lut[gain[y0:y1]] * fibres[y0:y1]
        h = base_h[c]
        in_nucleus = (nuc > 0) & (c != GLASS)
        h = np.where(in_nucleus, nuc * (1 + 0.6 * nz), h + 0.03 * tissue * nz)
        e = np.where(in_nucleus, e * 0.45, e) * (1 + 0.25 * nz * tissue)
        out[y0:y1] = stain_to_rgb(np.maximum(h, 0), np.maximum(e, 0), stain, noise=4 * nz[:, ::-1])
    kernel = ImageFilter.Kernel((3, 3), [1, 2, 1, 2, 4, 2, 1, 2, 1], scale=16) if scale < 1.5 else \
        ImageFilter.Kernel((5, 5), np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]).ravel().tolist(), scale=256)
    return np.asarray(Image.fromarray(out).filter(kernel)).copy()


def _tiled(block: np.ndarray, y0: int, height: int, width: int, shift: int) -> np.ndarray:
    """Rows ``y0 .. y0+height`` of ``block`` repeated over a (height, width) field, shifted sideways."""
    bh, bw = block.shape
    rows = block[(np.arange(y0, y0 + height) % bh)]
    reps = math.ceil((width + shift) / bw)
    return np.tile(rows, (1, reps))[:, shift:shift + width]


def _fibre_texture(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Stromal eosin (size, size) float32: wavy collagen fibres with denser and looser, paler areas.

    White noise smeared along a slowly turning direction field (a blend of four orientations, each a mean of
    shifted copies), drawn at a quarter of the resolution and upsampled."""
    small = max(16, size // 4)
    base = rng.standard_normal((small, small), dtype=np.float32)
    direction = _smooth_field(rng, small, 6) * np.float32(np.pi)
    length = max(2, round(5 * scale))
    fibres = np.zeros((small, small), dtype=np.float32)
    weights = np.zeros((small, small), dtype=np.float32)
    for k in range(4):
        angle = k * np.pi / 4
        smear = np.zeros_like(base)
        for t in range(-length, length + 1):
            smear += np.roll(base, (round(t * math.sin(angle)), round(t * math.cos(angle))), axis=(0, 1))
        w = np.maximum(np.cos(2 * (direction - np.float32(angle))), 0) ** 3
        fibres += w * smear
        weights += w
    fibres /= np.maximum(weights, 1e-3) * math.sqrt(2 * length + 1)
    fibres = np.clip(0.5 + 0.35 * fibres, 0, 1)
    density = np.float32(0.8) + np.float32(0.4) * (_smooth_field(rng, small, 12) * 0.5 + 0.5)
    tex = (np.float32(0.18) + np.float32(0.5) * fibres) * density
    img = Image.fromarray(tex.astype(np.float32)).resize((size, size), Image.BILINEAR)
    return np.asarray(img)


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field in about [-1, 1] with ``cells`` bumps across, upsampled bilinearly."""
    coarse = rng.uniform(-1, 1, (cells + 1, cells + 1)).astype(np.float32)
    coarse = ndimage.gaussian_filter(coarse, 0.7, mode="wrap")
    coarse = coarse / max(1e-6, float(np.abs(coarse).max()))
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))
