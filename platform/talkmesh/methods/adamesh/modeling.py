"""AdaMesh networks: the expression adapter (§3), the pose VQ-VAE (§7.2), PoseGPT (§7.3),
the pose-style distance (§7.4) and the log-mel front end PoseGPT shares with the options of
deviation 13.

Paper, reference code and the numbered Deviations ("deviation N" below): the docstring of
``talkmesh.methods.adamesh.method``. Each network takes its own config section
(``talkmesh.methods.adamesh.configuration``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from talkmesh.audio.mel import log_mel, mel_filterbank
from talkmesh.methods.adamesh.configuration import ExpressionConfig, PoseGPTConfig, PoseVQConfig
from talkmesh.nn.conformer import ConformerEncoder, Conv2dSubsampling2
from talkmesh.nn.vq import VectorQuantizer, VQOutput

__all__ = [
    "EXPR_DIM",
    "N_EXPRESSION",
    "POSE_DIM",
    "ExpressionAdapter",
    "PoseCodeSampler",
    "PoseGPT",
    "PoseVQVAE",
    "Postnet",
    "log_mel",
    "masked_l1",
    "masked_mean",
    "mel_filterbank",
    "molora_selector",
    "pose_style_distances",
]

EXPR_DIM = 53  # FLAME-56 columns 0:53: expression 50 | jaw 3
POSE_DIM = 3  # FLAME-56 columns 53:56: head rotation (axis-angle)
N_EXPRESSION = 50


# --------------------------------------------------------------------------------------
# Masked reductions (the log-mel front end is talkmesh.audio.mel)
# --------------------------------------------------------------------------------------


def molora_selector(targets: Sequence[str]) -> Callable[[str, nn.Module], bool]:
    """Which layers of the expression adapter get MoLoRA experts (§4.2): every convolution of
    every Conformer convolution module whose name is in ``targets`` (pw1, dw, pw2)."""
    wanted = tuple(targets)

    def select(name: str, _module: nn.Module) -> bool:
        return ".conv." in f".{name}" and name.rsplit(".", 1)[-1] in wanted

    return select


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Temporal mean of x (B, T, d) over valid frames -> (B, d)."""
    w = mask.to(x.dtype)[..., None]  # (B, T, 1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean |pred - target| over valid frames and every dimension (B, T, D)."""
    w = mask.to(pred.dtype)[..., None]
    return ((pred - target).abs() * w).sum() / (w.sum() * pred.shape[-1]).clamp_min(1.0)


