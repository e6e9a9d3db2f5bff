"""``ExtractParams``: every parameter that shapes a shard, with its default and its check.

Plain data without the readers, so the command line reads the defaults from here to show ``--help``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from python_task.errors import ConfigError
from python_task.wsi.slides import READERS
from python_task.wsi.tissue import TISSUE_MPP

CODECS = ("jpeg", "raw")  # the first is the default
MIN_TILE_SIZE = 16
PER_SLIDE = ("slide_mpp", "offset", "ignore_unknown")  # parameters that may differ between the slides of a folder


@dataclass(frozen=True)
class ExtractParams:
    """Every parameter that shapes a shard; stored as the shard's ``params`` attribute."""

    tile_size: int = 256  # px
    mpp: float = 0.5  # µm per pixel of the stored tiles
    min_coverage: float = 0.5  # least fraction of a tile inside its region
    min_tissue: float = 0.5  # least fraction of a tile that is tissue
    stride: int | None = None  # grid step in output px; None = tile_size
    codec: str = CODECS[0]
    quality: int = 90  # JPEG quality
    labels: Path | None = None
    ignore_unknown: bool = False
    slide_mpp: float | None = None
    reader: str = READERS[0]
    offset: tuple[float, float] = (0.0, 0.0)
    tissue_mpp: float = TISSUE_MPP

    def validate(self) -> None:
        if self.tile_size < MIN_TILE_SIZE:
            raise ConfigError("tile_size", f"must be at least {MIN_TILE_SIZE} px, got {self.tile_size}")
        if not self.mpp > 0:
            raise ConfigError("mpp", f"must be positive, got {self.mpp}")
        if self.slide_mpp is not None and not self.slide_mpp > 0:
            raise ConfigError("slide_mpp", f"must be positive, got {self.slide_mpp}")
        for name, value in (("min_coverage", self.min_coverage), ("min_tissue", self.min_tissue)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(name, f"must be between 0 and 1, got {value}")
        if self.stride is not None and self.stride < 1:
            raise ConfigError("stride", f"must be positive, got {self.stride}")
        if not 1 <= self.quality <= 100:
            raise ConfigError("quality", f"must be between 1 and 100, got {self.quality}")

    def shard_params(self) -> dict[str, Any]:
        """The parameters that make two shards comparable (what a resumed run must match)."""
        d = dataclasses.asdict(self)
        d["labels"] = None if self.labels is None else str(self.labels)
        d["offset"] = list(self.offset)
        d.pop("reader")  # both readers give the same pixels
        return d

    def folder_params(self) -> dict[str, Any]:
        """The parameters every shard of one folder must share (recorded in its ``extract.json``): those of
        :meth:`shard_params` that change what a tile is, not the ones that describe one slide (its µm/px when the
        metadata lacks it, its annotation offset, whether unknown classes are skipped)."""
        d = self.shard_params()
        for key in PER_SLIDE:
            d.pop(key)
        return d
