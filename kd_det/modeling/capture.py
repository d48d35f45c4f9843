"""Reading a detector's intermediate outputs while its own ``forward`` runs.

Distillation needs what a detector computes on the way to its losses: the FPN features, the RPN
head's outputs, the proposals ``StandardROIHeads`` sampled for its box losses and the box
predictions on them. Re-implementing ``GeneralizedRCNN``'s training pass to get them would fork
detectron2 (``vis_period``, precomputed proposals and any upstream change would be lost), so the
detector runs its own ``forward`` and these taps record what it computed:

* :func:`record_output` adds a forward hook that keeps a module's latest output;
* :func:`record_sampled_proposals` makes a ``StandardROIHeads`` (or subclass) keep the proposals
  its ``label_and_sample_proposals`` returned; detectron2 calls it with the same arguments and the
  same random draws as without the tap;
* :func:`record_each_output` keeps every output of a layer called once per FPN level (a dense
  head's tower), :func:`record_return` what a method returned (e.g. ``RetinaNet.label_anchors``).

Records are stored on the module they come from, so a deep copy of a tapped model (e.g. an EMA
copy) records into itself, never into the original. :func:`pop_recorded` reads a record and
releases it, so the autograd graph of a step is not kept alive into the next.
"""

import types

__all__ = [
    "pop_recorded",
    "pop_recorded_each",
    "pop_return",
    "pop_sampled_proposals",
    "record_each_output",
    "record_output",
    "record_return",
    "record_sampled_proposals",
    "score_boxes",
]

_OUTPUT = "_kd_recorded_output"
_SAMPLED = "_kd_sampled_proposals"
_HOOKED = "_kd_records_output"
_EACH = "_kd_recorded_outputs"
_EACH_HOOKED = "_kd_records_each_output"
_RETURN = "_kd_returned_"


def _keep_output(module, _inputs, output):
    module.__dict__[_OUTPUT] = output


def record_output(module):
    """Make ``module`` keep its latest forward output (idempotent)."""
    if not module.__dict__.get(_HOOKED, False):
        module.register_forward_hook(_keep_output)
        module.__dict__[_HOOKED] = True
    return module


def pop_recorded(module, default=None):
    """The output ``module`` recorded since the last pop (``default`` if none or if ``module`` is
    None, e.g. an absent proposal generator), then forget it."""
    if module is None:
        return default
    return module.__dict__.pop(_OUTPUT, default)


def _append_output(module, _inputs, output):
    module.__dict__.setdefault(_EACH, []).append(output)


def record_each_output(module):
    """Make ``module`` keep every forward output since the last pop, in call order (idempotent):
    a dense head runs its layers once per level."""
    if not module.__dict__.get(_EACH_HOOKED, False):
        module.register_forward_hook(_append_output)
        module.__dict__[_EACH_HOOKED] = True
    return module


def pop_recorded_each(module):
    """The outputs ``module`` recorded since the last pop (``[]`` if none), then forget them."""
    return module.__dict__.pop(_EACH, [])


def record_return(module, method):
    """Make ``module`` keep what its method ``method`` returns (rebound on the instance, as
    :func:`record_sampled_proposals`; the class's own method does the work)."""

    def _call_and_keep(self, *args, **kwargs):
        out = getattr(type(self), method)(self, *args, **kwargs)
        self.__dict__[_RETURN + method] = out
        return out

    setattr(module, method, types.MethodType(_call_and_keep, module))
    return module


def pop_return(module, method, default=None):
    """What ``module.<method>`` returned since the last pop (``default`` if nothing), then forget
    it."""
    return module.__dict__.pop(_RETURN + method, default)


def _sample_and_keep(self, proposals, targets):
    sampled = type(self).label_and_sample_proposals(self, proposals, targets)
    self.__dict__[_SAMPLED] = sampled
    return sampled


def record_sampled_proposals(roi_heads):
    """Make ``roi_heads`` keep the proposals it samples for its training losses.

    The method is rebound on the instance (``types.MethodType``), which ``copy.deepcopy`` rebinds
    to the copy. The class's own ``label_and_sample_proposals`` does the work.
    """
    roi_heads.label_and_sample_proposals = types.MethodType(_sample_and_keep, roi_heads)
    return roi_heads


def pop_sampled_proposals(roi_heads):
    """The proposals ``roi_heads`` sampled since the last pop (None if none), then forget them."""
    return roi_heads.__dict__.pop(_SAMPLED, None)


def score_boxes(roi_heads, features, boxes):
    """Class logits and box deltas of ``roi_heads``' box head for ``boxes`` pooled from
    ``features`` (another model's proposals scored by a teacher, peer or EMA copy).

    Args:
        roi_heads (StandardROIHeads): the scoring model's heads.
        features (dict[str, Tensor]): the scoring model's own backbone features.
        boxes (list[Boxes]): one per image.

    Returns:
        tuple(Tensor, Tensor): ``box_predictor``'s ``(scores, deltas)``.
    """
    box_features = roi_heads.box_pooler([features[f] for f in roi_heads.box_in_features], boxes)
    return roi_heads.box_predictor(roi_heads.box_head(box_features))
