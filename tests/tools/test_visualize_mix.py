"""tools/visualize_mix.py draws what the model is fed, one PNG per sample."""

import os

import cv2

from conftest import REPO
from kd_det.utils.testing import load_tool


def test_visualize_mix_tool(synthetic_root, tmp_path):
    tool = load_tool(REPO, "visualize_mix.py")
    for mix_type in ("cutnmix", "mosaic"):
        out = tmp_path / mix_type
        tool.main(
            [
                "--num",
                "2",
                "--output",
                str(out),
                "--type",
                mix_type,
                "--dataset-root",
                synthetic_root,
            ]
            + ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96"]
        )
        pngs = sorted(os.listdir(out))
        assert pngs == [f"000_{mix_type}.png", f"001_{mix_type}.png"]
        assert cv2.imread(str(out / pngs[0])).shape[:2] == (64, 64)
