"""dev/benchmark_ssim.py: at tiny size every SSIM variant is checked against pytorch_msssim and
timed beside MSE (no timing asserts)."""

from conftest import REPO
from kd_det.utils.testing import run_script


def test_benchmark_ssim_smoke():
    args = ["--height", "64", "--width", "64", "--channels", "8", "--batch", "1", "--repeats", "1",
            "--warmup", "0", "--threads", "1"]  # fmt: skip
    proc = run_script(REPO, "dev/benchmark_ssim.py", args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "median s" in proc.stdout and "mse" in proc.stdout
    assert "differs from pytorch_msssim" not in proc.stdout
