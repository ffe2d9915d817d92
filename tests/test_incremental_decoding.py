"""Incremental (key/value cached) decoding against the full-prefix reference decode (issue 15):
FaceFormer (and DualTalker, whose generator it is) equal within 1e-5 for both alignments,
several layers and heads, a batch of styles, sequences longer than the period and audio
tokens given in pieces; AdaMesh's PoseGPT sampling gives the same codes."""

from __future__ import annotations

import pytest
import torch

from talkmesh.methods.faceformer import FaceFormer, IncrementalDecoder, tokens_per_frame
from test_faceformer import model, randomise_output_layer
from test_methods_contract import V, make_clip

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

TOL = 1e-5  # issue 15: max abs difference to the full-prefix decode


def eval_model(**overrides: object) -> FaceFormer:
    m = model(**overrides).eval()
    randomise_output_layer(m, scale=0.3)  # a non-zero output layer: each frame feeds the next
    return m


def inputs(m: FaceFormer, frames: int, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random audio tokens (B, S_mem, d) for ``frames`` frames and the style embeddings of
    training subjects 0..B-1 (B, d)."""
    per = tokens_per_frame(m.config.alignment)
    g = torch.Generator().manual_seed(seed)
    memory = torch.randn(batch, per * frames, m.config.d_model, generator=g)
    return memory, m.style_vectors(torch.arange(batch) % m.num_subjects)


@pytest.mark.parametrize(
    ("alignment", "layers", "heads", "frames"),
    [("interp", 1, 2, 60), ("double", 1, 2, 40), ("interp", 3, 4, 70), ("double", 2, 4, 30)],
)
def test_incremental_decode_equals_the_full_prefix_decode(alignment, layers, heads, frames):
    m = eval_model(alignment=alignment, n_layers=layers, n_heads=heads)
    assert frames > m.config.period or layers > 1  # the periodic bias and PPE wrap at least once in some cases
    memory, style = inputs(m, frames, batch=3)
    with torch.no_grad():
        reference = m.decode(memory, style, frames, incremental=False)  # (3, T, 3V)
        cached = m.decode(memory, style, frames)
    assert cached.shape == reference.shape == (3, frames, 3 * V)
    assert float(reference.abs().max()) > 0.1  # the comparison is not between near-zero outputs
    assert float((cached - reference).abs().max()) <= TOL
    # the rows differ per style, so a batch mix-up could not pass
    assert float((reference[0] - reference[1]).abs().max()) > 1e-3


def test_tokens_given_in_pieces_decode_as_all_at_once():
    """The streaming use: append audio tokens as they come and step while :attr:`ready`."""
    m = eval_model(alignment="double")
    frames = 33
    memory, style = inputs(m, frames, batch=2, seed=1)
    with torch.no_grad():
        reference = m.decode(memory, style, frames, incremental=False)
        state = IncrementalDecoder(m, memory[:, :0], style, max_frames=frames)
        assert not state.ready and state.tokens_needed == 2
        out, given = [], 0
        for size in (1, 4, 7, 2, 13, 39):  # uneven pieces, some smaller than one frame's tokens
            state.append_memory(memory[:, given : given + size])
            given += size
            while state.ready:
                out.append(state.step())
            assert state.frame == min(frames, given // 2)
        assert not state.ready and state.frame == frames
        with pytest.raises(RuntimeError, match="all 33 frames"):
            state.step()
    assert float((torch.cat(out, dim=1) - reference).abs().max()) <= TOL


def test_generate_uses_the_cache_and_matches_the_reference():
    m = eval_model()
    clip = make_clip("S2", 3.0, 25.0, 4)
    with torch.no_grad():
        memory, frames = m.encode_audio(torch.from_numpy(clip.audio)[None])
        reference = m.decode(memory, m.resolve_style(2)[None], int(frames[0]), incremental=False)
    out = m.generate(clip.audio, clip.template, style=2)["vertices"]  # (T, V, 3)
    expected = reference[0].reshape(-1, V, 3) + torch.from_numpy(clip.template)
    assert out.shape[0] == int(frames[0]) > 60
    assert float((out - expected).abs().max()) <= TOL


def test_training_mode_keeps_the_full_prefix_path_and_the_state_refuses_it():
    m = model(dropout=0.5)
    randomise_output_layer(m)
    memory, style = inputs(m, 8)
    m.train()
    with pytest.raises(RuntimeError, match="eval mode"):
        IncrementalDecoder(m, memory, style)
    torch.manual_seed(0)
    a = m.decode(memory, style, 8)  # training mode: the reference path, dropout per prefix
    torch.manual_seed(0)
    b = m.decode(memory, style, 8, incremental=False)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------
# DualTalker's generator is FaceFormer's (inherited), PoseGPT's sampling (AdaMesh)
# --------------------------------------------------------------------------------------


def test_dualtalker_generate_uses_the_cache_and_matches_the_reference():
    from test_dualtalker import model as dualtalker_model

    m = dualtalker_model().eval()
    randomise_output_layer(m, scale=0.3)
    audio = make_clip("S1", 2.0, 25.0, 5).audio
    template = torch.randn(m.facts.num_vertices, 3, generator=torch.Generator().manual_seed(2))  # (V, 3)
    with torch.no_grad():
        memory, frames = m.encode_audio(torch.from_numpy(audio)[None])
        reference = m.decode(memory, m.resolve_style(1)[None], int(frames[0]), incremental=False)
    out = m.generate(audio, template, style=1)["vertices"]
    expected = reference[0].reshape(-1, m.facts.num_vertices, 3) + template
    assert float(reference.abs().max()) > 0.1
    assert float((out - expected).abs().max()) <= TOL


@pytest.mark.parametrize("mode", ["greedy", "sample"])
def test_posegpt_sampling_with_the_cache_equals_the_full_window_sampling(mode):
    """40 codes with a 16-code context: cached steps inside the first window, whole-window
    steps after it slides; the same codes as the reference for both identities."""
    from test_adamesh import model as adamesh_model
    from test_adamesh import perturb

    m = adamesh_model()
    perturb(m, scale=0.2)
    gpt = m.posegpt.eval()
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, 40, m.config.posegpt.d, generator=g)
    identity = torch.tensor([0, 2])
    with torch.no_grad():
        logits = gpt(tokens[:, :16], torch.zeros(2, 16, dtype=torch.long), identity)
        assert float(logits.std()) > 0.1  # the codes are not all one tie
        ref = gpt.sample(tokens, identity, torch.Generator().manual_seed(7), mode, 1.0, 0, 16, incremental=False)
        fast = gpt.sample(tokens, identity, torch.Generator().manual_seed(7), mode, 1.0, 0, 16)
    assert ref.shape == (2, 40)
    assert len(torch.unique(ref)) > 3
    assert torch.equal(fast, ref)


def test_posegpt_sampling_with_tokens_in_pieces_gives_the_same_codes():
    """AdaMesh's stream steps one PoseCodeSampler as audio tokens arrive: in uneven pieces,
    stepping whenever a token is there, the codes are those of one whole-utterance sample."""
    from talkmesh.methods.adamesh.modeling import PoseCodeSampler
    from test_adamesh import model as adamesh_model
    from test_adamesh import perturb

    m = adamesh_model()
    perturb(m, scale=0.2)
    gpt = m.posegpt.eval()
    tokens = torch.randn(1, 40, m.config.posegpt.d, generator=torch.Generator().manual_seed(4))
    identity = torch.tensor([1])
    with torch.no_grad():
        whole = gpt.sample(tokens, identity, torch.Generator().manual_seed(7), "sample", 1.0, 0, 16)
        sampler = PoseCodeSampler(gpt, identity, torch.Generator().manual_seed(7), "sample", 1.0, 0, 16)
        codes, at = [], 0
        for size in (1, 5, 0, 11, 2, 21):
            sampler.append(tokens[:, at : at + size])
            at += size
            while sampler.ready:
                codes.append(sampler.step())
        assert sampler._tokens.shape[1] <= 16  # only the context window is kept
    assert at == 40 and torch.equal(torch.stack(codes, dim=1), whole)
