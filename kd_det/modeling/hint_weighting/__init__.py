"""Hint weighting: how much each distillation term (hint) counts, per image.

* The registry (``HINT_WEIGHTING_REGISTRY``, ``MODEL.KD.HINT_WEIGHTING``): ``fixed`` keeps the
  configured weights; ``dynamic`` is HKD's meta-weight network; users register their own.
* :mod:`.dynamic`: the meta-weight network, its input state and its ensemble over history.
* :mod:`.agreement`: its meta objective, the agreement of each hint's gradient with the task's.
"""

from .dynamic import META_OBJECTIVES, HintWeighting, HintWeightNet
from .registry import HINT_WEIGHTING_REGISTRY, HINT_WEIGHTINGS, build_hint_weighting

__all__ = [
    "HINT_WEIGHTINGS",
    "HINT_WEIGHTING_REGISTRY",
    "META_OBJECTIVES",
    "HintWeightNet",
    "HintWeighting",
    "build_hint_weighting",
]
