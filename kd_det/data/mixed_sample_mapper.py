"""``MixedSampleDatasetMapper`` and its helpers, importable from their original location.

The implementation lives in :mod:`kd_det.data.mix` (geometry, strategies, partners, mapper).
"""

from .mix import (  # noqa: F401
    BOX_RULES,
    MIX_STRATEGY_REGISTRY,
    MIX_TYPES,
    MixedSampleDatasetMapper,
    check_mix_args,
    visible_geometry,
)
from .mix.geometry import Fit as _Fit  # noqa: F401  (tests construct fits directly)

__all__ = [
    "BOX_RULES",
    "MIX_STRATEGY_REGISTRY",
    "MIX_TYPES",
    "MixedSampleDatasetMapper",
    "check_mix_args",
    "visible_geometry",
]
