"""The files a stain normaliser comes from: a run's saved ``stain.json`` (read back by a resumed train and by
predict) and the user's ``--stain-reference``. Every failure is one line naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from python_task.errors import TaskError
from python_task.training.config import TrainConfig
from python_task.training.inputs import STAIN_FILE, load_or_fit_normalizer, reference_tiles
from python_task.transforms.stain import MacenkoNormalizer, read_normalizer
from tests.transforms.test_stain import he_tile


@pytest.fixture(scope="module")
def saved_text() -> str:
    """A run's stain.json as train writes it."""
    rng = np.random.default_rng(1)
    norm = MacenkoNormalizer().fit(np.stack([he_tile(rng) for _ in range(2)]))
    return json.dumps({"method": "macenko", **norm.to_dict()}, indent=2)


def config(out: Path, stain: str = "macenko", **kw) -> TrainConfig:
    return TrainConfig(shards=out / "shards", splits=out / "s.json", fold=0, arch="simple_cnn", out=out,
                       stain=stain, **kw)


def assert_names(err: pytest.ExceptionInfo, path: Path) -> None:
    assert err.value.path == str(path) and "\n" not in str(err.value), str(err.value)


def test_a_saved_normaliser_reads_back(saved_text, tmp_path):
    path = tmp_path / STAIN_FILE
    path.write_text(saved_text)
    assert isinstance(read_normalizer(path), MacenkoNormalizer)
    path.write_text(json.dumps({"method": "none"}))
    assert read_normalizer(path) is None


@pytest.mark.parametrize("damage", ["truncated", "empty", "not_utf8", "a_list", "unknown_method", "bad_field"])
def test_a_damaged_stain_json_is_named(saved_text, tmp_path, damage):
    path = tmp_path / STAIN_FILE
    good = json.loads(saved_text)
    contents = {"truncated": saved_text[: len(saved_text) // 2].encode(), "empty": b"",
                "not_utf8": b"\xff\xfe{", "a_list": b"[1, 2]",
                "unknown_method": json.dumps({**good, "method": "vahadane"}).encode(),
                "bad_field": json.dumps({**good, "stain_matrix": [[1, 2, 3]]}).encode()}
    path.write_bytes(contents[damage])
    with pytest.raises(TaskError) as err:
        read_normalizer(path)
    assert_names(err, path)


def test_a_resumed_train_names_its_damaged_stain_json(saved_text, tmp_path):
    """Before: ``error: train: JSONDecodeError: Unterminated string ...`` (exit 2), naming no file."""
    path = tmp_path / STAIN_FILE
    path.write_text(saved_text[:40])
    with pytest.raises(TaskError, match="not valid JSON") as err:
        load_or_fit_normalizer(config(tmp_path), train_index=None)
    assert_names(err, path)
    with pytest.raises(TaskError) as err:
        read_normalizer(tmp_path / "elsewhere" / STAIN_FILE)
    assert_names(err, tmp_path / "elsewhere" / STAIN_FILE)


def test_an_empty_or_cut_stain_reference_is_named(tmp_path):
    """An empty .npy raised EOFError (exit 2); a truncated one or a truncated image is named too."""
    tiles = np.stack([he_tile(np.random.default_rng(3), size=32) for _ in range(2)])
    np.save(tmp_path / "ref.npy", tiles)
    whole = (tmp_path / "ref.npy").read_bytes()
    cases = {"empty.npy": b"", "cut.npy": whole[: len(whole) // 2], "cut.png": b"\x89PNG\r\n\x1a\n\0\0"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(TaskError, match="cannot read the stain reference") as err:
            reference_tiles(config(tmp_path, stain_reference=tmp_path / name), train_index=None)
        assert_names(err, tmp_path / name)


def test_a_stain_reference_without_tissue_is_named(tmp_path):
    white = tmp_path / "white.npy"
    np.save(white, np.full((2, 32, 32, 3), 255, np.uint8))
    for stain in ("macenko", "reinhard"):
        cfg = config(tmp_path / stain, stain, stain_reference=white)
        with pytest.raises(TaskError, match="reference tiles") as err:
            load_or_fit_normalizer(cfg, train_index=None)
        assert_names(err, white)
