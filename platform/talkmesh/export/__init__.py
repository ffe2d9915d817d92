"""Motion -> files engines and rigs import.

* :mod:`~talkmesh.export.gltf` - glTF 2.0 binary (``.glb``) with morph-target animation
  (:func:`write_glb`, :func:`read_glb`);
* :mod:`~talkmesh.export.rig` - bounded per-frame blendshape weights for a user's rig, as
  capture-style CSV and JSON (:func:`load_rig`, :func:`solve_weights`, :func:`write_csv`,
  :func:`write_json`).

Importing this package imports numpy only; pygltflib and scipy are imported where used.
"""

from talkmesh.export.gltf import DEFAULT_MAX_TARGETS, GlbSummary, read_glb, write_glb
from talkmesh.export.rig import ARKIT_COLUMNS, Rig, RigWeights, load_rig, make_rig, solve_weights, write_csv, write_json

__all__ = [
    "ARKIT_COLUMNS",
    "DEFAULT_MAX_TARGETS",
    "GlbSummary",
    "Rig",
    "RigWeights",
    "load_rig",
    "make_rig",
    "read_glb",
    "solve_weights",
    "write_csv",
    "write_glb",
    "write_json",
]
