"""method_study.export_tuned_configs: the study's picks become configs that load in detectron2 and
set exactly the picked values on top of the shipped config."""

import json

from kd_det.config import get_kd_cfg
from method_study import export_tuned_configs as tool
from method_study import plan

SSIM_OPTS = [
    "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.ROI_BOX_HEAD.FC_DIM", "256",
    "MODEL.KD.FEATURE.LOSS", "ssim", "MODEL.KD.SSIM.WINDOW_SIZE", "7",
    "MODEL.KD.SSIM.LOSS_FORM", "(1-ssim)/2", "MODEL.KD.FEATURE.WEIGHTS", "[3.0]",
    "MODEL.KD.FEATURE.ADAPTER", "always",
]  # fmt: skip
MIX_OPTS = ["INPUT.MIX.ENABLED", "True", "INPUT.MIX.TYPE", "cutnmix", "INPUT.MIX.PROB", "0.25",
            "INPUT.MIX.CLEAN_TAIL", "0.15"]  # fmt: skip
ONLINE_OPTS = ["MODEL.ONLINE_KD.PEER_OPTS", "['MODEL.FPN.OUT_CHANNELS', '64']",
               "MODEL.ONLINE_KD.LOGIT_WEIGHT", "0.1",
               "MODEL.ONLINE_KD.EMA_WARMUP", "500"]  # fmt: skip


def _run(label, opts, aps):
    return {"label": label, "runs": [{"opts": opts, "test": {"AP": a}, "dev": {"AP": a + 1}}
                                     for a in aps]}  # fmt: skip


def test_tuned_configs_load_and_set_the_picks(tmp_path):
    results = {"preset": {"iters": 1000}, "methods": {
        "ssim": _run("+ SSIM hints (tuned)", SSIM_OPTS, [30.0, 32.0]),
        "mix": _run("student + mixing", MIX_OPTS, [28.0]),
        "online": _run("online", ONLINE_OPTS, [29.0]),
        "student": _run("student alone", [], [27.0]),
    }}  # fmt: skip
    # The SSIM runs' metrics: 10 rows, detection losses 1.0, distillation terms 1.0 over the
    # first half and 3.0 over the second: ratio 1 in the first tenth, 3 in the last.
    for r, out in zip(results["methods"]["ssim"]["runs"], ("runs/a", "runs/b")):
        r["out"] = out
        (tmp_path / out).mkdir(parents=True)
        rows = [{"iteration": i, "loss_cls": 0.6, "loss_box_reg": 0.4,
                 "loss_kd_fpn_p2": 1.0 if i < 5 else 3.0} for i in range(10)]  # fmt: skip
        (tmp_path / out / "metrics.json").write_text("\n".join(map(json.dumps, rows)) + "\n")
    study = tmp_path / "results.json"
    study.write_text(json.dumps(results))
    out = tmp_path / "tuned"
    tool.main(["--study", str(study), "--output", str(out)])

    cfg = get_kd_cfg()
    cfg.merge_from_file(str(out / "ssim.yaml"))
    assert cfg.MODEL.META_ARCHITECTURE == "DistillationRCNN"  # from the shipped base config
    assert cfg.MODEL.FPN.OUT_CHANNELS == 64 and cfg.MODEL.KD.SSIM.WINDOW_SIZE == 7
    assert cfg.MODEL.KD.SSIM.LOSS_FORM == "(1-ssim)/2" and cfg.MODEL.KD.FEATURE.WEIGHTS == [3.0]
    cfg = get_kd_cfg()
    cfg.merge_from_file(str(out / "mix.yaml"))
    assert cfg.INPUT.MIX.ENABLED is True and cfg.INPUT.MIX.TYPE == "cutnmix"
    assert cfg.INPUT.MIX.PROB == 0.25 and cfg.INPUT.MIX.CLEAN_TAIL == 0.15
    cfg = get_kd_cfg()
    cfg.merge_from_file(str(out / "online.yaml"))
    assert list(cfg.MODEL.ONLINE_KD.PEER_OPTS) == ["MODEL.FPN.OUT_CHANNELS", "64"]
    assert cfg.MODEL.ONLINE_KD.LOGIT_WEIGHT == 0.1
    # The EMA teacher started half-way through the study's 1000 iterations: half-way through the
    # config's own 300 (Base-Synthetic.yaml), not at 500, after its end.
    assert cfg.SOLVER.MAX_ITER == 300 and cfg.MODEL.ONLINE_KD.EMA_WARMUP == 150
    assert "scaled to this config's SOLVER.MAX_ITER (300)" in (out / "online.yaml").read_text()
    table = (out / "README.md").read_text()
    assert "| + SSIM hints (tuned) | `" in table and "| 1.00 / 3.00 |" in table
    assert "| n/a / n/a |" in table  # mixing: no run directory to read a ratio from
    assert "`MODEL.KD.SSIM.WINDOW_SIZE 7`" in table
    # Test results are stated once, in the study's README, which the table and configs link.
    assert "projects/MethodStudy/README.md" in table and "test AP |" not in table
    assert "test results: projects/MethodStudy/README.md" in (out / "ssim.yaml").read_text()
    # Ranked by mean dev AP (33, 30, 29), the student alone excluded.
    ranked = json.loads((out / "ranking.json").read_text())
    assert [r["method"] for r in ranked] == ["ssim", "online", "mix"]
    assert ranked[0]["dev_AP"] == 32.0 and ranked[0]["test_AP"] == 31.0
    assert "Partial" not in table  # no run counts given: nothing to call partial

    # A study still running says so under the table.
    study.write_text(json.dumps(dict(results, finished_runs=5, expected_runs=12)))
    tool.main(["--study", str(study), "--output", str(out)])
    assert "**Partial**: 5 of the study's 12 final runs" in (out / "README.md").read_text()


