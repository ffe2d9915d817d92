"""The persisted style store: reference clips and the StyleStates adapted from them.

**Where.** A store lives at a location URI (:func:`resolve_store_uri`):

* a local directory, the default: an absolute path or ``file:///abs/path``. A *relative*
  path is resolved against a configured base, never against the working directory of the
  process that happens to open it: the ``base`` argument, else ``$TALKMESH_HOME``, else
  ``$XDG_DATA_HOME/talkmesh`` (``~/.local/share/talkmesh``) - :func:`default_base`. On a
  cluster every replica must mount the directory at the same absolute path;
* any fsspec URL (``s3://bucket/styles``, ``gs://...``, ``memory://...`` in tests) when the
  ``fsspec`` package and the filesystem's driver are installed (:class:`FsspecBackend`).

Both sit behind :class:`StyleBackend`, a handful of whole-object operations (read, atomic
write, create-if-absent, list, remove), so another backend (e.g. MLflow's artifact store)
only has to implement those.

**Layout** (keys under the location)::

    <style_id>/reference.npz            audio (S,), motion arrays, template - write-once
    <style_id>/meta.json                method, name, created, tenant, generation, sha256[, adapt_options]
    <style_id>/<model_key>.state.pt     StyleState adapted for one model version
    <style_id>/<model_key>.status.json  {"status": pending|ready|failed, ...}

``meta.json`` is the style's existence marker: it is written last when a style is stored
and removed first when it is deleted, so a reader sees a whole style or none.

**Ids.** ``style_id`` is a hash of the method, the reference's content, the adapt options
(e.g. DEEPTalk's ``source``) and, when given, the tenant, so posting the same clip twice
names the same style, and two tenants posting the same clip get two unrelated styles (no
tenant can learn from an id collision that another holds a clip).

**Tenants.** Every read, list and delete takes ``tenant``: a style that belongs to another
tenant is treated exactly like a missing one (same exception, same message). ``tenant=None``
skips the check (single-tenant development mode and operators' tools).

**Durability.** Local writes go to a temporary file that is fsync'ed, renamed over the
target and then the directory is fsync'ed, so a crash or power cut leaves the old file or
the new one, never a torn one. StyleStates are read with ``torch.load(weights_only=True)``.

**Deletion across replicas.** Each stored style carries a ``generation`` (new on every
store); a replica that caches a loaded style keeps the generation and calls
:meth:`StyleStore.exists_fresh` (one small read) before using it, so a style deleted - or
deleted and stored again - through another replica is never served from a stale cache.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from talkmesh.serving.inputs import STYLE_NAME

__all__ = [
    "FsspecBackend",
    "LocalBackend",
    "StyleBackend",
    "StyleNotFound",
    "StylePage",
    "StyleStore",
    "backend_for",
    "default_base",
    "resolve_store_uri",
    "style_id_for",
]

_REFERENCE = "reference.npz"
_META = "meta.json"
_MODEL_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
MAX_PAGE = 1000
_PUT_ATTEMPTS = 3  # put_reference tries while a racing delete keeps removing the directory


class StyleNotFound(KeyError):
    """No style with this id in the store (for this tenant)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def style_id_for(
    method: str,
    arrays: Mapping[str, np.ndarray],
    options: Mapping[str, Any] | None = None,
    tenant: str | None = None,
) -> str:
    """``sty_<24 hex>``: sha256 of the method name, every array's name, dtype, shape and bytes,
    the adapt ``options`` as sorted JSON (when any) and the ``tenant`` (when any)."""
    h = hashlib.sha256(method.encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"\n{name}|{a.dtype.str}|{a.shape}\n".encode())
        h.update(a.tobytes())
    if options:
        h.update(b"\noptions|" + json.dumps(dict(options), sort_keys=True).encode())
    if tenant is not None:
        h.update(b"\ntenant|" + tenant.encode())
    return "sty_" + h.hexdigest()[:24]


# --------------------------------------------------------------------------------------
# Locations and backends
# --------------------------------------------------------------------------------------


