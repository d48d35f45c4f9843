"""kd_det: knowledge distillation for detectron2 detectors.

``import kd_det`` registers kd_det's backbones and meta-architectures in detectron2's registries.
"""

from .config import add_kd_config, get_kd_cfg  # noqa: F401
from . import modeling  # noqa: F401  (registers backbones and meta-architectures)
from . import data  # noqa: F401

__version__ = "0.1.0"
