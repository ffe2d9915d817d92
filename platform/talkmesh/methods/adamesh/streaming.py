"""AdaMesh's stream (issue 15): expression and head pose while the audio arrives.

:meth:`AdaMesh.generate` runs two paths on the aligned HuBERT ⊕ log-mel features: the
expression adapter (a bidirectional conformer) and PoseGPT, which samples pose codes one by
one (``downsample`` frames each) and whose codes the pose VQ-VAE decodes in chunks of
``pose_vq.window`` frames. The stream keeps what is sequential and windows what is not:

* the features run on the sliding window of :class:`~talkmesh.methods.streaming.StreamContext`
  (aligned to code boundaries), and a frame's expression is final ``right_s`` after it;
* one :class:`~talkmesh.methods.adamesh.modeling.PoseCodeSampler` samples the whole
  utterance's codes with the style's seeded generator, each code as soon as its frames are
  final, so the codes follow the offline sampling process (not restarted per window);
* head poses are decoded on the offline chunks: a complete chunk as offline, the chunk in
  progress from the codes so far, its frames emitted :data:`POSE_LAG_CODES` code behind the
  newest one (the decoder's look-ahead inside the chunk).

A frame is returned when both its expression and its head pose are final; its vertices are
built as ``generate`` builds them. Look-ahead: ``right_s`` plus up to two codes' frames
(0.78 s at 25 fps with 4 frames a code).
"""

from __future__ import annotations

from typing import Any

import torch

from talkmesh.methods.adamesh.modeling import EXPR_DIM, POSE_DIM, PoseCodeSampler
from talkmesh.methods.streaming import MotionStream, StreamContext

__all__ = ["POSE_LAG_CODES", "AdaMeshStream"]

# Inside a chunk in progress, head poses are emitted this many codes behind the newest one
# (the pose decoder's look-ahead; tests/test_streaming.py measures the agreement).
POSE_LAG_CODES = 1


