"""Evaluation metrics for speech-driven 3D facial animation (specs/metrics.md).

Everything here is pure numpy, accumulates in float64 and returns values in the dataset's
**native units** (metrics.md §1, §5; README G9). The module depends on no data or method
module (§11.6): it consumes saved arrays and region index lists only.

Stable names (§2-§4, §7, README G11); ``lve`` and ``fdd`` are the defaults:

===============  ==========================================================  ==========
name             definition                                                  averaging
===============  ==========================================================  ==========
``lve``          max over lips of the squared L2 error (CodeTalker, §2.1)    pooled frames
``lve_l2``       max over lips of the L2 error (§2.2)                        pooled frames
``mve_max_sq``   max over all vertices of the squared L2 error (§4)          pooled frames
``mve_mean_l2``  mean over all vertices of the L2 error (§4)                 pooled frames
``fve_mean_sq``  mean over all vertices of the squared L2 error (§4, §7.1)   pooled frames
``fdd``          signed upper-face dynamics deviation, GT - pred (§3.1)      sequences
``fdd_abs``      \\|GT - pred\\| per sequence (§3.2)                          sequences
``ldd``          ``fdd_abs`` on the lip set (§7.2, project DECISION)         sequences
``ldtw``         DTW cost / path length on lip offsets (§7.3, DECISION)      sequences
===============  ==========================================================  ==========

Aliases ``lve_codetalker`` -> ``lve`` and ``fdd_signed`` -> ``fdd`` are accepted wherever a
metric name is. Pooled metrics weigh every frame of every sequence equally (§2.1, §11.2);
the FDD family averages one value per sequence (§3.1). Per-sequence helpers return
``(sum, frames)`` so callers can pool across batches, files or workers.

Length (§1): each (prediction, ground truth) pair is truncated to the shorter length and a
:class:`LengthMismatchWarning` is emitted when the lengths differ by more than 2 frames.
Motion may be given as (T, V, 3) or flattened (T, V*3).

Also here: the unseen-subject condition aggregation (§6.1), the AdaMesh diversity and pose
metrics (§8), DEE cross-modal retrieval accuracy (§9), the published scales (§5) and a
report-table formatter that prints native and scaled values side by side. Style
consistency (§7.4): ``scs`` and ``speaker_retrieval_accuracy`` score embeddings of a
separately trained speaker-identity network (``talkmesh.eval.speaker_id`` computes them).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np

__all__ = [
    "AVERAGED_METRICS",
    "DEFAULT_METRICS",
    "METRIC_NAMES",
    "POOLED_METRICS",
    "SCALES",
    "Evaluation",
    "LengthMismatchWarning",
    "SequenceScore",
    "aggregate",
    "aggregate_conditions",
    "align_pair",
    "as_template",
    "as_vertices",
    "canonical_name",
    "csd_similarity",
    "diversity",
    "diversity_of_set",
    "dtw",
    "dynamics",
    "emotion_accuracy",
    "evaluate_conditions",
    "evaluate_sequences",
    "fdd",
    "fdd_abs",
    "fdd_sequence",
    "format_table",
    "frechet_distance",
    "fve_mean_sq",
    "fve_mean_sq_sum",
    "ldd",
    "ldtw",
    "ldtw_sequence",
    "lve",
    "lve_l2",
    "lve_l2_sum",
    "lve_sum",
    "mve_max_sq",
    "mve_max_sq_sum",
    "mve_mean_l2",
    "mve_mean_l2_sum",
    "pool",
    "pose_std",
    "retrieval_accuracy",
    "retrieval_accuracy_from_similarity",
    "sample_diversity",
    "sampled_similarity",
    "scale_of",
    "scs",
    "score_sequence",
    "score_sequences",
    "speaker_retrieval_accuracy",
]

# --------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------

#: Metrics averaged over frames pooled across all sequences (§2, §4, §11.2).
POOLED_METRICS: tuple[str, ...] = ("lve", "lve_l2", "mve_max_sq", "mve_mean_l2", "fve_mean_sq")
#: Metrics computed once per sequence and averaged over sequences (§3, §7.2, §7.3).
AVERAGED_METRICS: tuple[str, ...] = ("fdd", "fdd_abs", "ldd", "ldtw")
METRIC_NAMES: tuple[str, ...] = POOLED_METRICS + AVERAGED_METRICS
#: What ``evaluate_sequences`` and ``talkmesh metrics`` compute unless told otherwise.
DEFAULT_METRICS: tuple[str, ...] = ("lve", "lve_l2", "fdd", "mve_max_sq", "mve_mean_l2", "fve_mean_sq", "ldd")
_ALIASES = {"lve_codetalker": "lve", "fdd_signed": "fdd"}

#: Published scale per dataset (``corpus.info.format``) and metric (§5): published value =
#: native value / scale. Metrics without a published scale are printed native only.
SCALES: dict[str, dict[str, float]] = {
    "biwi": {"lve": 1e-4, "fdd": 1e-5},
    "vocaset": {"lve": 1e-5},
    "hdtf": {"fve_mean_sq": 1e-6, "lve": 1e-5, "ldtw": 1e-4, "ldd": 1e-5},
}

_LENGTH_TOLERANCE = 2  # frames (§1)
_BLOCK_ELEMENTS = 1 << 22  # float64 elements per frame block (32 MiB) in the per-frame loops


class LengthMismatchWarning(UserWarning):
    """A prediction and its ground truth differ by more than 2 frames (metrics.md §1)."""


def canonical_name(name: str) -> str:
    """The stable name for ``name`` (``lve_codetalker`` -> ``lve``); unknown names are errors."""
    name = _ALIASES.get(name, name)
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; known: {list(METRIC_NAMES)} (aliases {sorted(_ALIASES)})")
    return name


def _canonical_list(metrics: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for m in metrics:
        c = canonical_name(m)
        if c not in out:
            out.append(c)
    return tuple(out)


# --------------------------------------------------------------------------------------
# Array handling
# --------------------------------------------------------------------------------------


def as_vertices(x: np.ndarray, num_vertices: int | None = None, name: str = "motion") -> np.ndarray:
    """(T, V, 3) view of ``x`` given as (T, V, 3) or (T, V*3); checks V when given."""
    x = np.asarray(x)
    if x.ndim == 2:
        if x.shape[1] % 3:
            raise ValueError(f"{name}: shape {x.shape} is not (T, V*3): {x.shape[1]} is not a multiple of 3")
        x = x.reshape(x.shape[0], x.shape[1] // 3, 3)
    elif x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"{name}: expected (T, V, 3) or (T, V*3), got shape {x.shape}")
    if num_vertices is not None and x.shape[1] != num_vertices:
        raise ValueError(f"{name}: expected {num_vertices} vertices per frame, got {x.shape[1]}")
    return x


def as_template(m: np.ndarray, num_vertices: int | None = None, name: str = "template") -> np.ndarray:
    """(V, 3) template from (V, 3) or (V*3,)."""
    m = np.asarray(m)
    if m.ndim == 1:
        if m.shape[0] % 3:
            raise ValueError(f"{name}: shape {m.shape} is not (V*3,)")
        m = m.reshape(-1, 3)
    elif m.ndim != 2 or m.shape[1] != 3:
        raise ValueError(f"{name}: expected (V, 3) or (V*3,), got shape {m.shape}")
    if num_vertices is not None and m.shape[0] != num_vertices:
        raise ValueError(f"{name}: expected {num_vertices} vertices, got {m.shape[0]}")
    return m


def align_pair(pred: np.ndarray, gt: np.ndarray, name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Both as (T, V, 3), truncated to the shorter length (§1). Warns when the lengths differ
    by more than 2 frames; vertex counts must agree."""
    label = name or "sequence"
    p = as_vertices(pred, name=f"{label} prediction")
    g = as_vertices(gt, name=f"{label} ground truth")
    if p.shape[1] != g.shape[1]:
        raise ValueError(f"{label}: prediction has {p.shape[1]} vertices, ground truth {g.shape[1]}")
    t = min(p.shape[0], g.shape[0])
    if t == 0:
        raise ValueError(f"{label}: empty sequence (prediction {p.shape[0]} frames, ground truth {g.shape[0]})")
    if abs(p.shape[0] - g.shape[0]) > _LENGTH_TOLERANCE:
        warnings.warn(
            f"{label}: prediction has {p.shape[0]} frames, ground truth {g.shape[0]}; both truncated to {t}",
            LengthMismatchWarning,
            stacklevel=3,
        )
    return p[:t], g[:t]


