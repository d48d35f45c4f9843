"""Models: backbones and distillation meta-architectures, registered on import."""

from . import backbone  # noqa: F401
from .meta_arch import DistillationRCNN, DistillationRetinaNet, OnlineDistillationRCNN  # noqa: F401
from .teacher import TeacherLoadError, build_teacher  # noqa: F401
