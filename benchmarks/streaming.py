"""Streaming animation latency: a client sends audio in real time in chunks to a
:class:`~talkmesh.methods.streaming.MotionStream` (``method.open_stream``), for every method's
``debug`` preset and, unless ``--quick``, its paper sizes. Not part of the test run; it measures
latency and compute only (that streamed frames match offline ``generate`` is tested in
tests/test_streaming.py).

    .venv/bin/python benchmarks/streaming.py [--quick] [--runs N] [--threads T] [--seconds S]
                                             [--chunk-ms 200[,320,...]] [--methods a,b] [--paper-only]
                                             [--left-s L] [--right-s R] [--no-merge]

The clock is virtual (nothing sleeps): chunk k of ``--chunk-ms`` arrives at (k + 1) x the chunk
length. As the service's ``/v1/stream`` session does, queued chunks are merged: when a ``push``
ends at time t, the next ``push`` gets every chunk that has arrived by t, concatenated (at least
the next chunk: if none has arrived, it waits for that chunk's arrival). ``--no-merge`` pushes
every chunk on its own (a push starts when its chunk has arrived and the previous call has
ended). Each push takes the measured wall time of ``push``; ``finish`` runs after the last push.
Frame i's audio ends at (i + 1) / fps. Printed per model and chunk length (the median of each
figure over ``--runs``):

* look      the stream's look-ahead (``stream.lookahead_s``: the right context a frame waits
            for; Mimic: one decoding window);
* pushes    the ``push`` calls made (the chunk count without merging);
* 1st at    when the first frame is returned, and 1st lat that time minus the end of frame 0's
            audio;
* chunk     per-chunk latency p50 / p95: end of the ``push`` that took the chunk minus the
            chunk's arrival;
* frame     frame latency p50 / p95: when each frame is returned minus the end of its audio
            (look-ahead, waiting for the chunk and queueing included);
* tail      when the last frame is returned (by ``finish``) minus the end of the audio;
* RTF       compute (all ``push`` and ``finish`` wall times) / audio seconds;
* keeps up  the queue does not grow: the largest latency of the last 20 % of the chunks is at
            most the largest latency of the first 50 % plus one chunk length (a bursty stream
            such as Mimic's, which decodes a whole window now and then, has latency peaks but
            keeps up if they do not rise). With merging, a stream whose compute is busy all the
            time (RTF near 1) keeps up this way at a higher latency; without it, an RTF over 1
            grows the queue. Decided per run, the row shows the majority over the runs.

``--left-s`` / ``--right-s`` replace the methods' stream contexts
(``open_stream(left_s=, right_s=)``; Mimic streams its own windows and ignores them).

Rows: the ``debug`` presets on synthetic-corpus facts (templates and styles as a service holds
them: ``encode_style`` on a reference clip), and the paper sizes: FaceFormer and DualTalker
(``vocaset`` preset, wav2vec2-base encoder), Mimic (``vocaset`` preset: 5023 vertices at 30 fps,
windows of 150 frames, wav2vec2-base), AdaMesh (``mead`` preset, HuBERT-large, random pose
index) and DEEPTalk (``mead`` preset, wav2vec2-base DEE and content encoders). No pretrained
weights are available offline: the paper-size encoders have the checkpoints' architectures with
seeded random weights (``from_config_only``; compute does not depend on the weights' values).
Models are untrained (speed only). ``--quick``: 1 run, debug presets only (``--paper-only``
keeps the paper rows). ``--threads`` is torch's intra-op thread count (default 1: a Serve
replica with one CPU gets OMP_NUM_THREADS=1). The full run (3 runs, paper sizes) takes about
ten minutes on one thread, most of it AdaMesh and DEEPTalk at paper size.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

SAMPLE_RATE = 16000
PAPER_METHODS = ("faceformer", "dualtalker", "mimic", "adamesh", "deeptalk")
WARMUP_S = 2.0  # audio of the warm-up stream


def sibling(name: str) -> ModuleType:
    """Another benchmark script of this folder, imported as a module (its helpers)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module(name)


