"""DEEPTalk speed: the animation real-time factor of argmax ``generate`` (wall time / audio
duration) and the cost of one sampled generation (``generate(..., sample=True, seed=k)``:
emotion drawn from the DEE Gaussian, codes drawn at the top / bottom temperatures) relative
to argmax. Not part of the test run.

    .venv/bin/python benchmarks/deeptalk.py [--preset debug|mead] [--runs N] [--threads T] [--seconds S] [--quick]

``debug`` (default): the debug preset (tiny random wav2vec2 encoders, 16-code codebooks) on
synthetic-corpus-sized facts (170 vertices, 8 actors). ``mead``: the paper sizes (32 actors,
5023 vertices, 256 x 128 / 256 x 256 codebooks, 6-layer code predictors) with
``facebook/wav2vec2-base-960h`` from the local Hugging Face cache for both the DEE audio
encoder and the frozen content encoder; when those weights are not on this machine, a randomly
initialised encoder of the same architecture (saved to a temp dir and loaded like the real
checkpoint) stands in and the row says so: compute does not depend on the weights' values.
Both use a surrogate FLAME face model (``make_surrogate_flame``) injected with
``set_face_model``, so ``generate`` also builds the vertices. Models are untrained (speed
only). Median and minimum over ``--runs``; the minimum is the better estimate of the
uncontended cost on a shared machine. ``--threads`` is torch's intra-op thread count.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REAL_CHECKPOINT = "facebook/wav2vec2-base-960h"


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """(S,) 16 kHz float32: a voiced tone with a syllable-rate envelope and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * 16000))) / 16000.0
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3.5 * t)
    return (env * np.sin(2 * np.pi * 180 * t) + 0.01 * rng.normal(size=t.shape)).astype(np.float32)


def facts_for(preset: str) -> Any:
    """Data facts as numbers: the synthetic FLAME corpus's size (debug) or MEAD's (mead). The lip
    set is a stand-in of the right order of size; ``generate`` never runs the lip reader."""
    from talkmesh.methods.base import DataFacts

    n_vertices, n_actors, n_lips = (5023, 32, 250) if preset == "mead" else (170, 8, 12)
    return DataFacts(
        fps=25.0,
        num_vertices=n_vertices,
        param_dim=53,
        motion="params",
        has_head_pose=True,
        train_subjects=tuple(f"A{i:02d}" for i in range(n_actors)),
        lip_indices=tuple(range(n_lips)),
    )


def random_base_encoder(root: Path) -> Path:
    """A wav2vec2-base-sized encoder with random weights, saved as a local checkpoint."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    out = root / "wav2vec2-base-random"
    torch.manual_seed(0)
    Wav2Vec2Model(Wav2Vec2Config()).save_pretrained(str(out))  # the defaults are the base architecture
    return out


def mead_encoder_overrides(root: Path) -> tuple[dict[str, Any], str]:
    """Method-config overrides and a label: the local wav2vec2-base-960h when it loads, else a
    random encoder of its architecture for both the DEE audio and the content paths."""
    from talkmesh.audio.encoders import AudioEncoderConfig, EncoderWeightsMissing, build_audio_encoder

    try:
        build_audio_encoder(AudioEncoderConfig(kind="wav2vec2", name_or_path=REAL_CHECKPOINT))
        return {}, f"{REAL_CHECKPOINT} (local weights)"
    except EncoderWeightsMissing:
        path = str(random_base_encoder(root))
        enc = {"name_or_path": path}
        overrides = {"dee": {"audio_encoder": enc}, "generator": {"content_encoder": enc}}
        return overrides, f"random wav2vec2-base-size encoders ({REAL_CHECKPOINT} not in the local cache)"


def build(preset: str, overrides: dict[str, Any]) -> torch.nn.Module:
    """The untrained DEEPTalk of ``preset`` in eval mode, with a surrogate FLAME face model."""
    from talkmesh.face.flame import FlameLayer, make_surrogate_flame
    from talkmesh.methods.registry import build_method

    facts = facts_for(preset)
    torch.manual_seed(0)
    method = build_method("deeptalk", overrides, facts, preset=preset).eval()
    method.set_face_model(FlameLayer.from_arrays(**make_surrogate_flame(facts.num_vertices, seed=0)))
    return method


def timed(fn: Callable[[int], Any], runs: int) -> tuple[list[float], Any]:
    """Wall times of ``fn(run index)`` over ``runs`` calls, and the last output."""
    times, out = [], None
    for r in range(runs):
        t0 = time.perf_counter()
        out = fn(r)
        times.append(time.perf_counter() - t0)
    return times, out


def bench(label: str, preset: str, overrides: dict[str, Any], runs: int, seconds: float) -> None:
    """Print the argmax RTF and the sampled / argmax cost ratio of one model."""
    t0 = time.perf_counter()
    m = build(preset, overrides)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in m.parameters()) + sum(p.numel() for p in m.content_encoder.parameters())
    audio = speech_like(seconds, seed=1)
    m.generate(audio, None)  # warm-up (both paths)
    m.generate(audio, None, sample=True, seed=0)
    arg_t, out = timed(lambda _r: m.generate(audio, None), runs)
    smp_t, smp = timed(lambda r: m.generate(audio, None, sample=True, seed=r + 1), runs)
    frames, verts = out["params"].shape[0], tuple(out["vertices"].shape[1:])
    differs = not torch.equal(out["params"], smp["params"])
    med_a, med_s = statistics.median(arg_t), statistics.median(smp_t)
    print(f"\n== {label}: {n_params / 1e6:.1f} M parameters (content encoder included), built in {build_s:.1f} s")
    print(
        f"argmax   {seconds:g} s audio -> {frames} frames + vertices {verts}: median {med_a:.3f} s, "
        f"min {min(arg_t):.3f} s; real-time factor median {med_a / seconds:.3f}, min {min(arg_t) / seconds:.3f}"
    )
    print(
        f"sampled  (sample=True, seed k, temperatures {m.config.sampling.temp_top:g} / "
        f"{m.config.sampling.temp_bottom:g}): median {med_s:.3f} s, min {min(smp_t):.3f} s; "
        f"real-time factor median {med_s / seconds:.3f}"
    )
    print(
        f"one sampled generation costs {med_s / med_a:.2f} x argmax (median), {min(smp_t) / min(arg_t):.2f} x (min); "
        f"sampled output differs from argmax: {differs}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("debug", "mead"), default="debug")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--seconds", type=float, default=10.0, help="audio length (default 10 s)")
    p.add_argument("--quick", action="store_true", help="1 run")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    runs = 1 if args.quick else args.runs
    la = os.getloadavg()
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), device cpu, load average {la[0]:.1f} "
        f"on {os.cpu_count()} CPUs; models untrained (speed only)"
    )
    if args.preset == "debug":
        bench("debug preset (tiny random wav2vec2 encoders)", "debug", {}, runs, args.seconds)
        return
    with tempfile.TemporaryDirectory(prefix="tm-deeptalk-") as tmp:
        overrides, enc_label = mead_encoder_overrides(Path(tmp))
        bench(f"paper sizes (mead preset, {enc_label})", "mead", overrides, runs, args.seconds)


if __name__ == "__main__":
    main()
