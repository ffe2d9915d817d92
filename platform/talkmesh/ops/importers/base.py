"""What every importer of a released reference checkpoint provides, and the build step.

An :class:`Importer` names the reference code it reads (``reference``), the presets the
authors released weights for, the explicit key map, and per preset the talkmesh config and
the corpus facts the checkpoint implies (vertex count, fps, training subjects in the
reference's one-hot order). :func:`build_imported` turns a checkpoint file into a talkmesh
method with every weight from the file: the audio encoder is built from its config only
(``AudioEncoderConfig.from_config_only``), so no pre-trained weights need to be on disk.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from talkmesh.methods.base import DataFacts
from talkmesh.ops.importers.keymap import (
    CheckpointImportError,
    KeyRule,
    file_sha256,
    load_reference_state,
    map_state_dict,
)

__all__ = [
    "HDTF_TRAIN_SUBJECTS",
    "ImportedModel",
    "Importer",
    "build_imported",
    "published_facts",
    "read_template_source",
]

# datasets.md §4.3: 3D-HDTF ids 1..150 train; the reference's one-hot index is id - 1.
HDTF_TRAIN_SUBJECTS: tuple[str, ...] = tuple(str(i) for i in range(1, 151))


def published_facts(dataset: str) -> DataFacts:
    """The data facts of a published checkpoint's dataset (datasets.md §2-§4): fps, FLAME /
    BIWI vertex count and the training subjects in the reference's one-hot order (the
    readers' own lists; 3D-HDTF: :data:`HDTF_TRAIN_SUBJECTS`)."""
    from talkmesh.data import biwi, vocaset

    table = {
        "vocaset": (30.0, 5023, vocaset.TRAIN_SUBJECTS),
        "biwi": (25.0, 23370, biwi.TRAIN_SUBJECTS),
        "hdtf": (25.0, 5023, HDTF_TRAIN_SUBJECTS),
    }
    if dataset not in table:
        raise ValueError(f"no published facts for dataset {dataset!r}; known: {sorted(table)}")
    fps, vertices, subjects = table[dataset]
    return DataFacts(fps=fps, num_vertices=vertices, train_subjects=subjects)


class Importer(abc.ABC):
    """One method's importer (see :mod:`talkmesh.ops.importers.faceformer`)."""

    method: ClassVar[str]  # talkmesh registry name
    reference: ClassVar[str]  # the reference code whose state dict names the map reads
    presets: ClassVar[tuple[str, ...]]  # presets the authors released weights for
    key_map: ClassVar[tuple[KeyRule, ...]]
    # talkmesh tensors no reference checkpoint holds (training bookkeeping): kept as built
    talkmesh_only: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def config(self, preset: str) -> Any:
        """The talkmesh method config the checkpoint was trained with (encoder from config only)."""

    @abc.abstractmethod
    def facts(self, preset: str) -> Any:
        """The DataFacts the checkpoint implies (fps, vertices, training subjects in one-hot order)."""

    def check_unused(self, method: torch.nn.Module, unused: Mapping[str, torch.Tensor]) -> None:  # noqa: B027
        """Check reference tensors talkmesh does not load (e.g. tables it recomputes) against
        the built method; raise :class:`CheckpointImportError` on a mismatch. Default: none."""

    def describe(self, reference: Mapping[str, torch.Tensor]) -> str:
        """What the checkpoint's shapes say (width, vertices, subjects), for error messages."""
        return f"{len(reference)} tensors"

    def flags(self, config: Any) -> dict[str, Any]:
        """The behaviour flags of the imported method's ``config`` that the checkpoint was
        trained with (logged as tags). Default: none."""
        return {}

    def check_preset(self, preset: str) -> None:
        if preset not in self.presets:
            raise CheckpointImportError(
                f"{self.method} released checkpoints come in presets {list(self.presets)}, got {preset!r}"
            )


@dataclasses.dataclass
class ImportedModel:
    """A method whose weights all come from a reference checkpoint."""

    method: Any  # MotionMethod, eval mode
    preset: str
    source: Path
    sha256: str
    names: dict[str, str]  # reference name -> talkmesh name, every loaded tensor
    unused: list[str]  # reference tensors talkmesh does not load (checked by the importer)


def build_imported(
    importer: Importer,
    checkpoint: str | Path,
    preset: str,
    *,
    config: Any | None = None,
    facts: Any | None = None,
) -> ImportedModel:
    """Load ``checkpoint`` (weights only), build ``importer.method`` for ``preset`` (or the
    given ``config`` / ``facts``, e.g. a tiny test model), map the state dict with the
    importer's key map and load it strictly. Raises :class:`CheckpointImportError` naming
    every tensor that does not fit."""
    from talkmesh.methods.registry import build_method

    path = Path(checkpoint).expanduser()
    if config is None or facts is None:
        importer.check_preset(preset)
    reference = load_reference_state(path)
    sha = file_sha256(path)
    method = build_method(importer.method, config or importer.config(preset), facts or importer.facts(preset))
    target = method.state_dict()
    own = {k: target.pop(k) for k in importer.talkmesh_only}
    try:
        mapped = map_state_dict(reference, importer.key_map, target)
        importer.check_unused(method, mapped.unused)
    except CheckpointImportError as e:
        raise CheckpointImportError(
            f"{path} does not fit talkmesh {importer.method} (preset {preset}); the checkpoint has "
            f"{importer.describe(reference)}. {e}"
        ) from None
    method.load_state_dict({**mapped.state, **own}, strict=True)
    method.eval()
    return ImportedModel(
        method=method, preset=preset, source=path, sha256=sha, names=mapped.names, unused=sorted(mapped.unused)
    )


def read_template_source(path: str | Path, facts: DataFacts) -> dict[str, np.ndarray]:
    """The training speakers' neutral templates for an imported model (which has no corpus at
    hand): the dataset's ``templates.pkl`` (subject -> (V, 3) or (3V,); read with the restricted
    unpickler, integer 3D-HDTF ids become their names) or a talkmesh ``templates.npz``. Only the
    training subjects of ``facts`` are kept; a file holding none of them is an error naming both."""
    from talkmesh.data.safepickle import load_pickle
    from talkmesh.train.checkpoint import read_templates

    p = Path(path).expanduser()
    what = "a dataset's templates.pkl (subject -> (V, 3)) or a talkmesh templates.npz"
    if not p.is_file():
        raise CheckpointImportError(f"templates {p}: no such file; expected {what}")
    try:
        raw = read_templates(p) if p.suffix == ".npz" else load_pickle(p)
    except ValueError as e:  # DataError too
        raise CheckpointImportError(f"templates {p}: {e}") from None
    if not isinstance(raw, Mapping):
        raise CheckpointImportError(f"templates {p}: holds a {type(raw).__name__}; expected {what}")
    found = {str(k): np.asarray(v, dtype=np.float32) for k, v in raw.items() if str(k) in facts.train_subjects}
    if not found:
        names = sorted(str(k) for k in raw)[:5]
        raise CheckpointImportError(
            f"templates {p}: none of the training subjects {list(facts.train_subjects)[:5]}... "
            f"(names there: {names}); expected {what}"
        )
    return found
