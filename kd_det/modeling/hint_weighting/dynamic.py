"""Hint-dynamic weighting (HKD), kd_det's interpretation: per-image hint weights from a meta-net.

* **Hints**: the K enabled distillation terms of ``DistillationRCNN``, each computed per image;
  weight ``w[i, k]`` multiplies image i's value of hint k.
* **State** (:meth:`HintWeighting.state`): per image and hint, the standardized log discrepancy,
  validity, the hint's running level and gradient agreement, the detection loss, the progress.
* **Meta-net** (:class:`HintWeightNet`): state -> logits -> weights with mean 1 per image and a
  floor (:func:`normalize_weights`); it starts as fixed weighting.
* **Objective**: agreement of the weighted hint gradients with the task gradient
  (:mod:`.agreement`), trained by ``loss_hint_meta`` only.
* **Ensemble over history**: the used weights mix the estimate with an EMA of past means.

Every choice and why: docs/hint_weighting.md.
"""

import logging
from typing import Dict, List, Sequence

import torch
from detectron2.utils.events import get_event_storage
from torch import nn

from kd_det.config.validation import check_values

from .agreement import HintInput, agreement_cosine, gradient_agreement, hint_cosines
from .registry import HINT_WEIGHTING_REGISTRY

logger = logging.getLogger(__name__)

__all__ = ["META_OBJECTIVES", "HintWeightNet", "HintWeighting"]

META_OBJECTIVES = ("grad_cosine",)
#: Momentum of the running statistics that normalise the meta-net's input (faster than the weight
#: ensemble: the input must follow the student, the ensemble must average over many estimates).
INPUT_MOMENTUM = 0.9
_EPS = 1e-8
#: Floor of the running std of ``log value`` that standardises the discrepancy input: differences
#: below ~5% between images are treated as noise, not amplified.
MIN_LOG_STD = 0.05
# Logits of invalid hints before the softmax: exp underflows to exactly 0 in float32, and a row
# without any valid hint stays finite (unlike -inf, which gives NaN).
_MASKED_LOGIT = -1e4


class HintWeightNet(nn.Module):
    """The meta-weight network: per-image learning state ``(N, 4K + 2)`` -> hint logits ``(N, K)``.

    Deliberately tiny (one hidden layer): its input is a handful of statistics, and its cost must
    stay negligible next to a detector's step.
    """

    def __init__(self, num_hints: int, hidden_dim: int = 32):
        """
        Args:
            num_hints (int): K, the number of knowledge hints.
            hidden_dim (int): hidden units.
        """
        super().__init__()
        self.num_hints = int(num_hints)
        self.layers = nn.Sequential(
            nn.Linear(self.state_dim(num_hints), hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, num_hints),
        )
        # Zero logits -> uniform weights: training starts exactly as fixed weighting and the
        # meta-net only departs from it as far as its objective asks.
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    @staticmethod
    def state_dim(num_hints: int) -> int:
        """Size of the per-image input (see the module docstring)."""
        return 4 * num_hints + 2

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.layers(state)


def normalize_weights(logits: torch.Tensor, valid: torch.Tensor, min_weight: float) -> torch.Tensor:
    """Positive weights with mean 1 over each row's valid entries and 0 elsewhere.

    Args:
        logits (Tensor): ``(N, K)``.
        valid (Tensor): ``(N, K)`` bool.
        min_weight (float): the floor in ``[0, 1)`` mixed into every valid weight.
    """
    validf = valid.to(logits.dtype)
    p = torch.softmax(logits.masked_fill(~valid, _MASKED_LOGIT), dim=1) * validf
    n = validf.sum(dim=1, keepdim=True)
    return (min_weight + (1.0 - min_weight) * n * p) * validf


