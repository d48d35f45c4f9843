"""The hint-weighting registry: ``MODEL.KD.HINT_WEIGHTING`` names an entry of it.

``fixed`` keeps every term's configured weight (no module); ``dynamic`` (:mod:`.dynamic`) is
HKD's meta-weight network. Register your own with ``@HINT_WEIGHTING_REGISTRY.register()`` and
import its module before the model is built, as for any detectron2 registry.
"""

from detectron2.utils.registry import Registry

__all__ = ["HINT_WEIGHTINGS", "HINT_WEIGHTING_REGISTRY", "build_hint_weighting"]

HINT_WEIGHTING_REGISTRY = Registry("KD_HINT_WEIGHTING")
HINT_WEIGHTING_REGISTRY.__doc__ = """
Registry of hint weightings, named by ``MODEL.KD.HINT_WEIGHTING``. An entry is called as
``entry(hint_names, **options)`` (``options``: the ``MODEL.KD.HINT.*`` settings, see
``DistillationRCNN.from_config``) and returns None (the configured fixed weights) or a module
``m(terms, hint_inputs, detection_loss, iteration) -> (weights, loss)`` like :class:`HintWeighting`:
``weights[name]`` multiplies each image's value of term ``name``, ``loss`` is added as
``loss_hint_meta``. The module is registered as ``kd_hint_weights`` (checkpointed, not exported).
"""
#: The built-in weightings (more can be registered in :data:`HINT_WEIGHTING_REGISTRY`).
HINT_WEIGHTINGS = ("fixed", "dynamic")


@HINT_WEIGHTING_REGISTRY.register()
def fixed(hint_names, **options):
    """Every term keeps its configured weight: no weighting module."""
    return None


def build_hint_weighting(name, hint_names, options):
    """The registered hint weighting ``name`` for the terms ``hint_names`` (None: fixed weights).

    Raises:
        ValueError: ``name`` is not registered; the message lists the registered names.
    """
    if name not in HINT_WEIGHTING_REGISTRY:
        names = " | ".join(repr(k) for k, _ in HINT_WEIGHTING_REGISTRY)
        raise ValueError(
            f"MODEL.KD.HINT_WEIGHTING={name!r} is not one of {names}. Register your own with "
            "@HINT_WEIGHTING_REGISTRY.register() (kd_det.modeling.hint_weighting)."
        )
    return HINT_WEIGHTING_REGISTRY.get(name)(hint_names, **(options or {}))
