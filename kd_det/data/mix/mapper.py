"""Box-aware mixed-sample regularization (MixUp, CutMix, Cut^nMix, Mosaic) in a detectron2 mapper.

:class:`MixedSampleDatasetMapper` is a drop-in replacement for ``DatasetMapper`` in the training
loader. Every sample is mapped exactly as ``DatasetMapper`` maps it; with probability
``INPUT.MIX.PROB`` it is then mixed with *partners* that went through the same pipeline, each
fitted (scaled, then cropped) to cover the main image. Sources are *layers* painted in order, and
every output box is exact for the pixels it shows: clipped to its layer, occluded by later layers,
dropped below ``MIN_VISIBLE`` or ``MIN_BOX_SIZE``. Masks, keypoints and proposals cannot be mixed.
Mix types: :mod:`kd_det.data.mix.strategies`; randomness: :mod:`kd_det.data.mix.partners`.
See docs/mixed_sample.md for the output format, the four mixes, the box rules and the limits.
"""

import logging
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper, get_detection_dataset_dicts
from detectron2.structures import Boxes, Instances

from .geometry import Sample, resolve_boxes, sample_from_output
from .partners import PartnerPool, ProcessGenerator
from .strategies import MIX_STRATEGY_REGISTRY

__all__ = ["BOX_RULES", "MixedSampleDatasetMapper", "check_mix_args"]

BOX_RULES = ("keep", "shrink")

logger = logging.getLogger(__name__)


def check_mix_args(
    mix_type,
    mix_prob,
    mix_alpha,
    num_patches,
    min_visible,
    min_box_size,
    box_rule,
    partner_cache_size=0,
):
    """Raise a ``ValueError`` naming the ``INPUT.MIX`` key of the first invalid value.

    Called before the training set is loaded for partners, so a typo fails at once.
    """
    if mix_type not in MIX_STRATEGY_REGISTRY:
        names = tuple(k for k, _ in MIX_STRATEGY_REGISTRY)
        raise ValueError(
            f"INPUT.MIX.TYPE must be one of {names} (MIX_STRATEGY_REGISTRY), got {mix_type!r}"
        )
    if not 0.0 <= float(mix_prob) <= 1.0:
        raise ValueError(f"INPUT.MIX.PROB must be in [0, 1], got {mix_prob!r}")
    if not float(mix_alpha) > 0.0:
        raise ValueError(f"INPUT.MIX.ALPHA must be > 0, got {mix_alpha!r}")
    if int(num_patches) != num_patches or num_patches < 1:
        raise ValueError(f"INPUT.MIX.NUM_PATCHES must be an integer >= 1, got {num_patches!r}")
    if not 0.0 <= float(min_visible) <= 1.0:
        raise ValueError(f"INPUT.MIX.MIN_VISIBLE must be in [0, 1], got {min_visible!r}")
    if not float(min_box_size) >= 0.0:
        raise ValueError(f"INPUT.MIX.MIN_BOX_SIZE must be >= 0, got {min_box_size!r}")
    if box_rule not in BOX_RULES:
        raise ValueError(f"INPUT.MIX.BOX_RULE must be one of {BOX_RULES}, got {box_rule!r}")
    if int(partner_cache_size) != partner_cache_size or partner_cache_size < 0:
        raise ValueError(
            "INPUT.MIX.PARTNER_CACHE_SIZE (partner_cache_size) must be an integer >= 0, got "
            f"{partner_cache_size!r}"
        )


