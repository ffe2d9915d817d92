"""Animation real-time factor: wall time of ``generate`` for 10 s of audio / 10 s, for every
registered method's ``debug`` preset, FaceFormer's small job model and paper-size
FaceFormer and DualTalker (VOCASET and BIWI presets), plus the MP4 preview render time.
Median of N runs. Not part of the test run.

Then the autoregressive decoders alone, incremental (cached keys/values, the default) against
the full-prefix reference decode at 5, 10, 20 and 40 s (``--lengths``): FaceFormer and
DualTalker at VOCASET paper size and AdaMesh's PoseGPT at paper size (MEAD preset), on random audio tokens
(the audio encoder is not timed). Printed: seconds per path, their ratio, and the growth
exponent between consecutive lengths (cost ~ length^k: k near 1 linear, near 2 quadratic).

    .venv/bin/python benchmarks/animation_rtf.py [--quick] [--runs N] [--threads T] [--seconds S]
                                                 [--lengths 5,10,20,40] [--decode-only]
                                                 [--batch B] [--batch-only]

Last, batched requests (``--batch`` utterances of 3..5 s through FaceFormer's
``generate_batch``, the service's ``max_batch_size`` path) against one ``generate`` each.

RTF < 1 is faster than real time. The minimum over the runs is printed next to the
median: on a shared machine it is the better estimate of the uncontended cost.

No pretrained weights are available offline, so the
paper-size rows use randomly initialised audio encoders: the tiny test encoder (hidden 32,
2 layers) and one with the architecture of wav2vec2-base (95 M parameters, random
weights, saved to a temp dir and loaded like a checkpoint). Compute does not depend on the
weights' values, so the base-size row is the paper model's cost; the tiny-encoder row
isolates the decoder. Models are untrained (speed only). ``--threads`` is torch's
intra-op thread count (default 1: a Serve replica with one CPU gets OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def timings(fn, runs: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def long_clip(corpus, seconds: float):
    """Audio (S,) of exactly ``seconds`` at 16 kHz and the matching ground-truth vertices
    (T, V, 3), concatenated from the corpus's test clips; plus a subject and its template input."""
    from talkmesh.data.dataset import match_audio_to_motion

    fps = corpus.info.fps
    need_s = int(round(seconds * 16000))
    need_t = int(round(seconds * fps))
    audio, verts, first = [], [], None
    for seq in corpus.sequences():
        clip = match_audio_to_motion(corpus.load(seq))
        first = first or clip
        audio.append(clip.audio)
        if clip.vertices is not None:
            verts.append(clip.vertices)
        if sum(a.shape[0] for a in audio) >= need_s:
            break
    a = np.concatenate(audio)[:need_s].astype(np.float32)
    if a.shape[0] < need_s:
        a = np.pad(a, (0, need_s - a.shape[0]))
    v = np.concatenate(verts)[:need_t] if verts else None
    return a, v, first


def style_for(method, corpus, subject: str):
    """The StyleState a service would hold: encode_style on the subject's reference clip."""
    ref = corpus.reference_clip(subject, method.reference_seconds)
    return method.encode_style(ref)


def template_for(method, corpus, clip):
    from talkmesh.eval.predictions import method_template

    return method_template(method, clip, corpus.template(clip.subject))


def base_size_encoder(tmp: Path) -> Path:
    """A wav2vec2-base-sized encoder with random weights, saved as a local checkpoint."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    d = tmp / "wav2vec2-base-random"
    if not (d / "config.json").is_file():
        torch.manual_seed(0)
        Wav2Vec2Model(Wav2Vec2Config()).save_pretrained(str(d))  # defaults = the base architecture
    return d


def paper_facts(kind: str):
    """VOCASET / BIWI data facts as numbers (no corpus needed to time generate). The lip sets
    have the real sizes (FLAME lips 250, BIWI lve.txt 4996) but stand-in indices: only
    DualTalker's lip reader reads them, and ``generate`` never runs the reader."""
    from talkmesh.methods.base import DataFacts

    if kind == "vocaset":
        return DataFacts(fps=30.0, num_vertices=5023, train_subjects=tuple(f"S{i}" for i in range(8)),
                         lip_indices=tuple(range(250)))  # fmt: skip
    return DataFacts(fps=25.0, num_vertices=23370, train_subjects=tuple(f"S{i}" for i in range(6)),
                     lip_indices=tuple(range(4996)))  # fmt: skip


