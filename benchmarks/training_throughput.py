"""Training throughput of FaceFormer: a plain PyTorch loop vs Ray Train (local mode, 1 and 2
TorchTrainer workers over gloo/NCCL). Prints samples/s (training windows/s), the Ray
overhead as a ratio to the plain loop, and the 2-vs-1-worker scaling. Not part of the test run.

The plain loop runs twice: before the Ray cluster starts, and again while it is up and idle
(its raylet, GCS, dashboard and agents share the machine with the training). The second is
the baseline for Ray Train's own overhead (the train phase in a TorchTrainer worker vs the
same loop beside the same cluster); the first adds what an idle cluster costs the machine.
For the TorchTrainer variants the epoch wall rate (``progress.jsonl``: epoch start to end,
i.e. the train phase plus the report and checkpoint, validation excluded) is printed too.

    .venv/bin/python benchmarks/training_throughput.py [--quick] [--gpu] [--batches N] [--epochs E]
                                                        [--preset small] [key=value ...]

Every variant trains the same model (``configs/faceformer/<preset>.yaml`` plus overrides)
on the same synthetic corpus with the same loader, optimizer, batch size and torch
threads per worker, for ``--batches`` batches per epoch and worker. Epoch 0 is warm-up;
the next ``--epochs`` epochs are timed, train phase only (``time/train_s`` the loop
reports with each checkpoint; validation and checkpointing are outside it). The fastest
timed epoch and the mean over all of them are printed; ratios use the fastest (other
processes on a shared machine only ever slow an epoch down). With 2 workers each takes
its own ``--batches`` from its shard, so a step processes twice the samples. The Ray
cluster is a loopback-only ``talkmesh.dev.localstack.LocalStack`` head (no MLflow server;
runs log to a throwaway SQLite store).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")  # before ray is imported: the LocalStack head wants the token

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PLAIN = "plain PyTorch loop (no Ray)"
PLAIN_UP = "plain PyTorch loop, Ray cluster up (idle)"


def load(preset: str, overrides: list[str]):
    from talkmesh.ops.jobs import find_preset
    from talkmesh.train.config import load_experiment

    return load_experiment(find_preset("faceformer", preset), overrides, base={"method": "faceformer"})


def plain_loop(exp, batches: int, epochs: int, device: str) -> dict:
    """The training step of talkmesh.train.loop without Ray: same dataset, loader, method,
    optimizer and threads. Returns per-epoch (samples, seconds) of the timed epochs."""
    from talkmesh.data import open_corpus
    from talkmesh.data.dataset import ClipDataset
    from talkmesh.methods.base import DataFacts
    from talkmesh.methods.registry import build_method

    t, sched = exp.train, exp.schedule()
    before = torch.get_num_threads()
    if t.torch_threads:
        torch.set_num_threads(t.torch_threads)
    try:
        corpus = open_corpus(exp.data)
        facts = DataFacts.from_corpus(corpus)
        torch.manual_seed(t.seed)
        method = build_method(exp.method, exp.model, facts, preset=exp.preset or None).to(device)
        opt = torch.optim.AdamW(method.trainable_parameters(), lr=sched.lr, weight_decay=t.weight_decay)
        with_vertices = facts.motion == "params" and facts.num_vertices > 0
        ds = ClipDataset(corpus, "train", mode="window", seed=t.seed, with_vertices=with_vertices)
        gen = torch.Generator()
        loader = torch.utils.data.DataLoader(
            ds, batch_size=sched.batch_size, shuffle=True, collate_fn=ds.collate, generator=gen
        )
        steps = min(len(loader), batches)
        out = []
        method.train()
        for epoch in range(1 + epochs):
            ds.set_epoch(epoch)
            gen.manual_seed(t.seed * 1_000_003 + epoch)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            n = 0
            for i, batch in enumerate(loader):
                if i >= steps:
                    break
                loss, logs = method(batch)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                _ = {k: float(v) for k, v in logs.items()}  # the loop reads every log value too
                n += int(batch["motion_lengths"].shape[0])
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if epoch > 0:
                out.append((n, time.perf_counter() - t0))
        return {"epochs": out, "world": 1, "wall_s": None}
    finally:
        torch.set_num_threads(before)


def ray_run(exp, tmp: Path, name: str, epochs: int) -> dict:
    """run_training, then per-epoch samples and time/train_s from the kept checkpoints."""
    from talkmesh.train.checkpoint import list_checkpoints, read_progress
    from talkmesh.train.runner import run_training

    res = run_training(exp, run_name=name, tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    cks = list_checkpoints(res.run_dir)
    if len(cks) < 1 + epochs:
        raise RuntimeError(f"{name}: expected {1 + epochs} checkpoints, found {len(cks)} in {res.run_dir}")
    bs = exp.schedule().batch_size
    started = {e["epoch"]: e["time"] for e in read_progress(res.run_dir) if e["event"] == "epoch_start"}
    ended = {e["epoch"]: e["time"] for e in read_progress(res.run_dir) if e["event"] == "epoch_end"}
    out, walls = [], []
    for prev, cur in zip(cks, cks[1:], strict=False):
        m = cur.metrics
        samples = (int(m["step"]) - int(prev.metrics["step"])) * bs * int(m["world_size"])
        out.append((samples, float(m["time/train_s"])))
        if cur.epoch < epochs:  # the last epoch's wall time includes the validation
            walls.append((samples, ended[cur.epoch] - started[cur.epoch]))
    return {"epochs": out, "walls": walls, "world": int(cks[-1].metrics["world_size"]), "wall_s": res.wall_s}


def rate(r: dict) -> tuple[float, float, float]:
    """(best epoch's samples/s, samples/s over all timed epochs, relative spread of the
    per-epoch rates). Contention from other processes only ever slows an epoch down, so
    the best epoch is the estimate of the uncontended rate the ratios use."""
    n = sum(s for s, _ in r["epochs"])
    dt = sum(d for _, d in r["epochs"])
    per = [s / d for s, d in r["epochs"] if d > 0]
    spread = (max(per) - min(per)) / statistics.mean(per) if len(per) > 1 else 0.0
    return max(per), n / dt, spread


def cpu_load() -> str:
    with contextlib.suppress(OSError):
        la = os.getloadavg()
        return f"load average {la[0]:.1f} / {la[1]:.1f} / {la[2]:.1f} on {os.cpu_count()} CPUs"
    return "load average unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer batches and epochs (a smoke run)")
    ap.add_argument("--gpu", action="store_true", help="plain loop on cuda, Ray workers with use_gpu=True")
    ap.add_argument("--batches", type=int, default=None, help="batches per epoch and worker (default 16, quick 6)")
    ap.add_argument("--epochs", type=int, default=None, help="timed epochs after the warm-up one (default 8, quick 2)")
    ap.add_argument("--preset", default="small", help="configs/faceformer/<NAME>.yaml (default small: debug model)")
    ap.add_argument("--skip", default="", help="comma-separated variants to skip: plain,plain-up,local,1,2")
    ap.add_argument("overrides", nargs="*", help="dotted overrides for every variant, e.g. model.d_model=64")
    args = ap.parse_args()
    batches = args.batches or (6 if args.quick else 16)
    epochs = args.epochs or (2 if args.quick else 8)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.gpu and not torch.cuda.is_available():
        sys.exit("--gpu: torch sees no CUDA device on this machine")
    device = "cuda" if args.gpu else "cpu"

    import logging

    import ray  # sets up its loggers on import; quietened below

    from talkmesh.dev.localstack import LocalStack

    for name in ("ray", "ray.train", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="tm-bench-") as tmp_s:
        tmp = Path(tmp_s)
        os.environ.setdefault("TALKMESH_CACHE", str(tmp / "cache"))
        common = [
            *args.overrides,
            f"train.epochs={1 + epochs}",
            f"train.limit_train_batches={batches}",
            f"train.eval_every={10_000}",  # validation only after the last epoch (not timed anyway)
            "train.limit_eval_sequences=1",
            "train.checkpoint_num_to_keep=0",
            "train.system_metrics=false",
            "train.log_checkpoint=false",
            "train.preview=false",
            f"train.storage_path={tmp / 'ray'}",
            f"train.use_gpu={'true' if args.gpu else 'false'}",
        ]
        base = load(args.preset, [*common, "train.num_workers=0"])
        from talkmesh.data import open_corpus

        corpus = open_corpus(base.data)  # generated once here, shared by every variant
        sched = base.schedule()
        print(f"FaceFormer preset {base.preset!r} ({args.preset}.yaml), synthetic corpus {corpus.info.root}")
        print(
            f"batch {sched.batch_size}/worker, {batches} batches/epoch/worker, 1 warm-up + {epochs} timed epochs, "
            f"torch threads/worker {base.train.torch_threads or torch.get_num_threads()}, device {device}"
        )
        print(f"before: {cpu_load()}\n")

        results: dict[str, dict] = {}
        # A first in-process run is markedly slower (cold code paths and caches) whichever
        # variant it is; one untimed pass keeps that out of the comparison.
        plain_loop(base, batches, 1, device)
        if "plain" not in skip:
            results[PLAIN] = plain_loop(base, batches, epochs, device)
        if "local" not in skip:
            results["Ray Train local mode (num_workers=0)"] = ray_run(base, tmp, "local", epochs)
        wanted = [n for n in (1, 2) if str(n) not in skip]
        if wanted:
            cpus = max(2, os.cpu_count() or 1)
            with LocalStack(tmp / "stack", num_cpus=cpus, start_mlflow=False) as stack, stack.client_environ():
                ray.init(address=stack.ray_address, log_to_driver=False)
                try:
                    for n in wanted:
                        exp = load(args.preset, [*common, f"train.num_workers={n}"])
                        label = f"TorchTrainer {n} worker{'s' if n > 1 else ''} ({'nccl' if args.gpu else 'gloo'})"
                        results[label] = ray_run(exp, tmp, f"w{n}", epochs)
                    if "plain-up" not in skip:  # after the Ray runs: the cluster has settled since its start
                        results[PLAIN_UP] = plain_loop(base, batches, epochs, device)
                finally:
                    ray.shutdown()

        print(
            f"\n{'variant':42s} {'best s/s':>9s} {'mean s/s':>9s} {'spread':>7s} {'vs plain':>9s} {'fit wall s':>11s}"
        )
        rates = {k: rate(v) for k, v in results.items()}
        plain = rates.get(PLAIN, (None,))[0]
        for k, (r, mean, spread) in rates.items():
            rel = f"{r / plain:.2f}x" if plain else "-"
            wall = results[k]["wall_s"]
            wall_s = "-" if wall is None else f"{wall:.1f}"
            print(f"{k:42s} {r:9.1f} {mean:9.1f} {spread:7.0%} {rel:>9s} {wall_s:>11s}")
            if results[k].get("walls"):
                w, w_mean, w_spread = rate({"epochs": results[k]["walls"]})
                rel_w = f"{w / plain:.2f}x" if plain else "-"
                label = "  epoch wall (train + report + checkpoint)"
                print(f"{label:42s} {w:9.1f} {w_mean:9.1f} {w_spread:7.0%} {rel_w:>9s}")
        one = next((v[0] for k, v in rates.items() if k.startswith("TorchTrainer 1 ")), None)
        two = next((v[0] for k, v in rates.items() if k.startswith("TorchTrainer 2 ")), None)
        local = rates.get("Ray Train local mode (num_workers=0)", (None,))[0]
        plain_up = rates.get(PLAIN_UP, (None,))[0]
        print()
        if plain and local:
            print(f"Ray Train local mode / plain loop:  {local / plain:.2f}x the samples/s")
        if plain and one:
            print(
                f"TorchTrainer 1 worker / plain loop: {one / plain:.2f}x the samples/s "
                f"(Ray overhead in the train phase: {1 - one / plain:+.0%} of the plain rate)"
            )
        if plain_up and one:
            print(
                f"TorchTrainer 1 worker / plain loop beside the idle cluster: {one / plain_up:.2f}x the samples/s "
                f"(Ray Train's own overhead in the train phase: {1 - one / plain_up:+.0%})"
            )
        if plain and plain_up:
            print(f"plain loop beside the idle cluster / plain loop alone: {plain_up / plain:.2f}x the samples/s")
        if one and two:
            print(
                f"2 workers / 1 worker:               {two / one:.2f}x the samples/s (ideal 2.00x, "
                f"efficiency {two / one / 2:.0%})"
            )
        print(
            f"samples = training windows of {base.data.window_seconds:g} s; best / mean = the fastest timed epoch / "
            "all timed epochs (ratios use the best); spread = (max - min) / mean of the "
            "per-epoch rates; fit wall s = TorchTrainer.fit() incl. worker start-up, validation, checkpoints"
        )
        print(f"after: {cpu_load()}")


if __name__ == "__main__":
    main()
