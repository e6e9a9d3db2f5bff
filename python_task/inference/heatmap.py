"""``heatmap.png``: the probability of malignancy over a slide, drawn so it cannot be mistaken for the stain.

Two panels of the same thumbnail. Left, the slide as scanned, with the annotation outlines. Right, the tissue in
grey (so every colour on it is the model's, never eosin's pink or haematoxylin's purple) under a diverging map
centred on the decision threshold: blue below it (benign), pale yellow at it (uncertain), orange-red above it
(malignant), the colour's strength growing with the distance from the threshold on each side. Cells without a
tile stay uncoloured. The colour bar marks the threshold in black.

Annotation outlines (holes included, dashed) take the colour of their target class, the same on every slide (green
benign, black malignant, dark teal a third target, brown a class that maps to none), a palette kept apart from the
map's blue, yellow and red and from the stain's pink and purple, each with a white halo, named in a legend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from python_task.fileio import atomic_path
from python_task.wsi.annotations import Region
from python_task.wsi.labels import LabelMap, load_label_map

# Diverging, colour-blind safe (blue against orange-red), centred on the threshold: blue (benign), pale yellow
# (uncertain), orange-red (malignant). ColorBrewer RdYlBu's colours, without its violet-tinted dark blue and its
# crimson top (eosin's side of red).
HEATMAP_COLORS = ((0.0, "#2166ac"), (0.25, "#67a9cf"), (0.5, "#f7f7a1"), (0.75, "#fdae61"), (1.0, "#d7301f"))
HEATMAP_ALPHA = 0.6
# Outline colours, by target class (benign, malignant, then any other; the last for a class that maps to no
# target): none is blue, yellow or red, so an outline never reads as a probability.
OUTLINE_COLORS = ("#00a651", "#000000", "#01665e", "#8c510a")
THRESHOLD_COLOR = "#000000"


def grey_tissue(rgb: np.ndarray) -> np.ndarray:
    """The thumbnail's luminance, lifted so that the overlay's colours stay readable on dark tissue."""
    lum = (rgb[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)) / 255.0
    return 0.25 + 0.75 * lum


def class_colors(regions: Sequence[Region] | None, label_map: LabelMap | None = None) -> dict[str, str]:
    """One outline colour per annotation class, fixed by the target class it maps to (the labels' first target,
    benign by default, the first colour; the second, malignant, the second; ...; a class that maps to none the
    last), so a class has the same colour on every slide and the colour says what the region is. Without a
    label map the default one applies."""
    label_map = label_map or load_label_map(None)
    out = {}
    for region in sorted(regions or [], key=lambda r: (r.class_name or "").casefold()):
        name = region.class_name or "(no class)"
        if name not in out:
            target = label_map.target_of(region.class_name or "", getattr(region, "class_parts", ()) or ())
            index = label_map.label_names.index(target) if target in label_map.label_names else -1
            out[name] = OUTLINE_COLORS[index] if 0 <= index < len(OUTLINE_COLORS) - 1 else OUTLINE_COLORS[-1]
    return out


def format_probability(p: float) -> str:
    """Two decimals, or four near 0 and 1 where two would round a threshold to 0.00 or 1.00."""
    return f"{p:.2f}" if 0.01 <= p <= 0.99 else f"{p:.4f}"


def heatmap_colormap():
    """The map, as a matplotlib colormap from 0 (benign) to 1 (malignant); the threshold goes to its centre."""
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list("benign_malignant", HEATMAP_COLORS)


def draw_heatmap(path: Path, thumb: np.ndarray, ds: float, grid: np.ndarray, step: float,
                 regions: Sequence[Region] | None, title: str, threshold: float) -> list[str]:
    """Write the figure to ``path``; returns the legend's entries. ``thumb`` is the RGB thumbnail, ``ds`` level-0
    px per thumbnail px, ``grid`` the probability grid (NaN where no tile) whose cell ``[row, col]`` starts at
    level-0 ``(col·step, row·step)``."""
    from matplotlib import patheffects
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    h, w = thumb.shape[:2]
    side_by_side = w <= 1.3 * h
    panel = 7.0
    aspect = h / max(w, 1)
    figsize = (2 * panel + 1.6, panel * aspect + 1.4) if side_by_side else (panel + 1.6, 2 * panel * aspect + 1.8)
    fig = Figure(figsize=figsize, dpi=120)
    axes = fig.subplots(1, 2) if side_by_side else fig.subplots(2, 1)
    slide_ax, heat_ax = axes
    slide_ax.imshow(thumb, interpolation="lanczos" if ds > 1 else "nearest")
    slide_ax.set_title("slide", fontsize=10)
    heat_ax.imshow(grey_tissue(thumb), cmap="gray", vmin=0, vmax=1, interpolation="lanczos" if ds > 1 else "nearest")
    heat_ax.set_title("probability of malignancy (tissue in grey)", fontsize=10)

    t = min(max(float(threshold), 1e-3), 1 - 1e-3)
    norm = TwoSlopeNorm(vmin=0.0, vcenter=t, vmax=1.0)
    cmap = heatmap_colormap()
    image = None
    if grid.size:
        extent = (0, grid.shape[1] * step / ds, grid.shape[0] * step / ds, 0)
        image = heat_ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, alpha=HEATMAP_ALPHA, extent=extent,
                               interpolation="nearest")

    colors = class_colors(regions)
    legend: list[str] = []
    halo = [patheffects.Stroke(linewidth=3.2, foreground="white"), patheffects.Normal()]
    for ax in axes:
        for region in regions or []:
            color = colors[region.class_name or "(no class)"]
            for poly in getattr(region.geometry, "geoms", [region.geometry]):
                x, y = poly.exterior.xy
                ax.plot(np.asarray(x) / ds, np.asarray(y) / ds, color=color, lw=1.6, path_effects=halo)
                for ring in poly.interiors:
                    x, y = ring.xy
                    ax.plot(np.asarray(x) / ds, np.asarray(y) / ds, color=color, lw=1.3, ls=(0, (3, 2)),
                            path_effects=halo)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_axis_off()
    if colors:
        counts = {name: 0 for name in colors}
        for region in regions or []:
            counts[region.class_name or "(no class)"] += 1
        handles = [Line2D([], [], color=c, lw=2, path_effects=halo, label=f"{name} ({counts[name]})")
                   for name, c in sorted(colors.items(), key=lambda item: OUTLINE_COLORS.index(item[1]))]
        if any(getattr(p, "interiors", None) for r in regions or [] for p in getattr(r.geometry, "geoms", [r.geometry])):
            handles.append(Line2D([], [], color="#555555", lw=1.3, ls=(0, (3, 2)), label="hole"))
        legend = [h.get_label() for h in handles]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False,
                   title="annotations (regions)", title_fontsize=8)

    if image is not None:
        cbar = fig.colorbar(image, ax=heat_ax, fraction=0.04, pad=0.02)
        cbar.solids.set_alpha(1.0)
        ticks = [0.0, t / 2, t, (t + 1) / 2, 1.0]
        cbar.set_ticks(ticks)
        cbar.set_ticklabels(["0 benign", format_probability(ticks[1]), f"{format_probability(threshold)} threshold",
                             format_probability(ticks[3]), "1 malignant"])
        cbar.ax.axhline(t, color=THRESHOLD_COLOR, lw=2.5)
        cbar.ax.tick_params(labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.93, top=0.93, bottom=0.09 if colors else 0.02, wspace=0.04, hspace=0.08)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return legend
