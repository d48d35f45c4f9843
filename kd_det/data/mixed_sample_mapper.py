"""Box-aware mixed-sample regularization (MixUp, CutMix, Cut^nMix, Mosaic) in a detectron2 mapper.

:class:`MixedSampleDatasetMapper` is a drop-in replacement for detectron2's ``DatasetMapper`` in the
training loader::

    mapper = MixedSampleDatasetMapper(cfg, is_train=True)
    loader = build_detection_train_loader(cfg, mapper=mapper)

Every sample is first mapped exactly like ``DatasetMapper`` would (read, check size, geometric
augmentation, annotations to ``Instances``). With probability ``INPUT.MIX.PROB`` it is then mixed
with one or more *partner* samples drawn from the training set, which go through the very same
pipeline (same ``self.augmentations``, same reading code) before mixing. The output dict has
``DatasetMapper``'s format: ``"image"`` (CHW tensor of the main image's augmented size and dtype),
``"instances"`` (``gt_boxes``, ``gt_classes``) and the main image's ``"file_name"``, ``"image_id"``,
``"height"``, ``"width"``.

Rules (chosen so that every output box is exact for the pixels it describes):

* **Partner fitting.** A partner whose augmented size differs from the main image's is scaled
  uniformly (aspect ratio kept) to the smallest size that *covers* the target, then cropped to it
  (random crop offset for MixUp/CutMix, the corner facing the mosaic centre for Mosaic). Uniform
  resizing and cropping map axis-aligned boxes to axis-aligned boxes exactly, no pixel is padding,
  and the scale change is small when both images went through the same ``ResizeShortestEdge``.
  The area a partner box had after the resize, before any cropping, is its "original area".
* **MixUp.** ``image = lam * main + (1 - lam) * partner`` with ``lam ~ Beta(ALPHA, ALPHA)``, rounded
  back to the main image's dtype; the boxes of both are kept (partner boxes clipped to the frame by
  the fitting crop follow the visibility rules below).
* **CutMix / Cut^nMix.** A rectangle with area fraction ``r`` (``r ~ Beta(ALPHA, ALPHA)`` for
  CutMix, ``Beta(ALPHA, ALPHA) / NUM_PATCHES`` per patch for Cut^nMix, so the total pasted area
  stays comparable) and a log-uniform aspect (relative to the image's) in ``[1/2, 2]`` (narrowed
  so that it fits) is placed uniformly at random; its pixels are the fitted partner's pixels *at
  the same coordinates*. Cut^nMix pastes ``NUM_PATCHES`` patches in order, each from its own partner
  (distinct partners while the data allows).
* **Mosaic.** A centre is drawn uniformly in the middle half of the frame; the four quadrants it
  defines receive the main image and three partners in random order, each fitted to cover its
  quadrant. The output has the main image's size.
* **Boxes.** Every source (main image, each patch, each quadrant) is a layer with a region (the
  frame, the pasted rectangle, the quadrant) painted in order. A box is clipped to its layer's
  region, and its visible part is that clipped box minus the regions of all *later* layers (so a
  later patch also covers earlier pasted boxes). The visible area is computed exactly (rectangle
  geometry, not pixels). A box is dropped if its visible area is zero or its visible fraction
  (visible area / original area) is below ``MIN_VISIBLE``. Survivors keep their (clipped) box with
  ``BOX_RULE "keep"``, or become the smallest box containing the visible part of the box rectangle
  with ``"shrink"``. The latter is the tight box of the visible object only when the object fills
  its box; it differs from the clipped box only when the covers take a full side of it. A box whose
  coordinates the mix changed (partner boxes, mosaic boxes, shrunk boxes) is also dropped when it
  is narrower or shorter than ``MIN_BOX_SIZE``; untouched boxes of the main image are never
  dropped for size, so mixing does not change which small objects are trained on.

Unsupported: instance masks, keypoints and precomputed proposals cannot be mixed; the mapper raises
``NotImplementedError`` at construction when mixing is enabled together with them (a disabled mapper
still supports everything ``DatasetMapper`` does). A sample with semantic segmentation raises
when it is about to be mixed.

Randomness: augmentations use numpy's global RNG exactly as ``DatasetMapper`` does (detectron2
seeds it per worker in ``worker_init_reset_seed``). Every mixing decision (whether to mix, partner
indices, ratios, rectangles, crop offsets) comes from a ``numpy.random.Generator`` owned by the
mapper. It is created lazily on the first call *inside the process that maps*, from
``SeedSequence([torch.initial_seed(), salt])``, and re-created whenever the process id or
``torch.initial_seed()`` changes. In a DataLoader worker ``torch.initial_seed()`` is the worker's
seed (``base_seed + worker_id``, further reset by detectron2's ``worker_init_reset_seed``), so
workers draw different streams, and a new iterator (new ``base_seed``) draws new ones; ``base_seed``
comes from torch's global RNG, which ``default_setup`` seeds from ``cfg.SEED``, so a fixed
``cfg.SEED`` reproduces the mixing. With ``num_workers=0`` the main process's
``torch.initial_seed()`` is used, so ``torch.manual_seed(s)`` with a new ``s`` reseeds the mixing
too (the same ``s`` again does not restart the stream: build a new mapper for that). The salt keeps
the stream different from numpy's global RNG, which detectron2 seeds with the same integer.

Speed: a fresh partner costs one more read, decode and augmentation, so with fresh partners MixUp
and CutMix run at about half the plain mapper's speed and Cut^nMix/Mosaic (3 partners) at about a
fifth (``tools/benchmark_data.py``). Fitting and mixing themselves are cheap (OpenCV on the CHW
planes). ``partner_cache_size`` (constructor argument, default 0 = off) trades "fresh partners" for
speed: the mapper keeps the last ``partner_cache_size`` plain mapped samples of its process (already
augmented by the same pipeline) and, once the cache is full, draws partners from it instead of
reading new ones. With the usual shuffled sampler the cached samples are a random subset of the
dataset, so partners stay uniform over the data, but each augmented sample then appears about
``1 + PROB * partners_per_mix`` times per epoch (once as main image, the rest as partner), and the
cache holds ``partner_cache_size`` augmented images per worker in memory.
"""

