"""Where talkmesh keeps generated and cached files (never inside the package)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$TALKMESH_CACHE`` or ``~/.cache/talkmesh`` (``$XDG_CACHE_HOME`` respected)."""
    env = os.environ.get("TALKMESH_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "talkmesh"
