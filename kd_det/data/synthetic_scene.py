"""Scenes of the synthetic shapes dataset: shapes, backgrounds, clutter and their boxes.

Classes differ only by shape (several are near-duplicates) and colours are random; scenes add
textured backgrounds, un-annotated clutter, occlusion, pixel noise and JPEG compression. Objects
are painted in order, so later ones occlude earlier ones. ``bbox`` and ``area`` describe the
object's own full mask (as if unoccluded, COCO pixel convention); an object less visible than
:data:`MIN_VISIBLE_FRACTION` is drawn but not annotated. Image ``i`` of split ``s`` depends only
on ``(seed, s, i)`` (``SeedSequence([seed, crc32(s), i])``), not on order or workers.
See docs/getting_started.md, "What the scenes contain, and how they are annotated".
"""

import math
import zlib

import numpy as np
from PIL import Image, ImageDraw

#: Bump whenever the rendering changes, so cached datasets with old pixels are regenerated.
GENERATOR_VERSION = 1

#: Class names; category ``id`` in the json is the 1-based index in this list.
CLASS_NAMES = [
    "circle",
    "ellipse",
    "ring",
    "crescent",
    "square",
    "notched_square",
    "triangle",
    "hexagon",
    "star5",
    "star6",
    "cross",
    "arrow",
]

#: Objects with a smaller visible fraction than this are drawn but not annotated.
MIN_VISIBLE_FRACTION = 0.3
#: Smallest object extent (diameter of the shape's enclosing circle), in pixels.
MIN_OBJECT_SIZE = 8.0
#: Largest object extent, as a fraction of the image side.
MAX_OBJECT_FRACTION = 0.5
#: Range of the number of objects painted per image (inclusive).
NUM_OBJECTS_RANGE = (3, 12)
_MIN_CONTRAST = 90.0  # minimum RGB distance between an object's colour and what lies beneath it


# -------------------------------------------------------------------------------------------------
# Shapes: each returns a list of (polygon in unit coordinates, fill) pairs; fill 0 cuts holes.
# Unit coordinates fit roughly in the unit disc, so "size" is the diameter of the enclosing circle.
# -------------------------------------------------------------------------------------------------
def _regular(n, radius=1.0, phase=0.0):
    angles = phase + np.arange(n) * (2.0 * np.pi / n)
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _star(n, inner):
    angles = np.arange(2 * n) * (np.pi / n) - np.pi / 2
    radii = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _shape_circle(rng):
    return [(_regular(48), 255)]


def _shape_ellipse(rng):
    # Minor/major ratio clearly below the aspect jitter applied to every shape, so an ellipse is
    # never just a slightly squashed circle.
    return [(_regular(48) * np.array([1.0, rng.uniform(0.4, 0.68)]), 255)]


def _shape_ring(rng):
    return [(_regular(48), 255), (_regular(40, rng.uniform(0.45, 0.65)), 0)]


def _shape_crescent(rng):
    inner = rng.uniform(0.75, 0.95)
    offset = rng.uniform(0.35, 0.6)
    return [(_regular(48), 255), (_regular(48, inner) + np.array([offset, 0.0]), 0)]


def _shape_square(rng):
    a = 0.72
    return [(np.array([[-a, -a], [a, -a], [a, a], [-a, a]]), 255)]


def _shape_notched_square(rng):
    # A square with one corner cut out; small notches make it a close cousin of "square".
    a = 0.72
    d = 2 * a * rng.uniform(0.35, 0.6)
    pts = [[-a, -a], [a, -a], [a, a - d], [a - d, a - d], [a - d, a], [-a, a]]
    return [(np.array(pts), 255)]


def _shape_triangle(rng):
    return [(_regular(3, phase=-np.pi / 2), 255)]


def _shape_hexagon(rng):
    return [(_regular(6), 255)]


def _shape_star5(rng):
    return [(_star(5, rng.uniform(0.38, 0.55)), 255)]


def _shape_star6(rng):
    return [(_star(6, rng.uniform(0.45, 0.6)), 255)]


