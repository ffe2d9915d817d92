"""The few-shot style adaptation service (DESIGN.md "Serving"), on Ray Serve.

* :mod:`talkmesh.serving.inputs` - decoding and validation of uploads (audio files,
  ``.npy`` motion/templates, style specs); every problem is an :class:`InputError` with an
  HTTP status and a message naming the field.
* :mod:`talkmesh.serving.store` - the persisted style store (reference clips and the
  StyleStates adapted from them, per model version; write-once, atomic files).
* :mod:`talkmesh.serving.app` - the Serve application: a FastAPI ingress and the model
  deployment that loads ``models:/talkmesh-<method>@champion``, adapts in the background
  and loads styles per request with model multiplexing. ``build_app`` is the import path
  used by ``serve/config.yaml`` and ``talkmesh serve``.

Ray and FastAPI are imported by :mod:`talkmesh.serving.app` only.
"""
