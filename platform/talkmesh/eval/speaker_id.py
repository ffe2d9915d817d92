"""Speaker-identity network over facial motion: the feature extractor behind the style
consistency metrics (``scs``, ``speaker_acc``; specs/metrics.md §7.4, project DECISION).

The network is trained separately from every animation method and never shares weights
with one (Mimic's own style encoder must not judge Mimic). Architecture (metrics.md §7.4):
Mimic's style-encoder stack (specs/mimic.md §2.2: Linear -> [Conv1d k3 -> LayerNorm ->
ReLU] x n -> LayerNorm -> Linear -> temporal PE -> transformer -> Linear -> temporal mean;
:class:`talkmesh.nn.motion_encoder.MotionSequenceEncoder`) with a proper temporal PE,
followed by Linear(d -> number of training identities). It is trained with cross-entropy
on random ``window_frames`` (6 s at 25 fps) windows of vertex offsets (vertices minus the
subject's template) of the corpus's training identities, then frozen. The embedding f(m)
is the pooled d-dimensional feature before the classifier.

    net = train_speaker_id(corpus)                       # or SpeakerIdNet.load(path)
    f = net.embed_motion(vertices, template)             # (d,) numpy
    net.save(path); net.fingerprint()                    # sha256, recorded with results
    style_consistency(method, corpus, "test-B", net)     # {"scs": ..., "speaker_acc": ..., ...}

``embed_motion`` of a sequence longer than ``window_frames`` averages the features of
consecutive non-overlapping windows, weighted by their frame counts (the last window may
be shorter), so any length is scored like the training windows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from talkmesh.config import from_dict, to_dict
from talkmesh.data.dataset import match_audio_to_motion
from talkmesh.eval import metrics as M
from talkmesh.eval.evaluate import eval_sequences
from talkmesh.eval.predictions import ground_truth, method_template, template, vertices_of_output
from talkmesh.nn.motion_encoder import MotionSequenceEncoder

if TYPE_CHECKING:  # pragma: no cover
    from talkmesh.data.clip import SequenceInfo
    from talkmesh.data.corpus import Corpus
    from talkmesh.methods.base import MotionMethod, StyleState

__all__ = ["SpeakerIdConfig", "SpeakerIdNet", "style_consistency", "train_speaker_id"]

FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SpeakerIdConfig:
    """Network and training settings. Defaults: Mimic's style-encoder sizes (metrics.md §7.4);
    presets: :meth:`paper` (the defaults), :meth:`small` (tests, the synthetic corpus)."""

    d_model: int = 128
    n_convs: int = 5
    n_layers: int = 4
    n_heads: int = 4
    ff_dim: int = 256
    dropout: float = 0.1
    window_frames: int = 150  # training windows; embed_motion's chunk length
    batch_size: int = 16
    steps: int = 3000
    lr: float = 1e-4  # Adam
    seed: int = 0

    def __post_init__(self) -> None:
        if self.d_model < 2 or self.d_model % 2 or self.d_model % max(self.n_heads, 1):
            raise ValueError(f"d_model={self.d_model} must be even and divisible by n_heads={self.n_heads}")
        for name in ("n_heads", "ff_dim", "window_frames", "batch_size", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"speaker_id.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_convs", "n_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"speaker_id.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"speaker_id.dropout must lie in [0, 1), got {self.dropout}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"speaker_id.lr must be positive, got {self.lr}")

    PRESETS: ClassVar[tuple[str, ...]] = ("paper", "small")

    @classmethod
    def preset(cls, name: str) -> SpeakerIdConfig:
        if name not in cls.PRESETS:
            raise ValueError(f"unknown speaker-id preset {name!r}; presets: {list(cls.PRESETS)}")
        return cls() if name == "paper" else cls.small()

    @classmethod
    def paper(cls) -> SpeakerIdConfig:
        return cls()

    @classmethod
    def small(cls) -> SpeakerIdConfig:
        """d 32, 2 convs, 1 transformer layer, 2 s windows at 25 fps, 300 steps at lr 1e-3."""
        return cls(
            d_model=32,
            n_convs=2,
            n_layers=1,
            n_heads=2,
            ff_dim=64,
            dropout=0.0,
            window_frames=50,
            batch_size=16,
            steps=300,
            lr=1e-3,
        )


class SpeakerIdNet(nn.Module):
    """Speaker classifier over vertex offsets. ``subjects`` are the class names (the
    training identities, in the corpus's order); ``num_vertices`` fixes the input size."""

    def __init__(self, config: SpeakerIdConfig, num_vertices: int, subjects: tuple[str, ...]) -> None:
        super().__init__()
        if num_vertices < 1 or len(subjects) < 2:
            raise ValueError(f"need >= 1 vertex and >= 2 speakers, got {num_vertices} and {len(subjects)}")
        self.config = config
        self.num_vertices = int(num_vertices)
        self.subjects = tuple(subjects)
        self.encoder = MotionSequenceEncoder(
            3 * num_vertices,
            config.d_model,
            n_convs=config.n_convs,
            norm="layer",
            n_layers=config.n_layers,
            n_heads=config.n_heads,
            ff_dim=config.ff_dim,
            dropout=config.dropout,
            pe="temporal",
            pool="mean",
            max_len=max(600, config.window_frames),
        )
        self.head = nn.Linear(config.d_model, len(subjects))
        self.train_info: dict[str, float] = {}

    def embed(self, offsets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """offsets (B, T, 3V), mask (B, T) True = valid -> embeddings (B, d)."""
        return self.encoder(offsets, mask)

    def forward(self, offsets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """offsets (B, T, 3V) -> logits (B, number of speakers)."""
        return self.head(self.embed(offsets, mask))

    @torch.no_grad()
    def embed_motion(self, vertices: np.ndarray | torch.Tensor, template: np.ndarray | torch.Tensor) -> np.ndarray:
        """f(m): the (d,) float64 embedding of one sequence, vertices (T, V, 3) or (T, 3V)
        minus template (V, 3); frame-weighted mean over ``window_frames`` chunks."""
        v = M.as_vertices(np.asarray(vertices, dtype=np.float32), self.num_vertices, "motion")
        m = M.as_template(np.asarray(template, dtype=np.float32), self.num_vertices, "template")
        if v.shape[0] < 1:
            raise ValueError("motion has no frames")
        off = torch.from_numpy((v - m[None]).reshape(v.shape[0], -1).astype(np.float32))
        dev = next(self.parameters()).device
        was = self.training
        self.eval()
        try:
            w = self.config.window_frames
            feats, counts = [], []
            for s in range(0, off.shape[0], w):
                chunk = off[s : s + w].to(dev)
                feats.append(self.embed(chunk[None])[0].double().cpu())
                counts.append(chunk.shape[0])
        finally:
            self.train(was)
        c = torch.tensor(counts, dtype=torch.float64)
        return ((torch.stack(feats) * c[:, None]).sum(0) / c.sum()).numpy()

    # ---- persistence ---------------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 over the config, the speakers and every tensor (names, shapes, bytes)."""
        h = hashlib.sha256()
        h.update(repr((to_dict(self.config), self.num_vertices, self.subjects)).encode())
        for name, t in sorted(self.state_dict().items()):
            d = t.detach().to("cpu").contiguous()
            h.update(f"{name}:{d.dtype}:{tuple(d.shape)};".encode())
            h.update(d.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def save(self, path: str | Path | io.BytesIO) -> None:
        """``torch.save`` of plain data (loadable with ``weights_only=True``)."""
        torch.save(
            {
                "format": FORMAT_VERSION,
                "config": to_dict(self.config),
                "num_vertices": self.num_vertices,
                "subjects": list(self.subjects),
                "state_dict": self.state_dict(),
                "train_info": dict(self.train_info),
            },
            path,
        )

    @classmethod
    def load(cls, path: str | Path | io.BytesIO, device: str | torch.device = "cpu") -> SpeakerIdNet:
        """Rebuild a saved network (eval mode)."""
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: not a talkmesh speaker-id network (format {FORMAT_VERSION})")
        net = cls(from_dict(SpeakerIdConfig, blob["config"]), int(blob["num_vertices"]), tuple(blob["subjects"]))
        net.load_state_dict(blob["state_dict"])
        net.train_info = {k: float(v) for k, v in blob.get("train_info", {}).items()}
        return net.to(device).eval()


def _training_offsets(corpus: Corpus, split: str) -> tuple[list[np.ndarray], list[int]]:
    """(T, 3V) offsets and class index of every training-identity sequence of ``split``."""
    subjects = list(corpus.info.train_subjects)
    xs, ys = [], []
    for seq in corpus.sequences(split):
        if seq.subject not in subjects:
            continue
        v, tmpl = ground_truth(corpus, corpus.load(seq))  # (T, V, 3), (V, 3)
        xs.append((v - tmpl[None]).reshape(v.shape[0], -1))
        ys.append(subjects.index(seq.subject))
    if len(set(ys)) < 2:
        raise ValueError(f"speaker-id training needs sequences of >= 2 training identities in split {split!r}")
    return xs, ys


def train_speaker_id(
    corpus: Corpus,
    config: SpeakerIdConfig | None = None,
    split: str = "train",
    device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = None,
) -> SpeakerIdNet:
    """Train the speaker-identity network on the corpus's training identities (cross-entropy
    on random ``window_frames`` windows of offsets; shorter sequences are padded and
    masked). Seeded by ``config.seed``; returns the network frozen in eval mode, with
    ``train_info`` = {"loss", "accuracy" (on the last 20 batches), "seconds", "sequences"}."""
    cfg = config or SpeakerIdConfig()
    xs, ys = _training_offsets(corpus, split)
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = SpeakerIdNet(cfg, corpus.info.num_vertices, tuple(corpus.info.train_subjects)).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        w, dim = cfg.window_frames, xs[0].shape[1]
        recent: list[tuple[float, float]] = []
        t0 = time.perf_counter()
        net.train()
        for step in range(cfg.steps):
            idx = torch.randint(0, len(xs), (cfg.batch_size,), generator=gen).tolist()
            batch = np.zeros((cfg.batch_size, w, dim), np.float32)
            mask = np.zeros((cfg.batch_size, w), bool)
            for i, k in enumerate(idx):
                x = xs[k]
                start = int(torch.randint(0, max(x.shape[0] - w, 0) + 1, (), generator=gen))
                part = x[start : start + w]
                batch[i, : part.shape[0]], mask[i, : part.shape[0]] = part, True
            target = torch.tensor([ys[k] for k in idx], device=device)
            logits = net(torch.from_numpy(batch).to(device), torch.from_numpy(mask).to(device))
            loss = F.cross_entropy(logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            recent = (recent + [(float(loss.detach()), float((logits.argmax(-1) == target).float().mean()))])[-20:]
            if log is not None and (step % 100 == 0 or step + 1 == cfg.steps):
                log(f"speaker-id step {step + 1}/{cfg.steps} loss {float(loss):.4f}")
    net.eval()
    net.train_info = {
        "loss": float(np.mean([r[0] for r in recent])),
        "accuracy": float(np.mean([r[1] for r in recent])),
        "seconds": time.perf_counter() - t0,
        "sequences": float(len(xs)),
    }
    return net


def style_consistency(
    method: MotionMethod,
    corpus: Corpus,
    split: str,
    net: SpeakerIdNet,
    *,
    limit: int = 0,
    reference_seconds: float | None = None,
) -> dict[str, Any]:
    """Style-consistency scores of a reference-conditioned method on ``split``.

    Every evaluated sequence (``eval.evaluate.eval_sequences``) is animated from its audio
    with the style the method encodes from the evaluator's style reference
    (``corpus.style_reference`` of ``method.reference_seconds`` unless ``reference_seconds``
    is given, metrics.md §6.2-6.3; leading frames that served as the reference are not
    scored). Then ``scs`` = mean cos(f(generated), f(reference)) and
    ``speaker_acc`` = retrieval of each generated sequence's speaker among the split's
    reference embeddings, one per speaker (the first reference met;
    :func:`talkmesh.eval.metrics.speaker_retrieval_accuracy`). A reference's embedding covers
    its last ``window_frames`` frames. Also returned: ``speaker_acc_chance``, ``gt_scs``
    and ``gt_speaker_acc`` (the ground truth scored the same way: the ceiling),
    ``sequences``, ``speakers`` and the network's ``fingerprint`` (record it with results).
    """
    seqs = eval_sequences(corpus, split, limit)
    if not seqs:
        raise ValueError(f"split {split!r} has no sequences")
    seconds = reference_seconds if reference_seconds is not None else method.reference_seconds
    cache: dict[str, tuple[np.ndarray, StyleState]] = {}  # reference name -> (embedding, style)
    gallery: dict[str, np.ndarray] = {}  # speaker -> embedding of its first reference
    gen, gt, ref_rows, labels = [], [], [], []
    for seq in seqs:
        ref, skip = corpus.style_reference(seq, seconds)
        if ref.name not in cache:
            rv = np.asarray(corpus.vertices_of(ref), dtype=np.float32)
            emb = net.embed_motion(rv[-net.config.window_frames :], template(corpus, ref, rv.shape[1]))
            cache[ref.name] = (emb, method.encode_style(ref))
        emb, style = cache[ref.name]
        gallery.setdefault(seq.subject, emb)
        generated, truth = _embed_generated(method, corpus, net, seq, style, skip)
        gen.append(generated)
        gt.append(truth)
        ref_rows.append(emb)
        labels.append(seq.subject)
    return _consistency_scores(net, np.stack(gen), np.stack(gt), np.stack(ref_rows), labels, gallery)


def _embed_generated(
    method: MotionMethod, corpus: Corpus, net: SpeakerIdNet, seq: SequenceInfo, style: StyleState, skip: int
) -> tuple[np.ndarray, np.ndarray]:
    """(d,) embeddings of ``seq`` animated in ``style`` and of its ground truth, both
    without the ``skip`` leading frames that served as the reference."""
    clip = match_audio_to_motion(corpus.load(seq))
    gv, tmpl = ground_truth(corpus, clip)  # (T, V, 3), (V, 3)
    out = method.generate(clip.audio, method_template(method, clip, tmpl), style)
    pv = vertices_of_output(corpus, clip, out, gv.shape[1])
    return net.embed_motion(pv[skip:], tmpl), net.embed_motion(gv[skip:], tmpl)


def _consistency_scores(
    net: SpeakerIdNet,
    gen: np.ndarray,
    gt: np.ndarray,
    refs: np.ndarray,
    labels: list[str],
    gallery: dict[str, np.ndarray],
) -> dict[str, Any]:
    """The scores of :func:`style_consistency` from the (N, d) embeddings of the generated
    sequences, their ground truth and their references, and one reference per speaker."""
    speakers = sorted(gallery)
    table = np.stack([gallery[s] for s in speakers])
    acc = M.speaker_retrieval_accuracy(gen, labels, table, speakers)
    return {
        "scs": M.scs(gen, refs),
        "speaker_acc": acc["accuracy"],
        "speaker_acc_chance": acc["chance"],
        "gt_scs": M.scs(gt, refs),
        "gt_speaker_acc": M.speaker_retrieval_accuracy(gt, labels, table, speakers)["accuracy"],
        "sequences": len(labels),
        "speakers": speakers,
        "fingerprint": net.fingerprint(),
    }
