"""BIWI reader (``data.format=biwi``): the CodeTalker processed layout of the emotional subset.

Spec: datasets.md §1 (rates, units), §3.2 (processed layout), §3.3 (splits), §3.4 and §7
(regions), §9 (decisions); metrics.md §6.3 (style-reference pools).

Layout (processed only; the raw ``.vl``/``.flv`` release must first go through the
CodeTalker pipeline)::

    vertices_npy/<subj>_eXX.npy   (T, 70110) at 25 fps, CodeTalker-normalised (never rescaled)
    wav/<subj>_eXX.wav            44.1 kHz typically; resampled to 16 kHz on load
    templates.pkl                 subject -> (23370, 3)
    regions/lve.txt, fdd.txt      CodeTalker lip (4996) / upper-face (7784) index lists;
                                  ``data.lip_regions`` / ``data.upper_regions`` override them
    text/<subj>_eXX.txt           optional transcript

Splits (§3.3; one-hot order = the order of ``TRAIN_SUBJECTS``):

    train      F2 F3 F4 M3 M4 M5, e01-e32
    val        same 6, e33-e36
    test-A     same 6, e37-e40   (seen subjects)
    test-B     F1 F5 F6 F7 F8 M1 M2 M6, e37-e40   (unseen subjects)
    reference  test-B subjects' e01-e36 (style-reference pool, §3.3 DECISION)
    unused     everything else, including subjects outside the official lists

Every file in ``vertices_npy/`` must be named ``<subj>_eXX.npy``; anything else is an error
naming the file (the neutral, non-emotional part of BIWI is not used by any method).
"""

from __future__ import annotations

import functools
import re

from talkmesh.config import DataConfig
from talkmesh.data.corpus import CorpusInfo
from talkmesh.data.errors import DataError
from talkmesh.data.processed import ProcessedCorpus
from talkmesh.data.regions import Regions, load_regions

__all__ = ["TEST_B_SUBJECTS", "TRAIN_SUBJECTS", "BiwiCorpus", "biwi_split"]

# datasets.md §3.3. Train order = one-hot order.
TRAIN_SUBJECTS: tuple[str, ...] = ("F2", "F3", "F4", "M3", "M4", "M5")
TEST_B_SUBJECTS: tuple[str, ...] = ("F1", "F5", "F6", "F7", "F8", "M1", "M2", "M6")

SPLITS: tuple[str, ...] = ("train", "val", "test-A", "test-B", "reference")
NATIVE_FPS = 25.0
LIP_FILE = "regions/lve.txt"
UPPER_FILE = "regions/fdd.txt"

_STEM = re.compile(r"^(?P<subject>.+)_e(?P<num>\d{2})$")


def biwi_split(subject: str, sentence: str) -> str:
    """The split of (subject, two-digit emotional sentence id), or "unused" (datasets.md §3.3)."""
    try:
        n = int(sentence)
    except ValueError:
        return "unused"
    if subject in TRAIN_SUBJECTS:
        if 1 <= n <= 32:
            return "train"
        if 33 <= n <= 36:
            return "val"
        if 37 <= n <= 40:
            return "test-A"
    elif subject in TEST_B_SUBJECTS:
        if 37 <= n <= 40:
            return "test-B"
        if 1 <= n <= 36:
            return "reference"
    return "unused"


class BiwiCorpus(ProcessedCorpus):
    """BIWI emotional subset in the CodeTalker processed layout; see the module docstring."""

    format_name = "biwi"
    native_fps = NATIVE_FPS
    default_fps = NATIVE_FPS

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__(cfg)
        if cfg.layout == "original":
            raise DataError(
                "data.layout=original: BIWI is read only in the CodeTalker processed layout "
                "(vertices_npy/, wav/, templates.pkl); see datasets.md 3.2"
            )
        _ = self.fps  # validate data.fps at construction, not at first use

    def parse_stem(self, stem: str) -> tuple[str, str]:
        m = _STEM.match(stem)
        if m is None:
            path = self.root / self.vertices_dir / f"{stem}.npy"
            raise DataError(f"{path}: file name is not of the BIWI form <subject>_eXX (e.g. F2_e01.npy)")
        return m.group("subject"), m.group("num")

    def split_of(self, subject: str, sentence: str) -> str:
        return biwi_split(subject, sentence)

    @functools.cached_property
    def info(self) -> CorpusInfo:
        notes = {
            "layout": "processed (CodeTalker pipeline, datasets.md 3.2)",
            "units": "CodeTalker-normalised coordinates, never rescaled (datasets.md 3.2 DECISION)",
            "reference": "test-B subjects' e01-e36 (datasets.md 3.3 DECISION; metrics.md 6.3)",
        }
        return self.vertex_corpus_info(
            notes,
            train_subjects=TRAIN_SUBJECTS,
            splits=SPLITS,
            eval_splits=("test-A", "test-B"),
            unseen_splits=("test-B",),
        )

    def regions(self) -> Regions:
        """CodeTalker ``regions/lve.txt`` (lips) and ``regions/fdd.txt`` (upper face), indices
        checked against the template's vertex count; ``data.*_regions`` override (§3.4, §7)."""
        return self._regions

    @functools.cached_property
    def _regions(self) -> Regions:
        nv = self.num_vertices
        lip_cfg, upper_cfg = self.cfg.lip_regions, self.cfg.upper_regions
        lip = lip_cfg or str(self.root / LIP_FILE)
        upper = upper_cfg or str(self.root / UPPER_FILE)
        for given, default in ((lip_cfg, LIP_FILE), (upper_cfg, UPPER_FILE)):
            path = self.root / default
            if not given and not path.is_file():
                raise DataError(
                    f"{path}: BIWI region file not found. Provide CodeTalker's BIWI/regions/lve.txt and fdd.txt "
                    "(also in SelfTalk's BIWI/regions) under <root>/regions/, or set data.lip_regions and "
                    "data.upper_regions."
                )
        return load_regions(lip, upper, nv)
