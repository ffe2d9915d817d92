"""Evaluate a method on whole sequences of a split (specs/metrics.md), the same way for
every method: during training (validation) and after it (the test splits).

Protocol per sequence (metrics.md §6):

* one-hot-conditioned methods (``conditioning = "onehot"``, e.g. FaceFormer):
  a subject seen in training (``corpus.subject_index >= 0``) is decoded with its own
  one-hot; an unseen subject once per training-subject condition, using a fixed seeded
  subset of at most ``max_conditions`` training subjects where there are more (§6.1);
* reference-conditioned methods: the style is encoded from the subject's style-reference
  clip (``corpus.style_reference``, §6.2-6.3), once per reference. Where a subject has no
  pool and no other clip (3D-HDTF), the reference is the first 6 s of the evaluated clip
  and those frames are excluded from the scores of the predictions that used it.

Predictions are vertices (T, V, 3): the method's ``vertices``, or its FLAME ``params``
through the corpus face model. Ground truth is ``corpus.vertices_of(clip)`` (parameter
corpora included). Scores are the project metrics (LVE, FDD, MVE, ...) in native units;
aggregation matches ``talkmesh metrics`` on the files :func:`save_predictions` writes
(``<seq>.npy`` / ``<seq>_condition_<subject>.npy``): LVE-type metrics pool the frames of
every prediction, FDD-type metrics average over predictions, and the unseen-subject
conditions are also aggregated on their own with per-condition min / max.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from talkmesh.data.dataset import match_audio_to_motion
from talkmesh.eval import metrics as M
from talkmesh.eval.predictions import ground_truth, method_template, vertices_of_output
from talkmesh.eval.scoring import CONDITION_SEP

if TYPE_CHECKING:  # pragma: no cover
    from talkmesh.data.clip import Clip, SequenceInfo
    from talkmesh.data.corpus import Corpus
    from talkmesh.methods.base import MotionMethod, StyleState

__all__ = [
    "EvalProtocol",
    "Prediction",
    "PredictionItem",
    "ScoredPrediction",
    "condition_subjects",
    "eval_sequences",
    "evaluate_method",
    "flat_metrics",
    "predict_split",
    "save_predictions",
    "score_method",
    "summarize",
    "summary_table",
]


@dataclasses.dataclass
class Prediction:
    """One decoded sequence: ``condition`` is the training subject whose one-hot was used
    for an unseen subject (None for a seen subject or a reference-conditioned method)."""

    sequence: str
    subject: str
    condition: str | None
    vertices: np.ndarray  # (T, V, 3) float32
    seen: bool
    adapted: bool = False  # decoded with the style ``adapt`` selected on the reference

    @property
    def filename(self) -> str:
        """``<seq>.npy`` or ``<seq>_condition_<subject>.npy`` (the ``talkmesh metrics`` convention)."""
        if self.condition is None:
            return f"{self.sequence}.npy"
        return f"{self.sequence}{CONDITION_SEP}{self.condition}.npy"


@dataclasses.dataclass
class ScoredPrediction:
    sequence: str
    subject: str
    condition: str | None
    seen: bool
    adapted: bool
    score: M.SequenceScore


# --------------------------------------------------------------------------------------
# What to decode
# --------------------------------------------------------------------------------------


def eval_sequences(corpus: Corpus, split: str, limit: int = 0) -> list[SequenceInfo]:
    """The split's sequences; with ``limit`` > 0 a bounded, deterministic subset taken
    round-robin over subjects (sorted), so quick runs still see every speaker."""
    seqs = corpus.sequences(split)
    if limit <= 0 or limit >= len(seqs):
        return seqs
    by_subject: dict[str, list[SequenceInfo]] = {}
    for s in seqs:
        by_subject.setdefault(s.subject, []).append(s)
    # Unseen and seen subjects alternate, so a small subset holds both kinds.
    unseen = [k for k in sorted(by_subject) if corpus.subject_index(k) < 0]
    seen = [k for k in sorted(by_subject) if corpus.subject_index(k) >= 0]
    order = [k for pair in itertools.zip_longest(unseen, seen) for k in pair if k is not None]
    out: list[SequenceInfo] = []
    queues = [by_subject[k] for k in order]
    i = 0
    while len(out) < limit:
        for q in queues:
            if i < len(q) and len(out) < limit:
                out.append(q[i])
        i += 1
    return sorted(out, key=lambda s: s.name)


def condition_subjects(train_subjects: Sequence[str], max_conditions: int = 8, seed: int = 0) -> list[str]:
    """Training subjects whose one-hots decode unseen subjects: all of them, or a fixed
    seeded subset of ``max_conditions`` where there are more (metrics.md §6.1), in one-hot order."""
    subjects = list(train_subjects)
    if max_conditions <= 0 or len(subjects) <= max_conditions:
        return subjects
    rng = np.random.default_rng(seed)
    keep = set(rng.choice(len(subjects), size=max_conditions, replace=False).tolist())
    return [s for i, s in enumerate(subjects) if i in keep]


@dataclasses.dataclass(frozen=True)
class EvalProtocol:
    """Which predictions of a split to decode (metrics.md §6).

    ``limit`` > 0 bounds the sequences (:func:`eval_sequences`); ``max_conditions`` bounds
    the training-subject conditions of unseen subjects (:func:`condition_subjects`, with
    ``seed``); ``shard`` = (rank, world) decodes every ``world``-th sequence from ``rank``;
    ``adapted`` adds the predictions with the style ``adapt`` returns (see :func:`predict_split`)."""

    limit: int = 0
    max_conditions: int = 8
    seed: int = 0
    shard: tuple[int, int] = (0, 1)
    adapted: bool = False


@dataclasses.dataclass(frozen=True)
class _Target:
    """One evaluated sequence: its clip (audio matched to motion), ground truth (T, V, 3)
    and template (V, 3)."""

    seq: SequenceInfo
    clip: Clip
    gt: np.ndarray
    tmpl: np.ndarray


PredictionItem = tuple[Prediction, np.ndarray, np.ndarray]  # (prediction, ground truth (T, V, 3), template (V, 3))


class _Styles:
    """The StyleStates of a split's style references, each computed once per kind."""

    def __init__(self, method: MotionMethod, corpus: Corpus) -> None:
        self.method, self.corpus = method, corpus
        self.cache: dict[tuple[str, str], StyleState] = {}

    def get(self, seq: SequenceInfo, kind: Literal["encode_style", "adapt"]) -> tuple[StyleState, int]:
        """(style, leading frames of ``seq`` excluded from scoring: its own start was the reference)."""
        ref, skip = self.corpus.style_reference(seq, self.method.reference_seconds)
        key = (kind, ref.name)
        if key not in self.cache:
            self.cache[key] = self.method.adapt(ref) if kind == "adapt" else self.method.encode_style(ref)
        return self.cache[key], skip