@dataclasses.dataclass
class Case:
    """One model to stream and what it streams: ``generate``'s template and style, audio (S,)."""

    label: str
    method: torch.nn.Module
    template: Any
    style: Any
    audio: np.ndarray  # (S,) float32, 16 kHz
    context: dict[str, float] = dataclasses.field(default_factory=dict)  # open_stream's left_s / right_s


@dataclasses.dataclass(frozen=True)
class Figures:
    """One simulated stream's figures, in seconds (``rtf``: compute / audio seconds)."""

    lookahead: float
    pushes: float
    first_at: float
    first_latency: float
    chunk_p50: float
    chunk_p95: float
    frame_p50: float
    frame_p95: float
    tail: float
    rtf: float
    keeps_up: float  # 1.0 / 0.0: the rule of the module docstring


def frame_count(out: dict[str, torch.Tensor]) -> int:
    """Frames in a ``push`` / ``finish`` result ({output: (n, ...)}, possibly empty)."""
    return int(next(iter(out.values())).shape[0]) if out else 0


KEEP_HEAD = 0.5  # keeps up: the last KEEP_TAIL of the chunks against the first KEEP_HEAD
KEEP_TAIL = 0.2


def keeps_up(chunk_latency: list[float], chunk_s: float) -> bool:
    """The largest latency of the last 20 % of the chunks at most the largest of the first 50 %
    plus one chunk length (the queue does not grow)."""
    n = len(chunk_latency)
    head = chunk_latency[: max(1, int(np.ceil(n * KEEP_HEAD)))]
    tail = chunk_latency[n - max(1, int(np.ceil(n * KEEP_TAIL))) :]
    return max(tail) <= max(head) + chunk_s


def simulate(case: Case, chunk: int, audio: np.ndarray | None = None, merge: bool = True) -> Figures:
    """Stream ``audio`` (default the case's) in chunks of ``chunk`` samples on the virtual clock
    of the module docstring (queued chunks merged into one push unless ``merge`` is False); the
    figures of that stream."""
    audio = case.audio if audio is None else audio
    starts = list(range(0, audio.shape[0], chunk))
    ends = [min(s + chunk, audio.shape[0]) for s in starts]
    arrivals = [e / SAMPLE_RATE for e in ends]  # (K,) when each chunk has arrived
    stream = case.method.open_stream(case.template, case.style, **case.context)
    clock = compute = 0.0  # end of the last call on the virtual clock; summed wall time of the calls
    chunk_latency: list[float] = []
    returns: list[tuple[int, float]] = []  # (frames returned, virtual time)
    pushes = k = 0
    while k < len(starts):
        begin = max(arrivals[k], clock)
        last = k + 1  # chunks k .. last - 1 go into this push
        while merge and last < len(starts) and arrivals[last] <= begin:
            last += 1
        t0 = time.perf_counter()
        out = stream.push(audio[starts[k] : ends[last - 1]])
        took = time.perf_counter() - t0
        clock, compute, pushes = begin + took, compute + took, pushes + 1
        chunk_latency.extend(clock - arrivals[j] for j in range(k, last))
        returns.append((frame_count(out), clock))
        k = last
    t0 = time.perf_counter()
    out = stream.finish()
    took = time.perf_counter() - t0
    clock, compute = clock + took, compute + took  # the clock is past the last arrival already
    returns.append((frame_count(out), clock))

    counts = np.array([n for n, _ in returns])
    at = np.repeat([t for _, t in returns], counts)  # (T,) when each frame was returned
    if at.shape[0] != stream.emitted or at.shape[0] < 1:
        raise RuntimeError(f"{at.shape[0]} frames returned, stream.emitted {stream.emitted}")
    if stream.samples != audio.shape[0]:
        raise RuntimeError(f"{stream.samples} samples pushed, {audio.shape[0]} streamed")
    frame_end = (np.arange(at.shape[0]) + 1) / stream.fps  # (T,) end of each frame's audio
    frame_latency = at - frame_end
    seconds = audio.shape[0] / SAMPLE_RATE
    rtf = compute / seconds
    return Figures(
        lookahead=float(stream.lookahead_s),
        pushes=float(pushes),
        first_at=float(at[0]),
        first_latency=float(frame_latency[0]),
        chunk_p50=float(np.percentile(chunk_latency, 50)),
        chunk_p95=float(np.percentile(chunk_latency, 95)),
        frame_p50=float(np.percentile(frame_latency, 50)),
        frame_p95=float(np.percentile(frame_latency, 95)),
        tail=float(at[-1] - seconds),
        rtf=rtf,
        keeps_up=float(keeps_up(chunk_latency, chunk / SAMPLE_RATE)),
    )


