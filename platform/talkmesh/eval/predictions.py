"""What the evaluators compare: ground truth, templates and predicted vertices of a clip.

Shared by :mod:`talkmesh.eval.evaluate` (decoding a method on a split),
:mod:`talkmesh.eval.scoring` (scoring saved prediction files) and
:mod:`talkmesh.eval.speaker_id` (style consistency), so that all three read a corpus the
same way:

* :func:`template` - a subject's (V, 3) neutral face: the corpus template, else the clip's,
  else (parameter corpora) the face model's template for the clip's FLAME shape;
* :func:`ground_truth` - (T, V, 3) ground-truth vertices and the template of a clip;
* :func:`method_template` - what a method's ``generate`` takes as ``template``;
* :func:`vertices_from_params` / :func:`vertices_of_output` - (T, V, 3) predicted vertices
  from FLAME parameters or from a ``generate`` output.

Imports numpy only (torch tensors are converted when torch is already loaded).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from talkmesh.data.errors import DataError
from talkmesh.eval import metrics as M

if TYPE_CHECKING:  # pragma: no cover
    from numpy.typing import DTypeLike

    from talkmesh.data.clip import Clip
    from talkmesh.data.corpus import Corpus
    from talkmesh.methods.base import MotionMethod

__all__ = [
    "ScoringError",
    "ground_truth",
    "method_template",
    "template",
    "to_numpy",
    "vertices_from_params",
    "vertices_of_output",
]


class ScoringError(DataError):
    """A prediction directory or file cannot be scored; the message names the file and
    what was expected."""


def to_numpy(x: Any, dtype: DTypeLike | None = None) -> np.ndarray:
    """``x`` (a numpy array, a torch tensor on any device, or nested sequences) as a numpy
    array, cast to ``dtype`` when given (kept otherwise)."""
    torch = sys.modules.get("torch")  # a tensor exists only when torch is loaded
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        x = (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    return np.asarray(x, dtype=dtype)


def template(corpus: Corpus, clip: Clip, num_vertices: int) -> np.ndarray:
    """(V, 3) template of ``clip``'s subject in the stored dtype: ``corpus.template(subject)``,
    else ``clip.template``, else (parameter corpora) the face model's template for
    ``clip.shape``. Raises :class:`ScoringError` when there is none."""
    tmpl = corpus.template(clip.subject)
    if tmpl is None and clip.template is not None:
        tmpl = clip.template
    if tmpl is None and corpus.info.motion == "params":
        layer = corpus.face_model()
        if layer is not None:
            tmpl = to_numpy(layer.template(clip.shape))
    if tmpl is None:
        raise ScoringError(f"{clip.name}: no template for subject {clip.subject!r} (needed by fdd/ldd)")
    return M.as_template(tmpl, num_vertices, f"template of {clip.subject}")


def ground_truth(corpus: Corpus, clip: Clip) -> tuple[np.ndarray, np.ndarray]:
    """(T, V, 3) float32 ground-truth vertices (``corpus.vertices_of(clip)``, parameter
    corpora included) and the (V, 3) float32 template of ``clip``."""
    gt = M.as_vertices(to_numpy(corpus.vertices_of(clip), np.float32), name=f"{clip.name} ground truth")
    return gt, template(corpus, clip, gt.shape[1]).astype(np.float32)


def method_template(method: MotionMethod, clip: Clip, vertices: np.ndarray) -> Any:
    """What ``method.generate`` takes as ``template`` (``method.template_input``): the
    (V, 3) ``vertices`` template, or the clip's FLAME ``shape`` vector."""
    return clip.shape if method.template_input == "shape" else vertices


def vertices_from_params(
    corpus: Corpus, clip: Clip, params: np.ndarray, num_vertices: int, name: str = "motion"
) -> np.ndarray:
    """(T, V, 3) vertices of (T, >=53) FLAME parameters of ``clip`` through the corpus face
    model (expression + jaw; columns 53: such as the head rotation are dropped), in the
    face model's dtype. Raises :class:`ScoringError` when the corpus has no face model."""
    layer = corpus.face_model()
    if layer is None:
        raise ScoringError(
            f"{name}: FLAME parameters need a face model; set data.flame_model=/path/to/generic_model.pkl"
        )
    verts = to_numpy(layer.vertices_from_params(np.asarray(params)[:, :53].astype(np.float32), clip.shape))
    return M.as_vertices(verts, num_vertices, name)


def vertices_of_output(corpus: Corpus, clip: Clip, out: dict[str, Any], num_vertices: int) -> np.ndarray:
    """(T, V, 3) float32 vertices of a ``generate`` output: its ``vertices``, or its
    ``params`` through the corpus face model."""
    if "vertices" in out:
        return M.as_vertices(to_numpy(out["vertices"], np.float32), num_vertices, f"{clip.name} prediction")
    if "params" in out:
        params = to_numpy(out["params"], np.float32)
        return vertices_from_params(corpus, clip, params, num_vertices, f"{clip.name} prediction").astype(
            np.float32, copy=False
        )
    raise ValueError(f"{clip.name}: generate returned neither 'vertices' nor 'params' ({sorted(out)})")