import logging
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from detectron2.config import configurable
from detectron2.data import DatasetMapper, get_detection_dataset_dicts
from detectron2.data import transforms as T
from detectron2.data.common import DatasetFromList
from detectron2.structures import Boxes, Instances

__all__ = [
    "MixedSampleDatasetMapper",
    "MIX_TYPES",
    "BOX_RULES",
    "check_mix_args",
    "visible_geometry",
]

MIX_TYPES = ("mixup", "cutmix", "cutnmix", "mosaic")
BOX_RULES = ("keep", "shrink")

# Mixed into the seed so the mapper's stream differs from numpy's global RNG seeded with the same
# integer by detectron2 (the ASCII of "kdmix").
_RNG_SALT = 0x6B646D6978

# cv2.warpAffine costs about this many times more per output pixel than cv2.resize (measured).
_WARP_VS_RESIZE_COST = 3

logger = logging.getLogger(__name__)


@dataclass
class _Sample:
    """One plainly mapped sample (main image or partner) in ``DatasetMapper``'s output geometry."""

    image: torch.Tensor  # C x H x W, as DatasetMapper returns it
    boxes: np.ndarray  # N x 4 XYXY float64, in this sample's own augmented coordinates
    classes: np.ndarray  # N int64
    has_instances: bool  # whether DatasetMapper produced "instances" for it
    source: str  # "main", "dataset" or "cache"
    index: Optional[int]  # index into the partner list for source "dataset"
    file_name: str


@dataclass
class _Layer:
    """A source painted onto the output: its pixels in ``region`` and its boxes in output coords."""

    sample: _Sample
    region: Tuple[int, int, int, int]  # x0, y0, x1, y1 in output pixels (half-open)
    boxes: np.ndarray  # N x 4, output coordinates, before clipping to the region
    moved: bool  # whether the boxes went through a fitting transform (size rule then applies)
    pixels: Optional[torch.Tensor] = None  # C x h x w pixels painted in region (for mix_info)
    extra: Dict[str, Any] = field(default_factory=dict)


def _sample_from_output(out: Dict[str, Any], source: str, index: Optional[int]) -> _Sample:
    """Turn a ``DatasetMapper`` output dict into a :class:`_Sample`."""
    instances = out.get("instances")
    if instances is not None:
        boxes = instances.gt_boxes.tensor.numpy().astype(np.float64).reshape(-1, 4)
        classes = instances.gt_classes.numpy().astype(np.int64).reshape(-1)
    else:
        boxes = np.zeros((0, 4), dtype=np.float64)
        classes = np.zeros((0,), dtype=np.int64)
    return _Sample(
        image=out["image"],
        boxes=boxes,
        classes=classes,
        has_instances=instances is not None,
        source=source,
        index=index,
        file_name=out.get("file_name", ""),
    )


