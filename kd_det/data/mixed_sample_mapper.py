"""``MixedSampleDatasetMapper`` and its helpers, importable from their original location.

The implementation lives in :mod:`kd_det.data.mix` (geometry, strategies, partners, mapper).
"""

from . import mix as _mix
from .mix import *  # noqa: F401,F403
from .mix.geometry import Fit as _Fit  # noqa: F401  (tests construct fits directly)

__all__ = list(_mix.__all__)
