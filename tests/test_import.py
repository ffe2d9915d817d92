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
    assert "CVPR 2022" in mv.description and run.data.tags["talkmesh.import.sha256"] in mv.description
    assert "talkmesh import faceformer --checkpoint" in mv.description and "No test metrics" in mv.description
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


# ---------------------------------------------------------------------------------------
# Mimic (huifu99/Mimic DisNetAutoregCycle)
# ---------------------------------------------------------------------------------------

from talkmesh.methods.mimic import Mimic, MimicConfig  # noqa: E402
from talkmesh.ops.importers.mimic import (  # noqa: E402
    HDTF_TRAIN_SUBJECTS,
    MIMIC_KEY_MAP,
    MimicImporter,
)
from talkmesh.ops.importers.run import unused_summary  # noqa: E402

# The tiny test model: the debug preset with HDTF's conv alignment (the down_sample conv),
# the reference's hard-coded PPE period 30 and its training flags.
MIMIC_TINY = MimicImporter.reference_flags(dataclasses.replace(MimicConfig.debug(), audio_align="conv", ppe_period=30))
MIMIC_REF_MODULES = {"content_encoder", "style_encoder", "audio_encoder", "decoder", "style_class_head",
                     "content_grl_head", "logit_scale"}


def _mimic_source(seed: int = 0, facts: DataFacts = FACTS, cfg: MimicConfig = MIMIC_TINY) -> Mimic:
    """A tiny Mimic with every weight moved off its initialisation (the zero output layer too)."""
    model = Mimic(cfg, facts)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _mimic_reference_state(model: Mimic, small_leftovers: bool = True) -> dict[str, torch.Tensor]:
    """``model``'s weights under the reference's names, with the reference-only tensors: the
    encoders' sinusoid tables (5000, 1, d), the decoder's periodic table (1, 630, d) and the
    never-run default nn.Transformer inside its TransformerDecoder (same names; small widths
    unless ``small_leftovers`` is False, then meta tensors of the real shapes)."""
    state = {k: v for k, v in model.state_dict().items() if k not in MimicImporter.talkmesh_only}
    ref = reference_state_dict(state, MIMIC_KEY_MAP)
    d, period = model.config.d_model, model.config.ppe_period
    for name in ("content_encoder", "style_encoder"):
        ref[f"{name}.PE.pe"] = periodic_positional_encoding(5000, d, 5000)[:, None]
    ref["decoder.PPE.pe"] = periodic_positional_encoding(period * (600 // period + 1), d, period)[None]
    leftover = (torch.nn.Transformer(d_model=8, nhead=2, dim_feedforward=8, batch_first=True) if small_leftovers
                else torch.nn.Transformer(batch_first=True, device="meta"))
    ref.update({f"decoder.transformer_decoder.{k}": v for k, v in leftover.state_dict().items()})
    return ref


def _mimic_file(model: Mimic, path: Path, **edits: torch.Tensor | None) -> Path:
    """The reference's train.py layout: {"params", "model", "optimizer", "start_epoch"}."""
    ref = _mimic_reference_state(model)
    for key, value in edits.items():
        key = key.replace("__", ".")
        if value is None:
            del ref[key]
        else:
            ref[key] = value
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                 "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]}
    params = {"NETWORK": {"feature_dim": model.config.d_model, "content_norm": "IN", "style_fuse": "SALN"},
              "LOSS": {"content_clip_loss": {"use": True, "w": 5.0e-7}, "DEMO": None}}
    torch.save({"params": params, "model": ref, "optimizer": optimizer, "start_epoch": 125}, path)
    return path


def test_mimic_reference_names_of_a_tiny_model() -> None:
    ref = _mimic_reference_state(_mimic_source())
    assert {k.split(".")[0] for k in ref} == MIMIC_REF_MODULES
    pos_conv = "audio_encoder.audio_encoder.encoder.pos_conv_embed.conv."
    shapes = {
        "content_encoder.motion_map.weight": (16, 36),
        "content_encoder.conv_layers.1.conv.weight": (16, 16, 3),
        "content_encoder.feature_projection.projection.weight": (16, 16),
        "content_encoder.transformer_encoder.layers.0.self_attn.in_proj_weight": (48, 16),
        "content_encoder.feature_map.bias": (16,),
        "style_encoder.conv_layers.0.layer_norm.weight": (16,),
        "style_encoder.feature_projection.layer_norm.bias": (16,),
        "style_encoder.PE.pe": (5000, 1, 16),
        "audio_encoder.audio_encoder.feature_extractor.conv_layers.0.conv.weight": (32, 1, 10),
        pos_conv + "weight_g": (1, 1, 16),
        "audio_encoder.down_sample.weight": (32, 32, 15),
        "audio_encoder.audio_feature_map.weight": (16, 32),
        "decoder.motion_map.weight": (16, 36),
        "decoder.motion_map_r.weight": (36, 16),
        "decoder.PPE.pe": (1, 630, 16),
        "decoder.transformer_decoder.layers.0.self_attn.in_proj_weight": (48, 16),
        "decoder.transformer_decoder.layers.0.multihead_attn.in_proj_weight": (48, 16),
        "decoder.transformer_decoder.layers.0.norm3.style.affine.weight": (32, 16),
        "decoder.transformer_decoder.layers.0.linear2.weight": (16, 32),
        "style_class_head.class_head.weight": (3, 16),
        "content_grl_head.class_head.bias": (3,),
        "logit_scale": (),
    }
    for key, shape in shapes.items():
        assert tuple(ref[key].shape) == shape, key
    # IN content encoder: no norm tensors; the SALN gamma half of the bias comes first (starts at 1).
    assert not any(k.startswith("content_encoder.conv_layers.0.layer_norm") for k in ref)
    fresh = reference_state_dict({k: v for k, v in Mimic(MIMIC_TINY, FACTS).state_dict().items()
                                  if k not in MimicImporter.talkmesh_only}, MIMIC_KEY_MAP)
    assert torch.equal(fresh["decoder.transformer_decoder.layers.0.norm1.style.affine.bias"][:16], torch.ones(16))


def test_mimic_import_is_bit_exact_registered_and_scored(tmp_path: Path) -> None:
    corpus = open_corpus(DataConfig(format="synthetic", synthetic_preset="small"))
    facts = DataFacts.from_corpus(corpus)
    source = _mimic_source(facts=facts)
    path = _mimic_file(source, tmp_path / "Epoch_125.pth")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    report = import_checkpoint("mimic", path, "debug", tracking_uri=uri, alias="published-debug",
                               config=MIMIC_TINY, facts=facts)
    imp = report.imported
    assert len(imp.names) == len(source.state_dict()) - len(MimicImporter.talkmesh_only)
    assert {"content_encoder.PE.pe", "style_encoder.PE.pe", "decoder.PPE.pe"} <= set(imp.unused)
    assert len(imp.unused) == 3 + 184  # + the default nn.Transformer's tensors
    audio, _ = _inputs(facts.num_vertices)
    audio = np.concatenate([audio, audio[:9000]])  # 1.56 s: two decoding windows of 50 frames at 25 fps
    seq = next(s for s in corpus.sequences("train"))
    clip = corpus.load(seq)
    styles = [m.encode_style({"vertices": clip.vertices, "template": clip.template}) for m in (source, imp.method)]
    assert torch.equal(styles[0]["style_code"], styles[1]["style_code"])
    want = source.generate(audio, clip.template, styles[0])["vertices"]
    assert torch.equal(imp.method.generate(audio, clip.template, styles[1])["vertices"], want)

    from mlflow import MlflowClient

    from talkmesh.ops import tracking

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(report.run_id)
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert tags["talkmesh.import.sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert tags["talkmesh.import.unused"] == ("content_encoder.PE.pe,decoder.PPE.pe,"
                                              "decoder.transformer_decoder.decoder.* (110),"
                                              "decoder.transformer_decoder.encoder.* (74),style_encoder.PE.pe")
    assert tags["talkmesh.import.flag.reference_pe_quirk"] == "True"
    assert tags["talkmesh.import.flag.mask_padding"] == "False"
    assert tags["talkmesh.import.flag.audio_align"] == "conv"
    mv = client.get_model_version("talkmesh-mimic", str(report.version))
    assert mv.run_id == report.run_id
    assert tracking.get_alias_version("mimic", "published-debug", uri=uri) == report.version
    served, served_facts, served_cfg = tracking.load_registered("mimic", str(report.version), uri=uri)
    assert served_facts == facts and served_cfg.reference_pe_quirk
    assert torch.equal(served.generate(audio, clip.template, styles[0])["vertices"], want)
    scores = [evaluate_method(m, corpus, "test-B", limit=1, max_conditions=2)["metrics"] for m in (served, source)]
    assert np.isfinite(scores[0]["lve"]) and scores[0] == scores[1]


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        ({"style_class_head__class_head__weight": None},
         ["missing", "'style_classifier.weight'", "'style_class_head.class_head.weight'"]),
        ({"audio_encoder__down_sample__weight": torch.zeros(32, 32, 9)},
         ["wrong shape", "'audio_encoder.down_sample.weight' (32, 32, 9)", "(32, 32, 15)"]),
        ({"content_encoder__conv_layers__0__layer_norm__weight": torch.ones(16)},
         ["names the talkmesh module lacks", "'content_encoder.conv_norms.0.ln.weight'", "content_norm LN"]),
        ({"content_encoder__lstm__weight": torch.zeros(2)}, ["unexpected", "'content_encoder.lstm.weight'"]),
        ({"decoder__PPE__pe": periodic_positional_encoding(625, 16, 25)[None]},
         ["'decoder.PPE.pe'", "period 30"]),
        ({"style_encoder__PE__pe": torch.zeros(5000, 1, 16)}, ["'style_encoder.PE.pe'", "sinusoid"]),
    ],
    ids=["missing", "shape", "content-ln", "unexpected", "ppe-period", "pe-table"],
)
def test_mimic_strictness_names_the_key(tmp_path: Path, edit: dict, needles: list[str]) -> None:
    path = _mimic_file(_mimic_source(), tmp_path / "bad.pth", **edit)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(CheckpointImportError) as err:
        import_checkpoint("mimic", path, "debug", tracking_uri=uri, config=MIMIC_TINY, facts=FACTS)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("preset", "verts", "subjects", "align"),
    [("hdtf", 5023, HDTF_TRAIN_SUBJECTS, "conv"), ("vocaset", 5023, VOCASET_TRAIN_SUBJECTS, "interp"),
     ("biwi", 23370, BIWI_TRAIN_SUBJECTS, "conv")],
)
def test_mimic_presets_build_from_config_only(preset: str, verts: int, subjects: tuple, align: str) -> None:
    """The real-size model builds with no wav2vec2 weights on disk, with the reference's
    training flags, and the key map covers it exactly with the reference's names, the
    never-run default nn.Transformer (real shapes, meta tensors) listed as unused."""
    importer = get_importer("mimic")
    cfg, facts = importer.config(preset), importer.facts(preset)
    assert facts.train_subjects == subjects and facts.num_vertices == verts
    assert cfg.audio_encoder.from_config_only and cfg.audio_align == align and cfg.ppe_period == 30
    assert cfg.reference_pe_quirk and not cfg.mask_padding and not cfg.teacher_forcing
    assert cfg.content_norm == "instance" and cfg.enc_convs == 5 and cfg.dec_layers == 1
    assert from_dict(MimicConfig, to_dict(cfg)) == cfg  # method.json round trip keeps the flags
    model = Mimic(cfg, facts)
    state = {k: v for k, v in model.state_dict().items() if k not in MimicImporter.talkmesh_only}
    ref = _mimic_reference_state(model, small_leftovers=False)
    assert tuple(ref["decoder.motion_map_r.weight"].shape) == (3 * verts, 128)
    assert tuple(ref["style_class_head.class_head.weight"].shape) == (len(subjects), 128)
    assert tuple(ref["decoder.transformer_decoder.encoder.layers.5.linear1.weight"].shape) == (2048, 512)
    assert ("audio_encoder.down_sample.weight" in ref) == (align == "conv")
    assert "audio_encoder.audio_encoder.encoder.layers.11.final_layer_norm.bias" in ref
    assert tuple(ref["decoder.PPE.pe"].shape) == (1, 630, 128)
    mapped = map_state_dict(ref, MIMIC_KEY_MAP, state)
    assert set(mapped.state) == set(state) and len(mapped.unused) == 3 + 184
    importer.check_unused(model, mapped.unused)
    summary = unused_summary(MIMIC_KEY_MAP, list(mapped.unused))
    assert "decoder.transformer_decoder.encoder.* (74)" in summary and len(summary) < 300
    assert f"the {preset} preset" in importer.describe(ref)