def _shape_cross(rng):
    t = rng.uniform(0.22, 0.34)
    # fmt: off
    pts = [[-t, -1], [t, -1], [t, -t], [1, -t], [1, t], [t, t],
           [t, 1], [-t, 1], [-t, t], [-1, t], [-1, -t], [-t, -t]]
    # fmt: on
    return [(np.array(pts, dtype=np.float64) * 0.85, 255)]


def _shape_arrow(rng):
    w = rng.uniform(0.14, 0.24)  # shaft half-width
    hw = rng.uniform(0.5, 0.7)  # head half-width
    h0 = rng.uniform(0.05, 0.35)  # where the head starts
    pts = [[-1, -w], [h0, -w], [h0, -hw], [1, 0], [h0, hw], [h0, w], [-1, w]]
    return [(np.array(pts), 255)]


_SHAPES = {
    "circle": _shape_circle,
    "ellipse": _shape_ellipse,
    "ring": _shape_ring,
    "crescent": _shape_crescent,
    "square": _shape_square,
    "notched_square": _shape_notched_square,
    "triangle": _shape_triangle,
    "hexagon": _shape_hexagon,
    "star5": _shape_star5,
    "star6": _shape_star6,
    "cross": _shape_cross,
    "arrow": _shape_arrow,
}
assert list(_SHAPES) == CLASS_NAMES


# -------------------------------------------------------------------------------------------------
# Backgrounds and fills: float32 HxWx3 arrays in [0, 255].
# -------------------------------------------------------------------------------------------------
def _random_colour(rng):
    return rng.uniform(0, 255, size=3).astype(np.float32)


def _coords(size):
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    return xs, ys


def _two_colour(rng, t):
    """Blend two random colours with weights ``t`` (HxW in [0, 1])."""
    c0, c1 = _random_colour(rng), _random_colour(rng)
    return c0 + t[..., None] * (c1 - c0)


def _bg_gradient(rng, size, xs, ys):
    theta = rng.uniform(0, 2 * np.pi)
    proj = xs * math.cos(theta) + ys * math.sin(theta)
    t = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
    return _two_colour(rng, t)


def _bg_stripes(rng, size, xs, ys):
    theta = rng.uniform(0, np.pi)
    period = rng.uniform(4, 24)
    phase = (xs * math.cos(theta) + ys * math.sin(theta)) * (2 * np.pi / period)
    t = 0.5 + 0.5 * np.sin(phase)
    if rng.random() < 0.5:  # hard-edged stripes
        t = (t > 0.5).astype(np.float32)
    return _two_colour(rng, t)


def _bg_checkers(rng, size, xs, ys):
    theta = rng.uniform(0, np.pi / 2)
    cell = rng.uniform(4, 24)
    u = xs * math.cos(theta) + ys * math.sin(theta)
    v = -xs * math.sin(theta) + ys * math.cos(theta)
    t = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
    return _two_colour(rng, t)


def _bg_noise(rng, size, xs, ys):
    # Smooth colour noise: a coarse random grid upsampled bicubically.
    grid = int(rng.integers(3, 11))
    small = rng.integers(0, 256, size=(grid, grid, 3), dtype=np.uint8)
    big = Image.fromarray(small).resize((size, size), Image.BICUBIC)
    return np.asarray(big, dtype=np.float32)


_BACKGROUNDS = (_bg_gradient, _bg_stripes, _bg_checkers, _bg_noise)


def _background(rng, size, xs, ys):
    bg = _BACKGROUNDS[rng.integers(len(_BACKGROUNDS))](rng, size, xs, ys)
    if rng.random() < 0.5:
        # Blend a second texture in, so backgrounds are not trivially periodic or flat.
        other = _BACKGROUNDS[rng.integers(len(_BACKGROUNDS))](rng, size, xs, ys)
        alpha = rng.uniform(0.2, 0.5)
        bg = (1 - alpha) * bg + alpha * other
    # Lower the background contrast a bit so that objects, not textures, dominate the image.
    mean = bg.mean(axis=(0, 1), keepdims=True)
    return mean + rng.uniform(0.5, 0.9) * (bg - mean)


