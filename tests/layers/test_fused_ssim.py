"""Tests of kd_det.layers.fused_ssim: the Triton SSIM kernels, run on CPU tensors by the Triton
interpreter, against the reference SSIM (values and gradients, every window and option).

``TRITON_INTERPRET=1`` is set per test (``monkeypatch``), not for the session: the kernels are
jitted lazily, once per mode, at the first call under the current setting, so the order in which
modules were imported does not matter and no other test runs under the interpreter. Maps are tiny
(the interpreter runs programs one by one).
"""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the fused SSIM kernels cannot run")

from kd_det.layers import fused_ssim  # noqa: E402
from kd_det.layers.fused_ssim import fused_ssim_map, fused_ssim_sums  # noqa: E402
from kd_det.modeling.losses import SSIMFeatureLoss  # noqa: E402
from kd_det.modeling.losses.ssim import gaussian_window, ssim_map  # noqa: E402

SHAPE = (2, 3, 13, 17)
RTOL = 1e-5


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("KD_DET_SSIM_IMPL", raising=False)


def _pair(shape=SHAPE, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(shape, generator=gen) * 1.5 + 0.3
    student = 0.6 * teacher + 0.8 * torch.randn(shape, generator=gen)
    return student.to(dtype), teacher.to(dtype)


def _value_and_grad(loss, student, teacher, **kwargs):
    x = student.clone().requires_grad_()
    out = loss(x, teacher, **kwargs)
    # Different weights per image, so that the per-image gradients are checked separately.
    scale = torch.arange(1, out.numel() + 1, dtype=out.dtype).view(out.shape)
    (out * scale).sum().backward()
    return out.detach(), x.grad


def _assert_close(actual, expected, rtol=RTOL):
    """Relative to the largest magnitude: gradients have entries near zero."""
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rtol * expected.double().abs().max().item() + 1e-12, (err, expected)


def _compare(student, teacher, weight_map=None, per_image=False, **kwargs):
    fused = SSIMFeatureLoss(impl="fused", **kwargs)
    reference = SSIMFeatureLoss(impl="reference", **kwargs)
    assert fused.resolved_impl(student.device) == "fused"
    v_f, g_f = _value_and_grad(fused, student, teacher, weight_map=weight_map, per_image=per_image)
    v_r, g_r = _value_and_grad(
        reference, student, teacher, weight_map=weight_map, per_image=per_image
    )
    assert v_f.dtype == torch.float32 and g_f.dtype == student.dtype
    _assert_close(v_f, v_r)
    # Half-precision gradients are float32 values rounded once; float32 round-off can land them on
    # neighbouring half values, so they agree to the dtype's resolution.
    _assert_close(g_f, g_r, rtol=max(RTOL, torch.finfo(student.dtype).eps))
    return v_f, g_f


@pytest.mark.parametrize(
    "k, shape", [(3, SHAPE), (7, SHAPE), (11, SHAPE), (11, (1, 2, 11, 11)), (5, (2, 1, 22, 9))]
)
def test_map_matches_reference(k, shape):
    """The SSIM map itself (odd sizes, a map exactly the window's size, a tall one)."""
    student, teacher = _pair(shape)
    window = gaussian_window(k, 1.5)
    c1, c2 = (0.01 * 6.0) ** 2, (0.03 * 6.0) ** 2
    _assert_close(
        fused_ssim_map(student, teacher, window, c1, c2), ssim_map(student, teacher, 6.0, k)
    )


@pytest.mark.parametrize("win_size", [3, 7, 11])
def test_windows(win_size):
    _compare(*_pair(), win_size=win_size)


@pytest.mark.parametrize(
    "policy", ["teacher_absmax", "teacher_minmax", "minmax", "standardize", "none"]
)
def test_range_policies(policy):
    """The fused path applies the policy's affine map on load (``minmax``: the student's own range
    stays in autograd); each must give the reference's value and gradient."""
    _compare(*_pair(seed=1), range_policy=policy, data_range=6.0 if policy == "none" else None)


def test_minmax_student_range_with_ties_and_flat_images(monkeypatch):
    """``minmax`` normalizes the student by its own min/max, whose gradient the kernels add at the
    extreme pixels, spread over ties as ``amin``/``amax`` do: ReLU maps tie at 0, two pixels tie
    at the maximum, and the second image's range is below ``eps`` (no gradient through it)."""
    student, teacher = _pair((2, 3, 13, 17), seed=10)
    student = torch.relu(student)
    student[0, 1, 3, 4] = student[0, 2, 5, 6] = student[0].max() + 1.0
    student[1] = 0.5 + 1e-4 * student[1]
    _compare(student, teacher, range_policy="minmax", win_size=5)
    # several chunks: the per-image sums of the range gradient span chunks
    monkeypatch.setattr(fused_ssim, "SCRATCH_BYTES", 2 * 8 * 9 * 17 * 4)
    _compare(student, teacher, range_policy="minmax", win_size=5, per_image=True)


@pytest.mark.parametrize("per_image", [False, True])
def test_weight_map(per_image):
    student, teacher = _pair(seed=2)
    gen = torch.Generator().manual_seed(3)
    weight = torch.rand(SHAPE[0], 1, *SHAPE[2:], generator=gen)
    weight[weight < 0.4] = 0.0
    weight[1, :, :, 7:] = 0.0  # an image with weight only near the border
    _compare(student, teacher, weight_map=weight, per_image=per_image, win_size=7)


def test_zero_weight_image_gives_zero_not_nan():
    student, teacher = _pair(seed=2)
    weight = torch.ones(SHAPE[0], 1, *SHAPE[2:])
    weight[0] = 0.0
    value, grad = _compare(student, teacher, weight_map=weight, per_image=True, win_size=7)
    assert value[0] == 0.0 and torch.isfinite(grad).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(loss_form="(1-ssim)/2", per_image=True),
        dict(win_sigma=0.8, K=(0.02, 0.05), range_policy="none", data_range=2.0),
    ],
)
def test_options(kwargs):
    per_image = kwargs.pop("per_image", False)
    _compare(*_pair(seed=4), per_image=per_image, **kwargs)


