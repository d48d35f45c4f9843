"""The feature-loss registry: ``MODEL.KD.FEATURE.LOSS`` (and ``MODEL.ONLINE_KD.FEATURE_LOSS``) name
an entry of it.

A registered object is called with the config and returns the loss module (a builder function
``cfg -> nn.Module``, as for kd_det's own losses, or a class taking the config). The module is
called as ``loss(student, teacher, weight_map=None, per_image=False)`` on ``(N, C, H, W)`` maps of
equal shape and returns a float32 scalar, or ``(N,)`` per-image values with ``per_image``.
Register your own with ``@FEATURE_LOSS_REGISTRY.register()`` and import it before the model is
built. See docs/distill_your_detector.md, "Your own feature loss", for an example.
"""

from detectron2.utils.registry import Registry
from torch import nn

__all__ = ["FEATURE_LOSS_REGISTRY", "feature_loss_from_config"]

FEATURE_LOSS_REGISTRY = Registry("KD_FEATURE_LOSS")
FEATURE_LOSS_REGISTRY.__doc__ = """
Registry of feature-hint losses between student and teacher feature maps. The registered object is
called with the config and must return the loss module (see :mod:`kd_det.modeling.losses.registry`).
"""


def _lookup(name: str):
    if name in FEATURE_LOSS_REGISTRY:
        return FEATURE_LOSS_REGISTRY.get(name)
    # YAML files written for earlier kd_det versions may spell the built-ins in capitals ("SSIM").
    matches = [key for key, _ in FEATURE_LOSS_REGISTRY if key.lower() == name.lower()]
    if len(matches) == 1:
        return FEATURE_LOSS_REGISTRY.get(matches[0])
    registered = ", ".join(repr(key) for key in sorted(key for key, _ in FEATURE_LOSS_REGISTRY))
    raise ValueError(
        f"Unknown feature loss {name!r}; registered feature losses: {registered}. Register your "
        "own with @FEATURE_LOSS_REGISTRY.register() (kd_det.modeling.losses) and import its "
        "module before building the model."
    )


def feature_loss_from_config(cfg, name: str) -> nn.Module:
    """Build the registered feature loss ``name`` from ``cfg``.

    Shared by offline distillation (``name = MODEL.KD.FEATURE.LOSS``) and online distillation
    (``name = MODEL.ONLINE_KD.FEATURE_LOSS``); both read the loss settings from ``MODEL.KD.*``
    (``SSIM.*``, ``FEATURE.RANGE_POLICY``, ``FEATURE.CWD_TAU``).

    Args:
        cfg (CfgNode): the full config.
        name (str): a registered name; matched exactly, else case-insensitively.

    Returns:
        nn.Module: the loss.

    Raises:
        ValueError: ``name`` is not registered; the message lists the registered names.
    """
    loss = _lookup(name)(cfg)
    if not callable(loss):
        raise TypeError(f"Feature loss {name!r} built a {type(loss).__name__}, not a callable.")
    return loss