def _object_fill(rng, colour, size, xs, ys):
    """Per-instance fill: flat colour (most often), a gradient, or a noisy colour."""
    mode = rng.random()
    if mode < 0.6:
        return colour
    if mode < 0.85:
        other = np.clip(colour + rng.uniform(-70, 70, size=3), 0, 255).astype(np.float32)
        theta = rng.uniform(0, 2 * np.pi)
        proj = xs * math.cos(theta) + ys * math.sin(theta)
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
        return colour + t[..., None] * (other - colour)
    return colour + rng.normal(0, 18, size=(size, size, 1)).astype(np.float32)


# -------------------------------------------------------------------------------------------------
# Clutter: un-annotated strokes and blobs.
# -------------------------------------------------------------------------------------------------
def _clutter_colour(rng):
    return tuple(int(c) for c in rng.integers(0, 256, size=3))


def _draw_clutter(rng, draw, size, thin, footprint=None):
    """Draw one random clutter item; its shapes are chosen never to resemble a class.

    Args:
        rng (numpy.random.Generator): randomness source.
        draw (PIL.ImageDraw.ImageDraw): RGB target.
        size (int): image side.
        thin (bool): only 1-pixel strokes (used above the objects, where clutter occludes them).
        footprint (PIL.ImageDraw.ImageDraw): optional "L" target that receives the same item in
            white, to record which pixels it covers.
    """
    kind = rng.integers(2 if thin else 4)
    colour = _clutter_colour(rng)
    width = 1 if thin else int(rng.integers(1, 4))
    targets = [(draw, colour)] + ([(footprint, 255)] if footprint is not None else [])
    if kind == 0:  # scribble: a random walk polyline
        n = int(rng.integers(3, 8))
        start = rng.uniform(0, size, size=2)
        steps = rng.normal(0, size / 8, size=(n, 2))
        pts = [tuple(p) for p in np.clip(start + np.cumsum(steps, axis=0), 0, size - 1)]
        for target, ink in targets:
            target.line(pts, fill=ink, width=width)
    elif kind == 1:  # straight line
        pts = [tuple(p) for p in rng.uniform(0, size, size=(2, 2))]
        for target, ink in targets:
            target.line(pts, fill=ink, width=width)
    elif kind == 2:  # arc (an open curve, so it is not a ring)
        r = rng.uniform(5, size / 4)
        cx, cy = rng.uniform(0, size, size=2)
        a0 = rng.uniform(0, 360)
        a1 = a0 + rng.uniform(40, 200)
        for target, ink in targets:
            target.arc([cx - r, cy - r, cx + r, cy + r], a0, a1, fill=ink, width=width)
    else:  # irregular blob: strongly perturbed radii so it never looks like a circle or polygon
        n = 14
        r = rng.uniform(4, size / 10)
        radii = r * rng.uniform(0.25, 1.4, size=n)
        radii = 0.7 * radii + 0.15 * (np.roll(radii, 1) + np.roll(radii, -1))
        angles = np.sort(rng.uniform(0, 2 * np.pi, size=n))
        cx, cy = rng.uniform(0, size, size=2)
        pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
        for target, ink in targets:
            target.polygon([tuple(p) for p in pts], fill=ink)


# -------------------------------------------------------------------------------------------------
# Scene generation.
# -------------------------------------------------------------------------------------------------
def _place_polygons(rng, polygons, size, image_size):
    """Rotate, scale and translate unit polygons so the whole object lies inside the image."""
    theta = rng.uniform(0, 2 * np.pi)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    # Slight anisotropic jitter: instances of a class are not exact copies of each other.
    jitter = np.array([rng.uniform(0.88, 1.12), 1.0])
    scale = size / 2.0
    placed = [((pts * jitter) @ rot.T * scale, fill) for pts, fill in polygons]
    # Only filled (outer) polygons determine the extent; holes lie inside them.
    outer = np.concatenate([pts for pts, fill in placed if fill])
    lo, hi = outer.min(axis=0), outer.max(axis=0)
    span = np.maximum(hi - lo, 0.0)
    offset = rng.uniform(0, 1, size=2) * np.maximum(image_size - 1 - span, 0.0) - lo
    return [(pts + offset, fill) for pts, fill in placed]


def _rasterize(polygons, image_size):
    mask_img = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(mask_img)
    for pts, fill in polygons:
        draw.polygon([tuple(p) for p in pts], fill=fill)
    return np.asarray(mask_img) > 0


