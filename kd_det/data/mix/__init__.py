"""Mixed-sample regularization in the data mapper: box geometry, mix strategies (a registry),
partners and randomness, and :class:`MixedSampleDatasetMapper` itself."""

from .geometry import visible_geometry
from .mapper import BOX_RULES, MixedSampleDatasetMapper, check_mix_args
from .strategies import MIX_STRATEGY_REGISTRY, MIX_TYPES

__all__ = [
    "BOX_RULES",
    "MIX_STRATEGY_REGISTRY",
    "MIX_TYPES",
    "MixedSampleDatasetMapper",
    "check_mix_args",
    "visible_geometry",
]
