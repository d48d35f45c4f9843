"""tools/plot_hint_weights.py: reads hint-weight series from metrics.json (a truncated last line
included) and draws them; a run without them is named."""

import json
import math

from conftest import REPO
from kd_det.utils.testing import run_tool


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
    out = tmp_path / "weights.png"
    proc = run_tool(REPO, "plot_hint_weights.py", ["--metrics", metrics, "--output", out], 120)
    assert proc.returncode == 0, proc.stderr
    assert f"Wrote {out} (2 hints)." in proc.stdout  # fpn_p2 and fpn_p3
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"iteration": 0, "total_loss": 1.0}) + "\n")
    proc = run_tool(REPO, "plot_hint_weights.py", ["--metrics", plain, "--output", out], 120)
    assert proc.returncode == 1 and "No hint_weight/* scalars" in proc.stderr
