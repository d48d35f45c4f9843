"""Models: backbones and distillation meta-architectures, registered on import."""
from . import backbone  # noqa: F401