def _region(idx: np.ndarray | Sequence[int], num_vertices: int, what: str) -> np.ndarray:
    """Sorted unique int64 indices within [0, V) (§11.3: duplicates removed)."""
    r = np.unique(np.asarray(idx, dtype=np.int64).ravel())
    if r.size == 0:
        raise ValueError(f"{what} region is empty")
    if r[0] < 0 or r[-1] >= num_vertices:
        raise ValueError(f"{what} region indices {r[0]}..{r[-1]} out of range for {num_vertices} vertices")
    return r


def _as_list(xs: Sequence[np.ndarray] | np.ndarray) -> list[np.ndarray]:
    """A list of sequences. A bare array is one sequence when it is (T, V*3) or (T, V, 3),
    and a stack of sequences when it is (N, T, V, 3) or (N, T, V*3) with V*3 != 3."""
    if isinstance(xs, np.ndarray):
        if xs.ndim == 2 or (xs.ndim == 3 and xs.shape[-1] == 3):
            return [xs]
        if xs.ndim in (3, 4):
            return list(xs)
        raise ValueError(f"cannot read motion of shape {xs.shape} as sequences")
    return list(xs)


def _templates_list(templates: Sequence[np.ndarray] | np.ndarray, n: int) -> list[np.ndarray]:
    """One template per sequence; a single (V, 3) or (V*3,) array is shared by all."""
    if isinstance(templates, np.ndarray):
        if templates.ndim == 1 or (templates.ndim == 2 and templates.shape[1] == 3):
            return [templates] * n
        out = list(templates)  # (N, V, 3) or (N, V*3)
    else:
        out = list(templates)
    if len(out) != n:
        raise ValueError(f"got {len(out)} templates for {n} sequences")
    return out


def _check_pairs(preds: list[np.ndarray], gts: list[np.ndarray]) -> None:
    if len(preds) != len(gts):
        raise ValueError(f"got {len(preds)} predictions for {len(gts)} ground-truth sequences")
    if not preds:
        raise ValueError("no sequences to evaluate")


