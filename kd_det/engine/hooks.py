"""Training hooks kd_det adds to detectron2's trainer."""

from detectron2.engine import HookBase

__all__ = ["EMAUpdateHook"]


class EMAUpdateHook(HookBase):
    """Calls ``model.update_ema()`` after every optimizer step.

    EMA self-ensemble teachers (:mod:`kd_det.modeling.online.ema`) average the weights the
    optimizer just wrote, so the update belongs after the step and before the checkpointer and
    evaluation hooks (which must see the updated EMA weights).
    """

    def __init__(self, model):
        """
        Args:
            model (nn.Module): a model with ``update_ema()`` (unwrapped from DDP).
        """
        self._model = model

    def after_step(self):
        self._model.update_ema()
