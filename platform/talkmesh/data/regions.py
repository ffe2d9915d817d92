"""Lip and upper-face vertex regions (datasets.md section 7).

Region files come in two forms: index lists (``lve.txt``/``fdd.txt``, comma or whitespace
separated ints; also ``.npy``) and the FLAME ``FLAME_masks.pkl`` dict. FLAME lips are the
sorted unique ``lips`` indices (250); the FLAME upper face is ``forehead`` U ``eye_region``
(827). Every file's md5 travels with the indices so metric outputs can record it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

import numpy as np

from talkmesh.data.errors import DataError
from talkmesh.data.safepickle import load_pickle

FLAME_UPPER_KEYS = ("forehead", "eye_region")


@dataclasses.dataclass(frozen=True)
class Regions:
    lips: np.ndarray  # (L,) int64, sorted unique
    upper: np.ndarray  # (U,) int64, sorted unique
    sources: dict[str, str] = dataclasses.field(default_factory=dict)  # "lips"/"upper" -> "path (md5 ...)"

    def describe(self) -> dict[str, object]:
        return {"lips": int(self.lips.size), "upper": int(self.upper.size), "sources": dict(self.sources)}


def file_md5(path: str | Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _unique(idx: np.ndarray, path: Path, num_vertices: int | None) -> np.ndarray:
    idx = np.unique(np.asarray(idx, dtype=np.int64).ravel())
    if idx.size == 0:
        raise DataError(f"{path}: region file holds no vertex indices")
    if idx.min() < 0 or (num_vertices is not None and idx.max() >= num_vertices):
        raise DataError(
            f"{path}: vertex indices must lie in [0, {num_vertices}) for this mesh, "
            f"found range {idx.min()}..{idx.max()}"
        )
    return idx


def read_index_file(path: str | Path, num_vertices: int | None = None) -> np.ndarray:
    """Index list from ``.txt`` (comma/whitespace separated), ``.npy`` or a pickle of a list."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: region file not found (expected a list of vertex indices)")
    try:
        if p.suffix == ".npy":
            idx = np.load(p, allow_pickle=False)
        elif p.suffix == ".pkl":
            idx = np.asarray(load_pickle(p))
        else:
            text = p.read_text()
            tokens = [t for t in re.split(r"[\s,;]+", text.strip()) if t]
            idx = np.array([int(float(t)) for t in tokens], dtype=np.int64)
    except DataError:
        raise
    except (ValueError, OSError, TypeError) as e:
        raise DataError(f"{p}: cannot read vertex indices ({e})") from e
    return _unique(idx, p, num_vertices)


def read_flame_masks(path: str | Path, num_vertices: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``FLAME_masks.pkl`` -> (unique lips, forehead U eye_region)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: FLAME mask file not found (expected FLAME_masks.pkl with 'lips', 'forehead', "
                        "'eye_region')")
    masks = load_pickle(p)
    if not isinstance(masks, dict):
        raise DataError(f"{p}: expected a dict of index arrays, got {type(masks).__name__}")
    missing = [k for k in ("lips", *FLAME_UPPER_KEYS) if k not in masks]
    if missing:
        raise DataError(f"{p}: missing key(s) {missing}; found {sorted(masks)}")
    lips = _unique(np.asarray(masks["lips"]), p, num_vertices)
    upper = _unique(np.concatenate([np.asarray(masks[k]).ravel() for k in FLAME_UPPER_KEYS]), p, num_vertices)
    return lips, upper


def load_regions(
    lips: str | Path,
    upper: str | Path | None = None,
    num_vertices: int | None = None,
) -> Regions:
    """Regions from files. ``lips`` may be a FLAME_masks.pkl (then ``upper`` may be omitted
    and comes from the same file) or an index list; ``upper`` an index list or masks pkl."""
    lp = Path(lips)
    sources: dict[str, str] = {}
    if _is_masks(lp):
        lip_idx, upper_idx = read_flame_masks(lp, num_vertices)
        sources["lips"] = f"{lp} (md5 {file_md5(lp)})"
        sources["upper"] = sources["lips"]
    else:
        lip_idx = read_index_file(lp, num_vertices)
        sources["lips"] = f"{lp} (md5 {file_md5(lp)})"
        upper_idx = None
    if upper is not None and str(upper) != "":
        up = Path(upper)
        upper_idx = read_flame_masks(up, num_vertices)[1] if _is_masks(up) else read_index_file(up, num_vertices)
        sources["upper"] = f"{up} (md5 {file_md5(up)})"
    if upper_idx is None:
        raise DataError(f"{lp}: an index list gives only lips; an upper-face region file is needed too")
    return Regions(lips=lip_idx, upper=upper_idx, sources=sources)


def _is_masks(p: Path) -> bool:
    if p.suffix != ".pkl" or not p.is_file():
        return False
    try:
        return isinstance(load_pickle(p), dict)
    except DataError:
        return False


def with_overrides(default: Regions, lip_path: str, upper_path: str, num_vertices: int | None) -> Regions:
    """Apply the user's ``data.lip_regions`` / ``data.upper_regions`` over a corpus default."""
    if not lip_path and not upper_path:
        return default
    lips, upper, sources = default.lips, default.upper, dict(default.sources)
    if lip_path:
        p = Path(lip_path)
        lips = read_flame_masks(p, num_vertices)[0] if _is_masks(p) else read_index_file(p, num_vertices)
        sources["lips"] = f"{p} (md5 {file_md5(p)})"
    if upper_path:
        p = Path(upper_path)
        upper = read_flame_masks(p, num_vertices)[1] if _is_masks(p) else read_index_file(p, num_vertices)
        sources["upper"] = f"{p} (md5 {file_md5(p)})"
    return Regions(lips=lips, upper=upper, sources=sources)
