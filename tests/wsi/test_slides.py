"""Slide reading: the fast TIFF reader must agree with OpenSlide, geometry, resampling and error paths."""

from __future__ import annotations

import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from python_task.errors import TaskError
from python_task.wsi.slides import (
    NO_MPP_CAUSE,
    TileReader,
    level_for_mpp,
    open_slide,
    read_downsampled,
    thumbnail,
)
from tests.conftest import cli_line

READERS = ("tiff", "openslide")
CMU_SIZE = (2220, 2967)


# ------------------------------------------------------------------------------------------------ helpers


def textured_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth colourful image with fine noise (so JPEG and resampling differences show), white top-left."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(40, 230, size=(height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR), dtype=np.int16)
    noise = rng.integers(-12, 13, size=(height, width, 3), dtype=np.int16)
    image = np.clip(smooth + noise, 0, 255).astype(np.uint8)
    image[: height // 4, : width // 4] = 255
    return image


def write_pyramid(path: Path, image: np.ndarray, *, levels: int = 3, mpp: float | None = 0.5, tile: int = 256,
                  compression: str = "jpeg") -> Path:
    """A generic pyramidal tiled TIFF, one page per level (OpenSlide ignores SubIFD pyramids)."""
    kwargs: dict = {"tile": (tile, tile), "photometric": "rgb", "compression": compression}
    if compression == "jpeg":
        kwargs["compressionargs"] = {"level": 90}
    with tifffile.TiffWriter(path) as tw:
        for level in range(levels):
            factor = 2 ** level
            extra = {}
            if mpp is not None:
                px_per_cm = 1e4 / (mpp * factor)
                extra = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
            tw.write(image[::factor, ::factor], subfiletype=1 if level else 0, **kwargs, **extra)
    return path


def assert_close(a: np.ndarray, b: np.ndarray, max_diff: int = 2, mean_diff: float = 0.5) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= max_diff and diff.mean() < mean_diff, (diff.max(), diff.mean())


def assert_one_line_naming(err: pytest.ExceptionInfo[TaskError], path: Path) -> str:
    message = str(err.value)
    assert path.name in message
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    # Not a multiple of the tile size (partial edge tiles), but divisible by 4 so every level's downsample is an
    # exact power of two: with a fractional downsample OpenSlide interpolates a level>0 read between pixels while
    # the fast reader snaps to whole level pixels, and they differ by up to a pixel's worth of texture.
    image = textured_image(1540, 1100)
    path = write_pyramid(tmp_path_factory.mktemp("pyr") / "pyramid.tiff", image)
    return path, image


@pytest.fixture(scope="module")
def cmu_pixels(cmu_slide: Path) -> np.ndarray:
    """Level 0 of the CMU slide decoded by tifffile alone: an independent ground truth for tile assembly."""
    return tifffile.imread(cmu_slide, key=0)


# ------------------------------------------------------------------------------------------------ CMU (SVS)


def test_auto_picks_fast_reader_for_svs(cmu_slide: Path) -> None:
    with open_slide(cmu_slide) as slide:
        assert slide.reader_name == "tiff"


@pytest.mark.parametrize("reader", READERS)
def test_cmu_metadata(cmu_slide: Path, reader: str) -> None:
    with open_slide(cmu_slide, reader=reader) as slide:
        assert slide.reader_name == reader
        assert slide.dimensions == CMU_SIZE
        assert slide.level_dimensions == (CMU_SIZE,)
        assert slide.level_downsamples == (1.0,)
        assert slide.mpp == pytest.approx(0.499)
        assert slide.mpp_source == "metadata"


CMU_REGIONS = [
    (0, 0, 240, 240),          # exactly one source tile
    (17, 233, 300, 211),       # unaligned, crosses 4 source tiles
    (1000, 1000, 256, 256),
    (470, 10, 700, 50),        # wide and flat
    (2100, 2800, 300, 300),    # crosses the right and bottom edges
    (-50, -20, 120, 100),      # crosses the left and top edges
]


@pytest.mark.parametrize("region", CMU_REGIONS)
def test_cmu_readers_agree(cmu_slide: Path, cmu_pixels: np.ndarray, region: tuple[int, int, int, int]) -> None:
    x, y, w, h = region
    with open_slide(cmu_slide, reader="tiff") as fast, open_slide(cmu_slide, reader="openslide") as slow:
        a = fast.read_region(x, y, 0, w, h)
        b = slow.read_region(x, y, 0, w, h)
    assert a.shape == (h, w, 3)
    assert_close(a, b)
    # Ground truth from tifffile's own decode, white outside the slide.
    expected = np.full((h, w, 3), 255, np.uint8)
    xa, ya = max(x, 0), max(y, 0)
    xb, yb = min(x + w, CMU_SIZE[0]), min(y + h, CMU_SIZE[1])
    expected[ya - y:yb - y, xa - x:xb - x] = cmu_pixels[ya:yb, xa:xb]
    np.testing.assert_array_equal(a, expected)


@pytest.mark.parametrize("reader", READERS)
def test_outside_is_white(cmu_slide: Path, reader: str) -> None:
    with open_slide(cmu_slide, reader=reader) as slide:
        edge = slide.read_region(2100, 2800, 0, 300, 300)
        assert (edge[:, 120:] == 255).all() and (edge[167:] == 255).all()
        assert (edge[:167, :120] < 250).any()          # the inside part is real pixels, not white fill
        assert (slide.read_region(5000, 5000, 0, 64, 32) == 255).all()
        assert slide.read_region(0, 0, 0, 10, 10).shape == (10, 10, 3)


def test_level_for_mpp_cmu(cmu_slide: Path, caplog: pytest.LogCaptureFixture) -> None:
    with open_slide(cmu_slide) as slide:
        assert level_for_mpp(slide, 0.5) == (0, 1.0)          # 0.499 vs 0.5: within tolerance, no resampling
        level, factor = level_for_mpp(slide, 1.0)
        assert level == 0 and factor == pytest.approx(1.0 / 0.499)
        assert level_for_mpp(slide, 0.5, tolerance=0.0)[1] == pytest.approx(0.5 / 0.499)
        with caplog.at_level(logging.WARNING, logger="python_task.wsi.slides"):
            level, factor = level_for_mpp(slide, 0.25)
        assert (level, round(factor, 3)) == (0, round(0.25 / 0.499, 3))
        assert "upsampled" in caplog.text
        with pytest.raises(TaskError):
            level_for_mpp(slide, 0.0)


def test_tile_reader_at_native_resolution_is_a_plain_read(cmu_slide: Path) -> None:
    with open_slide(cmu_slide) as slide:
        reader = TileReader(slide, 0.5, 256)
        assert (reader.level, reader.factor, reader.downsample) == (0, 1.0, 1.0)
        assert reader.mpp == pytest.approx(0.499) and reader.tile_extent0 == 256
        np.testing.assert_array_equal(reader.read(123, 456), slide.read_region(123, 456, 0, 256, 256))


@pytest.mark.parametrize("reader_name", READERS)
def test_tile_reader_downsamples_by_area(cmu_slide: Path, cmu_pixels: np.ndarray, reader_name: str) -> None:
    with open_slide(cmu_slide, reader=reader_name) as slide:
        reader = TileReader(slide, 1.0, 256)
        assert reader.level == 0
        assert reader.factor == pytest.approx(2.004, abs=1e-3)
        assert reader.mpp == pytest.approx(1.0)
        assert reader.tile_extent0 == pytest.approx(256 * 2.004, abs=0.3)
        x0, y0 = 800, 1200
        tile = reader.read(x0, y0)
        assert tile.shape == (256, 256, 3) and tile.dtype == np.uint8
        np.testing.assert_array_equal(tile, reader.read(x0, y0))      # deterministic
    block = cmu_pixels[y0:y0 + 512, x0:x0 + 512].astype(np.float64)
    halved = block.reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))
    diff = np.abs(tile.astype(np.float64) - halved)
    # 2.004 vs 2: the grids drift by < 1 px across the tile; the top-left quarter matches closely.
    assert diff[:64, :64].mean() < 2.5
    def blocks(a: np.ndarray) -> np.ndarray:
        return a.reshape(16, 16, 16, 16, 3).mean(axis=(1, 3))

    coarse = np.abs(blocks(tile) - blocks(halved))
    assert coarse.mean() < 2.5                                       # and everywhere at low frequency
    # and it is an area average, not a point sample: far smoother than every-other-pixel sampling
    point = cmu_pixels[y0:y0 + 512:2, x0:x0 + 512:2].astype(np.float64)
    assert diff[:64, :64].mean() < np.abs(point - halved)[:64, :64].mean()


