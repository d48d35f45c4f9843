"""tools/plot_hint_weights.py: reads hint-weight series from metrics.json (a truncated last line
included) and draws them."""

import json
import math

from conftest import REPO
from kd_det.utils.testing import load_tool


def test_plot_tool_writes_png(tmp_path):
    metrics = tmp_path / "metrics.json"
    rows = []
    for it in range(0, 60, 20):
        row = {"iteration": it, "total_loss": 1.0}
        for j, hint in enumerate(("fpn_p2", "fpn_p3")):
            row[f"hint_weight/{hint}/mean"] = 1.0 + (-1) ** j * it / 100
            row[f"hint_weight/{hint}/std"] = 0.1
            row[f"hint_agreement/{hint}"] = math.sin(it + j)
        rows.append(json.dumps(row))
    metrics.write_text("\n".join(rows) + "\n{truncated")
    tool = load_tool(REPO, "plot_hint_weights.py")
    series = tool.load_hint_series(str(metrics))
    assert set(series) == {"fpn_p2", "fpn_p3"} and len(series["fpn_p2"]["mean"]) == 3
    out = tmp_path / "weights.png"
    assert tool.main(["--metrics", str(metrics), "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
