"""Stain normalisation: moves tiles towards the reference, never crashes, never returns NaN, round-trips."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from python_task.errors import TaskError
from python_task.transforms.stain import (
    HED_FROM_RGB,
    RGB_FROM_HED,
    STAIN_METHODS,
    MacenkoNormalizer,
    ReinhardNormalizer,
    StainTransform,
    lab_to_rgb,
    make_normalizer,
    normalizer_from_dict,
    od_distance,
    od_to_rgb,
    rgb_to_lab,
    rgb_to_od,
    stain_angle,
)

H_REF = np.array([0.5626, 0.7201, 0.4062])
E_REF = np.array([0.2159, 0.8012, 0.5581])
H_OTHER = np.array([0.68, 0.58, 0.45])  # a bluer, redder-absorbing haematoxylin
E_OTHER = np.array([0.10, 0.86, 0.42])  # a more magenta eosin


def he_tile(rng: np.random.Generator, size: int = 96, h_vec=H_REF, e_vec=E_REF, h_scale: float = 1.0,
            e_scale: float = 1.0, nuclei: int = 14, background: float = 0.15) -> np.ndarray:
    """An H&E-like uint8 tile by Beer-Lambert: eosin stroma with haematoxylin disks and a white lumen."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    e = 0.6 + 0.25 * np.sin(xx / 7.0 + rng.uniform(0, 6)) * np.cos(yy / 9.0 + rng.uniform(0, 6))
    e += rng.normal(0, 0.03, e.shape)
    h = np.full(e.shape, 0.03)
    for _ in range(nuclei):
        cy, cx = rng.uniform(0, size, 2)
        r = rng.uniform(size / 40, size / 16)
        nucleus = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        h = np.where(nucleus, rng.uniform(0.6, 1.2), h)
        e = np.where(nucleus, 0.3 * e, e)
    lumen = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < background * size * size / np.pi
    h, e = np.where(lumen, 0, h) * h_scale, np.where(lumen, 0, np.clip(e, 0, None)) * e_scale
    od = (h[..., None] * (np.asarray(h_vec) / np.linalg.norm(h_vec))
          + e[..., None] * (np.asarray(e_vec) / np.linalg.norm(e_vec)))
    rgb = 256 * np.exp(-od) - 1 + rng.normal(0, 1.0, od.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    rng = np.random.default_rng(1)
    return np.stack([he_tile(rng) for _ in range(4)])


@pytest.fixture(scope="module")
def other_stain() -> np.ndarray:
    """The same kind of tissue, stained differently: other stain vectors, darker H, paler E."""
    rng = np.random.default_rng(2)
    return np.stack([he_tile(rng, h_vec=H_OTHER, e_vec=E_OTHER, h_scale=1.6, e_scale=0.6) for _ in range(6)])


def awkward_tiles() -> dict[str, np.ndarray]:
    """Tiles other tools crash on: background only, nearly empty, tiny, flat, saturated."""
    rng = np.random.default_rng(3)
    white = np.full((96, 96, 3), 255, np.uint8)
    glass = np.clip(rng.normal(242, 3, (96, 96, 3)), 0, 255).astype(np.uint8)  # background with noise and tint
    speck = white.copy()
    speck[40:45, 40:45] = (120, 60, 140)  # 25 tissue pixels of 9216 (0.3 %)
    flat_pink = np.tile(np.array([230, 140, 190], np.uint8), (96, 96, 1))
    black = np.zeros((96, 96, 3), np.uint8)
    return {"white": white, "glass": glass, "speck": speck, "flat_pink": flat_pink, "black": black}


# --------------------------------------------------------------------------------------------- conversions

def test_optical_density_round_trip_and_matrices():
    values = np.arange(256, dtype=np.uint8)
    od = rgb_to_od(values)
    assert od.dtype == np.float32 and od[255] == 0 and np.all(np.diff(od) < 0)
    np.testing.assert_allclose(od_to_rgb(od), values, atol=1e-3)
    np.testing.assert_allclose(rgb_to_od(values.astype(np.float32)), od, atol=1e-6)
    assert np.all(np.isfinite(od_to_rgb(np.array([-1e9, np.nan, np.inf, 1e9]))))
    # Ruifrok & Johnston as in skimage.color
    np.testing.assert_allclose(RGB_FROM_HED[0], [0.65, 0.70, 0.29])
    np.testing.assert_allclose(RGB_FROM_HED @ HED_FROM_RGB, np.eye(3), atol=1e-12)


def test_lab_conversion_matches_known_values():
    lab = rgb_to_lab(np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0], [0, 128, 0]], np.uint8))
    np.testing.assert_allclose(lab[0], [100, 0, 0], atol=0.05)
    np.testing.assert_allclose(lab[1], [0, 0, 0], atol=0.05)
    np.testing.assert_allclose(lab[2], [53.24, 80.09, 67.20], atol=0.05)  # sRGB red, D65
    np.testing.assert_allclose(lab[3], [46.23, -51.70, 49.90], atol=0.05)
    colours = np.random.default_rng(0).integers(0, 256, (5000, 3)).astype(np.uint8)
    back = lab_to_rgb(rgb_to_lab(colours))
    assert np.abs(back.astype(int) - colours).max() <= 1


