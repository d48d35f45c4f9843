"""CrossKD (Wang et al., CVPR 2024): the student's head features run through the teacher's head.

A dense head is a tower of conv blocks per task (``cls_subnet``, ``bbox_subnet``: conv, optional
norm, activation) and a predictor (``cls_score``, ``bbox_pred``). CrossKD takes the student's
tower features after its first blocks, feeds them to the teacher's last ``m`` blocks and the
teacher's predictor (frozen, but differentiable with respect to its input), and distills the
teacher's own predictions into these *cross-head* predictions. The student's predictor and last
blocks learn from the ground truth alone, so teacher and ground truth never pull the same
outputs in different directions; the knowledge reaches the student's earlier layers through the
teacher's head.

Here ``m`` is ``MODEL.KD.CROSSKD.TEACHER_CONVS``: 1 (the default; CrossKD's RetinaNet setting,
student blocks 1-3 of 4 and the teacher's 4th) passes the student's features after
``NUM_CONVS - 1`` blocks through the teacher's last block; 0 through the teacher's predictor
only. The student's tower outputs are recorded with forward hooks
(:func:`~kd_det.modeling.capture.record_each_output`), the student's own forward is untouched.
"""

from torch import nn

from .capture import record_each_output

__all__ = ["CrossHead", "tower_blocks"]


def tower_blocks(subnet):
    """Start indices of the conv blocks of a dense-head tower (an ``nn.Sequential``)."""
    return [i for i, m in enumerate(subnet) if isinstance(m, nn.Conv2d)]


class CrossHead:
    """The cross-head path of one student/teacher pair of RetinaNet-style heads.

    Args:
        s_head, t_head (nn.Module): heads with ``cls_subnet``/``bbox_subnet`` towers and
            ``cls_score``/``bbox_pred`` predictors (detectron2's ``RetinaNetHead``).
        teacher_convs (int): ``m``, the teacher's tower blocks the student's features pass.

    Raises:
        ValueError: a head of another shape, or ``m`` larger than a tower.
    """

    TOWERS = (("cls", "cls_subnet", "cls_score"), ("box", "bbox_subnet", "bbox_pred"))

    def __init__(self, s_head, t_head, teacher_convs):
        for who, head in (("student", s_head), ("teacher", t_head)):
            if not all(
                isinstance(getattr(head, a, None), nn.Module)
                for _, tower, pred in self.TOWERS
                for a in (tower, pred)
            ) or not all(isinstance(getattr(head, t), nn.Sequential) for _, t, _ in self.TOWERS):
                raise ValueError(
                    "CrossKD (MODEL.KD.CROSSKD.*) needs RetinaNet-style heads (cls_subnet/"
                    f"bbox_subnet towers, cls_score/bbox_pred); the {who}'s head is a "
                    f"{type(head).__name__}. Set MODEL.KD.CROSSKD.CLS_WEIGHT and BOX_WEIGHT to 0."
                )
        m = int(teacher_convs)
        self.taps, self.tails, self.channels = {}, {}, {}
        for key, tower, pred in self.TOWERS:
            s_sub, t_sub = getattr(s_head, tower), getattr(t_head, tower)
            s_blocks, t_blocks = tower_blocks(s_sub), tower_blocks(t_sub)
            if m > min(len(s_blocks), len(t_blocks)):
                raise ValueError(
                    f"MODEL.KD.CROSSKD.TEACHER_CONVS = {m}, but the student's {tower} has "
                    f"{len(s_blocks)} conv blocks and the teacher's {len(t_blocks)}: it can be "
                    f"at most {min(len(s_blocks), len(t_blocks))}."
                )
            k = len(s_blocks) - m  # student blocks before the hand-over
            # The student's tower output after block k: the last module before its block k + 1
            # (the whole tower when k is all of it); k = 0 reads the FPN features themselves.
            self.taps[key] = None if k == 0 else s_sub[(s_blocks + [len(s_sub)])[k] - 1]
            start = t_blocks[len(t_blocks) - m] if m else len(t_sub)
            self.tails[key] = list(t_sub)[start:]
            # (student channels at the hand-over, teacher channels expected there)
            self.channels[key] = (
                (
                    s_sub[s_blocks[k]].in_channels
                    if k < len(s_blocks)
                    else getattr(s_head, pred).in_channels
                ),
                t_sub[start].in_channels if m else getattr(t_head, pred).in_channels,
            )
        for tap in self.taps.values():
            if tap is not None:
                record_each_output(tap)

    def student_features(self, features, pop):
        """``{"cls": [per level], "box": [per level]}``: the student's recorded tower outputs.

        Args:
            features (list[Tensor]): the student's head inputs (used where ``k = 0``).
            pop (callable): pops a tap's recorded outputs (``pop_recorded_each``).
        """
        return {key: list(features) if tap is None else pop(tap) for key, tap in self.taps.items()}

    def release(self, pop):
        for tap in self.taps.values():
            if tap is not None:
                pop(tap)

    def __call__(self, t_head, features, adapters):
        """The teacher's predictions on the student's tower features.

        Args:
            t_head (nn.Module): the (frozen) teacher head.
            features (dict): :meth:`student_features`.
            adapters (dict[str, nn.Module or None]): per tower, student-to-teacher channels.

        Returns:
            tuple(list[Tensor], list[Tensor]): class logits and box deltas per level, shaped as
            the teacher's head outputs.
        """
        out = {}
        for key, _, pred in self.TOWERS:
            maps = []
            for x in features[key]:
                x = x.float()
                if adapters.get(key) is not None:
                    x = adapters[key](x)
                for layer in self.tails[key]:
                    x = layer(x)
                maps.append(getattr(t_head, pred)(x))
            out[key] = maps
        return out["cls"], out["box"]