def _blocks(t: int, num_vertices: int) -> Iterable[slice]:
    step = max(1, _BLOCK_ELEMENTS // max(1, num_vertices * 3))
    for s in range(0, t, step):
        yield slice(s, min(t, s + step))


def _sq_errors(p: np.ndarray, g: np.ndarray) -> np.ndarray:
    """(T', V') squared L2 distance per frame and vertex, float64."""
    d = p.astype(np.float64) - g.astype(np.float64)  # (T', V', 3)
    return np.einsum("tvc,tvc->tv", d, d)


# --------------------------------------------------------------------------------------
# Pooled-frame family (§2, §4)
# --------------------------------------------------------------------------------------


def _frame_sum(
    pred: np.ndarray,
    gt: np.ndarray,
    region: np.ndarray | Sequence[int] | None,
    reduce: Literal["max", "mean"],
    rooted: bool,
    name: str,
) -> tuple[float, int]:
    p, g = align_pair(pred, gt, name)
    if region is not None:
        idx = _region(region, p.shape[1], "lip")
        p, g = p[:, idx], g[:, idx]
    total = 0.0
    for sl in _blocks(p.shape[0], p.shape[1]):
        sq = _sq_errors(p[sl], g[sl])  # (b, V')
        if reduce == "max":
            e = sq.max(axis=1)
            total += float(np.sqrt(e).sum() if rooted else e.sum())
        else:
            e = np.sqrt(sq) if rooted else sq
            total += float(e.mean(axis=1).sum())
    return total, int(p.shape[0])


def lve_sum(pred: np.ndarray, gt: np.ndarray, lips: np.ndarray, name: str = "") -> tuple[float, int]:
    """(sum over frames of max_{v in L} ||pred - gt||^2, frames) for one sequence (§2.1)."""
    return _frame_sum(pred, gt, lips, "max", False, name)


def lve_l2_sum(pred: np.ndarray, gt: np.ndarray, lips: np.ndarray, name: str = "") -> tuple[float, int]:
    """(sum over frames of max_{v in L} ||pred - gt||, frames) for one sequence (§2.2)."""
    return _frame_sum(pred, gt, lips, "max", True, name)


def mve_max_sq_sum(pred: np.ndarray, gt: np.ndarray, name: str = "") -> tuple[float, int]:
    """(sum over frames of max_{v in A} ||pred - gt||^2, frames) (§4)."""
    return _frame_sum(pred, gt, None, "max", False, name)


def mve_mean_l2_sum(pred: np.ndarray, gt: np.ndarray, name: str = "") -> tuple[float, int]:
    """(sum over frames of mean_{v in A} ||pred - gt||, frames) (§4)."""
    return _frame_sum(pred, gt, None, "mean", True, name)


def fve_mean_sq_sum(pred: np.ndarray, gt: np.ndarray, name: str = "") -> tuple[float, int]:
    """(sum over frames of mean_{v in A} ||pred - gt||^2, frames) (§4, §7.1)."""
    return _frame_sum(pred, gt, None, "mean", False, name)


def pool(parts: Iterable[tuple[float, int]]) -> float:
    """Pooled-frame mean from per-sequence ``(sum, frames)`` pairs: sum(sums) / sum(frames)."""
    total, frames = 0.0, 0
    for s, n in parts:
        total += float(s)
        frames += int(n)
    if frames == 0:
        raise ValueError("no frames to pool")
    return total / frames


def lve(preds: Sequence[np.ndarray] | np.ndarray, gts: Sequence[np.ndarray] | np.ndarray, lips: np.ndarray) -> float:
    """``lve`` (= ``lve_codetalker``, §2.1): squared max lip error, mean over pooled frames.

    preds, gts: sequences of (T_n, V, 3) or (T_n, V*3); lips: (L,) vertex indices.
    """
    p, g = _as_list(preds), _as_list(gts)
    _check_pairs(p, g)
    return pool(lve_sum(a, b, lips, f"sequence {i}") for i, (a, b) in enumerate(zip(p, g, strict=True)))


def lve_l2(preds: Sequence[np.ndarray] | np.ndarray, gts: Sequence[np.ndarray] | np.ndarray, lips: np.ndarray) -> float:
    """``lve_l2`` (§2.2): rooted max lip error, mean over pooled frames (not sqrt(lve))."""
    p, g = _as_list(preds), _as_list(gts)
    _check_pairs(p, g)
    return pool(lve_l2_sum(a, b, lips, f"sequence {i}") for i, (a, b) in enumerate(zip(p, g, strict=True)))


def mve_max_sq(preds: Sequence[np.ndarray] | np.ndarray, gts: Sequence[np.ndarray] | np.ndarray) -> float:
    """``mve_max_sq`` (§4): squared max error over all vertices, mean over pooled frames."""
    p, g = _as_list(preds), _as_list(gts)
    _check_pairs(p, g)
    return pool(mve_max_sq_sum(a, b, f"sequence {i}") for i, (a, b) in enumerate(zip(p, g, strict=True)))


def mve_mean_l2(preds: Sequence[np.ndarray] | np.ndarray, gts: Sequence[np.ndarray] | np.ndarray) -> float:
    """``mve_mean_l2`` (§4): L2 error averaged over vertices and pooled frames."""
    p, g = _as_list(preds), _as_list(gts)
    _check_pairs(p, g)
    return pool(mve_mean_l2_sum(a, b, f"sequence {i}") for i, (a, b) in enumerate(zip(p, g, strict=True)))


def fve_mean_sq(preds: Sequence[np.ndarray] | np.ndarray, gts: Sequence[np.ndarray] | np.ndarray) -> float:
    """``fve_mean_sq`` (§4, Mimic's FVE §7.1): squared error averaged over vertices and pooled frames."""
    p, g = _as_list(preds), _as_list(gts)
    _check_pairs(p, g)
    return pool(fve_mean_sq_sum(a, b, f"sequence {i}") for i, (a, b) in enumerate(zip(p, g, strict=True)))


# --------------------------------------------------------------------------------------
# Dynamics-deviation family (§3, §7.2)
# --------------------------------------------------------------------------------------


def dynamics(motion: np.ndarray, template: np.ndarray, region: np.ndarray) -> float:
    """dyn = mean over v in region of the population std over t of ||x_t,v - M_v||^2 (§3.1).

    motion: (T, V, 3) or (T, V*3); template: (V, 3) or (V*3,); region: vertex indices.
    """
    x = as_vertices(motion)
    m = as_template(template, x.shape[1])
    idx = _region(region, x.shape[1], "dynamics")
    d = x[:, idx].astype(np.float64) - m[idx].astype(np.float64)  # (T, R, 3)
    disp = np.einsum("tvc,tvc->tv", d, d)  # (T, R) squared displacement from the template
    return float(disp.std(axis=0, ddof=0).mean())  # population std (§11.1)


def fdd_sequence(pred: np.ndarray, gt: np.ndarray, template: np.ndarray, region: np.ndarray, name: str = "") -> float:
    """Signed dyn^GT - dyn^pred of one sequence after length alignment (§3.1)."""
    p, g = align_pair(pred, gt, name)
    return dynamics(g, template, region) - dynamics(p, template, region)


def _fdd_family(
    preds: Sequence[np.ndarray] | np.ndarray,
    gts: Sequence[np.ndarray] | np.ndarray,
    templates: Sequence[np.ndarray] | np.ndarray,
    region: np.ndarray,
    absolute: bool,
) -> float:
    p, g = _as_list(preds), _as_list(gts)
    _check_pairs(p, g)
    ms = _templates_list(templates, len(p))
    vals = [fdd_sequence(a, b, m, region, f"sequence {i}") for i, (a, b, m) in enumerate(zip(p, g, ms, strict=True))]
    return float(np.mean(np.abs(vals) if absolute else vals))


def fdd(
    preds: Sequence[np.ndarray] | np.ndarray,
    gts: Sequence[np.ndarray] | np.ndarray,
    templates: Sequence[np.ndarray] | np.ndarray,
    upper: np.ndarray,
) -> float:
    """``fdd`` (= ``fdd_signed``, §3.1): mean over sequences of dyn^GT - dyn^pred on the upper face.

    Positive = the prediction's upper face moves less than the ground truth. ``templates``
    holds one (V, 3) per sequence, or one array shared by all.
    """
    return _fdd_family(preds, gts, templates, upper, absolute=False)


def fdd_abs(
    preds: Sequence[np.ndarray] | np.ndarray,
    gts: Sequence[np.ndarray] | np.ndarray,
    templates: Sequence[np.ndarray] | np.ndarray,
    upper: np.ndarray,
) -> float:
    """``fdd_abs`` (§3.2): mean over sequences of |dyn^GT - dyn^pred| on the upper face."""
    return _fdd_family(preds, gts, templates, upper, absolute=True)


def ldd(
    preds: Sequence[np.ndarray] | np.ndarray,
    gts: Sequence[np.ndarray] | np.ndarray,
    templates: Sequence[np.ndarray] | np.ndarray,
    lips: np.ndarray,
) -> float:
    """``ldd`` (§7.2, project DECISION): ``fdd_abs`` evaluated on the lip set."""
    return _fdd_family(preds, gts, templates, lips, absolute=True)


# --------------------------------------------------------------------------------------
# LDTW (§7.3)
# --------------------------------------------------------------------------------------


def _cdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(Na, Nb) Euclidean distances between rows, float64. Both sets are centred on their
    joint mean first (distances are translation invariant; it limits cancellation)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    c = np.concatenate([a, b]).mean(axis=0)
    a, b = a - c, b - c
    sq = np.einsum("ij,ij->i", a, a)[:, None] + np.einsum("ij,ij->i", b, b)[None, :] - 2.0 * (a @ b.T)
    return np.sqrt(np.maximum(sq, 0.0))


def dtw(cost: np.ndarray) -> tuple[float, int]:
    """Dynamic time warping over a (N, M) local-cost matrix (§7.3).

    Steps: match (i-1, j-1), insertion (i-1, j), deletion (i, j-1); no band. Returns the
    total cost of the optimal path from (0, 0) to (N-1, M-1) and that path's length in
    cells. Ties prefer match, then insertion, then deletion (this fixes the path length).
    Anti-diagonals are processed as vectors, so the cost is O(N+M) numpy calls.
    """
    c = np.asarray(cost, dtype=np.float64)
    n, m = c.shape
    if n == 0 or m == 0:
        raise ValueError("dtw needs a non-empty cost matrix")
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    length = np.zeros((n + 1, m + 1), dtype=np.int64)
    for k in range(2, n + m + 1):  # k = i + j over 1-based cells
        i = np.arange(max(1, k - m), min(n, k - 1) + 1)
        j = k - i
        cand = np.stack([acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1]])  # (3, cells)
        lens = np.stack([length[i - 1, j - 1], length[i - 1, j], length[i, j - 1]])
        best = np.argmin(cand, axis=0)  # first minimum: match before insertion before deletion
        cols = np.arange(i.size)
        acc[i, j] = c[i - 1, j - 1] + cand[best, cols]
        length[i, j] = lens[best, cols] + 1
    return float(acc[n, m]), int(length[n, m])