def _sinusoids(length: int, dim: int, device: torch.device) -> torch.Tensor:
    """Absolute sinusoidal positional encoding (L, dim)."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return pe


# --------------------------------------------------------------------------------------
# Expression adapter (§3)
# --------------------------------------------------------------------------------------


class Postnet(nn.Module):
    """Tacotron-style 2-conv postnet with a linear layer and a residual (§3.2)."""

    def __init__(self, dim: int, channels: int, kernel: int, dropout: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(dim, channels, kernel, padding=kernel // 2)
        self.bn1 = nn.BatchNorm1d(channels)
        self.conv2 = nn.Conv1d(channels, dim, kernel, padding=kernel // 2)
        self.bn2 = nn.BatchNorm1d(dim)
        self.linear = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """y (B, T, D) -> y + postnet(y) (B, T, D)."""
        h = (y * mask[..., None].to(y.dtype)).transpose(1, 2)  # (B, D, T)
        h = self.dropout(torch.tanh(self.bn1(self.conv1(h))))
        h = self.dropout(self.bn2(self.conv2(h)))
        return y + self.linear(h.transpose(1, 2))


class ExpressionAdapter(nn.Module):
    """Audio encoder + style encoder + identity encoder + expression decoder (+ postnet)."""

    def __init__(self, cfg: ExpressionConfig, audio_dim: int) -> None:
        super().__init__()
        d = cfg.d_model

        def conformer(blocks: int) -> ConformerEncoder:
            return ConformerEncoder(d, cfg.heads, cfg.ffn, cfg.conv_kernel, blocks, cfg.dropout, cfg.attention_dropout)

        self.subsample = Conv2dSubsampling2(audio_dim, d, d)
        self.audio_encoder = conformer(cfg.audio_blocks)
        self.style_in = nn.Linear(EXPR_DIM, d)
        self.style_encoder = conformer(cfg.style_blocks)
        self.identity_in = nn.Linear(cfg.shape_dim, d)
        self.identity_encoder = conformer(cfg.identity_blocks)
        self.decoder_in = nn.Linear(d, d)
        self.decoder = conformer(cfg.decoder_blocks)
        self.out = nn.Linear(d, EXPR_DIM)
        self.postnet = Postnet(EXPR_DIM, cfg.postnet_channels, cfg.postnet_kernel, cfg.postnet_dropout)

    def encode_style(self, ref: torch.Tensor, ref_mask: torch.Tensor) -> torch.Tensor:
        """Normalised reference expression (B, R, 53), mask (B, R) -> style vector (B, d)."""
        return masked_mean(self.style_encoder(self.style_in(ref), ref_mask), ref_mask)

    def encode_identity(self, shape: torch.Tensor, ref_mask: torch.Tensor) -> torch.Tensor:
        """Shape beta (B, S) repeated over the (B, R) frames -> identity vector (B, d)."""
        x = self.identity_in(shape)[:, None].expand(-1, ref_mask.shape[1], -1)  # (B, R, d)
        return masked_mean(self.identity_encoder(x, ref_mask), ref_mask)

    def forward(
        self,
        audio: torch.Tensor,
        mask: torch.Tensor,
        ref: torch.Tensor | None = None,
        ref_mask: torch.Tensor | None = None,
        shape: torch.Tensor | None = None,
        style: torch.Tensor | None = None,
        identity: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """audio (B, 2T, H) aligned HuBERT features, mask (B, T) valid motion frames; the style
        either as a normalised reference (B, R, 53) + ref_mask (B, R) or as vectors style
        (B, d); identity from shape (B, S) over ref_mask, or as vectors (B, d).
        Returns (y_mid, y, style, identity): (B, T, 53) twice (normalised), (B, d) twice."""
        if style is None:
            if ref is None or ref_mask is None:
                raise ValueError("ExpressionAdapter needs a style reference or a style vector")
            style = self.encode_style(ref, ref_mask)
        if identity is None:
            if shape is None:
                raise ValueError("ExpressionAdapter needs a shape or an identity vector")
            frames = ref_mask if ref_mask is not None else mask
            identity = self.encode_identity(shape, frames)
        mid, post = self.decode(self.subsample(audio)[:, : mask.shape[1]], mask, style, identity)
        return mid, post, style, identity

    def decode(
        self, subsampled: torch.Tensor, mask: torch.Tensor, style: torch.Tensor, identity: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The part of :meth:`forward` after the subsampling (which MoLoRA does not adapt):
        subsampled audio (B, T, d), mask (B, T), style and identity vectors (B, d) ->
        (y_mid, y), (B, T, 53) twice (normalised)."""
        a = self.audio_encoder(subsampled, mask)
        h = self.decoder(self.decoder_in(a + style[:, None] + identity[:, None]), mask)  # (B, T, d)
        mid = self.out(h)  # (B, T, 53)
        return mid, self.postnet(mid, mask)


# --------------------------------------------------------------------------------------
# Pose VQ-VAE (§7.2)
# --------------------------------------------------------------------------------------


