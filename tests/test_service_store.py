"""The style store's storage side (talkmesh.serving.store): durable atomic writes, tenant
isolation, pagination, deletion seen by other replicas, locations. Fast, no Ray."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from talkmesh.methods.base import make_style_state
from talkmesh.serving.store import (
    FsspecBackend,
    LocalBackend,
    StyleBackend,
    StyleNotFound,
    StyleStore,
    resolve_store_uri,
    style_id_for,
)

V = 12


def _ref(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"audio": rng.standard_normal(1600).astype(np.float32), "vertices": np.zeros((5, V, 3), np.float32)}


def test_writes_fsync_the_file_then_rename_then_fsync_the_directory(tmp_path, monkeypatch):
    store = StyleStore(tmp_path / "styles")
    sid, _ = store.put_reference("faceformer", _ref())
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    store.set_status(sid, "faceformer-v1", "pending", started=1.0)
    folder = str(tmp_path / "styles" / sid)
    target = f"{folder}/faceformer-v1.status.json"
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert Path(events[0][1]).parent == Path(folder) and Path(events[0][1]).name.startswith(".faceformer-v1.status")
    assert events[1] == ("replace", target) and events[2] == ("fsync", folder)
    assert store.status(sid, "faceformer-v1")["status"] == "pending"

    # A new style: every object fsync'ed, the new directory made durable in the root.
    events.clear()
    sid2, created = store.put_reference("faceformer", _ref(1))
    fsynced = [p for kind, p in events if kind == "fsync"]
    assert created and str(tmp_path / "styles") in fsynced and f"{tmp_path / 'styles'}/{sid2}" in fsynced
    assert sum(Path(p).name.startswith(".reference.npz") for p in fsynced) == 1
    assert sum(Path(p).name.startswith(".meta.json") for p in fsynced) == 1
    assert not [p for p in (tmp_path / "styles").rglob(".*")]  # no temporary files left


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    store = StyleStore(tmp_path)
    sid, _ = store.put_reference("faceformer", _ref())
    store.set_status(sid, "m", "pending", started=1.0)

    def broken(fd: int) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError):
        store.set_status(sid, "m", "failed", error="x")
    monkeypatch.undo()
    assert store.status(sid, "m")["status"] == "pending"
    assert not [p for p in tmp_path.rglob(".*")]


def test_tenants_cannot_see_use_or_delete_each_others_styles(tmp_path):
    store = StyleStore(tmp_path)
    sid, created = store.put_reference("faceformer", _ref(), {"name": "alice"}, tenant="a")
    assert created and sid == style_id_for("faceformer", _ref(), tenant="a") != style_id_for("faceformer", _ref())
    assert store.meta(sid, tenant="a")["tenant"] == "a"
    store.save_state(sid, "m", make_style_state("faceformer", 1, kind="onehot", index=1, vector=torch.ones(2)))

    missing = "sty_000000000000000000000000"
    for call in (
        lambda s: store.meta(s, tenant="b"),
        lambda s: store.reference(s, tenant="b"),
        lambda s: store.status(s, "m", tenant="b"),
        lambda s: store.load_state(s, "m", tenant="b"),
        lambda s: store.generation(s, tenant="b"),
        lambda s: store.delete(s, tenant="b"),
    ):
        with pytest.raises(StyleNotFound) as theirs:
            call(sid)
        with pytest.raises(StyleNotFound) as nobodys:
            call(missing)
        assert str(theirs.value) == str(nobodys.value).replace(missing, sid)  # indistinguishable
    assert not store.exists(sid, tenant="b") and not store.exists_fresh(sid, tenant="b")
    assert store.list(tenant="b") == [] and store.list_page(tenant="b").items == []
    # The same clip posted by tenant b is b's own style; a's stays untouched.
    sid_b, created_b = store.put_reference("faceformer", _ref(), {"name": "bob"}, tenant="b")
    assert created_b and sid_b != sid and store.meta(sid, tenant="a")["name"] == "alice"
    assert [m["style_id"] for m in store.list(tenant="a")] == [sid]
    assert {m["style_id"] for m in store.list()} == {sid, sid_b}  # no tenant: the operator's view
    assert store.load_state(sid, "m", tenant="a")["index"] == 1


def test_listing_is_paginated_per_tenant(tmp_path):
    store = StyleStore(tmp_path)
    mine = [store.put_reference("faceformer", _ref(i), tenant="a")[0] for i in range(5)]
    store.put_reference("faceformer", _ref(99), tenant="b")
    seen, cursor, pages = [], None, 0
    while True:
        page = store.list_page(tenant="a", limit=2, cursor=cursor)
        seen += [m["style_id"] for m in page.items]
        pages += 1
        assert len(page.items) <= 2
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert pages == 3 and seen == mine  # oldest first, each once
    # A style added mid-listing shows up on a later page, nothing is repeated.
    first = store.list_page(tenant="a", limit=3)
    late = store.put_reference("faceformer", _ref(50), tenant="a")[0]
    rest = store.list_page(tenant="a", limit=10, cursor=first.next_cursor)
    assert [m["style_id"] for m in first.items + rest.items] == [*mine, late] and rest.next_cursor is None
    for bad in (0, 1001, "2", True):
        with pytest.raises(ValueError, match="limit"):
            store.list_page(tenant="a", limit=bad)
    with pytest.raises(ValueError, match="cursor"):
        store.list_page(tenant="a", cursor="not-a-cursor!")


def test_a_page_of_one_methods_styles_is_full_while_more_follow(tmp_path):
    store = StyleStore(tmp_path)
    mixed = [store.put_reference("mimic" if i % 2 else "faceformer", _ref(i), tenant="a")[0] for i in range(6)]
    page = store.list_page(tenant="a", limit=2, method="faceformer")
    assert [m["style_id"] for m in page.items] == mixed[0:3:2] and page.next_cursor is not None
    rest = store.list_page(tenant="a", limit=2, cursor=page.next_cursor, method="faceformer")
    assert [m["style_id"] for m in rest.items] == [mixed[4]] and rest.next_cursor is None


def test_a_delete_is_seen_by_another_replica(tmp_path):
    one, two = StyleStore(tmp_path / "shared"), StyleStore(tmp_path / "shared")
    sid, _ = one.put_reference("faceformer", _ref(), tenant="a")
    generation = two.generation(sid, tenant="a")  # replica two caches the style with its generation
    assert two.exists_fresh(sid, "a", generation)
    one.delete(sid, tenant="a")
    assert not two.exists_fresh(sid, "a", generation) and not two.exists(sid, "a")
    with pytest.raises(StyleNotFound):
        two.reference(sid, tenant="a")
    # Stored again (same id): a new generation, so the cached copy is still refused.
    again, created = one.put_reference("faceformer", _ref(), tenant="a")
    assert again == sid and created
    assert two.exists_fresh(sid, "a") and not two.exists_fresh(sid, "a", generation)
    one.delete(sid, tenant="a")
    with pytest.raises(StyleNotFound):  # writing into a deleted style does not resurrect it
        two.set_status(sid, "m", "ready")
    assert not (tmp_path / "shared" / sid).exists()


def test_relative_locations_use_the_configured_base_not_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = tmp_path / "base"
    assert resolve_store_uri("styles", base) == str(base / "styles")
    assert resolve_store_uri(f"file://{tmp_path}/x") == str(tmp_path / "x")
    assert resolve_store_uri("s3://bucket/styles") == "s3://bucket/styles"
    monkeypatch.setenv("TALKMESH_HOME", str(tmp_path / "home"))
    store = StyleStore("./outputs/styles")
    assert store.root == tmp_path / "home" / "outputs" / "styles" and store.root.is_dir()
    assert not (tmp_path / "outputs").exists()  # nothing under the cwd
    assert StyleStore("styles", base=base).root == base / "styles"
    for bad in ("", "file://relative/path"):
        with pytest.raises(ValueError, match="style store location"):
            resolve_store_uri(bad)
    with pytest.raises(ValueError, match="model_key"):
        store.status(store.put_reference("faceformer", _ref())[0], "../escape")


def test_an_fsspec_location_works_like_a_directory():
    pytest.importorskip("fsspec")
    uri = f"memory://talkmesh-test-{os.getpid()}/styles"
    one, two = StyleStore(uri), StyleStore(uri)
    assert isinstance(one.backend, FsspecBackend) and isinstance(one.backend, StyleBackend) and one.root is None
    sid, created = one.put_reference("faceformer", _ref(), {"name": "x"}, tenant="a")
    assert created and one.put_reference("faceformer", _ref(), tenant="a") == (sid, False)
    np.testing.assert_array_equal(two.reference(sid, tenant="a")["audio"], _ref()["audio"])
    one.set_status(sid, "m", "pending", started=1.0)
    assert two.status(sid, "m")["status"] == "pending"
    assert [m["style_id"] for m in two.list_page(tenant="a").items] == [sid]
    two.delete(sid, tenant="a")
    assert not one.exists(sid) and one.list() == []


def test_local_backend_refuses_relative_roots_and_odd_keys(tmp_path):
    with pytest.raises(ValueError, match="not absolute"):
        LocalBackend("relative")
    backend = LocalBackend(tmp_path)
    for key in ("", "../x", "a//b", "a/./b"):
        with pytest.raises(ValueError, match="store key"):
            backend.read(key)
    assert backend.create("a/b.bin", b"1") and not backend.create("a/b.bin", b"2")
    assert backend.read("a/b.bin") == b"1" and backend.children() == ["a"] and backend.children("a") == ["b.bin"]
    backend.remove("a")
    assert backend.children() == [] and not backend.exists("a/b.bin")


def test_a_status_read_racing_a_delete_answers_absent_or_not_found(tmp_path):
    """The job is forgotten by a DELETE between finding it and reading it (fuzz, DELETE racing
    POST): the style reads as absent while it is stored, as not found once it is deleted."""
    from talkmesh.serving.adapt_worker import adaptation_status, submit_adaptation
    from talkmesh.serving.jobs import JobQueue

    store, queue = StyleStore(tmp_path / "styles"), JobQueue(f"sqlite:///{tmp_path / 'service.db'}")
    sid, _ = store.put_reference("faceformer", _ref(), tenant="a")
    submit_adaptation(store, queue, sid, "m", "a", {})
    read = queue.status
    queue.status = lambda job: (queue.forget(sid), read(job))[1]
    assert adaptation_status(store, queue, sid, "m", "a") == {"status": "absent"}
    submit_adaptation(store, queue, sid, "m", "a", {})
    queue.status = lambda job: (store.delete(sid, "a"), queue.forget(sid), read(job))[2]
    with pytest.raises(StyleNotFound):
        adaptation_status(store, queue, sid, "m", "a")