def ldtw_sequence(pred: np.ndarray, gt: np.ndarray, lips: np.ndarray, name: str = "") -> float:
    """DTW cost / warping-path length between predicted and ground-truth lip offsets (§7.3).

    Frame feature: the 3|L| lip offsets x - M. Both sequences share the subject's template,
    so it cancels in every local cost ||(x^_i - M) - (x_j - M)|| = ||x^_i - x_j|| and is not
    needed. The pair is length-aligned like every other metric (§1).
    """
    p, g = align_pair(pred, gt, name)
    idx = _region(lips, p.shape[1], "lip")
    fp = p[:, idx].reshape(p.shape[0], -1)  # (T, 3L)
    fg = g[:, idx].reshape(g.shape[0], -1)
    cost = _cdist(fp, fg)  # (T, T)
    diag = np.arange(min(cost.shape))
    dd = fp[diag].astype(np.float64) - fg[diag].astype(np.float64)
    cost[diag, diag] = np.sqrt(np.einsum("ij,ij->i", dd, dd))  # exact on the diagonal
    total, steps = dtw(cost)
    return total / steps


def ldtw(preds: Sequence[np.ndarray] | np.ndarray, gts: Sequence[np.ndarray] | np.ndarray, lips: np.ndarray) -> float:
    """``ldtw`` (§7.3, project DECISION): per-sequence DTW cost / path length, mean over sequences.

    Not comparable with Mimic's published LDTW (its definition is unknown).
    """
    p, g = _as_list(preds), _as_list(gts)
    _check_pairs(p, g)
    return float(
        np.mean([ldtw_sequence(a, b, lips, f"sequence {i}") for i, (a, b) in enumerate(zip(p, g, strict=True))])
    )


# --------------------------------------------------------------------------------------
# One-pass scoring of sequences and aggregation
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SequenceScore:
    """Metrics of one (prediction, ground truth) pair.

    ``sums[m]`` holds the frame sum of a pooled metric (divide by ``frames`` for this
    sequence's value); ``values[m]`` holds per-sequence metrics (``fdd`` signed, ...).
    """

    name: str
    frames: int  # frames scored (after truncation)
    pred_frames: int
    gt_frames: int
    sums: dict[str, float]
    values: dict[str, float]

    def metric(self, name: str) -> float:
        name = canonical_name(name)
        if name in self.sums:
            return self.sums[name] / self.frames
        return self.values[name]

    def as_dict(self) -> dict[str, float | int | str]:
        """Flat per-sequence breakdown: name, frame counts and every metric's value."""
        out: dict[str, float | int | str] = {
            "name": self.name,
            "frames": self.frames,
            "pred_frames": self.pred_frames,
            "gt_frames": self.gt_frames,
        }
        for m in METRIC_NAMES:
            if m in self.sums or m in self.values:
                out[m] = self.metric(m)
        return out


def score_sequence(
    pred: np.ndarray,
    gt: np.ndarray,
    template: np.ndarray | None = None,
    lips: np.ndarray | None = None,
    upper: np.ndarray | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    name: str = "",
) -> SequenceScore:
    """Every requested metric of one pair in one pass over its frames.

    pred, gt: (T, V, 3) or (T, V*3); template: (V, 3) (needed by fdd/fdd_abs/ldd);
    lips / upper: vertex indices (lips for lve/lve_l2/ldd/ldtw, upper for fdd/fdd_abs).
    """
    wanted = _canonical_list(metrics)
    p, g = align_pair(pred, gt, name)
    nv = p.shape[1]
    label = name or "sequence"
    _check_inputs(wanted, template, lips, upper, label)
    lip_idx = _region(lips, nv, "lip") if lips is not None else None
    m = as_template(template, nv, f"{label} template") if template is not None else None
    return SequenceScore(
        name=name,
        frames=int(p.shape[0]),
        pred_frames=int(np.asarray(pred).shape[0]),
        gt_frames=int(np.asarray(gt).shape[0]),
        sums=_pooled_sums(p, g, lip_idx, wanted),
        values=_sequence_values(p, g, m, lip_idx, upper, wanted, name),
    )