def decoder_scaling(lengths: list[float], runs: int) -> None:
    """Incremental vs full-prefix decoding of the autoregressive decoders (module docstring)."""
    import math

    from talkmesh.methods.base import DataFacts
    from talkmesh.methods.faceformer import tokens_per_frame
    from talkmesh.methods.registry import build_method

    print(f"\nautoregressive decoders alone: incremental vs full-prefix, min of {runs} run(s)")
    print(f"{'decoder':44s} {'audio s':>7s} {'steps':>6s} {'cached s':>9s} {'full s':>9s} {'ratio':>7s} "
          f"{'k cached':>8s} {'k full':>7s}")  # fmt: skip
    facts = paper_facts("vocaset")
    ada_facts = DataFacts(fps=25.0, num_vertices=5023, train_subjects=tuple(f"S{i}" for i in range(8)),
                          motion="params", param_dim=53, has_head_pose=True)  # fmt: skip
    cases = []
    for name, f in (("faceformer", facts), ("dualtalker", facts)):
        torch.manual_seed(0)
        m = build_method(name, {"audio_encoder": {"tiny": True}}, f, preset="vocaset").eval()
        per = tokens_per_frame(m.config.alignment)

        def run(seconds: float, incremental: bool, m=m, per=per, fps=f.fps) -> int:
            t = int(seconds * fps)
            memory = torch.randn(1, per * t, m.config.d_model, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                m.decode(memory, m.style_vectors(torch.tensor([0])), t, incremental=incremental)
            return t

        cases.append((f"{name} vocaset decoder (d {m.config.d_model}, {f.fps:g} fps)", run))
    torch.manual_seed(0)
    ada = build_method("adamesh", {"audio_encoder": {"tiny": True}}, ada_facts, preset="mead").eval()
    gpt, vq = ada.posegpt, ada.config.pose_vq
    window = vq.window // vq.downsample

    def run_gpt(seconds: float, incremental: bool) -> int:
        steps = int(seconds * ada_facts.fps) // vq.downsample
        tokens = torch.randn(1, steps, ada.config.posegpt.d, generator=torch.Generator().manual_seed(0))
        gpt.sample(tokens, torch.tensor([0]), torch.Generator().manual_seed(0), "sample", 1.0, 0, window,
                   incremental=incremental)  # fmt: skip
        return steps

    cases.append((f"adamesh mead PoseGPT (context {window} codes)", run_gpt))
    for label, fn in cases:
        fn(lengths[0], True)  # warm-up
        prev = None
        for secs in lengths:
            steps, cached = 0, []
            for _ in range(runs):
                t0 = time.perf_counter()
                steps = fn(secs, True)
                cached.append(time.perf_counter() - t0)
            full = []
            for _ in range(runs):
                t0 = time.perf_counter()
                fn(secs, False)
                full.append(time.perf_counter() - t0)
            c, f_ = min(cached), min(full)
            ks = ("-", "-")
            if prev is not None:
                grow = math.log(secs / prev[0])
                ks = (f"{math.log(c / prev[1]) / grow:.2f}", f"{math.log(f_ / prev[2]) / grow:.2f}")
            print(f"{label:44s} {secs:7g} {steps:6d} {c:9.3f} {f_:9.3f} {f_ / c:6.1f}x {ks[0]:>8s} {ks[1]:>7s}",
                  flush=True)  # fmt: skip
            prev = (secs, c, f_)


def batched_requests(batch: int, seconds: float, runs: int, encoders: list[tuple[str, dict]]) -> None:
    """``generate_batch`` of ``batch`` utterances (lengths spread over 0.6..1.0 x ``seconds``,
    one style each) against one ``generate`` each: FaceFormer at VOCASET size (the service's
    batched path, ``max_batch_size``)."""
    from talkmesh.methods.registry import build_method

    print(f"\nbatched requests: {batch} utterances of {0.6 * seconds:g}..{seconds:g} s, min of {runs} run(s)")
    print(f"{'model':58s} {'one by one s':>12s} {'batched s':>10s} {'speed-up':>8s}")
    facts = paper_facts("vocaset")
    rng = np.random.default_rng(0)
    lengths = np.linspace(0.6 * seconds, seconds, batch)
    audio = [(0.1 * rng.standard_normal(int(n * 16000))).astype(np.float32) for n in lengths]
    templates = [rng.normal(0, 0.05, (facts.num_vertices, 3)).astype(np.float32) for _ in audio]
    styles = [i % len(facts.train_subjects) for i in range(batch)]
    items = list(zip(audio, templates, styles, strict=True))
    for enc_label, enc in encoders:
        torch.manual_seed(0)
        m = build_method("faceformer", {"audio_encoder": enc}, facts, preset="vocaset").eval()
        m.generate_batch(audio[:2], templates[:2], styles[:2])  # warm-up
        one = min(timings(lambda m=m: [m.generate(a, t, s) for a, t, s in items], runs)[0])
        many = min(timings(lambda m=m: m.generate_batch(audio, templates, styles), runs)[0])
        print(f"{'faceformer vocaset (' + enc_label + ')':58s} {one:12.3f} {many:10.3f} {one / many:7.2f}x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 run each, no base-size encoder rows")
    ap.add_argument("--runs", type=int, default=None, help="runs per row (median; default 5, quick 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--seconds", type=float, default=10.0, help="audio length (default 10 s)")
    ap.add_argument("--lengths", default="5,10,20,40", help="audio seconds for the decoder scaling rows")
    ap.add_argument("--decode-only", action="store_true", help="only the decoder scaling rows")
    ap.add_argument("--batch", type=int, default=4, help="utterances in the batched-requests rows (default 4)")
    ap.add_argument("--batch-only", action="store_true", help="only the batched-requests rows")
    args = ap.parse_args()
    runs = args.runs or (1 if args.quick else 5)
    torch.set_num_threads(args.threads)
    secs = args.seconds
    if args.decode_only:
        decoder_scaling([float(x) for x in args.lengths.split(",")], runs)
        return
    if args.batch_only:
        with tempfile.TemporaryDirectory(prefix="tm-rtf-") as tmp_s:
            encoders = [("tiny random enc", {"tiny": True})]
            if not args.quick:
                enc_dir = str(base_size_encoder(Path(tmp_s)))
                encoders.append(("wav2vec2-base-size random enc", {"name_or_path": enc_dir}))
            batched_requests(args.batch, 5.0, runs, encoders)
        return

    from talkmesh.config import DataConfig
    from talkmesh.data import open_corpus
    from talkmesh.methods.base import DataFacts
    from talkmesh.methods.registry import available_methods, build_method, get_method

    with tempfile.TemporaryDirectory(prefix="tm-rtf-") as tmp_s:
        tmp = Path(tmp_s)
        os.environ.setdefault("TALKMESH_CACHE", str(tmp / "cache"))
        corpora = {
            "vertex": open_corpus(DataConfig(format="synthetic", synthetic_preset="small")),
            "flame": open_corpus(DataConfig(format="synthetic", synthetic_preset="small", synthetic_flavour="flame")),
        }
        la = os.getloadavg()
        print(
            f"{secs:g} s of audio, median of {runs} run(s), torch threads {args.threads}, "
            f"load average {la[0]:.1f} on {os.cpu_count()} CPUs"
        )
        print("models are untrained and audio encoders random (no weights offline): speed only\n")
        print(
            f"{'model':66s} {'V':>6s} {'fps':>4s} {'median s':>9s} {'RTF':>6s} {'min s':>7s} {'RTF':>6s} "
            f"{'style s':>8s}"
        )

        def row(label: str, v: int, fps: float, times: list[float], style_s: float | None) -> None:
            med, low = statistics.median(times), min(times)
            st = "-" if style_s is None else f"{style_s:8.3f}"
            print(
                f"{label:66s} {v:6d} {fps:4.0f} {med:9.3f} {med / secs:6.3f} {low:7.3f} {low / secs:6.3f} {st:>8s}",
                flush=True,
            )

        preview_source = None
        # ---- every registered method, debug preset, on the synthetic corpus ------------------
        for name in available_methods():
            try:
                cls = get_method(name)
                shape_input = cls.template_input == "shape"
                corpus = corpora["flame" if shape_input else "vertex"]
                facts = DataFacts.from_corpus(corpus)
                torch.manual_seed(0)
                method = build_method(name, None, facts, preset="debug").eval()
                layer = corpus.face_model()
                if shape_input and layer is not None:
                    method.set_face_model(layer)
                audio, gt, clip = long_clip(corpus, secs)
                tin = template_for(method, corpus, clip)
                t0 = time.perf_counter()
                style = style_for(method, corpus, clip.subject)
                style_s = time.perf_counter() - t0
                method.generate(audio, tin, style)  # warm-up
                gen_t, out = timings(lambda m=method, a=audio, t=tin, s=style: m.generate(a, t, s), runs)
                job = " = small.yaml job model" if name == "faceformer" else ""
                row(f"{name} debug{job} (synthetic {'FLAME' if shape_input else 'vertices'})",
                    facts.num_vertices, facts.fps, gen_t, style_s)  # fmt: skip
                if name == "faceformer":
                    preview_source = (out["vertices"], gt, audio, corpus)
            except Exception as e:  # noqa: BLE001 - a method in progress must not hide the others
                print(f"{name + ' debug':66s} failed: {type(e).__name__}: {e}")
                traceback.print_exc(limit=2)

        # ---- FaceFormer and DualTalker at paper size ---------------------------------------
        # DualTalker generates with FaceFormer's decoder at d 128 (its lip reader is training
        # only), so the rows differ where FaceFormer's width or alignment differs.
        encoders = [("tiny random enc", {"tiny": True})]
        if not args.quick:
            t0 = time.perf_counter()
            enc_dir = base_size_encoder(tmp)
            print(f"(built the random wav2vec2-base-size encoder in {time.perf_counter() - t0:.1f} s)")
            encoders.append(("wav2vec2-base-size random enc", {"name_or_path": str(enc_dir)}))
        audio16 = long_clip(corpora["vertex"], secs)[0]
        for name, preset in [(n, p) for p in ("vocaset", "biwi") for n in ("faceformer", "dualtalker")]:
            facts = paper_facts(preset)
            template = np.random.default_rng(0).normal(0, 0.05, (facts.num_vertices, 3)).astype(np.float32)
            for enc_label, enc in encoders:
                try:
                    torch.manual_seed(0)
                    method = build_method(name, {"audio_encoder": enc}, facts, preset=preset).eval()
                    n_params = sum(p.numel() for p in method.parameters()) / 1e6
                    method.generate(audio16, template, 0)  # warm-up
                    gen_t, _ = timings(lambda m=method, t=template: m.generate(audio16, t, 0), runs)
                    cfg = method.config
                    row(f"{name} {preset} (d {cfg.d_model}, {enc_label}, {n_params:.1f} M)",
                        facts.num_vertices, facts.fps, gen_t, None)  # fmt: skip
                except Exception as e:  # noqa: BLE001
                    print(f"{name} {preset} + {enc_label}: failed: {type(e).__name__}: {e}")

        # ---- preview render -----------------------------------------------------------------
        if preview_source is not None:
            from talkmesh.render import DEFAULT_SIZE, render_motion

            pred, gt, audio, corpus = preview_source
            pred = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
            layer = corpus.face_model()
            faces = layer.faces if layer is not None else None  # (F, 3)
            fps = corpus.info.fps
            lips = corpus.regions().lips
            rruns = max(1, min(runs, 3))
            print(
                f"\npreview render, {pred.shape[0]} frames ({secs:g} s at {fps:g} fps), V={pred.shape[1]}, "
                f"{DEFAULT_SIZE[0]}x{DEFAULT_SIZE[1]} per panel, H.264 + AAC, median of {rruns}:"
            )
            out = tmp / "preview.mp4"
            r1 = statistics.median(timings(lambda: render_motion(pred, faces, out, fps, audio=audio), rruns)[0])
            print(
                f"  prediction only (Serve's preview)          {r1:7.2f} s   RTF {r1 / secs:6.3f}  "
                f"({out.stat().st_size / 1024:.0f} KiB)"
            )
            if gt is not None:
                n = min(pred.shape[0], gt.shape[0])  # generate's frame count may differ by one from the data's
                r2 = statistics.median(
                    timings(
                        lambda: render_motion(pred[:n], faces, out, fps, audio=audio, gt=gt[:n], heat_region=lips),
                        rruns,
                    )[0]
                )
                print(
                    f"  prediction | ground truth + lip heat map   {r2:7.2f} s   RTF {r2 / secs:6.3f}  "
                    "(MLflow preview artifact)"
                )
        decoder_scaling([float(x) for x in args.lengths.split(",")], runs)
        batched_requests(args.batch, 5.0, runs, encoders)
        la = os.getloadavg()
        print(f"\nload average after: {la[0]:.1f} / {la[1]:.1f} / {la[2]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
