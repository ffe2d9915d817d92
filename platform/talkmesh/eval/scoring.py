"""Score saved predictions against a corpus, in the file convention of the field.

Other codebases (FaceFormer, CodeTalker, SelfTalk, ...) save one ``.npy`` per test
sequence; this module scores such a directory with the project's metric definitions
(specs/metrics.md) so that every method is compared on equal terms:

- ``<sequence>.npy``: one prediction per sequence;
- ``<sequence>_condition_<subject>.npy``: one prediction per one-hot condition (§6.1).
  Sequences with condition files are aggregated over (sequence, condition) pairs: LVE-type
  metrics pool the frames of all pairs, FDD-type metrics average over pairs, and the
  per-condition values with their minimum and maximum are reported alongside.

Arrays are (T, V*3) or (T, V, 3) vertices in the corpus's native units; for parameter
corpora (``corpus.info.motion == "params"``) also (T, 53) or (T, 56) FLAME parameters,
turned into vertices by ``corpus.face_model()`` with zero head rotation (columns 53:56
dropped; datasets.md §6.2, metrics.md §11.5). Ground truth is ``corpus.vertices_of(clip)``
and the template ``corpus.template(subject)`` (for parameter corpora without one, the face
model's template for the clip's shape). Region indices and the md5 of every region file
come from ``corpus.regions()`` (metrics.md §11.3, datasets.md §7).

``talkmesh metrics --pred DIR --format F --root DIR [--split NAME] [--json]`` calls
:func:`score_directory` and :func:`format_report`.
"""

from __future__ import annotations

import math
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from talkmesh.eval import metrics as M
from talkmesh.eval.predictions import ScoringError, template, vertices_from_params

if TYPE_CHECKING:
    from talkmesh.data.clip import Clip, SequenceInfo
    from talkmesh.data.corpus import Corpus

__all__ = ["CONDITION_SEP", "ScoringError", "format_report", "load_prediction", "score_directory"]

CONDITION_SEP = "_condition_"
_PARAM_WIDTHS = (53, 56)  # FLAME expression+jaw, or the full FLAME-56 vector (datasets.md 6.2)


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def _match(stem: str, names: set[str]) -> tuple[str, str | None] | None:
    """(sequence, condition or None) for a file stem, or None when no sequence matches."""
    if stem in names:
        return stem, None
    if CONDITION_SEP in stem:
        for seq, _, cond in (stem.partition(CONDITION_SEP), stem.rpartition(CONDITION_SEP)):
            if seq in names and cond:
                return seq, cond
    return None


def _expected(num_vertices: int, params: bool) -> str:
    shapes = f"(T, {num_vertices * 3}) or (T, {num_vertices}, 3) vertices"
    if params:
        shapes += " or (T, 53) / (T, 56) FLAME parameters"
    return shapes


