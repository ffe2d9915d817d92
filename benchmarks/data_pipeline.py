"""Data-layer throughput: corpus indexing, clip decoding, windowed batches, metrics, FLAME.

Prints figures and ratios; not part of the test run.

    .venv/bin/python benchmarks/data_pipeline.py [--preset small|default]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = None
    for _ in range(repeat):
        out = fn()
    return (time.perf_counter() - t0) / repeat, out


def main() -> None:
    from talkmesh.config import DataConfig
    from talkmesh.data import open_corpus
    from talkmesh.data.dataset import ClipDataset
    from talkmesh.data.synthetic import generate_corpus
    from talkmesh.eval import metrics

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=["small", "default"], default="default")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        gen_s, root = timed(lambda: generate_corpus(Path(tmp) / "synth", preset=args.preset, seed=0))
        print(f"generate synthetic ({args.preset}):        {gen_s:8.2f} s")
        cfg = DataConfig(format="synthetic", root=str(root), cache_clips=0)
        corpus = open_corpus(cfg)
        index_s, seqs = timed(lambda: corpus.sequences())
        print(f"index {len(seqs)} sequences:               {index_s * 1e3:8.1f} ms")
        load_s, _ = timed(lambda: [corpus.load(s) for s in seqs[:40]])
        print(f"decode clip (wav resample + npy):   {load_s / 40 * 1e3:8.2f} ms/clip")
        cached = open_corpus(DataConfig(format="synthetic", root=str(root), cache_clips=64))
        [cached.load(s) for s in seqs[:40]]
        hit_s, _ = timed(lambda: [cached.load(s) for s in seqs[:40]])
        print(f"cached clip:                        {hit_s / 40 * 1e3:8.3f} ms/clip "
              f"({load_s / max(hit_s, 1e-9):.0f}x faster)")
        ds = ClipDataset(corpus, "train", mode="window", window_frames=50)
        for workers in (0, 2):
            loader = torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=ds.collate, num_workers=workers)
            t0 = time.perf_counter()
            n = sum(b["motion_lengths"].shape[0] for b in loader)
            dt = time.perf_counter() - t0
            print(f"windowed batches, {workers} workers:        {n / dt:8.1f} windows/s")
        test = corpus.sequences("test-B")
        clips = [corpus.load(s) for s in test]
        gts = [c.vertices for c in clips]
        preds = [g + np.float32(1e-3) for g in gts]
        tmpl = [corpus.template(c.subject) for c in clips]
        regions = corpus.regions()
        ev_s, scores = timed(lambda: metrics.evaluate_sequences(preds, gts, tmpl, regions.lips, regions.upper))
        frames = sum(g.shape[0] for g in gts)
        print(f"default metrics, {len(gts)} seqs / {frames} frames: {ev_s * 1e3:8.1f} ms "
              f"({frames / ev_s:.0f} frames/s); lve={scores['lve']:.3e}")
        flame = open_corpus(DataConfig(format="synthetic", root=str(root), synthetic_flavour="flame")).face_model()
        params = np.zeros((1000, 53), np.float32)
        fl_s, _ = timed(lambda: flame.vertices_from_params(params, None), repeat=3)
        print(f"FLAME layer, V={flame.num_vertices}:                {1000 / fl_s:8.0f} frames/s")


if __name__ == "__main__":
    main()
