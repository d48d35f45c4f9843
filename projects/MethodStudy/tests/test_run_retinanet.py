"""method_study.run_retinanet: the RetinaNet family's plan (equal budgets, configs that accept every
trial's options) and the runner end to end at tiny size."""

import json
from collections import Counter

import pytest

from kd_det.config import get_kd_cfg, validate_kd_config
from method_study import plan_retinanet as pr
from method_study import run_study
from method_study.testing import run_module


def test_every_family_gets_the_same_budget_from_its_papers_setting():
    trials = pr.dev_trials(1000)
    assert Counter(t.family for t in trials) == {f: 5 for f in pr.FAMILIES}
    assert len({t.key for t in trials}) == len(trials)
    first = {}
    for t in trials:
        first.setdefault(t.family, t)
    assert first["ssim"].name == "paper" and first["ssim"].opts == pr.SSIM_PAPER
    assert first["pkd"].opts[-1] == "[6.0]"  # mmrazor's FPN weight
    assert all(t.teacher for t in trials)
    finals = {f.name: f for f in pr.finals()}
    assert set(finals) == {"student", "ssim_paper"} | set(pr.FAMILIES)
    assert finals["ssim_paper"].reuses == "ssim/paper" and finals["student"].teacher is False


@pytest.mark.parametrize("trial", pr.dev_trials(1000), ids=lambda t: t.key)
def test_every_trial_merges_into_its_config_and_passes_validation(trial):
    """A misspelt key or an out-of-range value would stop a run hours into the study."""
    cfg = get_kd_cfg()
    cfg.merge_from_file(trial.config)
    cfg.merge_from_list(list(pr.student_opts(trial.config)) + list(trial.opts))
    validate_kd_config(cfg)
    assert cfg.MODEL.META_ARCHITECTURE == "DistillationRetinaNet"
    assert cfg.MODEL.FPN.OUT_CHANNELS == 64


def test_a_named_trial_final_is_kept_only_with_its_trial():
    """``--max-trials 1`` keeps ssim/paper; a subset without it drops ``ssim_paper`` rather than
    waiting forever for a trial that will not run."""
    args = run_study.parse_args(["--families", "ssim", "--max-trials", "1"])
    _, finals = run_study.select(args, run_study.QUICK, pr)
    assert {f.name for f in finals} == {"student", "ssim", "ssim_paper"}
    args = run_study.parse_args(["--families", "crosskd"])
    _, finals = run_study.select(args, run_study.QUICK, pr)
    assert {f.name for f in finals} == {"student", "crosskd"}


def test_run_retinanet_tiny(tmp_path):
    # One seed: seed 0 of every final here is a dev run or the student; later seeds train as in
    # the Faster R-CNN study (test_run_study.py).
    args = ["--output", tmp_path, "--preset", "quick", "--families", "ssim", "--max-trials", "1",
            "--seeds", "0", "--jobs", "2", "--opts", "MODEL.KD.TEACHER.MIN_AP", "0.0"]  # fmt: skip
    proc = run_module("run_retinanet", args, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.load(open(tmp_path / "results.json"))
    assert res["dev_sweep"]["ssim"]["pick"] == "paper"
    assert set(res["methods"]) == {"student", "ssim", "ssim_paper"}
    # Seed 0 of the paper's setting is its dev trial, evaluated on test.
    runs = res["methods"]["ssim_paper"]["runs"]
    assert [r["reused_dev_trial"] for r in runs] == ["ssim/paper"]
    assert all("AP" in r["test"] for m in res["methods"].values() for r in m["runs"])
    cfg = (tmp_path / "runs" / "dev" / "ssim" / "paper" / "seed0" / "config.yaml").read_text()
    assert "DistillationRetinaNet" in cfg and "OUT_CHANNELS: 64" in cfg
    teacher = (tmp_path / "runs" / "teacher" / "config.yaml").read_text()
    assert "META_ARCHITECTURE: RetinaNet" in teacher and "OUT_CHANNELS: 128" in teacher
    md = (tmp_path / "results.md").read_text()
    assert "teacher (RetinaNet Lite2-FPN)" in md and "the SSIM-KD paper's setting" in md


def test_step_cost_adds_up_every_run_of_the_plan():
    """Hours are seconds per step x runs x iterations; every run the plan trains is counted
    once (the seed 0 of a final that is a dev trial is not trained again)."""
    from method_study import step_cost

    preset = dict(run_study.FULL, image_size=384)
    fake = {}

    def timer(config, opts, size, batch, steps):
        assert (size, batch) == (384, 8)
        # Every run but the teacher is the study's student size.
        assert (opts[:2] == ["MODEL.FPN.OUT_CHANNELS", "64"]) == (config != pr.TEACHER)
        return fake.setdefault((config, tuple(opts)), 1.0 + len(fake))

    table = step_cost.estimate(step_cost.rows(pr, preset, 3), preset, timer=timer)
    by = {r["part"].split(" (")[0]: r for r in table}
    assert by["teacher"]["runs"] == 1 and by["teacher"]["iters"] == 3000
    assert by["final: student"]["runs"] == 3
    assert sum(r["runs"] for r in table) == 1 + 25 + 3 + 2 * 6
    for r in table:
        assert r["hours"] == pytest.approx(r["seconds"] * r["runs"] * r["iters"] / 3600)
    # A family is timed once: its sweep and its final cost the same per step.
    assert by["dev sweep: crosskd"]["seconds"] == by["final: crosskd"]["seconds"]
    assert "| total | 41 |" in step_cost.markdown(table, preset)


def test_step_cost_builds_and_steps_every_kind_of_run(tmp_path):
    from method_study import step_cost

    out = tmp_path / "cost.json"
    step_cost.main(["--plan", "retinanet", "--preset", "quick", "--steps", "1", "--output",
                    str(out)])  # fmt: skip
    rows = json.load(open(out))["rows"]
    assert len({r["config"] for r in rows}) == 5  # teacher, student, ssim/mse/pkd, head, crosskd
    assert all(r["seconds"] > 0 and r["config"].startswith("configs/Synthetic/") for r in rows)


def test_step_cost_of_the_ssim_window_study():
    """Issue 29's 256 px study: its own teacher, then every method with 3 seeds, each run at the
    study's student size (the committed diagnosis supplies its best SSIM variant)."""
    from method_study import plan, ssim_window, step_cost

    preset = dict(run_study.FULL, image_size=ssim_window.SIZE)
    table = step_cost.window_rows(preset, 3)
    names = [r["part"] for r in table]
    assert names[0] == "teacher" and table[0]["runs"] == 1 and table[0]["iters"] == 3000
    assert {"student", "mse", "ssim", "pkd", "ssim_best", "ssim_win11"} == set(names[1:])
    for r in table[1:]:
        assert r["runs"] == 3 and r["opts"][:4] == list(plan.STUDENT_SIZE)
    timed = step_cost.estimate(table, preset, timer=lambda c, o, size, b, s: float(size))
    assert timed[0]["hours"] == pytest.approx(256.0 * 3000 / 3600)
