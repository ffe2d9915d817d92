"""The Ray Serve application: few-shot style adaptation as a service.

    serve run serve/config.yaml              # against a running Ray (see serve/README.md)
    talkmesh serve --config serve/config.yaml  # starts a loopback-only Ray itself

Two deployments:

* ``StyleModel`` loads ``models:/talkmesh-<method>@<alias>`` (or a local method
  directory) once per replica and animates with ``method.generate``. Adaptation
  (``method.adapt(reference)``) runs as durable jobs (:mod:`talkmesh.serving.jobs`): each
  replica runs ``adapt_workers`` job runners that claim this model version's jobs from the
  service database and run them in a child process (:mod:`talkmesh.serving.adapt_worker`)
  that is killed at ``adapt_timeout_s``; a job whose replica died is taken over when its
  lease runs out. The result goes to the :class:`StyleStore`, so every replica sees it.
  Styles are loaded per request through Serve model multiplexing (``@serve.multiplexed``):
  the multiplexed model id is ``<tenant>/<canonical style spec>`` (a ``sty_...`` id, a
  training speaker name, or a weighted mix ``a:0.7,b:0.3``); a cached style is checked
  against the store (its generation) before each use, so a DELETE on any replica is
  honoured by every replica.
* ``Ingress`` (FastAPI) authenticates the caller (:mod:`talkmesh.serving.tenants`: an API
  key, or loopback-only development mode), bounds and decodes uploads off the event loop
  (:mod:`talkmesh.serving.inputs`, :mod:`talkmesh.serving.limits`) and answers HTTP:

  ``GET  /healthz``                 the model deployment answers; method, model version (no key)
  ``GET  /v1/info``                 method, fps, vertex count, training speakers, limits
  ``POST /v1/styles``               multipart ``audio`` + ``motion`` (.npy) [+ ``template``,
                                    ``name``, ``source`` audio|expression (methods whose
                                    ``adapt`` takes it: DEEPTalk's emotion source)]
                                    -> ``style_id``; 201 ready, 200 already stored and
                                    ready, 202 still adapting (poll GET)
  ``GET  /v1/styles``               the tenant's styles, a page at a time (``limit``, ``cursor``)
  ``GET  /v1/styles/{style_id}``    pending | ready | failed | absent (+ the adaptation summary)
  ``DELETE /v1/styles/{style_id}``  remove a style
  ``POST /v1/animate``              multipart ``audio`` + ``style_id`` [+ ``template``,
                                    ``format`` npz|npy|json|mp4, ``preview``; generate
                                    options ``emotion``, ``intensity``, ``emotion_audio``,
                                    ``sample``, ``temperature``, ``seed``] -> motion
  ``GET  /docs``                    OpenAPI documentation

Styles belong to the tenant that stored them; another tenant's style answers exactly like a
missing one (404). Adaptation is idempotent (the style id is the hash of the reference clip,
its adapt options and the tenant) and asynchronous, because the HTTP proxy may retry a
request (notes §4). Every error is answered in one schema, ``{"error": {"code", "message",
"field"}}`` (:mod:`talkmesh.serving.errors`); bad input gets a 4xx naming the field and never
reaches the model; a full adaptation queue answers 503 (429 for a tenant over its quota)
with ``Retry-After``.

The generate options of ``/v1/animate`` reach ``method.generate`` as keyword options only
when the method lists them in ``generate_options`` (``GET /v1/info`` shows them); otherwise
the answer is a 422 naming the field and the method. A ``ValueError`` of ``generate`` (an
emotion label the model does not know) is a 422 too.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

from talkmesh.serving.ingress import Ingress
from talkmesh.serving.model import StyleModel
from talkmesh.serving.settings import (
    ServeConfig,
    deployment_options,
    input_limits,
    load_serve_config,
    resolve_locations,
)

__all__ = [
    "Ingress",
    "ServeConfig",
    "StyleModel",
    "build_app",
    "build_app_with_deployments",
    "input_limits",
    "load_serve_config",
]


def build_app(args: Mapping[str, Any] | None = None) -> Any:
    """The Serve application (``import_path: talkmesh.serving.app:build_app``; ``args`` =
    :class:`ServeConfig` fields). One parameter, as ``serve deploy`` requires of a builder
    (it applies the config file's ``deployments`` section itself)."""
    return build_app_with_deployments(args)


def build_app_with_deployments(
    args: Mapping[str, Any] | None = None, deployments: Mapping[str, Mapping[str, Any]] | None = None
) -> Any:
    """:func:`build_app` with ``deployments``: ``StyleModel`` / ``Ingress`` -> Serve deployment
    options (replicas or autoscaling, ``max_ongoing_requests``, ``max_queued_requests``,
    health checks), applied over the defaults and ``args`` as a config file's ``deployments``
    section is by ``serve deploy`` (``talkmesh serve`` calls this). The style store location
    and the service database URL are resolved here, once, and every replica gets the same
    absolute ones."""
    cfg = resolve_locations(load_serve_config(args))
    plain = dataclasses.asdict(cfg)
    extra = deployment_options(deployments or {})
    model_opts = {"num_replicas": cfg.model_replicas, "max_ongoing_requests": cfg.model_max_ongoing_requests}
    model_opts["ray_actor_options"] = {"num_cpus": cfg.model_num_cpus}
    if "autoscaling_config" in extra["StyleModel"]:
        model_opts.pop("num_replicas")
    model = StyleModel.options(**{**model_opts, **extra["StyleModel"]}).bind(plain)
    return Ingress.options(**extra["Ingress"]).bind(model, plain)