def default_base() -> Path:
    """The base of relative store paths: ``$TALKMESH_HOME``, else ``$XDG_DATA_HOME/talkmesh``,
    else ``~/.local/share/talkmesh`` - the same for every process of one user, unlike a cwd."""
    env = os.environ.get("TALKMESH_HOME")
    if env:
        return Path(env).expanduser().resolve()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return (Path(data).expanduser() / "talkmesh").resolve()


def resolve_store_uri(uri: str | Path, base: str | Path | None = None) -> str:
    """The absolute location of a store: an absolute local path for a path or ``file://``
    URI (a relative path joined to ``base``, default :func:`default_base`), any other
    ``scheme://`` URL unchanged. Call it once where the configuration is read, so every
    replica receives the same absolute location."""
    text = str(uri).strip()
    if not text:
        raise ValueError("style store location: empty; give a directory or a URL such as s3://bucket/styles")
    m = _SCHEME.match(text)
    if m and m.group(1).lower() != "file":
        return text
    if m:  # file:///abs/path
        text = text[len("file://") :]
        if not text.startswith("/"):
            raise ValueError(f"style store location {uri!r}: a file:// URI needs an absolute path (file:///...)")
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = Path(base).expanduser() / path if base is not None else default_base() / path
    return str(path.resolve())


