"""``talkmesh import``: a released checkpoint -> an MLflow run and a registered model version.

The run (experiment ``talkmesh-<method>``, the one training runs use; run name
``import-<preset>-<sha256[:12]>``) carries the tags ``talkmesh.import.sha256`` (the source
file's sha256), ``talkmesh.import.source``, ``.reference``, ``.preset``, ``.unused`` (the
reference tensors not loaded) and ``talkmesh.import.flag.<name>`` (the behaviour flags set
for the checkpoint), the method config and data facts as params, and ``key_map.json`` (every
reference name -> talkmesh name) as an artifact. The model is registered as
``talkmesh-<method>`` from that run (its ``method.json`` records the same provenance under
``imported_from``), so that ``talkmesh serve
model=models:/talkmesh-<method>/<version>`` (or an alias) serves it and the evaluator scores it.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

from talkmesh.ops.importers.base import ImportedModel, Importer, build_imported, read_template_source
from talkmesh.ops.importers.faceformer import FaceFormerImporter
from talkmesh.ops.importers.keymap import CheckpointImportError, KeyRule
from talkmesh.ops.importers.mimic import MimicImporter

__all__ = ["IMPORTERS", "ImportReport", "get_importer", "import_checkpoint", "unused_summary"]

IMPORTERS: dict[str, type[Importer]] = {"faceformer": FaceFormerImporter, "mimic": MimicImporter}
TAG = "talkmesh.import"


def get_importer(method: str) -> Importer:
    """The importer of ``method``'s released checkpoints."""
    try:
        return IMPORTERS[method]()
    except KeyError:
        raise CheckpointImportError(f"no importer for {method!r}; available: {sorted(IMPORTERS)}") from None


@dataclasses.dataclass
class ImportReport:
    """What :func:`import_checkpoint` did."""

    imported: ImportedModel
    run_id: str | None  # None when nothing was logged (register=False and no tracking)
    version: int | None  # registered version of talkmesh-<method>
    alias: str | None
    tracking_uri: str | None


def unused_summary(key_map: tuple[KeyRule, ...], names: list[str]) -> str:
    """The unused reference tensors by the rule that left them out: an exact rule's key, a
    prefix rule's ``prefix* (count)`` (Mimic's checkpoint leaves out 187 tensors, 11.5k
    characters, which MLflow would cut to 8000; ``key_map.json`` lists them all). "-" when none."""
    counts: dict[str, int] = {}
    for name in names:
        left_out = (r for r in key_map if r.talkmesh is None)
        rule = next((r for r in left_out if name == r.reference or r.is_prefix and name.startswith(r.reference)), None)
        label = name if rule is None or not rule.is_prefix else rule.reference + "*"
        counts[label] = counts.get(label, 0) + 1
    return ",".join(k if not k.endswith("*") else f"{k} ({n})" for k, n in sorted(counts.items())) or "-"


def _tags(importer: Importer, imp: ImportedModel) -> dict[str, str]:
    tags = {
        f"{TAG}.sha256": imp.sha256,
        f"{TAG}.source": str(imp.source.resolve()),
        f"{TAG}.reference": importer.reference,
        f"{TAG}.preset": imp.preset,
        f"{TAG}.unused": unused_summary(importer.key_map, imp.unused),
        f"{TAG}.tensors": str(len(imp.names)),
    }
    tags.update({f"{TAG}.flag.{k}": str(v) for k, v in importer.flags(imp.method.config).items()})
    return tags


def _log(importer: Importer, imp: ImportedModel, uri: str, alias: str | None) -> tuple[str, int]:
    """An MLflow run for the import, the model registered; returns (run id, version)."""
    from talkmesh.config import flatten
    from talkmesh.ops import tracking
    from talkmesh.ops.model_card import write_model_card

    method = imp.method
    tags = _tags(importer, imp)
    params = flatten({"model": method.config, "facts": method.facts.to_dict()})
    run_name = f"import-{imp.preset}-{imp.sha256[:12]}"
    with tracking.new_run(tracking.model_name(importer.method), run_name, params=params, tags=tags, uri=uri) as run_id:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "key_map.json"
            rules = [dataclasses.asdict(r) for r in importer.key_map]
            path.write_text(json.dumps({"rules": rules, "tensors": imp.names, "unused": imp.unused}, indent=1))
            tracking.log_artifacts(run_id, path, uri=uri)
        extra = {"imported_from": {k.removeprefix(f"{TAG}."): v for k, v in tags.items()}}
        version = tracking.register_model(importer.method, run_id, method=method, extra=extra, uri=uri)
        write_model_card(importer.method, version, uri)
        if alias:
            tracking.set_alias(importer.method, alias, version, uri=uri)
    return run_id, version


def import_checkpoint(
    method: str,
    checkpoint: str | Path,
    preset: str,
    *,
    tracking_uri: str | None = None,
    register: bool = True,
    alias: str | None = None,
    config: Any | None = None,
    facts: Any | None = None,
    templates: str | Path | None = None,
) -> ImportReport:
    """Import a released checkpoint of ``method`` (see :func:`build_imported`; ``config`` /
    ``facts`` override the preset's, e.g. for a tiny test model) and, with ``register``, log
    an MLflow run (source sha256 as a tag) and register ``talkmesh-<method>`` (``alias``, if
    given, then points at the new version). ``templates`` (the dataset's ``templates.pkl`` or a
    ``templates.npz``, see :func:`read_template_source`) gives the model its training speakers'
    templates, so that it animates audio alone; without it the imported model carries none and
    every request must send a template."""
    from talkmesh.ops import tracking

    importer = get_importer(method)
    imp = build_imported(importer, checkpoint, preset, config=config, facts=facts)
    if templates is not None:
        try:
            imp.method.set_templates(read_template_source(templates, imp.method.facts))
        except CheckpointImportError:
            raise
        except ValueError as e:  # a mesh of another topology, non-finite values
            raise CheckpointImportError(f"templates {templates}: {e}") from None
    if not register:
        return ImportReport(imported=imp, run_id=None, version=None, alias=None, tracking_uri=None)
    uri = tracking_uri or tracking.tracking_uri()
    run_id, version = _log(importer, imp, uri, alias)
    return ImportReport(imported=imp, run_id=run_id, version=version, alias=alias, tracking_uri=uri)
