"""Writing the synthetic corpus into a directory (the processed layout; see the package
docstring): face model, templates, regions, then per speaker its clips' audio, params,
vertices and text, and ``meta.json`` last.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from talkmesh.data.synthetic.audio import synthesize_audio
from talkmesh.data.synthetic.content import (
    clip_rng,
    make_sentences,
    make_speakers,
    phoneme_timeline,
    sequence_plan,
    timeline_frames,
)
from talkmesh.data.synthetic.face import build_face_model
from talkmesh.data.synthetic.motion import synthesize_motion
from talkmesh.data.synthetic.presets import (
    AUDIO_RATE,
    EMOTION_EFFECTS,
    EMOTIONS,
    EVAL_SPLITS,
    EXPRESSION_COMPONENTS,
    GENERATOR_VERSION,
    NUM_EXPR,
    NUM_SHAPE,
    PHONEME_CLASSES,
    PHONEMES,
    SPLITS,
    STYLE_RANGES,
    UNSEEN_SPLITS,
    Preset,
    get_preset,
)

if TYPE_CHECKING:
    from talkmesh.face.flame import FlameLayer

__all__ = ["write_corpus"]

_Clip = tuple[dict[str, Any], str, np.ndarray, np.ndarray]  # plan item, text, audio (S,), params (T, 56)


def write_corpus(out: Path, preset_name: str, seed: int, fps: float) -> None:
    """Generate everything into the (empty, existing) directory ``out``; meta.json last."""
    from talkmesh.face.flame import FlameLayer

    preset = get_preset(preset_name)
    arrays, masks = build_face_model(preset_name, seed)
    FlameLayer.from_arrays(**arrays).save_npz(out / "face_model.npz")
    layer = FlameLayer.from_file(out / "face_model.npz")  # exactly what readers will load
    speakers = make_speakers(preset, seed)
    sentences = make_sentences(preset, seed)
    plan = sequence_plan(preset, speakers, seed)
    _write_static(out, layer, speakers, masks)

    sequences: dict[str, Any] = {}
    for i, spk in enumerate(speakers):
        clips = [
            _synthesize_clip(spk, item, sentences, preset, seed, n, fps)
            for n, item in enumerate(plan)
            if item["speaker"] == i
        ]
        sequences.update(_write_speaker_clips(out, layer, spk, clips, fps))
    sequences = dict(sorted(sequences.items()))
    meta = _meta(preset_name, seed, fps, int(arrays["v_template"].shape[0]), speakers, sentences, sequences)
    (out / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def _write_static(out: Path, layer: FlameLayer, speakers: list[dict[str, Any]], masks: dict[str, np.ndarray]) -> None:
    """The sub-directories, templates.pkl, FLAME_masks.pkl and regions/{lve,fdd}.txt."""
    for sub in ("vertices_npy", "params_npy", "wav", "text", "regions"):
        (out / sub).mkdir()
    templates = {s["name"]: layer.template(s["shape"]) for s in speakers}  # (V, 3) float32
    with open(out / "templates.pkl", "wb") as fh:
        pickle.dump(templates, fh, protocol=4)
    with open(out / "FLAME_masks.pkl", "wb") as fh:
        pickle.dump(masks, fh, protocol=4)
    (out / "regions" / "lve.txt").write_text(",".join(str(int(i)) for i in masks["lips"]) + "\n")
    upper = np.union1d(masks["forehead"], masks["eye_region"])
    (out / "regions" / "fdd.txt").write_text(",".join(str(int(i)) for i in upper) + "\n")


def _synthesize_clip(
    spk: dict[str, Any], item: dict[str, Any], sentences: list[list[tuple[str, int]]], preset: Preset, seed: int,
    n: int, fps: float,
) -> _Clip:
    """Plan item number ``n`` of speaker ``spk``: its timeline, audio and FLAME-56 params,
    all from the clip's own stream ``clip_rng(seed, n)``."""
    rng = clip_rng(seed, n)
    sentence = sentences[item["sentence_id"]]
    segs = phoneme_timeline(sentence, spk["style"], item["emotion"], item["intensity"], preset, rng)
    n_frames = timeline_frames(segs, fps)
    n_samples = int(round(n_frames * AUDIO_RATE / fps))
    audio = synthesize_audio(segs, spk["style"], item["emotion"], item["intensity"], n_samples, rng)
    params = synthesize_motion(segs, spk, item["emotion"], item["intensity"], fps, n_frames, rng)  # (T, 56)
    return item, "".join(c for c, _ in sentence), audio, params


