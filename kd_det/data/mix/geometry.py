"""Box geometry of mixed samples: layers, exact visible areas, fitting partners onto the frame.

A mixed image is painted from *layers* (the main image, each pasted patch, each mosaic quadrant),
each with a region of the output frame and its boxes in output coordinates. The rules (why every
output box is exact for the pixels it describes) are in :mod:`kd_det.data.mix.mapper`.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch
from detectron2.data import transforms as T

__all__ = [
    "Fit",
    "Layer",
    "Sample",
    "blend",
    "fit_layer",
    "main_layer",
    "random_rect",
    "rect_area",
    "resolve_boxes",
    "sample_from_output",
    "visible_geometry",
]

# About how many times more cv2.warpAffine costs per output pixel than cv2.resize: the factor by
# which a warp must shrink the work before it is chosen over resize-then-crop.
_WARP_VS_RESIZE_COST = 3


@dataclass
class Sample:
    """One plainly mapped sample (main image or partner) in ``DatasetMapper``'s output geometry."""

    image: torch.Tensor  # C x H x W, as DatasetMapper returns it
    boxes: np.ndarray  # N x 4 XYXY float64, in this sample's own augmented coordinates
    classes: np.ndarray  # N int64
    has_instances: bool  # whether DatasetMapper produced "instances" for it
    source: str  # "main", "dataset" or "cache"
    index: Optional[int]  # index into the partner list for source "dataset"
    file_name: str


@dataclass
class Layer:
    """A source painted onto the output: its pixels in ``region`` and its boxes in output coords."""

    sample: Sample
    region: Tuple[int, int, int, int]  # x0, y0, x1, y1 in output pixels (half-open)
    boxes: np.ndarray  # N x 4, output coordinates, before clipping to the region
    moved: bool  # whether the boxes went through a fitting transform (size rule then applies)
    pixels: Optional[torch.Tensor] = None  # C x h x w pixels painted in region (for mix_info)
    extra: Dict[str, Any] = field(default_factory=dict)


def sample_from_output(out: Dict[str, Any], source: str, index: Optional[int]) -> Sample:
    """Turn a ``DatasetMapper`` output dict into a :class:`Sample`."""
    instances = out.get("instances")
    if instances is not None:
        boxes = instances.gt_boxes.tensor.numpy().astype(np.float64).reshape(-1, 4)
        classes = instances.gt_classes.numpy().astype(np.int64).reshape(-1)
    else:
        boxes = np.zeros((0, 4), dtype=np.float64)
        classes = np.zeros((0,), dtype=np.int64)
    return Sample(
        image=out["image"],
        boxes=boxes,
        classes=classes,
        has_instances=instances is not None,
        source=source,
        index=index,
        file_name=out.get("file_name", ""),
    )


def rect_area(boxes: np.ndarray) -> np.ndarray:
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
        return rect_area(boxes), boxes.copy()
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
class Fit:
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
    def cover(cls, h, w, th, tw, rng=None, anchor=None) -> "Fit":
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


def blend(a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
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


def random_rect(rng: np.random.Generator, h: int, w: int, area_frac: float):
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


def resolve_boxes(
    layers: List[Layer], occluding: bool, box_rule: str, min_visible: float, min_box_size: float
):
    """Apply the clipping / visibility / size rules (module docstring) to the boxes of all layers.

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
        area0 = rect_area(b)
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
            if occluding and later.region[2] > later.region[0] and later.region[3] > later.region[1]
        ]
        area, vis_box = visible_geometry(clipped, np.array(covers, dtype=np.float64))
        frac = np.where(area0 > 0, area / np.maximum(area0, 1e-12), 0.0)
        final = vis_box if box_rule == "shrink" else clipped
        changed = layer.moved | np.any(final != b, axis=1)
        big = (final[:, 2] - final[:, 0] >= min_box_size) & (
            final[:, 3] - final[:, 1] >= min_box_size
        )
        keep = (area > 0) & (frac >= min_visible) & (~changed | big)
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


def main_layer(main: Sample) -> Layer:
    """The main image as the bottom layer: the whole frame, its own boxes."""
    h, w = main.image.shape[-2:]
    return Layer(main, (0, 0, w, h), main.boxes, moved=False, pixels=main.image)


def fit_layer(sample, h, w, region, rng, anchor=None, fit_hw=None):
    """Fit ``sample`` onto the output and return its layer for ``region``.

    ``fit_hw`` is the size the sample is fitted to (default: the whole ``h x w`` frame, with the
    region's pixels taken at the same coordinates); Mosaic fits to the quadrant instead.
    """
    x0, y0, x1, y1 = region
    sh, sw = sample.image.shape[-2:]
    if fit_hw is None:
        fit = Fit.cover(sh, sw, h, w, rng, anchor)
        window, offset = region, (0, 0)
    else:
        fit = Fit.cover(sh, sw, fit_hw[0], fit_hw[1], rng, anchor)
        window, offset = (0, 0, x1 - x0, y1 - y0), (x0, y0)
    pixels = fit.render(sample.image, window)
    boxes = fit.transform().apply_box(sample.boxes) if len(sample.boxes) else sample.boxes
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) + np.array(offset * 2)
    return Layer(sample, region, boxes, moved=True, pixels=pixels)