@pytest.mark.parametrize("rule, shape", [("shrink", (2, 3, 6, 9)), ("shrink", (2, 3, 4, 5))])
def test_small_maps_shrink_the_window(rule, shape):
    """The window choice stays in SSIMFeatureLoss: 6x9 gets a 5-pixel window, 4x5 a 3-pixel one."""
    _compare(*_pair(shape, seed=5), small_map=rule)


@pytest.mark.parametrize("rule, shape", [("shrink", (2, 3, 2, 8)), ("skip", (2, 3, 8, 8))])
def test_skipped_levels_give_an_attached_zero(rule, shape):
    student, teacher = _pair(shape, seed=5)
    student.requires_grad_()
    out = SSIMFeatureLoss(impl="fused", small_map=rule)(student, teacher)
    out.backward()
    assert out.item() == 0.0 and torch.equal(student.grad, torch.zeros_like(student))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    """Half inputs are read as they are and accumulated in float32: the same value as the reference
    on the same half inputs, close to float32 inputs, and a gradient in the input's dtype."""
    student, teacher = _pair(seed=6, dtype=dtype)
    value, grad = _compare(student, teacher, win_size=7)
    assert torch.isfinite(value).all() and torch.isfinite(grad.float()).all()
    value32, _ = _value_and_grad(SSIMFeatureLoss(impl="fused", win_size=7), *_pair(seed=6))
    assert abs(value.item() - value32.item()) < 1e-2 * abs(value32.item())
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under_autocast, _ = _value_and_grad(SSIMFeatureLoss(impl="fused", win_size=7), *_pair())
    assert under_autocast.dtype == torch.float32 and torch.isfinite(under_autocast)


def test_chunks_of_planes_give_the_same_result(monkeypatch):
    """A small scratch budget splits the planes into chunks (the last one shorter)."""
    student, teacher = _pair((3, 3, 13, 17), seed=7)
    window = gaussian_window(7, 1.5)
    x = student.clone().requires_grad_()
    whole = fused_ssim_sums(x, teacher, window, 1e-4, 9e-4)
    whole.sum().backward()
    grad = x.grad.clone()
    x.grad = None
    monkeypatch.setattr(fused_ssim, "SCRATCH_BYTES", 2 * 8 * 7 * 17 * 4)  # 2 planes per chunk
    chunked = fused_ssim_sums(x, teacher, window, 1e-4, 9e-4)
    chunked.sum().backward()
    _assert_close(chunked, whole, rtol=1e-6)
    _assert_close(x.grad, grad, rtol=1e-6)


def test_teacher_gets_no_gradient_and_inputs_are_checked():
    student, teacher = _pair(seed=8)
    teacher.requires_grad_()
    x = student.clone().requires_grad_()
    SSIMFeatureLoss(impl="fused")(x, teacher).backward()
    assert teacher.grad is None and x.grad is not None
    window = gaussian_window(5, 1.5)
    with pytest.raises(ValueError, match="smaller than"):
        fused_ssim_sums(student[..., :4], teacher[..., :4], window, 1e-4, 9e-4)
    with pytest.raises(ValueError, match="reads"):
        fused_ssim_sums(student.double(), teacher.double(), window, 1e-4, 9e-4)
    with pytest.raises(ValueError, match="weight"):
        fused_ssim_sums(student, teacher, window, 1e-4, 9e-4, weight=torch.ones(2, 1, 13, 17))


def test_needs_the_interpreter_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    student, teacher = _pair()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fused_ssim_sums(student, teacher, gaussian_window(3, 1.5), 1e-4, 9e-4)
    with pytest.raises(RuntimeError, match="MODEL.KD.SSIM.IMPL"):
        SSIMFeatureLoss(impl="fused")(student, teacher)