def _check_inputs(
    wanted: tuple[str, ...],
    template: np.ndarray | None,
    lips: np.ndarray | None,
    upper: np.ndarray | None,
    label: str,
) -> None:
    """Raise ValueError when a requested metric lacks the region or template it needs."""
    if lips is None and any(m in wanted for m in ("lve", "lve_l2", "ldd", "ldtw")):
        raise ValueError(f"{label}: metrics {list(wanted)} need the lip region")
    if upper is None and any(m in wanted for m in ("fdd", "fdd_abs")):
        raise ValueError(f"{label}: metrics {list(wanted)} need the upper-face region")
    if template is None and any(m in wanted for m in ("fdd", "fdd_abs", "ldd")):
        raise ValueError(f"{label}: metrics {list(wanted)} need the subject's template")


def _pooled_sums(
    p: np.ndarray, g: np.ndarray, lip_idx: np.ndarray | None, wanted: tuple[str, ...]
) -> dict[str, float]:
    """Per-frame error sums of the pooled metrics in ``wanted`` over aligned (T, V, 3) pairs,
    computed in blocks of frames."""
    sums = {k: 0.0 for k in wanted if k in POOLED_METRICS}
    if not sums:
        return sums
    for sl in _blocks(p.shape[0], p.shape[1]):
        sq = _sq_errors(p[sl], g[sl])  # (b, V)
        if "lve" in sums or "lve_l2" in sums:
            lip_max = sq[:, lip_idx].max(axis=1)  # (b,)
            if "lve" in sums:
                sums["lve"] += float(lip_max.sum())
            if "lve_l2" in sums:
                sums["lve_l2"] += float(np.sqrt(lip_max).sum())
        if "mve_max_sq" in sums:
            sums["mve_max_sq"] += float(sq.max(axis=1).sum())
        if "mve_mean_l2" in sums:
            sums["mve_mean_l2"] += float(np.sqrt(sq).mean(axis=1).sum())
        if "fve_mean_sq" in sums:
            sums["fve_mean_sq"] += float(sq.mean(axis=1).sum())
    return sums


def _sequence_values(
    p: np.ndarray,
    g: np.ndarray,
    m: np.ndarray | None,
    lip_idx: np.ndarray | None,
    upper: np.ndarray | None,
    wanted: tuple[str, ...],
    name: str,
) -> dict[str, float]:
    """The per-sequence metrics in ``wanted`` (fdd, fdd_abs, ldd, ldtw) of an aligned pair."""
    values: dict[str, float] = {}
    if "fdd" in wanted or "fdd_abs" in wanted:
        signed = dynamics(g, m, upper) - dynamics(p, m, upper)
        if "fdd" in wanted:
            values["fdd"] = signed
        if "fdd_abs" in wanted:
            values["fdd_abs"] = abs(signed)
    if "ldd" in wanted:
        values["ldd"] = abs(dynamics(g, m, lip_idx) - dynamics(p, m, lip_idx))
    if "ldtw" in wanted:
        values["ldtw"] = ldtw_sequence(p, g, lip_idx, name)
    return values


def score_sequences(
    preds: Sequence[np.ndarray] | np.ndarray,
    gts: Sequence[np.ndarray] | np.ndarray,
    templates: Sequence[np.ndarray] | np.ndarray | None = None,
    lips: np.ndarray | None = None,
    upper: np.ndarray | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    names: Sequence[str] | None = None,
) -> list[SequenceScore]:
    """:func:`score_sequence` over aligned lists of predictions and ground truths."""
    p, g = _as_list(preds), _as_list(gts)
    _check_pairs(p, g)
    ms: list[np.ndarray | None] = [None] * len(p) if templates is None else list(_templates_list(templates, len(p)))
    labels = list(names) if names is not None else [f"sequence {i}" for i in range(len(p))]
    if len(labels) != len(p):
        raise ValueError(f"got {len(labels)} names for {len(p)} sequences")
    return [score_sequence(a, b, m, lips, upper, metrics, n) for a, b, m, n in zip(p, g, ms, labels, strict=True)]


def aggregate(scores: Iterable[SequenceScore]) -> dict[str, float]:
    """Corpus-level metrics: pooled frames for the LVE/MVE/FVE family, the mean over
    sequences for the FDD/LDD/LDTW family (§11.2). Only metrics every score holds."""
    scores = list(scores)
    if not scores:
        raise ValueError("no sequence scores to aggregate")
    frames = sum(s.frames for s in scores)
    out: dict[str, float] = {}
    for m in METRIC_NAMES:
        if all(m in s.sums for s in scores):
            out[m] = sum(s.sums[m] for s in scores) / frames
        elif all(m in s.values for s in scores):
            out[m] = float(np.mean([s.values[m] for s in scores]))
    return out


class Evaluation(dict[str, float]):
    """Corpus-level metrics (a plain ``dict[str, float]``) that also carries the
    per-sequence breakdown in ``.per_sequence`` and the raw ``.scores``."""

    def __init__(self, metrics: Mapping[str, float], scores: Sequence[SequenceScore]) -> None:
        super().__init__(metrics)
        self.scores: list[SequenceScore] = list(scores)
        self.per_sequence: list[dict[str, float | int | str]] = [s.as_dict() for s in self.scores]
        self.frames: int = sum(s.frames for s in self.scores)


def evaluate_sequences(
    preds: Sequence[np.ndarray] | np.ndarray,
    gts: Sequence[np.ndarray] | np.ndarray,
    templates: Sequence[np.ndarray] | np.ndarray | None,
    lips: np.ndarray,
    upper: np.ndarray,
    metrics: Sequence[str] = DEFAULT_METRICS,
    names: Sequence[str] | None = None,
) -> Evaluation:
    """The default metric set {lve, lve_l2, fdd, mve_max_sq, mve_mean_l2, fve_mean_sq, ldd}
    (or ``metrics``) over a list of sequences.

    preds, gts: sequences of (T_n, V, 3) or (T_n, V*3); templates: one (V, 3) per sequence
    or one shared array. Returns a ``dict[str, float]`` of native values; its
    ``.per_sequence`` attribute lists each sequence's values.
    """
    scores = score_sequences(preds, gts, templates, lips, upper, metrics, names)
    return Evaluation(aggregate(scores), scores)


# --------------------------------------------------------------------------------------
# Unseen-subject condition protocol (§6.1)
# --------------------------------------------------------------------------------------


