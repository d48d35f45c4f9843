"""Triton kernel bodies of the fused SSIM loss (imported only where triton is installed).

Concepts: the Gaussian valid filter runs as a vertical pass (:func:`vertical_stats`) and a
horizontal pass fused with the SSIM formula (:func:`ssim_rows`); the backward runs the adjoint
passes in reverse (:func:`adjoint_rows`, then :func:`adjoint_cols_grad`). The bodies are left
undecorated: :mod:`kd_det.layers.fused_ssim` jits them once per mode (compiled or
``TRITON_INTERPRET=1``), so they call only ``triton.language`` builtins (``tl.full``,
``tl.reduce``), never its ``@jit`` library functions (``tl.zeros``, ``tl.sum``); a test checks it.
See docs/ssim_kernel.md, "How the kernels are written", for these rules, the scratch layouts and
the register budget.
"""

import triton.language as tl


def vertical_stats(
    x_ptr,
    y_ptr,
    shift_x_ptr,
    inv_x_ptr,
    shift_y_ptr,
    inv_y_ptr,
    win_ptr,
    stats_ptr,
    plane0,
    chunk,
    H,
    W,
    HV,
    n_col_blocks,
    K: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
):
    """Vertical valid filter of the five SSIM statistics of one tile of one plane.

    The range policy's per-plane affine map ``(v - shift) * inv`` is applied on load, so the
    normalized maps are never stored; inputs may be float32, float16 or bfloat16.
    """
    tile = tl.program_id(0)
    p = tl.program_id(1)
    plane = (plane0 + p).to(tl.int64)
    rows = (tile // n_col_blocks) * BH + tl.arange(0, BH)
    cols = (tile % n_col_blocks) * BW + tl.arange(0, BW)
    mask = (rows[:, None] < HV) & (cols[None, :] < W)
    shift_x = tl.load(shift_x_ptr + plane)
    inv_x = tl.load(inv_x_ptr + plane)
    shift_y = tl.load(shift_y_ptr + plane)
    inv_y = tl.load(inv_y_ptr + plane)
    base = plane * H * W + cols[None, :]
    mu_x = tl.full((BH, BW), 0.0, dtype=tl.float32)
    mu_y = tl.full((BH, BW), 0.0, dtype=tl.float32)
    e_xx = tl.full((BH, BW), 0.0, dtype=tl.float32)
    e_yy = tl.full((BH, BW), 0.0, dtype=tl.float32)
    e_xy = tl.full((BH, BW), 0.0, dtype=tl.float32)
    for t in range(K):
        w = tl.load(win_ptr + t)
        off = base + (rows[:, None] + t) * W
        xv = (tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32) - shift_x) * inv_x
        yv = (tl.load(y_ptr + off, mask=mask, other=0.0).to(tl.float32) - shift_y) * inv_y
        mu_x += w * xv
        mu_y += w * yv
        e_xx += w * (xv * xv)
        e_yy += w * (yv * yv)
        e_xy += w * (xv * yv)
    slot = chunk * HV * W
    out = stats_ptr + p.to(tl.int64) * HV * W + rows[:, None] * W + cols[None, :]
    tl.store(out, mu_x, mask=mask)
    tl.store(out + slot, mu_y, mask=mask)
    tl.store(out + 2 * slot, e_xx, mask=mask)
    tl.store(out + 3 * slot, e_yy, mask=mask)
    tl.store(out + 4 * slot, e_xy, mask=mask)