def test_tile_readers_agree_when_resampling(cmu_slide: Path) -> None:
    with open_slide(cmu_slide, reader="tiff") as fast, open_slide(cmu_slide, reader="openslide") as slow:
        for target in (0.8, 1.0, 0.3):
            a = TileReader(fast, target, 128).read(301, 777)
            b = TileReader(slow, target, 128).read(301, 777)
            assert_close(a, b)


def test_pickled_slide_reads_the_same(cmu_slide: Path) -> None:
    with open_slide(cmu_slide) as slide:
        before = slide.read_region(300, 300, 0, 100, 100)
        clone = pickle.loads(pickle.dumps(slide))
    with clone:
        assert clone.reader_name == "tiff"
        np.testing.assert_array_equal(clone.read_region(300, 300, 0, 100, 100), before)


def test_thumbnail_and_blocked_downsampling(cmu_slide: Path) -> None:
    with open_slide(cmu_slide) as slide:
        thumb, ds = thumbnail(slide, 512)
        assert max(thumb.shape[:2]) == 512 and thumb.shape[2] == 3
        assert ds == pytest.approx(2967 / 512)
        # Reading in small blocks gives nearly the same pixels as one big block: no visible seams. (Not bit-exact:
        # PIL takes the resize box as float32, so a source pixel whose centre sits within ~1e-4 px of an output
        # pixel's edge may fall on either side of it.)
        small, ds_small = read_downsampled(slide, 3.71234567, block=150)
        big, ds_big = read_downsampled(slide, 3.71234567, block=100_000)
        assert ds_small == ds_big == pytest.approx(3.71234567)
        assert small.shape == big.shape == (int(np.ceil(2967 / 3.71234567)), int(np.ceil(2220 / 3.71234567)), 3)
        diff = np.abs(small.astype(np.int16) - big)
        assert diff.mean() < 0.1 and (diff > 2).mean() < 0.005
        # and it is an area average of the right place: compare with an exact 4x block mean
        quarter, ds4 = read_downsampled(slide, 4.0, block=333)
        assert ds4 == 4.0
        level0 = slide.read_region(0, 0, 0, 2220, 2964).astype(np.float64)
        exact = level0.reshape(741, 4, 555, 4, 3).mean(axis=(1, 3))
        assert np.abs(quarter[:741] - exact).max() <= 1