def _write_speaker_clips(
    out: Path, layer: FlameLayer, spk: dict[str, Any], clips: list[_Clip], fps: float
) -> dict[str, Any]:
    """Write one speaker's clips; returns their meta.json entries by stem. One face-model
    pass for all its clips' frames, zero head rotation."""
    from talkmesh.audio.io import write_wav

    all_params = np.concatenate([c[3][:, :53] for c in clips])  # (sum T, 53)
    all_verts = layer.vertices_from_params(all_params, spk["shape"])  # (sum T, V, 3)
    sequences: dict[str, Any] = {}
    start = 0
    for item, text, audio, params in clips:
        stem, n_frames = item["stem"], params.shape[0]
        verts = all_verts[start : start + n_frames]
        start += n_frames
        np.save(out / "vertices_npy" / f"{stem}.npy", verts.reshape(n_frames, -1))  # (T, V*3)
        np.save(out / "params_npy" / f"{stem}.npy", params)  # (T, 56)
        write_wav(out / "wav" / f"{stem}.wav", audio, AUDIO_RATE)
        (out / "text" / f"{stem}.txt").write_text(text + "\n")
        sequences[stem] = {
            "subject": item["subject"],
            "sentence": item["sentence"],
            "split": item["split"],
            "emotion": item["emotion"],
            "intensity": item["intensity"],
            "sentence_id": item["sentence_id"],
            "frames": n_frames,
            "seconds": round(n_frames / fps, 6),
            "text": text,
        }
    return sequences


def _phoneme_table() -> dict[str, Any]:
    return {
        p.char: {
            "class": p.cls, "duration": p.duration, "voiced": p.voiced, "formants": list(p.formants),
            "noise": list(p.noise) if p.noise else None, "burst": list(p.burst) if p.burst else None,
            "jaw": p.jaw, "round": p.round, "spread": p.spread, "closure": p.closure,
        }
        for p in PHONEMES
    }


def _speaker_table(speakers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        s["name"]: {
            "role": s["role"],
            "style": s["style"],
            "shape": [float(x) for x in s["shape"]],
            "head_class_offsets": {c: [round(float(x), 6) for x in row]
                                   for c, row in zip(PHONEME_CLASSES, s["head_class_offsets"], strict=True)},
        }
        for s in speakers
    }


def _meta(
    preset_name: str, seed: int, fps: float, num_vertices: int, speakers: list[dict[str, Any]],
    sentences: list[list[tuple[str, int]]], sequences: dict[str, Any],
) -> dict[str, Any]:
    """The content of meta.json."""
    return {
        "generator": "talkmesh.data.synthetic",
        "version": GENERATOR_VERSION,
        "preset": preset_name,
        "seed": seed,
        "fps": fps,
        "audio_rate": AUDIO_RATE,
        "num_vertices": num_vertices,
        "num_shape_components": NUM_SHAPE,
        "num_expression_components": NUM_EXPR,
        "motion_layout": "FLAME-56: expression 0:50 | jaw 50:53 | head rotation 53:56 (axis-angle, rad)",
        "vertices": "FLAME(beta, expression, jaw) with zero head rotation, neck and eyes (datasets.md 6.2)",
        "expression_components": list(EXPRESSION_COMPONENTS),
        "emotions": {str(k): v for k, v in EMOTIONS.items()},
        "emotion_effects": {str(k): dataclasses.asdict(v) for k, v in EMOTION_EFFECTS.items()},
        "intensities": [0, 1, 2],
        "phonemes": _phoneme_table(),
        "phoneme_classes": list(PHONEME_CLASSES),
        "style_ranges": {k: list(v) for k, v in STYLE_RANGES.items()},
        "speakers": _speaker_table(speakers),
        "train_subjects": [s["name"] for s in speakers if s["role"] == "train"],
        "splits": list(SPLITS),
        "eval_splits": list(EVAL_SPLITS),
        "unseen_splits": list(UNSEEN_SPLITS),
        "sentences": ["".join(c for c, _ in s) for s in sentences],
        "sequences": sequences,
    }