def ssim_rows(
    stats_ptr,
    win_ptr,
    weight_ptr,
    weight_sn,
    weight_sh,
    weight_sw,
    grad_ptr,
    out_ptr,
    plane0,
    chunk,
    C,
    HV,
    W,
    WV,
    n_col_blocks,
    n_tiles,
    c1,
    c2,
    K: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    MODE: tl.constexpr,
):
    """Horizontal valid filter of the statistics, then the SSIM formula, on one tile.

    ``MODE`` 0 (forward): one partial sum of ``w * (1 - ssim)`` per tile into ``out[plane, tile]``.
    ``MODE`` 1 (backward): ``g * dSSIM/d(mu_x, E[x^2], E[xy])`` into the ``coef`` scratch, with
    ``g = -grad[n] * w``, the loss gradient at each SSIM pixel. ``MODE`` 2: the SSIM map itself.
    The formula and its derivatives mirror ``kd_det.modeling.losses.ssim_functional._SSIMMap``
    (including the clamp of ``E[x^2] - mu_x^2`` at 0 and its zero derivative there);
    docs/ssim_kernel.md derives them.
    """
    tile = tl.program_id(0)
    p = tl.program_id(1)
    plane = plane0 + p
    rows = (tile // n_col_blocks) * BH + tl.arange(0, BH)
    cols = (tile % n_col_blocks) * BW + tl.arange(0, BW)
    mask = (rows[:, None] < HV) & (cols[None, :] < WV)
    slot = chunk * HV * W
    base = stats_ptr + p.to(tl.int64) * HV * W + rows[:, None] * W + cols[None, :]
    mu_x = tl.full((BH, BW), 0.0, dtype=tl.float32)
    mu_y = tl.full((BH, BW), 0.0, dtype=tl.float32)
    e_xx = tl.full((BH, BW), 0.0, dtype=tl.float32)
    e_yy = tl.full((BH, BW), 0.0, dtype=tl.float32)
    e_xy = tl.full((BH, BW), 0.0, dtype=tl.float32)
    for t in range(K):
        w = tl.load(win_ptr + t)
        mu_x += w * tl.load(base + t, mask=mask, other=0.0)
        mu_y += w * tl.load(base + slot + t, mask=mask, other=0.0)
        e_xx += w * tl.load(base + 2 * slot + t, mask=mask, other=0.0)
        e_yy += w * tl.load(base + 3 * slot + t, mask=mask, other=0.0)
        e_xy += w * tl.load(base + 4 * slot + t, mask=mask, other=0.0)
    mu_xy = mu_x * mu_y
    mu_xx = mu_x * mu_x
    var_x = e_xx - mu_xx
    active = var_x >= 0.0
    var_x = tl.where(active, var_x, 0.0)
    var_y = tl.maximum(e_yy - mu_y * mu_y, 0.0)
    b1 = mu_xx + mu_y * mu_y + c1
    b2 = var_x + var_y + c2
    lum = (2.0 * mu_xy + c1) / b1
    cs = (2.0 * (e_xy - mu_xy) + c2) / b2
    ssim = lum * cs
    if MODE == 2:
        out = out_ptr + plane.to(tl.int64) * HV * WV + rows[:, None] * WV + cols[None, :]
        tl.store(out, ssim, mask=mask)
    else:
        n = plane // C
        if HAS_WEIGHT:
            w_off = (
                n.to(tl.int64) * weight_sn + rows[:, None] * weight_sh + cols[None, :] * weight_sw
            )
            weight = tl.load(weight_ptr + w_off, mask=mask, other=0.0).to(tl.float32)
        else:
            weight = tl.full((BH, BW), 1.0, dtype=tl.float32)
        if MODE == 0:
            val = tl.where(mask, (1.0 - ssim) * weight, 0.0)
            val = tl.reduce(
                tl.reduce(val, 1, tl.standard._sum_combine), 0, tl.standard._sum_combine
            )
            tl.store(out_ptr + plane.to(tl.int64) * n_tiles + tile, val)
        else:
            g = -tl.load(grad_ptr + n) * weight
            d_exy = 2.0 * lum / b2
            d_exx = tl.where(active, -ssim / b2, 0.0)
            d_mu = 2.0 * cs * (mu_y - mu_x * lum) / b1 - mu_y * d_exy - 2.0 * mu_x * d_exx
            cslot = chunk * HV * WV
            out = out_ptr + p.to(tl.int64) * HV * WV + rows[:, None] * WV + cols[None, :]
            tl.store(out, g * d_mu, mask=mask)
            tl.store(out + cslot, g * d_exx, mask=mask)
            tl.store(out + 2 * cslot, g * d_exy, mask=mask)


def adjoint_rows(
    coef_ptr,
    win_ptr,
    stats_ptr,
    chunk,
    HV,
    W,
    WV,
    n_col_blocks,
    K: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
):
    """Adjoint of the horizontal pass: ``A[i, q] = sum_t win[t] coef[i, q - t]`` (``WV -> W``).

    Writes the three results into slots 0-2 of the ``stats`` scratch, whose statistics the
    coefficient pass has already consumed.
    """
    tile = tl.program_id(0)
    p = tl.program_id(1).to(tl.int64)
    rows = (tile // n_col_blocks) * BH + tl.arange(0, BH)
    cols = (tile % n_col_blocks) * BW + tl.arange(0, BW)
    mask = (rows[:, None] < HV) & (cols[None, :] < W)
    cslot = chunk * HV * WV
    base = coef_ptr + p * HV * WV + rows[:, None] * WV
    a_mu = tl.full((BH, BW), 0.0, dtype=tl.float32)
    a_xx = tl.full((BH, BW), 0.0, dtype=tl.float32)
    a_xy = tl.full((BH, BW), 0.0, dtype=tl.float32)
    for t in range(K):
        w = tl.load(win_ptr + t)
        src = cols[None, :] - t
        m = mask & (src >= 0) & (src < WV)
        a_mu += w * tl.load(base + src, mask=m, other=0.0)
        a_xx += w * tl.load(base + cslot + src, mask=m, other=0.0)
        a_xy += w * tl.load(base + 2 * cslot + src, mask=m, other=0.0)
    slot = chunk * HV * W
    out = stats_ptr + p * HV * W + rows[:, None] * W + cols[None, :]
    tl.store(out, a_mu, mask=mask)
    tl.store(out + slot, a_xx, mask=mask)
    tl.store(out + 2 * slot, a_xy, mask=mask)


def adjoint_cols_grad(
    stats_ptr,
    win_ptr,
    x_ptr,
    y_ptr,
    shift_x_ptr,
    inv_x_ptr,
    shift_y_ptr,
    inv_y_ptr,
    grad_x_ptr,
    sum_g_ptr,
    sum_gs_ptr,
    plane0,
    chunk,
    H,
    W,
    HV,
    n_col_blocks,
    n_tiles,
    K: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
    RANGE_SUMS: tl.constexpr,
):
    """Adjoint of the vertical pass (``HV -> H``), then the student gradient.

    ``dL/ds = G_mu + 2 s G_xx + t G_xy`` at the normalized pixel values ``s``, ``t`` (recomputed),
    and ``dL/dx = inv_x * dL/ds`` through the range policy's affine map; stored in ``x``'s dtype.
    With ``RANGE_SUMS`` (the student normalized by its own range), also one partial sum per tile
    of ``dL/ds`` and of ``s dL/ds``: what the gradients of the shift and of the scale need.
    """
    tile = tl.program_id(0)
    p = tl.program_id(1)
    plane = (plane0 + p).to(tl.int64)
    rows = (tile // n_col_blocks) * BH + tl.arange(0, BH)
    cols = (tile % n_col_blocks) * BW + tl.arange(0, BW)
    mask = (rows[:, None] < H) & (cols[None, :] < W)
    slot = chunk * HV * W
    base = stats_ptr + p.to(tl.int64) * HV * W + cols[None, :]
    g_mu = tl.full((BH, BW), 0.0, dtype=tl.float32)
    g_xx = tl.full((BH, BW), 0.0, dtype=tl.float32)
    g_xy = tl.full((BH, BW), 0.0, dtype=tl.float32)
    for t in range(K):
        w = tl.load(win_ptr + t)
        src = rows[:, None] - t
        m = mask & (src >= 0) & (src < HV)
        off = base + src * W
        g_mu += w * tl.load(off, mask=m, other=0.0)
        g_xx += w * tl.load(off + slot, mask=m, other=0.0)
        g_xy += w * tl.load(off + 2 * slot, mask=m, other=0.0)
    off = plane * H * W + rows[:, None] * W + cols[None, :]
    inv_x = tl.load(inv_x_ptr + plane)
    s = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32) - tl.load(shift_x_ptr + plane)
    s = s * inv_x
    t_val = tl.load(y_ptr + off, mask=mask, other=0.0).to(tl.float32) - tl.load(shift_y_ptr + plane)
    t_val = t_val * tl.load(inv_y_ptr + plane)
    grad_s = g_mu + 2.0 * s * g_xx + t_val * g_xy
    tl.store(grad_x_ptr + off, (grad_s * inv_x).to(grad_x_ptr.dtype.element_ty), mask=mask)
    if RANGE_SUMS:
        grad_s = tl.where(mask, grad_s, 0.0)
        idx = plane * n_tiles + tile
        gs_s = grad_s * s
        grad_s = tl.reduce(
            tl.reduce(grad_s, 1, tl.standard._sum_combine), 0, tl.standard._sum_combine
        )
        gs_s = tl.reduce(tl.reduce(gs_s, 1, tl.standard._sum_combine), 0, tl.standard._sum_combine)
        tl.store(sum_g_ptr + idx, grad_s)
        tl.store(sum_gs_ptr + idx, gs_s)


def range_ties(
    x_ptr,
    grad_x_ptr,
    lo_ptr,
    hi_ptr,
    add_lo_ptr,
    add_hi_ptr,
    plane0,
    C,
    H,
    W,
    n_col_blocks,
    BH: tl.constexpr,
    BW: tl.constexpr,
):
    """Gradient through an image's own min and max: ``add_lo[n]`` (``add_hi[n]``) is added at every
    pixel equal to the minimum (maximum), i.e. spread evenly over ties, as ``amin``'s backward does.
    """
    tile = tl.program_id(0)
    plane = (plane0 + tl.program_id(1)).to(tl.int64)
    n = plane // C
    rows = (tile // n_col_blocks) * BH + tl.arange(0, BH)
    cols = (tile % n_col_blocks) * BW + tl.arange(0, BW)
    mask = (rows[:, None] < H) & (cols[None, :] < W)
    off = plane * H * W + rows[:, None] * W + cols[None, :]
    xv = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    grad = tl.load(grad_x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    grad += tl.where(xv == tl.load(lo_ptr + n), tl.load(add_lo_ptr + n), 0.0)
    grad += tl.where(xv == tl.load(hi_ptr + n), tl.load(add_hi_ptr + n), 0.0)
    tl.store(grad_x_ptr + off, grad.to(grad_x_ptr.dtype.element_ty), mask=mask)


KERNELS = {
    "vertical_stats": vertical_stats,
    "ssim_rows": ssim_rows,
    "adjoint_rows": adjoint_rows,
    "adjoint_cols_grad": adjoint_cols_grad,
    "range_ties": range_ties,
}
