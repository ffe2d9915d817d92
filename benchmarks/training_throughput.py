"""Training throughput of FaceFormer: a plain PyTorch loop vs Ray Train (local mode, 1 and 2
TorchTrainer workers over gloo/NCCL). Prints samples/s (training windows/s), the Ray Train
overhead at 1 worker against the plain loop, and the 2-vs-1-worker scaling. Not part of the
test run.

    .venv/bin/python benchmarks/training_throughput.py [--quick] [--gpu] [--rounds R] [--batches N]
                                                        [--epochs E] [--preset small] [key=value ...]

Every variant trains the same model (``configs/faceformer/<preset>.yaml`` plus overrides)
on the same synthetic corpus with the same loader, optimizer, batch size and torch threads
per worker: ``--batches`` batches per epoch and worker (default: the whole epoch of the
preset's job), one warm-up epoch, then ``--epochs`` timed ones. Two rates are read for the
TorchTrainer runs:

- **train phase**: ``time/train_s``, which the loop reports with each checkpoint (the
  training windows only, as the plain loop's timer);
- **epoch wall**: epoch start to epoch end in ``progress.jsonl``, i.e. the train phase plus
  writing the checkpoint, ``ray.train.report`` and logging the metrics to MLflow: what a
  run pays per epoch for Ray Train, checkpoints and tracking. Validation is left out (it
  runs after the last epoch only, and that epoch is not counted) since the plain loop has none.

The overhead is ``1 - TorchTrainer rate / plain rate`` on the epoch wall, the figure the
target (at most 5 %) is about; the train phase's is printed beside it, and so is the time
each epoch spends outside its train phase (checkpoint, report, MLflow), which is read within
one run and so is free of the drift below.

The plain loop runs in a fresh Python process, as a plain PyTorch script does, with
``OMP_NUM_THREADS`` set to the torch threads per worker as Ray sets it for its workers. Each
variant starts once the machine is quiet (:func:`settle`). This machine's speed still drifts
by 10-30 % over seconds to minutes (shared host), more than the overhead being measured, so
the variants run in interleaved **rounds**: each round runs the plain loop with no Ray
cluster, then starts a loopback-only ``talkmesh.dev.localstack.LocalStack``
head (no MLflow server; runs log to a throwaway SQLite store), runs the TorchTrainer
variants and the plain loop again beside the idle cluster, and stops it. A variant's rate in
a round is its fastest timed epoch (other processes on a shared machine only ever slow an
epoch down; every variant times the same number of epochs); ratios are taken within a round
and their median over the rounds is the result, with the lowest and highest beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")  # before ray is imported: the LocalStack head wants the token

import torch  # noqa: E402

PLAIN = "plain PyTorch loop (no Ray)"
PLAIN_UP = "plain PyTorch loop, Ray cluster up (idle)"
PLAIN_FLAG = "--plain-loop-process"
LOCAL = "Ray Train local mode (num_workers=0)"


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
        steps = min(len(loader), batches) if batches else len(loader)
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
        return {"epochs": out, "wall_s": None}
    finally:
        torch.set_num_threads(before)


def settle(quiet: float = 0.15, limit_s: float = 30.0) -> None:
    """Wait until the machine is quiet: the CPUs' busy share over one second below ``quiet``
    (an idle Ray head takes a few percent of these 2 CPUs), or ``limit_s`` passed. What the last
    variant left winding down (a cluster stopping, Ray Train's controller actors) would
    otherwise slow the next one."""
    import psutil

    deadline = time.monotonic() + limit_s
    while psutil.cpu_percent(interval=1.0) / 100 > quiet and time.monotonic() < deadline:
        pass


def plain_process(plain_args: list[str], threads: int) -> dict:
    """:func:`plain_loop` in a fresh Python process, as a plain PyTorch script runs (the
    benchmark's own process holds Ray's driver, MLflow and their threads, which a plain
    script does not). ``threads``: the experiment's ``train.torch_threads`` (0: unset)."""
    env = dict(os.environ)
    if threads:  # what Ray sets for a worker that holds that many CPUs
        env["OMP_NUM_THREADS"] = str(threads)
    settle()
    out = subprocess.run(
        [sys.executable, __file__, PLAIN_FLAG, *plain_args], check=True, capture_output=True, text=True, env=env
    ).stdout
    return {"epochs": [tuple(e) for e in json.loads(out.strip().splitlines()[-1])], "wall_s": None}


def ray_run(exp, tmp: Path, name: str, epochs: int) -> dict:
    """run_training for 1 warm-up + ``epochs`` timed + 1 last epoch (the one that validates, not
    timed); per timed epoch (samples, time/train_s) and (samples, epoch wall seconds)."""
    from talkmesh.train.checkpoint import list_checkpoints, read_progress
    from talkmesh.train.runner import run_training

    settle()
    res = run_training(exp, run_name=name, tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    cks = list_checkpoints(res.run_dir)
    if len(cks) != 2 + epochs:
        raise RuntimeError(f"{name}: expected {2 + epochs} checkpoints, found {len(cks)} in {res.run_dir}")
    bs = exp.schedule().batch_size
    progress = read_progress(res.run_dir)
    started = {e["epoch"]: e["time"] for e in progress if e["event"] == "epoch_start"}
    ended = {e["epoch"]: e["time"] for e in progress if e["event"] == "epoch_end"}
    out, walls = [], []
    for prev, cur in zip(cks[:-2], cks[1:-1], strict=True):
        m = cur.metrics
        samples = (int(m["step"]) - int(prev.metrics["step"])) * bs * int(m["world_size"])
        out.append((samples, float(m["time/train_s"])))
        walls.append((samples, ended[cur.epoch] - started[cur.epoch]))
    return {"epochs": out, "walls": walls, "wall_s": res.wall_s}


def best_rate(epochs: list[tuple[int, float]]) -> float:
    """The fastest epoch's samples/s: contention from other processes only ever slows an epoch
    down, so the best epoch estimates the uncontended rate."""
    return max(n / d for n, d in epochs if d > 0)


def spread(epochs: list[tuple[int, float]]) -> float:
    """(max - min) / mean of the per-epoch rates."""
    per = [n / d for n, d in epochs if d > 0]
    return (max(per) - min(per)) / statistics.mean(per) if len(per) > 1 else 0.0


def cpu_load() -> str:
    with contextlib.suppress(OSError):
        la = os.getloadavg()
        return f"load average {la[0]:.1f} / {la[1]:.1f} / {la[2]:.1f} on {os.cpu_count()} CPUs"
    return "load average unknown"


def summary(ratios: list[float]) -> str:
    """``median (lowest-highest)`` of per-round ratios."""
    return f"{statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f})"


def overhead(ratios: list[float]) -> str:
    """The overhead ``1 - ratio``: median over the rounds, (at the best round - at the worst)."""
    return f"{1 - statistics.median(ratios):+.1%} ({1 - max(ratios):+.1%} to {1 - min(ratios):+.1%})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one round, 6 batches, 2 timed epochs (a smoke run)")
    ap.add_argument("--gpu", action="store_true", help="plain loop on cuda, Ray workers with use_gpu=True")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, quick 1)")
    ap.add_argument("--batches", type=int, default=None, help="batches per epoch and worker (default: whole epoch)")
    ap.add_argument("--epochs", type=int, default=None, help="timed epochs after the warm-up one (default 8, quick 2)")
    ap.add_argument("--preset", default="small", help="configs/faceformer/<NAME>.yaml (default small: debug model)")
    ap.add_argument("--skip", default="", help="comma-separated variants to skip: local,1,2,plain-up")
    ap.add_argument("overrides", nargs="*", help="dotted overrides for every variant, e.g. model.d_model=64")
    args = ap.parse_args()
    batches = args.batches if args.batches is not None else (6 if args.quick else 0)
    epochs = args.epochs or (2 if args.quick else 8)
    rounds = args.rounds or (1 if args.quick else 3)
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
            f"train.epochs={2 + epochs}",
            f"train.limit_train_batches={batches}",
            f"train.eval_every={10_000}",  # validation only after the last epoch (not timed)
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
            f"batch {sched.batch_size}/worker, {batches or 'all'} batches/epoch/worker, 1 warm-up + {epochs} timed "
            f"epochs, {rounds} round(s), torch threads/worker {base.train.torch_threads or torch.get_num_threads()}, "
            f"device {device}"
        )
        print(f"before: {cpu_load()}")

        backend = "nccl" if args.gpu else "gloo"
        labels = {n: f"TorchTrainer {n} worker{'s' if n > 1 else ''} ({backend})" for n in (1, 2)}
        wanted = [n for n in (1, 2) if str(n) not in skip]
        plain_args = [args.preset, str(batches), str(epochs), device, *common, "train.num_workers=0"]
        per_round: list[dict[str, dict]] = []
        for r in range(rounds):
            res: dict[str, dict] = {PLAIN: plain_process(plain_args, base.train.torch_threads)}
            if "local" not in skip:
                res[LOCAL] = ray_run(base, tmp, f"local-r{r}", epochs)
            if wanted:
                cpus = max(2, os.cpu_count() or 1)
                with LocalStack(tmp / f"stack-{r}", num_cpus=cpus, start_mlflow=False) as stack, stack.client_environ():
                    ray.init(address=stack.ray_address, log_to_driver=False)
                    try:
                        for n in wanted:
                            exp = load(args.preset, [*common, f"train.num_workers={n}"])
                            res[labels[n]] = ray_run(exp, tmp, f"w{n}-r{r}", epochs)
                        if "plain-up" not in skip:
                            res[PLAIN_UP] = plain_process(plain_args, base.train.torch_threads)
                    finally:
                        ray.shutdown()
            per_round.append(res)
            print(f"\nround {r + 1}/{rounds}")
            print(f"  {'variant':44s} {'best s/s':>9s} {'spread':>7s} {'vs plain':>9s} {'fit wall s':>11s}")
            plain = best_rate(res[PLAIN]["epochs"])
            for k, v in res.items():
                rows = [(k, v["epochs"], v.get("wall_s"))]
                if "walls" in v:
                    rows.append(("  epoch wall (train + checkpoint + report)", v["walls"], None))
                for label, eps, wall in rows:
                    rate = best_rate(eps)
                    wall_s = "-" if wall is None else f"{wall:.1f}"
                    print(f"  {label:44s} {rate:9.1f} {spread(eps):7.0%} {rate / plain:8.3f}x {wall_s:>11s}")

        def ratios(num: str, den: str, key: str = "epochs") -> list[float]:
            return [
                best_rate(x[num][key]) / best_rate(x[den]["epochs"]) for x in per_round if num in x and den in x
            ]

        one = labels[1]
        print(f"\nover {rounds} round(s): median ratio of samples/s (lowest-highest round)")
        if 1 in wanted:
            wall = ratios(one, PLAIN, "walls")
            phase = ratios(one, PLAIN)
            print(f"TorchTrainer 1 worker / plain loop, epoch wall:  {summary(wall)}")
            print(f"  Ray Train overhead at 1 worker (epoch wall):   {overhead(wall)}   <- the target: at most +5.0%")
            print(f"TorchTrainer 1 worker / plain loop, train phase: {summary(phase)}")
            print(f"  Ray Train overhead at 1 worker (train phase):  {overhead(phase)}")
            if "plain-up" not in skip:
                beside = summary(ratios(one, PLAIN_UP))
                print(f"TorchTrainer 1 worker / plain loop beside the idle cluster, train phase: {beside}")
            costs = [
                (w - d) * 1000
                for x in per_round
                for (_, d), (_, w) in zip(x[one]["epochs"], x[one]["walls"], strict=True)
            ]
            print(
                "  per epoch outside the train phase (checkpoint, report, MLflow): "
                f"median {statistics.median(costs):.0f} ms, max {max(costs):.0f} ms, over {len(costs)} epochs"
            )
        if "plain-up" not in skip and wanted:
            print(f"plain loop beside the idle cluster / plain loop alone: {summary(ratios(PLAIN_UP, PLAIN))}")
        if "local" not in skip:
            print(f"Ray Train local mode / plain loop, epoch wall: {summary(ratios(LOCAL, PLAIN, 'walls'))}")
        if 1 in wanted and 2 in wanted:
            two = [best_rate(x[labels[2]]["epochs"]) / best_rate(x[one]["epochs"]) for x in per_round]
            print(f"2 workers / 1 worker, train phase: {summary(two)} (ideal 2.00x)")
        print(
            f"samples = training windows of {base.data.window_seconds:g} s; a variant's rate in a round is its "
            "fastest timed epoch; spread = (max - min) / mean of its per-epoch rates; fit wall s = "
            "TorchTrainer.fit() incl. worker start-up, validation, checkpoints"
        )
        print(f"after: {cpu_load()}")


if __name__ == "__main__":
    if sys.argv[1:2] == [PLAIN_FLAG]:  # plain_process's child: preset batches epochs device overrides...
        preset, n_batches, n_epochs, dev, *over = sys.argv[2:]
        timed = plain_loop(load(preset, over), int(n_batches), int(n_epochs), dev)["epochs"]
        print(json.dumps(timed))
    else:
        main()
