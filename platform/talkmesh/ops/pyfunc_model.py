"""The MLflow pyfunc model of a talkmesh method, logged as "models from code".

:func:`talkmesh.ops.tracking.log_model` passes this file's path as ``python_model=`` to
``mlflow.pyfunc.log_model``; MLflow stores the file next to the model and runs it when the
model is loaded, so the registry holds no pickled Python object. The model's artifact
``talkmesh_method`` is a method directory (``method.json`` + ``model.pt``, see
:mod:`talkmesh.train.checkpoint`).

This module is a script for MLflow, not a library module: nothing in talkmesh imports it
(running it registers the model instance with ``mlflow.models.set_model``). The loaded method
comes back with ``mlflow.pyfunc.load_model(uri).unwrap_python_model().loaded``.
"""

from __future__ import annotations

from typing import Any

import mlflow.models
import mlflow.pyfunc


class TalkmeshPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of a talkmesh method directory. ``predict`` takes
    ``{"audio": (S,) float32 16 kHz, "template": (V, 3) float32}`` (or a one-row DataFrame of
    those) and the param ``style`` (a training-subject index; -1 = the method's default) and
    returns ``{"vertices": (T, V, 3) float32}``. After loading, ``loaded`` is the
    :class:`talkmesh.train.checkpoint.LoadedMethod` (method in eval mode on the CPU)."""

    # Inputs are checked against the logged tensor signature, not against type hints (MLflow's
    # hints describe lists of records); this attribute turns MLflow's hint check off.
    _skip_type_hint_validation = True

    loaded: Any = None  # LoadedMethod, set by load_context

    def load_context(self, context: Any) -> None:
        from talkmesh.ops.tracking import MODEL_ARTIFACT
        from talkmesh.train.checkpoint import load_method

        self.loaded = load_method(context.artifacts[MODEL_ARTIFACT])

    # model_input has no type hint on purpose: MLflow reads that hint as an input schema.
    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> dict[str, Any]:  # noqa: ANN001
        import numpy as np

        if hasattr(model_input, "to_dict") and not isinstance(model_input, dict):  # a pandas DataFrame
            model_input = {k: v[0] for k, v in model_input.to_dict(orient="list").items()}
        audio = np.asarray(model_input["audio"], dtype=np.float32).reshape(-1)  # (S,)
        template = model_input.get("template")
        template = None if template is None else np.asarray(template, dtype=np.float32)  # (V, 3)
        style = int((params or {}).get("style", -1))
        out = self.loaded.method.generate(audio, template, None if style < 0 else style)
        return {k: v.detach().cpu().numpy() for k, v in out.items()}  # vertices (T, V, 3)


mlflow.models.set_model(TalkmeshPyfunc())
