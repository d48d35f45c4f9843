"""The self-ensemble teacher of online distillation: an EMA ("mean teacher") copy of a detector.

``w_ema <- d * w_ema + (1 - d) * w`` for every parameter AND every floating-point buffer
(BatchNorm running statistics are averaged with the weights they belong to; integer counters are
copied). Why each choice (docs/online_distillation.md explains them for users):

* The copy holds its weights as BUFFERS (:func:`buffer_copy`): they are not in ``parameters()``
  (no optimizer state, no gradients, DDP does not reduce them) but are in ``state_dict()``, so
  checkpoints, ``--resume`` and member export see them under the detector's own keys.
* The update runs after each optimizer step, not inside ``forward``: forward also runs outside the
  optimizer loop in training mode (PreciseBN, validation losses, gradient accumulation) and would
  then average the same weights several times. ``kd_det.engine.hooks.EMAUpdateHook`` calls it in
  a detectron2 trainer; custom loops call ``model.update_ema()`` after ``optimizer.step()``.
* An EMA copy always runs in eval mode (running BatchNorm statistics) under ``no_grad``.
"""

import copy

import torch

__all__ = ["buffer_copy", "ema_update", "fill_missing_ema"]


def buffer_copy(model):
    """A deep copy of ``model`` whose parameters are persistent buffers (same names), in eval mode.

    Buffers are saved and loaded with the state dict but are invisible to ``parameters()``,
    optimizers and DDP's gradient reduction: exactly what an EMA teacher needs.
    """
    ema = copy.deepcopy(model)
    for module in ema.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            del module._parameters[name]
            module.register_buffer(name, p.detach().clone())
    return ema.train(False)


@torch.no_grad()
def ema_update(model, ema, decay):
    """``ema <- decay * ema + (1 - decay) * model`` for every parameter and floating-point buffer
    of ``model``; integer buffers (BatchNorm's ``num_batches_tracked``) are copied.

    Why foreach: a detector has about a thousand tensors, and one ``mul_`` and one ``add_`` each
    is two thousand tiny kernel launches per step on a GPU. ``torch._foreach_mul_`` /
    ``_foreach_add_`` do the same arithmetic (the same two roundings per element) over whole
    lists, grouped by device and dtype, in a few fused launches on CUDA; on CPU they loop.
    """
    ema_state = dict(ema.named_buffers())
    groups = {}  # (device, dtype) -> ([ema tensors], [model tensors])
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, p in tensors:
        e = ema_state.get(name)
        if e is None:
            continue
        if e.is_floating_point():
            dst, src = groups.setdefault((e.device, e.dtype), ([], []))
            dst.append(e)
            src.append(p.detach().to(e.dtype))
        else:
            e.copy_(p)
    for dst, src in groups.values():
        torch._foreach_mul_(dst, decay)
        torch._foreach_add_(dst, src, alpha=1.0 - decay)


def fill_missing_ema(state_dict, ema_keys, prefix, ema_prefix, model_prefix):
    """Start EMA weights that ``state_dict`` lacks (e.g. a checkpoint of a run without EMA) from
    the loaded model's weights, in place.

    Args:
        state_dict (dict): the state dict being loaded.
        ema_keys (Iterable[str]): the EMA copy's own state-dict keys.
        prefix (str): the prefix of the module being loaded.
        ema_prefix, model_prefix (str): where the EMA copy and its model sit below ``prefix``.

    Returns:
        int: how many tensors were filled.
    """
    filled = 0
    for name in ema_keys:
        key, src = f"{prefix}{ema_prefix}{name}", f"{prefix}{model_prefix}{name}"
        if key not in state_dict and src in state_dict:
            state_dict[key] = state_dict[src]
            filled += 1
    return filled
