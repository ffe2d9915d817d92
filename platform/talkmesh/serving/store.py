"""The persisted style store: reference clips and the StyleStates adapted from them.

Layout under ``root`` (a local directory; on a multi-node cluster, one every replica
mounts at the same path)::

    <style_id>/reference.npz          audio (S,), motion arrays, template - write-once
    <style_id>/meta.json              method, name, created, frames, seconds, sha256[, adapt_options]
    <style_id>/<model_key>.state.pt   StyleState adapted for one model version
    <style_id>/<model_key>.status.json  {"status": pending|ready|failed, ...}

``style_id`` is a hash of the method, the reference's content and the adapt options the
request chose (``meta.json`` ``adapt_options``, e.g. DEEPTalk's ``source``; none: the hash of
the clip alone), so posting the same clip twice (or the HTTP proxy retrying a request)
names the same style; the reference is kept, so a new champion version re-adapts the
style on demand. Files are written to a temporary name and renamed (atomic on POSIX), so a
crash never leaves a half-written style and nothing stored is overwritten by a failed
write. StyleStates are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from talkmesh.serving.inputs import STYLE_NAME

__all__ = ["StyleNotFound", "StyleStore", "style_id_for"]

_REFERENCE = "reference.npz"
_META = "meta.json"


class StyleNotFound(KeyError):
    """No style with this id in the store."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def style_id_for(method: str, arrays: Mapping[str, np.ndarray], options: Mapping[str, Any] | None = None) -> str:
    """``sty_<24 hex>``: sha256 of the method name, every array's name, dtype, shape and bytes,
    and (when any) the adapt ``options`` as sorted JSON."""
    h = hashlib.sha256(method.encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"\n{name}|{a.dtype.str}|{a.shape}\n".encode())
        h.update(a.tobytes())
    if options:
        h.update(b"\noptions|" + json.dumps(dict(options), sort_keys=True).encode())
    return "sty_" + h.hexdigest()[:24]


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class StyleStore:
    """Styles on disk (see the module docstring). Safe for several processes sharing ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    # ---- references ------------------------------------------------------------------
    def _dir(self, style_id: str) -> Path:
        if not STYLE_NAME.fullmatch(style_id):
            raise StyleNotFound(f"style {style_id!r} not found")
        return self.root / style_id

    def exists(self, style_id: str) -> bool:
        try:
            return (self._dir(style_id) / _META).is_file()
        except StyleNotFound:
            return False

    def put_reference(
        self,
        method: str,
        reference: Mapping[str, np.ndarray],
        meta: Mapping[str, Any] | None = None,
        adapt_options: Mapping[str, Any] | None = None,
    ) -> tuple[str, bool]:
        """Store a reference clip (write-once) with the JSON-able ``adapt_options`` its
        adaptation uses (kept in ``meta.json``, part of the id). Returns (style_id, created):
        ``created`` is False when the same clip and options are already stored (untouched)."""
        arrays = {k: np.asarray(v) for k, v in reference.items() if v is not None}
        sid = style_id_for(method, arrays, adapt_options)
        final = self._dir(sid)
        if (final / _META).is_file():
            return sid, False
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{sid}."))
        try:
            buf = _npz_bytes(arrays)
            (tmp / _REFERENCE).write_bytes(buf)
            record = {
                "style_id": sid,
                "method": method,
                "created": time.time(),
                "reference_sha256": hashlib.sha256(buf).hexdigest(),
                "arrays": {k: list(v.shape) for k, v in arrays.items()},
                **dict(meta or {}),
                **({"adapt_options": dict(adapt_options)} if adapt_options else {}),
            }
            (tmp / _META).write_text(json.dumps(record, indent=2, sort_keys=True))
            try:
                os.rename(tmp, final)  # atomic; fails if another writer got there first
            except OSError:
                if not (final / _META).is_file():
                    raise
                return sid, False
            return sid, True
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def meta(self, style_id: str) -> dict[str, Any]:
        path = self._dir(style_id) / _META
        if not path.is_file():
            raise StyleNotFound(f"style {style_id!r} not found")
        return json.loads(path.read_text())

    def reference(self, style_id: str) -> dict[str, np.ndarray]:
        path = self._dir(style_id) / _REFERENCE
        if not path.is_file():
            raise StyleNotFound(f"style {style_id!r} not found")
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def list(self) -> list[dict[str, Any]]:
        """Metadata of every stored style, oldest first."""
        out = []
        for d in self.root.iterdir():
            if d.is_dir() and not d.name.startswith(".") and (d / _META).is_file():
                try:
                    out.append(json.loads((d / _META).read_text()))
                except (OSError, ValueError):
                    continue
        return sorted(out, key=lambda m: m.get("created", 0.0))

    def delete(self, style_id: str) -> None:
        d = self._dir(style_id)
        if not (d / _META).is_file():
            raise StyleNotFound(f"style {style_id!r} not found")
        trash = self.root / f".deleted-{style_id}-{os.getpid()}-{time.time_ns()}"
        os.rename(d, trash)  # atomic: readers see the whole style or nothing
        shutil.rmtree(trash, ignore_errors=True)

    # ---- adapted states, per model ---------------------------------------------------
    def status(self, style_id: str, model_key: str, stale_after_s: float | None = None) -> dict[str, Any]:
        """``{"status": "absent"|"pending"|"ready"|"failed", ...}`` for one model: ready once
        the adapted state is stored. An adapter writes its "ready" record (with the summary)
        before the state, so a ready answer always carries the record; until the state lands
        the record reads as pending. A pending record older than ``stale_after_s`` (its
        adapter died) reads as failed."""
        d = self._dir(style_id)
        if not (d / _META).is_file():
            raise StyleNotFound(f"style {style_id!r} not found")
        if (d / f"{model_key}.state.pt").is_file():
            st = self._read_status(d, model_key) or {}
            return {**st, "status": "ready"}
        st = self._read_status(d, model_key)
        if st is None:
            return {"status": "absent"}
        if st.get("status") == "ready":  # the state is still being written
            st = {**st, "status": "pending"}
        if st.get("status") == "pending" and stale_after_s is not None:
            if time.time() - float(st.get("started", 0.0)) > stale_after_s:
                return {**st, "status": "failed", "error": f"adaptation did not finish within {stale_after_s:g} s"}
        return st

    @staticmethod
    def _read_status(d: Path, model_key: str) -> dict[str, Any] | None:
        path = d / f"{model_key}.status.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def set_status(self, style_id: str, model_key: str, status: str, **fields: Any) -> None:
        d = self._dir(style_id)
        record = {"status": status, "model": model_key, "updated": time.time(), **fields}
        _write_atomic(d / f"{model_key}.status.json", json.dumps(record, sort_keys=True).encode())

    def save_state(self, style_id: str, model_key: str, state: dict[str, Any]) -> None:
        import io

        from talkmesh.methods.base import save_style_state

        buf = io.BytesIO()
        save_style_state(state, buf)
        _write_atomic(self._dir(style_id) / f"{model_key}.state.pt", buf.getvalue())

    def load_state(
        self, style_id: str, model_key: str, method: str | None = None, version: int | None = None
    ) -> dict[str, Any]:
        from talkmesh.methods.base import load_style_state

        path = self._dir(style_id) / f"{model_key}.state.pt"
        if not path.is_file():
            raise StyleNotFound(f"style {style_id!r} has no adapted state for model {model_key}")
        return load_style_state(path, method=method, version=version)


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})
    return buf.getvalue()
