"""The binary frames message of ``/v1/stream`` (numpy only: the service and the client share it).

One message carries consecutive motion frames of every output::

    uint32 little-endian  n = length of the JSON header in bytes
    n bytes               {"type": "frames", "start": k, "count": c,
                           "outputs": [{"name": "vertices", "shape": [c, V, 3], "dtype": "<f4"}, ...]}
    the arrays' bytes     C order, little-endian float32, in the order of "outputs"
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["pack_frames", "unpack_frames"]

_DTYPE = "<f4"
_MAX_HEADER = 64 * 1024


def pack_frames(start: int, outputs: Mapping[str, np.ndarray]) -> bytes:
    """Frames ``start`` .. ``start + c - 1`` of each output (c, ...) as one binary message."""
    arrays = {k: np.ascontiguousarray(v, dtype=_DTYPE) for k, v in outputs.items()}
    counts = {int(v.shape[0]) for v in arrays.values()}
    if len(counts) != 1:
        raise ValueError(f"outputs hold different frame counts: { {k: v.shape for k, v in arrays.items()} }")
    meta = [{"name": k, "shape": list(v.shape), "dtype": _DTYPE} for k, v in arrays.items()]
    header = json.dumps({"type": "frames", "start": int(start), "count": counts.pop(), "outputs": meta}).encode()
    return struct.pack("<I", len(header)) + header + b"".join(v.tobytes() for v in arrays.values())


def unpack_frames(data: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(header, {output: (c, ...) float32}) of a message made by :func:`pack_frames`; a
    malformed one raises ValueError."""
    if len(data) < 4:
        raise ValueError("frames message shorter than its header length")
    (n,) = struct.unpack_from("<I", data)
    if n > _MAX_HEADER or 4 + n > len(data):
        raise ValueError(f"frames message: header length {n} does not fit the message")
    header = json.loads(data[4 : 4 + n])
    offset, outputs = 4 + n, {}
    for spec in header["outputs"]:
        shape = tuple(int(d) for d in spec["shape"])
        size = int(np.prod(shape)) * 4
        if spec.get("dtype") != _DTYPE or offset + size > len(data):
            raise ValueError(f"frames message: output {spec.get('name')!r} does not fit the message")
        outputs[spec["name"]] = np.frombuffer(data, _DTYPE, int(np.prod(shape)), offset).reshape(shape)
        offset += size
    if offset != len(data):
        raise ValueError(f"frames message: {len(data) - offset} bytes after the last output")
    return header, outputs
