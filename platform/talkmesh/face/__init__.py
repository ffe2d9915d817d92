"""Face models: the FLAME-style linear-blend-skinning layer and its seeded test surrogate.

``import talkmesh.face`` is cheap: torch is imported only when a name from
``talkmesh.face.flame`` is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from talkmesh.face.flame import FaceModelError, FlameLayer, convert_pkl_to_npz, make_surrogate_flame

__all__ = ["FaceModelError", "FlameLayer", "convert_pkl_to_npz", "make_surrogate_flame"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from talkmesh.face import flame

        return getattr(flame, name)
    raise AttributeError(f"module 'talkmesh.face' has no attribute {name!r}")
