"""Mimic style encoding: wall time of ``encode_style`` for a 6 s reference (vertices and
template, no audio) at paper sizes (the ``vocaset``, ``biwi`` and ``hdtf`` presets, with the
datasets' vertex counts and frame rates). Not part of the test run.

    .venv/bin/python benchmarks/mimic_style.py [--runs N] [--threads T] [--seconds S]

Models are untrained (speed only; compute does not depend on the weights' values) and use
the tiny random audio encoder, which encode_style does not run. Median and minimum over
``--runs``; the minimum is the better estimate of the uncontended cost on a shared machine.
``--threads`` is torch's intra-op thread count (default 1, as a one-CPU Serve replica).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

# preset -> (vertices, fps) of its dataset
PRESETS = {"vocaset": (5023, 30.0), "biwi": (23370, 25.0), "hdtf": (5023, 25.0)}


def main() -> None:
    from talkmesh.methods import build_method
    from talkmesh.methods.base import DataFacts

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seconds", type=float, default=6.0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), device cpu, {args.seconds:g} s reference")
    for preset, (vertices, fps) in PRESETS.items():
        facts = DataFacts(fps=fps, num_vertices=vertices, train_subjects=tuple(f"S{i}" for i in range(8)),
                          motion="vertices")
        torch.manual_seed(0)
        m = build_method("mimic", {"audio_encoder.tiny": True, "n_ids": 0}, facts, preset=preset).eval()
        rng = np.random.default_rng(0)
        template = rng.normal(size=(vertices, 3)).astype(np.float32)
        frames = int(round(args.seconds * fps))
        ref = {"vertices": template[None] + 0.01 * rng.normal(size=(frames, vertices, 3)).astype(np.float32),
               "template": template}
        m.encode_style(ref)  # warm-up
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            m.encode_style(ref)
            times.append(time.perf_counter() - t0)
        used = min(frames, m.config.style_ref_frames)
        print(f"{preset:8s} {vertices} vertices, {frames} frames ({used} encoded): encode_style median "
              f"{statistics.median(times) * 1000:.1f} ms, min {min(times) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
