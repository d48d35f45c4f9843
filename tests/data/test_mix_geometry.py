"""Mixed-sample geometry (kd_det/data/mix/geometry.py): visible area and box of an occluded box,
and the fitted partner window, against independent computations."""

import cv2
import numpy as np
import pytest
import torch
from mix_properties import inter, visible_area_ie

from kd_det.data.mix import visible_geometry
from kd_det.data.mix.geometry import Fit


def test_visible_geometry_matches_inclusion_exclusion():
    rng = np.random.default_rng(0)
    for _ in range(200):
        xs, ys = np.sort(rng.uniform(0, 20, 2)), np.sort(rng.uniform(0, 20, 2))
        box = np.array([xs[0], ys[0], xs[1], ys[1]])
        covers = []
        for _ in range(rng.integers(0, 4)):
            xs, ys = np.sort(rng.integers(0, 21, 2)), np.sort(rng.integers(0, 21, 2))
            covers.append([xs[0], ys[0], xs[1], ys[1]])
        a, bb = visible_geometry(box[None], np.array(covers, np.float64).reshape(-1, 4))
        assert a[0] == pytest.approx(visible_area_ie(box, covers), abs=1e-9)
        if a[0] > 0:  # the bbox holds all visible area, and cutting any side would lose some
            assert visible_area_ie(inter(box, bb[0]), covers) == pytest.approx(a[0], abs=1e-9)
            for side in range(4):
                shrunk = bb[0].copy()
                shrunk[side] += 1e-3 if side < 2 else -1e-3
                assert visible_area_ie(inter(box, shrunk), covers) < a[0] - 1e-12


def test_shrink_only_when_a_full_side_is_covered():
    area_, bbox = visible_geometry(
        np.array([[0, 0, 10, 10], [0, 0, 10, 10]], np.float64),
        np.array([[-1, -1, 4, 11], [6, 6, 12, 12]], np.float64),
    )
    # The first cover takes the whole left side: box shrinks to x >= 4. The corner cut does not.
    np.testing.assert_allclose(bbox[0], [4, 0, 10, 10])
    assert area_[0] == pytest.approx(60 - 16)


def test_fit_render_matches_full_resize():
    """Window rendering (resize or warp path) equals resizing the whole image and cropping."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        h, w, th, tw = (int(v) for v in rng.integers(3, 200, 4))
        img = torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))
        fit = Fit.cover(h, w, th, tw, rng)
        assert fit.nh >= th and fit.nw >= tw and min(fit.nh / h, fit.nw / w) >= min(th / h, tw / w)
        ref = np.stack(
            [cv2.resize(p, (fit.nw, fit.nh), interpolation=cv2.INTER_LINEAR) for p in img.numpy()]
        )
        ref = ref[:, fit.oy : fit.oy + th, fit.ox : fit.ox + tw]
        full = fit.render(img, (0, 0, tw, th)).numpy().astype(int)
        if th * tw * 3 >= fit.nh * fit.nw:  # resize path: bit-exact
            np.testing.assert_array_equal(full, ref)
        assert np.abs(full - ref).max() <= 1  # warp path: same mapping, other rounding
        x0, y0 = int(rng.integers(0, tw)), int(rng.integers(0, th))
        x1, y1 = x0 + max(1, (tw - x0) // 3), y0 + max(1, (th - y0) // 3)
        win = fit.render(img, (x0, y0, x1, y1)).numpy().astype(int)
        assert np.abs(win - ref[:, y0:y1, x0:x1]).max() <= 1
