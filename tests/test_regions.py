"""Region files: index lists, FLAME_masks.pkl (dedup, upper = forehead + eye_region), overrides."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from talkmesh.data.errors import DataError
from talkmesh.data.regions import Regions, file_md5, load_regions, read_flame_masks, read_index_file, with_overrides


def write_masks(path, lips, forehead, eye):
    with open(path, "wb") as f:
        pickle.dump({"lips": np.array(lips), "forehead": np.array(forehead), "eye_region": np.array(eye),
                     "nose": np.array([0])}, f, protocol=2)


def test_index_list_formats(tmp_path):
    p = tmp_path / "lve.txt"
    p.write_text("5,3,3,\n9 1\n")
    np.testing.assert_array_equal(read_index_file(p, num_vertices=10), [1, 3, 5, 9])
    n = tmp_path / "x.npy"
    np.save(n, np.array([[2, 2], [0, 1]]))
    np.testing.assert_array_equal(read_index_file(n), [0, 1, 2])


def test_flame_masks_dedup_and_upper_union(tmp_path):
    p = tmp_path / "FLAME_masks.pkl"
    write_masks(p, lips=[7, 5, 5, 6], forehead=[1, 2], eye=[2, 3])
    lips, upper = read_flame_masks(p, num_vertices=10)
    np.testing.assert_array_equal(lips, [5, 6, 7])
    np.testing.assert_array_equal(upper, [1, 2, 3])
    regions = load_regions(p)
    assert regions.describe()["lips"] == 3 and file_md5(p) in regions.sources["lips"]


def test_errors_name_the_file(tmp_path):
    p = tmp_path / "lve.txt"
    p.write_text("1, 2, x")
    with pytest.raises(DataError, match="lve.txt"):
        read_index_file(p)
    p.write_text("1, 200")
    with pytest.raises(DataError, match=r"lve.txt.*\[0, 100\)"):
        read_index_file(p, num_vertices=100)
    with pytest.raises(DataError, match="not found"):
        read_index_file(tmp_path / "nope.txt")
    m = tmp_path / "FLAME_masks.pkl"
    with open(m, "wb") as f:
        pickle.dump({"lips": np.arange(3)}, f)
    with pytest.raises(DataError, match="forehead"):
        read_flame_masks(m)
    with pytest.raises(DataError, match="upper-face"):
        load_regions(_txt(tmp_path, "l.txt", "1 2"))


def _txt(d, name, text):
    p = d / name
    p.write_text(text)
    return p


def test_malicious_pickle_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    p = tmp_path / "FLAME_masks.pkl"
    with open(p, "wb") as f:
        pickle.dump({"lips": Evil()}, f)
    with pytest.raises(DataError, match="refusing to unpickle"):
        read_flame_masks(p)


def test_user_overrides(tmp_path):
    default = Regions(lips=np.arange(3), upper=np.arange(3, 6), sources={"lips": "a", "upper": "b"})
    assert with_overrides(default, "", "", 10) is default
    lips = _txt(tmp_path, "my_lips.txt", "8 9")
    r = with_overrides(default, str(lips), "", 10)
    np.testing.assert_array_equal(r.lips, [8, 9])
    np.testing.assert_array_equal(r.upper, default.upper)
    assert "my_lips.txt" in r.sources["lips"] and r.sources["upper"] == "b"
