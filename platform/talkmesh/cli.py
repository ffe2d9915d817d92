"""`talkmesh` console entry.

    talkmesh data inspect --format F --root DIR [--json] [key=value ...]
    talkmesh data synth --out DIR [--preset small|default] [--seed N] [--fps 25]
    talkmesh metrics --pred DIR --format F --root DIR [--split NAME] [--json] [key=value ...]
    talkmesh face convert --pkl generic_model.pkl --out flame.npz
    talkmesh serve [--config serve/config.yaml] [key=value ...]
    talkmesh sweep sweeps/<method>.yaml [--num-samples N] [--name NAME] [--no-register] [key=value ...]
    talkmesh import faceformer --checkpoint vocaset.pth --preset vocaset|biwi [--tracking-uri URI] [--alias A]
    talkmesh import mimic --checkpoint Epoch_125.pth --preset hdtf [--tracking-uri URI] [--alias A]

Trailing ``key=value`` arguments are dotted overrides of the data config
(``data.fps=60`` or ``fps=60``). Errors in the user's data or arguments print one line
naming the file or key and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from talkmesh.config import ConfigError, DataConfig, from_dict


def _data_config(fmt: str | None, root: str | None, overrides: Sequence[str]) -> DataConfig:
    from talkmesh.config import apply_overrides

    base: dict[str, Any] = {}
    if fmt:
        base["format"] = fmt
    if root:
        base["root"] = root
    stripped = []
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"argument {o!r}: expected key=value (e.g. data.fps=60)")
        stripped.append(o[len("data.") :] if o.startswith("data.") else o)
    return from_dict(DataConfig, apply_overrides(base, stripped))


def _print_summary(summary: dict[str, Any]) -> None:
    print(f"format       {summary['format']}   root {summary['root']}")
    print(
        f"motion       {summary['motion']} at {summary['fps']:g} fps, {summary['num_vertices']} vertices"
        + (f", {summary['param_dim']} params" if summary["param_dim"] else "")
        + (", head pose" if summary["has_head_pose"] else "")
    )
    print(f"train ids    {len(summary['train_subjects'])}: {' '.join(summary['train_subjects'])}")
    print(f"{'split':<11} {'subjects':>8} {'seqs':>6} {'frames':>9} {'motion s':>9} {'audio s':>9}")
    for name, s in summary["splits"].items():
        audio = "?" if s["audio_seconds"] is None else f"{s['audio_seconds']:.1f}"
        print(
            f"{name:<11} {len(s['subjects']):>8} {s['sequences']:>6} {s['frames']:>9} "
            f"{s['motion_seconds']:>9.1f} {audio:>9}"
        )
    regions = summary["regions"]
    if regions.get("missing"):
        print(f"regions      missing: {regions['missing']}")
    else:
        print(f"regions      lips {regions['lips']} vertices, upper face {regions['upper']} vertices")
    for key, src in regions["sources"].items():
        print(f"  {key:<6} {src}")
    skipped = summary.get("skipped", {})
    if skipped:
        print(f"skipped      {len(skipped)} clip(s), left out of every split:")
        for name, why in skipped.items():
            print(f"  {name}: {why}")
    for key, value in summary.get("notes", {}).items():
        print(f"note         {key}: {value}")


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from talkmesh.data import open_corpus

    cfg = _data_config(args.format, args.root, args.overrides)
    summary = open_corpus(cfg).summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    import time

    from talkmesh.data.synthetic import generate_corpus

    t0 = time.perf_counter()
    out = generate_corpus(Path(args.out), preset=args.preset, seed=args.seed, fps=args.fps)
    print(f"generated synthetic corpus ({args.preset}, seed {args.seed}) in {time.perf_counter() - t0:.1f} s: {out}")
    if not args.quiet:
        from talkmesh.data import open_corpus

        _print_summary(open_corpus(DataConfig(format="synthetic", root=str(out))).summary())
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    from talkmesh.data import open_corpus
    from talkmesh.eval.scoring import format_report, score_directory

    cfg = _data_config(args.format, args.root, args.overrides)
    report = score_directory(open_corpus(cfg), Path(args.pred), split=args.split)
    print(json.dumps(report, indent=2, default=_json_default) if args.json else format_report(report))
    return 0


def cmd_face_convert(args: argparse.Namespace) -> int:
    from talkmesh.face.flame import convert_pkl_to_npz

    convert_pkl_to_npz(args.pkl, args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from talkmesh.serving.launch import run_serve

    run_serve(args.config, args.overrides)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from talkmesh.ops.importers import get_importer, import_checkpoint
    from talkmesh.ops.importers.run import unused_summary

    report = import_checkpoint(
        args.method,
        args.checkpoint,
        args.preset,
        tracking_uri=args.tracking_uri or None,
        register=not args.no_register,
        alias=args.alias or None,
    )
    imp = report.imported
    print(f"imported     {imp.source} (sha256 {imp.sha256}) as {args.method}, preset {imp.preset}")
    unused = unused_summary(get_importer(args.method).key_map, imp.unused)
    print(f"tensors      {len(imp.names)} mapped; not loaded: {unused}")
    if report.version is not None:
        name = f"talkmesh-{args.method}"
        print(f"mlflow       run {report.run_id} in {report.tracking_uri}")
        print(f"registered   {name} version {report.version}" + (f" (@{report.alias})" if report.alias else ""))
        print(f"serve with   talkmesh serve method={args.method} model=models:/{name}/{report.version}")
    return 0


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def build_parser() -> argparse.ArgumentParser:
    from talkmesh.data.corpus import available_formats

    p = argparse.ArgumentParser(prog="talkmesh", description="speech-driven 3D facial animation platform")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="inspect or generate corpora").add_subparsers(dest="data_command", required=True)
    ins = data.add_parser("inspect", help="subjects, sequences, frames, fps, vertices, audio, regions per split")
    ins.add_argument("--format", choices=available_formats(), required=True)
    ins.add_argument("--root", default="", help="dataset root (empty for the cached synthetic corpus)")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.add_argument("overrides", nargs="*", help="data config overrides, e.g. fps=60 lip_regions=/x/lve.txt")
    ins.set_defaults(func=cmd_data_inspect)

    syn = data.add_parser("synth", help="generate the synthetic corpus in the processed layout")
    syn.add_argument("--out", required=True)
    syn.add_argument("--preset", choices=["small", "default"], default="default")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--fps", type=float, default=25.0)
    syn.add_argument("--quiet", action="store_true", help="do not print the inspection summary")
    syn.set_defaults(func=cmd_data_synth)

    met = sub.add_parser("metrics", help="score saved predictions (<seq>.npy or <seq>_condition_<subj>.npy)")
    met.add_argument("--pred", required=True, help="directory of prediction .npy files [T, V*3]")
    met.add_argument("--format", choices=available_formats(), required=True)
    met.add_argument("--root", default="")
    met.add_argument("--split", default=None, help="split to score (default: the corpus's test splits)")
    met.add_argument("--json", action="store_true")
    met.add_argument("overrides", nargs="*")
    met.set_defaults(func=cmd_metrics)

    face = sub.add_parser("face", help="face model utilities").add_subparsers(dest="face_command", required=True)
    conv = face.add_parser("convert", help="FLAME generic_model.pkl (chumpy) -> npz, no chumpy needed")
    conv.add_argument("--pkl", required=True)
    conv.add_argument("--out", required=True)
    conv.set_defaults(func=cmd_face_convert)

    srv = sub.add_parser("serve", help="run the style service (Ray Serve) of a Serve config file on loopback Ray")
    srv.add_argument("--config", default="serve/config.yaml", help="Serve config file (default: serve/config.yaml)")
    srv.add_argument("overrides", nargs="*", help="application args, e.g. method=faceformer style_dir=/srv/styles")
    srv.set_defaults(func=cmd_serve)

    imp = sub.add_parser("import", help="load a released reference checkpoint into a method and register it")
    imp.add_argument("method", help="the method the weights belong to (faceformer, mimic)")
    imp.add_argument("--checkpoint", required=True, help="the authors' released file, e.g. vocaset.pth")
    imp.add_argument("--preset", required=True, help="the released setting: vocaset or biwi (FaceFormer), hdtf (Mimic)")
    imp.add_argument("--tracking-uri", default="", help="MLflow store (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    imp.add_argument("--alias", default="", help="also point talkmesh-<method>@ALIAS at the new version")
    imp.add_argument("--no-register", action="store_true", help="only map and check the weights")
    imp.set_defaults(func=cmd_import)

    # Listed for --help only: main() hands `sweep ...` to talkmesh.ops.sweep.main (same as sweeps/run.py).
    sub.add_parser(
        "sweep",
        help="run a Ray Tune sweep: talkmesh sweep sweeps/<method>.yaml [--num-samples N] [key=value ...]",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from talkmesh.audio.io import AudioError
    from talkmesh.data.errors import DataError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sweep"]:  # its own parser: options and key=value overrides may interleave
        from talkmesh.ops.sweep import main as sweep_main

        return sweep_main(argv[1:], prog="talkmesh sweep")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, DataError, AudioError, FileNotFoundError) as e:
        print(f"talkmesh: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # FaceModelError and other validation errors are ValueErrors
        if type(e).__module__.startswith("talkmesh"):
            print(f"talkmesh: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
