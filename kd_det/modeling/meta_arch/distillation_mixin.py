"""``DistillationMixin``: the teacher-student plumbing every offline meta-architecture shares.

Listed before a detectron2 meta-architecture in the bases (``class X(DistillationMixin,
RetinaNet)``), it adds what does not depend on the detector family:

* ``from_config``: the config's ranges checked first, then the subclass's ``kd_arguments(cfg)``
  (the teacher and the term weights) added to the detector's own arguments;
* the frozen teacher, held outside the module tree (``TeacherHolder``);
* one feature hint per image (foreground weight map, the level's adapter, the registered loss);
* the reduction of every term: ``weight * warm-up * mean over valid images``.

The subclass owns its family's terms (ROI and RPN, or dense head and CrossKD) and its forward.
"""

from torch import nn

from kd_det.config.validation import validate_kd_config

from ..common import check_convertible, linear_warmup
from ..losses import feature_hint_per_image, foreground_maps, masked_mean
from ..teacher import TeacherHolder

__all__ = ["DistillationMixin"]


class DistillationMixin:
    """Shared by :class:`DistillationRCNN` and :class:`DistillationRetinaNet`.

    The subclass sets ``foreground_weight``, ``warmup_iters``, ``kd_adapters`` (built after
    :meth:`hold_teacher`) and defines ``distills`` and the classmethod ``kd_arguments``.
    """

    @classmethod
    def from_config(cls, cfg):
        validate_kd_config(cfg)  # ranges first: before a teacher is built
        ret = super().from_config(cfg)
        ret.update(cls.kd_arguments(cfg))
        return ret

    def hold_teacher(self, teacher, teacher_input_format):
        """Keep ``teacher`` frozen and outside the module tree, or nothing when no term is on.

        Returns:
            bool: whether something is distilled (False: no teacher is held, no adapters, and
            the model trains exactly as its detectron2 base class).
        """
        if not self.distills:
            self._teacher = None
            self.kd_adapters = nn.ModuleDict()
            return False
        if teacher is None:
            raise ValueError("Distillation weights are set but no teacher was given.")
        self._teacher = TeacherHolder(teacher)
        check_convertible(self.input_format, teacher_input_format, "the teacher")
        return True

    @property
    def teacher(self):
        """The frozen teacher (not a submodule), or None when nothing is distilled."""
        return None if self._teacher is None else self._teacher.get(self.device)

    def warmup_factor(self):
        """Linear warm-up of every distillation weight (:func:`.common.linear_warmup`)."""
        return linear_warmup(self.warmup_iters)

    def _hint_input(self, name, student, x, counts=None):
        """The tensor hint ``name`` reads; ``x`` itself here. A subclass with per-image hint
        weights returns an alias it records (see ``DistillationRCNN._hint_input``)."""
        return x

    def _feature_term(self, name, s, t, gt_instances, stride):
        """Per-image values and validity of feature hint ``name`` (student map ``s`` against the
        teacher's ``t``), with the foreground weight map and the level's adapter if any."""
        s = self._hint_input("loss_kd_" + name, s, s.float())
        weight_map = None
        if self.foreground_weight:
            fg = foreground_maps(gt_instances, s.shape[-2:], stride, s.device)
            weight_map = 1.0 + self.foreground_weight * fg
        adapter = self.kd_adapters[name] if name in self.kd_adapters else None
        return feature_hint_per_image(self.feature_loss, s, t, adapter, weight_map)

    def add_fixed_weight_terms(self, losses, terms):
        """``losses[name] = weight * warm-up * mean over valid images`` for every term of
        ``terms`` (``name -> (values (N,), valid (N,), weight)``); returns ``losses``."""
        scale = self.warmup_factor()
        for name, (values, valid, weight) in terms.items():
            losses[name] = weight * scale * masked_mean(values, valid)
        return losses