def generate_scene(rng, image_size):
    """Render one random scene and its annotations.

    Args:
        rng (numpy.random.Generator): the only source of randomness, so a scene is reproducible
            from the generator's state.
        image_size (int): side of the square image in pixels.

    Returns:
        tuple: ``(image, annotations)`` where ``image`` is an ``image_size x image_size x 3`` uint8
        RGB array and ``annotations`` is a list of dicts with ``bbox`` (``[x, y, w, h]`` floats),
        ``category_id`` (1-based index into :data:`CLASS_NAMES`), ``area`` (float) and
        ``iscrowd=0``. See docs/getting_started.md for the box and occlusion rules.
    """
    image_size = int(image_size)
    xs, ys = _coords(image_size)
    canvas = _background(rng, image_size, xs, ys)

    # Clutter below the objects: drawn into the background, occludes nothing.
    base = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(base)
    for _ in range(int(rng.integers(2, 9))):
        _draw_clutter(rng, draw, image_size, thin=False)
    canvas = np.asarray(base, dtype=np.float32).copy()

    max_size = max(MIN_OBJECT_SIZE, MAX_OBJECT_FRACTION * image_size)
    num_objects = int(rng.integers(NUM_OBJECTS_RANGE[0], NUM_OBJECTS_RANGE[1] + 1))
    objects = []  # (category_id, mask)
    for _ in range(num_objects):
        cls = int(rng.integers(len(CLASS_NAMES)))
        # Log-uniform sizes: small objects are as common per octave as large ones.
        size = math.exp(rng.uniform(math.log(MIN_OBJECT_SIZE), math.log(max_size)))
        polygons = _place_polygons(rng, _SHAPES[CLASS_NAMES[cls]](rng), size, image_size)
        mask = _rasterize(polygons, image_size)
        if not mask.any():
            continue
        # Pick a colour that stands out from what is already painted beneath the object; colour is
        # random per instance, but an invisible object would only teach the detector noise.
        under = canvas[mask].mean(axis=0)
        colour = _random_colour(rng)
        for _ in range(8):
            if np.linalg.norm(colour - under) >= _MIN_CONTRAST:
                break
            colour = _random_colour(rng)
        fill = _object_fill(rng, colour, image_size, xs, ys)
        if np.ndim(fill) == 1:
            canvas[mask] = fill
        else:
            canvas[mask] = fill[mask]
        objects.append((cls + 1, mask))

    # Thin strokes above the objects: they partially occlude objects, and count as occluders.
    top = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    cover_img = Image.new("L", (image_size, image_size), 0)
    draw, cover_draw = ImageDraw.Draw(top), ImageDraw.Draw(cover_img)
    for _ in range(int(rng.integers(0, 4))):
        _draw_clutter(rng, draw, image_size, thin=True, footprint=cover_draw)
    canvas = np.asarray(top, dtype=np.float32)
    cover = np.asarray(cover_img) > 0

    # Pixel noise, then quantise.
    sigma = rng.uniform(0, 8)
    if sigma > 0.5:
        canvas = canvas + rng.normal(0, sigma, size=canvas.shape).astype(np.float32)
    image = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)

    # Occlusion: walk from the top-most object down, accumulating what covers each object.
    annotations = []
    for category_id, mask in reversed(objects):
        area = int(mask.sum())
        visible = int(np.count_nonzero(mask & ~cover))
        cover |= mask
        if visible < MIN_VISIBLE_FRACTION * area:
            continue
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        x0, x1, y0, y1 = cols[0], cols[-1], rows[0], rows[-1]
        annotations.append(
            {
                "bbox": [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)],
                "category_id": int(category_id),
                "area": float(area),
                "iscrowd": 0,
            }
        )
    annotations.reverse()  # back to painting order
    return image, annotations


def image_rng(seed, split, index):
    """Return the random generator of image ``index`` of ``split``.

    Seeding each image from ``(seed, split, index)`` alone makes the dataset independent of the
    generation order and of how work is split across processes.
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    split_key = zlib.crc32(split.encode("utf-8"))
    return np.random.default_rng(np.random.SeedSequence([int(seed), split_key, int(index)]))
