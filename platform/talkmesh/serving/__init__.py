"""The few-shot style adaptation service (DESIGN.md "Serving"), on Ray Serve.

* :mod:`talkmesh.serving.errors` - the one error schema (``{"error": {"code", "message",
  "field"}}``), :class:`~talkmesh.serving.errors.ServiceError` and the FastAPI handlers.
* :mod:`talkmesh.serving.inputs` - bounded decoding and validation of uploads (headers
  checked before decoding: sample rate, channels, duration, array shapes); every problem is
  an ``InputError`` (a ServiceError) naming the field.
* :mod:`talkmesh.serving.limits` - the request-body limit enforced while the body streams in,
  and decoding off the event loop.
* :mod:`talkmesh.serving.tenants` - tenants and API keys (hashes only) in the service
  database (:mod:`talkmesh.serving.db`); the FastAPI dependency, loopback-only dev mode.
* :mod:`talkmesh.serving.store` - the persisted style store at a URI (reference clips and
  the StyleStates adapted from them, per model version and tenant; fsync'ed atomic writes).
* :mod:`talkmesh.serving.jobs` - durable adaptation jobs with leases, a bounded queue, and a
  runner whose per-job timeout kills the work; :mod:`talkmesh.serving.adapt_worker` is the
  job function (no Ray) and the status a style reads as.
* :mod:`talkmesh.serving.settings` - :class:`~talkmesh.serving.settings.ServeConfig` (the
  application's ``args``) and what both deployments share.
* :mod:`talkmesh.serving.model` - the model deployment: loads
  ``models:/talkmesh-<method>@champion``, runs adaptation jobs and loads styles per request
  with model multiplexing.
* :mod:`talkmesh.serving.ingress` - the FastAPI ingress: keys, bounded decoding, routes.
* :mod:`talkmesh.serving.app` - the Serve application; ``build_app`` is the import path used
  by ``serve/config.yaml`` and ``talkmesh serve``.

Ray is imported by :mod:`talkmesh.serving.model`, :mod:`talkmesh.serving.ingress` and
:mod:`talkmesh.serving.app` only.
"""
