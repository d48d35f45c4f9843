"""Training engine: the trainer and crash-safe checkpointing."""

from .checkpoint import AtomicDetectionCheckpointer  # noqa: F401
from .trainer import KDTrainer  # noqa: F401
