"""Where generated corpora live: generating one atomically into a directory, the
per-(preset, seed, fps) cache used when ``data.root`` is empty, and reading ``meta.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

from talkmesh.data.errors import DataError
from talkmesh.data.synthetic.presets import GENERATOR_VERSION, get_preset
from talkmesh.data.synthetic.writer import write_corpus

__all__ = ["cache_path", "ensure_cached", "generate_corpus", "read_meta", "speaker_styles"]


def _matches(root: Path, preset: str, seed: int, fps: float) -> bool:
    try:
        meta = read_meta(root)
    except DataError:
        return False
    return (meta.get("version"), meta.get("preset"), meta.get("seed"), float(meta.get("fps", 0))) == (
        GENERATOR_VERSION, preset, seed, float(fps)
    )


def generate_corpus(out: Path, preset: Literal["small", "default"] = "small", seed: int = 0, fps: float = 25.0) -> Path:
    """Generate the synthetic corpus into ``out`` (processed layout; see the package docstring).

    The corpus is written into a temporary sibling directory and renamed into place, so
    ``out`` only ever appears complete. ``out`` must not exist or be empty; if it already
    holds this very corpus (same generator version, preset, seed, fps) it is returned as is.
    Returns ``out``.
    """
    out = Path(out).expanduser()
    get_preset(preset)
    if not fps > 0:
        raise DataError(f"synthetic corpus: fps must be positive, got {fps}")
    if out.exists():
        if _matches(out, preset, seed, fps):
            return out
        if not out.is_dir() or any(out.iterdir()):
            raise DataError(f"{out}: exists and is not empty; choose another --out or remove it first")
    _generate_atomically(out, preset, seed, fps)
    if not _matches(out, preset, seed, fps):
        raise DataError(f"{out}: another process wrote a different corpus there")
    return out


def _generate_atomically(target: Path, preset: str, seed: int, fps: float) -> None:
    """Generate into a temporary sibling and ``os.rename`` it into place. If another process
    got there first (the rename fails because ``target`` is not empty), ours is discarded."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write_corpus(tmp, preset, seed, fps)
        try:
            os.rename(tmp, target)  # atomic; replaces an empty directory, fails on a non-empty one
        except OSError:
            if not (target / "meta.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_meta(root: str | Path) -> dict[str, Any]:
    """``meta.json`` of a generated corpus (DataError if there is none)."""
    path = Path(root).expanduser() / "meta.json"
    if not path.is_file():
        raise DataError(
            f"{Path(root)}: not a synthetic corpus (meta.json missing); generate one with "
            f"`talkmesh data synth --out {Path(root)}` or leave data.root empty to use the cache"
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable synthetic corpus metadata ({e})") from e
    if not isinstance(meta, dict) or "speakers" not in meta or "sequences" not in meta:
        raise DataError(f"{path}: not synthetic corpus metadata (speakers/sequences missing)")
    return meta


def speaker_styles(root: str | Path) -> dict[str, dict[str, float]]:
    """Recorded style parameters per speaker: ``{"S01": {"articulation_gain": ..., ...}}``."""
    meta = read_meta(root)
    return {name: {k: float(v) for k, v in spk["style"].items()} for name, spk in meta["speakers"].items()}


def cache_path(preset: str, seed: int, fps: float) -> Path:
    """Where the corpus for (preset, seed, fps) lives when ``data.root`` is empty."""
    from talkmesh.paths import cache_dir

    return cache_dir() / f"synthetic-{preset}-s{seed}-{fps:g}fps"


def ensure_cached(preset: str, seed: int, fps: float) -> Path:
    """The cached corpus for (preset, seed, fps), generated on first use. Safe when several
    processes start at once: each generates into its own temporary directory and the first
    rename wins. A cache written by another generator version is replaced."""
    target = cache_path(preset, seed, fps)
    if _matches(target, preset, seed, fps):
        return target
    if (target / "meta.json").is_file():  # stale version: move it aside, then regenerate
        warnings.warn(f"{target}: synthetic corpus from another generator version; regenerating", stacklevel=2)
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
        try:
            os.rename(target, stale / "old")
        except OSError:
            pass  # another process moved it already
        shutil.rmtree(stale, ignore_errors=True)
    _generate_atomically(target, preset, seed, fps)
    if not _matches(target, preset, seed, fps):
        raise DataError(f"{target}: exists but does not hold the synthetic corpus {preset}/seed {seed}/{fps:g} fps")
    return target

