"""DEEPTalk: Dynamic Emotion Embedding for Probabilistic Speech-Driven 3D Face Animation
(arXiv:2408.06010; reference code whwjdqls/DEEPTalk@37fd026).

A folder, as the method has five stages and three families of networks:

* ``configuration.py`` - :class:`DEEPTalkConfig` (one section per stage: ``fer``, ``dee``,
  ``vq``, ``generator``, plus ``sampling``) and its presets;
* ``emotion.py`` - the expression-emotion MLP, GPO pooling and the probabilistic DEE with its
  closed-form sampled distance loss;
* ``prior.py`` - the TH-VQVAE motion prior and the generator's face-feature extractor and
  code predictors;
* ``method.py`` - :class:`DEEPTalk`, the :class:`~talkmesh.methods.base.MotionMethod`. Its
  docstring holds the paper, the reference code and the numbered Deviations.
"""

from talkmesh.methods.deeptalk.configuration import (
    DEEConfig,
    DEEPTalkConfig,
    FERConfig,
    GeneratorConfig,
    GeneratorLossWeights,
    ReaderConfig,
    SamplingConfig,
    VQConfig,
)
from talkmesh.methods.deeptalk.method import DEEPTalk, swap_pairs

__all__ = [
    "DEEConfig",
    "DEEPTalk",
    "DEEPTalkConfig",
    "FERConfig",
    "GeneratorConfig",
    "GeneratorLossWeights",
    "ReaderConfig",
    "SamplingConfig",
    "VQConfig",
    "swap_pairs",
]
