"""`talkmesh` console entry.

    talkmesh data inspect --format F --root DIR [--json] [key=value ...]
    talkmesh data synth --out DIR [--preset small|default] [--seed N] [--fps 25]
    talkmesh metrics --pred DIR --format F --root DIR [--split NAME] [--json] [key=value ...]
    talkmesh face convert --pkl generic_model.pkl --out flame.npz
    talkmesh serve [--config serve/config.yaml] [key=value ...]
    talkmesh keys create --tenant T [--label L] [--db URL]
    talkmesh keys list [--tenant T] [--db URL] [--json]
    talkmesh keys revoke KEY_ID [--tenant T] [--db URL]
    talkmesh sweep sweeps/<method>.yaml [--num-samples N] [--name NAME] [--no-register] [key=value ...]
    talkmesh import faceformer --checkpoint vocaset.pth --preset vocaset|biwi [--tracking-uri URI] [--alias A]
    talkmesh import mimic --checkpoint Epoch_125.pth --preset hdtf [--tracking-uri URI] [--alias A]
    talkmesh evaluate --method M --model ALIAS|VERSION|DIR --format F --root DIR [--split NAME] [--limit N]
                      [--adapted] [--output metrics.json] [--save-predictions DIR] [--json] [--log] [key=value ...]
    talkmesh leaderboard [--methods M ...] [--versions M=V ...] --format F [--root DIR] [--split S] [--limit N]
                         [--out DIR] [--no-log] [key=value ...]
    talkmesh animate --model models:/talkmesh-<method>@ALIAS|/VERSION|DIR --audio a.wav [--style NAME]
                     [--reference-audio r.wav --reference-motion r.npy] [--template t.npy]
                     [--faces f.npy | --face-model flame.npz] --out motion.npz|.glb|.mp4
    talkmesh export --motion motion.npz --out x.glb|x.csv|x.json [--rig rig.npz] [--rest t.npy] [--faces f.npy]

Trailing ``key=value`` arguments are dotted overrides of the data config
(``data.fps=60`` or ``fps=60``). Errors in the user's data or arguments print one line
naming the file or key and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from talkmesh.config import ConfigError, DataConfig, from_dict

if TYPE_CHECKING:  # pragma: no cover
    from talkmesh.data.corpus import Corpus
    from talkmesh.methods.base import MotionMethod


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


def _key_store(args: argparse.Namespace) -> Any:
    """The service's key store at ``--db`` (default: the URL the service uses)."""
    from talkmesh.serving.tenants import KeyStore, default_db_url

    return KeyStore(args.db or default_db_url())


def _keys_call(args: argparse.Namespace, fn: Any) -> Any:
    """``fn(store)``, a database failure (unreachable server, unwritable file) as a ConfigError."""
    import sqlalchemy as sa

    store = _key_store(args)
    try:
        return fn(store)
    except sa.exc.SQLAlchemyError as e:
        raise ConfigError(f"--db {store.url}: {type(e).__name__}: {e}") from None