class _ConvStage(nn.Module):
    """[optional nearest x2 upsample] -> Conv1d(k 5, replicate pad, stride s) -> LeakyReLU(0.2) -> norm."""

    def __init__(self, hidden: int, stride: int, upsample: bool, norm: str) -> None:
        super().__init__()
        self.upsample = upsample
        self.conv = nn.Conv1d(hidden, hidden, 5, stride=stride, padding=2, padding_mode="replicate")
        norms: dict[str, nn.Module] = {
            "instance": nn.InstanceNorm1d(hidden),
            "batch": nn.BatchNorm1d(hidden),
            "none": nn.Identity(),
        }
        self.norm = norms[norm]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, T) -> (B, H, T')
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.norm(F.leaky_relu(self.conv(x), 0.2))


def _transformer(hidden: int, heads: int, ff: int, layers: int, dropout: float) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(hidden, heads, ff, dropout, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class PoseVQVAE(nn.Module):
    """Head rotation (B, T, 3), T a multiple of ``downsample`` -> codes (B, T/ds) -> (B, T, 3)."""

    def __init__(self, cfg: PoseVQConfig) -> None:
        super().__init__()
        h, n = cfg.hidden, int(round(math.log2(cfg.downsample)))
        self.downsample = cfg.downsample
        self.enc_in = nn.Linear(POSE_DIM, h)
        self.enc_convs = nn.ModuleList(_ConvStage(h, 2, False, cfg.norm) for _ in range(n))
        self.enc_proj = nn.Linear(h, h)
        self.enc_tf = _transformer(h, cfg.heads, cfg.ff, cfg.layers, cfg.dropout)
        self.enc_out = nn.Linear(h, cfg.code_dim)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.code_dim, cfg.beta, cfg.mode)
        self.dec_in = nn.Linear(cfg.code_dim, h)
        self.dec_convs = nn.ModuleList(_ConvStage(h, 1, True, cfg.norm) for _ in range(n))
        self.dec_proj = nn.Linear(h, h)
        self.dec_tf = _transformer(h, cfg.heads, cfg.ff, cfg.layers, cfg.dropout)
        self.dec_out = nn.Linear(h, POSE_DIM)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-quantisation latents (B, T/ds, D) of normalised poses x (B, T, 3)."""
        if x.shape[1] % self.downsample or x.shape[1] == 0:
            raise ValueError(f"pose VQ-VAE: T={x.shape[1]} must be a positive multiple of {self.downsample}")
        h = F.leaky_relu(self.enc_in(x), 0.2).transpose(1, 2)  # (B, H, T)
        for stage in self.enc_convs:
            h = stage(h)
        h = self.enc_proj(h.transpose(1, 2))  # (B, L, H)
        h = self.enc_tf(h + _sinusoids(h.shape[1], h.shape[2], h.device)[None])
        return self.enc_out(h)  # (B, L, D)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents/code vectors (B, L, D) -> normalised poses (B, L*ds, 3)."""
        h = self.dec_in(z).transpose(1, 2)  # (B, H, L)
        for stage in self.dec_convs:
            h = stage(h)
        h = self.dec_proj(h.transpose(1, 2))  # (B, T, H)
        h = self.dec_tf(h + _sinusoids(h.shape[1], h.shape[2], h.device)[None])
        return self.dec_out(h)  # (B, T, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, VQOutput]:
        vq = self.quantizer(self.encode(x))
        return self.decode(vq.quantized), vq

    def indices(self, x: torch.Tensor) -> torch.Tensor:
        """Code indices (B, T/ds) of normalised poses (B, T, 3)."""
        return self.quantizer.nearest(self.encode(x))

    def encode_chunks(self, x: torch.Tensor, window: int) -> torch.Tensor:
        """:meth:`encode` over consecutive chunks of ``window`` frames (the trained context)."""
        return torch.cat([self.encode(x[:, i : i + window]) for i in range(0, x.shape[1], window)], dim=1)

    def decode_chunks(self, idx: torch.Tensor, window_codes: int) -> torch.Tensor:
        """:meth:`decode_indices` over consecutive chunks of ``window_codes`` codes."""
        parts = [self.decode_indices(idx[:, i : i + window_codes]) for i in range(0, idx.shape[1], window_codes)]
        return torch.cat(parts, dim=1)

    def decode_indices(self, idx: torch.Tensor) -> torch.Tensor:
        """Code indices (B, L) -> normalised poses (B, L*ds, 3)."""
        return self.decode(self.quantizer.lookup(idx))


# --------------------------------------------------------------------------------------
# PoseGPT (§7.3)
# --------------------------------------------------------------------------------------


class _CausalBlock(nn.Module):
    """Pre-norm causal self-attention + feed-forward block."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))
        self.dropout = nn.Dropout(dropout)
        self.p = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, d)
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.p if self.training else 0.0)
        x = x + self.dropout(self.proj(a.transpose(1, 2).reshape(b, n, d)))
        return x + self.dropout(self.ff(self.norm2(x)))

    def step(self, x: torch.Tensor, cache: list[torch.Tensor]) -> torch.Tensor:
        """The newest position x (B, 1, d) against the cached keys and values of the earlier
        ones (``cache`` = [k, v], each (B, H, n, d/H), extended in place); eval mode."""
        b, _, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, 1, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if cache:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)  # (B, H, n+1, d/H)
        cache[:] = [k, v]
        a = F.scaled_dot_product_attention(q, k, v)  # the newest position sees all earlier ones
        x = x + self.proj(a.transpose(1, 2).reshape(b, 1, d))
        return x + self.ff(self.norm2(x))


class PoseGPT(nn.Module):
    """Autoregressive pose-code model with per-layer identity-style injection (§7.3)."""

    def __init__(
        self, cfg: PoseGPTConfig, audio_dim: int, num_identities: int, num_codes: int, downsample: int
    ) -> None:
        """``num_codes`` the pose codebook size; ``downsample`` motion frames per code."""
        super().__init__()
        d, k = cfg.d, num_codes
        self.num_codes, self.bos, self.max_steps = k, k, cfg.max_steps
        step = 2 * downsample  # audio frames (50 Hz) per code
        self.audio_proj = nn.Conv1d(audio_dim, d, kernel_size=step, stride=step)
        self.token = nn.Embedding(k + 1, d)  # + BOS
        self.position = nn.Embedding(cfg.max_steps, d)
        self.style = nn.Embedding(num_identities, d)  # one pose-style embedding per training identity
        self.inject = nn.ModuleList(nn.Linear(d, d) for _ in range(cfg.layers))  # U_l
        self.blocks = nn.ModuleList(_CausalBlock(d, cfg.heads, cfg.ff, cfg.dropout) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, k)
        self.dropout = nn.Dropout(cfg.dropout)

    def audio_tokens(self, audio: torch.Tensor) -> torch.Tensor:
        """Aligned HuBERT ⊕ log-mel (B, 2T, A), 2T a multiple of the code step -> (B, L, d)."""
        return self.audio_proj(audio.transpose(1, 2)).transpose(1, 2)

    def forward(self, audio_tokens: torch.Tensor, codes_in: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        """audio_tokens (B, L, d), codes_in (B, L) = [BOS, c_0, ..., c_{L-2}], identity (B,) ->
        logits (B, L, K)."""
        n = codes_in.shape[1]
        if n > self.max_steps:
            raise ValueError(f"PoseGPT: {n} code steps exceed posegpt.max_steps={self.max_steps}")
        x = self.token(codes_in) + audio_tokens + self.position(torch.arange(n, device=codes_in.device))[None]
        x = self.dropout(x)
        e = self.style(identity)  # (B, d)
        for inject, block in zip(self.inject, self.blocks, strict=True):
            x = block(x + inject(e)[:, None])
        return self.head(self.norm(x))  # (B, L, K)

    @torch.no_grad()
    def sample(
        self,
        audio_tokens: torch.Tensor,
        identity: torch.Tensor,
        generator: torch.Generator,
        mode: str = "sample",
        temperature: float = 1.0,
        top_k: int = 0,
        context: int | None = None,
        incremental: bool = True,
    ) -> torch.Tensor:
        """Codes (B, L) decoded autoregressively by a :class:`PoseCodeSampler` (its docstring
        has the rules) over all of ``audio_tokens`` (B, L, d)."""
        sampler = PoseCodeSampler(self, identity, generator, mode, temperature, top_k, context, incremental)
        sampler.append(audio_tokens)
        steps = [sampler.step() for _ in range(audio_tokens.shape[1])]  # L x (B,)
        if not steps:
            return torch.empty(identity.shape[0], 0, dtype=torch.long, device=audio_tokens.device)
        return torch.stack(steps, dim=1)  # (B, L)


class PoseCodeSampler:
    """PoseGPT's sampling one code at a time, audio tokens appended as they come (what
    :meth:`PoseGPT.sample` runs over a whole utterance, and AdaMesh's stream step by step).

    Step j sees the last ``context`` steps (default ``max_steps``) as a training window does:
    positions 0..C-1, BOS first, then the codes sampled for the earlier steps of the window
    (deviation 12). ``incremental`` (in eval mode): while the window still starts at step 0
    (j < C) each step runs the newest position only, against cached keys and values; once it
    slides, every position of the window changes (BOS first, positions from 0), so each later
    step runs its whole window of C positions, as ``incremental=False`` does for every step.
    Either way a step costs at most a window's worth, so sampling is linear in L. Only the
    last C tokens and codes are kept."""

    def __init__(
        self,
        gpt: PoseGPT,
        identity: torch.Tensor,
        generator: torch.Generator,
        mode: str = "sample",
        temperature: float = 1.0,
        top_k: int = 0,
        context: int | None = None,
        incremental: bool = True,
    ) -> None:
        """identity (B,) pose-style identities; ``generator`` draws the samples."""
        self.gpt, self.identity, self.generator = gpt, identity, generator
        self.mode, self.temperature, self.top_k, self.incremental = mode, temperature, top_k, incremental
        self.c = min(context or gpt.max_steps, gpt.max_steps)
        b, device = identity.shape[0], identity.device
        self.bos = torch.full((b, 1), gpt.bos, dtype=torch.long, device=device)
        self.e = gpt.style(identity)  # (B, d)
        self.cache: list[list[torch.Tensor]] = [[] for _ in gpt.blocks]
        self.steps = 0  # codes sampled
        self.num_tokens = 0  # audio tokens appended
        self._tokens = torch.zeros(b, 0, gpt.token.embedding_dim, device=device)  # (B, kept, d) from _off
        self._codes = torch.empty(b, 0, dtype=torch.long, device=device)  # (B, kept) from _off
        self._off = 0  # step index of _tokens[:, 0] and _codes[:, 0]

    def append(self, audio_tokens: torch.Tensor) -> None:
        """Add audio tokens (B, n, d) for the next steps."""
        self._tokens = torch.cat([self._tokens, audio_tokens], dim=1)
        self.num_tokens += audio_tokens.shape[1]

    @property
    def ready(self) -> bool:
        """Whether the next step's audio token is there."""
        return self.steps < self.num_tokens

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Sample the next code (B,)."""
        gpt, j, off = self.gpt, self.steps, self._off
        if j >= self.num_tokens:
            raise RuntimeError(f"step {j} has no audio token yet ({self.num_tokens} appended)")
        start = max(0, j - self.c + 1)
        if self.incremental and not gpt.training and start == 0:
            prev = self.bos if j == 0 else self._codes[:, -1:]  # (B, 1)
            x = gpt.token(prev) + self._tokens[:, j - off : j - off + 1] + gpt.position.weight[j]  # (B, 1, d)
            for inject, block, kv in zip(gpt.inject, gpt.blocks, self.cache, strict=True):
                x = block.step(x + inject(self.e)[:, None], kv)
            logits = gpt.head(gpt.norm(x))[:, -1]  # (B, K)
        else:
            codes_in = torch.cat([self.bos, self._codes[:, start - off :]], dim=1)  # (B, j - start + 1)
            logits = gpt(self._tokens[:, start - off : j - off + 1], codes_in, self.identity)[:, -1]  # (B, K)
        if self.mode == "greedy":
            nxt = logits.argmax(-1)
        else:
            logits = logits / self.temperature
            if self.top_k > 0:
                kth = torch.topk(logits, min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits.float(), dim=-1).cpu()
            nxt = torch.multinomial(probs, 1, generator=self.generator)[:, 0].to(logits.device)
        self._codes = torch.cat([self._codes, nxt[:, None]], dim=1)
        self.steps += 1
        keep = max(0, self.steps - self.c + 1)  # the next step's window starts here
        if keep > self._off:
            self._tokens, self._codes = self._tokens[:, keep - self._off :], self._codes[:, keep - self._off :]
            self._off = keep
            self.cache = [[] for _ in gpt.blocks]  # the window slid: no cached key stays valid
        return nxt  # (B,)


# --------------------------------------------------------------------------------------
# Pose-style matrices (§7.4)
# --------------------------------------------------------------------------------------


def pose_style_distances(
    ref: torch.Tensor, ref_counts: torch.Tensor, table: torch.Tensor, counts: torch.Tensor, min_shared: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """D(S', S_id) = mean over the clusters present in both of ||S'[c] - S_id[c]||_2 (D12).

    ref (k, D) and ref_counts (k,) of the reference; table (N, k, D) and counts (N, k) of
    the identities. Returns distances (N,) (inf where fewer than ``min_shared`` clusters
    are shared) and the shared-cluster counts (N,)."""
    shared = (ref_counts > 0)[None] & (counts > 0)  # (N, k)
    d = torch.linalg.vector_norm(ref[None] - table, dim=-1)  # (N, k)
    n = shared.sum(1)  # (N,)
    dist = (d * shared).sum(1) / n.clamp_min(1)
    dist = torch.where(n >= max(1, min_shared), dist, torch.full_like(dist, float("inf")))
    return dist, n