# ----------------------------------------------------------------------------------------- generic pyramid TIFF


def test_generic_tiff_metadata(pyramid: tuple[Path, np.ndarray]) -> None:
    path, image = pyramid
    with open_slide(path) as slide:
        assert slide.reader_name == "tiff"
        assert slide.vendor == "generic-tiff"
        assert slide.mpp == pytest.approx(0.5)
        assert slide.level_dimensions == ((1540, 1100), (770, 550), (385, 275))
        assert level_for_mpp(slide, 0.5) == (0, 1.0)
        assert level_for_mpp(slide, 1.0) == (1, 1.0)
        assert level_for_mpp(slide, 2.0) == (2, 1.0)
        level, factor = level_for_mpp(slide, 1.5)
        assert level == 1 and factor == pytest.approx(1.5 / (0.5 * slide.level_downsamples[1]))


@pytest.mark.parametrize("level", [0, 1, 2])
def test_generic_tiff_readers_agree(pyramid: tuple[Path, np.ndarray], level: int) -> None:
    path, _ = pyramid
    with open_slide(path, reader="tiff") as fast, open_slide(path, reader="openslide") as slow:
        assert fast.level_dimensions == slow.level_dimensions
        assert fast.level_downsamples == slow.level_downsamples
        w, h = fast.level_dimensions[level]
        for x, y, rw, rh in [(0, 0, 256, 256), (37, 91, 300, 170), (w - 100, h - 60, 256, 256), (w // 2, 5, 64, 64)]:
            a = fast.read_level(level, x, y, rw, rh)
            b = slow.read_level(level, x, y, rw, rh)
            assert_close(a, b)
            # read_region with level-0 coordinates lands on the same pixels
            ds = fast.level_downsamples[level]
            np.testing.assert_array_equal(fast.read_region(round(x * ds), round(y * ds), level, rw, rh), a)
        edge = fast.read_level(level, w - 100, h - 60, 256, 256)
        assert (edge[:, 100:] == 255).all() and (edge[60:] == 255).all()


def test_generic_tiff_tiles_match_source(pyramid: tuple[Path, np.ndarray]) -> None:
    path, image = pyramid
    with open_slide(path) as slide:
        reader = TileReader(slide, 1.0, 128)
        assert (reader.level, reader.factor, reader.downsample) == (1, 1.0, 2.0)
        tile = reader.read(600, 400)
    # JPEG at quality 90 of a noisy image: close to the source, not bit-exact
    source = image[::2, ::2][200:328, 300:428]
    assert np.abs(tile.astype(np.int16) - source).mean() < 6


def test_sparse_tiles_read_white(tmp_path: Path, pyramid: tuple[Path, np.ndarray]) -> None:
    path = tmp_path / "sparse.tiff"
    shutil.copy(pyramid[0], path)
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tag = tif.pages[0].tags["TileByteCounts"]
        counts = list(tag.value)
        counts[1] = 0                                  # tile (0, 1): x 256..511, y 0..255
        tag.overwrite(counts)
    with open_slide(path, reader="tiff") as fast, open_slide(path, reader="openslide") as slow:
        a = fast.read_region(200, 0, 0, 400, 300)
        assert (a[:256, 56:312] == 255).all()
        assert (a[:, :56] < 255).any()
        assert_close(a, slow.read_region(200, 0, 0, 400, 300))


def test_lzw_tiff_falls_back_to_openslide(tmp_path: Path) -> None:
    path = write_pyramid(tmp_path / "lzw.tiff", textured_image(600, 500), levels=2, compression="lzw")
    with open_slide(path) as slide:
        assert slide.reader_name == "openslide"
        assert slide.read_region(0, 0, 1, 50, 50).shape == (50, 50, 3)
    with pytest.raises(TaskError) as err:
        open_slide(path, reader="tiff")
    assert "not JPEG" in assert_one_line_naming(err, path)


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("reader", ("auto", *READERS))
def test_broken_svs(shared_data: Path, reader: str) -> None:
    path = shared_data / "broken.svs"
    with pytest.raises(TaskError) as err:
        open_slide(path, reader=reader)
    assert "OpenSlideUnsupportedFormatError" in assert_one_line_naming(err, path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.svs"
    with pytest.raises(TaskError) as err:
        open_slide(path)
    assert "not found" in assert_one_line_naming(err, path)


def test_bad_options(cmu_slide: Path) -> None:
    with pytest.raises(TaskError):
        open_slide(cmu_slide, reader="pillow")
    with pytest.raises(TaskError):
        open_slide(cmu_slide, mpp=-1.0)


@pytest.mark.parametrize("reader", ("auto", *READERS))
def test_truncated_svs(cmu_slide: Path, tmp_path: Path, reader: str) -> None:
    path = tmp_path / "half.svs"
    data = cmu_slide.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TaskError) as err:
        open_slide(path, reader=reader)
    assert "trunc" in assert_one_line_naming(err, path)


@pytest.mark.parametrize("reader", READERS)
def test_corrupt_tile_fails_at_read(cmu_slide: Path, tmp_path: Path, reader: str) -> None:
    """Garbage inside one JPEG tile (file size intact): a TaskError when that tile is read, not black pixels."""
    path = tmp_path / "corrupt.svs"
    data = bytearray(cmu_slide.read_bytes())
    with tifffile.TiffFile(cmu_slide) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[100], page.databytecounts[100]   # tile column 0, row 10
    data[offset + 600: offset + count - 600] = b"\xff" * (count - 1200)
    path.write_bytes(bytes(data))
    with open_slide(path, reader=reader) as slide:
        assert slide.read_region(0, 0, 0, 240, 240).mean() > 100          # intact tiles still read
        with pytest.raises(TaskError) as err:
            slide.read_region(0, 2400, 0, 240, 240)
    assert_one_line_naming(err, path)


def test_truncation_after_open_fails_at_read(tmp_path: Path) -> None:
    """The fast reader checks every pread: a file cut short under it gives a TaskError, not a silent white tile."""
    path = write_pyramid(tmp_path / "shrinking.tiff", textured_image(1024, 768), levels=1)
    with open_slide(path, reader="tiff") as slide:
        slide.read_region(0, 0, 0, 16, 16)
        with tifffile.TiffFile(path) as tif:
            last = int(tif.pages[0].dataoffsets[-1])
        with open(path, "r+b") as fh:
            fh.truncate(last + 10)
        with pytest.raises(TaskError) as err:
            slide.read_region(1000, 760, 0, 16, 8)
    assert "truncated" in assert_one_line_naming(err, path)


def test_missing_mpp(tmp_path: Path) -> None:
    path = write_pyramid(tmp_path / "nores.tiff", textured_image(700, 600), levels=2, mpp=None)
    with pytest.raises(TaskError) as err:
        open_slide(path)
    message = assert_one_line_naming(err, path)
    assert NO_MPP_CAUSE in message and "`slide_mpp`" in message  # the setting, named by its field
    assert "give it with --slide-mpp" in cli_line(err.value)  # the command line names it by its flag
    with open_slide(path, mpp=0.5) as slide:
        assert slide.mpp == 0.5 and slide.mpp_source == "user"
        assert slide.reader_name == "tiff"
        assert level_for_mpp(slide, 1.0) == (1, 1.0)


def test_user_mpp_overrides_metadata(cmu_slide: Path, cmu_pixels: np.ndarray) -> None:
    with open_slide(cmu_slide, mpp=0.25) as slide:
        assert slide.mpp == 0.25
        reader = TileReader(slide, 0.5, 64)
        assert reader.factor == 2.0 and reader.tile_extent0 == 128.0
        tile = reader.read(301, 97)
    # an exact integer factor on whole pixels is an exact 2x2 block mean
    exact = cmu_pixels[97:225, 301:429].astype(np.float64).reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
    assert np.abs(tile - exact).max() <= 0.5


def test_read_into_preallocated_buffer(cmu_slide: Path) -> None:
    with open_slide(cmu_slide) as slide:
        batch = np.zeros((2, 64, 64, 3), np.uint8)
        reader = TileReader(slide, 0.5, 64)
        assert np.shares_memory(reader.read(100, 100, out=batch[1]), batch)
        np.testing.assert_array_equal(batch[1], slide.read_region(100, 100, 0, 64, 64))
        resampling = TileReader(slide, 1.0, 64)
        resampling.read(100, 100, out=batch[0])
        np.testing.assert_array_equal(batch[0], resampling.read(100, 100))
        with pytest.raises(ValueError):
            slide.read_region(0, 0, 0, 64, 64, out=np.zeros((64, 64, 4), np.uint8))
