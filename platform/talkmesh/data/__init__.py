"""Corpora on disk -> ``Clip`` records -> padded batches.

``open_corpus(cfg)`` picks the reader for ``cfg.format``; ``ClipDataset`` windows and
collates clips for training and evaluation.
"""

from talkmesh.data.clip import Clip, SequenceInfo
from talkmesh.data.corpus import Corpus, CorpusInfo, DataError, available_formats, open_corpus

__all__ = [
    "Clip",
    "Corpus",
    "CorpusInfo",
    "DataError",
    "SequenceInfo",
    "available_formats",
    "open_corpus",
]