def aggregate_conditions(scores: Mapping[tuple[str, str], SequenceScore]) -> dict[str, object]:
    """Aggregate scores keyed by (sequence, condition) per §6.1.

    Returns ``metrics`` (pooled frames of all pairs for LVE-type metrics, mean over all
    pairs for FDD-type metrics), ``per_condition`` (the same aggregation within each
    condition, plus its ``sequences`` and ``frames``), ``min`` / ``max`` over conditions of
    each metric with ``argmin`` / ``argmax`` naming the condition, ``conditions`` (sorted)
    and the counts ``pairs``, ``sequences``, ``frames``.
    """
    if not scores:
        raise ValueError("no (sequence, condition) scores to aggregate")
    by_cond: dict[str, list[SequenceScore]] = {}
    for (_, cond), s in sorted(scores.items()):
        by_cond.setdefault(cond, []).append(s)
    per_condition: dict[str, dict[str, float]] = {}
    for cond, ss in by_cond.items():
        agg = aggregate(ss)
        per_condition[cond] = {**agg, "sequences": len(ss), "frames": sum(s.frames for s in ss)}
    overall = aggregate(scores.values())
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    argmin: dict[str, str] = {}
    argmax: dict[str, str] = {}
    for m in overall:
        vals = {c: per_condition[c][m] for c in per_condition}
        argmin[m] = min(vals, key=lambda c: vals[c])
        argmax[m] = max(vals, key=lambda c: vals[c])
        lo[m], hi[m] = vals[argmin[m]], vals[argmax[m]]
    return {
        "metrics": overall,
        "per_condition": per_condition,
        "min": lo,
        "max": hi,
        "argmin": argmin,
        "argmax": argmax,
        "conditions": sorted(by_cond),
        "pairs": len(scores),
        "sequences": len({seq for seq, _ in scores}),
        "frames": sum(s.frames for s in scores.values()),
    }


