"""`make demo`: the whole platform once, end to end, on this machine.

    python -m talkmesh.dev.demo [--work-dir outputs/demo] [--keep] [--methods M,M,...] [key=value ...]

1. starts a local Ray head and an MLflow server (SQLite backend) on 127.0.0.1
   (:class:`talkmesh.dev.localstack.LocalStack`; free ports, token auth);
2. ``ray job submit --working-dir . -- python jobs/<method>.py --preset small`` for each of
   ``--methods`` in turn (FaceFormer, Mimic and DualTalker by default) on the synthetic
   corpus's ``default`` preset, the readable 5042-vertex face, generated into
   ``<work-dir>/cache`` on first use; trailing ``key=value`` are overrides for every job,
   e.g. ``data.synthetic_preset=small`` for the coarse 170-vertex corpus the tests use;
3. ``serve deploy`` of ``serve/config.yaml`` against the head, serving the first method's
   ``models:/talkmesh-<method>@champion`` from that MLflow server;
4. one adaptation request (``POST /v1/styles``: 10 s of an unseen speaker) and one
   animation request (``POST /v1/animate``: another utterance of that speaker, in the
   adapted style), scored against the recorded motion, with a preview video (front and
   three-quarter views);
5. the leaderboard of what it registered (``talkmesh.ops.leaderboard``: the champions and the
   reference rows on the first test split, with bootstrap intervals), written under
   ``<work-dir>/leaderboard`` and logged to MLflow;
6. prints the MLflow UI address, each job's run id and metrics and the output paths, and stops
   everything it started (``--keep`` leaves the stack up until Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from talkmesh.dev.localstack import LocalStack
    from talkmesh.serving.client import StyleClient

__all__ = ["main", "run_demo"]

REPO = Path(__file__).resolve().parents[3]
DEMO_DATA = ("data.synthetic_preset=default",)  # before the user's overrides, which win
# The default jobs on the vertex corpus, which one leaderboard ranks; AdaMesh and DEEPTalk train
# on its FLAME-parameter flavour (a leaderboard of its own: talkmesh leaderboard, README).
DEMO_METHODS = ("faceformer", "mimic", "dualtalker")


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _echo_job(line: str) -> None:
    """The job's output, without Ray Train's per-report dumps of every metric."""
    if "Reporting training result" not in line and "Checkpoint successfully created" not in line:
        print(f"  | {line}", flush=True)


def _serve_file(stack: LocalStack, work: Path, method: str, port: int, faces: Path) -> Path:
    """serve/config.yaml for ``method``'s champion with this stack's MLflow, the demo's style
    dir and database, faces and port."""
    from talkmesh.serving.launch import read_serve_file

    doc = read_serve_file(
        REPO / "serve" / "config.yaml",
        [
            f"method={method}",
            f"tracking_uri={stack.mlflow_uri}",
            f"style_dir={work / 'styles'}",
            f"service_db=sqlite:///{work / 'service.db'}",
            f"faces={faces}",
            "model_num_cpus=1",
            "torch_threads=1",
        ],
    )
    doc["http_options"]["port"] = port
    out = work / "serve.yaml"
    out.write_text(json.dumps(doc, indent=2))  # JSON is YAML
    return out


def run_demo(
    work_dir: str | Path = "outputs/demo",
    overrides: Sequence[str] = (),
    keep: bool = False,
    methods: Sequence[str] = DEMO_METHODS,
) -> dict[str, Any]:
    """Steps 1-6 of the module docstring; returns what it printed as a dict."""
    from talkmesh.data import open_corpus
    from talkmesh.dev.localstack import LocalStack
    from talkmesh.ops.jobs import find_preset
    from talkmesh.train.config import load_experiment

    _check_methods(methods)
    t_start = time.monotonic()
    work = Path(work_dir).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ["TALKMESH_CACHE"] = str(work / "cache")  # the jobs and this process see the same corpus
    overrides = [*DEMO_DATA, *overrides]
    exps = {m: load_experiment(find_preset(m, "small"), overrides, base={"method": m}) for m in methods}
    corpus = open_corpus(exps[methods[0]].data)  # generated here once, before the jobs need it

    with LocalStack(work / "stack", echo=_say) as stack:
        _say(f"Ray dashboard {stack.dashboard_url}   MLflow {stack.mlflow_uri}")
        trained = {m: _train(stack, work, m, exps[m].experiment_name, overrides) for m in methods}
        summary = {"mlflow_ui": stack.mlflow_uri, "mlflow_db": str(stack.mlflow_db), "trained": trained}
        served = methods[0]
        client = _deploy(stack, work, corpus, served, trained[served]["model_version"])
        summary["served"] = served
        summary.update(_adapt_and_animate(client, work, corpus))
        summary.update(_leaderboard(stack, work, corpus))
        _print_summary(summary, time.monotonic() - t_start)
        if keep:
            print(f"\nstack kept up: service {client.url}/docs, MLflow {stack.mlflow_uri}, Ray dashboard "
                  f"{stack.dashboard_url} (token in {stack.token_file}). Ctrl-C stops it.")  # fmt: skip
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
    print(
        f"stopped the Ray head and the MLflow server. Browse the runs later with:\n"
        f"  mlflow ui --backend-store-uri sqlite:///{summary['mlflow_db']} --host 127.0.0.1 --port 5000"
    )
    return summary


def _check_methods(methods: Sequence[str]) -> None:
    """ValueError unless ``methods`` are some of DEMO_METHODS, each once."""
    if not methods or any(m not in DEMO_METHODS for m in methods) or len(set(methods)) != len(methods):
        raise ValueError(f"methods: one or more of {', '.join(DEMO_METHODS)}, each once; got {list(methods)}")


def _train(stack: LocalStack, work: Path, method: str, experiment: str, overrides: Sequence[str]) -> dict[str, Any]:
    """Step 2: submit the method's training job, then read its run and champion version from MLflow."""
    from talkmesh.ops import tracking

    sid = f"demo-{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    entry = ["python", f"jobs/{method}.py", "--preset", "small", f"train.storage_path={work / 'ray'}", *overrides]
    _say(f"ray job submit --submission-id {sid} --working-dir . -- {' '.join(entry)}")
    job = stack.submit_job(
        entry,
        working_dir=REPO,
        submission_id=sid,
        env_vars={"TALKMESH_CACHE": os.environ["TALKMESH_CACHE"]},
        timeout=900,
        echo=_echo_job,
    )
    if not job.succeeded:
        raise RuntimeError(f"training job {sid} ended {job.status}; its logs are above")
    run_id = tracking.find_run(experiment, f"{method}-{sid}", uri=stack.mlflow_uri)
    if run_id is None:
        raise RuntimeError(f"no MLflow run {method}-{sid} in {stack.mlflow_uri}")
    metrics = tracking.get_run_metrics(run_id, uri=stack.mlflow_uri)
    return {
        "run_id": run_id,
        "experiment": experiment,
        "train_s": job.wall_s,
        "model_version": tracking.get_alias_version(method, "champion", uri=stack.mlflow_uri),
        "metrics": {k: v for k, v in sorted(metrics.items()) if k.startswith(("val/", "test/"))},
    }


