"""Shared test set-up: offline hub, loopback Ray, a private cache directory."""

from __future__ import annotations

import os

# Before anything imports transformers/ray: no downloads, loopback only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Generated corpora and feature caches go to a per-session temp dir, never ~/.cache."""
    monkeypatch.setenv("TALKMESH_CACHE", str(tmp_path_factory.getbasetemp() / "talkmesh-cache"))
