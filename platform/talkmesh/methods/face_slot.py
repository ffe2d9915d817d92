"""The FLAME face model of a FLAME-parameter method (AdaMesh, DEEPTalk): injected by the
service or the tests (``set_face_model``), else loaded once from the file the method's config
names. The layer is a private copy on the method's device, never part of its state dict
(licence; talkmesh.face.flame)."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from talkmesh.face.flame import FlameLayer

__all__ = ["FaceModelSlot"]


class FaceModelSlot:
    """Holds one method's face model. ``n_expr`` and ``num_vertices`` (0 = any) are what the
    method needs; ``method`` names it in messages."""

    def __init__(self, method: str, n_expr: int, num_vertices: int) -> None:
        self.method = method
        self.n_expr = n_expr
        self.num_vertices = num_vertices
        self.layer: FlameLayer | None = None
        self.missing = False  # a configured file was not found (warned once)

    def set(self, layer: FlameLayer | None, device: torch.device) -> None:
        """Keep a copy of ``layer`` on ``device`` (None clears it); checks its sizes."""
        if layer is not None:
            if getattr(layer, "n_expr", None) != self.n_expr:
                raise ValueError(f"face model must have {self.n_expr} expression components, got {layer.n_expr}")
            if self.num_vertices and layer.num_vertices != self.num_vertices:
                raise ValueError(
                    f"face model has {layer.num_vertices} vertices, the data facts say {self.num_vertices}"
                )
            layer = copy.deepcopy(layer).to(device)
        self.layer = layer

    def get(self, path: str, device: torch.device) -> FlameLayer | None:
        """The held layer, else the one in ``path`` (loaded once), else None. A configured file
        that is missing gives one warning and None."""
        if self.layer is None and path and not self.missing:
            from talkmesh.data.corpus import load_face_model

            if not Path(path).expanduser().is_file():
                warnings.warn(
                    f"{self.method}: face_model {path} not found; generate returns params without vertices "
                    "(inject a FlameLayer with set_face_model)",
                    stacklevel=3,
                )
                self.missing = True
                return None
            self.set(load_face_model(path), device)
        return self.layer

    def apply(self, fn: Any) -> None:
        """``nn.Module._apply`` for the held layer (``.to()`` / ``.cuda()`` of the method)."""
        if self.layer is not None:
            self.layer._apply(fn)