class MixedSampleDatasetMapper(DatasetMapper):
    """``DatasetMapper`` that mixes training samples with partners (docs/mixed_sample.md)."""

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        augmentations: List[Any],
        image_format: str,
        mix_enabled: bool = False,
        mix_type: str = "cutmix",
        mix_prob: float = 0.5,
        mix_alpha: float = 1.0,
        num_patches: int = 3,
        min_visible: float = 0.3,
        min_box_size: float = 2.0,
        box_rule: str = "keep",
        dataset_dicts: Optional[Sequence[dict]] = None,
        partner_cache_size: int = 0,
        return_mix_info: bool = False,
        **kwargs,
    ):
        """
        Args:
            is_train, augmentations, image_format, kwargs: as for ``DatasetMapper``.
            mix_enabled: ``INPUT.MIX.ENABLED``; False makes this exactly a ``DatasetMapper``.
            mix_type: ``INPUT.MIX.TYPE``, a :data:`MIX_STRATEGY_REGISTRY` name.
            mix_prob: ``INPUT.MIX.PROB``, probability that a sample is mixed.
            mix_alpha: ``INPUT.MIX.ALPHA``, Beta parameter of the MixUp ratio and patch area.
            num_patches: ``INPUT.MIX.NUM_PATCHES``, patches (and partners) of Cut^nMix.
            min_visible: ``INPUT.MIX.MIN_VISIBLE``, boxes less visible than this are dropped.
            min_box_size: ``INPUT.MIX.MIN_BOX_SIZE``, changed boxes smaller than this are dropped.
            box_rule: ``INPUT.MIX.BOX_RULE``, "keep" or "shrink" partly covered boxes.
            dataset_dicts: the training set in detectron2's format, from which partners are drawn
                (required when mixing is enabled in training).
            partner_cache_size: reuse partners from the last this-many mapped samples instead of
                reading new ones (0 = always read; see :mod:`kd_det.data.mix.partners`).
            return_mix_info: add a ``"mix_info"`` entry describing what was done (for tests and
                visualization; off by default so the output format stays standard).
        """
        super().__init__(is_train, augmentations=augmentations, image_format=image_format, **kwargs)
        check_mix_args(
            mix_type,
            mix_prob,
            mix_alpha,
            num_patches,
            min_visible,
            min_box_size,
            box_rule,
            partner_cache_size,
        )

        self.mix_enabled = bool(mix_enabled)
        self.mix_type = mix_type
        self.mix_prob = float(mix_prob)
        self.mix_alpha = float(mix_alpha)
        self.num_patches = int(num_patches)
        self.min_visible = float(min_visible)
        self.min_box_size = float(min_box_size)
        self.box_rule = box_rule
        self.partner_cache_size = int(partner_cache_size)
        self.return_mix_info = bool(return_mix_info)
        # Mixing only ever happens in training; a test-time mapper is a plain DatasetMapper.
        self._active = self.mix_enabled and self.is_train and self.mix_prob > 0

        if self._active:
            unsupported = [
                name
                for name, used in (
                    ("instance masks (MODEL.MASK_ON)", self.use_instance_mask),
                    ("keypoints (MODEL.KEYPOINT_ON)", self.use_keypoint),
                    ("precomputed proposals (MODEL.LOAD_PROPOSALS)", self.proposal_topk),
                )
                if used
            ]
            if unsupported:
                raise NotImplementedError(
                    "MixedSampleDatasetMapper cannot mix " + ", ".join(unsupported) + "; set "
                    "INPUT.MIX.ENABLED False or turn them off."
                )
            if dataset_dicts is None or len(dataset_dicts) == 0:
                raise ValueError(
                    "MixedSampleDatasetMapper needs a non-empty dataset_dicts to draw partners "
                    "from when INPUT.MIX.ENABLED is True"
                )
        self._partners = (
            PartnerPool(dataset_dicts, self.partner_cache_size, self._map_plain)
            if self._active
            else None
        )
        self._rng = ProcessGenerator()
        if self._active:
            logger.info(
                f"[MixedSampleDatasetMapper] {mix_type} with prob {mix_prob}, alpha {mix_alpha}, "
                f"num_patches {num_patches}, min_visible {min_visible}, min_box_size "
                f"{min_box_size}, box_rule {box_rule}, {len(self._partners)} partner candidates, "
                f"partner cache {partner_cache_size}"
            )

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, dataset_dicts=None):
        """Read ``INPUT.MIX``; load the training set for partners unless ``dataset_dicts`` is given.

        The training set is loaded exactly like detectron2's train loader loads it (same names, same
        empty-image filter), so partners come from the same images as main samples.
        """
        ret = super().from_config(cfg, is_train)
        mix = cfg.INPUT.MIX
        mix_args = dict(
            mix_type=mix.TYPE,
            mix_prob=mix.PROB,
            mix_alpha=mix.ALPHA,
            num_patches=mix.NUM_PATCHES,
            min_visible=mix.MIN_VISIBLE,
            min_box_size=mix.MIN_BOX_SIZE,
            box_rule=mix.BOX_RULE,
            partner_cache_size=mix.PARTNER_CACHE_SIZE,
        )
        check_mix_args(**mix_args)  # before the training set is loaded for partners
        active = mix.ENABLED and is_train and mix.PROB > 0
        unsupported = cfg.MODEL.MASK_ON or cfg.MODEL.KEYPOINT_ON or cfg.MODEL.LOAD_PROPOSALS
        if active and dataset_dicts is None and not unsupported:  # else __init__ raises
            dataset_dicts = get_detection_dataset_dicts(
                cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
            )
        ret.update(mix_enabled=mix.ENABLED, dataset_dicts=dataset_dicts, **mix_args)
        return ret

    def _map_plain(self, dataset_dict: dict) -> Dict[str, Any]:
        """``DatasetMapper``'s mapping, for the main sample and for partners alike."""
        return DatasetMapper.__call__(self, dataset_dict)

    def draw_partners(self, n: int, rng: np.random.Generator) -> List[Sample]:
        """``n`` partners mapped by the same pipeline, distinct while the data allows (read, or
        taken from the partner cache)."""
        return self._partners.draw(n, rng)

    def __call__(self, dataset_dict):
        """Map one dataset dict like ``DatasetMapper``, then mix it with probability ``mix_prob``.

        Args:
            dataset_dict (dict): metadata of one image, in detectron2's dataset format.

        Returns:
            dict: ``DatasetMapper``'s output format. With ``return_mix_info`` (and mixing enabled)
            also ``"mix_info"``: ``{"type": None}`` for an unmixed sample, else a dict with

            * ``"type"``; ``"lam"`` (MixUp ratio of the main image) or ``"center"`` (Mosaic);
            * ``"layers"``: in paint order, one dict per source with ``"source"`` ("main",
              "dataset" or "cache"), ``"index"`` (into ``dataset_dicts``), ``"file_name"``,
              ``"region"`` (x0, y0, x1, y1 output pixels), ``"boxes"`` (XYXY in output coordinates
              before clipping to the region), ``"classes"``, ``"pixels"`` (the source's augmented
              and fitted pixels in the region, C x h x w) and ``"area_fraction"`` for patches;
            * ``"instance_layer"``, ``"instance_index"``: for each output box its layer and its
              index in that layer's ``"boxes"``; ``"visible"``: its visible fraction.
        """
        ret = self._map_plain(dataset_dict)
        if not self._active:
            return ret
        rng = self._rng.get()
        main = sample_from_output(ret, "main", None)
        do_mix = rng.random() < self.mix_prob
        if do_mix and "sem_seg" in ret:
            raise NotImplementedError("MixedSampleDatasetMapper cannot mix semantic segmentation")
        if not do_mix:
            self._partners.remember(main, returned=True)
            if self.return_mix_info:
                ret["mix_info"] = {"type": None}
            return ret

        strategy = MIX_STRATEGY_REGISTRY.get(self.mix_type)
        image, layers, occluding, extra = strategy(self, main, rng)
        # Remembered after drawing partners so a sample is never mixed with itself via the cache.
        self._partners.remember(main, returned=False)

        res = resolve_boxes(layers, occluding, self.box_rule, self.min_visible, self.min_box_size)
        ret["image"] = image
        if any(layer.sample.has_instances for layer in layers):
            instances = Instances(tuple(image.shape[-2:]))
            instances.gt_boxes = Boxes(torch.as_tensor(res["boxes"], dtype=torch.float32))
            instances.gt_classes = torch.as_tensor(res["classes"], dtype=torch.int64)
            ret["instances"] = instances
        if self.return_mix_info:
            ret["mix_info"] = {
                "type": self.mix_type,
                **extra,
                "layers": [
                    {
                        "source": layer.sample.source,
                        "index": layer.sample.index,
                        "file_name": layer.sample.file_name,
                        "region": layer.region,
                        "boxes": layer.boxes,
                        "classes": layer.sample.classes,
                        "pixels": layer.pixels,
                        **layer.extra,
                    }
                    for layer in layers
                ],
                "instance_layer": res["layer"],
                "instance_index": res["index"],
                "visible": res["visible"],
            }
        return ret
