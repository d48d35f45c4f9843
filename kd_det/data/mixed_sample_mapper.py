"""Deprecated location of ``MixedSampleDatasetMapper``: import from :mod:`kd_det.data.mix`.

Kept for one release so that user code written before the mapper was split into
``kd_det.data.mix`` (geometry, strategies, partners, mapper) still imports, with a warning.
"""

import warnings

from . import mix as _mix
from .mix import *  # noqa: F401,F403

warnings.warn(
    "kd_det.data.mixed_sample_mapper is deprecated and will be removed in the next release; "
    "import MixedSampleDatasetMapper and its helpers from kd_det.data.mix.",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = list(_mix.__all__)