# --------------------------------------------------------------------------------------------- normalisation

@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_normalisation_moves_a_differently_stained_tile_towards_the_reference(method, reference, other_stain):
    norm = make_normalizer(method).fit(reference)
    out, passed = norm.transform(other_stain)
    assert passed == 0
    assert out.dtype == np.uint8 and out.shape == other_stain.shape
    before, after = od_distance(other_stain, reference), od_distance(out, reference)
    assert before > 0.15  # the two stainings really differ
    assert after < 0.5 * before, (before, after)
    # the reference itself barely moves
    same, _ = norm.transform(reference)
    assert od_distance(same, reference) < 0.1 * before


def test_macenko_recovers_the_reference_stain_vectors(reference, other_stain):
    norm = MacenkoNormalizer().fit(reference)
    h, e = norm.stain_matrix
    assert np.all(norm.stain_matrix >= 0) and np.allclose(np.linalg.norm(norm.stain_matrix, axis=1), 1)
    # nuclei hold some eosin too, so the haematoxylin estimate is a little pulled towards eosin
    assert np.degrees(np.arccos(h @ H_REF / np.linalg.norm(H_REF))) < 8
    assert np.degrees(np.arccos(e @ E_REF / np.linalg.norm(E_REF))) < 3
    out, _ = norm.transform(other_stain)
    before, after = stain_angle(other_stain, reference), stain_angle(out, reference)
    assert before > 8 and after < 2, (before, after)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_background_tiny_and_degenerate_tiles_pass_through_unchanged(method, reference):
    norm = make_normalizer(method).fit(reference)
    awkward = awkward_tiles()
    batch = np.stack(list(awkward.values()))
    out, passed = norm.transform(batch)
    assert passed == len(batch)
    assert np.array_equal(out, batch)
    # tiny tiles, one tile at a time, and in a batch with normal tissue
    for shape in [(1, 1, 3), (2, 2, 3), (4, 4, 3), (7, 9, 3)]:  # fewer pixels than an estimate needs
        tile = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
        res, n = norm.transform(tile)
        assert res.shape == shape and n == 1 and np.array_equal(res, tile)
    res, n = norm.transform(np.random.default_rng(0).integers(0, 256, (3, 50, 3)).astype(np.uint8))
    assert res.shape == (3, 50, 3) and res.dtype == np.uint8 and n in (0, 1)
    mixed = np.concatenate([batch, reference[:2]])
    out, passed = norm.transform(mixed)
    assert passed == len(batch)
    assert np.array_equal(out[:len(batch)], batch) and not np.array_equal(out[len(batch):], reference[:2])


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_no_exception_and_no_nan_on_hostile_input(method, reference):
    norm = make_normalizer(method).fit(reference)
    rng = np.random.default_rng(4)
    hostile = [rng.integers(0, 256, (64, 64, 3)).astype(np.uint8),  # colour noise
               he_tile(rng, 64, e_scale=0.0),  # haematoxylin only
               he_tile(rng, 64, h_scale=0.0),  # eosin only
               he_tile(rng, 64, h_scale=6.0, e_scale=6.0),  # saturated
               np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[:, None, None], (1, 64, 3))]  # grey ramp
    out, passed = norm.transform(np.stack(hostile))
    assert out.dtype == np.uint8 and out.shape == (5, 64, 64, 3) and 0 <= passed <= 5
    floats = np.stack(hostile).astype(np.float32)
    floats[0, 0, 0] = np.nan
    floats[0, 0, 1] = np.inf
    floats[0, 1, 0] = -7.0
    out_f, _ = norm.transform(floats)
    assert out_f.dtype == np.uint8 and out_f.shape == floats.shape  # non-finite input is cleaned, never NaN out