def test_mimic_pe_quirk_flag_matters_for_the_style_code() -> None:
    """The imported flag is not cosmetic: with the reference's batch-index PE the style code
    of a clip differs from the one with a temporal PE (Q1), so the released weights need it."""
    quirk = _mimic_source()
    plain = Mimic(dataclasses.replace(MIMIC_TINY, reference_pe_quirk=False), FACTS).eval()
    plain.load_state_dict(quirk.state_dict())
    motion = {"vertices": np.random.default_rng(1).standard_normal((40, 12, 3)).astype(np.float32) * 0.1,
              "template": np.zeros((12, 3), np.float32)}
    codes = [m.encode_style(motion)["style_code"] for m in (quirk, plain)]
    assert not torch.allclose(codes[0], codes[1], atol=1e-4)


def test_mimic_cli_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _mimic_file(_mimic_source(), tmp_path / "tiny.pth")
    assert main(["import", "mimic", "--checkpoint", str(path), "--preset", "debug", "--no-register"]) == 2
    assert "['hdtf', 'vocaset', 'biwi']" in capsys.readouterr().err
    # A tiny checkpoint offered as the released 3D-HDTF one: the shapes say what it is.
    assert main(["import", "mimic", "--checkpoint", str(path), "--preset", "hdtf", "--no-register"]) == 2
    err = capsys.readouterr().err
    assert "'content_encoder.motion_map.weight' (16, 36) -> 'content_encoder.input.weight' expects (128, 15069)" in err
    assert "'content_encoder.convs.2.weight' (reference name 'content_encoder.conv_layers.2.conv.weight')" in err
    assert "d=16, 12 vertices, 3 training ids, 2 conv blocks, content_norm IN, audio alignment conv" in err
