"""method_study.ssim_diagnosis: its variants are the study's picks changed one factor at a time,
its helpers (matched weight, which variants go to test, per-level losses over training), and the
whole driver end to end at tiny size, reusing everything on a second call."""

import json

import pytest

from method_study import RESULTS, ledger, plan
from method_study import ssim_diagnosis as diag
from method_study.testing import run_module


def _study_opts(trial):
    rec = ledger.load(f"{RESULTS}/ledger/dev/{trial}/seed0.json")
    return rec["params"]["opts"][len(plan.STUDENT_SIZE) :]


@pytest.mark.parametrize("name, trial", [("tuned", "ssim/win7"), ("pkd", "pkd/w12.0"),
                                         ("mse", "mse/w3.0")])  # fmt: skip
def test_references_are_the_study_picks_option_for_option(name, trial):
    """Same options -> same parameters -> the study's dev AP must reproduce (the report checks)."""
    assert list(diag.BY_NAME[name].opts) == _study_opts(trial)
    assert diag.BY_NAME[name].study_trial == trial


def test_each_variant_changes_one_factor_of_the_tuned_setting():
    base = list(diag.TUNED_SSIM)
    for v in diag.VARIANTS:
        if v.factor == "reference":
            continue
        if v.factor == "control":  # MSE's pick with only its weight changed, the same way
            assert list(v.opts) == list(diag.MSE) + ["MODEL.KD.FEATURE.WEIGHTS", diag.MATCHED]
            assert v.ratio_of == "mse" and diag.BY_NAME["mse"].opts == diag.MSE
            continue
        assert list(v.opts[: len(base)]) == base, v.name
        extra = v.opts[len(base) :]
        keys = {extra[i] for i in range(0, len(extra), 2)}
        if v.name == "on_pkd":
            assert "MODEL.KD.FEATURE_SUM.LOSSES" in keys
        else:
            assert len(keys) == 1, v.name


def test_matched_weight_and_expand():
    assert diag.matched_weight(1.5, 9.776) == 20.0
    assert diag.matched_weight(2.0, 9.776) == 15.0
    v = diag.BY_NAME["ratio_pkd"]
    assert diag.expand(v) is None
    assert diag.expand(v, 20.0)[-2:] == ["MODEL.KD.FEATURE.WEIGHTS", "[20.0]"]
    assert diag.expand(diag.BY_NAME["p2"]) == list(diag.BY_NAME["p2"].opts)


def test_test_variants_rule():
    dev = {"tuned": 31.9, "p2": 32.5, "p2_p3": 31.0, "structure": 33.0, "standardize": 32.0,
           "on_pkd": 36.0, "pkd": 35.7, "mse": 31.5}  # fmt: skip
    assert diag.test_variants(dev) == ["structure", "p2", "on_pkd"]
    # Nothing above tuned: still the best SSIM variant (the "best SSIM setting" for later parts).
    dev = {"tuned": 31.9, "p2": 30.0, "structure": 29.0, "on_pkd": 35.0, "pkd": 35.7}
    assert diag.test_variants(dev) == ["p2"]
    # The MSE control goes to test beside the balanced SSIM, and only then.
    dev = {"tuned": 31.9, "ratio_pkd": 34.8, "p2": 32.3, "mse_ratio_pkd": 33.0, "pkd": 35.7}
    assert diag.test_variants(dev) == ["ratio_pkd", "p2", "mse_ratio_pkd"]
    dev["p2"] = 35.0
    assert diag.test_variants(dev, max_ssim=1) == ["p2"]


