"""tools/visualize_mix.py draws what the model is fed, one PNG per sample."""

import cv2

from conftest import REPO
from kd_det.utils.testing import run_tool


def test_visualize_mix_tool(synthetic_root, tmp_path):
    for mix_type in ("cutnmix", "mosaic"):
        out = tmp_path / mix_type
        args = ["--num", "2", "--output", out, "--type", mix_type, "--dataset-root", synthetic_root,
                "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96"]  # fmt: skip
        proc = run_tool(REPO, "visualize_mix.py", args, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        pngs = sorted(p.name for p in out.iterdir())
        assert pngs == [f"000_{mix_type}.png", f"001_{mix_type}.png"]
        assert cv2.imread(str(out / pngs[0])).shape[:2] == (64, 64)