def median_figures(runs: list[Figures]) -> Figures:
    """The median of each figure over the runs."""
    fields = [f.name for f in dataclasses.fields(Figures)]
    return Figures(**{k: statistics.median(getattr(r, k) for r in runs) for k in fields})


def parameter_count(method: torch.nn.Module) -> int:
    """Parameters of the method and of audio encoders it holds outside its module tree."""
    params = {id(p): p.numel() for p in method.parameters()}
    for attr in ("audio_encoder", "content_encoder"):
        extra = getattr(method, attr, None)
        if isinstance(extra, torch.nn.Module):
            params.update({id(p): p.numel() for p in extra.parameters()})
    return sum(params.values())


# ---- the models ----------------------------------------------------------------------------


def debug_cases(names: list[str], seconds: float, tmp: Path) -> Iterator[Case | tuple[str, Exception]]:
    """Every method's ``debug`` preset on the synthetic corpus's facts (as animation_rtf.py)."""
    from talkmesh.config import DataConfig
    from talkmesh.data import open_corpus
    from talkmesh.methods.base import DataFacts
    from talkmesh.methods.registry import build_method, get_method

    rtf = sibling("animation_rtf")
    os.environ.setdefault("TALKMESH_CACHE", str(tmp / "cache"))
    corpora = {
        "vertex": open_corpus(DataConfig(format="synthetic", synthetic_preset="small")),
        "flame": open_corpus(DataConfig(format="synthetic", synthetic_preset="small", synthetic_flavour="flame")),
    }
    for name in names:
        try:
            shape_input = get_method(name).template_input == "shape"
            corpus = corpora["flame" if shape_input else "vertex"]
            facts = DataFacts.from_corpus(corpus)
            torch.manual_seed(0)
            method = build_method(name, None, facts, preset="debug").eval()
            layer = corpus.face_model()
            if shape_input and layer is not None:
                method.set_face_model(layer)
            audio, _, clip = rtf.long_clip(corpus, seconds)
            template = rtf.template_for(method, corpus, clip)
            style = rtf.style_for(method, corpus, clip.subject)
            label = f"{name} debug (V {facts.num_vertices}, {facts.fps:g} fps)"
            yield Case(label, method, template, style, audio)
        except Exception as e:  # noqa: BLE001 - a method in progress must not hide the others
            yield f"{name} debug", e


def hubert_large_config_dir(root: Path) -> Path:
    """A folder holding only the config.json of HuBERT-large's architecture (benchmarks/adamesh.py's
    ``hubert_large_config``), for ``from_config_only`` (random weights, no weight file)."""
    out = root / "hubert-large-config"
    if not (out / "config.json").is_file():
        sibling("adamesh").hubert_large_config().save_pretrained(str(out))
    return out