@runtime_checkable
class StyleBackend(Protocol):
    """Whole-object storage under one location; keys are ``/``-separated relative names
    built by :class:`StyleStore` (validated, never client text)."""

    uri: str

    def read(self, key: str) -> bytes:
        """The object's bytes; ``FileNotFoundError`` when absent."""
        ...

    def write(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically and durably, replacing any object."""
        ...

    def create(self, key: str, data: bytes) -> bool:
        """Store ``data`` unless ``key`` exists; False (and nothing written) when it does."""
        ...

    def exists(self, key: str) -> bool:
        """Whether the object exists (not cached: another replica may just have removed it)."""
        ...

    def children(self, prefix: str = "") -> list[str]:
        """Names directly under ``prefix`` (objects and sub-prefixes), hidden (``.``) names excluded."""
        ...

    def remove(self, key: str) -> None:
        """Remove an object, or everything under a prefix; nothing there is fine."""
        ...


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ensure_dir(path: Path) -> None:
    """Create ``path`` (and parents); a new directory's entry is made durable in its parent."""
    if path.is_dir():
        return
    _ensure_dir(path.parent)
    with contextlib.suppress(FileExistsError):
        path.mkdir()
        _fsync_dir(path.parent)


def _write_durable(path: Path, data: bytes, replace: bool) -> bool:
    """Write a temporary file in the target's directory, fsync it, move it into place
    (``replace``: over any file; else only when absent, via an atomic hard link), fsync the
    directory. Returns False when not ``replace`` and the target exists."""
    _ensure_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic create-if-absent
            except FileExistsError:
                return False
            except FileNotFoundError:  # the directory went away (a racing delete): not a link problem
                raise
            except OSError:  # a filesystem without hard links: check, then rename
                if path.exists():
                    return False
                os.replace(tmp, path)
        _fsync_dir(path.parent)
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


class LocalBackend:
    """A local (or network-mounted) directory; writes fsync'ed and atomic (see module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_absolute():
            raise ValueError(f"LocalBackend: {root!r} is not absolute; resolve it with resolve_store_uri")
        _ensure_dir(self.root)
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"store key {key!r}: expected relative names without '.' or '..'")
        return self.root.joinpath(*parts)

    def read(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def write(self, key: str, data: bytes) -> None:
        _write_durable(self._path(key), data, replace=True)

    def create(self, key: str, data: bytes) -> bool:
        return _write_durable(self._path(key), data, replace=False)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def children(self, prefix: str = "") -> list[str]:
        folder = self._path(prefix) if prefix else self.root
        try:
            return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def remove(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir():  # rename first (atomic), then delete at leisure
            trash = path.parent / f".deleted-{path.name}-{os.getpid()}-{time.time_ns()}"
            try:
                os.rename(path, trash)
            except FileNotFoundError:
                return
            _fsync_dir(path.parent)
            shutil.rmtree(trash, ignore_errors=True)
            return
        try:
            path.unlink()
        except FileNotFoundError:
            return
        _fsync_dir(path.parent)


class FsspecBackend:
    """Any fsspec filesystem (object stores: one PUT per object, so writes are atomic).
    ``create`` is check-then-write there: two writers racing on one key both "win", which the
    store tolerates because its create-if-absent objects are content-addressed."""

    def __init__(self, uri: str, **storage_options: Any) -> None:
        try:
            import fsspec
        except ImportError as e:
            raise ValueError(f"style store location {uri!r} needs the fsspec package (pip install fsspec)") from e
        self.uri = uri.rstrip("/")
        self.fs, self.base = fsspec.core.url_to_fs(self.uri, **storage_options)
        self.base = self.base.rstrip("/")
        with contextlib.suppress(FileExistsError):
            self.fs.makedirs(self.base, exist_ok=True)

    def _path(self, key: str) -> str:
        if not key or any(p in ("", ".", "..") for p in key.split("/")):
            raise ValueError(f"store key {key!r}: expected relative names without '.' or '..'")
        return f"{self.base}/{key}"

    def read(self, key: str) -> bytes:
        return self.fs.cat_file(self._path(key))

    def write(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(key), data)

    def create(self, key: str, data: bytes) -> bool:
        if self.exists(key):
            return False
        self.write(key, data)
        return True

    def exists(self, key: str) -> bool:
        path = self._path(key)
        self.fs.invalidate_cache(path.rsplit("/", 1)[0])
        return bool(self.fs.isfile(path))

    def children(self, prefix: str = "") -> list[str]:
        path = self._path(prefix) if prefix else self.base
        self.fs.invalidate_cache(path)
        try:
            names = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted({n.rstrip("/").rsplit("/", 1)[-1] for n in names} - {""})

    def remove(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError):
            if self.fs.isfile(path):
                self.fs.rm_file(path)
            elif self.fs.exists(path):
                self.fs.rm(path, recursive=True)


def backend_for(uri: str | Path, base: str | Path | None = None, **storage_options: Any) -> StyleBackend:
    """The backend of a store location (see :func:`resolve_store_uri`)."""
    where = resolve_store_uri(uri, base)
    if _SCHEME.match(where):
        return FsspecBackend(where, **storage_options)
    return LocalBackend(where)


# --------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StylePage:
    """One page of a listing: the styles' metadata and the cursor of the next page (None: last)."""

    items: list[dict[str, Any]]
    next_cursor: str | None


def _encode_cursor(meta: Mapping[str, Any]) -> str:
    raw = json.dumps([float(meta.get("created", 0.0)), str(meta["style_id"])]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        created, sid = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return float(created), str(sid)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise ValueError("cursor: not a cursor from a previous page of this listing") from None


def _order(meta: Mapping[str, Any]) -> tuple[float, str]:
    return float(meta.get("created", 0.0)), str(meta.get("style_id", ""))


class StyleStore:
    """Styles at a location (see the module docstring). Safe for several processes and
    replicas sharing the location; holds no cache of its own."""

    def __init__(
        self, root: str | Path, *, base: str | Path | None = None, backend: StyleBackend | None = None
    ) -> None:
        self.backend = backend if backend is not None else backend_for(root, base)
        self.uri = self.backend.uri
        # The local directory (None for other backends): kept for callers that read files directly.
        self.root: Path | None = self.backend.root if isinstance(self.backend, LocalBackend) else None

    # ---- helpers ---------------------------------------------------------------------
    @staticmethod
    def _check_id(style_id: str) -> str:
        if not isinstance(style_id, str) or not STYLE_NAME.fullmatch(style_id):
            raise StyleNotFound(f"style {style_id!r} not found")
        return style_id

    @staticmethod
    def _check_model(model_key: str) -> str:
        if not isinstance(model_key, str) or not _MODEL_KEY.fullmatch(model_key):
            raise ValueError(f"model_key {model_key!r}: expected letters, digits, '_', '.', '-' (at most 128)")
        return model_key

    def _read_meta(self, style_id: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.backend.read(f"{self._check_id(style_id)}/{_META}"))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError):
            return None

    def _owned(self, style_id: str, tenant: str | None) -> dict[str, Any]:
        """The style's metadata; StyleNotFound when absent or another tenant's (same message)."""
        meta = self._read_meta(style_id)
        if meta is None or (tenant is not None and meta.get("tenant") != tenant):
            raise StyleNotFound(f"style {style_id!r} not found")
        return meta

    # ---- references ------------------------------------------------------------------
    def exists(self, style_id: str, tenant: str | None = None) -> bool:
        try:
            self._owned(style_id, tenant)
        except StyleNotFound:
            return False
        return True

    def generation(self, style_id: str, tenant: str | None = None) -> str:
        """The token of this incarnation of the style (new each time it is stored)."""
        meta = self._owned(style_id, tenant)
        return str(meta.get("generation") or meta.get("reference_sha256", ""))

    def exists_fresh(self, style_id: str, tenant: str | None = None, generation: str | None = None) -> bool:
        """Whether the style is still stored for ``tenant`` - and, given the ``generation`` a
        cache loaded, still that incarnation. One small read; call it before serving a
        cached style so a DELETE on any replica takes effect everywhere."""
        try:
            current = self.generation(style_id, tenant)
        except StyleNotFound:
            return False
        return generation is None or current == generation

    def put_reference(
        self,
        method: str,
        reference: Mapping[str, np.ndarray],
        meta: Mapping[str, Any] | None = None,
        adapt_options: Mapping[str, Any] | None = None,
        tenant: str | None = None,
    ) -> tuple[str, bool]:
        """Store a reference clip (write-once) for ``tenant`` with the JSON-able
        ``adapt_options`` its adaptation uses (kept in ``meta.json``, part of the id). Returns
        (style_id, created): ``created`` is False when the same clip and options are already
        stored for this tenant (untouched). A DELETE of the same style racing this call may
        remove its directory mid-write: the clip is then stored afresh (StyleNotFound if that
        keeps happening)."""
        arrays = {k: np.asarray(v) for k, v in reference.items() if v is not None}
        sid = style_id_for(method, arrays, adapt_options, tenant)
        for _ in range(_PUT_ATTEMPTS):
            try:
                return sid, self._put_reference(sid, method, arrays, meta, adapt_options, tenant)
            except FileNotFoundError:  # a racing delete removed the style's directory under us
                continue
        raise StyleNotFound(f"style {sid!r} was deleted while being stored {_PUT_ATTEMPTS} times; post it again")

    def _put_reference(
        self,
        sid: str,
        method: str,
        arrays: Mapping[str, np.ndarray],
        meta: Mapping[str, Any] | None,
        adapt_options: Mapping[str, Any] | None,
        tenant: str | None,
    ) -> bool:
        """One try of :meth:`put_reference`; returns ``created``."""
        if self._read_meta(sid) is not None:
            return False
        ref_key = f"{sid}/{_REFERENCE}"
        buf = _npz_bytes(arrays)
        if not self.backend.create(ref_key, buf):  # left by a racing writer or a crashed one
            buf = self.backend.read(ref_key)
        record = {
            "style_id": sid,
            "method": method,
            "created": time.time(),
            "tenant": tenant,
            "generation": uuid.uuid4().hex,
            "reference_sha256": hashlib.sha256(buf).hexdigest(),
            "arrays": {k: list(v.shape) for k, v in arrays.items()},
            **dict(meta or {}),
            **({"adapt_options": dict(adapt_options)} if adapt_options else {}),
        }
        created = self.backend.create(f"{sid}/{_META}", json.dumps(record, indent=2, sort_keys=True).encode())
        if created and not self.backend.exists(ref_key):  # a racing delete took the reference with it
            self.backend.write(ref_key, buf)
        return created

    def meta(self, style_id: str, tenant: str | None = None) -> dict[str, Any]:
        return self._owned(style_id, tenant)

    def reference(self, style_id: str, tenant: str | None = None) -> dict[str, np.ndarray]:
        self._owned(style_id, tenant)
        try:
            data = self.backend.read(f"{style_id}/{_REFERENCE}")
        except FileNotFoundError:  # deleted meanwhile
            raise StyleNotFound(f"style {style_id!r} not found") from None
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def _all_meta(self, tenant: str | None) -> list[dict[str, Any]]:
        out = []
        for name in self.backend.children():
            if not STYLE_NAME.fullmatch(name):
                continue
            meta = self._read_meta(name)
            if meta is not None and (tenant is None or meta.get("tenant") == tenant):
                out.append(meta)
        return sorted(out, key=_order)

    def list(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """Metadata of every stored style of ``tenant`` (None: of every tenant), oldest first."""
        return self._all_meta(tenant)

    def list_page(
        self, tenant: str | None = None, limit: int = 50, cursor: str | None = None, method: str | None = None
    ) -> StylePage:
        """One page of :meth:`list`: at most ``limit`` (1..1000) styles after ``cursor`` (the
        previous page's ``next_cursor``; None: the first page), only ``method``'s when given
        (so a page is full while more follow). Stable while styles are added."""
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit: expected an integer from 1 to {MAX_PAGE}, got {limit!r}")
        after = _decode_cursor(cursor) if cursor else None
        metas = [
            m
            for m in self._all_meta(tenant)
            if (after is None or _order(m) > after) and (method is None or m.get("method") == method)
        ]
        items = metas[:limit]
        more = len(metas) > limit
        return StylePage(items, _encode_cursor(items[-1]) if more else None)

    def delete(self, style_id: str, tenant: str | None = None) -> None:
        """Remove the style (reference and every adapted state): its ``meta.json`` first, so
        every replica stops seeing it at once, then the rest."""
        self._owned(style_id, tenant)
        self.backend.remove(f"{style_id}/{_META}")
        self.backend.remove(style_id)

    # ---- adapted states, per model ---------------------------------------------------
    def status(
        self, style_id: str, model_key: str, stale_after_s: float | None = None, tenant: str | None = None
    ) -> dict[str, Any]:
        """``{"status": "absent"|"pending"|"ready"|"failed", ...}`` for one model: ready once
        the adapted state is stored. An adapter writes its "ready" record (with the summary)
        before the state, so a ready answer always carries the record; until the state lands
        the record reads as pending. A pending record older than ``stale_after_s`` (its
        adapter died) reads as failed."""
        self._owned(style_id, tenant)
        key = self._check_model(model_key)
        if self.backend.exists(f"{style_id}/{key}.state.pt"):
            st = self._read_status(style_id, key) or {}
            return {**st, "status": "ready"}
        st = self._read_status(style_id, key)
        if st is None:
            return {"status": "absent"}
        if st.get("status") == "ready":  # the state is still being written
            st = {**st, "status": "pending"}
        if st.get("status") == "pending" and stale_after_s is not None:
            if time.time() - float(st.get("started", 0.0)) > stale_after_s:
                return {**st, "status": "failed", "error": f"adaptation did not finish within {stale_after_s:g} s"}
        return st

    def _read_status(self, style_id: str, model_key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.backend.read(f"{style_id}/{model_key}.status.json"))
        except (OSError, ValueError):
            return None

    def set_status(self, style_id: str, model_key: str, status: str, tenant: str | None = None, **fields: Any) -> None:
        """Record an adaptation's status; StyleNotFound when the style was deleted (nothing written)."""
        self._owned(style_id, tenant)
        record = {"status": status, "model": self._check_model(model_key), "updated": time.time(), **fields}
        self.backend.write(f"{style_id}/{model_key}.status.json", json.dumps(record, sort_keys=True).encode())

    def save_state(self, style_id: str, model_key: str, state: dict[str, Any], tenant: str | None = None) -> None:
        """Store the adapted StyleState for one model; StyleNotFound when the style was deleted."""
        from talkmesh.methods.base import save_style_state

        self._owned(style_id, tenant)
        buf = io.BytesIO()
        save_style_state(state, buf)
        self.backend.write(f"{style_id}/{self._check_model(model_key)}.state.pt", buf.getvalue())

    def load_state(
        self,
        style_id: str,
        model_key: str,
        method: str | None = None,
        version: int | None = None,
        tenant: str | None = None,
    ) -> dict[str, Any]:
        from talkmesh.methods.base import load_style_state

        self._owned(style_id, tenant)
        try:
            data = self.backend.read(f"{style_id}/{self._check_model(model_key)}.state.pt")
        except FileNotFoundError:
            raise StyleNotFound(f"style {style_id!r} has no adapted state for model {model_key}") from None
        return load_style_state(data, method=method, version=version)


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})
    return buf.getvalue()
