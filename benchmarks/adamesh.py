"""AdaMesh speed: few-shot adaptation wall time for a 10 s reference and the animation
real-time factor (``generate`` wall time / audio duration) for 10 s of audio.
Not part of the test run.

    .venv/bin/python benchmarks/adamesh.py [--quick] [--runs N] [--threads T] [--steps S] [--paper] [--d6]

Rows: the ``debug`` preset (tiny random HuBERT) and, with ``--paper``, the paper sizes
(``mead`` preset: Conformer d 256, MoLoRA ranks 1/2/4/8, 6-layer PoseGPT, 512 clusters)
with a randomly initialised encoder of the HuBERT-large architecture (316 M parameters,
saved to a temp dir and loaded like the real checkpoint; compute does not depend on the
weights' values, and no pretrained weights are available offline). Models are untrained
(speed only); the pose index is filled with random tables so retrieval runs its full path.
Adaptation runs ``--steps`` steps (default: the preset's ``adaptation.steps``) and reports the
per-step time too; ``--d6`` also times D6's adaptation (4 random 4 s crops a step for 300
steps, what the presets used before deviation 16) with the same code and prints the ratio.
Median and minimum over ``--runs``; the minimum is the better estimate
of the uncontended cost on a shared machine. ``--threads`` is torch's intra-op thread count.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def reference(seconds: float, fps: float = 25.0, seed: int = 0) -> dict:
    """A Serve-shaped reference: audio (S,) 16 kHz, params (T, 53), head_pose (T, 3)."""
    rng = np.random.default_rng(seed)
    t = int(round(seconds * fps))
    n = int(round(seconds * 16000))
    time_s = np.arange(n) / 16000.0
    audio = np.sin(2 * np.pi * 180 * time_s) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * time_s)) + 0.01 * rng.normal(size=n)
    return {
        "audio": audio.astype(np.float32),
        "params": (0.3 * rng.normal(size=(t, 53))).astype(np.float32),
        "head_pose": (0.03 * rng.normal(size=(t, 3))).astype(np.float32),
    }


def hubert_large_config():
    """The architecture of facebook/hubert-large-ls960-ft (a transformers HubertConfig)."""
    from transformers import HubertConfig

    return HubertConfig(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        conv_bias=True,
        feat_proj_layer_norm=True,
    )


def hubert_large_dir(root: Path) -> Path:
    """A random HuBERT-large (:func:`hubert_large_config`) saved as a checkpoint."""
    from transformers import HubertModel

    out = root / "hubert-large-random"
    torch.manual_seed(0)
    HubertModel(hubert_large_config()).save_pretrained(out)
    return out


def fill_index(m) -> None:
    """Random pose-style tables, so encode_style/adapt run the full retrieval path."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        m.cluster_centroids.copy_(torch.randn(m.cluster_centroids.shape, generator=g))
        m.pose_style_matrix.copy_(torch.randn(m.pose_style_matrix.shape, generator=g))
        m.pose_style_counts.fill_(1.0)
        m.fitted.fill_(True)


D6 = {"batch": 4, "crop_s": 4.0, "steps": 300}  # AdaptationConfig fields


def bench(name: str, preset: str, overrides: dict, runs: int, steps: int | None, seconds: float, d6: bool) -> None:
    from talkmesh.face.flame import FlameLayer, make_surrogate_flame
    from talkmesh.methods import build_method
    from talkmesh.methods.base import DataFacts

    facts = DataFacts(
        fps=25.0,
        num_vertices=5023 if preset == "mead" else 170,
        train_subjects=tuple(f"S{i:02d}" for i in range(32 if preset == "mead" else 8)),
        motion="params",
        param_dim=53,
        has_head_pose=True,
    )
    torch.manual_seed(0)
    t0 = time.perf_counter()
    m = build_method("adamesh", overrides, facts, preset=preset).eval()
    m.set_face_model(FlameLayer.from_arrays(**make_surrogate_flame(facts.num_vertices, seed=0)))
    fill_index(m)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in m.parameters()) + sum(p.numel() for p in m.audio_encoder.parameters())
    n_molora = sum(p.numel() for p in m.adaptation_parameters().values())
    ref = reference(seconds)
    audio = reference(seconds, seed=1)["audio"]
    steps = m.config.adaptation.steps if steps is None else steps

    m.adapt(ref, steps=1)  # warm-up
    m.generate(audio, None)
    adapt_t, state = [], None
    for r in range(runs):
        t0 = time.perf_counter()
        state = m.adapt(ref, steps=steps, seed=r)
        adapt_t.append(time.perf_counter() - t0)
    if d6:
        cfg = m.config
        m.config = dataclasses.replace(cfg, adaptation=dataclasses.replace(cfg.adaptation, **D6))
        d6_t = []
        for r in range(runs):
            t0 = time.perf_counter()
            m.adapt(ref, seed=r)
            d6_t.append(time.perf_counter() - t0)
        m.config = cfg
    enc_t = []
    for _ in range(runs):
        t0 = time.perf_counter()
        m.encode_style(ref)
        enc_t.append(time.perf_counter() - t0)
    gen_t = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = m.generate(audio, None, style=state)
        gen_t.append(time.perf_counter() - t0)
    t_frames = out["params"].shape[0]
    print(f"\n== {name}: {n_params / 1e6:.1f} M parameters ({n_molora} MoLoRA values), built in {build_s:.1f} s")
    print(
        f"adapt    {seconds:g} s reference, {steps} steps: median {statistics.median(adapt_t):.2f} s, "
        f"min {min(adapt_t):.2f} s ({min(adapt_t) / max(steps, 1) * 1000:.0f} ms/step incl. retrieval)"
    )
    if d6:
        print(
            f"adapt    D6 (4 x 4 s crops, 300 steps): median {statistics.median(d6_t):.2f} s, min {min(d6_t):.2f} s; "
            f"the preset's adaptation takes {min(adapt_t) / min(d6_t):.2f}x of it (minimums)"
        )
    print(f"encode_style (no optimisation):        median {statistics.median(enc_t):.3f} s, min {min(enc_t):.3f} s")
    print(
        f"generate {seconds:g} s audio -> {t_frames} frames + vertices: median {statistics.median(gen_t):.3f} s, "
        f"min {min(gen_t):.3f} s; real-time factor median {statistics.median(gen_t) / seconds:.3f}, "
        f"min {min(gen_t) / seconds:.3f}"
    )
    print(f"StyleState: {sum(v.numel() for v in state.values() if isinstance(v, torch.Tensor))} tensor values")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="adaptation steps (default: the preset's adaptation.steps)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--paper", action="store_true", help="also the paper sizes with a random HuBERT-large")
    p.add_argument("--quick", action="store_true", help="1 run")
    p.add_argument("--d6", action="store_true", help="also time D6's adaptation (4 x 4 s crops, 300 steps)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    runs = 1 if args.quick else args.runs
    print(f"torch {torch.__version__}, {args.threads} thread(s), device cpu")
    bench("debug preset (tiny random HuBERT)", "debug", {}, runs, args.steps, args.seconds, args.d6)
    if args.paper:
        with tempfile.TemporaryDirectory() as tmp:
            path = hubert_large_dir(Path(tmp))
            overrides = {"audio_encoder.name_or_path": str(path), "pose_index.cache_features": False}
            name = "paper sizes (mead preset, random HuBERT-large)"
            bench(name, "mead", overrides, runs, args.steps, args.seconds, args.d6)


if __name__ == "__main__":
    main()