def paper_case(name: str, seconds: float, tmp: Path) -> Case:
    """``name`` at its paper sizes with random encoders of the checkpoints' architectures."""
    from talkmesh.face.flame import FlameLayer, make_surrogate_flame
    from talkmesh.methods.base import DataFacts
    from talkmesh.methods.registry import build_method

    audio = sibling("deeptalk").speech_like(seconds, seed=1)
    base = {"from_config_only": True}  # wav2vec2-base-960h's architecture, random weights
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    if name in ("faceformer", "dualtalker", "mimic"):
        facts = sibling("animation_rtf").paper_facts("vocaset")
        method = build_method(name, {"audio_encoder": base}, facts, preset="vocaset").eval()
        template = rng.normal(0, 0.05, (facts.num_vertices, 3)).astype(np.float32)
        style = None if name == "mimic" else 0  # Mimic untrained: None = the zero style code
        label = f"{name} vocaset (V {facts.num_vertices}, {facts.fps:g} fps, wav2vec2-base rnd"
    elif name == "adamesh":
        facts = DataFacts(fps=25.0, num_vertices=5023, train_subjects=tuple(f"S{i:02d}" for i in range(32)),
                          motion="params", param_dim=53, has_head_pose=True)  # fmt: skip
        enc = {"name_or_path": str(hubert_large_config_dir(tmp)), "from_config_only": True}
        overrides = {"audio_encoder": enc, "pose_index": {"cache_features": False}}
        method = build_method(name, overrides, facts, preset="mead").eval()
        method.set_face_model(FlameLayer.from_arrays(**make_surrogate_flame(facts.num_vertices, seed=0)))
        sibling("adamesh").fill_index(method)
        template, style = None, None
        label = f"adamesh mead (V {facts.num_vertices}, {facts.fps:g} fps, HuBERT-large rnd"
    elif name == "deeptalk":
        overrides = {"dee": {"audio_encoder": base}, "generator": {"content_encoder": base}}
        method = sibling("deeptalk").build("mead", overrides)
        template, style = None, None
        facts = method.facts
        label = f"deeptalk mead (V {facts.num_vertices}, {facts.fps:g} fps, wav2vec2-base rnd x2"
    else:
        raise ValueError(f"no paper size for {name!r}")
    return Case(f"{label}, {parameter_count(method) / 1e6:.0f} M)", method, template, style, audio)


def paper_cases(names: list[str], seconds: float, tmp: Path) -> Iterator[Case | tuple[str, Exception]]:
    for name in names:
        if name not in PAPER_METHODS:
            continue
        try:
            t0 = time.perf_counter()
            case = paper_case(name, seconds, tmp)
            print(f"(built {case.label} in {time.perf_counter() - t0:.1f} s)", flush=True)
            yield case
        except Exception as e:  # noqa: BLE001
            yield f"{name} paper", e


# ---- the table -----------------------------------------------------------------------------

LABEL = 64


def header() -> None:
    print(
        f"{'model':{LABEL}s} {'chunk':>5s} {'look':>5s} {'push':>5s} {'1st at':>6s} {'1st':>6s} "
        f"{'chunk latency':>13s} {'frame latency':>13s} {'tail':>6s} {'RTF':>6s}  keeps"
    )
    print(
        f"{'':{LABEL}s} {'ms':>5s} {'s':>5s} {'es':>5s} {'s':>6s} {'lat s':>6s} {'p50 s':>6s} {'p95 s':>6s} "
        f"{'p50 s':>6s} {'p95 s':>6s} {'s':>6s} {'':>6s}  up*"
    )


def row(label: str, chunk_ms: float, f: Figures) -> None:
    keeps = "yes" if f.keeps_up >= 0.5 else "NO"
    print(
        f"{label:{LABEL}s} {chunk_ms:5g} {f.lookahead:5.2f} {f.pushes:5g} {f.first_at:6.2f} {f.first_latency:6.2f} "
        f"{f.chunk_p50:6.3f} {f.chunk_p95:6.3f} {f.frame_p50:6.2f} {f.frame_p95:6.2f} {f.tail:6.2f} "
        f"{f.rtf:6.3f}  {keeps}",
        flush=True,
    )


def footnote() -> None:
    print(
        "* keeps up: max latency of the last 20 % of chunks <= max latency of the first 50 %\n"
        "  + one chunk length (the queue does not grow); majority over the runs"
    )