def kl_from_uniform(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``KL(uniform || softmax)`` over each row's valid hints, ``(N,)``: 0 at fixed weighting.

    Its gradient w.r.t. the logits is ``softmax - uniform``: a pull back to fixed weighting that
    grows with the departure, scale-free like the cosine it is weighed against.
    """
    validf = valid.to(logits.dtype)
    log_p = torch.log_softmax(logits.masked_fill(~valid, _MASKED_LOGIT), dim=1)
    n = validf.sum(dim=1)
    mean_log_p = (log_p * validf).sum(dim=1) / n.clamp_min(1)
    return torch.where(n > 0, -torch.log(n.clamp_min(1)) - mean_log_p, torch.zeros_like(n))


def renormalize(weights: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Rescale each row's valid weights to mean 1 (rows without valid entries become 0)."""
    validf = valid.to(weights.dtype)
    w = weights * validf
    n = validf.sum(dim=1, keepdim=True)
    return w * n / w.sum(dim=1, keepdim=True).clamp_min(_EPS)


class HintWeighting(nn.Module):
    """Meta-weight network + weight ensemble (module docstring): per-image weights of ``K`` hints.

    Registered in ``DistillationRCNN`` as ``kd_hint_weights``; its parameters are trained only by
    the ``loss_hint_meta`` it returns, its buffers hold the running statistics.
    """

    def __init__(
        self,
        hint_names: Sequence[str],
        *,
        hidden_dim: int = 32,
        objective: str = "grad_cosine",
        meta_loss_weight: float = 1.0,
        meta_period: int = 1,
        min_weight: float = 0.1,
        prior_weight: float = 0.1,
        momentum: float = 0.99,
        ensemble_weight: float = 0.5,
        max_iter: int = 1,
    ):
        """
        Args:
            hint_names (Sequence[str]): loss names of the hints, e.g. ``loss_kd_fpn_p2``.
            hidden_dim (int): hidden units of :class:`HintWeightNet`.
            objective (str): the meta objective; only "grad_cosine".
            meta_loss_weight (float): multiplier of ``loss_hint_meta``.
            meta_period (int): run the meta step every this many iterations.
            min_weight (float): floor of every valid weight, in ``[0, 1)``.
            prior_weight (float): weight of ``KL(uniform || softmax)`` in the meta loss.
            momentum (float): momentum of the per-hint EMA of mean weights, in ``[0, 1)``.
            ensemble_weight (float): share of that EMA in the used weights, in ``[0, 1]``.
            max_iter (int): ``SOLVER.MAX_ITER``, for the training-progress input.
        """
        super().__init__()
        if objective not in META_OBJECTIVES:
            raise ValueError(
                f"MODEL.KD.HINT.OBJECTIVE={objective!r} is not one of {META_OBJECTIVES}."
            )
        check_values({f"MODEL.KD.HINT.{k}": v for k, v in (
            ("MIN_WEIGHT", min_weight), ("MOMENTUM", momentum),
            ("ENSEMBLE_WEIGHT", ensemble_weight), ("META_PERIOD", meta_period),
            ("HIDDEN_DIM", hidden_dim), ("META_LOSS_WEIGHT", meta_loss_weight),
            ("PRIOR_WEIGHT", prior_weight))})  # fmt: skip
        if len(hint_names) == 0:
            raise ValueError("Hint-dynamic weighting needs at least one distillation term.")
        self.hint_names = tuple(hint_names)
        self.objective = objective
        self.meta_loss_weight = float(meta_loss_weight)
        self.meta_period = int(meta_period)
        self.min_weight = float(min_weight)
        self.prior_weight = float(prior_weight)
        self.momentum = float(momentum)
        self.ensemble_weight = float(ensemble_weight)
        self.max_iter = max(int(max_iter), 1)
        k = len(self.hint_names)
        self.net = HintWeightNet(k, hidden_dim)
        # The weight ensemble: EMA of each hint's mean weight, starting at fixed weighting.
        self.register_buffer("ema_weight", torch.ones(k))
        # Input normalisation: running mean and variance of log(value), and running gradient
        # agreement, per hint.
        self.register_buffer("ema_log_value", torch.zeros(k))
        self.register_buffer("ema_log_var", torch.zeros(k))
        self.register_buffer("ema_agreement", torch.zeros(k))
        # Whether ema_log_value has seen hint k yet (its first batch initialises it).
        self.register_buffer("seen", torch.zeros(k, dtype=torch.bool))
        if k == 1:
            logger.warning(
                "MODEL.KD.HINT_WEIGHTING='dynamic' with a single hint: each image's weights "
                "are normalised to mean 1 across hints, so the weight stays 1."
            )

    @property
    def short_names(self) -> List[str]:
        """Hint names for logging: ``loss_kd_fpn_p2`` -> ``fpn_p2``."""
        return [n[len("loss_kd_") :] if n.startswith("loss_kd_") else n for n in self.hint_names]

    def extra_repr(self) -> str:
        return (
            f"hints={self.short_names}, objective={self.objective}, min_weight={self.min_weight}, "
            f"momentum={self.momentum}, ensemble_weight={self.ensemble_weight}, "
            f"meta_period={self.meta_period}"
        )

    # ------------------------------------------------------------------------------------------
    def stack(self, terms: Dict[str, tuple]):
        """``(values (N, K) detached float32, valid (N, K) bool)`` in hint order; a hint missing
        from ``terms`` counts as invalid for every image."""
        ref = next(iter(terms.values()))[0]
        n = ref.shape[0]
        values = ref.new_zeros((n, len(self.hint_names)), dtype=torch.float32)
        valid = torch.zeros((n, len(self.hint_names)), dtype=torch.bool, device=ref.device)
        for k, name in enumerate(self.hint_names):
            if name in terms:
                v, ok, _ = terms[name]
                values[:, k] = v.detach().float()
                valid[:, k] = ok
        return values, valid

    def state(self, values, valid, detection_loss, progress):
        """The meta-net's per-image input (module docstring), from detached quantities."""
        n, k = values.shape
        validf = valid.float()
        log_v = torch.log(values.clamp_min(0) + _EPS)
        std = self.ema_log_var.sqrt().clamp_min(MIN_LOG_STD)
        z = ((log_v - self.ema_log_value) / std * validf).clamp(-5.0, 5.0)
        level = self.ema_log_value.expand(n, k)
        agree = torch.tanh(self.ema_agreement).expand(n, k)
        det = torch.log(detection_loss.detach().float().clamp_min(0) + _EPS).reshape(1, 1)
        prog = torch.tensor([[float(progress)]], device=values.device)
        return torch.cat([z, validf, level, agree, det.expand(n, 1), prog.expand(n, 1)], dim=1)

    @torch.no_grad()
    def _update_input_stats(self, values, valid):
        validf = valid.float()
        count = validf.sum(dim=0)
        present = count > 0  # hints absent from this batch keep their statistics (torch.where)
        log_v = torch.log(values.clamp_min(0) + _EPS)
        mean = (log_v * validf).sum(dim=0) / count.clamp_min(1)
        blended = INPUT_MOMENTUM * self.ema_log_value + (1 - INPUT_MOMENTUM) * mean
        new_mean = torch.where(self.seen, blended, mean)
        var = ((log_v - new_mean) ** 2 * validf).sum(dim=0) / count.clamp_min(1)
        blended = INPUT_MOMENTUM * self.ema_log_var + (1 - INPUT_MOMENTUM) * var
        new_var = torch.where(self.seen, blended, var)
        self.ema_log_value.copy_(torch.where(present, new_mean, self.ema_log_value))
        self.ema_log_var.copy_(torch.where(present, new_var, self.ema_log_var))
        self.seen |= present

    def forward(
        self,
        terms: Dict[str, tuple],
        hint_inputs: Dict[str, List[HintInput]],
        detection_loss: torch.Tensor,
        iteration: int,
    ):
        """Weights for this batch and the meta loss.

        Args:
            terms: ``name -> (values (N,), valid (N,), weight)``, from ``distillation_terms``.
            hint_inputs: ``name -> [(student tensor, alias, counts), ...]`` (module docstring).
            detection_loss (Tensor): the student's summed detection losses (attached).
            iteration (int): the current iteration (progress input and meta period).

        Returns:
            tuple[dict[str, Tensor], Tensor]: detached per-image weights ``(N,)`` per hint (0 where
            invalid), and ``loss_hint_meta`` (an attached zero when no meta step runs).
        """
        with torch.autocast(device_type=detection_loss.device.type, enabled=False):
            return self._forward(terms, hint_inputs, detection_loss, iteration)

    def _forward(self, terms, hint_inputs, detection_loss, iteration):
        values, valid = self.stack(terms)
        n = values.shape[0]
        # Running statistics and the meta step only where a real training step follows; a
        # loss-only pass under no_grad (e.g. a validation-loss hook) must not change the state.
        learning = self.training and torch.is_grad_enabled()
        if learning:
            self._update_input_stats(values, valid)
        progress = min(max(iteration / self.max_iter, 0.0), 1.0)
        state = self.state(values, valid, detection_loss, progress)
        logits = self.net(state)
        weights = normalize_weights(logits, valid, self.min_weight)

        meta_loss = weights.sum() * 0.0
        agreement = None
        if learning and iteration % self.meta_period == 0:
            dot, g2, d2 = gradient_agreement(terms, hint_inputs, detection_loss, self.hint_names, n)
            cos, defined = agreement_cosine(weights, dot, g2, d2)
            # The mean over the images where the cosine is defined, as a masked mean: selecting
            # them (or testing ``defined.any()``) would wait for the GPU every step.
            prior = self.prior_weight * kl_from_uniform(logits, valid)
            per_image = torch.where(defined, 1.0 - cos + prior, torch.zeros_like(cos))
            meta_loss = meta_loss + self.meta_loss_weight * per_image.sum() / defined.sum().clamp(
                min=1
            )
            # Per-hint cosines, for logging and the agreement input.
            per_hint, per_hint_def = hint_cosines(dot, g2, d2)
            count = per_hint_def.float().sum(dim=0)
            agreement = (per_hint * per_hint_def).sum(dim=0) / count.clamp_min(1)
            agreement = torch.where(count > 0, agreement, torch.full_like(agreement, float("nan")))
            with torch.no_grad():
                upd = INPUT_MOMENTUM * self.ema_agreement + (1 - INPUT_MOMENTUM) * agreement
                self.ema_agreement.copy_(torch.where(count > 0, upd, self.ema_agreement))

        current = weights.detach()
        used = renormalize(
            (1.0 - self.ensemble_weight) * current + self.ensemble_weight * self.ema_weight,
            valid,
        )
        validf = valid.float()
        count = validf.sum(dim=0)
        if learning:
            with torch.no_grad():
                batch_mean = (current * validf).sum(dim=0) / count.clamp_min(1)
                upd = self.momentum * self.ema_weight + (1 - self.momentum) * batch_mean
                self.ema_weight.copy_(torch.where(count > 0, upd, self.ema_weight))
        self._log(used, validf, count, agreement)
        return {name: used[:, k] for k, name in enumerate(self.hint_names)}, meta_loss

    def _log(self, used, validf, count, agreement):
        try:
            storage = get_event_storage()
        except AssertionError:  # called outside detectron2's training loop (e.g. a notebook)
            return
        mean = (used * validf).sum(dim=0) / count.clamp_min(1)
        var = ((used - mean) ** 2 * validf).sum(dim=0) / count.clamp_min(1)
        if agreement is None:
            agreement = torch.full_like(mean, float("nan"))
        # One device-to-host copy for everything logged (each .tolist() waits for the GPU).
        rows = torch.stack([mean, var.sqrt(), (count > 0).float(), agreement.float()]).tolist()
        stats_mean, stats_std, present, agree = rows
        for k, name in enumerate(self.short_names):
            # A hint with no valid image this batch has no weight to report (not a fake 0/NaN).
            if present[k]:
                storage.put_scalar(f"hint_weight/{name}/mean", stats_mean[k], smoothing_hint=False)
                storage.put_scalar(f"hint_weight/{name}/std", stats_std[k], smoothing_hint=False)
            if agree[k] == agree[k]:  # not NaN
                storage.put_scalar(f"hint_agreement/{name}", agree[k], smoothing_hint=False)


@HINT_WEIGHTING_REGISTRY.register()
def dynamic(hint_names, **options):
    """Per-image weights from the meta-weight network (module docstring)."""
    return HintWeighting(hint_names, **options)
