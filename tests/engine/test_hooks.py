"""kd_det's trainer hooks: the EMA update runs after every optimizer step."""

from detectron2.engine import HookBase

from kd_det.engine.hooks import EMAUpdateHook


class _Model:
    updates = 0

    def update_ema(self):
        self.updates += 1


def test_ema_hook_updates_after_each_step():
    model = _Model()
    hook = EMAUpdateHook(model)
    assert isinstance(hook, HookBase)
    hook.before_step()
    assert model.updates == 0
    for _ in range(3):
        hook.after_step()
    assert model.updates == 3
