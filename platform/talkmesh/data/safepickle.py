"""Restricted unpickling for dataset files that ship as pickles (templates.pkl, ...).

Real corpora store plain containers of numpy arrays in pickles. Only those classes are
allowed; anything else (a reduce to ``os.system``, arbitrary objects) is refused with an
error naming the file, so a crafted dataset file cannot run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from talkmesh.data.errors import DataError

_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("builtins", "dict"),
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "int"),
    ("builtins", "float"),
    ("builtins", "str"),
    ("builtins", "bytes"),
    ("builtins", "bytearray"),
    ("builtins", "complex"),
    ("builtins", "slice"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
}


class _Restricted(pickle.Unpickler):
    def __init__(self, f: Any, source: str) -> None:
        super().__init__(f, encoding="latin1")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"{self._source}: refusing to unpickle {module}.{name} (only numpy arrays and containers)")


def load_pickle(path: str | Path) -> Any:
    """Unpickle ``path`` allowing only numpy arrays and builtin containers."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    try:
        with open(p, "rb") as f:
            return _Restricted(f, str(p)).load()
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, OSError) as e:
        raise DataError(f"{p}: not a readable pickle ({e})") from e