def _when(t: float | None) -> str:
    """Unix seconds as UTC ISO 8601 (``-`` for none)."""
    import datetime

    if t is None:
        return "-"
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def cmd_keys_create(args: argparse.Namespace) -> int:
    key_id, token = _keys_call(args, lambda store: store.create(args.tenant, args.label))
    print(f"created      API key {key_id} for tenant {args.tenant}" + (f" ({args.label})" if args.label else ""))
    print(f"token        {token}")
    print("             shown once: it cannot be shown again (only its hash is stored); keep it secret")
    print("send it as   Authorization: Bearer <token>   (or X-API-Key: <token>)")
    print(f"revoke with  talkmesh keys revoke {key_id}")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    records = _keys_call(args, lambda store: store.list(args.tenant or None))
    if args.json:
        print(json.dumps([r.as_dict() for r in records], indent=2))
        return 0
    if not records:
        print("no API keys" + (f" for tenant {args.tenant}" if args.tenant else ""))
        return 0
    print(f"{'key id':<16}  {'tenant':<20} {'created':<20} {'last used':<20} {'revoked':<20} label")
    for r in records:
        print(
            f"{r.key_id:<16}  {r.tenant:<20} {_when(r.created):<20} {_when(r.last_used):<20} "
            f"{_when(r.revoked_at):<20} {r.label}"
        )
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    record = _keys_call(args, lambda store: store.revoke(args.key_id, args.tenant or None))
    print(f"revoked      API key {record.key_id} of tenant {record.tenant} (since {_when(record.revoked_at)})")
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
        templates=args.templates or None,
    )
    imp = report.imported
    print(f"imported     {imp.source} (sha256 {imp.sha256}) as {args.method}, preset {imp.preset}")
    unused = unused_summary(get_importer(args.method).key_map, imp.unused)
    print(f"tensors      {len(imp.names)} mapped; not loaded: {unused}")
    carried = len(imp.method.templates)
    print(f"templates    {carried} training speakers' carried" if carried else "templates    none (no --templates)")
    if report.version is not None:
        name = f"talkmesh-{args.method}"
        print(f"mlflow       run {report.run_id} in {report.tracking_uri}")
        print(f"registered   {name} version {report.version}" + (f" (@{report.alias})" if report.alias else ""))
        print(f"serve with   talkmesh serve method={args.method} model=models:/{name}/{report.version}")
    return 0


def _is_local_model(model: str) -> bool:
    """``--model`` names a directory (a path that exists or has a separator), not an alias or version."""
    return Path(model).expanduser().exists() or "/" in model or os.sep in model or model.startswith((".", "~"))


def _check_store(uri: str) -> None:
    """A SQLite store must exist: loading from a missing one would create an empty database."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ConfigError(
            f"MLflow store {uri} does not exist; point --tracking-uri or MLFLOW_TRACKING_URI at the store "
            "that `talkmesh import` (or the training job) registered the model into"
        )


def _load_local(args: argparse.Namespace) -> tuple[MotionMethod, dict[str, Any]]:
    """The method saved in the directory ``--model`` (method.json + model.pt)."""
    from talkmesh.train.checkpoint import METHOD_FILE, MODEL_FILE, load_method

    path = Path(args.model).expanduser()
    what = f"a method or checkpoint directory ({METHOD_FILE} + {MODEL_FILE}) or an alias or version of talkmesh-"
    what += args.method
    if path.is_file():
        raise ConfigError(
            f"--model {args.model}: a file; expected {what}. Released reference weights are registered first: "
            f"talkmesh import {args.method} --checkpoint {args.model} --preset ... --alias published"
        )
    if not (path / METHOD_FILE).is_file():
        raise ConfigError(f"--model {args.model}: no {METHOD_FILE} there; expected {what}")
    loaded = load_method(path, device=args.device)
    if loaded.info.get("method") != args.method:
        raise ConfigError(f"--model {args.model}: holds method {loaded.info.get('method')!r}, not {args.method!r}")
    return loaded.method, {"path": str(path.resolve())}


def _load_registered(args: argparse.Namespace) -> tuple[MotionMethod, dict[str, Any]]:
    """The registered version of ``talkmesh-<method>`` that ``--model`` names (an alias or a version number)."""
    from talkmesh.ops import tracking

    uri = args.tracking_uri or tracking.tracking_uri()
    _check_store(uri)
    try:
        mv = tracking.model_version(args.method, args.model, uri=uri)
    except LookupError as e:
        raise ConfigError(
            f"--model {args.model}: {e}; expected an alias or version number of talkmesh-{args.method}, "
            "or a method directory"
        ) from None
    method, _, _ = tracking.load_registered(args.method, str(mv["version"]), device=args.device, uri=uri)
    alias = None if args.model.isdigit() else args.model
    model = {**mv, "alias": alias, "uri": f"models:/{mv['name']}/{mv['version']}", "tracking_uri": uri}
    return method, model


def _check_facts(method: MotionMethod, corpus: Corpus, model: str) -> None:
    """The model must have been trained on data like the corpus: same fps, vertices, motion kind
    (and, for one-hot methods, the same training subjects in the same order)."""
    facts, info = method.facts, corpus.info
    pairs = {
        "fps": (float(facts.fps), float(info.fps)),
        "vertices": (facts.num_vertices, info.num_vertices),
        "motion": (facts.motion, info.motion),
    }
    if method.conditioning == "onehot":
        pairs["training subjects"] = (list(facts.train_subjects), list(info.train_subjects))
    bad = [f"{k} {m!r} vs {c!r}" for k, (m, c) in pairs.items() if m != c and (k != "vertices" or m and c)]
    if bad:
        raise ConfigError(
            f"--model {model}: does not fit the {info.format} corpus at {info.root or '(cache)'} "
            f"(model vs corpus: {'; '.join(bad)}); data overrides such as fps=N change how the corpus is read"
        )


def _eval_splits(corpus: Corpus, split: str | None) -> list[str]:
    """``--split``, or the corpus's test splits (those the training job evaluates)."""
    info = corpus.info
    if split is None:
        if not info.eval_splits:
            raise ConfigError(f"{info.format}: the corpus names no test split; pass --split ({list(info.splits)})")
        return list(info.eval_splits)
    if split not in info.splits:
        raise ConfigError(f"--split {split}: not a split of the {info.format} corpus; splits: {list(info.splits)}")
    return [split]


