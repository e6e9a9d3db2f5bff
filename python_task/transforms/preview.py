"""A figure of original and augmented tiles, so that a pathologist can judge whether augmented tiles still look
like tissue (the command line's ``augment-preview``).

Each row is one tile, picked across classes and shards (seeded): the original, the stain-normalised tile when a
normalisation is asked for, then ``columns`` augmented versions drawn by the implementation training uses
(``augment_on``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from python_task.data.dataset import TileFetcher, build_index
from python_task.errors import ConfigError
from python_task.fileio import atomic_path
from python_task.runtime import accelerator_present
from python_task.transforms.augment_cv import PipelineAugmenter
from python_task.transforms.augment_layers import build_augmenter
from python_task.transforms.augmentations import AugmentOptions, parse_augment, resolve_engine
from python_task.transforms.stain import make_normalizer, reference_positions


def pick_tiles(index, n: int, seed: int) -> np.ndarray:
    """``n`` index positions spread over classes (round robin) and, within a class, over shards (round robin),
    each a seeded random tile of its shard."""
    rng = np.random.default_rng(seed)
    by_class: list[list[np.ndarray]] = []
    for label in np.unique(index.labels):
        in_class = np.flatnonzero(index.labels == label)
        shards = [rng.permutation(in_class[index.shard[in_class] == s]) for s in np.unique(index.shard[in_class])]
        by_class.append([shards[k] for k in rng.permutation(len(shards))])
    picked: list[int] = []
    taken = [[0] * len(shards) for shards in by_class]
    turn = [0] * len(by_class)
    while len(picked) < min(n, len(index.labels)):
        progressed = False
        for c, shards in enumerate(by_class):
            if len(picked) >= n:
                break
            for _ in range(len(shards)):  # next shard of this class that still has tiles
                s = turn[c] % len(shards)
                turn[c] += 1
                if taken[c][s] < len(shards[s]):
                    picked.append(int(shards[s][taken[c][s]]))
                    taken[c][s] += 1
                    progressed = True
                    break
        if not progressed:
            break
    return np.asarray(picked, dtype=np.int64)


def render_preview(shards_dir: str | os.PathLike[str], out_png: str | os.PathLike[str], *,
                   augment: str = "flip,rot90,elastic,hed", stain: str = "none", tiles: int = 6, columns: int = 4,
                   seed: int = 0, options: AugmentOptions | None = None, engine: str = "auto") -> Path:
    """Draw ``tiles`` rows (original [, normalised], ``columns`` augmented versions) to ``out_png`` (atomically).

    ``engine``: the implementation that draws the augmentations, as train's ``augment_on`` (``auto`` resolves
    as it does in training)."""
    from matplotlib.figure import Figure  # only for the figure: keeps matplotlib out of every other import

    if tiles < 1:
        raise ConfigError("tiles", f"must be at least 1, got {tiles}")
    if columns < 0:
        raise ConfigError("columns", f"must be 0 or more, got {columns}")
    names = parse_augment(augment)
    normalizer = make_normalizer(stain)
    engine = resolve_engine(engine, accelerator_present())
    if not columns or not names:
        augmenter = None
    elif engine == "pipeline":
        cpu = PipelineAugmenter(names, options)
        rng = np.random.default_rng([seed, 11])

        def augmenter(x, training=True):
            return cpu(x, rng)
    else:
        augmenter = build_augmenter(names, seed=seed, options=options)
    if augmenter is None and normalizer is None:
        raise ConfigError("augment", "nothing to preview: no augmentation (and no stain normalisation) selected")

    index = build_index(shards_dir)
    positions = pick_tiles(index, tiles, seed)
    shown = TileFetcher(index).fetch(positions)
    panels: list[tuple[str, np.ndarray]] = [("original", shown)]
    passed = 0
    if normalizer is not None:
        ref = TileFetcher(index).fetch(reference_positions(len(index), seed))
        normalizer.fit(ref)
        shown, passed = normalizer.transform(shown)
        panels.append((f"{stain} normalised", shown))
    if augmenter is not None:
        x = shown.astype(np.float32)
        for k in range(columns):
            out = np.asarray(augmenter(x, training=True))
            panels.append((f"augmented {k + 1}", np.clip(np.rint(out), 0, 255).astype(np.uint8)))

    rows, cols = len(positions), len(panels)
    size = 2.0
    fig = Figure(figsize=(cols * size + 0.9, rows * size + 0.8), dpi=max(72, min(200, index.tile_size / size)))
    title = f"augment: {', '.join(names) if names else 'none'} ({engine})   stain: {stain}   seed: {seed}"
    if passed:
        title += f"   ({passed} tile(s) passed through normalisation unchanged)"
    fig.suptitle(title, fontsize=10)
    axes = fig.subplots(rows, cols, squeeze=False)
    labels = index.label_names
    for r, pos in enumerate(positions):
        for c, (name, batch) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(batch[r], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                label = labels[index.labels[pos]] if index.labels[pos] < len(labels) else str(index.labels[pos])
                ax.set_ylabel(f"{label}\n{index.slide_ids[pos]}", fontsize=8)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.01, top=1.0 - 0.7 / (rows * size + 0.8), wspace=0.04,
                        hspace=0.06)
    out = Path(out_png)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return out