def test_float_batches_give_the_same_result_as_uint8(reference, other_stain):
    norm = MacenkoNormalizer().fit(reference)
    a, _ = norm.transform(other_stain)
    b, _ = norm.transform(other_stain.astype(np.float32))
    assert np.array_equal(a, b)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_fitting_on_background_is_a_task_error(method):
    awkward = awkward_tiles()
    with pytest.raises(TaskError, match="no tissue in the reference tiles"):
        make_normalizer(method).fit(np.stack([awkward["white"], awkward["glass"], awkward["speck"]]))
    with pytest.raises(TaskError, match="stain reference"):
        make_normalizer(method).fit(np.zeros((10, 10), np.uint8))  # not RGB


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_to_dict_round_trip_gives_identical_output(method, reference, other_stain, tmp_path):
    norm = make_normalizer(method).fit(reference)
    path = tmp_path / "stain.json"
    path.write_text(json.dumps(norm.to_dict()))
    again = normalizer_from_dict(json.loads(path.read_text()))
    assert type(again) is type(norm)
    a, na = norm.transform(other_stain)
    b, nb = again.transform(other_stain)
    assert na == nb and np.array_equal(a, b)
    # train.py stores {"method": ..., **to_dict()}
    assert type(normalizer_from_dict({"method": method, **norm.to_dict()})) is type(norm)


def test_invalid_saved_normalisers_and_names_are_task_errors(reference):
    good = MacenkoNormalizer().fit(reference).to_dict()
    for bad in [{"method": "vahadane"}, {**good, "stain_matrix": [[1, 2, 3]]},
                {**good, "max_concentrations": [float("nan"), 1.0]}, {k: v for k, v in good.items() if k != "alpha"}
                | {"alpha": "x"}, {"method": "reinhard", "mean": [1, 2, 3]}, []]:
        with pytest.raises(TaskError):
            normalizer_from_dict(bad)
    assert normalizer_from_dict({"method": "none"}) is None
    assert make_normalizer("none") is None and STAIN_METHODS == ("none", "macenko", "reinhard")
    assert isinstance(make_normalizer("Macenko"), MacenkoNormalizer)
    assert isinstance(make_normalizer("reinhard"), ReinhardNormalizer)
    with pytest.raises(TaskError, match=r"unknown stain method 'vahadane'; choose from: none, macenko, reinhard"):
        make_normalizer("vahadane")
    with pytest.raises(RuntimeError, match="fit"):
        MacenkoNormalizer().transform(reference)


def test_stain_transform_counts_passthrough_across_threads(reference, other_stain):
    transform = StainTransform(ReinhardNormalizer().fit(reference))
    white = awkward_tiles()["white"]
    batch = np.concatenate([other_stain[:2], white[None]])  # 3 tiles, 1 passes through
    rng = np.random.default_rng(0)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: transform(batch, rng), range(24)))
    assert all(r.dtype == np.float32 and r.shape == batch.shape for r in results)
    assert transform.seen == 72 and transform.passthrough == 24
    assert transform.fraction == pytest.approx(1 / 3)
    assert np.array_equal(results[0][2], white.astype(np.float32))
    transform.reset()
    assert transform.seen == 0 and isinstance(transform._lock, type(threading.Lock()))


def test_stain_transform_in_the_input_pipeline(tmp_path, reference, other_stain):
    from python_task.data.dataset import ShardBatches, build_index
    from python_task.shards.format import ShardWriter

    tiles = np.concatenate([other_stain, awkward_tiles()["white"][None]])
    n = len(tiles)
    attrs = {"slide_id": "S1", "patient_id": "P1", "slide_path": "", "label_names": ["benign", "malignant"],
             "mpp": 0.5, "level": 0, "downsample": 1.0, "params": {}, "diagnosis": ""}
    with ShardWriter(tmp_path / "S1.h5", codec="raw", tile_size=tiles.shape[1], attrs=attrs) as w:
        w.append(tiles, np.stack([np.arange(n), np.zeros(n)], 1), np.arange(n) % 2, np.zeros(n, np.int32),
                 np.ones(n, np.float32), np.ones(n, np.float32))
    transform = StainTransform(MacenkoNormalizer().fit(reference))
    batches = ShardBatches(build_index(tmp_path), batch_size=4, shuffle=False, transform=transform, workers=1)
    xs = np.concatenate([batches[i][0] for i in range(len(batches))])
    assert xs.dtype == np.float32 and np.all(np.isfinite(xs))
    assert transform.seen == n and transform.passthrough == 1
    assert od_distance(xs[:-1].astype(np.uint8), reference) < 0.5 * od_distance(other_stain, reference)
