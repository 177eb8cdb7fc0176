"""Lazy safetensors reads: a row range is read alone and equals the tensor's slice."""

import numpy as np
import pytest
from safetensors.numpy import save_file

from moejax.checkpoints.safetensors_io import SafetensorsFile


@pytest.fixture
def st_file(tmp_path):
    a = np.arange(7 * 5, dtype=np.float32).reshape(7, 5)
    p = str(tmp_path / "model.safetensors")
    save_file({"a": a, "b": np.ones(3, np.float32)}, p)
    f = SafetensorsFile(p)
    yield f, a
    f.close()


@pytest.mark.parametrize("rows", [(0, 7), (2, 5), (6, 7), (3, 3)])
def test_rows_equal_the_slice(st_file, rows):
    f, a = st_file
    np.testing.assert_array_equal(f.read("a", rows), a[rows[0]:rows[1]])


def test_rows_out_of_range_name_the_bad_value(st_file):
    f, _ = st_file
    with pytest.raises(ValueError, match=r"rows \(4, 8\) out of range for 'a'"):
        f.read("a", (4, 8))
