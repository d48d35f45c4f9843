"""Models: backbones and distillation meta-architectures, registered on import."""

from . import backbone  # noqa: F401
from .distillation import DistillationRCNN  # noqa: F401
from .online_distillation import OnlineDistillationRCNN  # noqa: F401
from .teacher import TeacherLoadError, build_teacher  # noqa: F401
