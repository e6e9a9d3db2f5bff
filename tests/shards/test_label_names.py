"""A shard's ``label_names`` attribute of the wrong type is refused where it is parsed, naming the shard: an
integer was ``error: verify: TypeError: 'int' object is not iterable`` (exit 2), a JSON list of numbers passed
``verify`` and made ``train`` blame the next, good, shard."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from python_task.errors import ShardError
from python_task.shards.format import ShardWriter, read_shard_info


def write_shard(path) -> None:
    attrs = {"slide_id": path.stem, "patient_id": "P1", "slide_path": "/x.tiff", "label_names": ["benign", "malignant"],
             "mpp": 0.5, "level": 0, "downsample": 1.0, "params": {}, "diagnosis": ""}
    tiles = np.full((2, 8, 8, 3), 200, np.uint8)
    with ShardWriter(path, codec="raw", tile_size=8, attrs=attrs) as w:
        w.append(tiles, np.zeros((2, 2)), np.array([0, 1]), np.zeros(2, np.int32), np.ones(2, np.float32),
                 np.ones(2, np.float32))


@pytest.mark.parametrize("value", [5, 2.5, "[0, 1]", '"benign"', '{"0": "benign"}', '["benign", ""]'])
def test_label_names_of_the_wrong_type_name_the_shard(tmp_path, value):
    path = tmp_path / "S1.h5"
    write_shard(path)
    assert read_shard_info(path).label_names == ("benign", "malignant")
    with h5py.File(path, "r+") as f:
        f.attrs["label_names"] = value
    with pytest.raises(ShardError) as err:
        read_shard_info(path)
    assert err.value.path == str(path) and "\n" not in str(err.value), err.value
    assert "label_names" in err.value.cause and "is not a JSON list of class names" in err.value.cause