def _check_options(args: argparse.Namespace) -> None:
    """What can be checked before the (long) evaluation: --limit, --output's folder, --device."""
    if args.limit < 0:
        raise ConfigError(f"--limit {args.limit}: expected 0 (every sequence) or a positive number")
    if args.output and not Path(args.output).expanduser().resolve().parent.is_dir():
        raise ConfigError(f"--output {args.output}: its folder does not exist")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"--device {args.device}: no CUDA device is available here (use --device cpu)")


def _eval_data(args: argparse.Namespace) -> DataConfig:
    """The data config of --format/--root/overrides, the root checked."""
    cfg = _data_config(args.format, args.root, args.overrides)
    if cfg.root and not Path(cfg.root).expanduser().is_dir():
        raise ConfigError(f"--root {cfg.root}: not a directory (expected your copy of the {cfg.format} dataset)")
    if not cfg.root and cfg.format != "synthetic":
        raise ConfigError(f"--root: the {cfg.format} format needs --root DIR, your copy of the dataset")
    return cfg


def cmd_leaderboard(args: argparse.Namespace) -> int:
    """Registered models (@alias, or --versions) ranked on one pinned protocol."""
    from talkmesh.data import open_corpus
    from talkmesh.methods.registry import available_methods
    from talkmesh.ops import leaderboard, tracking

    if args.limit < 0 or args.resamples < 100:
        raise ConfigError("--limit must be >= 0 and --resamples >= 100")
    versions = {}
    for item in args.versions:
        method, sep, version = item.partition("=")
        if not sep or method not in available_methods() or not version:
            raise ConfigError(f"--versions {item}: expected <method>=<version or alias>, e.g. faceformer=3")
        versions[method] = version
    corpus = open_corpus(_eval_data(args))
    split = args.split or _eval_splits(corpus, None)[0]
    _eval_splits(corpus, split)
    uri = args.tracking_uri or tracking.tracking_uri()
    _check_store(uri)
    models, skipped = [], {}
    for name in args.methods or sorted({*available_methods()} & ({*versions} or {*available_methods()})):
        try:
            mv = tracking.model_version(name, versions.get(name, args.alias), uri=uri)
        except LookupError as e:
            if args.methods or name in versions:
                raise ConfigError(f"{name}: {e}") from None
            continue  # not registered in this store: not a row
        method, _, _ = tracking.load_registered(name, str(mv["version"]), device=args.device, uri=uri)
        ref = f"models:/{mv['name']}/{mv['version']}"
        try:
            _check_facts(method, corpus, ref)
        except ConfigError as e:
            skipped[f"{name} v{mv['version']}"] = str(e)
            continue
        models.append((f"{name} v{mv['version']}", ref, method))
    if not models:
        raise ConfigError(f"no registered model in {uri} fits the {corpus.info.format} corpus; {skipped or ''}")
    board = leaderboard.build_leaderboard(corpus, split, models, limit=args.limit, seed=args.seed,
                                          resamples=args.resamples, skipped=skipped)  # fmt: skip
    files = board.write(Path(args.out).expanduser())
    print(board.markdown())
    print(f"wrote        {', '.join(str(f) for f in files)}")
    if not args.no_log:
        print(f"mlflow       run {leaderboard.log_leaderboard(board, uri)} in {uri} ({leaderboard.EXPERIMENT})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from talkmesh.data import open_corpus
    from talkmesh.eval.evaluate import evaluate_method, summary_table
    from talkmesh.ops.tracking import dataset_fingerprint

    _check_options(args)
    corpus = open_corpus(_eval_data(args))
    splits = _eval_splits(corpus, args.split)
    method, model = (_load_local if _is_local_model(args.model) else _load_registered)(args)
    _check_facts(method, corpus, args.model)
    summaries = {
        split: evaluate_method(
            method,
            corpus,
            split,
            limit=args.limit,
            adapted=args.adapted,
            save_dir=Path(args.save_predictions) / split if args.save_predictions else None,
        )
        for split in splits
    }
    info = corpus.info
    dataset = {"format": info.format, "root": str(info.root), "fingerprint": dataset_fingerprint(corpus)}
    report = {"method": args.method, "model": model, "dataset": dataset, "limit": args.limit, "splits": summaries}
    table = summary_table(summaries, info.format, method.method_metric_names)
    if args.log:
        report["run_id"] = _log_evaluation(args, corpus, report, table)
    if args.output:
        Path(args.output).expanduser().write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    if args.json:
        print(json.dumps(report, indent=2, default=_json_default))
    else:
        _print_evaluation(report, table, args)
    return 0


def _print_evaluation(report: dict[str, Any], table: str, args: argparse.Namespace) -> None:
    model, data = report["model"], report["dataset"]
    name = model.get("uri", model.get("path"))
    alias = f" (@{model['alias']})" if model.get("alias") else ""
    print(f"model        {name}{alias}")
    print(f"dataset      {data['format']} at {data['root'] or '(cache)'} (fingerprint {data['fingerprint']})")
    if report["limit"]:
        print(f"limit        {report['limit']} sequences per split (not the full protocol)")
    print(table)
    if args.save_predictions:
        root = "".join(f" {o}" for o in ([f"--root {data['root']}"] if args.root else []) + list(args.overrides))
        for split in report["splits"]:
            pred = Path(args.save_predictions) / split
            print(f"predictions  {pred} (score again: talkmesh metrics --pred {pred} --format {data['format']}{root})")
    if args.output:
        print(f"wrote        {args.output}")
    if "run_id" in report:
        print(f"mlflow       run {report['run_id']} in {model.get('tracking_uri') or args.tracking_uri or '(default)'}")


def _log_evaluation(args: argparse.Namespace, corpus: Corpus, report: dict[str, Any], table: str) -> str:
    """An MLflow run (experiment ``talkmesh-<method>``) holding the evaluation: the metrics as
    ``test/<split>/...`` linked to the registered version's logged model and to the corpus,
    the table and the report as artifacts, the model version as tags. Returns its id."""
    import tempfile

    from talkmesh.config import flatten
    from talkmesh.eval.evaluate import flat_metrics
    from talkmesh.ops import tracking

    model = report["model"]
    uri = model.get("tracking_uri") or args.tracking_uri or tracking.tracking_uri()
    tags = {"talkmesh.method": args.method, "talkmesh.evaluation": "true", "talkmesh.dataset": corpus.info.format,
            "talkmesh.dataset_root": corpus.info.root, "talkmesh.dataset_fingerprint": report["dataset"]["fingerprint"]}
    names = {"uri": "model_uri", "version": "model_version", "alias": "model_alias", "run_id": "model_run_id",
             "model_id": "logged_model_id", "path": "model_path"}
    tags.update({f"talkmesh.{names[k]}": v for k, v in model.items() if k in names and v is not None})
    params = {**flatten({"data": corpus.cfg}), "eval.splits": ",".join(report["splits"]), "eval.limit": args.limit,
              "eval.adapted": args.adapted}
    label = f"v{model['version']}" if "version" in model else Path(model["path"]).name
    experiment = tracking.model_name(args.method)
    with tracking.new_run(experiment, f"evaluate-{corpus.info.format}-{label}", params=params, tags=tags,
                          uri=uri) as run_id:  # fmt: skip
        tracking.log_dataset(run_id, corpus, context="evaluation", uri=uri)
        metrics = {k: v for split, s in report["splits"].items() for k, v in flat_metrics(s, f"test/{split}").items()}
        tracking.log_model_metrics(run_id, metrics, model.get("model_id"), corpus, uri=uri)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "test_metrics.txt").write_text(table + "\n")
            (Path(tmp) / "evaluation.json").write_text(json.dumps(report, indent=2, default=_json_default))
            tracking.log_artifacts(run_id, tmp, uri=uri)
    return run_id