def test_setup_keys_are_not_part_of_a_tuned_setting():
    got = tool.nested(["SEED", "3", "DATASETS.TRAIN", "('x',)", "MODEL.KD.TEACHER.WEIGHTS", "t.pth",
                       "MODEL.KD.FEATURE.WEIGHTS", "[1.0]"])  # fmt: skip
    assert got == {"MODEL": {"KD": {"FEATURE": {"WEIGHTS": [1.0]}}}}


def test_settings_column_lists_each_key_once_with_the_value_trained():
    # The SSIM paper's window 11, then the trial's 7. The shipped SSIM config already has LOSS
    # ssim and FEATURE.WEIGHTS [1.0] (configs/Synthetic/distill_lite2_to_lite0_ssim.yaml).
    opts = ["MODEL.KD.FEATURE.LOSS", "ssim", "MODEL.KD.SSIM.WINDOW_SIZE", "11",
            "MODEL.KD.FEATURE.WEIGHTS", "[3.0]", "SEED", "0",
            "MODEL.KD.SSIM.WINDOW_SIZE", "7"]  # fmt: skip
    got = tool.beyond_base(opts, plan.KD)
    assert got == [("MODEL.KD.SSIM.WINDOW_SIZE", "7"), ("MODEL.KD.FEATURE.WEIGHTS", "[3.0]")]
    assert tool.beyond_base(["MODEL.KD.FEATURE.WEIGHTS", "[1.0]"], plan.KD) == []


def test_loss_ratios_come_from_the_ledger_or_the_previous_table(tmp_path):
    """A fresh clone has no run directories: the ratio comes from the run's ledger record
    (results.json), else the earlier table's cell is kept, never replaced by n/a."""
    results = {"preset": {"iters": 1000}, "methods": {
        "ssim": _run("+ SSIM hints (tuned)", SSIM_OPTS, [30.0, 32.0]),
        "mix": _run("student + mixing", MIX_OPTS, [28.0]),
    }}  # fmt: skip
    for r, ratio in zip(results["methods"]["ssim"]["runs"], ([1.0, 2.0], [3.0, 4.0])):
        r["out"], r["kd_detection_ratio"] = "runs/gone", ratio
    study, out = tmp_path / "results.json", tmp_path / "tuned"
    study.write_text(json.dumps(results))
    tool.main(["--study", str(study), "--output", str(out)])
    assert "| 2.00 / 3.00 |" in (out / "README.md").read_text()  # means over the runs
    for r in results["methods"]["ssim"]["runs"]:
        del r["kd_detection_ratio"]  # restored from a results.json without ratios
    study.write_text(json.dumps(results))
    tool.main(["--study", str(study), "--output", str(out)])
    table = (out / "README.md").read_text()
    assert "| 2.00 / 3.00 |" in table and "| n/a / n/a |" in table
