"""On-disk cache of frozen-encoder features (50 Hz, float32 ``(N, H)`` .npy files).

Key = sha256 over the encoder's identity string (kind, checkpoint, hidden-state index,
normalisation, and a fingerprint of its config and weights; for tiny random encoders the
seed as well) and the float32 little-endian bytes of the 16 kHz mono audio, plus the
piece size when a long file is encoded in chunks (:class:`talkmesh.audio.chunks.ChunkedEncoding`;
one-pass entries keep the plain key). A changed encoder therefore never hits an entry
written by another one.

Layout: ``<root>/<encoder digest[:16]>/<key[:2]>/<key>.npy`` (default root
``cache_dir()/"features"``). Writes are atomic (temporary file in the same directory +
``os.replace``), so concurrent workers never see half-written files; entries are read
with ``allow_pickle=False``. An unreadable or inconsistent entry is recomputed and
rewritten rather than raising.

Only frozen encoders may be cached: features of an encoder that still trains go stale
with every optimiser step, so :meth:`FeatureCache.get_or_compute` refuses them.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from talkmesh.audio.chunks import ChunkedEncoding
from talkmesh.audio.encoders import AudioEncoder
from talkmesh.paths import cache_dir

__all__ = ["FeatureCache"]

_FORMAT = "talkmesh-features-v1"


class FeatureCache:
    """Frozen-encoder feature cache with hit/miss counters (``hits``, ``misses``, ``corrupt``)."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else cache_dir() / "features"
        self.hits = 0
        self.misses = 0
        self.corrupt = 0

    # ------------------------------------------------------------------------- keys
    @staticmethod
    def _audio(audio: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(np.asarray(audio), dtype="<f4")
        if a.ndim != 1:
            raise ValueError(f"expected one mono 16 kHz utterance (S,), got shape {a.shape}")
        return a

    @staticmethod
    def encoder_digest(encoder: AudioEncoder) -> str:
        """sha256 of the encoder identity (includes its weight fingerprint)."""
        return hashlib.sha256(f"{_FORMAT}|{encoder.identity()}".encode()).hexdigest()

    def key(self, audio: np.ndarray, encoder: AudioEncoder, variant: str = "") -> str:
        """sha256 hex key of (encoder identity, float32 audio bytes[, variant])."""
        a = self._audio(audio)
        h = hashlib.sha256()
        h.update(self.encoder_digest(encoder).encode())
        h.update(f"|{a.shape[0]}|".encode())
        h.update(a.tobytes())
        if variant:
            h.update(f"|{variant}".encode())
        return h.hexdigest()

    def path_for(self, audio: np.ndarray, encoder: AudioEncoder, variant: str = "") -> Path:
        """Where the features of ``audio`` under ``encoder`` are (or would be) stored."""
        key = self.key(audio, encoder, variant)
        return self.root / self.encoder_digest(encoder)[:16] / key[:2] / f"{key}.npy"

    # ------------------------------------------------------------------------ access
    def get_or_compute(
        self, audio: np.ndarray, encoder: AudioEncoder, chunking: ChunkedEncoding | None = None
    ) -> np.ndarray:
        """Features (N, H) float32 of one raw 16 kHz utterance (S,), from disk or computed
        (in pieces when ``chunking`` applies to its length).

        Raises ValueError when ``encoder`` has trainable parameters.
        """
        trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(
                f"FeatureCache only caches frozen encoders; {len(trainable)} parameters still require grad "
                f"(first: {trainable[0]}). Build it with trainable_layers=0 to cache its features."
            )
        a = self._audio(audio)
        variant = chunking.tag(a.shape[0], encoder.sample_rate) if chunking is not None else ""
        path = self.path_for(a, encoder, variant)
        expected = (int(encoder.frames_for_samples(a.shape[0])), encoder.hidden_size)
        if path.exists():
            feats = self._read(path, expected)
            if feats is not None:
                self.hits += 1
                return feats
            self.corrupt += 1
        self.misses += 1
        if variant:
            assert chunking is not None
            computed = chunking.encode(encoder, torch.from_numpy(a.astype(np.float32))).to("cpu").numpy()
        else:
            computed = encoder.encode(a)
        feats = np.ascontiguousarray(computed, dtype=np.float32)
        self._write(path, feats)
        return feats

    @staticmethod
    def _read(path: Path, expected: tuple[int, int]) -> np.ndarray | None:
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        if not isinstance(arr, np.ndarray) or arr.dtype != np.float32 or arr.shape != expected:
            return None
        if not np.all(np.isfinite(arr)):
            return None
        return arr

    @staticmethod
    def _write(path: Path, feats: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem[:16]}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, feats, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def stats(self) -> dict[str, int]:
        """Counters since construction: hits, misses (computations), corrupt (recomputed entries)."""
        return {"hits": self.hits, "misses": self.misses, "corrupt": self.corrupt}
