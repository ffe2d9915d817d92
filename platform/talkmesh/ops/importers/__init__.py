"""Released reference checkpoints onto talkmesh methods (``talkmesh import``, DESIGN.md:
"Where the authors released weights, ``ops/`` maps their state dict onto the method with an
explicit, documented key map").

* :mod:`~talkmesh.ops.importers.keymap` - key maps (:class:`KeyRule`), the strict mapping and
  its inverse, weights-only loading, sha256;
* :mod:`~talkmesh.ops.importers.base` - the :class:`Importer` contract and :func:`build_imported`;
* :mod:`~talkmesh.ops.importers.faceformer` - FaceFormer's ``vocaset.pth`` / ``biwi.pth``;
* :mod:`~talkmesh.ops.importers.mimic` - Mimic's 3D-HDTF ``Epoch_125.pth``;
* :mod:`~talkmesh.ops.importers.run` - :func:`import_checkpoint`: MLflow run + registered version.
"""

from talkmesh.ops.importers.base import ImportedModel, Importer, build_imported
from talkmesh.ops.importers.keymap import (
    CheckpointImportError,
    KeyRule,
    MappedState,
    file_sha256,
    load_reference_state,
    map_state_dict,
    reference_state_dict,
)
from talkmesh.ops.importers.run import IMPORTERS, ImportReport, get_importer, import_checkpoint

__all__ = [
    "IMPORTERS",
    "CheckpointImportError",
    "ImportReport",
    "ImportedModel",
    "Importer",
    "KeyRule",
    "MappedState",
    "build_imported",
    "file_sha256",
    "get_importer",
    "import_checkpoint",
    "load_reference_state",
    "map_state_dict",
    "reference_state_dict",
]
