"""ROI-level knowledge terms: class distributions and box deltas on a student's sampled proposals.

The target model (a teacher, another peer, an EMA copy) scores the student's sampled proposals
with its own box head (:func:`kd_det.modeling.capture.score_boxes`); these functions compare the
two per image, so the meta-architecture can reduce over valid images or weight images
(hint-dynamic weighting). Both offline and online distillation call them.
"""

import torch
import torch.nn.functional as F

__all__ = [
    "class_specific",
    "per_image_mean",
    "log_probs",
    "mean_log_probs",
    "roi_box_per_image",
    "roi_kl_per_image",
]


def log_probs(scores, temperature):
    """Log-softmax of class logits at ``temperature``, in float32."""
    return F.log_softmax(scores.float() / temperature, dim=1)


def mean_log_probs(log_probs_list):
    """Log of the mean of several distributions given as log-probabilities (an ensemble)."""
    if len(log_probs_list) == 1:
        return log_probs_list[0]
    stacked = torch.stack(log_probs_list)
    return torch.logsumexp(stacked, dim=0) - torch.log(torch.tensor(float(len(log_probs_list))))


def class_specific(deltas, classes, box_dim=4):
    """Select each proposal's deltas for ``classes`` (class-agnostic regression passes through)."""
    if deltas.shape[1] == box_dim:
        return deltas
    idx = classes[:, None] * box_dim + torch.arange(box_dim, device=deltas.device)
    return deltas.gather(1, idx)


def per_image_mean(values, counts, denominators=None):
    """Per-image means of a per-proposal quantity, without a host synchronization.

    A Python loop over ``values.split(counts)`` launches kernels per image, and building the
    validity from ``counts`` on the host copies it to the device, which waits for the GPU. Here
    the image index is made on the device (one ``full`` per image, no copy) and summed with
    ``index_add_``.

    Args:
        values (Tensor): ``(R,)`` float values of all images' proposals, image after image.
        counts (list[int]): proposals per image (``R = sum(counts)``).
        denominators (Tensor or None): ``(R,)`` per-proposal counts to divide by (e.g. a
            foreground mask); ``None`` counts every proposal.

    Returns:
        tuple(Tensor, Tensor): ``(N,)`` sums divided by the per-image denominator (0 where it is
        0) and ``(N,)`` validity (denominator > 0).
    """
    device = values.device
    index = torch.cat(
        [torch.full((c,), i, dtype=torch.long, device=device) for i, c in enumerate(counts)]
    )
    sums = values.new_zeros(len(counts)).index_add_(0, index, values)
    if denominators is None:
        denominators = torch.ones_like(values)
    den = values.new_zeros(len(counts)).index_add_(0, index, denominators.to(values.dtype))
    return sums / den.clamp(min=1), den > 0


def roi_kl_per_image(s_scores, t_logp, counts, temperature):
    """KL(target || student) of the class distributions at ``temperature``, times T^2 (Hinton et
    al., so gradients keep their scale across temperatures), averaged over each image's proposals.

    Args:
        s_scores (Tensor): ``(R, K + 1)`` student class logits of all images' proposals.
        t_logp (Tensor): ``(R, K + 1)`` target log-probabilities at the same temperature.
        counts (list[int]): proposals per image (``R = sum(counts)``).
        temperature (float): softmax temperature ``T``.

    Returns:
        tuple(Tensor, Tensor): ``(N,)`` values and ``(N,)`` validity (images with proposals).
    """
    T = temperature
    kl = F.kl_div(
        F.log_softmax(s_scores.float() / T, dim=1), t_logp, reduction="none", log_target=True
    ).sum(1) * (T * T)
    return per_image_mean(kl, counts)


def roi_box_per_image(s_scores, s_deltas, t_deltas_list, sampled):
    """Smooth-L1 (beta 0, i.e. L1) between the student's and the (mean) target's deltas of each
    foreground proposal's ground-truth class, averaged per image.

    Args:
        s_scores (Tensor): student class logits (their width gives the number of classes).
        s_deltas (Tensor): student box deltas, class-specific or agnostic.
        t_deltas_list (list[Tensor]): one or more targets' deltas (several are averaged).
        sampled (list[Instances]): the sampled proposals with ``gt_classes``.

    Returns:
        tuple(Tensor, Tensor): ``(N,)`` values and ``(N,)`` validity (images with foreground).
    """
    counts = [len(x) for x in sampled]
    gt_classes = torch.cat([x.gt_classes for x in sampled])
    num_classes = s_scores.shape[1] - 1
    fg = (gt_classes >= 0) & (gt_classes < num_classes)
    cls = gt_classes.clamp(max=num_classes - 1)
    s_d = class_specific(s_deltas.float(), cls)
    if len(t_deltas_list) == 1:
        t_d = class_specific(t_deltas_list[0].float(), cls)
    else:
        t_d = torch.stack([class_specific(t.float(), cls) for t in t_deltas_list]).mean(0)
    box = F.smooth_l1_loss(s_d, t_d, beta=0.0, reduction="none").mean(1) * fg.float()
    return per_image_mean(box, counts, fg)
