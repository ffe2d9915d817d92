"""The model deployment of the style service: one replica holds the registered model.

``StyleModel`` loads ``models:/talkmesh-<method>@<alias>`` (or a local method directory)
once per replica and animates with ``method.generate``. Adaptation (``method.adapt``) runs as
durable jobs (:mod:`talkmesh.serving.jobs`): each replica runs ``adapt_workers`` job runners
that claim this model version's jobs from the service database and run them in a child
process (:mod:`talkmesh.serving.adapt_worker`) killed at ``adapt_timeout_s``; a job whose
replica died is taken over when its lease runs out. Styles are loaded per request through
Serve model multiplexing: the multiplexed model id is ``<tenant>/<canonical style spec>``,
and a cached style is checked against the store (its generation) before each use, so a
DELETE on any replica is honoured by every replica.
"""

# No `from __future__ import annotations`: FastAPI and Serve resolve signatures at run time.
import asyncio
import dataclasses
import functools
import hashlib
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from ray import serve

from talkmesh.config import ConfigError
from talkmesh.serving.adapt_worker import AdaptSpec, adapt_job, adaptation_status, submit_adaptation
from talkmesh.serving.inputs import InputError, parse_style_spec
from talkmesh.serving.jobs import JobRunner, QueueFull
from talkmesh.serving.observe import install_request_logging, record_adaptation, request_context, update_queue_depth
from talkmesh.serving.settings import (
    SAMPLE_RATE,
    ModelProblem,
    ServeConfig,
    job_queue,
    limits_info,
    load_serve_config,
    queue_error,
    resolve_locations,
)
from talkmesh.serving.store import StyleNotFound, StyleStore

if TYPE_CHECKING:  # pragma: no cover
    from talkmesh.methods.base import MotionMethod


__all__ = ["StyleModel", "load_served_model"]

log = logging.getLogger("talkmesh.serving")
MAX_STYLES_PER_REPLICA = 32  # multiplexing LRU size (fixed when the class is defined)


@dataclasses.dataclass
class _LoadedStyle:
    """A multiplexed style: what ``generate`` takes, the reference template, and the store
    generation of every stored style in it (checked before each use)."""

    style: Any
    template: np.ndarray | None
    generations: dict[str, str]


