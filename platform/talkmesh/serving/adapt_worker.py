"""Adaptation as a durable job: the function a :class:`~talkmesh.serving.jobs.JobRunner` runs
in its child process, and the status a style reads as while its job waits or runs.

The model replica (``talkmesh.serving.model.StyleModel``) saves the model it serves to a
method directory once and hands :func:`adapt_job` an :class:`AdaptSpec` naming it; the
child process loads the model from there on its first job and keeps it for the next ones
(one load per child, not per job), adapts to the style's stored reference clip and writes
the result to the style store. Nothing here imports Ray: the child stays a plain Python
process that the runner can kill at the job's deadline.

:func:`adaptation_status` combines the two sources of truth: the style store says
``ready`` once an adapted state is stored (that holds for every replica and survives the
job records); otherwise the job says ``pending`` (queued or running, with ``queue_s``,
``run_s`` and ``attempts`` kept apart) or ``failed`` (with its error); a style with neither
is ``absent`` (adapted on first use).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

from talkmesh.serving.jobs import FAILED, SUCCEEDED, Job, JobNotFound, JobQueue
from talkmesh.serving.store import StyleStore

__all__ = ["AdaptSpec", "adapt_job", "adaptation_status", "scalars", "submit_adaptation"]

# The reference record's fields that method.adapt reads.
REFERENCE_FIELDS = ("audio", "vertices", "params", "head_pose", "template")
# (spec, method) of the model this child process loaded last: one model per child.
_CACHE: dict[str, Any] = {}


@dataclasses.dataclass(frozen=True)
class AdaptSpec:
    """What a child process needs to adapt (picklable; sent with every job)."""

    model_dir: str  # a method directory (method.json + model.pt) holding the served model
    model_key: str  # the served model version, e.g. faceformer-v3
    style_uri: str  # the style store's absolute location
    face_model: str = ""  # FLAME model file for FLAME-parameter methods ("" = none)
    torch_threads: int = 0  # intra-op threads of the child; 0 = torch's default
    precision: str = "fp32"  # "bf16": adapt under autocast (talkmesh.methods.base.mixed_precision)


def scalars(state: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-friendly summary of a StyleState (its scalar fields)."""
    return {k: v for k, v in state.items() if isinstance(v, (bool, int, float, str))}


def _method(spec: AdaptSpec) -> Any:
    """The spec's model, loaded once per child process."""
    if _CACHE.get("spec") != spec:
        import torch

        from talkmesh.train.checkpoint import load_method

        if spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        method = load_method(spec.model_dir).method
        if spec.face_model:
            from talkmesh.data.corpus import load_face_model

            method.set_face_model(load_face_model(spec.face_model))
        _CACHE.clear()
        _CACHE.update(spec=spec, method=method)
    return _CACHE["method"]


def adapt_job(spec: AdaptSpec, job: Job) -> dict[str, Any]:
    """Adapt the model to the job's style and store the result (run in the runner's child).

    Writes the "ready" record (with the summary) before the state, so a client never sees
    a ready style without its summary; a style deleted meanwhile raises ``StyleNotFound``
    (the job fails, nothing is written). Returns the summary and the run time."""
    if job.model_key != spec.model_key:
        raise RuntimeError(f"job for model {job.model_key} given to a worker holding {spec.model_key}")
    store = StyleStore(spec.style_uri)
    method = _method(spec)
    ref = store.reference(job.style_id, job.tenant)
    record = {k: ref[k] for k in REFERENCE_FIELDS if k in ref}
    t0 = time.time()
    from talkmesh.methods.base import float32_style, mixed_precision

    with mixed_precision(method.device, spec.precision):
        state = float32_style(method.adapt(record, **dict(job.options)))
    wall_s = time.time() - t0
    summary = scalars(state)
    store.set_status(
        job.style_id, spec.model_key, "ready", job.tenant, started=t0, finished=time.time(), wall_s=wall_s,
        summary=summary,
    )  # fmt: skip
    store.save_state(job.style_id, spec.model_key, state, job.tenant)
    return {"wall_s": wall_s, "summary": summary}


def adaptation_status(
    store: StyleStore, queue: JobQueue, style_id: str, model_key: str, tenant: str | None
) -> dict[str, Any]:
    """``{"status": absent|pending|ready|failed, ...}`` of a style for one model version (see
    the module docstring); ``StyleNotFound`` when the style is not the tenant's. Blocking:
    call it off the event loop."""
    st = store.status(style_id, model_key, tenant=tenant)
    if st["status"] == "ready":
        return st
    job = queue.find(style_id, model_key)
    if job is None:
        return {"status": "absent"}
    try:
        js = queue.status(job)
    except JobNotFound:  # a DELETE forgot the job just now: the style is gone, or about to be stored again
        store.status(style_id, model_key, tenant=tenant)  # StyleNotFound once the delete took effect
        return {"status": "absent"}
    if js["status"] in ("queued", "running"):
        out = {"status": "pending", "job": js["status"], "attempts": js["attempts"], "queue_s": js["queue_s"]}
        if js["run_s"] is not None:
            out["run_s"] = js["run_s"]
        return out
    if js["status"] == FAILED:
        return {"status": "failed", "error": js.get("error") or "unknown error", "attempts": js["attempts"]}
    return {"status": "absent"}  # succeeded, yet no state stored: it was removed; adapt again on use


def submit_adaptation(
    store: StyleStore,
    queue: JobQueue,
    style_id: str,
    model_key: str,
    tenant: str | None,
    base_options: Mapping[str, Any] | None = None,
) -> Job:
    """Queue the adaptation of a stored style for ``model_key`` (idempotent: the existing job
    while it waits or runs; a failed one is queued afresh). The job's options are the
    service's ``base_options`` under the style's own ``adapt_options``. A job that succeeded
    although no state is stored any more (the state was removed) is dropped and queued again.
    Raises ``QueueFull`` / ``TenantQuotaExceeded`` (backpressure) and ``StyleNotFound``."""
    meta = store.meta(style_id, tenant)
    options = {**dict(base_options or {}), **dict(meta.get("adapt_options") or {})}
    job = queue.find(style_id, model_key)
    if (
        job is not None
        and job.state == SUCCEEDED
        and store.status(style_id, model_key, tenant=tenant)["status"] != "ready"
    ):
        queue.forget(style_id)
    return queue.submit(style_id, tenant, model_key, options)