def evaluate_conditions(
    preds: Mapping[tuple[str, str], np.ndarray],
    gts: Mapping[str, np.ndarray],
    templates: Mapping[str, np.ndarray] | np.ndarray | None,
    lips: np.ndarray,
    upper: np.ndarray,
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> dict[str, object]:
    """Score predictions keyed by (sequence, condition) against ``gts[sequence]`` and
    aggregate them with :func:`aggregate_conditions` (§6.1). ``templates`` maps sequence
    names to (V, 3) templates, or is one shared array."""
    scores: dict[tuple[str, str], SequenceScore] = {}
    for (seq, cond), pred in preds.items():
        if seq not in gts:
            raise KeyError(f"prediction for ({seq!r}, {cond!r}) has no ground truth")
        if templates is None or isinstance(templates, np.ndarray):
            m = templates
        else:
            m = templates[seq]
        scores[(seq, cond)] = score_sequence(pred, gts[seq], m, lips, upper, metrics, f"{seq} [{cond}]")
    return aggregate_conditions(scores)


# --------------------------------------------------------------------------------------
# Diversity and pose (§8)
# --------------------------------------------------------------------------------------


def diversity_of_set(features: np.ndarray) -> float:
    """Div(F) = sum_{i != j} ||f_i - f_j|| / (n (n - 1)) over the n rows of (n, D) ``features`` (§8.1)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim == 1:
        f = f[:, None]
    n = f.shape[0]
    if n < 2:
        raise ValueError(f"diversity needs at least 2 feature vectors, got {n}")
    total = 0.0
    step = max(1, _BLOCK_ELEMENTS // max(1, n))
    for s in range(0, n, step):
        d = _cdist(f[s : s + step], f)  # (b, n)
        d[np.arange(d.shape[0]), np.arange(s, s + d.shape[0])] = 0.0  # i == j exactly 0
        total += float(d.sum())
    return total / (n * (n - 1))


def diversity(
    features: Sequence[np.ndarray] | np.ndarray,
    mean: np.ndarray | None = None,
    std: np.ndarray | None = None,
) -> float:
    """``diversity`` (§8.1, DECISION): Div over each sequence's frames, averaged over sequences.

    features: sequences of (T_n, D) frame features: 53-d expression+jaw (pass the training
    ``mean``/``std`` to z-normalise) or 3-d axis-angle head rotation in radians. Report it
    next to the ground truth's value.
    """
    seqs = [features] if isinstance(features, np.ndarray) and features.ndim == 2 else list(features)
    if not seqs:
        raise ValueError("no sequences")
    vals = []
    for f in seqs:
        f = np.asarray(f, dtype=np.float64)
        if mean is not None:
            f = f - np.asarray(mean, dtype=np.float64)
        if std is not None:
            f = f / np.asarray(std, dtype=np.float64)
        vals.append(diversity_of_set(f))
    return float(np.mean(vals))


def pose_std(poses: Sequence[np.ndarray] | np.ndarray) -> float:
    """``pose_std`` (AdaMesh "lsd", §8.2): pool all frames of all sequences, population std
    of each of the 3 rotation dimensions, mean over the dimensions.

    poses: sequences of (T_n, 3) axis-angle rotations (one (T, 3) array = one sequence).
    """
    seqs = [poses] if isinstance(poses, np.ndarray) and poses.ndim == 2 else list(poses)
    if not seqs:
        raise ValueError("no sequences")
    x = np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1, 3) for p in seqs])  # (sum T, 3)
    x = x - x[0]  # std is shift invariant; constant rotations then give exactly 0
    return float(x.std(axis=0, ddof=0).mean())


def sample_diversity(samples: Sequence[np.ndarray], space: Literal["vertices", "params"]) -> float:
    """``sample_diversity`` (§8.3, DECISION): for each input, K samples y_1..y_K of one
    length T; value = 2/(K(K-1)) sum_{i<j} (1/T) sum_t dist(y_i,t, y_j,t), averaged over inputs.

    space ``"vertices"``: each input is (K, T, V, 3) or (K, T, V*3) and dist is the L2 norm
    per vertex averaged over vertices. ``"params"``: each input is (K, T, D) (FLAME-53) and
    dist is the L2 norm of the parameter difference. Report it with the space named.
    """
    if space not in ("vertices", "params"):
        raise ValueError(f"space must be 'vertices' or 'params', got {space!r}")
    vals = []
    for n, y in enumerate(samples):
        y = np.asarray(y, dtype=np.float64)
        if space == "vertices":
            if y.ndim == 3:
                if y.shape[2] % 3:
                    raise ValueError(f"input {n}: shape {y.shape} is not (K, T, V*3)")
                y = y.reshape(y.shape[0], y.shape[1], -1, 3)
            if y.ndim != 4 or y.shape[3] != 3:
                raise ValueError(f"input {n}: expected (K, T, V, 3) or (K, T, V*3), got {y.shape}")
        elif y.ndim != 3:
            raise ValueError(f"input {n}: expected (K, T, D), got {y.shape}")
        k = y.shape[0]
        if k < 2:
            raise ValueError(f"input {n}: sample diversity needs K >= 2 samples, got {k}")
        pair_vals = []
        for i in range(k):
            for j in range(i + 1, k):
                dist = np.linalg.norm(y[i] - y[j], axis=-1)  # (T, V) or (T,)
                pair_vals.append(float(dist.mean()))  # mean over vertices and frames
        vals.append(2.0 * sum(pair_vals) / (k * (k - 1)))
    if not vals:
        raise ValueError("no inputs")
    return float(np.mean(vals))


# --------------------------------------------------------------------------------------
# DEE cross-modal retrieval (§9)
# --------------------------------------------------------------------------------------


def csd_similarity(mu_e: np.ndarray, var_e: np.ndarray, mu_a: np.ndarray, var_a: np.ndarray) -> np.ndarray:
    """(N_e, N_a) CSD similarity s_ij = -(2 - 2 mu_e,i . mu_a,j + sum_k var_e,i,k + sum_k var_a,j,k) (§9).

    mu_*: (N, D) unit-norm means; var_*: (N, D) variances.
    """
    me, ve = np.asarray(mu_e, dtype=np.float64), np.asarray(var_e, dtype=np.float64)
    ma, va = np.asarray(mu_a, dtype=np.float64), np.asarray(var_a, dtype=np.float64)
    return -(2.0 - 2.0 * (me @ ma.T) + ve.sum(axis=1)[:, None] + va.sum(axis=1)[None, :])


def sampled_similarity(
    mu_e: np.ndarray,
    var_e: np.ndarray,
    mu_a: np.ndarray,
    var_a: np.ndarray,
    alpha: float,
    beta: float,
    num_samples: int = 8,
    seed: int = 0,
) -> np.ndarray:
    """(N_e, N_a) sampled similarity: sum over num_samples^2 pairs z_e ~ N(mu_e, var_e),
    z_a ~ N(mu_a, var_a) of sigmoid(2 (-alpha ||z_e - z_a|| + beta)) (§9), seeded."""
    rng = np.random.default_rng(seed)
    me, ve = np.asarray(mu_e, dtype=np.float64), np.asarray(var_e, dtype=np.float64)
    ma, va = np.asarray(mu_a, dtype=np.float64), np.asarray(var_a, dtype=np.float64)
    ze = me[:, None] + np.sqrt(ve)[:, None] * rng.standard_normal((me.shape[0], num_samples, me.shape[1]))
    za = ma[:, None] + np.sqrt(va)[:, None] * rng.standard_normal((ma.shape[0], num_samples, ma.shape[1]))
    d = _cdist(ze.reshape(-1, me.shape[1]), za.reshape(-1, ma.shape[1]))  # (Ne*S, Na*S)
    s = 1.0 / (1.0 + np.exp(-2.0 * (-alpha * d + beta)))
    return s.reshape(me.shape[0], num_samples, ma.shape[0], num_samples).sum(axis=(1, 3))


def retrieval_accuracy_from_similarity(sim: np.ndarray, labels: np.ndarray | Sequence[int]) -> dict[str, float]:
    """Cross-modal retrieval accuracy from a (N, N) similarity ``sim[i, j]`` between
    expression i and audio j (§9).

    Expression -> audio: query i retrieves j* = argmax_j sim[i, j]; audio -> expression:
    query j retrieves i* = argmax_i sim[i, j]. A query is correct when the retrieved clip
    has the same emotion label. Ties go to the **lowest index**. Returns both directions,
    their ``mean`` and the ``chance`` level sum_c p_c^2.
    """
    s = np.asarray(sim, dtype=np.float64)
    y = np.asarray(labels).ravel()
    if s.ndim != 2 or s.shape != (y.size, y.size):
        raise ValueError(f"similarity must be ({y.size}, {y.size}) for {y.size} labels, got {s.shape}")
    e2a = float(np.mean(y[np.argmax(s, axis=1)] == y))  # np.argmax returns the first maximum
    a2e = float(np.mean(y[np.argmax(s, axis=0)] == y))
    _, counts = np.unique(y, return_counts=True)
    p = counts / counts.sum()
    return {"expr_to_audio": e2a, "audio_to_expr": a2e, "mean": (e2a + a2e) / 2.0, "chance": float((p**2).sum())}


def retrieval_accuracy(
    mu_e: np.ndarray,
    var_e: np.ndarray,
    mu_a: np.ndarray,
    var_a: np.ndarray,
    labels: np.ndarray | Sequence[int],
) -> dict[str, float]:
    """DEE retrieval accuracy with the CSD similarity (§9); see
    :func:`retrieval_accuracy_from_similarity` for the keys and the tie rule.

    mu_e, var_e: (N, D) expression embeddings; mu_a, var_a: (N, D) audio embeddings of the
    same N clips; labels: (N,) emotion labels.
    """
    return retrieval_accuracy_from_similarity(csd_similarity(mu_e, var_e, mu_a, var_a), labels)


# --------------------------------------------------------------------------------------
# Style consistency (§7.4, project DECISION)
# --------------------------------------------------------------------------------------


def _embeddings(x: np.ndarray, what: str) -> np.ndarray:
    e = np.asarray(x, dtype=np.float64)
    if e.ndim != 2 or e.shape[0] < 1 or e.shape[1] < 1:
        raise ValueError(f"{what} must be (N >= 1, D) embeddings, got shape {e.shape}")
    if not np.isfinite(e).all():
        raise ValueError(f"{what} hold non-finite values")
    return e


def _unit_rows(e: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), eps)


def scs(generated: np.ndarray, reference: np.ndarray) -> float:
    """``scs`` (style cosine similarity, §7.4, project DECISION): the mean over sequences
    of cos(f(m_gen_i), f(m_ref_i)).

    generated, reference: (N, D) embeddings of the N generated sequences and of the
    style reference each was conditioned on (row i with row i), taken from a separately
    trained speaker-identity network over vertex offsets (``talkmesh.eval.speaker_id``; never
    the evaluated method's own style encoder). A zero vector has cosine 0 with anything.
    Higher is better; the range is [-1, 1].
    """
    g = _embeddings(generated, "generated embeddings")
    r = _embeddings(reference, "reference embeddings")
    if g.shape != r.shape:
        raise ValueError(f"generated {g.shape} and reference {r.shape} embeddings must pair up row by row")
    return float(np.mean(np.sum(_unit_rows(g) * _unit_rows(r), axis=1)))


def speaker_retrieval_accuracy(
    generated: np.ndarray,
    generated_labels: np.ndarray | Sequence[str] | Sequence[int],
    gallery: np.ndarray,
    gallery_labels: np.ndarray | Sequence[str] | Sequence[int],
) -> dict[str, float]:
    """``speaker_acc`` (project DECISION): does generated motion look like its own speaker?

    Each generated sequence i (embedding (D,), speaker ``generated_labels[i]``) retrieves
    the gallery embedding with the highest cosine similarity (ties go to the **lowest
    index**); it is correct when that gallery item has the same speaker label. The gallery
    is the style-reference embeddings (usually one per speaker). Returns ``accuracy`` and
    ``chance`` = mean_i (gallery items of speaker i) / (gallery size), the accuracy of a
    uniformly random pick.
    """
    g = _embeddings(generated, "generated embeddings")
    r = _embeddings(gallery, "gallery embeddings")
    if g.shape[1] != r.shape[1]:
        raise ValueError(f"generated ({g.shape[1]}-d) and gallery ({r.shape[1]}-d) embeddings differ in size")
    yg, yr = np.asarray(generated_labels).ravel(), np.asarray(gallery_labels).ravel()
    if yg.size != g.shape[0] or yr.size != r.shape[0]:
        raise ValueError(
            f"labels do not match the embeddings: {yg.size} labels for {g.shape[0]} generated, "
            f"{yr.size} for {r.shape[0]} gallery"
        )
    sim = _unit_rows(g) @ _unit_rows(r).T  # (N, M)
    hit = yr[np.argmax(sim, axis=1)] == yg  # np.argmax returns the first maximum
    chance = np.mean([(yr == y).sum() / yr.size for y in yg])
    return {"accuracy": float(hit.mean()), "chance": float(chance)}


# --------------------------------------------------------------------------------------
# Published scales and report tables (§5)
# --------------------------------------------------------------------------------------


def scale_of(dataset: str | None, metric: str) -> float | None:
    """The published scale of ``metric`` on ``dataset`` (``SCALES``), or None."""
    if not dataset:
        return None
    return SCALES.get(dataset, {}).get(_ALIASES.get(metric, metric))


def _fmt_scale(scale: float) -> str:
    exp = math.log10(scale)
    return f"x1e{round(exp):d}" if abs(exp - round(exp)) < 1e-9 else f"x{scale:g}"


def format_table(
    rows: Mapping[str, Mapping[str, float]],
    dataset: str | None = None,
    metrics: Sequence[str] | None = None,
    label: str = "",
) -> str:
    """A plain-text table: one line per row label, one column per metric with its native
    value and, where ``dataset`` has a published scale (``SCALES``, §5), a second column
    with value / scale whose header names the scale, e.g. ``lve (x1e-4)``.
    """
    names = list(metrics) if metrics is not None else [m for m in METRIC_NAMES if any(m in r for r in rows.values())]
    header = [label]
    cols: list[tuple[str, float | None]] = []
    for m in names:
        header.append(m)
        cols.append((m, None))
        sc = scale_of(dataset, m)
        if sc is not None:
            header.append(f"{m} ({_fmt_scale(sc)})")
            cols.append((m, sc))
    body = []
    for row_label, vals in rows.items():
        line = [row_label]
        for m, sc in cols:
            v = vals.get(m)
            if v is None or not isinstance(v, (int, float)):
                line.append("-")
            elif sc is None:
                line.append(f"{v:.4e}")
            else:
                line.append(f"{v / sc:.4f}")
        body.append(line)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def render(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    lines = [render(header), "  ".join("-" * w for w in widths)]
    lines += [render(r) for r in body]
    return "\n".join(line.rstrip() for line in lines)


# --------------------------------------------------------------------------------------
# DEEPTalk emotion proxies (§9, §10)
# --------------------------------------------------------------------------------------


def emotion_accuracy(clip_logits: np.ndarray, labels: np.ndarray | Sequence[int]) -> float:
    """``emo_acc`` (§10, project proxy): the fraction of clips whose argmax clip logit equals
    the label (ties go to the lowest class index).

    clip_logits: (N, K) per-clip logits of the project's expression-emotion MLP; the caller
    forms each clip logit as the **mean of its frame logits** (§10). labels: (N,) class
    indices in [0, K), scored against the driving audio's emotion (or the emotion source's,
    when the emotion comes from another clip).
    """
    z = np.asarray(clip_logits, dtype=np.float64)
    y = np.asarray(labels).ravel()
    if z.ndim != 2 or z.shape[0] != y.size or y.size == 0:
        raise ValueError(f"clip_logits must be (N, K) with N = {y.size} labels (N >= 1), got {z.shape}")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"labels must lie in [0, {z.shape[1]}), got range [{y.min()}, {y.max()}]")
    return float(np.mean(np.argmax(z, axis=1) == y))


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to the rows of x (N, D) and y (M, D):
    ||m_x - m_y||^2 + tr(S_x + S_y - 2 (S_x S_y)^(1/2)), sample covariances (ddof 1).

    Used for ``emo_fd_dee`` (§10: DEE expression-mean embeddings of generated against
    ground-truth clips). The matrix square root is ``scipy.linalg.sqrtm``; its imaginary part
    (numerical noise) is dropped, and a singular product gets 1e-6 added to both diagonals.
    Values within rounding of 0 are returned as 0.
    """
    from scipy import linalg

    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"x and y must be (N, D) and (M, D) with the same D, got {a.shape} and {b.shape}")
    if min(a.shape[0], b.shape[0]) < 2:
        raise ValueError("each set needs at least 2 rows for a covariance")
    mx, my = a.mean(axis=0), b.mean(axis=0)  # (D,)
    sx = np.atleast_2d(np.cov(a, rowvar=False))  # (D, D)
    sy = np.atleast_2d(np.cov(b, rowvar=False))  # (D, D)
    root = linalg.sqrtm(sx @ sy)  # (D, D)
    if not np.all(np.isfinite(root)):
        off = 1e-6 * np.eye(sx.shape[0])
        root = linalg.sqrtm((sx + off) @ (sy + off))
    value = float(np.sum((mx - my) ** 2) + np.trace(sx) + np.trace(sy) - 2.0 * np.trace(np.real(root)))
    return max(value, 0.0)