def load_prediction(path: Path, corpus: Corpus, clip: Clip, num_vertices: int) -> np.ndarray:
    """(T, V, 3) float64 vertices from one prediction file; errors name the file and what
    was expected (not an npy array, wrong shape or vertex count, non-finite values)."""
    is_params = corpus.info.motion == "params"
    expected = _expected(num_vertices, is_params)
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ScoringError(f"{path}: not a readable .npy array ({e}); expected {expected}") from e
    if not isinstance(arr, np.ndarray):  # an .npz archive saved under a .npy name
        raise ScoringError(f"{path}: holds an npz archive, not one array; expected {expected}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ScoringError(f"{path}: dtype {arr.dtype} is not numeric; expected {expected}")
    if arr.ndim not in (2, 3) or arr.shape[0] == 0:
        raise ScoringError(f"{path}: shape {arr.shape}; expected {expected}")
    arr = arr.astype(np.float64, copy=False)
    bad = ~np.isfinite(arr)
    if bad.any():
        frame = int(np.argwhere(bad)[0][0])
        raise ScoringError(
            f"{path}: {int(bad.sum())} NaN/inf values (first in frame {frame}); expected finite {expected}"
        )
    if arr.ndim == 3:
        if arr.shape[1:] != (num_vertices, 3):
            raise ScoringError(f"{path}: shape {arr.shape} has the wrong vertex count; expected {expected}")
        return arr
    width = arr.shape[1]
    if width == num_vertices * 3:
        return arr.reshape(arr.shape[0], num_vertices, 3)
    if is_params and width in _PARAM_WIDTHS:
        return vertices_from_params(corpus, clip, arr, num_vertices, str(path)).astype(np.float64)
    raise ScoringError(f"{path}: shape {arr.shape}; expected {expected}")


# --------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------


def score_directory(
    corpus: Corpus,
    pred_dir: Path | str,
    split: str | None = None,
    metrics: Sequence[str] = M.DEFAULT_METRICS,
) -> dict[str, Any]:
    """Score every prediction file in ``pred_dir`` against ``corpus``.

    ``split`` = one named split; None = each of ``corpus.info.eval_splits`` separately.
    The report (JSON-serialisable) holds, per split: the pooled ``metrics``, counts of
    sequences expected and scored, the ``missing`` sequences, the ``per_sequence``
    breakdown (one entry per file) and, where condition files exist, the ``conditions``
    aggregation (metrics.md §6.1); and overall: region sources with md5s, the files that
    match no sequence of the scored splits (``unmatched_files``), length warnings, and the
    published ``scales`` of the dataset. Raises :class:`ScoringError` when no file matches
    any expected sequence, or for a bad prediction file.
    """
    pred_path = Path(pred_dir).expanduser()
    if not pred_path.is_dir():
        raise ScoringError(f"{pred_path}: prediction directory not found")
    info = corpus.info
    splits = [split] if split is not None else list(info.eval_splits)
    if not splits:
        raise ScoringError(f"{info.format}: the corpus names no evaluation split; pass split=")
    wanted = tuple(M.canonical_name(m) for m in metrics)
    per_split_seqs: dict[str, list[SequenceInfo]] = {s: corpus.sequences(s) for s in splits}
    files = sorted(p for p in pred_path.iterdir() if p.is_file() and not p.name.startswith("."))
    matched = _match_files(pred_path, files, per_split_seqs)
    unmatched = [f for f in files if f not in matched]
    regions = corpus.regions()
    report: dict[str, Any] = {
        "format": info.format,
        "root": info.root,
        "pred_dir": str(pred_path),
        "metric_names": list(wanted),
        "regions": regions.describe(),
        "scales": dict(M.SCALES.get(info.format, {})),
        "splits": {},
        "files": len(files),
        "unmatched_files": [f.name for f in unmatched],
        "other_split_files": _other_split_files(corpus, unmatched),
        "warnings": [],
    }
    for sp, seqs in per_split_seqs.items():
        by_seq = _files_by_sequence(matched, sp)
        report["splits"][sp] = _score_split(corpus, seqs, by_seq, regions, wanted, report["warnings"])
    return report


def _files_by_sequence(
    matched: dict[Path, tuple[str, str, str | None]], split: str
) -> dict[str, list[tuple[Path, str | None]]]:
    """sequence -> [(file, condition), ...] of the files matched to ``split``."""
    by_seq: dict[str, list[tuple[Path, str | None]]] = {}
    for f, (fsp, seq, cond) in matched.items():
        if fsp == split:
            by_seq.setdefault(seq, []).append((f, cond))
    return by_seq


def _match_files(
    pred_path: Path, files: Sequence[Path], per_split_seqs: dict[str, list[SequenceInfo]]
) -> dict[Path, tuple[str, str, str | None]]:
    """file -> (split, sequence, condition) for the ``.npy`` files naming a sequence of a
    scored split (the first split that matches wins); :class:`ScoringError` when none does."""
    matched: dict[Path, tuple[str, str, str | None]] = {}
    for sp, seqs in per_split_seqs.items():
        names = {s.name for s in seqs}
        for f in files:
            if f.suffix != ".npy" or f in matched:
                continue
            hit = _match(f.stem, names)
            if hit is not None:
                matched[f] = (sp, hit[0], hit[1])
    if not matched:
        example = next((seqs[0].name for seqs in per_split_seqs.values() if seqs), "<sequence>")
        raise ScoringError(
            f"{pred_path}: no prediction file matches a sequence of split(s) {list(per_split_seqs)} "
            f"({len(files)} files found); expected e.g. {example}.npy or {example}{CONDITION_SEP}<subject>.npy"
        )
    return matched


def _other_split_files(corpus: Corpus, unmatched: Sequence[Path]) -> dict[str, str]:
    """file name -> split, for unmatched files that name a sequence of a split not scored."""
    other_split: dict[str, str] = {}
    all_names = {s.name: s.split for s in corpus.sequences()}
    for f in unmatched:
        hit = _match(f.stem, set(all_names)) if f.suffix == ".npy" else None
        if hit is not None:
            other_split[f.name] = all_names[hit[0]]
    return other_split


def _score_split(
    corpus: Corpus,
    seqs: list[SequenceInfo],
    by_seq: dict[str, list[tuple[Path, str | None]]],
    regions: Any,
    wanted: tuple[str, ...],
    warn_log: list[str],
) -> dict[str, Any]:
    """The report of one split (see :func:`score_directory`); length warnings go to ``warn_log``."""
    scores: list[M.SequenceScore] = []
    cond_scores: dict[tuple[str, str], M.SequenceScore] = {}
    per_sequence: list[dict[str, Any]] = []
    missing: list[str] = []
    for seq in seqs:
        entries = by_seq.get(seq.name)
        if not entries:
            missing.append(seq.name)
            continue
        for f, cond, s in _score_sequence_files(corpus, seq, entries, regions, wanted, warn_log):
            scores.append(s)
            if cond is not None:
                cond_scores[(seq.name, cond)] = s
            row = s.as_dict()
            row.pop("name")
            per_sequence.append(
                {"sequence": seq.name, "subject": seq.subject, "condition": cond, "file": f.name, **row}
            )
    out: dict[str, Any] = {
        "sequences_expected": len(seqs),
        "sequences_scored": len(seqs) - len(missing),
        "predictions_scored": len(scores),
        "frames": sum(s.frames for s in scores),
        "missing": missing,
        "metrics": M.aggregate(scores) if scores else {},
        "per_sequence": per_sequence,
    }
    if cond_scores:
        out["conditions"] = M.aggregate_conditions(cond_scores)
    return out


def _score_sequence_files(
    corpus: Corpus,
    seq: SequenceInfo,
    entries: list[tuple[Path, str | None]],
    regions: Any,
    wanted: tuple[str, ...],
    warn_log: list[str],
) -> list[tuple[Path, str | None, M.SequenceScore]]:
    """(file, condition, score) of every prediction file of ``seq``, in file-name order."""
    plain = [f for f, c in entries if c is None]
    conds = [f for f, c in entries if c is not None]
    if plain and conds:
        raise ScoringError(
            f"{plain[0]}: ambiguous predictions for {seq.name}: both {plain[0].name} and "
            f"{len(conds)} condition file(s) such as {conds[0].name}; keep one convention"
        )
    clip = corpus.load(seq)
    gt = M.as_vertices(corpus.vertices_of(clip), name=f"{seq.name} ground truth")  # (T, V, 3)
    nv = gt.shape[1]
    tmpl = template(corpus, clip, nv)  # (V, 3)
    out = []
    for f, cond in sorted(entries, key=lambda e: e[0].name):
        pred = load_prediction(f, corpus, clip, nv)  # (T', V, 3)
        label = seq.name if cond is None else f"{seq.name} [condition {cond}]"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", M.LengthMismatchWarning)
            s = M.score_sequence(pred, gt, tmpl, regions.lips, regions.upper, wanted, label)
        warn_log.extend(f"{f.name}: {w.message}" for w in caught if issubclass(w.category, M.LengthMismatchWarning))
        for w in caught:
            if not issubclass(w.category, M.LengthMismatchWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        out.append((f, cond, s))
    return out


# --------------------------------------------------------------------------------------
# Human-readable report
# --------------------------------------------------------------------------------------


def _list(items: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def format_report(report: dict[str, Any], per_sequence: bool = True) -> str:
    """Plain-text rendering of a :func:`score_directory` report: native values and, where
    the dataset has a published scale, value / scale with the scale in the column header."""
    fmt = report["format"]
    names = report["metric_names"]
    lines = [
        f"talkmesh metrics: {fmt} corpus at {report['root'] or '(default)'}",
        f"predictions: {report['pred_dir']} ({report['files']} files)",
        "metrics: " + ", ".join(names) + " (native units; published value = native / scale)",
    ]
    reg = report["regions"]
    src = reg.get("sources", {})
    lines.append(f"regions: lips {reg['lips']} vertices [{src.get('lips', 'built-in')}]")
    lines.append(f"         upper {reg['upper']} vertices [{src.get('upper', 'built-in')}]")
    for sp, r in report["splits"].items():
        lines += _format_split(sp, r, fmt, names, per_sequence)
    if report["unmatched_files"]:
        lines.append("")
        notes = report.get("other_split_files", {})
        items = [f"{n} (split {notes[n]}, not scored)" if n in notes else n for n in report["unmatched_files"]]
        lines.append(f"files matching no sequence of the scored split(s) ({len(items)}): {_list(items)}")
    if report["warnings"]:
        lines.append("")
        lines.append(f"warnings ({len(report['warnings'])}):")
        lines += [f"  {w}" for w in report["warnings"]]
    return "\n".join(lines)


def _format_split(sp: str, r: dict[str, Any], fmt: str, names: Sequence[str], per_sequence: bool) -> list[str]:
    """The lines of one split's report: counts, missing sequences, the metric table (with the
    per-condition rows) and, when ``per_sequence``, the per-sequence table."""
    lines = [
        "",
        f"== {sp}: {r['sequences_scored']} of {r['sequences_expected']} sequences scored "
        f"({r['predictions_scored']} prediction files, {r['frames']} frames)",
    ]
    if r["missing"]:
        lines.append(f"missing predictions ({len(r['missing'])}): {_list(r['missing'])}")
    if not r["metrics"]:
        return lines
    rows: dict[str, dict[str, float]] = {"all": r["metrics"]}
    cond = r.get("conditions")
    if cond:
        for c in cond["conditions"]:
            rows[f"condition {c}"] = cond["per_condition"][c]
        rows["min over conditions"] = cond["min"]
        rows["max over conditions"] = cond["max"]
    lines.append(M.format_table(rows, fmt, names, label=sp))
    if cond:
        lines.append(
            f"conditions: {len(cond['conditions'])} over {cond['sequences']} sequences "
            f"({cond['pairs']} pairs); LVE-type pooled over pairs' frames, FDD-type averaged over pairs"
        )
    if per_sequence and r["per_sequence"]:
        lines.append("")
        seq_rows: dict[str, dict[str, float]] = {}
        for e in r["per_sequence"]:
            key = e["sequence"] if e["condition"] is None else f"{e['sequence']} [{e['condition']}]"
            seq_rows[key] = {k: v for k, v in e.items() if isinstance(v, float) and math.isfinite(v)}
        lines.append(M.format_table(seq_rows, fmt, names, label="sequence"))
    return lines