def _deploy(stack: LocalStack, work: Path, corpus: Any, method: str, version: int | None) -> StyleClient:
    """Step 3: ``serve deploy`` against the head; returns a client once the service is healthy."""
    import numpy as np

    from talkmesh.dev.localstack import free_ports
    from talkmesh.serving.client import StyleClient

    layer = corpus.face_model()
    faces = layer.faces if layer is not None else None  # (F, 3)
    faces_path = work / "faces.npy"
    np.save(faces_path, np.asarray(faces, dtype=np.int64))
    (port,) = free_ports(1)
    serve_yaml = _serve_file(stack, work, method, port, faces_path)
    _say(f"serve deploy {serve_yaml}  (models:/talkmesh-{method}@champion = version {version})")
    stack.run_cli(["serve", "deploy", str(serve_yaml), "--address", stack.dashboard_url], timeout=120)
    client = StyleClient(f"http://127.0.0.1:{port}")
    health = client.wait_healthy(timeout=240)
    _say(f"service up at {client.url}: {health}")
    return client


def _adapt_and_animate(client: StyleClient, work: Path, corpus: Any) -> dict[str, Any]:
    """Step 4: adapt to an unseen speaker, animate another of their utterances, score it."""
    import numpy as np

    from talkmesh.audio.io import write_wav
    from talkmesh.eval import metrics as M

    speaker = corpus.subjects("test-B")[0]
    ref = corpus.reference_clip(speaker, 10.0)
    write_wav(work / "reference.wav", ref.audio)
    np.save(work / "reference_vertices.npy", ref.vertices)
    np.save(work / "template.npy", ref.template)
    t0 = time.perf_counter()
    style = client.create_style(
        work / "reference.wav", work / "reference_vertices.npy", work / "template.npy", name=speaker
    )
    adapt_s = time.perf_counter() - t0
    _say(
        f"POST /v1/styles ({len(ref.audio) / 16000:.1f} s of {speaker}) -> {style['style_id']} "
        f"{style['status']} in {adapt_s:.2f} s, selected {style.get('summary', {}).get('subject_name')}"
    )
    test = corpus.load([s for s in corpus.sequences("test-B") if s.subject == speaker][-1])
    test_wav, motion_path, preview = (work / f"{test.name}{ext}" for ext in (".wav", ".npz", ".mp4"))
    write_wav(test_wav, test.audio)
    t0 = time.perf_counter()
    pred = client.animate(test_wav, style["style_id"], out=motion_path)["vertices"]
    animate_s = time.perf_counter() - t0
    client.animate(test_wav, style["style_id"], fmt="mp4", out=preview)
    n = min(len(pred), len(test.vertices))
    lips = corpus.regions().lips
    lve = M.lve(pred[:n], test.vertices[:n], lips)
    static = M.lve(np.repeat(test.template[None], n, 0), test.vertices[:n], lips)
    _say(
        f"POST /v1/animate ({len(test.audio) / 16000:.1f} s) -> {pred.shape} in {animate_s:.2f} s; "
        f"LVE {lve:.3e} vs static template {static:.3e} ({lve / static:.2f}x)"
    )
    return {
        "style_id": style["style_id"],
        "speaker": speaker,
        "adapt_s": adapt_s,
        "animate_s": animate_s,
        "frames": int(pred.shape[0]),
        "lve": lve,
        "lve_vs_static": lve / static,
        "outputs": {"motion": str(motion_path), "preview": str(preview)},
    }


