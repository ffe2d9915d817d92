"""AdaMesh: Personalized Facial Expressions and Head Poses for Adaptive Speech-Driven 3D
Facial Animation (arXiv:2310.07236; reference code thuhcsi/AdaMesh@07f65ac).

A folder, as the method grew past one readable file:

* ``configuration.py`` - :class:`AdaMeshConfig` (grouped in sections: ``expression``,
  ``molora``, ``adaptation``, ``pose_vq``, ``posegpt``, ``pose_index``) and its presets;
* ``modeling.py`` - the networks (expression adapter, pose VQ-VAE, PoseGPT) and the
  log-mel front end;
* ``method.py`` - :class:`AdaMesh`, the :class:`~talkmesh.methods.base.MotionMethod`
  (stages, losses, fitting, style, adaptation, generation). Its docstring holds the paper,
  the reference code and commit and the numbered Deviations list the other files refer to.
"""

from talkmesh.methods.adamesh.configuration import (
    AdaMeshConfig,
    AdaMeshLossWeights,
    AdaptationConfig,
    ExpressionConfig,
    MoLoRAConfig,
    PoseGPTConfig,
    PoseIndexConfig,
    PoseVQConfig,
    PoseVQLossWeights,
)
from talkmesh.methods.adamesh.method import AdaMesh
from talkmesh.methods.adamesh.modeling import (
    ExpressionAdapter,
    PoseGPT,
    PoseVQVAE,
    log_mel,
    mel_filterbank,
    molora_selector,
    pose_style_distances,
)

__all__ = [
    "AdaMesh",
    "AdaMeshConfig",
    "AdaMeshLossWeights",
    "AdaptationConfig",
    "ExpressionAdapter",
    "ExpressionConfig",
    "MoLoRAConfig",
    "PoseGPT",
    "PoseGPTConfig",
    "PoseIndexConfig",
    "PoseVQConfig",
    "PoseVQLossWeights",
    "PoseVQVAE",
    "log_mel",
    "mel_filterbank",
    "molora_selector",
    "pose_style_distances",
]
