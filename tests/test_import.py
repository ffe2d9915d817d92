"""`talkmesh import`: released reference checkpoints onto talkmesh methods (issue 12).

The reference code is not vendored: the tests build state dicts in the reference's naming
by inverting the importer's key map on a talkmesh model, plus the reference-only tensors
(FaceFormer's ``PPE.pe`` table) computed as the reference computes them.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from talkmesh.audio.encoders import AudioEncoderConfig, EncoderWeightsMissing, build_audio_encoder, tiny_hf_config
from talkmesh.cli import main
from talkmesh.config import DataConfig, from_dict, to_dict
from talkmesh.data import open_corpus
from talkmesh.eval.evaluate import evaluate_method
from talkmesh.methods.base import DataFacts
from talkmesh.methods.faceformer import FaceFormer, FaceFormerConfig, periodic_positional_encoding
from talkmesh.ops.importers import (
    CheckpointImportError,
    KeyRule,
    get_importer,
    import_checkpoint,
    map_state_dict,
    reference_state_dict,
)
from talkmesh.ops.importers.faceformer import (
    BIWI_TRAIN_SUBJECTS,
    FACEFORMER_KEY_MAP,
    VOCASET_TRAIN_SUBJECTS,
    FaceFormerImporter,
)

FACTS = DataFacts(fps=25.0, num_vertices=12, train_subjects=("s0", "s1", "s2"))
REF_MODULES = {"audio_encoder", "audio_feature_map", "vertice_map", "PPE", "transformer_decoder",
               "vertice_map_r", "obj_vector"}  # the reference Faceformer's modules that hold tensors


def _ppe_table(d_model: int, period: int) -> torch.Tensor:
    """The reference's PPE buffer: the period's rows repeated to (1, p * (600 // p + 1), d)."""
    return periodic_positional_encoding(period * (600 // period + 1), d_model, period)[None]


def _source_model(seed: int = 0, facts: DataFacts = FACTS) -> FaceFormer:
    """A tiny FaceFormer with every weight moved off its initialisation (the zero output layer too)."""
    model = FaceFormer(FaceFormerConfig.debug(), facts)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _reference_file(model: FaceFormer, path: Path, **edits: torch.Tensor | None) -> Path:
    ref = reference_state_dict(model.state_dict(), FACEFORMER_KEY_MAP)
    ref["PPE.pe"] = _ppe_table(model.config.d_model, model.config.period)
    for key, value in edits.items():
        key = key.replace("__", ".")
        if value is None:
            del ref[key]
        else:
            ref[key] = value
    torch.save(ref, path)
    return path


def _inputs(num_vertices: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    audio = rng.standard_normal(16000).astype(np.float32) * 0.1
    return audio, rng.standard_normal((num_vertices, 3)).astype(np.float32)


def test_reference_names_of_a_tiny_model() -> None:
    ref = reference_state_dict(_source_model().state_dict(), FACEFORMER_KEY_MAP)
    assert {k.split(".")[0] for k in ref} == REF_MODULES - {"PPE"}
    pos_conv = "audio_encoder.encoder.pos_conv_embed.conv."
    for key in (pos_conv + "weight_g", pos_conv + "weight_v",
                "audio_encoder.masked_spec_embed", "audio_encoder.feature_extractor.conv_layers.0.conv.weight",
                "audio_feature_map.weight", "vertice_map.bias", "vertice_map_r.weight", "obj_vector.weight",
                "transformer_decoder.layers.0.self_attn.in_proj_weight", "transformer_decoder.layers.0.norm3.bias"):
        assert key in ref, key
    assert "obj_vector.bias" not in ref  # bias-free style embedding
    assert tuple(ref["obj_vector.weight"].shape) == (16, 3)


def test_import_is_bit_exact_registered_and_scored(tmp_path: Path) -> None:
    corpus = open_corpus(DataConfig(format="synthetic", synthetic_preset="small"))
    facts = DataFacts.from_corpus(corpus)
    source = _source_model(facts=facts)
    path = _reference_file(source, tmp_path / "faceformer.pth")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    report = import_checkpoint("faceformer", path, "debug", tracking_uri=uri, alias="published-debug",
                               config=FaceFormerConfig.debug(), facts=facts)
    imp = report.imported
    assert imp.unused == ["PPE.pe"] and len(imp.names) == len(source.state_dict())
    audio, template = _inputs(facts.num_vertices)
    for style in (None, 2):
        want = source.generate(audio, template, style)["vertices"]
        assert torch.equal(imp.method.generate(audio, template, style)["vertices"], want)

    from mlflow import MlflowClient

    from talkmesh.ops import tracking

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(report.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["talkmesh.import.sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert run.data.tags["talkmesh.import.unused"] == "PPE.pe"
    assert run.data.tags["talkmesh.import.flag.teacher_forcing"] == "True"  # the debug config's
    assert run.data.params["model.d_model"] == "16"
    mv = client.get_model_version("talkmesh-faceformer", str(report.version))
    assert mv.run_id == report.run_id
    assert tracking.get_alias_version("faceformer", "published-debug", uri=uri) == report.version
    served, served_facts, _ = tracking.load_registered("faceformer", str(report.version), uri=uri)
    assert served_facts == facts
    assert torch.equal(served.generate(audio, template, 1)["vertices"], source.generate(audio, template, 1)["vertices"])
    # The evaluator scores the registered model as it scores the source (unseen speakers, 2 conditions).
    scores = [evaluate_method(m, corpus, "test-B", limit=1, max_conditions=2)["metrics"] for m in (served, source)]
    assert np.isfinite(scores[0]["lve"]) and scores[0] == scores[1]


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        ({"obj_vector__weight": None}, ["missing", "'style_embedding.weight'", "'obj_vector.weight'"]),
        ({"vertice_map_r__weight": torch.zeros(5, 16)}, ["wrong shape", "'vertice_map_r.weight'", "(36, 16)"]),
        ({"lm_head__weight": torch.zeros(32, 32)}, ["unexpected", "'lm_head.weight'"]),
        ({"PPE__pe": _ppe_table(16, 30)}, ["'PPE.pe' has period 30", "period 25"]),
    ],
    ids=["missing", "shape", "unexpected", "ppe-period"],
)
def test_strictness_names_the_key(tmp_path: Path, edit: dict, needles: list[str]) -> None:
    path = _reference_file(_source_model(), tmp_path / "bad.pth", **edit)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(CheckpointImportError) as err:
        import_checkpoint("faceformer", path, "debug", tracking_uri=uri, config=FaceFormerConfig.debug(), facts=FACTS)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))
    assert not (tmp_path / "mlflow.db").exists()  # nothing is logged for a checkpoint that does not fit


def test_map_state_dict_rejects_a_tensor_filled_twice() -> None:
    target = {"a.w": torch.zeros(2)}
    rules = (KeyRule("x.", "a."), KeyRule("y.", "a."))
    with pytest.raises(CheckpointImportError, match="filled twice"):
        map_state_dict({"x.w": torch.ones(2), "y.w": torch.ones(2)}, rules, target)


@pytest.mark.parametrize(
    ("preset", "d", "verts", "subjects", "period"),
    [("vocaset", 64, 5023, VOCASET_TRAIN_SUBJECTS, 30), ("biwi", 128, 23370, BIWI_TRAIN_SUBJECTS, 25)],
)
def test_released_presets_build_from_config_only(preset: str, d: int, verts: int, subjects: tuple, period: int) -> None:
    """The real-size model builds with no wav2vec2 weights on disk, and the key map covers it
    exactly with the reference's names (wav2vec2-base: 12 layers, 768 wide)."""
    importer = get_importer("faceformer")
    cfg, facts = importer.config(preset), importer.facts(preset)
    assert facts.train_subjects == subjects and facts.num_vertices == verts
    assert cfg.audio_encoder.from_config_only and cfg.period == period and not cfg.teacher_forcing
    assert from_dict(FaceFormerConfig, to_dict(cfg)) == cfg  # method.json round trip keeps the flag
    model = FaceFormer(cfg, facts)
    state = model.state_dict()
    ref = reference_state_dict(state, FACEFORMER_KEY_MAP)
    assert tuple(ref["audio_feature_map.weight"].shape) == (d, 768)
    assert tuple(ref["vertice_map_r.weight"].shape) == (3 * verts, d)
    assert tuple(ref["obj_vector.weight"].shape) == (d, len(subjects))
    assert tuple(ref["audio_encoder.encoder.pos_conv_embed.conv.weight_v"].shape) == (768, 48, 128)
    assert "audio_encoder.encoder.layers.11.final_layer_norm.bias" in ref
    ref["PPE.pe"] = _ppe_table(d, period)
    mapped = map_state_dict(ref, FACEFORMER_KEY_MAP, state)
    assert set(mapped.state) == set(state) and list(mapped.unused) == ["PPE.pe"]
    FaceFormerImporter().check_unused(model, mapped.unused)
    assert f"period {period}" in importer.describe(ref) and f"{preset} preset" in importer.describe(ref)


def test_encoder_from_config_only_needs_no_weights(tmp_path: Path) -> None:
    tiny_hf_config("wav2vec2").save_pretrained(tmp_path)  # config.json only
    cfg = AudioEncoderConfig(name_or_path=str(tmp_path), from_config_only=True)
    enc = build_audio_encoder(cfg)
    assert enc.hidden_size == 32 and enc.num_layers == 2
    with pytest.raises(EncoderWeightsMissing, match="no weights file"):
        build_audio_encoder(dataclasses.replace(cfg, from_config_only=False))


def test_cli_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _reference_file(_source_model(), tmp_path / "tiny.pth")
    assert main(["import", "faceformer", "--checkpoint", str(path), "--preset", "hdtf", "--no-register"]) == 2
    assert "['vocaset', 'biwi']" in capsys.readouterr().err
    assert main(["import", "faceformer", "--checkpoint", str(tmp_path / "none.pth"), "--preset", "biwi"]) == 2
    assert "no such checkpoint file" in capsys.readouterr().err
    assert main(["import", "nomethod", "--checkpoint", str(path), "--preset", "biwi"]) == 2
    assert "no importer for 'nomethod'" in capsys.readouterr().err
    # A tiny checkpoint offered as the VOCASET release: the shapes say what it is.
    assert main(["import", "faceformer", "--checkpoint", str(path), "--preset", "vocaset", "--no-register"]) == 2
    err = capsys.readouterr().err
    assert "'vertice_map_r.weight' (36, 16) -> 'motion_decoder.weight' expects (15069, 64)" in err
    assert "d=16, 12 vertices, 3 training subjects, period 25" in err