def test_kernels_call_only_triton_builtins():
    """``triton.language``'s ``@jit`` library functions (``tl.zeros``, ``tl.sum``, ...) are bound to
    the mode triton was imported in: used in a kernel, they would break the interpreter whenever
    triton was imported before ``TRITON_INTERPRET=1`` was set (always the case under pytest)."""
    import ast
    import inspect

    import triton.language as tl
    from triton.runtime.jit import JITFunction

    from kd_det.layers import _fused_ssim_kernels as kernels

    names = {
        node.attr
        for node in ast.walk(ast.parse(inspect.getsource(kernels)))
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "tl"
    }
    assert {"load", "store", "reduce"} <= names
    jitted = sorted(n for n in names if isinstance(getattr(tl, n, None), JITFunction))
    assert not jitted, f"use builtins instead of {jitted}"


def test_kernels_compile_for_sm90_without_a_gpu(monkeypatch):
    """The interpreter does not type-check like the compiler: compile every kernel variant to an
    H200 (sm_90) cubin on this CPU (Triton's frontend, LLVM and its bundled ptxas need no GPU)."""
    monkeypatch.delenv("TRITON_INTERPRET")
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as err:  # pragma: no cover - depends on the triton build
        pytest.skip(f"this triton cannot compile ahead of time: {err}")
    from kd_det.layers import _fused_ssim_kernels as kernels

    def build(name, pointers, consts):
        raw = kernels.KERNELS[name]
        args = raw.__code__.co_varnames[: raw.__code__.co_argcount]
        sig = {a: "constexpr" if a in consts else pointers.get(a, "i32") for a in args}
        sig.update({a: "fp32" for a in ("c1", "c2") if a in sig})
        try:
            src = ASTSource(triton.jit(raw), sig, consts)
        except TypeError as err:  # pragma: no cover - another triton API
            pytest.skip(f"unexpected triton.compiler.ASTSource API: {err}")
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
        assert "cubin" in compiled.asm

    f32 = "*fp32"
    tile = dict(K=11, BH=16, BW=64)
    io = ("shift_x_ptr", "inv_x_ptr", "shift_y_ptr", "inv_y_ptr", "win_ptr", "stats_ptr")
    build("vertical_stats", dict({a: f32 for a in io}, x_ptr="*bf16", y_ptr="*fp16"), tile)
    rows = {a: f32 for a in ("stats_ptr", "win_ptr", "weight_ptr", "grad_ptr", "out_ptr")}
    for mode in (0, 1, 2):
        build("ssim_rows", rows, dict(tile, HAS_WEIGHT=mode < 2, MODE=mode))
    build("adjoint_rows", {a: f32 for a in ("coef_ptr", "win_ptr", "stats_ptr")}, tile)
    grad = dict({a: f32 for a in io}, x_ptr="*fp16", y_ptr="*fp16", grad_x_ptr="*fp16")
    grad.update(sum_g_ptr=f32, sum_gs_ptr=f32)
    build("adjoint_cols_grad", grad, dict(tile, RANGE_SUMS=True))
    ties = {a: f32 for a in ("lo_ptr", "hi_ptr", "add_lo_ptr", "add_hi_ptr")}
    build("range_ties", dict(ties, x_ptr="*bf16", grad_x_ptr="*bf16"), dict(BH=16, BW=64))


def test_under_torch_compile():
    """The Triton launches stay out of the graph (``torch.compiler.disable``); the range policy and
    the reduction around them are traced. ``aot_eager`` keeps this test fast; the inductor case
    of the reference path is in tests/modeling/losses/test_ssim_loss.py."""
    student, teacher = _pair(seed=9)
    weight = torch.ones(SHAPE[0], 1, *SHAPE[2:])
    compiled = torch.compile(SSIMFeatureLoss(impl="fused", win_size=7), backend="aot_eager")
    value, grad = _value_and_grad(compiled, student, teacher, weight_map=weight, per_image=True)
    expected = _value_and_grad(
        SSIMFeatureLoss(impl="fused", win_size=7),
        student,
        teacher,
        weight_map=weight,
        per_image=True,
    )
    _assert_close(value, expected[0], rtol=1e-6)
    _assert_close(grad, expected[1], rtol=1e-6)


def test_benchmark_routine_runs_on_cpu(tmp_path):
    """``dev/benchmark_ssim.py --fused-vs-reference`` (the GPU measurement of the issue's targets)
    at tiny size under the interpreter: every row is timed, the checks pass, nothing is skipped."""
    import json
    import os

    from kd_det.utils.testing import run_script

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out_file = tmp_path / "fused.json"
    args = ["--fused-vs-reference", "--device", "cpu", "--batch", "1", "--height", "48",
            "--width", "64", "--channels", "2", "--repeats", "1", "--warmup", "0",
            "--output", str(out_file)]  # fmt: skip
    proc = run_script(repo, "dev/benchmark_ssim.py", args, env={"TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(out_file.read_text())
    assert out["skipped"] == {} and len(out["shapes"]) == 5
    assert set(out["timing"]) == {"mse"} | {
        f"ssim {impl} {policy}"
        for impl in ("reference", "fused")
        for policy in ("teacher_absmax", "minmax")
    }
    for checks in out["checks"].values():
        assert checks["fp32"]["ok"], checks
        assert all(c["finite"] for name, c in checks.items() if name != "fp32")
