"""The distillation meta-architectures, registered in detectron2's ``META_ARCH_REGISTRY``.

* :class:`DistillationRCNN` (offline): a Faster R-CNN student trained with a frozen teacher.
* :class:`DistillationRetinaNet` (offline): a RetinaNet student trained with a frozen teacher
  (feature hints, dense-head KD, CrossKD).
* :class:`OnlineDistillationRCNN` (online): peer detectors trained together, with EMA teachers.

The two offline ones share the teacher handling, warm-up and FPN hint terms through
:class:`~.distillation_mixin.DistillationMixin`, so a third detector family adds only its own terms.
"""

from .distillation_rcnn import DistillationRCNN
from .distillation_retinanet import DistillationRetinaNet
from .online_distillation_rcnn import OnlineDistillationRCNN

__all__ = ["DistillationRCNN", "DistillationRetinaNet", "OnlineDistillationRCNN"]
