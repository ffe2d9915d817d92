"""Model cards: what a registered version is, what it was trained on, how it scores and how
to make it again, in Markdown, written as the version's registry description and as an
artifact of its run (``model_card/v<N>.md``).

The card is built from the registry and the run alone (params, tags, metrics), so a job, an
import and a user (:func:`write_model_card`) make the same card for the same version.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["DATA_NOTES", "FACE_MODEL_NOTE", "PAPERS", "model_card", "write_model_card"]

PAPERS = {
    "faceformer": "FaceFormer: Speech-Driven 3D Facial Animation with Transformers (Fan et al., CVPR 2022)",
    "mimic": "Mimic: Speaking Style Disentanglement for Speech-Driven 3D Facial Animation "
    "(AAAI 2024, arXiv 2312.10877)",
    "dualtalker": "DualTalker: cross-modal dual learning (Su, Yang & Li, arXiv 2311.04766); talkmesh's version is a "
    "reconstruction from the abstract (../shared/specs/dualtalker.md), not the authors' method",
    "adamesh": "AdaMesh: personalized facial expressions and head poses for adaptive speech-driven 3D facial "
    "animation (arXiv 2310.07236; IEEE TMM 2025)",
    "deeptalk": "DEEPTalk: dynamic emotion embedding for probabilistic speech-driven 3D face animation "
    "(arXiv 2408.06010, AAAI 2025)",
}
DATA_NOTES = {
    "synthetic": "talkmesh's own synthetic corpus, generated from a seed: no third-party data, no licence terms.",
    "vocaset": "VOCASET is distributed by the Max Planck Institute for Intelligent Systems under its own licence for "
    "non-commercial scientific research; a model trained on it is bound by those terms. Read them before any use.",
    "biwi": "The BIWI 3D Audiovisual Corpus of Affective Communication is distributed by ETH Zurich for research "
    "under its own agreement; a model trained on it is bound by those terms.",
    "mead": "MEAD is distributed under its own research licence; the FLAME fits used here add the face model's terms.",
    "hdtf": "3D-HDTF is reconstructed from HDTF's web videos, whose own terms apply to the data and to models of it.",
}
FACE_MODEL_NOTE = (
    "The FLAME face model (MPI-IS) is licensed separately and is never shipped with talkmesh: FLAME-parameter models "
    "need the user's own copy, and meshes on FLAME's topology (VOCASET, MEAD, 3D-HDTF) fall under its terms."
)
CARD_METRICS = ("lve", "fdd", "lve_l2", "mve_mean_l2")


def _metrics_table(metrics: Mapping[str, float], protocols: Mapping[str, str]) -> list[str]:
    """``test/<split>/<metric>`` run metrics as one row per split (with its protocol id)."""
    splits = sorted({k.split("/")[1] for k in metrics if k.startswith("test/") and k.count("/") == 2})
    if not splits:
        return ["No test metrics: this version was not evaluated when it was registered "
                "(`talkmesh evaluate` or `talkmesh leaderboard` scores it)."]  # fmt: skip
    lines = ["| split | " + " | ".join(CARD_METRICS) + " | protocol |", "|" + "---|" * (len(CARD_METRICS) + 2)]
    for split in splits:
        cells = [f"{metrics[k]:.4g}" if (k := f"test/{split}/{m}") in metrics else "-" for m in CARD_METRICS]
        lines.append(f"| {split} | " + " | ".join(cells) + f" | {protocols.get(split, '-')} |")
    lines.append("\nNative units (LVE in the dataset's units squared); the protocol id pins the split, masks, "
                 "fps, conditioning and metric variants (`talkmesh leaderboard` prints the same id for the same "
                 "protocol).")  # fmt: skip
    return lines


def _fps(params: Mapping[str, Any]) -> str:
    fps = params.get("data.fps", params.get("facts.fps"))
    return "the dataset's native rate" if fps is None or float(fps) == 0 else f"{float(fps):g}"


def model_card(method: str, version: int, uri: str | None = None, protocols: Mapping[str, str] | None = None) -> str:
    """The Markdown card of ``talkmesh-<method>`` version ``version``; ``protocols`` maps a
    test split to the protocol id its metrics were computed under."""
    from talkmesh.ops import tracking

    client = tracking.client(uri)
    name = tracking.model_name(method)
    mv = client.get_model_version(name, str(version))
    run = client.get_run(mv.run_id) if mv.run_id else None
    params: dict[str, Any] = dict(run.data.params) if run else {}
    tags: dict[str, Any] = dict(run.data.tags) if run else {}
    metrics: dict[str, float] = dict(run.data.metrics) if run else {}
    if run and "data.fingerprint" not in params:  # a staged job's parent: the data is its stages' (the last one's)
        children = tracking.child_runs(run.info.run_id, uri=uri)
        if children:
            last = client.get_run(children[-1]["run_id"]).data
            params = {**dict(last.params), **params}
            tags = {**{k: v for k, v in last.tags.items() if k.startswith("talkmesh.dataset")}, **tags}
    fmt = params.get("data.format") or params.get("facts.format") or "unknown"
    lines = [f"# {name} version {version}", "", f"**Method** {method}: {PAPERS.get(method, 'no paper on file')}."]
    imported = {k.split(".", 2)[-1]: v for k, v in tags.items() if k.startswith("talkmesh.import.")}
    if imported:
        lines += ["", f"**Source**: published checkpoint {imported.get('source', '?')} (sha256 "
                  f"{imported.get('sha256', '?')}), mapped onto talkmesh's {method} with preset "
                  f"{imported.get('preset', '?')}; {imported.get('tensors', '?')} tensors."]  # fmt: skip
    elif run:
        lines += ["", f"**Source**: run {run.info.run_name} ({run.info.run_id}) of experiment {run.info.experiment_id}"
                  + (f", Ray job {tags['ray.job_submission_id']}" if "ray.job_submission_id" in tags else "") + "."]
    fingerprint = params.get("data.fingerprint") or tags.get("talkmesh.dataset_fingerprint", "-")
    lines += ["", "## Training data", "",
              f"- format **{fmt}**, root `{params.get('data.root') or '(cache)'}`, fingerprint `{fingerprint}`",
              f"- fps {_fps(params)}; preset "
              f"{tags.get('talkmesh.preset', params.get('preset', '-'))}",
              "", "## Licences", "", f"- Data: {DATA_NOTES.get(fmt, 'see the dataset’s own licence.')}",
              f"- Face model: {FACE_MODEL_NOTE}",
              "- talkmesh's code: the repository's licence; the card does not grant rights the data withholds.",
              "", "## Metrics", "", *_metrics_table(metrics, dict(protocols or {})),
              "", "## Reproduce", ""]  # fmt: skip
    command = tags.get("talkmesh.command")
    if command:
        commit = tags.get("mlflow.source.git.commit")
        dirty = " (with uncommitted changes)" if tags.get("talkmesh.git_dirty") == "True" else ""
        lines += [f"At commit `{commit}`{dirty}:" if commit else "From the repository:", "", f"    {command}"]
    elif imported:
        lines += [f"    talkmesh import {method} --checkpoint <the file with sha256 {imported.get('sha256', '?')}> "
                  f"--preset {imported.get('preset', '?')}"]  # fmt: skip
    else:
        lines += ["The run recorded no command line."]
    return "\n".join(lines) + "\n"


def write_model_card(
    method: str, version: int, uri: str | None = None, protocols: Mapping[str, str] | None = None
) -> str:
    """Build the card, set it as the version's registry description and log it to the
    version's run as ``model_card/v<version>.md``. Returns the card."""
    from talkmesh.ops import tracking

    card = model_card(method, version, uri, protocols)
    client = tracking.client(uri)
    name = tracking.model_name(method)
    client.update_model_version(name, str(version), description=card)
    run_id = client.get_model_version(name, str(version)).run_id
    if run_id:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"v{version}.md"
            path.write_text(card)
            tracking.log_artifacts(run_id, path, "model_card", uri=uri)
    return card
