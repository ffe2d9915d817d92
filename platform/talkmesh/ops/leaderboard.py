"""One leaderboard: registered models scored on identical data with identical metrics.

Every row is scored under one pinned protocol (:class:`Protocol`): the corpus (format and
fingerprint), the split, the frame rate, the lip and upper-face masks with their checksums,
the conditioning of unseen subjects (``EvalProtocol``'s condition count and seed; reference-
conditioned methods use each subject's own style reference) and the metric variants. Its id
(``tm-`` + 12 hex of the protocol's canonical JSON) is on every row, so two tables compare
only when their ids match.

Rows: each method's registered version (``@champion`` by default, or a chosen version),
plus two reference rows every reader needs: the static template (no motion at all) and the
ground truth scored against itself (0 by construction: a check of the pipeline). LVE and FDD
carry 95 % bootstrap confidence intervals over sequences (seeded, so a rerun gives the same
numbers); a method's own metrics (style, emotion) are added where it has them; the real-time
factor is measured on the first sequences (the one figure that varies between runs).
"""

from __future__ import annotations

import hashlib
import html
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from talkmesh.data.corpus import Corpus
    from talkmesh.eval.evaluate import ScoredPrediction
    from talkmesh.methods.base import MotionMethod

__all__ = [
    "BOARD_METRICS",
    "Leaderboard",
    "Protocol",
    "Row",
    "build_leaderboard",
    "latest_leaderboard",
    "make_protocol",
]

BOARD_METRICS = ("lve", "fdd")  # with confidence intervals; lve_l2 and mve_mean_l2 are listed plainly
EXTRA_METRICS = ("lve_l2", "mve_mean_l2")
METRIC_VARIANTS = {
    "lve": "max over lip vertices of the squared L2 error, pooled over frames (CodeTalker)",
    "lve_l2": "max over lip vertices of the L2 error, pooled over frames",
    "mve_mean_l2": "mean over all vertices of the L2 error, pooled over frames",
    "fdd": "signed: mean over upper-face vertices of (std of gt displacement - std of pred), mean over sequences",
}
RTF_SEQUENCES = 3
EXPERIMENT = "talkmesh-leaderboard"


@dataclass(frozen=True)
class Protocol:
    """What a leaderboard pins; :attr:`id` is the short hash of all of it."""

    dataset: str
    fingerprint: str
    split: str
    fps: float
    lips: dict[str, Any]
    upper: dict[str, Any]
    conditioning: dict[str, Any]
    metrics: dict[str, str]
    limit: int
    bootstrap: dict[str, int]

    @property
    def id(self) -> str:
        body = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return "tm-" + hashlib.sha256(body.encode()).hexdigest()[:12]


@dataclass
class Row:
    """One leaderboard row: ``metrics`` (value), ``ci`` (metric -> (low, high)), ``own``
    (the method's own metrics), ``rtf`` (seconds of generation per second of audio)."""

    name: str
    kind: str  # "model" or "reference"
    model: str
    metrics: dict[str, float]
    ci: dict[str, tuple[float, float]]
    sequences: int
    predictions: int
    rtf: float | None = None
    own: dict[str, float] = field(default_factory=dict)


