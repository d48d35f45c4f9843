"""Mix strategies: how a sample and its partners become one image, chosen by ``INPUT.MIX.TYPE``.

A strategy is an entry of :data:`MIX_STRATEGY_REGISTRY` called as ``strategy(mapper, main, rng)``
(the mapper, the plainly mapped :class:`~kd_det.data.mix.geometry.Sample`, the mapper's
generator) and returns ``(image, layers, occluding, extra)``: the mixed image, the
:class:`~kd_det.data.mix.geometry.Layer` of every source in paint order, whether later layers hide
earlier ones, and a dict for ``mix_info``. ``mixup``, ``cutmix``, ``cutnmix`` and ``mosaic`` are
built in; register your own with ``@MIX_STRATEGY_REGISTRY.register()``.
See docs/mixed_sample.md, "Your own mix type", for the full contract and an example.
"""

import torch
from detectron2.utils.registry import Registry

from .geometry import Layer, blend, fit_layer, main_layer, random_rect

__all__ = ["MIX_STRATEGY_REGISTRY", "MIX_TYPES", "cutmix", "cutnmix", "mixup", "mosaic"]

MIX_STRATEGY_REGISTRY = Registry("KD_MIX_STRATEGY")
MIX_STRATEGY_REGISTRY.__doc__ = """
Registry of mix strategies, named by ``INPUT.MIX.TYPE`` (see :mod:`kd_det.data.mix.strategies`).
"""

#: The built-in strategies (more can be registered in :data:`MIX_STRATEGY_REGISTRY`).
MIX_TYPES = ("mixup", "cutmix", "cutnmix", "mosaic")


@MIX_STRATEGY_REGISTRY.register()
def mixup(mapper, main, rng):
    """Blend with one partner: ``lam * main + (1 - lam) * partner``, ``lam ~ Beta(a, a)``."""
    h, w = main.image.shape[-2:]
    (partner,) = mapper.draw_partners(1, rng)
    lam = float(rng.beta(mapper.mix_alpha, mapper.mix_alpha))
    layer = fit_layer(partner, h, w, (0, 0, w, h), rng)
    image = blend(main.image, layer.pixels, lam)
    return image, [main_layer(main), layer], False, {"lam": lam}


def _paste_patches(mapper, main, rng, num_patches):
    h, w = main.image.shape[-2:]
    partners = mapper.draw_partners(num_patches, rng)
    # The main image may be pasted into in place unless someone else still needs its pixels.
    keep_main = mapper.partner_cache_size > 0 or mapper.return_mix_info
    image = main.image.clone() if keep_main else main.image
    layers = [main_layer(main)]
    for partner in partners:
        frac = float(rng.beta(mapper.mix_alpha, mapper.mix_alpha)) / num_patches
        x0, y0, x1, y1 = region = random_rect(rng, h, w, frac)
        layer = fit_layer(partner, h, w, region, rng)
        image[:, y0:y1, x0:x1] = layer.pixels
        layer.extra["area_fraction"] = frac
        layers.append(layer)
    return image, layers, True, {}


@MIX_STRATEGY_REGISTRY.register()
def cutmix(mapper, main, rng):
    """Paste one rectangle of a partner (area fraction ``~ Beta(a, a)``)."""
    return _paste_patches(mapper, main, rng, 1)


@MIX_STRATEGY_REGISTRY.register()
def cutnmix(mapper, main, rng):
    """Cut^nMix: paste ``NUM_PATCHES`` rectangles, each from its own partner."""
    return _paste_patches(mapper, main, rng, mapper.num_patches)


@MIX_STRATEGY_REGISTRY.register()
def mosaic(mapper, main, rng):
    """The main image and three partners in the quadrants around a random centre."""
    h, w = main.image.shape[-2:]
    partners = mapper.draw_partners(3, rng)
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
            layer = Layer(sample, region, sample.boxes[:0], moved=True, pixels=None)
        else:
            layer = fit_layer(sample, h, w, region, rng, anchor, (y1 - y0, x1 - x0))
            image[:, y0:y1, x0:x1] = layer.pixels
        layers.append(layer)
    return image, layers, False, {"center": (cx, cy)}