@serve.deployment(
    max_ongoing_requests=4,
    max_queued_requests=64,  # more waiting requests are refused at once (503), not queued without bound
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,  # in-flight requests finish; running jobs go back to the queue
)
class StyleModel:
    """One replica: the registered model, adaptation job runners, multiplexed styles."""

    def __init__(self, args: Mapping[str, Any]) -> None:
        import torch

        install_request_logging()
        self.cfg = resolve_locations(load_serve_config(args))
        if self.cfg.torch_threads:
            torch.set_num_threads(self.cfg.torch_threads)
        self.method, self.model_ref, self.version, self.model_key = load_served_model(self.cfg)
        self.facts = self.method.facts
        self.store = StyleStore(self.cfg.style_dir)
        self.queue = job_queue(self.cfg)
        self.faces = _load_faces(self.cfg.faces, self.facts.num_vertices)
        if self.cfg.max_batch_size > 1:
            self._generate_batched.set_max_batch_size(self.cfg.max_batch_size)
            self._generate_batched.set_batch_wait_timeout_s(self.cfg.batch_wait_s)
        self.runners = self._start_runners()  # before the face model: the saved model has none
        if self.cfg.face_model:
            from talkmesh.data.corpus import load_face_model

            layer = load_face_model(self.cfg.face_model)
            self.method.set_face_model(layer)
            if self.faces is None:
                self.faces = np.asarray(layer.faces, dtype=np.int64)  # (F, 3)
        log.info("talkmesh serving %s (%s), model key %s", self.cfg.method, self.model_ref, self.model_key)

    def _start_runners(self) -> list[JobRunner]:
        """``adapt_workers`` job runners for this model version; their child processes load
        the model from a method directory (the configured one, else a private copy)."""
        from talkmesh.train.checkpoint import save_method

        local = Path(self.cfg.model).expanduser() if self.cfg.model else None
        self._model_copy: str | None = None
        if local is not None and local.is_dir():
            model_dir = str(local.resolve())
        else:
            self._model_copy = model_dir = tempfile.mkdtemp(prefix="talkmesh-model-")
            save_method(model_dir, self.method)
        cfg = self.cfg
        spec = AdaptSpec(model_dir, self.model_key, cfg.style_dir, cfg.face_model, cfg.torch_threads, cfg.precision)
        runners = []
        for _ in range(self.cfg.adapt_workers):
            runner = JobRunner(
                self.queue,
                functools.partial(adapt_job, spec),
                timeout_s=max(self.cfg.adapt_timeout_s, 1.0),
                lease_s=self.cfg.adapt_lease_s,
                poll_s=0.25,
                model_key=self.model_key,
                on_done=record_adaptation,  # adaptation time and outcome metrics
            )
            runner.start()
            runners.append(runner)
        return runners

    def __del__(self) -> None:
        """Replica shutdown: running jobs go back to the queue (another replica takes them)."""
        for runner in getattr(self, "runners", ()):
            runner.stop(timeout_s=10)
        if getattr(self, "_model_copy", None):
            shutil.rmtree(self._model_copy, ignore_errors=True)

    def check_health(self) -> None:
        """Serve's periodic health check; it also refreshes the queue-depth metric."""
        if self.method is None:
            raise RuntimeError("model not loaded")
        if not any(r.alive for r in self.runners):
            raise RuntimeError("no adaptation job runner is alive")
        update_queue_depth(self.queue)

    def info(self) -> dict[str, Any]:
        f = self.facts
        return {
            "method": self.cfg.method,
            "model": self.model_ref,
            "model_version": self.version,
            "model_key": self.model_key,
            "style_version": int(self.method.style_version),
            "fps": float(f.fps),
            "num_vertices": int(f.num_vertices),
            "motion": f.motion,
            "param_dim": int(f.param_dim),
            "train_subjects": list(f.train_subjects),
            "templates": list(self.method.templates),
            "default_style": self.method.default_style,
            "default_template": self._audio_alone_has_vertices(),
            "supports_mix": self.method.supports_style_mixing,
            "generate_options": list(self.method.generate_options),
            "adapt_options": list(self.method.style_options),
            "limits": limits_info(self.cfg),
        }

    def card(self) -> dict[str, Any]:
        """The served version's model card (its registry description), or None for a directory."""
        if self.version is None:
            return {"model": self.model_ref, "model_version": None, "card": None}
        from talkmesh.ops import tracking

        mv = tracking.client(self.cfg.tracking_uri or None).get_model_version(
            tracking.model_name(self.cfg.method), str(self.version)
        )
        card = mv.description or f"{self.model_ref}: registered without a card (before model cards existed)"
        return {"model": self.model_ref, "model_version": self.version, "card": card}

    def _audio_alone_has_vertices(self) -> bool:
        """Whether audio alone (no template, no style) is animated as vertices: a vertex model
        carrying templates, or a FLAME-parameter model with a face model (zero shape)."""
        if self.method.template_input == "shape":
            return self.cfg.face_model != ""
        return self.method.template_for(None) is not None

    # ---- styles, multiplexed ----------------------------------------------------------------
    @serve.multiplexed(max_num_models_per_replica=MAX_STYLES_PER_REPLICA)
    async def get_style(self, model_id: str) -> _LoadedStyle:
        """The style of a multiplexed model id ``<tenant>/<canonical spec>``."""
        tenant, _, spec = model_id.partition("/")
        return await asyncio.to_thread(self._resolve, spec, tenant)

    async def _style(self, model_id: str) -> tuple[Any, np.ndarray | None]:
        """(style, reference template) of a multiplexed id; a cached style whose stored styles
        were deleted (or stored again) on any replica is resolved afresh."""
        loaded = await self.get_style(model_id)
        tenant, _, spec = model_id.partition("/")
        if not await asyncio.to_thread(self._fresh, loaded, tenant):
            fresh = await asyncio.to_thread(self._resolve, spec, tenant)
            loaded.style, loaded.template, loaded.generations = fresh.style, fresh.template, fresh.generations
        return loaded.style, loaded.template

    def _fresh(self, loaded: _LoadedStyle, tenant: str) -> bool:
        return all(self.store.exists_fresh(n, tenant, g) for n, g in loaded.generations.items())

    def _component(self, name: str, tenant: str) -> tuple[Any, np.ndarray | None, str | None]:
        """(style, template, generation) of one stored style or training speaker."""
        if self.store.exists(name, tenant):
            generation = self.store.generation(name, tenant)
            st = adaptation_status(self.store, self.queue, name, self.model_key, tenant)
            if st["status"] == "ready":
                state = self.store.load_state(
                    name, self.model_key, self.method.name, self.method.style_version, tenant
                )  # fmt: skip
                return state, self.store.reference(name, tenant).get("template"), generation
            if st["status"] == "failed":
                msg = f"adaptation of style {name} failed: {st.get('error', 'unknown error')}"
                raise ModelProblem(422, "adaptation_failed", msg, "style_id")
            try:  # e.g. a new champion: adapt again from the stored reference
                submit_adaptation(self.store, self.queue, name, self.model_key, tenant, self.cfg.adapt_options)
            except QueueFull as e:
                raise ModelProblem.of(queue_error(e)) from None
            msg = f"style {name} is being adapted for model {self.model_key}; retry shortly"
            raise ModelProblem(409, "style_pending", msg, "style_id", {"Retry-After": "1"})
        if name in self.facts.train_subjects:
            return name, None, None
        known = list(self.facts.train_subjects)
        msg = f"unknown style {name!r}: not a stored style id nor a training speaker {known}"
        raise ModelProblem(404, "not_found", msg, "style_id")

    def _resolve(self, spec: str, tenant: str) -> _LoadedStyle:
        """The style of a canonical spec for ``tenant``; every failure is a ModelProblem (4xx)."""
        from talkmesh.methods.base import StyleStateError

        try:
            return self._resolve_spec(spec, tenant)
        except InputError as e:
            raise ModelProblem.of(e) from None
        except StyleNotFound:  # deleted while being loaded
            raise ModelProblem(404, "not_found", f"unknown style in {spec!r}: it was deleted", "style_id") from None
        except (StyleStateError, OSError, ValueError, RuntimeError, KeyError) as e:
            log.warning("style %s of tenant %s cannot be loaded: %s", spec, tenant, e)
            msg = f"the stored style {spec!r} cannot be loaded for model {self.model_key}: {type(e).__name__}"
            raise ModelProblem(422, "style_unusable", msg, "style_id") from None

    def _resolve_spec(self, spec: str, tenant: str) -> _LoadedStyle:
        parts = parse_style_spec(spec)
        if len(parts) == 1:
            style, template, gen = self._component(parts[0][0], tenant)
            return _LoadedStyle(style, template, {parts[0][0]: gen} if gen else {})
        if not self.method.supports_style_mixing:
            msg = f"{self.cfg.method} does not support style mixing; send one style_id"
            raise ModelProblem(422, "mixing_unsupported", msg, "style_id")
        states, template, generations = [], None, {}
        for name, _ in parts:
            style, tmpl, gen = self._component(name, tenant)
            if isinstance(style, str):  # a training speaker
                style = self.method.encode_style(subject=style)
            states.append(style)
            template = tmpl if template is None else template
            if gen:
                generations[name] = gen
        return _LoadedStyle(self.method.mix_styles(states, [w for _, w in parts]), template, generations)

    # ---- animation ------------------------------------------------------------------------
    async def stream_style(self, request_id: str | None = None) -> dict[str, Any]:
        """The style of the request's multiplexed id for a ``/v1/stream`` session, resolved as
        for :meth:`animate`: ``{"style", "template", "model_key"}`` (the ingress animates on
        its own model copy), or ``ModelProblem.as_dict``."""
        with request_context(request_id):
            try:
                model_id = serve.get_multiplexed_model_id()
                style, template = await self._style(model_id) if model_id else (None, None)
            except ModelProblem as e:
                return e.as_dict()
            return {"style": style, "template": template, "model_key": self.model_key}

    async def animate(
        self,
        audio: np.ndarray,
        template: np.ndarray | None,
        preview: bool,
        options: Mapping[str, Any] | None = None,
        request_id: str | None = None,
        glb: bool = False,
    ) -> dict[str, Any]:
        """Motion for ``audio`` (S,) 16 kHz in the style of the request's multiplexed id;
        ``options`` are keyword options of ``generate`` (each listed in its ``generate_options``);
        ``glb`` also writes the motion as a glTF binary on the face it was made on.
        A problem is returned as ``ModelProblem.as_dict`` (the ingress answers it). Log lines
        carry the ingress's ``request_id``."""
        with request_context(request_id):
            return await self._animate(audio, template, preview, dict(options or {}), glb)

    async def _animate(
        self, audio: np.ndarray, template: np.ndarray | None, preview: bool, options: dict[str, Any], glb: bool
    ) -> dict[str, Any]:
        unlisted = sorted(set(options) - set(self.method.generate_options))
        try:
            if unlisted:
                msg = f"{', '.join(unlisted)}: not an option of the {self.cfg.method} model"
                raise ModelProblem(422, "invalid_input", msg, unlisted[0])
            model_id = serve.get_multiplexed_model_id()
            style, ref_template = await self._style(model_id) if model_id else (None, None)
            template = ref_template if template is None else template
            if self.cfg.max_batch_size > 1 and not options:  # requests of one style, batched by Serve
                arrays, gen_s, batch = await self._generate_batched(audio, template, style)
            else:
                (arrays, gen_s), batch = await asyncio.to_thread(self._generate, audio, template, style, options), 1
            if isinstance(arrays, ModelProblem):
                raise arrays
            result = await asyncio.to_thread(self._result, arrays, gen_s, audio, preview)
            if glb:
                rest = self.method.template_for(style) if template is None else template
                result["glb"] = await asyncio.to_thread(self._glb, arrays, rest)
            return {**result, "batch": batch}
        except ModelProblem as e:
            return e.as_dict()

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)  # __init__ sets the configured ones
    async def _generate_batched(
        self, audio: list[np.ndarray], template: list[np.ndarray | None], style: list[Any]
    ) -> list[tuple[Any, float, int]]:
        """Serve's batching of animate requests of one multiplexed style and no generate options:
        one ``generate_batch`` for all; ``(arrays or ModelProblem, seconds, batch size)`` each."""
        return await asyncio.to_thread(self._generate_many, audio, template, style)

    def _generate_many(
        self, audio: list[np.ndarray], template: list[np.ndarray | None], style: list[Any]
    ) -> list[tuple[Any, float, int]]:
        from talkmesh.methods.base import StyleStateError, mixed_precision

        if len(audio) > 1:
            t0 = time.perf_counter()
            try:
                with mixed_precision(self.method.device, self.cfg.precision):
                    outs = self.method.generate_batch(audio, template, style)
                gen_s = time.perf_counter() - t0
                return [(_as_arrays(out), gen_s, len(outs)) for out in outs]
            except (ValueError, TypeError, StyleStateError):
                pass  # a request the model refuses: each on its own, so that only it fails
        results: list[tuple[Any, float, int]] = []
        for a, t, st in zip(audio, template, style, strict=True):
            try:
                results.append((*self._generate(a, t, st, {}), 1))
            except ModelProblem as e:
                results.append((e, 0.0, 1))
        return results

    def _generate(
        self, audio: np.ndarray, template: np.ndarray | None, style: Any, options: Mapping[str, Any]
    ) -> tuple[dict[str, np.ndarray], float]:
        """(outputs as float32 arrays, seconds) of ``generate``; a refusal is a ModelProblem 422."""
        from talkmesh.methods.base import StyleStateError, mixed_precision

        t0 = time.perf_counter()
        try:
            with mixed_precision(self.method.device, self.cfg.precision):
                out = self.method.generate(audio, template, style, **options)
        except (ValueError, TypeError, StyleStateError) as e:
            raise ModelProblem(422, "cannot_animate", f"cannot animate: {e}") from None
        return _as_arrays(out), time.perf_counter() - t0

    def _result(self, arrays: dict[str, np.ndarray], gen_s: float, audio: np.ndarray, preview: bool) -> dict[str, Any]:
        """The answer to the ingress: outputs, fps, model key, timings, the optional preview."""
        result: dict[str, Any] = {
            "outputs": arrays,
            "fps": float(self.facts.fps),
            "model_key": self.model_key,
            "generate_s": gen_s,
            "audio_s": audio.shape[0] / SAMPLE_RATE,
        }
        if preview:
            result["preview_mp4"] = self._render(_renderable(arrays, "preview"), audio)
        return result

    def _glb(self, arrays: dict[str, np.ndarray], rest: np.ndarray | None) -> bytes:
        """The motion as a .glb (talkmesh.export.gltf) on ``rest`` (V, 3), the face it was made on."""
        from talkmesh.export import write_glb

        vertices = _renderable(arrays, "format")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "motion.glb"
            write_glb(path, vertices, float(self.facts.fps), self.faces, rest, extras={"model": self.model_key})
            return path.read_bytes()

    def _render(self, vertices: np.ndarray, audio: np.ndarray) -> bytes:
        from talkmesh.render import render_motion

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "preview.mp4"
            size = (self.cfg.preview_size, self.cfg.preview_size)
            render_motion(
                vertices, self.faces, path, float(self.facts.fps), audio=audio, size=size, view=self.cfg.preview_view
            )
            return path.read_bytes()