def predict_split(
    method: MotionMethod, corpus: Corpus, split: str, protocol: EvalProtocol = EvalProtocol()
) -> Iterator[PredictionItem]:
    """Decode the split's sequences (this shard's share: every ``world``-th from ``rank``).
    Yields (prediction, ground truth (T, V, 3), template (V, 3)). ``protocol.adapted`` adds,
    for unseen subjects of one-hot methods, the prediction with the style ``adapt`` picks on
    the subject's reference clip (metrics.md §6.1 "adapted" row); for reference-conditioned
    methods, the prediction with the style ``adapt`` returns for that reference."""
    rank, world = protocol.shard
    seqs = eval_sequences(corpus, split, protocol.limit)[rank::world]
    conditions = condition_subjects(tuple(method.facts.train_subjects), protocol.max_conditions, protocol.seed)
    styles = _Styles(method, corpus)
    for seq in seqs:
        clip = match_audio_to_motion(corpus.load(seq))
        gt, tmpl = ground_truth(corpus, clip)
        target = _Target(seq, clip, gt, tmpl)
        if method.conditioning == "onehot":
            yield from _predict_onehot(method, corpus, target, conditions, styles, protocol.adapted)
        else:
            yield from _predict_referenced(method, corpus, target, styles, protocol.adapted)


def _predict_onehot(
    method: MotionMethod,
    corpus: Corpus,
    target: _Target,
    conditions: Sequence[str],
    styles: _Styles,
    adapted: bool,
) -> Iterator[PredictionItem]:
    """A seen subject under its own one-hot; an unseen one under every condition (and,
    when ``adapted``, with the style ``adapt`` picks on its reference)."""
    seq, clip, gt, tmpl = target.seq, target.clip, target.gt, target.tmpl
    tin = method_template(method, clip, tmpl)
    k = corpus.subject_index(seq.subject)
    if k >= 0:
        v = vertices_of_output(corpus, clip, method.generate(clip.audio, tin, k), gt.shape[1])
        yield Prediction(seq.name, seq.subject, None, v, True), gt, tmpl
        return
    for cond, verts in method.generate_conditions(clip.audio, tin, conditions).items():
        v = vertices_of_output(corpus, clip, {"vertices": verts}, gt.shape[1])
        yield Prediction(seq.name, seq.subject, cond, v, False), gt, tmpl
    if adapted:
        yield _predict_styled(method, corpus, target, styles, "adapt", seen=False)