def test_kd_terms_averages_each_tenth(tmp_path):
    rows = []
    for it in range(100):
        rows.append({"iteration": it, "loss_cls": 1.0, "loss_box_reg": 1.0,
                     "loss_kd_fpn_p2": 0.1 * (it // 10), "loss_kd_fpn_p3": 0.5})  # fmt: skip
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    t = diag.kd_terms(str(tmp_path))
    assert t["iteration"] == list(range(10, 101, 10))
    assert t["terms"]["loss_kd_fpn_p2"] == pytest.approx([0.1 * i for i in range(10)])
    assert t["detection"] == pytest.approx([2.0] * 10)
    assert t["ratio"] == pytest.approx([(0.1 * i + 0.5) / 2.0 for i in range(10)])
    assert diag.kd_terms(str(tmp_path / "missing")) is None


def test_diagnosis_tiny(tmp_path):
    study, out = tmp_path / "study", tmp_path / "diag"
    no_check = ["--opts", "MODEL.KD.TEACHER.MIN_AP", "0.0"]
    proc = run_module("run_study", ["--output", study, "--preset", "quick", "--families", "ssim",
                                    "--max-trials", "1", "--seeds", "0"] + no_check,
                      timeout=1200)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = [
        "--study",
        study,
        "--output",
        out,
        "--preset",
        "quick",
        "--variants",
        "tuned",
        "structure",
        "on_pkd",
        "--test-variants",
        "structure",
        "--seeds",
        "0",
        "1",
    ] + no_check
    proc = run_module("ssim_diagnosis", args, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["variants"]) == {"tuned", "structure", "on_pkd"}
    for e in res["variants"].values():
        assert e["kd_terms"]["terms"]["loss_kd_fpn_p2"], e  # per-level losses recorded
        assert e["out"].startswith("runs/dev/")
    # The study's own teacher and data: no second teacher in the diagnosis's output.
    assert not (out / "runs" / "teacher").exists() and not (out / "data").exists()
    assert [r["seed"] for r in res["test"]["structure"]] == [0, 1]
    assert all("AP" in r["test"] for r in res["test"]["structure"])
    md = (out / "results.md").read_text()
    assert "structure term alone (`structure`)" in md and "## On test" in md
    assert "test seeds evaluated" not in md  # both seeds asked for were settled
    assert (out / "kd_terms.png").stat().st_size > 0
    assert (out / "ledger" / "final" / "structure" / "seed1.json").exists()
    again = run_module("ssim_diagnosis", args, timeout=1200)
    assert again.returncode == 0, again.stderr[-3000:]
    assert ": training; log in" not in again.stdout and ": resuming; log in" not in again.stdout
    # A call for one variant trains only that one and reports every finished one.
    one_args = args[:6] + ["--variants", "p2", "--test-variants", "structure", "--seeds", "0", "1"]
    one = run_module("ssim_diagnosis", one_args + no_check, timeout=1200)
    assert one.returncode == 0, one.stderr[-3000:]
    assert one.stdout.count(": training; log in") == 1 and "p2/seed0: training" in one.stdout
    assert set(json.loads((out / "results.json").read_text())["variants"]) == {
        "tuned", "structure", "on_pkd", "p2"}  # fmt: skip
    # Settling one more variant on test keeps the ones settled before (reused, not retrained);
    # the report had been refused for holding fewer runs than the committed one.
    p2_args = args[:6] + ["--variants", "p2", "--test-variants", "p2", "--seeds", "0", "1"]
    p2 = run_module("ssim_diagnosis", p2_args + no_check, timeout=1200)
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert p2.stdout.count(": training; log in") == 1 and "p2/seed1: training" in p2.stdout
    settled = json.loads((out / "results.json").read_text())["test"]
    assert {n: len(s) for n, s in settled.items()} == {"p2": 2, "structure": 2}
    # The probe opens the trained models: one row per distilled level that fits a window.
    probe = run_module("ssim_probe", ["--diagnosis", out, "--runs", "tuned", "on_pkd",
                                      "--images", "2", "--output", out / "probe.md"])  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-3000:]
    rows = [r for r in (out / "probe.md").read_text().splitlines() if r.startswith("| `")]
    assert {r.split("|")[1].strip() for r in rows} == {"`tuned`", "`on_pkd`"}


def test_ssim_window_tiny(tmp_path):
    """Part 2's driver: its own teacher and data at its size, student seeds first, the regime
    gate (a 2-iteration teacher fails it), then with --ignore-regime the SSIM runs, reused next
    time."""
    out = tmp_path / "win"
    base = ["--output", out, "--preset", "quick", "--image-size", "64", "--diagnosis",
            tmp_path / "none.json", "--methods", "student", "ssim", "--seeds", "0", "1",
            "--opts", "MODEL.KD.TEACHER.MIN_AP", "0.0"]  # fmt: skip
    proc = run_module("ssim_window", base, timeout=1200)
    assert proc.returncode != 0 and "regime check failed" in proc.stderr, proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert len(res["methods"]["student"]["runs"]) == 2 and not res["methods"]["ssim"]["runs"]
    assert "NOT met" in (out / "results.md").read_text()
    proc = run_module("ssim_window", base + ["--ignore-regime"], timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert [r["seed"] for r in res["methods"]["ssim"]["runs"]] == [0, 1]
    assert all("AP" in r["test"] for r in res["methods"]["ssim"]["runs"])
    assert res["preset"]["image_size"] == 64 and (out / "runs" / "teacher").exists()
    md = (out / "results.md").read_text()
    assert "Partial" not in md and "Regime checks" in md and "Cost" in md
    again = run_module("ssim_window", base + ["--ignore-regime"], timeout=1200)
    assert ": training; log in" not in again.stdout and ": resuming; log in" not in again.stdout


def test_best_variant_prefers_test_then_dev(tmp_path):
    from method_study import ssim_window as win

    path = tmp_path / "r.json"
    res = {"variants": {"tuned": {"dev": {"AP": 31.9}, "opts": ["a"]},
                        "p2": {"dev": {"AP": 33.0}, "opts": ["b"]},
                        "structure": {"dev": {"AP": 32.0}, "opts": ["c"]},
                        "on_pkd": {"dev": {"AP": 36.0}, "opts": ["d"]}},
           "test": {}}  # fmt: skip
    path.write_text(json.dumps(res))
    assert win.best_variant(str(path)) == ("p2", ["b"])  # by dev, SSIM-only variants
    res["test"] = {"p2": [{"test": {"AP": 30.0}}], "structure": [{"test": {"AP": 31.0}}]}
    path.write_text(json.dumps(res))
    assert win.best_variant(str(path)) == ("structure", ["c"])
    assert win.best_variant(str(tmp_path / "missing.json")) == (None, None)
    names = [m.name for m in win.methods("structure", ["c"])]
    assert names == ["student", "mse", "ssim", "pkd", "ssim_best", "ssim_win11"]
    jobs = win.order(win.methods(None, None), [0, 1])
    assert jobs[:3] == [("student", 0), ("student", 1), ("mse", 0)]


def test_generalization_takes_diagnosis_variants(tmp_path):
    from method_study import run_generalization as gen

    path = tmp_path / "r.json"
    opts = list(diag.BY_NAME["structure"].opts)
    path.write_text(json.dumps({"variants": {"structure": {"dev": {"AP": 33.0}, "opts": opts},
                                             "tuned": {"dev": {"AP": 31.9}, "opts": ["x"]}},
                                "test": {}}))  # fmt: skip
    names, specs = gen.diagnosis_methods(["multilevel", "ssim_best", "pkd"], str(path))
    assert names == ["multilevel", "ssim_structure", "pkd"] and set(specs) == {"ssim_structure"}
    spec = specs["ssim_structure"]
    assert list(spec.opts) == list(plan.STUDENT_SIZE) + opts and spec.teacher
    assert "structure term alone" in spec.label
    assert gen.diagnosis_methods(["pkd"], str(tmp_path / "none.json")) == (["pkd"], {})


def test_probe_terms_multiply_to_ssim():
    import torch

    from kd_det.modeling.losses import SSIMFeatureLoss, ssim_map
    from method_study.ssim_probe import terms

    g = torch.Generator().manual_seed(0)
    t = torch.rand(2, 3, 16, 16, generator=g)
    s = 0.5 * t + 0.3 * torch.rand(2, 3, 16, 16, generator=g)
    loss = SSIMFeatureLoss(win_size=7, range_policy="minmax")
    r = terms(s, t, loss)
    torch.testing.assert_close(r["l"] * r["c"] * r["s"], ssim_map(s, t, 1.0, 7), atol=1e-5, rtol=0)
    torch.testing.assert_close(r["s"], ssim_map(s, t, 1.0, 7, terms="structure"), atol=1e-5,
                               rtol=0)  # fmt: skip
    assert r["window"] == 7 and terms(s[..., :2, :2], t[..., :2, :2], loss) is None


def test_balanced_ssim_config_is_the_settled_diagnosis_run():
    """configs/Synthetic/distill_lite2_to_lite0_ssim_balanced.yaml, which the docs recommend, is
    the diagnosis's matched-weight run that was settled on test: the same config once its
    recorded options are applied to the study's SSIM base config."""
    import os

    from kd_det.config import get_kd_cfg

    from method_study import REPO

    with open(os.path.join(RESULTS, "ssim_diagnosis", "results.json")) as f:
        res = json.load(f)
    assert "ratio_pkd" in res["test"], "the recommended setting must have test results"
    configs = os.path.join(REPO, "configs", "Synthetic")
    shipped = get_kd_cfg()
    shipped.merge_from_file(os.path.join(configs, "distill_lite2_to_lite0_ssim_balanced.yaml"))
    run = get_kd_cfg()
    run.merge_from_file(os.path.join(configs, "distill_lite2_to_lite0_ssim.yaml"))
    run.merge_from_list(list(plan.STUDENT_SIZE) + res["variants"]["ratio_pkd"]["opts"])
    assert shipped.MODEL == run.MODEL
    assert list(shipped.MODEL.KD.FEATURE.WEIGHTS) == [res["matched_weight"]]