def _animate_model(args: argparse.Namespace) -> tuple[MotionMethod, str]:
    """``--model``: a models:/ URI (the method is in its name), a method/checkpoint directory
    (the method is in its method.json), or an alias/version of ``talkmesh-<--method>``."""
    from talkmesh.train.checkpoint import load_method

    ref = args.model
    if ref.startswith("models:/"):
        body = ref.removeprefix("models:/")
        name, sep, args.model = body.partition("@") if "@" in body else body.partition("/")
        if not name.startswith("talkmesh-") or not sep or not args.model:
            raise ConfigError(f"--model {ref}: expected models:/talkmesh-<method>@<alias> or /<version>")
        args.method = name.removeprefix("talkmesh-")
        return _load_registered(args)[0], ref
    if _is_local_model(ref):
        if Path(ref).expanduser().is_file():
            raise ConfigError(f"--model {ref}: a file; import released weights first (talkmesh import ...)")
        try:
            loaded = load_method(Path(ref).expanduser(), device=args.device)
        except FileNotFoundError as e:
            raise ConfigError(f"--model {ref}: {e}") from None
        return loaded.method, str(Path(ref).expanduser().resolve())
    if not args.method:
        raise ConfigError(f"--model {ref}: an alias or version needs --method (or models:/talkmesh-<method>@{ref})")
    return _load_registered(args)[0], f"models:/talkmesh-{args.method}@{ref}"


