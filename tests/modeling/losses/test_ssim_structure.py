"""SSIM's structure term alone (``MODEL.KD.SSIM.TERMS structure``): values against the formula
computed by hand with a plain 2-D convolution, the product of the three SSIM terms against
scikit-image's SSIM, the hand-written backward by float64 finite differences, the key, the fused
path's refusal, and the build-time warning about levels smaller than the window."""

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

from kd_det.config import get_kd_cfg
from kd_det.layers import ssim_filter
from kd_det.modeling.losses import SSIMFeatureLoss, feature_loss_from_config, ssim_map
from kd_det.modeling.losses import ssim as ssim_module


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _hand_terms(x, y, data_range, win=11, sigma=1.5, K=(0.01, 0.03)):
    """Luminance, contrast and structure maps of Wang et al. (2004), eqs. 6, 9 and 10, with
    windowed statistics from ``F.conv2d`` and a 2-D Gaussian (not kd_det's band matrices)."""
    g = torch.exp(-((torch.arange(win, dtype=x.dtype) - win // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    k2 = (g[:, None] * g[None, :]).expand(x.shape[1], 1, win, win)

    def filt(t):
        return F.conv2d(t, k2, groups=x.shape[1])

    mx, my = filt(x), filt(y)
    vx, vy = filt(x * x) - mx**2, filt(y * y) - my**2
    cxy = filt(x * y) - mx * my
    c1, c2 = (K[0] * data_range) ** 2, (K[1] * data_range) ** 2
    c3 = c2 / 2
    sx, sy = vx.clamp_min(0).sqrt(), vy.clamp_min(0).sqrt()
    lum = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
    con = (2 * sx * sy + c2) / (vx + vy + c2)
    struct = (cxy + c3) / (sx * sy + c3)
    return lum, con, struct


def test_structure_map_matches_the_formula_by_hand():
    teacher = _randn(2, 3, 24, 28, seed=0)
    student = 0.6 * teacher + 0.8 * _randn(2, 3, 24, 28, seed=1)
    ours = ssim_map(student, teacher, 4.0, 11, 1.5, terms="structure")
    _, _, struct = _hand_terms(student, teacher, 4.0)
    torch.testing.assert_close(ours, struct, atol=1e-6, rtol=1e-6)
    # Not the full SSIM: the test would pass for the wrong term otherwise.
    assert (ssim_map(student, teacher, 4.0, 11, 1.5) - ours).abs().max() > 1e-2


def test_three_terms_multiply_to_scikit_image_ssim():
    """With C3 = C2 / 2, luminance x contrast x structure is SSIM (Wang et al., eq. 13), and
    scikit-image's SSIM map (cropped to the valid region) is the reference for it."""
    teacher = _randn(1, 2, 30, 32, seed=2)
    student = 0.5 * teacher + _randn(1, 2, 30, 32, seed=3) + 0.3
    data_range = 8.0
    lum, con, _ = _hand_terms(student, teacher, data_range)
    struct = ssim_map(student, teacher, data_range, 11, 1.5, terms="structure")
    _, full = structural_similarity(
        student[0].numpy(), teacher[0].numpy(), gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, data_range=data_range, channel_axis=0, full=True,
    )  # fmt: skip
    np.testing.assert_allclose((lum * con * struct)[0].numpy(), full[:, 5:-5, 5:-5], atol=1e-6)


def test_structure_ignores_window_mean_and_spread_but_not_sign():
    teacher = _randn(2, 4, 20, 20, seed=4)
    affine = ssim_map(3.0 * teacher + 2.0, teacher, 1.0, 7, terms="structure")
    torch.testing.assert_close(affine, torch.ones_like(affine))
    flipped = ssim_map(-teacher, teacher, 1.0, 7, terms="structure")
    assert flipped.max() < -0.95
    # Full SSIM does see the offset and the scale.
    assert ssim_map(3.0 * teacher + 2.0, teacher, 1.0, 7).mean() < 0.5


@pytest.mark.parametrize("tiled", [False, True])
def test_structure_backward_gradcheck(tiled, monkeypatch):
    if tiled:
        monkeypatch.setattr(ssim_filter, "_BAND_MAX", 5)
        monkeypatch.setattr(ssim_filter, "_BAND_TILE", 3)
    teacher = _randn(1, 2, 13, 14, seed=0)
    student = (0.5 * teacher + _randn(1, 2, 13, 14, seed=1)).requires_grad_()
    win = 3 if tiled else 11
    assert torch.autograd.gradcheck(
        lambda x: ssim_map(x, teacher, 4.0, win, 1.5, terms="structure"), (student,)
    )


def test_flat_student_window_has_finite_zero_variance_gradient():
    teacher = _randn(1, 1, 9, 9, seed=5)
    student = torch.zeros(1, 1, 9, 9, dtype=torch.float64, requires_grad=True)
    out = ssim_map(student, teacher, 1.0, 7, terms="structure")
    torch.testing.assert_close(out, torch.ones_like(out))  # C3 / C3: the term's blind spot
    out.sum().backward()
    assert torch.isfinite(student.grad).all()


def test_loss_terms_argument_key_and_errors():
    teacher = _randn(2, 4, 16, 16, seed=0, dtype=torch.float32)
    loss = SSIMFeatureLoss(terms="structure", loss_form="(1-ssim)/2", range_policy="minmax")
    assert loss(teacher, teacher).abs().item() < 1e-5
    assert loss(-teacher, teacher).item() > 0.9
    assert "terms='structure'" in repr(loss)
    cfg = get_kd_cfg()
    assert cfg.MODEL.KD.SSIM.TERMS == "full"
    assert feature_loss_from_config(cfg, "ssim").terms == "full"
    cfg.MODEL.KD.SSIM.TERMS = "structure"
    assert feature_loss_from_config(cfg, "ssim").terms == "structure"
    with pytest.raises(ValueError, match="MODEL.KD.SSIM.TERMS"):
        SSIMFeatureLoss(terms="luminance")
    with pytest.raises(ValueError, match="MODEL.KD.SSIM.TERMS"):
        ssim_map(teacher, teacher, 1.0, 7, terms="contrast")


def test_fused_path_refuses_structure_and_auto_falls_back(monkeypatch):
    monkeypatch.delenv(ssim_module.IMPL_ENV, raising=False)
    assert SSIMFeatureLoss(terms="structure").resolved_impl(torch.device("cuda")) == "reference"
    teacher = _randn(2, 4, 16, 16, seed=0, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"TERMS='structure'.*full SSIM only"):
        SSIMFeatureLoss(terms="structure", impl="fused")(teacher + 0.1, teacher)
    monkeypatch.setenv(ssim_module.IMPL_ENV, "fused")
    with pytest.raises(RuntimeError, match="KD_DET_SSIM_IMPL='fused'"):
        SSIMFeatureLoss(terms="structure")(teacher + 0.1, teacher)


# ------------------------------------------------------------------------------------------------
# Levels smaller than the window, named when the loss is built
# ------------------------------------------------------------------------------------------------
def _cfg(size, window, levels=("p2", "p3", "p4", "p5", "p6"), rule="shrink"):
    cfg = get_kd_cfg()
    cfg.merge_from_list(
        [
            "INPUT.MIN_SIZE_TRAIN", f"({size},)", "INPUT.MIN_SIZE_TEST", str(size),
            "MODEL.KD.SSIM.WINDOW_SIZE", str(window), "MODEL.KD.SSIM.SMALL_MAP", rule,
            "MODEL.KD.FEATURE.LEVELS", str(list(levels)),
        ]  # fmt: skip
    )
    return cfg


@pytest.mark.parametrize(
    "size, window, rule, expected",
    [
        (128, 11, "shrink", [("p4", 8, 7), ("p5", 4, 3), ("p6", 2, None)]),
        (128, 7, "shrink", [("p5", 4, 3), ("p6", 2, None)]),
        (128, 7, "skip", [("p5", 4, None), ("p6", 2, None)]),
        (256, 11, "shrink", [("p5", 8, 7), ("p6", 4, 3)]),
        (800, 11, "shrink", []),
    ],
)
def test_small_map_levels(size, window, rule, expected):
    cfg = _cfg(size, window, rule=rule)
    loss = SSIMFeatureLoss(**SSIMFeatureLoss.from_config(cfg))
    assert ssim_module.small_map_levels(cfg, loss) == expected


def test_small_map_levels_reads_the_smallest_input_and_online_levels():
    cfg = _cfg(256, 11)
    cfg.merge_from_list(["INPUT.MIN_SIZE_TRAIN", "(256, 128)"])
    loss = SSIMFeatureLoss(**SSIMFeatureLoss.from_config(cfg))
    assert [lvl for lvl, _, _ in ssim_module.small_map_levels(cfg, loss)] == ["p4", "p5", "p6"]
    cfg.merge_from_list(["MODEL.META_ARCHITECTURE", "OnlineDistillationRCNN",
                         "MODEL.ONLINE_KD.FEATURE_LEVELS", "['p3', 'p5']"])  # fmt: skip
    assert [lvl for lvl, _, _ in ssim_module.small_map_levels(cfg, loss)] == ["p5"]


def test_build_warns_once_naming_the_levels(caplog, monkeypatch):
    monkeypatch.setattr(ssim_module, "_BUILD_WARNED", set())
    cfg = _cfg(128, 11)
    with caplog.at_level(logging.WARNING, logger=ssim_module.__name__):
        feature_loss_from_config(cfg, "ssim")
        feature_loss_from_config(cfg, "ssim")  # a second build of the same setting: no repeat
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1, msgs
    for part in ("128 px", "11-pixel", "p4 (8x8: window shrunk to 7)", "p6 (2x2: skipped"):
        assert part in msgs[0], msgs[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=ssim_module.__name__):
        feature_loss_from_config(_cfg(128, 11, levels=("p2", "p3")), "ssim")
    assert not caplog.records  # p2 32x32, p3 16x16: the window fits