def _predict_referenced(
    method: MotionMethod, corpus: Corpus, target: _Target, styles: _Styles, adapted: bool
) -> Iterator[PredictionItem]:
    """The style encoded from the subject's reference (and, for an unseen subject when
    ``adapted``, the style ``adapt`` returns for it)."""
    seen = corpus.subject_index(target.seq.subject) >= 0
    yield _predict_styled(method, corpus, target, styles, "encode_style", seen)
    if adapted and not seen:
        yield _predict_styled(method, corpus, target, styles, "adapt", seen=False)


def _predict_styled(
    method: MotionMethod,
    corpus: Corpus,
    target: _Target,
    styles: _Styles,
    kind: Literal["encode_style", "adapt"],
    seen: bool,
) -> PredictionItem:
    """The prediction in the style ``kind`` gives for the sequence's reference; frames that
    served as the reference are cut from the prediction and the ground truth."""
    seq, clip, gt, tmpl = target.seq, target.clip, target.gt, target.tmpl
    style, skip = styles.get(seq, kind)
    out = method.generate(clip.audio, method_template(method, clip, tmpl), style)
    v = vertices_of_output(corpus, clip, out, gt.shape[1])
    if skip:
        v, gt = v[skip:], gt[skip:]
    return Prediction(seq.name, seq.subject, None, v, seen, adapted=kind == "adapt"), gt, tmpl


# --------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------


def score_method(
    method: MotionMethod,
    corpus: Corpus,
    split: str,
    protocol: EvalProtocol = EvalProtocol(),
    *,
    metrics: Sequence[str] = M.DEFAULT_METRICS,
    save_dir: str | Path | None = None,
) -> list[ScoredPrediction]:
    """Score this shard's predictions of ``split`` (see :func:`predict_split`); with
    ``save_dir`` also write each prediction file there (adapted ones under ``adapted/``)."""
    regions = corpus.regions()
    out: list[ScoredPrediction] = []
    with method.eval_mode():
        for pred, gt, tmpl in predict_split(method, corpus, split, protocol):
            label = pred.sequence if pred.condition is None else f"{pred.sequence} [{pred.condition}]"
            if pred.adapted:
                label += " [adapted]"
            s = M.score_sequence(pred.vertices, gt, tmpl, regions.lips, regions.upper, metrics, label)
            out.append(ScoredPrediction(pred.sequence, pred.subject, pred.condition, pred.seen, pred.adapted, s))
            if save_dir is not None:
                save_predictions([pred], Path(save_dir) / ("adapted" if pred.adapted else ""))
    return out


def summarize(scored: Iterable[ScoredPrediction], split: str = "", conditions: Sequence[str] = ()) -> dict[str, Any]:
    """Aggregate scored predictions of one split.

    Returns ``metrics`` (every non-adapted prediction: what ``talkmesh metrics`` reports
    for the saved files), ``seen`` (own one-hot / own style), ``unseen`` (the §6.1
    condition aggregation: ``metrics``, ``per_condition``, ``min``, ``max``, ...),
    ``adapted`` (where computed), the ``conditions`` subset and counts. :func:`evaluate_method`
    adds ``method``: the method's own metrics (:meth:`MotionMethod.method_metrics`).
    """
    items = list(scored)
    main = [s for s in items if not s.adapted]
    if not main:
        raise ValueError(f"no predictions to summarise for split {split!r}")
    out: dict[str, Any] = {
        "split": split,
        "metrics": M.aggregate(s.score for s in main),
        "sequences": len({s.sequence for s in main}),
        "predictions": len(main),
        "frames": sum(s.score.frames for s in main),
        "conditions": list(conditions),
    }
    seen = [s.score for s in main if s.seen]
    if seen:
        out["seen"] = M.aggregate(seen)
    cond = {(s.sequence, s.condition): s.score for s in main if s.condition is not None}
    if cond:
        out["unseen"] = M.aggregate_conditions(cond)
    else:
        unseen = [s.score for s in main if not s.seen]
        if unseen:
            out["unseen"] = {"metrics": M.aggregate(unseen)}
    adapted = [s.score for s in items if s.adapted]
    if adapted:
        out["adapted"] = M.aggregate(adapted)
    return out