def _rect_area(boxes: np.ndarray) -> np.ndarray:
    """Areas of XYXY boxes, zero for degenerate ones."""
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def visible_geometry(boxes: np.ndarray, covers: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Exact area and bounding box of ``box minus union(covers)`` for every box.

    The breakpoints of each box and of the covers clipped to it cut the box into a grid of cells,
    each of which is either fully covered or fully visible, so summing visible cells is exact (no
    rasterization) and costs ``O(N * (2M + 1)^2 * M)`` for ``N`` boxes and ``M`` covers.

    Args:
        boxes: N x 4 XYXY boxes (non-degenerate or empty: ``x1 <= x2``, ``y1 <= y2``).
        covers: M x 4 XYXY rectangles.

    Returns:
        (area, bbox): visible area (N,) and the smallest box containing the visible part (N x 4;
        undefined, filled with the box itself, where the area is zero).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    covers = np.asarray(covers, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0 or len(covers) == 0:
        return _rect_area(boxes), boxes.copy()
    lo_x, hi_x = boxes[:, 0:1], boxes[:, 2:3]
    lo_y, hi_y = boxes[:, 1:2], boxes[:, 3:4]
    xs = np.concatenate(
        [lo_x, hi_x, np.clip(covers[None, :, [0, 2]].reshape(1, -1), lo_x, hi_x)], 1
    )
    ys = np.concatenate(
        [lo_y, hi_y, np.clip(covers[None, :, [1, 3]].reshape(1, -1), lo_y, hi_y)], 1
    )
    xs.sort(axis=1)
    ys.sort(axis=1)
    dx, dy = np.diff(xs, axis=1), np.diff(ys, axis=1)  # N x K
    mx, my = (xs[:, :-1] + xs[:, 1:]) / 2, (ys[:, :-1] + ys[:, 1:]) / 2
    in_x = (mx[:, :, None] > covers[None, None, :, 0]) & (mx[:, :, None] < covers[None, None, :, 2])
    in_y = (my[:, :, None] > covers[None, None, :, 1]) & (my[:, :, None] < covers[None, None, :, 3])
    covered = (in_y[:, :, None, :] & in_x[:, None, :, :]).any(-1)  # N x Ky x Kx
    visible = ~covered & (dy[:, :, None] > 0) & (dx[:, None, :] > 0)
    area = (visible * dy[:, :, None] * dx[:, None, :]).sum(axis=(1, 2))
    cols, rows = visible.any(axis=1), visible.any(axis=2)  # N x Kx, N x Ky
    bbox = np.stack(
        [
            np.where(cols, xs[:, :-1], np.inf).min(1),
            np.where(rows, ys[:, :-1], np.inf).min(1),
            np.where(cols, xs[:, 1:], -np.inf).max(1),
            np.where(rows, ys[:, 1:], -np.inf).max(1),
        ],
        axis=1,
    )
    empty = area <= 0
    bbox[empty] = boxes[empty]
    return area, bbox


@dataclass
class _Fit:
    """Cover-resize ``h x w`` to ``nh x nw`` (uniform scale), then crop ``th x tw`` at ``ox, oy``.

    Boxes go through the equivalent detectron2 transforms (:meth:`transform`). Pixels are resized
    with bilinear ``cv2.resize`` per channel plane of the CHW tensor (same half-pixel-centre
    geometry as ``ResizeTransform``, no antialiasing when shrinking, as in common YOLO-style mosaic
    code), and
    only the pasted window is kept: several times cheaper than ``ResizeTransform``'s PIL path, which
    also needs the image transposed to HWC and back. A window much smaller than the resized image
    (a Cut^nMix patch) is sampled directly with ``cv2.warpAffine``, which costs about 3x more per
    pixel than ``cv2.resize`` but touches only the window.
    """

    h: int
    w: int
    nh: int
    nw: int
    ox: int
    oy: int
    th: int
    tw: int

    @classmethod
    def cover(cls, h, w, th, tw, rng=None, anchor=None) -> "_Fit":
        """The fit of an ``h x w`` image onto ``th x tw``.

        Args:
            anchor: None for a random crop offset drawn from ``rng``, else ``(ax, ay)`` in {0, 1}:
                keep the left/top (0) or right/bottom (1) part of the resized image.
        """
        if (h, w) == (th, tw):
            return cls(h, w, h, w, 0, 0, th, tw)
        scale = max(th / h, tw / w)
        nh, nw = max(th, int(round(h * scale))), max(tw, int(round(w * scale)))
        if anchor is None:
            ox, oy = int(rng.integers(0, nw - tw + 1)), int(rng.integers(0, nh - th + 1))
        else:
            ox, oy = anchor[0] * (nw - tw), anchor[1] * (nh - th)
        return cls(h, w, nh, nw, ox, oy, th, tw)

    def transform(self) -> T.TransformList:
        tfms = []
        if (self.nh, self.nw) != (self.h, self.w):
            tfms.append(T.ResizeTransform(self.h, self.w, self.nh, self.nw))
        if (self.ox, self.oy, self.th, self.tw) != (0, 0, self.nh, self.nw):
            tfms.append(T.CropTransform(self.ox, self.oy, self.tw, self.th))
        return T.TransformList(tfms)

    def render(self, image: torch.Tensor, window) -> torch.Tensor:
        """Pixels (C x h x w) of the fitted image in ``window`` (x0, y0, x1, y1, fitted coords)."""
        x0, y0, x1, y1 = window
        gx0, gy0 = x0 + self.ox, y0 + self.oy  # window origin in the resized image
        if (self.nh, self.nw) == (self.h, self.w):
            return image[:, gy0 : gy0 + y1 - y0, gx0 : gx0 + x1 - x0]
        out = torch.empty((image.shape[0], y1 - y0, x1 - x0), dtype=image.dtype)
        if out.numel() == 0:
            return out
        src = image.numpy()
        if out[0].numel() * _WARP_VS_RESIZE_COST < self.nh * self.nw:
            # A small window: sample just its pixels. Same bilinear half-pixel-centre mapping as
            # cv2.resize (output pixel u samples source (u + gx0 + 0.5) * w / nw - 0.5); the
            # interpolation weights are quantized a little differently (at most 1 grey level).
            sx, sy = self.w / self.nw, self.h / self.nh
            m = np.array([[sx, 0, (gx0 + 0.5) * sx - 0.5], [0, sy, (gy0 + 0.5) * sy - 0.5]])
            for c in range(src.shape[0]):
                out[c].numpy()[...] = cv2.warpAffine(
                    src[c],
                    m,
                    (x1 - x0, y1 - y0),
                    flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                    borderMode=cv2.BORDER_REPLICATE,
                )
            return out
        for c in range(src.shape[0]):  # per channel plane: no CHW <-> HWC transposes
            resized = cv2.resize(src[c], (self.nw, self.nh), interpolation=cv2.INTER_LINEAR)
            out[c].numpy()[...] = resized[gy0 : gy0 + y1 - y0, gx0 : gx0 + x1 - x0]
        return out


def _blend(a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """``lam * a + (1 - lam) * b`` in ``a``'s dtype (rounded and saturated for uint8)."""
    if a.dtype == torch.uint8 and b.dtype == torch.uint8:
        # cv2 is several times faster than float math in numpy/torch and rounds to nearest.
        a2 = np.ascontiguousarray(a.numpy()).reshape(-1, a.shape[-1])
        b2 = np.ascontiguousarray(b.numpy()).reshape(-1, b.shape[-1])
        return torch.from_numpy(cv2.addWeighted(a2, lam, b2, 1.0 - lam, 0.0).reshape(a.shape))
    out = a.double() * lam + b.double() * (1.0 - lam)
    if not a.dtype.is_floating_point:
        out = out.round()
    return out.to(a.dtype)


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
    if mix_type not in MIX_TYPES:
        raise ValueError(f"INPUT.MIX.TYPE must be one of {MIX_TYPES}, got {mix_type!r}")
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
    """``DatasetMapper`` that mixes training samples with partners (see the module docstring)."""

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
            mix_type: ``INPUT.MIX.TYPE``, one of :data:`MIX_TYPES`.
            mix_prob: ``INPUT.MIX.PROB``, probability that a sample is mixed.
            mix_alpha: ``INPUT.MIX.ALPHA``, Beta parameter of the MixUp ratio and patch area.
            num_patches: ``INPUT.MIX.NUM_PATCHES``, patches (and partners) of Cut^nMix.
            min_visible: ``INPUT.MIX.MIN_VISIBLE``, boxes less visible than this are dropped.
            min_box_size: ``INPUT.MIX.MIN_BOX_SIZE``, changed boxes smaller than this are dropped.
            box_rule: ``INPUT.MIX.BOX_RULE``, "keep" or "shrink" partly covered boxes.
            dataset_dicts: the training set in detectron2's format, from which partners are drawn
                (required when mixing is enabled in training). Stored serialized, like detectron2's
                ``DatasetFromList``, so that worker processes share it cheaply.
            partner_cache_size: reuse partners from the last this-many mapped samples instead of
                reading new ones (0 = always read; see the module docstring).
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
            DatasetFromList(list(dataset_dicts), copy=True, serialize=True)
            if self._active
            else None
        )
        self._cache: deque = deque(maxlen=max(self.partner_cache_size, 1))
        self._cache_owner: Optional[int] = None
        self._rng: Optional[np.random.Generator] = None
        self._rng_key: Optional[Tuple[int, int]] = None
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
        cache_size = mix.get("PARTNER_CACHE_SIZE", 0)  # not a config key (yet)
        check_mix_args(
            mix.TYPE,
            mix.PROB,
            mix.ALPHA,
            mix.NUM_PATCHES,
            mix.MIN_VISIBLE,
            mix.MIN_BOX_SIZE,
            mix.BOX_RULE,
            cache_size,
        )
        active = mix.ENABLED and is_train and mix.PROB > 0
        unsupported = cfg.MODEL.MASK_ON or cfg.MODEL.KEYPOINT_ON or cfg.MODEL.LOAD_PROPOSALS
        if active and dataset_dicts is None and not unsupported:  # else __init__ raises
            dataset_dicts = get_detection_dataset_dicts(
                cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
            )
        ret.update(
            mix_enabled=mix.ENABLED,
            mix_type=mix.TYPE,
            mix_prob=mix.PROB,
            mix_alpha=mix.ALPHA,
            num_patches=mix.NUM_PATCHES,
            min_visible=mix.MIN_VISIBLE,
            min_box_size=mix.MIN_BOX_SIZE,
            box_rule=mix.BOX_RULE,
            dataset_dicts=dataset_dicts,
            partner_cache_size=cache_size,
        )
        return ret

    # ---------------------------------------------------------------------------------------------
    # Randomness and partners
    # ---------------------------------------------------------------------------------------------
    def _generator(self) -> np.random.Generator:
        """The mapper's Generator for the current process and torch seed (see module docstring)."""
        key = (os.getpid(), torch.initial_seed())
        if self._rng is None or self._rng_key != key:
            self._rng = np.random.Generator(
                np.random.PCG64(np.random.SeedSequence([key[1], _RNG_SALT]))
            )
            self._rng_key = key
        return self._rng

    def _map_plain(self, dataset_dict: dict) -> Dict[str, Any]:
        """``DatasetMapper``'s mapping, for the main sample and for partners alike."""
        return DatasetMapper.__call__(self, dataset_dict)

    def _remember(self, sample: _Sample, returned: bool) -> None:
        """Put a plainly mapped sample into this process's partner cache.

        Args:
            returned: whether ``sample.image`` itself is handed out (the sample was not mixed).
                It is then copied: the returned tensor travels through shared memory and could be
                modified in place downstream. A mixed sample's own image is never handed out.
        """
        if self.partner_cache_size == 0:
            return
        if self._cache_owner != os.getpid():  # a forked worker must not reuse its parent's cache
            self._cache = deque(maxlen=self.partner_cache_size)
            self._cache_owner = os.getpid()
        self._cache.append(
            _Sample(
                sample.image.clone() if returned else sample.image,
                sample.boxes,
                sample.classes,
                sample.has_instances,
                "cache",
                None,
                sample.file_name,
            )
        )

    def _draw_partners(self, n: int, rng: np.random.Generator) -> List[_Sample]:
        """``n`` partners, distinct while the data allows, read or taken from the cache."""
        if (
            self.partner_cache_size > 0
            and self._cache_owner == os.getpid()
            and len(self._cache) == self.partner_cache_size
        ):
            picks = rng.choice(len(self._cache), size=n, replace=n > len(self._cache))
            return [self._cache[int(i)] for i in picks]
        total = len(self._partners)
        picks = rng.choice(total, size=n, replace=n > total)
        return [
            _sample_from_output(self._map_plain(self._partners[int(i)]), "dataset", int(i))
            for i in picks
        ]

    # ---------------------------------------------------------------------------------------------
    # Geometry
    # ---------------------------------------------------------------------------------------------
    @staticmethod
    def _random_rect(rng: np.random.Generator, h: int, w: int, area_frac: float):
        """A rectangle of about ``area_frac`` of an ``h x w`` frame at a uniform random position."""
        r = float(np.clip(area_frac, 0.0, 1.0))
        if r <= 0.0 or h == 0 or w == 0:
            return (0, 0, 0, 0)
        lo, hi = np.log(max(r, 0.5)), np.log(min(1.0 / r, 2.0))
        aspect = float(np.exp(rng.uniform(lo, hi))) if hi > lo else 1.0
        rw = int(np.clip(round(w * np.sqrt(r * aspect)), 0, w))
        rh = int(np.clip(round(h * np.sqrt(r / aspect)), 0, h))
        x0, y0 = int(rng.integers(0, w - rw + 1)), int(rng.integers(0, h - rh + 1))
        return (x0, y0, x0 + rw, y0 + rh)

    def _resolve_boxes(self, layers: List[_Layer], occluding: bool):
        """Apply the clipping / visibility / size rules to the boxes of all layers.

        Returns:
            boxes (K x 4), classes (K,), layer index (K,), index within the layer (K,), visible
            fraction (K,) of the kept boxes.
        """
        out = {k: [] for k in ("boxes", "classes", "layer", "index", "visible")}
        for i, layer in enumerate(layers):
            b = layer.boxes
            if len(b) == 0:
                continue
            rx0, ry0, rx1, ry1 = layer.region
            area0 = _rect_area(b)
            clipped = np.stack(
                [
                    np.clip(b[:, 0], rx0, rx1),
                    np.clip(b[:, 1], ry0, ry1),
                    np.clip(b[:, 2], rx0, rx1),
                    np.clip(b[:, 3], ry0, ry1),
                ],
                axis=1,
            )
            clipped[:, 2] = np.maximum(clipped[:, 2], clipped[:, 0])
            clipped[:, 3] = np.maximum(clipped[:, 3], clipped[:, 1])
            covers = [
                later.region
                for later in layers[i + 1 :]
                if occluding
                and later.region[2] > later.region[0]
                and later.region[3] > later.region[1]
            ]
            area, vis_box = visible_geometry(clipped, np.array(covers, dtype=np.float64))
            frac = np.where(area0 > 0, area / np.maximum(area0, 1e-12), 0.0)
            final = vis_box if self.box_rule == "shrink" else clipped
            changed = layer.moved | np.any(final != b, axis=1)
            big = (final[:, 2] - final[:, 0] >= self.min_box_size) & (
                final[:, 3] - final[:, 1] >= self.min_box_size
            )
            keep = (area > 0) & (frac >= self.min_visible) & (~changed | big)
            idx = np.nonzero(keep)[0]
            out["boxes"].append(final[idx])
            out["classes"].append(layer.sample.classes[idx])
            out["layer"].append(np.full(len(idx), i, dtype=np.int64))
            out["index"].append(idx)
            out["visible"].append(frac[idx])
        empty = {
            "boxes": np.zeros((0, 4)),
            "classes": np.zeros((0,), np.int64),
            "layer": np.zeros((0,), np.int64),
            "index": np.zeros((0,), np.int64),
            "visible": np.zeros((0,)),
        }
        return {k: np.concatenate(v) if v else empty[k] for k, v in out.items()}

    # ---------------------------------------------------------------------------------------------
    # Mix types: each returns (image, layers, occluding, extra info)
    # ---------------------------------------------------------------------------------------------
    def _main_layer(self, main: _Sample) -> _Layer:
        h, w = main.image.shape[-2:]
        return _Layer(main, (0, 0, w, h), main.boxes, moved=False, pixels=main.image)

    def _fit_layer(self, sample, h, w, region, rng, anchor=None, fit_hw=None):
        """Fit ``sample`` onto the output and return its layer for ``region``.

        ``fit_hw`` is the size the sample is fitted to (default: the whole ``h x w`` frame, with the
        region's pixels taken at the same coordinates); Mosaic fits to the quadrant instead.
        """
        x0, y0, x1, y1 = region
        sh, sw = sample.image.shape[-2:]
        if fit_hw is None:
            fit = _Fit.cover(sh, sw, h, w, rng, anchor)
            window, offset = region, (0, 0)
        else:
            fit = _Fit.cover(sh, sw, fit_hw[0], fit_hw[1], rng, anchor)
            window, offset = (0, 0, x1 - x0, y1 - y0), (x0, y0)
        pixels = fit.render(sample.image, window)
        boxes = fit.transform().apply_box(sample.boxes) if len(sample.boxes) else sample.boxes
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) + np.array(offset * 2)
        return _Layer(sample, region, boxes, moved=True, pixels=pixels)

    def _mixup(self, main, rng):
        h, w = main.image.shape[-2:]
        (partner,) = self._draw_partners(1, rng)
        lam = float(rng.beta(self.mix_alpha, self.mix_alpha))
        layer = self._fit_layer(partner, h, w, (0, 0, w, h), rng)
        image = _blend(main.image, layer.pixels, lam)
        return image, [self._main_layer(main), layer], False, {"lam": lam}

    def _cutmix(self, main, rng, num_patches):
        h, w = main.image.shape[-2:]
        partners = self._draw_partners(num_patches, rng)
        # The main image may be pasted into in place unless someone else still needs its pixels.
        keep_main = self.partner_cache_size > 0 or self.return_mix_info
        image = main.image.clone() if keep_main else main.image
        layers = [self._main_layer(main)]
        for partner in partners:
            frac = float(rng.beta(self.mix_alpha, self.mix_alpha)) / num_patches
            x0, y0, x1, y1 = region = self._random_rect(rng, h, w, frac)
            layer = self._fit_layer(partner, h, w, region, rng)
            image[:, y0:y1, x0:x1] = layer.pixels
            layer.extra["area_fraction"] = frac
            layers.append(layer)
        return image, layers, True, {}

    def _mosaic(self, main, rng):
        h, w = main.image.shape[-2:]
        partners = self._draw_partners(3, rng)
        cx = int(rng.integers(w // 4, w - w // 4 + 1))
        cy = int(rng.integers(h // 4, h - h // 4 + 1))
        # Quadrant regions and which corner of the fitted image faces the centre.
        quadrants = [
            ((0, 0, cx, cy), (1, 1)),
            ((cx, 0, w, cy), (0, 1)),
            ((0, cy, cx, h), (1, 0)),
            ((cx, cy, w, h), (0, 0)),
        ]
        sources = [main] + partners
        order = rng.permutation(4)
        image = torch.empty_like(main.image)  # the quadrants tile the frame
        layers = []
        for q, (region, anchor) in enumerate(quadrants):
            x0, y0, x1, y1 = region
            sample = sources[int(order[q])]
            if x1 <= x0 or y1 <= y0:  # a degenerate quadrant of a tiny image shows nothing
                layer = _Layer(sample, region, sample.boxes[:0], moved=True, pixels=None)
            else:
                layer = self._fit_layer(sample, h, w, region, rng, anchor, (y1 - y0, x1 - x0))
                image[:, y0:y1, x0:x1] = layer.pixels
            layers.append(layer)
        return image, layers, False, {"center": (cx, cy)}

    # ---------------------------------------------------------------------------------------------
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
        rng = self._generator()
        main = _sample_from_output(ret, "main", None)
        do_mix = rng.random() < self.mix_prob
        if do_mix and "sem_seg" in ret:
            raise NotImplementedError("MixedSampleDatasetMapper cannot mix semantic segmentation")
        if not do_mix:
            self._remember(main, returned=True)
            if self.return_mix_info:
                ret["mix_info"] = {"type": None}
            return ret

        if self.mix_type == "mixup":
            image, layers, occluding, extra = self._mixup(main, rng)
        elif self.mix_type == "cutmix":
            image, layers, occluding, extra = self._cutmix(main, rng, 1)
        elif self.mix_type == "cutnmix":
            image, layers, occluding, extra = self._cutmix(main, rng, self.num_patches)
        else:
            image, layers, occluding, extra = self._mosaic(main, rng)
        # Remembered after drawing partners so a sample is never mixed with itself via the cache.
        self._remember(main, returned=False)

        res = self._resolve_boxes(layers, occluding)
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