@dataclass
class Leaderboard:
    protocol: Protocol
    rows: list[Row]
    skipped: dict[str, str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "protocol_id": self.protocol.id,
            "protocol": asdict(self.protocol),
            "rows": [{**asdict(r), "protocol_id": self.protocol.id} for r in self.rows],
            "skipped": self.skipped,
        }

    def _cells(self) -> tuple[list[str], list[list[str]]]:
        own = sorted({k for r in self.rows for k in r.own})
        header = ["#", "row", "model", *(f"{m} [95% CI]" for m in BOARD_METRICS), *EXTRA_METRICS, *own, "RTF",
                  "seqs", "protocol"]  # fmt: skip
        body = []
        ranked = sorted((r for r in self.rows if r.kind == "model"), key=lambda r: r.metrics.get("lve", np.inf))
        for i, r in enumerate([*ranked, *(r for r in self.rows if r.kind == "reference")]):
            cells = [str(i + 1) if r.kind == "model" else "ref", r.name, r.model]
            for m in BOARD_METRICS:
                lo, hi = r.ci.get(m, (np.nan, np.nan))
                cells.append(f"{_num(r.metrics.get(m))} [{_num(lo)}, {_num(hi)}]")
            cells += [_num(r.metrics.get(m)) for m in EXTRA_METRICS] + [_num(r.own.get(m)) for m in own]
            cells += ["-" if r.rtf is None else f"{r.rtf:.3f}", str(r.sequences), self.protocol.id]
            body.append(cells)
        return header, body

    def markdown(self) -> str:
        header, body = self._cells()
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c) + " |" for c in body]
        p = self.protocol
        lines += ["", f"Protocol {p.id}: {p.dataset} (fingerprint {p.fingerprint}) split {p.split} at {p.fps:g} fps; "
                  f"lips {p.lips['count']} vertices (sha256 {p.lips['sha256']}), upper face {p.upper['count']} "
                  f"(sha256 {p.upper['sha256']}); {p.conditioning['onehot']}; native units; RTF on "
                  f"{RTF_SEQUENCES} sequences, this machine."]  # fmt: skip
        lines += [f"Skipped {k}: {v}" for k, v in self.skipped.items()]
        return "\n".join(lines)

    def html(self) -> str:
        header, body = self._cells()
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
        note = html.escape(self.markdown().split("\n\n", 1)[1])
        return (f'<table class="talkmesh-leaderboard" data-protocol="{self.protocol.id}"><thead><tr>{head}</tr>'
                f"</thead><tbody>{rows}</tbody></table>\n<p>{note}</p>\n")  # fmt: skip

    def write(self, out_dir: str | Path) -> list[Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {"leaderboard.md": self.markdown() + "\n", "leaderboard.html": self.html(),
                 "leaderboard.json": json.dumps(self.as_dict(), indent=2, default=_jsonable) + "\n"}  # fmt: skip
        for name, text in files.items():
            (out / name).write_text(text)
        return [out / n for n in files]


def _num(x: float | None) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{x:.4g}"


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _mask(indices: np.ndarray) -> dict[str, Any]:
    arr = np.asarray(indices, dtype=np.int64)
    return {"count": int(arr.size), "sha256": hashlib.sha256(arr.tobytes()).hexdigest()[:16]}


def make_protocol(corpus: Corpus, split: str, *, limit: int = 0, seed: int = 0, resamples: int = 1000) -> Protocol:
    """The pinned protocol of a leaderboard on ``corpus``'s ``split``."""
    from talkmesh.ops.tracking import dataset_fingerprint

    regions = corpus.regions()
    mc = corpus.cfg.max_conditions
    return Protocol(
        dataset=corpus.info.format,
        fingerprint=dataset_fingerprint(corpus),
        split=split,
        fps=float(corpus.info.fps),
        lips=_mask(regions.lips),
        upper=_mask(regions.upper),
        conditioning={
            "onehot": f"unseen subjects: mean over {mc} training-subject conditions (seed {seed})",
            "reference": "each subject's own style reference clip",
            "max_conditions": mc,
            "seed": seed,
        },
        metrics=dict(METRIC_VARIANTS),
        limit=limit,
        bootstrap={"resamples": resamples, "seed": seed},
    )


def bootstrap_ci(scored: Sequence[ScoredPrediction], metric: str, resamples: int, seed: int) -> tuple[float, float]:
    """95 % percentile interval of the corpus-level ``metric`` over sequences resampled with
    replacement (all predictions of a sequence move together; pooled metrics stay frame-pooled)."""
    from talkmesh.eval.metrics import POOLED_METRICS

    names = sorted({s.sequence for s in scored})
    index = {n: i for i, n in enumerate(names)}
    num, den = np.zeros(len(names)), np.zeros(len(names))
    for s in scored:
        i = index[s.sequence]
        if metric in POOLED_METRICS:
            num[i] += s.score.sums[metric]
            den[i] += s.score.frames
        else:
            num[i] += s.score.values[metric]
            den[i] += 1
    picks = np.random.default_rng(seed).integers(0, len(names), size=(resamples, len(names)))  # (R, N)
    stats = num[picks].sum(axis=1) / den[picks].sum(axis=1)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(lo), float(hi)


def _row(name: str, kind: str, model: str, scored: Sequence[ScoredPrediction], protocol: Protocol) -> Row:
    from talkmesh.eval.evaluate import summarize

    main = [s for s in scored if not s.adapted]
    summary = summarize(main, protocol.split)
    metrics = {m: float(summary["metrics"][m]) for m in (*BOARD_METRICS, *EXTRA_METRICS) if m in summary["metrics"]}
    b = protocol.bootstrap
    ci = {m: bootstrap_ci(main, m, b["resamples"], b["seed"]) for m in BOARD_METRICS if m in metrics}
    return Row(name, kind, model, metrics, ci, summary["sequences"], summary["predictions"])


def reference_rows(corpus: Corpus, protocol: Protocol) -> list[Row]:
    """The static template and the ground truth re-scored, under ``protocol``."""
    from talkmesh.data.dataset import match_audio_to_motion
    from talkmesh.eval import metrics as M
    from talkmesh.eval.evaluate import ScoredPrediction, eval_sequences
    from talkmesh.eval.predictions import ground_truth

    regions = corpus.regions()
    static, truth = [], []
    for seq in eval_sequences(corpus, protocol.split, protocol.limit):
        gt, tmpl = ground_truth(corpus, match_audio_to_motion(corpus.load(seq)))  # (T, V, 3), (V, 3)
        for pred, out in ((np.broadcast_to(tmpl, gt.shape), static), (gt, truth)):
            score = M.score_sequence(pred, gt, tmpl, regions.lips, regions.upper, M.DEFAULT_METRICS, seq.name)
            out.append(ScoredPrediction(seq.name, seq.subject, None, True, False, score))
    return [_row("static template", "reference", "-", static, protocol),
            _row("ground truth", "reference", "-", truth, protocol)]  # fmt: skip


def score_model(method: MotionMethod, label: str, model: str, corpus: Corpus, protocol: Protocol) -> Row:
    """A registered model's row: the evaluation protocol's predictions, bootstrap intervals,
    its own metrics and its real-time factor."""
    from talkmesh.data.dataset import match_audio_to_motion
    from talkmesh.eval.evaluate import EvalProtocol, eval_sequences, score_method
    from talkmesh.eval.predictions import ground_truth, method_template

    c = protocol.conditioning
    ep = EvalProtocol(limit=protocol.limit, max_conditions=c["max_conditions"], seed=c["seed"])
    row = _row(label, "model", model, score_method(method, corpus, protocol.split, ep), protocol)
    seqs = eval_sequences(corpus, protocol.split, protocol.limit)
    if method.method_metric_names:
        with method.eval_mode():
            own = method.method_metrics([corpus.load(s) for s in seqs])
        row.own = {k: float(v) for k, v in own.items() if np.isfinite(v)}
    clips = [match_audio_to_motion(corpus.load(s)) for s in seqs[:RTF_SEQUENCES]]
    inputs = [(clip.audio, method_template(method, clip, ground_truth(corpus, clip)[1])) for clip in clips]  # as scored
    t0 = time.perf_counter()
    for audio, template in inputs:
        method.generate(audio, template, None)
    row.rtf = (time.perf_counter() - t0) / sum(len(audio) / 16000 for audio, _ in inputs)
    return row


def build_leaderboard(
    corpus: Corpus,
    split: str,
    models: Iterable[tuple[str, str, MotionMethod]],
    *,
    limit: int = 0,
    seed: int = 0,
    resamples: int = 1000,
    skipped: dict[str, str] | None = None,
) -> Leaderboard:
    """The leaderboard of ``models`` ((row label, model reference, method)) on ``split``."""
    protocol = make_protocol(corpus, split, limit=limit, seed=seed, resamples=resamples)
    rows = [score_model(m, label, ref, corpus, protocol) for label, ref, m in models]
    return Leaderboard(protocol, rows + reference_rows(corpus, protocol), dict(skipped or {}))


def log_leaderboard(board: Leaderboard, uri: str | None = None) -> str:
    """An MLflow run in ``talkmesh-leaderboard`` holding the tables (artifacts), each row's
    metrics as ``<row>/<metric>`` and the protocol as params; returns its id."""
    import tempfile

    from talkmesh.ops import tracking

    p = board.protocol
    params = {"protocol_id": p.id, "dataset": p.dataset, "fingerprint": p.fingerprint, "split": p.split, "fps": p.fps,
              "lips_sha256": p.lips["sha256"], "upper_sha256": p.upper["sha256"], "limit": p.limit}  # fmt: skip
    tags = {"talkmesh.protocol_id": p.id, "talkmesh.dataset": p.dataset}
    metrics = {}
    for r in board.rows:
        key = r.name.replace(" ", "_").replace("@", "_")
        metrics.update({f"{key}/{m}": v for m, v in r.metrics.items()})
        metrics.update({f"{key}/{m}_ci_low": lo for m, (lo, _) in r.ci.items()})
        metrics.update({f"{key}/{m}_ci_high": hi for m, (_, hi) in r.ci.items()})
    name = f"leaderboard-{p.dataset}-{p.split}"
    with tracking.new_run(EXPERIMENT, name, params=params, tags=tags, uri=uri) as run_id:
        tracking.log_metrics(run_id, metrics, uri=uri)
        with tempfile.TemporaryDirectory() as tmp:
            board.write(tmp)
            tracking.log_artifacts(run_id, tmp, uri=uri)
    return run_id


def latest_leaderboard(uri: str | None = None) -> dict[str, Any] | None:
    """The JSON of the newest finished run of ``talkmesh-leaderboard``, or None."""
    import tempfile

    from talkmesh.ops import tracking

    client = tracking.client(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id], "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"], max_results=1
    )
    if not runs:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(runs[0].info.run_id, "leaderboard.json", tmp)).read_text())