def evaluate_method(
    method: MotionMethod,
    corpus: Corpus,
    split: str,
    *,
    limit: int = 0,
    max_conditions: int | None = None,
    seed: int = 0,
    metrics: Sequence[str] = M.DEFAULT_METRICS,
    adapted: bool = False,
    save_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate ``method`` on whole sequences of ``split``; see :func:`summarize` for the
    result. ``max_conditions`` defaults to ``corpus.cfg.max_conditions``."""
    mc = corpus.cfg.max_conditions if max_conditions is None else max_conditions
    protocol = EvalProtocol(limit=limit, max_conditions=mc, seed=seed, adapted=adapted)
    scored = score_method(method, corpus, split, protocol, metrics=metrics, save_dir=save_dir)
    conds = condition_subjects(method.facts.train_subjects, mc, seed) if method.conditioning == "onehot" else []
    summary = summarize(scored, split, conds if any(s.condition for s in scored) else [])
    if method.method_metric_names:  # metrics of the method's own networks (e.g. DEEPTalk's emotion metrics)
        clips = [corpus.load(s) for s in eval_sequences(corpus, split, limit)]
        with method.eval_mode():
            summary["method"] = method.method_metrics(clips)
    return summary


def flat_metrics(summary: dict[str, Any], prefix: str) -> dict[str, float]:
    """``{"<prefix>/lve": ..., "<prefix>/seen/lve": ..., "<prefix>/unseen/lve": ...,
    "<prefix>/unseen/lve_min": ..., "<prefix>/adapted/lve": ...}`` (finite numbers only)."""
    out: dict[str, float] = {}

    def put(key: str, value: Any) -> None:
        if _finite_number(value):
            out[key] = float(value)

    for m, v in summary["metrics"].items():
        put(f"{prefix}/{m}", v)
    for m, v in summary.get("seen", {}).items():
        put(f"{prefix}/seen/{m}", v)
    unseen = summary.get("unseen")
    if unseen:
        for m, v in unseen["metrics"].items():
            put(f"{prefix}/unseen/{m}", v)
        for m, v in unseen.get("min", {}).items():
            put(f"{prefix}/unseen/{m}_min", v)
        for m, v in unseen.get("max", {}).items():
            put(f"{prefix}/unseen/{m}_max", v)
    for m, v in summary.get("adapted", {}).items():
        put(f"{prefix}/adapted/{m}", v)
    for m, v in summary.get("method", {}).items():
        put(f"{prefix}/{m}", v)
    return out


def summary_table(
    summaries: Mapping[str, Mapping[str, Any]], dataset: str | None, method_metric_names: Sequence[str] = ()
) -> str:
    """The table of :func:`evaluate_method` summaries keyed by split: one row per split, then
    its min / max over the unseen-subject conditions and its adapted row where computed
    (:func:`talkmesh.eval.metrics.format_table` over the default metrics, with ``dataset``'s
    published scale), and below it the method's own metrics one per line (``<split>: <name> = value``)."""
    rows: dict[str, Mapping[str, float]] = {}
    for split, summary in summaries.items():
        rows[split] = summary["metrics"]
        unseen = summary.get("unseen", {})
        if "min" in unseen:
            rows[f"{split} min over conditions"] = unseen["min"]
            rows[f"{split} max over conditions"] = unseen["max"]
        if "adapted" in summary:
            rows[f"{split} adapted"] = summary["adapted"]
    table = M.format_table(rows, dataset, list(M.DEFAULT_METRICS), label="split")
    own = [
        f"{split}: {name} = {float(value):.4g}"
        for split, summary in summaries.items()
        for name in method_metric_names
        if (value := summary.get("method", {}).get(name)) is not None and _finite_number(value)
    ]
    return "\n".join([table, *own])


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def save_predictions(predictions: Iterable[Prediction], out_dir: str | Path) -> list[Path]:
    """Write ``<seq>.npy`` / ``<seq>_condition_<subject>.npy`` as (T, V*3) float32, the
    layout ``talkmesh metrics --pred DIR`` scores. Returns the written paths."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for p in predictions:
        path = d / p.filename
        np.save(path, p.vertices.reshape(p.vertices.shape[0], -1).astype(np.float32))
        paths.append(path)
    return paths
