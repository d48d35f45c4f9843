"""Range policies: how student and teacher feature maps are mapped into a common range.

FPN maps are signed, unbounded activations, while SSIM was designed for non-negative images with
a known data range. On signed maps raw SSIM has a trap: its luminance term
``(2 mu_s mu_t + C1) / (mu_s^2 + mu_t^2 + C1)`` and its contrast-structure term
``(2 sigma_st + C2) / (sigma_s^2 + sigma_t^2 + C2)`` are *both* negative for a sign-flipped
student, and their product is positive, so ``-teacher`` looks similar to ``teacher``. A range
policy maps both maps into a range where that cannot happen. The ``teacher_*`` policies use
statistics of the detached TEACHER only, so the student cannot move the yardstick it is measured
with; ``minmax`` is the SSIM-KD paper's per-level normalization of each map by its own range.
Why ``teacher_absmax`` is the SSIM default (the other policies fail the flip test on some map
types) is measured in the README, section "SSIM on feature maps".
"""

from typing import Optional, Tuple

import torch

__all__ = [
    "DEFAULT_SSIM_POLICY",
    "POLICY_DATA_RANGE",
    "RANGE_POLICIES",
    "normalize_pair",
]

RANGE_POLICIES = ("teacher_absmax", "teacher_minmax", "minmax", "standardize", "none")
DEFAULT_SSIM_POLICY = "teacher_absmax"
# Data range a policy's output is meant to have; "none" has no natural range.
POLICY_DATA_RANGE = {
    "teacher_absmax": 1.0,
    "teacher_minmax": 1.0,
    "minmax": 1.0,
    "standardize": 6.0,
    "none": None,
}


def _check_policy(policy: str):
    if policy not in RANGE_POLICIES:
        raise ValueError(f"Unknown range policy {policy!r}; expected one of {RANGE_POLICIES}.")


def normalize_pair(
    student: torch.Tensor,
    teacher: torch.Tensor,
    policy: str = DEFAULT_SSIM_POLICY,
    eps: float = 1e-3,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[float]]:
    """Map a student and a teacher map into a common range.

    The ``teacher_*`` and ``standardize`` statistics are per image and per channel (over ``H, W``)
    and come from the detached teacher, so the normalization is a fixed affine map for the
    student: gradients pass through it unchanged in direction and the student cannot shrink its
    loss by moving the range.

    Args:
        student (Tensor): ``(N, C, H, W)`` student map; keeps its graph.
        teacher (Tensor): teacher map of the same shape; detached here.
        policy (str): one of
            ``"teacher_absmax"``: ``(x + M) / 2M`` with ``M = max |teacher|`` per image and
            channel; the teacher lies in ``[0, 1]`` and so does any student with
            ``|student| <= M``, sign flips included.
            ``"teacher_minmax"``: ``(x - min) / (max - min)`` with the teacher's min/max per image
            and channel; the student may fall outside ``[0, 1]``.
            ``"minmax"``: each map by its OWN min/max over the whole level ``(C, H, W)`` of each
            image, so both lie in ``[0, 1]`` (the SSIM-KD paper's per-level normalization). The
            student's range is part of its graph, which makes the loss blind to the student's
            overall scale and offset: it only sees the shape of the map.
            ``"standardize"``: ``(x - mean) / std`` of the teacher (population std).
            ``"none"``: maps returned unchanged (but as float32).
        eps (float): floor of the scale (``M``, ``max - min`` or ``std``) in activation units. A
            dead channel (or level) would otherwise divide by ~0, and the huge normalized values
            make SSIM's curvature (and gradients) explode.

    Returns:
        tuple: ``(student_n, teacher_n, data_range)``, float32 maps and the data range the policy
        is meant to be used with (1 for the min/max policies, 6 ~ +-3 sigma for ``standardize``,
        ``None`` for ``"none"``).
    """
    _check_policy(policy)
    student = student.float()
    teacher = teacher.detach().float()
    if policy == "none":
        return student, teacher, None
    if policy == "minmax":
        return _own_minmax(student, eps), _own_minmax(teacher, eps), POLICY_DATA_RANGE[policy]
    with torch.no_grad():
        if policy == "teacher_absmax":
            half = teacher.abs().amax(dim=(2, 3), keepdim=True).clamp_min(eps)
            shift, scale = -half, 2.0 * half
        elif policy == "teacher_minmax":
            lo = teacher.amin(dim=(2, 3), keepdim=True)
            hi = teacher.amax(dim=(2, 3), keepdim=True)
            shift, scale = lo, (hi - lo).clamp_min(eps)
        else:  # standardize
            var, mean = torch.var_mean(teacher, dim=(2, 3), keepdim=True, correction=0)
            shift, scale = mean, var.sqrt().clamp_min(eps)
        inv = scale.reciprocal()
        teacher_n = (teacher - shift) * inv
    return (student - shift) * inv, teacher_n, POLICY_DATA_RANGE[policy]


def _own_minmax(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``(x - min) / max(max - min, eps)`` with the min/max of each image's whole ``(C, H, W)``."""
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(eps)