def _npy(path: str, flag: str) -> Any:
    import numpy as np

    try:
        return np.load(Path(path).expanduser(), allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{flag} {path}: not a readable .npy ({e})") from None


def _faces_for(args: argparse.Namespace, method: MotionMethod) -> Any:
    """--faces, else the --face-model's triangles (also given to the method), else None."""
    if args.face_model:
        from talkmesh.data.corpus import load_face_model

        layer = load_face_model(args.face_model)
        method.set_face_model(layer)
        if not args.faces:
            return layer.faces
    return _npy(args.faces, "--faces") if args.faces else None


def cmd_animate(args: argparse.Namespace) -> int:
    """Motion for --audio from a registered or saved model, without the service."""
    import numpy as np

    from talkmesh.audio.io import load_audio
    from talkmesh.serving.inputs import reference_motion

    out = Path(args.out).expanduser()
    if out.suffix.lower() not in (".npz", ".glb", ".mp4"):
        raise ConfigError(f"--out {args.out}: expected a .npz, .glb or .mp4 file")
    if not out.resolve().parent.is_dir():
        raise ConfigError(f"--out {args.out}: its folder does not exist")
    if bool(args.reference_audio) != bool(args.reference_motion):
        raise ConfigError("--reference-audio and --reference-motion: give both (one synchronised clip) or neither")
    if args.style and args.reference_audio:
        raise ConfigError("--style and --reference-audio: a training speaker or a reference clip, not both")
    method, label = _animate_model(args)
    facts = method.facts
    faces = _faces_for(args, method)
    audio = load_audio(args.audio)  # (S,) 16 kHz
    template = _npy(args.template, "--template") if args.template else None
    style: Any = args.style or None
    try:
        if args.reference_audio:
            ref = {"audio": load_audio(args.reference_audio)}
            if template is not None:
                ref["template"] = template  # the new speaker's neutral face
            motion = _npy(args.reference_motion, "--reference-motion")
            ref.update(reference_motion(motion, facts.to_dict(), "--reference-motion", fps=float(facts.fps),
                                        min_seconds=1.0, max_seconds=120.0))  # fmt: skip
            style = method.adapt(ref)
        arrays = {k: v.detach().cpu().float().numpy() for k, v in method.generate(audio, template, style).items()}
        rest = template if template is not None else method.template_for(style)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"cannot animate with {label}: {e}") from None
    fps = float(facts.fps)
    if out.suffix.lower() == ".npz":
        extra = {} if rest is None else {"template": np.asarray(rest, dtype=np.float32)}
        np.savez(out, fps=np.float32(fps), **extra, **arrays)
    elif "vertices" not in arrays:
        raise ConfigError(f"--out {args.out}: {label} returns no vertices (give --face-model for FLAME models)")
    elif out.suffix.lower() == ".glb":
        from talkmesh.export import write_glb

        write_glb(out, arrays["vertices"], fps, faces, rest, extras={"model": label, "audio": Path(args.audio).name})
    else:
        from talkmesh.render import render_motion

        render_motion(arrays["vertices"], faces, out, fps, audio=audio)
    frames = next(iter(arrays.values())).shape[0]
    print(f"wrote {out}: {frames} frames at {fps:g} fps from {label}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A motion .npz (from `talkmesh animate` or the service) -> .glb, or rig weights as .csv/.json."""
    import numpy as np

    from talkmesh.export import load_rig, solve_weights, write_csv, write_glb, write_json

    out = Path(args.out).expanduser()
    kind = out.suffix.lower()
    if kind not in (".glb", ".csv", ".json"):
        raise ConfigError(f"--out {args.out}: expected a .glb, .csv or .json file")
    if kind != ".glb" and not args.rig:
        raise ConfigError(f"--out {args.out}: rig weights need --rig rig.npz (neutral, shapes, names)")
    try:
        with np.load(Path(args.motion).expanduser(), allow_pickle=False) as z:
            motion = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ConfigError(f"--motion {args.motion}: not a readable .npz ({e})") from None
    if "vertices" not in motion:
        raise ConfigError(f"--motion {args.motion}: no 'vertices' array (T, V, 3); it holds {sorted(motion)}")
    fps = args.fps or (float(motion["fps"]) if "fps" in motion else 0.0)
    if not fps:
        raise ConfigError(f"--motion {args.motion}: no 'fps' in it; give --fps")
    rest = _npy(args.rest, "--rest") if args.rest else motion.get("template")
    try:
        if kind == ".glb":
            faces = _npy(args.faces, "--faces") if args.faces else None
            s = write_glb(out, motion["vertices"], fps, faces, rest, max_targets=args.targets)
            print(f"wrote {out}: {s.frames} frames, {s.targets} morph targets (relative error {s.relative_error:.2e})")
            return 0
        if rest is None:
            raise ConfigError(f"--motion {args.motion}: no 'template' in it; give --rest (the face it was made on)")
        result = solve_weights(motion["vertices"], rest, load_rig(args.rig), fps, smooth=args.smooth, scale=args.scale)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    (write_csv if kind == ".csv" else write_json)(out, result)
    print(f"wrote {out}: {len(result.names)} blendshapes x {len(result.weights)} frames, "
          f"RMS residual {float(result.residual.mean()):.3g}")  # fmt: skip
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


def _add_corpus_args(p: argparse.ArgumentParser) -> None:
    """The corpus and the MLflow store of `evaluate` and `leaderboard`."""
    from talkmesh.data.corpus import available_formats

    p.add_argument("--format", choices=available_formats(), required=True)
    p.add_argument("--root", default="", help="dataset root (empty for the cached synthetic corpus)")
    p.add_argument("--tracking-uri", default="", help="MLflow store (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("overrides", nargs="*", help="data config overrides, e.g. fps=60 max_conditions=8")


def _add_keys_parser(sub: Any) -> None:
    """``talkmesh keys create|list|revoke``: the style service's API keys (only hashes stored)."""
    db_help = "service database URL (default: $TALKMESH_SERVICE_DB, else sqlite:///<$TALKMESH_HOME>/service.db)"
    keys = sub.add_parser("keys", help="create, list or revoke the style service's API keys")
    keys = keys.add_subparsers(dest="keys_command", required=True)
    kc = keys.add_parser("create", help="a new API key for a tenant; its token is printed once")
    kc.add_argument("--tenant", required=True, help="tenant name: a-z, 0-9, '-', '_' (up to 63, e.g. acme)")
    kc.add_argument("--label", default="", help="a note on what the key is for (e.g. ci, alice's laptop)")
    kc.add_argument("--db", default="", help=db_help)
    kc.set_defaults(func=cmd_keys_create)
    kl = keys.add_parser("list", help="keys (id, tenant, label, created, last used, revoked); never secrets")
    kl.add_argument("--tenant", default="", help="only this tenant's keys")
    kl.add_argument("--db", default="", help=db_help)
    kl.add_argument("--json", action="store_true", help="machine-readable output")
    kl.set_defaults(func=cmd_keys_list)
    kr = keys.add_parser("revoke", help="refuse a key from now on (every replica); revoking twice is harmless")
    kr.add_argument("key_id", help="the key id (`talkmesh keys list`; the 16 hex digits after tmk_ in a token)")
    kr.add_argument("--tenant", default="", help="only if the key belongs to this tenant")
    kr.add_argument("--db", default="", help=db_help)
    kr.set_defaults(func=cmd_keys_revoke)


def build_parser() -> argparse.ArgumentParser:
    from talkmesh.data.corpus import available_formats
    from talkmesh.methods.registry import available_methods

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

    _add_keys_parser(sub)

    imp = sub.add_parser("import", help="load a released reference checkpoint into a method and register it")
    imp.add_argument("method", help="the method the weights belong to (faceformer, mimic)")
    imp.add_argument("--checkpoint", required=True, help="the authors' released file, e.g. vocaset.pth")
    imp.add_argument("--preset", required=True, help="the released setting: vocaset or biwi (FaceFormer), hdtf (Mimic)")
    imp.add_argument("--tracking-uri", default="", help="MLflow store (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    imp.add_argument("--alias", default="", help="also point talkmesh-<method>@ALIAS at the new version")
    imp.add_argument("--no-register", action="store_true", help="only map and check the weights")
    imp.add_argument("--templates", default="",
                     help="the dataset's templates.pkl (or a templates.npz): the model carries its training "
                     "speakers' templates and animates audio alone")
    imp.set_defaults(func=cmd_import)

    ev = sub.add_parser("evaluate", help="score a registered (or saved) model on your copy of a corpus")
    ev.add_argument("--method", choices=available_methods(), required=True, help="the method of talkmesh-<method>")
    ev.add_argument("--model", required=True,
                    help="an alias (e.g. published, champion) or version number of talkmesh-<method>, "
                    "or a method/checkpoint directory (method.json + model.pt)")
    _add_corpus_args(ev)
    ev.add_argument("--split", default=None, help="split to evaluate (default: the corpus's test splits)")
    ev.add_argument("--limit", type=int, default=0, help="at most N sequences per split, every speaker (0 = all)")
    ev.add_argument("--adapted", action="store_true", help="also score the style adapt() picks on each reference")
    ev.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")
    ev.add_argument("--output", default="", help="write the metrics as JSON to this file")
    ev.add_argument("--save-predictions", default="", help="write <split>/<seq>.npy for `talkmesh metrics`")
    ev.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ev.add_argument("--log", action="store_true", help="log an MLflow run linked to the model version")
    ev.set_defaults(func=cmd_evaluate)

    lb = sub.add_parser("leaderboard", help="rank registered models on one pinned protocol (Markdown, HTML, JSON)")
    lb.add_argument("--methods", nargs="*", choices=available_methods(), default=[],
                    help="methods to rank (default: every method registered in the store)")
    lb.add_argument("--versions", nargs="*", default=[], help="<method>=<version or alias> instead of --alias")
    lb.add_argument("--alias", default="champion", help="the registered version of each method (default champion)")
    _add_corpus_args(lb)
    lb.add_argument("--split", default=None, help="split to rank on (default: the corpus's first test split)")
    lb.add_argument("--limit", type=int, default=0, help="at most N sequences, every speaker (0 = all)")
    lb.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the confidence intervals")
    lb.add_argument("--seed", type=int, default=0, help="seed of the conditions and the bootstrap")
    lb.add_argument("--out", default="leaderboard", help="folder for leaderboard.md/.html/.json")
    lb.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    lb.add_argument("--no-log", action="store_true", help="do not log an MLflow run")
    lb.set_defaults(func=cmd_leaderboard)

    an = sub.add_parser("animate", help="motion for an audio file from a registered or saved model (no service)")
    an.add_argument("--model", required=True,
                    help="models:/talkmesh-<method>@<alias> or /<version>, a method/checkpoint directory, "
                    "or an alias/version with --method")
    an.add_argument("--method", choices=available_methods(), default="", help="with an alias or version as --model")
    an.add_argument("--audio", required=True, help="speech: WAV/FLAC/OGG, any sample rate")
    an.add_argument("--style", default="", help="a training speaker's name (default: the model's default style)")
    an.add_argument("--reference-audio", default="", help="a new speaker's clip to adapt to (with --reference-motion)")
    an.add_argument("--reference-motion", default="", help=".npy motion of that clip: (T, V, 3) or FLAME (T, 53|56)")
    an.add_argument("--template", default="", help=".npy (V, 3) neutral face (default: the style's; with a "
                    "reference clip, that speaker's face)")
    an.add_argument("--faces", default="", help=".npy (F, 3) triangles for .glb/.mp4 (default: points)")
    an.add_argument("--face-model", default="", help="FLAME .npz: vertices for FLAME-parameter models, and triangles")
    an.add_argument("--out", required=True, help="motion.npz (every output, fps, template), .glb or .mp4")
    an.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    an.add_argument("--tracking-uri", default="", help="MLflow store (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    an.set_defaults(func=cmd_animate)

    ex = sub.add_parser("export", help="motion .npz -> glTF (.glb), or a rig's blendshape weights (.csv/.json)")
    ex.add_argument("--motion", required=True, help=".npz with vertices (T, V, 3) [, fps, template]")
    ex.add_argument("--out", required=True, help=".glb, or .csv (capture layout) / .json rig weights")
    ex.add_argument("--fps", type=float, default=0.0, help="frame rate when the .npz has none")
    ex.add_argument("--rest", default="", help=".npy (V, 3) face the motion was made on (default: its template)")
    ex.add_argument("--faces", default="", help=".glb: .npy (F, 3) triangles (default: points)")
    ex.add_argument("--targets", type=int, default=32, help=".glb: at most N morph targets (default 32)")
    ex.add_argument("--rig", default="", help=".npz: neutral (Vr, 3), shapes (K, Vr, 3), names (K,) [, correspondence]")
    ex.add_argument("--smooth", type=float, default=0.0, help="rig weights: pull towards the previous frame's")
    ex.add_argument("--scale", type=float, default=1.0, help="rig weights: motion units -> rig units (e.g. 100 m->cm)")
    ex.set_defaults(func=cmd_export)

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