def bench(
    cases: Iterator[Case | tuple[str, Exception]],
    chunks_ms: list[float],
    runs: int,
    context: dict[str, float],
    merge: bool,
) -> None:
    """Warm each model up with one short stream, then print a row per chunk length."""
    for case in cases:
        if isinstance(case, tuple):
            label, e = case
            print(f"{label:{LABEL}s} failed: {type(e).__name__}: {e}", flush=True)
            traceback.print_exception(e, limit=-2)
            continue
        case.context = context
        for chunk_ms in chunks_ms:
            chunk = int(round(chunk_ms * SAMPLE_RATE / 1000))
            try:
                if chunk_ms == chunks_ms[0]:
                    simulate(case, chunk, case.audio[: int(WARMUP_S * SAMPLE_RATE)], merge)  # warm-up
                figures = [simulate(case, chunk, merge=merge) for _ in range(runs)]
                row(case.label, chunk_ms, median_figures(figures))
            except Exception as e:  # noqa: BLE001
                print(f"{case.label:{LABEL}s} {chunk_ms:5g} failed: {type(e).__name__}: {e}", flush=True)
                traceback.print_exc(limit=-2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 run, debug presets only (unless --paper-only)")
    ap.add_argument("--runs", type=int, default=None, help="runs per row (median; default 3, quick 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--seconds", type=float, default=10.0, help="audio streamed (default 10 s)")
    ap.add_argument("--chunk-ms", default="200", help="chunk lengths in ms, comma-separated (default 200)")
    ap.add_argument("--methods", default="", help="comma-separated methods (default all)")
    ap.add_argument("--paper-only", action="store_true", help="only the paper-size rows")
    ap.add_argument("--left-s", type=float, default=None, help="left audio context (default: each method's)")
    ap.add_argument("--right-s", type=float, default=None, help="look-ahead (default: each method's)")
    ap.add_argument("--no-merge", action="store_true", help="push every chunk on its own (no merging of queued chunks)")
    args = ap.parse_args()
    from talkmesh.methods.registry import available_methods

    runs = args.runs or (1 if args.quick else 3)
    known = list(available_methods())
    names = [m.strip() for m in args.methods.split(",") if m.strip()] or known
    unknown = sorted(set(names) - set(known))
    if unknown:
        ap.error(f"unknown method(s) {unknown}; available: {', '.join(known)}")
    chunks_ms = [float(x) for x in args.chunk_ms.split(",") if x.strip()]
    if not chunks_ms or min(chunks_ms) <= 0:
        ap.error("--chunk-ms: positive milliseconds, comma-separated")
    if runs < 1 or args.seconds * SAMPLE_RATE < max(chunks_ms) * SAMPLE_RATE / 1000:
        ap.error("--runs at least 1 and --seconds at least one chunk")
    context = {k: v for k, v in (("left_s", args.left_s), ("right_s", args.right_s)) if v is not None}
    torch.set_num_threads(args.threads)

    la = os.getloadavg()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device cpu, load average {la[0]:.1f} "
        f"on {os.cpu_count()} CPUs; {args.seconds:g} s of audio in real time, median of {runs} run(s)"
    )
    print("models are untrained, paper-size audio encoders random (no weights offline): speed only")
    given = ", ".join(f"{k} {v:g} s" for k, v in context.items()) or "each method's default"
    merging = "off: one push per chunk" if args.no_merge else "on: queued chunks go into one push"
    print(f"stream contexts: {given}; merging of queued chunks {merging}\n")
    footnote()
    header()
    with tempfile.TemporaryDirectory(prefix="tm-stream-") as tmp_s:
        tmp = Path(tmp_s)
        if not args.paper_only:
            bench(debug_cases(names, args.seconds, tmp), chunks_ms, runs, context, not args.no_merge)
        if args.paper_only or not args.quick:
            bench(paper_cases(names, args.seconds, tmp), chunks_ms, runs, context, not args.no_merge)
    la = os.getloadavg()
    print(f"\nload average after: {la[0]:.1f} / {la[1]:.1f} / {la[2]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
