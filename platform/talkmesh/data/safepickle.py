"""Restricted unpickling for dataset files that ship as pickles (templates.pkl, FLAME masks,
3D-HDTF's pickled ``.npy`` dicts).

Real corpora store plain containers of numpy arrays in pickles. Only those classes are
reconstructed; anything else (a reduce to ``os.system``, arbitrary objects) is refused with
an error naming the file, so a crafted dataset file cannot run code.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from talkmesh.data.errors import DataError

_SAFE_BUILTINS = frozenset(
    {"dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes", "bytearray",
     "bool", "slice", "range"}
)
# (module, name) -> candidate modules to resolve from (numpy 2 moved numpy.core to numpy._core).
_SAFE_NUMPY: dict[tuple[str, str], tuple[str, ...]] = {
    ("numpy", "ndarray"): ("numpy",),
    ("numpy", "dtype"): ("numpy",),
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "numpy.core.multiarray"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "numpy.core.multiarray"),
    ("numpy.core.multiarray", "scalar"): ("numpy._core.multiarray", "numpy.core.multiarray"),
    ("numpy._core.multiarray", "scalar"): ("numpy._core.multiarray", "numpy.core.multiarray"),
    ("numpy.core.numeric", "_frombuffer"): ("numpy._core.numeric", "numpy.core.numeric"),
    ("numpy._core.numeric", "_frombuffer"): ("numpy._core.numeric", "numpy.core.numeric"),
}
_SAFE_OTHER: dict[tuple[str, str], tuple[str, ...]] = {
    ("collections", "OrderedDict"): ("collections",),
    ("_codecs", "encode"): ("_codecs",),  # bytes pickled by Python 2 / protocol 2
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only reconstructs numpy arrays/scalars/dtypes and builtin containers."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            import builtins

            return getattr(builtins, name)
        sources = _SAFE_NUMPY.get((module, name)) or _SAFE_OTHER.get((module, name))
        if sources is None:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} (only numpy arrays and builtins)")
        for mod in sources:
            try:
                return getattr(importlib.import_module(mod), name)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"global {module}.{name} cannot be resolved")


def load_pickle(path: str | Path) -> Any:
    """A pickle file holding only numpy arrays and builtin containers (refuses anything else)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    try:
        with open(p, "rb") as f:
            return RestrictedUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, OSError) as e:
        raise DataError(f"{p}: refused or unreadable pickle ({e}); only numpy arrays and builtins are loaded") from e


def load_pickle_npy(path: str | Path) -> Any:
    """A ``.npy`` file: numeric arrays as with ``allow_pickle=False``; object arrays (a pickled
    dict, as in the 3D-HDTF layout) through the restricted unpickler, 0-d ones unwrapped with
    ``.item()``. A file without the npy magic is read as a plain (restricted) pickle."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    try:
        with open(p, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                f.seek(0)
                obj = RestrictedUnpickler(f, encoding="latin1").load()
            else:
                f.seek(0)
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    _, _, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    _, _, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f"unsupported .npy format version {version}")
                if not dtype.hasobject:
                    return np.load(p, allow_pickle=False)
                obj = RestrictedUnpickler(f, encoding="latin1").load()
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, OSError) as e:
        raise DataError(f"{p}: refused or unreadable file ({e}); only numpy arrays and builtins are loaded") from e
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject and obj.shape == ():
        obj = obj.item()
    return obj