def _leaderboard(stack: LocalStack, work: Path, corpus: Any) -> dict[str, Any]:
    """Step 5: every registered champion and the reference rows, ranked on one protocol."""
    from talkmesh.methods.registry import available_methods
    from talkmesh.ops import tracking
    from talkmesh.ops.leaderboard import build_leaderboard, log_leaderboard

    uri = stack.mlflow_uri
    models = []
    for name in available_methods():
        version = tracking.get_alias_version(name, "champion", uri=uri)
        if version is not None:
            method, _, _ = tracking.load_registered(name, str(version), uri=uri)
            models.append((f"{name} v{version}", f"models:/{tracking.model_name(name)}/{version}", method))
    board = build_leaderboard(corpus, corpus.info.eval_splits[0], models)
    board.write(work / "leaderboard")
    run_id = log_leaderboard(board, uri)
    _say(f"leaderboard (protocol {board.protocol.id}), MLflow run {run_id}:\n{board.markdown()}")
    return {"leaderboard": str(work / "leaderboard" / "leaderboard.md"), "leaderboard_run": run_id}


def _print_summary(summary: dict[str, Any], took_s: float) -> None:
    """Step 5: what a person wants to see at the end."""
    print("\n== talkmesh demo ==")
    print(f"MLflow UI      {summary['mlflow_ui']}")
    for method, t in summary["trained"].items():
        print(f"{method:<14} run {t['run_id']} ({t['experiment']}, trained in {t['train_s']:.0f} s), "
              f"registered talkmesh-{method} version {t['model_version']} @champion")  # fmt: skip
        for k in ("val/lve", "val/fdd", "test/test-A/lve", "test/test-B/lve", "test/test-B/fdd"):
            if k in t["metrics"]:
                print(f"  {k:<18} {t['metrics'][k]:.4e}")
    print(f"served         talkmesh-{summary['served']}@champion")
    print(f"style          {summary['style_id']} ({summary['speaker']}, adapted in {summary['adapt_s']:.2f} s)")
    print(f"animation      {summary['outputs']['motion']}  ({summary['frames']} frames, {summary['animate_s']:.2f} s)")
    print(f"preview video  {summary['outputs']['preview']}")
    print(f"LVE of the served animation: {summary['lve']:.3e} = {summary['lve_vs_static']:.2f}x a static template")
    print(f"leaderboard    {summary['leaderboard']}  (MLflow run {summary['leaderboard_run']})")
    print(f"demo took {took_s:.0f} s")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m talkmesh.dev.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work-dir", default="outputs/demo")
    p.add_argument("--keep", action="store_true", help="keep the stack up until Ctrl-C")
    p.add_argument(
        "--methods", default=",".join(DEMO_METHODS),
        help=f"the jobs to train, comma-separated, in order (the first is served); default {','.join(DEMO_METHODS)}",
    )  # fmt: skip
    p.add_argument("overrides", nargs="*", help="overrides for every training job, e.g. train.epochs=3")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        _check_methods(methods)
    except ValueError as e:
        p.error(f"--{e}")
    run_demo(args.work_dir, args.overrides, keep=args.keep, methods=methods)
    return 0


if __name__ == "__main__":
    sys.exit(main())