def _renderable(arrays: Mapping[str, np.ndarray], field: str) -> np.ndarray:
    """The finite (T, V, 3) vertices a preview or a .glb is made from; else a 422 naming ``field``."""
    if "vertices" not in arrays:
        raise ModelProblem(422, "no_vertices", "this model returns no vertices to render or export", field)
    if not np.isfinite(arrays["vertices"]).all():
        raise ModelProblem(422, "non_finite_output", "the motion holds non-finite values; nothing to render", field)
    return arrays["vertices"]


def _as_arrays(out: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The tensors of a ``generate`` result as float32 numpy arrays."""
    import torch

    return {k: v.detach().float().cpu().numpy() for k, v in out.items() if isinstance(v, torch.Tensor)}


def load_served_model(cfg: ServeConfig) -> tuple["MotionMethod", str, int | None, str]:
    """(method in eval mode, model reference, registry version or None, model key)."""
    from talkmesh.ops import tracking
    from talkmesh.train.checkpoint import MODEL_FILE, load_method

    uri = cfg.tracking_uri or None
    ref = cfg.model
    local = Path(ref).expanduser() if ref else None
    if local is not None and local.is_dir():
        loaded = load_method(local)
        digest = hashlib.sha256((local / MODEL_FILE).read_bytes()).hexdigest()[:12]
        if loaded.info.get("method") != cfg.method:
            raise ConfigError(f"model: {local} holds {loaded.info.get('method')!r}, not {cfg.method!r}")
        return loaded.method, str(local), None, f"{cfg.method}-local-{digest}"
    if ref and not ref.startswith("models:/"):
        raise ConfigError(f"model: {ref!r} is neither a method directory nor a models:/ URI")
    alias = cfg.alias
    if ref:  # models:/talkmesh-<method>@alias or models:/talkmesh-<method>/<version>
        body = ref.removeprefix("models:/")
        name, sep, alias = body.partition("@") if "@" in body else body.partition("/")
        if name != tracking.model_name(cfg.method) or not sep or not alias:
            raise ConfigError(f"model: expected models:/{tracking.model_name(cfg.method)}@<alias> or /<version>")
    version = int(alias) if alias.isdigit() else tracking.get_alias_version(cfg.method, alias, uri=uri)
    if version is None:
        raise RuntimeError(
            f"no models:/{tracking.model_name(cfg.method)}@{alias} in the tracking store "
            f"{uri or tracking.tracking_uri()}: train and register one first (python jobs/{cfg.method}.py)"
        )
    method, _, _ = tracking.load_registered(cfg.method, str(version), uri=uri)
    return method, f"models:/{tracking.model_name(cfg.method)}/{version}", version, f"{cfg.method}-v{version}"


def _load_faces(path: str, num_vertices: int) -> np.ndarray | None:
    if not path:
        return None
    faces = np.load(Path(path).expanduser(), allow_pickle=False)
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.dtype.kind not in "iu":
        raise ConfigError(f"faces: {path} must hold an integer (F, 3) array, got {faces.dtype} {faces.shape}")
    if faces.size and (faces.min() < 0 or faces.max() >= num_vertices):
        raise ConfigError(f"faces: {path} indexes vertices outside [0, {num_vertices})")
    return faces.astype(np.int64)