class AdaMeshStream(MotionStream):
    """See the module docstring."""

    def __init__(
        self,
        model: Any,  # an AdaMesh (its module imports this one)
        template: Any,
        style: Any,
        context: StreamContext,
        head_pose_in_vertices: bool | None = None,
    ) -> None:
        super().__init__(model, context)
        cfg = model.config
        self.model = model
        self.st = model.resolve_style(style)
        self.template = model._template(template)
        self.rotate = cfg.vertices_head_pose if head_pose_in_vertices is None else head_pose_in_vertices
        self.ds = cfg.pose_vq.downsample  # frames per code
        self.chunk = cfg.pose_vq.window // self.ds  # codes per decoded chunk
        self.lag = POSE_LAG_CODES  # codes
        self.sampler = PoseCodeSampler(
            model.posegpt,
            torch.tensor([self.st.pose_identity], device=model.device),
            torch.Generator().manual_seed(int(self.st.seed)),
            cfg.posegpt.sampling,
            cfg.posegpt.temperature,
            cfg.posegpt.top_k,
            context=self.chunk,
        )
        self.codes = torch.empty(1, 0, dtype=torch.long, device=model.device)  # (1, n) of the chunk in progress on
        self.codes_from = 0  # the code index of codes[:, 0]
        self.param_frames = 0  # frames whose expression is final
        self.pose_frames = 0  # frames whose head pose is final
        self._params = torch.zeros(0, EXPR_DIM, device=model.device)  # (param_frames - emitted, 53)
        self._pose = torch.zeros(0, POSE_DIM, device=model.device)  # (pose_frames - emitted, 3)
        self._last_token: torch.Tensor | None = None  # (1, 1, d) the newest audio token

    @property
    def lookahead_s(self) -> float:
        """The sliding window's look-ahead plus the wait for the code ``lag`` codes after a
        frame's own code to be sampled."""
        return super().lookahead_s + ((self.lag + 1) * self.ds - 1) / self.fps

    def _next_needed(self) -> int:
        return min(self.param_frames, self.sampler.num_tokens * self.ds)

    def _window_start(self, frame: int) -> tuple[int, int]:
        first = max(0, frame - self._left) // self.ds * self.ds  # on a code boundary
        return first, int(round(first * self._spf))

    def _frames(self, ready: int, final: bool) -> dict[str, torch.Tensor]:
        total = self.model.frames_for_audio(self.samples)
        codes_total = -(-total // self.ds)
        codes_ready = codes_total if final else ready // self.ds
        if ready > self.param_frames or codes_ready > self.sampler.num_tokens:
            self._features(ready, codes_ready)
        if final:  # a window's frame count may round one short: repeat its last row
            if self.param_frames < total and len(self._params):
                self._params = torch.cat([self._params, self._params[-1:].expand(total - self.param_frames, -1)])
                self.param_frames = total
            if self.sampler.num_tokens < codes_total and self._last_token is not None:
                self.sampler.append(self._last_token.expand(-1, codes_total - self.sampler.num_tokens, -1))
        while self.sampler.ready:
            self.codes = torch.cat([self.codes, self.sampler.step()[:, None]], dim=1)
        self._decode_poses(codes_total, final)
        n = min(self.param_frames, self.pose_frames, total) - self.emitted
        if n <= 0:
            return {}
        params, pose = self._params[:n], self._pose[:n]
        self._params, self._pose = self._params[n:], self._pose[n:]
        out = {"params": params, "head_pose": pose}
        verts = self.model._vertices(params, pose if self.rotate else None, self.template)
        if verts is not None:
            out["vertices"] = verts
        return out

    def _features(self, ready: int, codes_ready: int) -> None:
        """Expression up to frame ``ready`` and audio tokens up to code ``codes_ready`` from
        the features of one window."""
        first, sample = self._window_start(self._next_needed())
        audio = self._window(sample)  # (S_w,)
        t = self.model.frames_for_audio(int(audio.shape[0]))
        if t < 1:
            return
        tp = -(-t // self.ds) * self.ds
        both = self.model._audio_inputs(audio[None], None, torch.tensor([tp], device=self.model.device))
        if ready > self.param_frames:
            params = self.model._generate_expression(both[:, : 2 * t], self.st)  # (t, 53)
            take = min(ready, first + t)
            self._params = torch.cat([self._params, params[self.param_frames - first : take - first]])
            self.param_frames = max(self.param_frames, take)
        k0 = first // self.ds
        if codes_ready > self.sampler.num_tokens:
            tokens = self.model.posegpt.audio_tokens(both)  # (1, tp / ds, d)
            take = min(codes_ready, k0 + tokens.shape[1])
            if take > self.sampler.num_tokens:
                new = tokens[:, self.sampler.num_tokens - k0 : take - k0]
                self.sampler.append(new)
                self._last_token = new[:, -1:]

    def _decode_poses(self, codes_total: int, final: bool) -> None:
        """Head poses of the offline chunks: complete ones whole, the one in progress up to
        ``lag`` codes behind its newest code (all of it at the end)."""
        while True:
            chunk_start = self.pose_frames // (self.chunk * self.ds) * self.chunk  # a code index
            have = self.codes_from + self.codes.shape[1]  # codes sampled
            chunk_end = chunk_start + self.chunk  # the last chunk ends with the utterance's codes
            chunk_end = min(chunk_end, codes_total) if final else chunk_end
            complete = have >= chunk_end
            usable = chunk_end if complete else have - self.lag
            if usable * self.ds <= self.pose_frames:
                return
            codes = self.codes[:, chunk_start - self.codes_from : have - self.codes_from][:, : chunk_end - chunk_start]
            pose = self.model._denorm_pose(self.model.pose_vq.decode_indices(codes)[0])  # (n_codes * ds, 3)
            lo, hi = self.pose_frames - chunk_start * self.ds, usable * self.ds - chunk_start * self.ds
            self._pose = torch.cat([self._pose, pose[lo:hi]])
            self.pose_frames = usable * self.ds
            if not complete:
                return
            self.codes, self.codes_from = self.codes[:, chunk_end - self.codes_from :], chunk_end  # chunk done
