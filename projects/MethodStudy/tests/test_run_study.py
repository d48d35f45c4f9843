"""method_study.run_study end to end at tiny size: dev sweep, picks, finals on test, reports,
resume."""

import json

from method_study import plan, report
from method_study import run_generalization as gen
from method_study import verdicts as v
from method_study.testing import run_module

ARGS = [
    "--preset", "quick", "--families", "ssim", "mix", "--max-trials", "2", "--seeds", "0", "1",
    "--jobs", "2",
    # A 2-iteration teacher is useless: the teacher check would rightly stop its students.
    "--opts", "MODEL.KD.TEACHER.MIN_AP", "0.0",
]  # fmt: skip


def _study(tmp_path, args, ok=True):
    proc = run_module("run_study", ["--output", tmp_path] + list(args), timeout=1200)
    assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
    return proc


def test_run_study_tiny(tmp_path):
    _study(tmp_path, ARGS)
    res = json.load(open(tmp_path / "results.json"))
    # Dev sweep: every trial has a dev AP, each family a pick among its trials.
    for fam in ("ssim", "mix"):
        e = res["dev_sweep"][fam]
        assert e["complete"] and len(e["trials"]) == 2
        assert e["pick"] in [t["name"] for t in e["trials"]]
        assert all(t["dev_AP"] is not None for t in e["trials"])
    assert set(res["methods"]) == {"student", "ssim", "mix", "mix_kd"}
    for m in res["methods"].values():
        assert [r["seed"] for r in m["runs"]] == [0, 1]
        assert all("AP" in r["test"] and "AP" in r["dev"] for r in m["runs"])
        assert all(r["train_detection_loss_end"] > 0 for r in m["runs"])  # from metrics.json
    # Seed 0 of a tuned method is its dev pick, evaluated on test afterwards; seed 1 is new.
    ssim = res["methods"]["ssim"]["runs"]
    assert ssim[0]["reused_dev_trial"] == "ssim/" + res["dev_sweep"]["ssim"]["pick"]
    assert ssim[1]["reused_dev_trial"] is None
    assert "AP" in res["teacher"]["test"] and res["teacher"]["curve"]
    # Test is evaluated as dev was during training: the run's own input size, not its config
    # file's (the base config's 192 px).
    import yaml

    size = res["preset"]["image_size"]
    for run_dir in (tmp_path / "runs" / "teacher", tmp_path / "runs" / "final" / "ssim" / "seed1"):
        test_cfg = yaml.safe_load((run_dir / "test" / "config.yaml").read_text())
        assert test_cfg["INPUT"]["MIN_SIZE_TEST"] == size != 192
        assert test_cfg["DATASETS"]["TEST"] == ["synthetic_study_test"]
    md = (tmp_path / "results.md").read_text()
    assert "Test split" in md and "teacher (Lite2-FPN)" in md and "+ SSIM hints (tuned)" in md
    assert "Partial" not in md and "train det. loss, end" in md
    sweep = (tmp_path / "dev_sweep.md").read_text()
    assert "split: dev" in sweep
    assert sum(line.startswith("| ") and "| **" in line for line in sweep.splitlines()) == 2
    assert (tmp_path / "ap_curves.png").stat().st_size > 0
    assert (tmp_path / "dev_sweep.png").stat().st_size > 0
    assert (tmp_path / "data" / "test.json").exists()
    # Everything finished is reused by the next call: no training, no test evaluation.
    again = _study(tmp_path, ARGS)
    assert ": training; log in" not in again.stdout and ": resuming; log in" not in again.stdout
    _ledger_keeps_the_study(tmp_path)

    # Generalization: the tuned settings, unchanged, on COCO data registered via DATASETS.COCO
    # (here the study's own splits, which have the layout the tool expects).
    gen_out = tmp_path / "gen"
    args = ["--data", tmp_path / "data", "--study", tmp_path / "results.json", "--output", gen_out,
            "--preset", "quick", "--methods", "ssim", "--seeds", "0", "1", "--jobs", "2",
            "--opts", "MODEL.KD.TEACHER.MIN_AP", "0.0"]  # fmt: skip
    proc = run_module("run_generalization", args, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.load(open(gen_out / "results.json"))
    assert set(out["methods"]) == {"student", "ssim"}
    tuned = res["methods"]["ssim"]["runs"][0]["opts"]
    for r in out["methods"]["ssim"]["runs"]:
        assert r["opts"][: len(tuned)] == tuned and "AP" in r["test"]  # settings unchanged

    run_cfg = yaml.safe_load((gen_out / "runs" / "ssim" / "seed0" / "config.yaml").read_text())
    assert run_cfg["DATASETS"]["TRAIN"] == ["external_train"]  # trained on the new data
    assert run_cfg["DATASETS"]["TEST"] == ["external_val"]  # dev during training, not test
    test_cfg = yaml.safe_load(
        (gen_out / "runs" / "ssim" / "seed0" / "test" / "config.yaml").read_text()
    )
    assert test_cfg["DATASETS"]["TEST"] == ["external_test"]
    assert test_cfg["INPUT"]["MIN_SIZE_TEST"] == run_cfg["INPUT"]["MIN_SIZE_TEST"] == size
    assert "Partial" not in (gen_out / "results.md").read_text()
    assert out["study"] == str(tmp_path / "results.json")  # outside the checkout: absolute
    # The teacher's record is the run the report is about: a later call that finds its weights
    # (as after a retrain for lost students) reports the record, and leaves it as it was.
    t_rec = gen_out / "ledger" / "teacher.json"
    rec = json.loads(t_rec.read_text())
    t_rec.write_text(json.dumps(dict(rec, seconds=12345.0)))
    before = t_rec.read_text()
    proc = run_module("run_generalization", args + ["--report-only"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert t_rec.read_text() == before
    assert json.load(open(gen_out / "results.json"))["teacher"]["seconds"] == 12345.0


def _ledger_keeps_the_study(tmp_path):
    """A fresh clone has the committed ledger but no runs/: the reports, the resume and a lost
    teacher all come back from the ledger."""
    import shutil

    _study(tmp_path, ARGS + ["--report-only"])  # the report from runs/ (and no wall time)
    md = (tmp_path / "results.md").read_text()
    runs, ledger = tmp_path / "runs", tmp_path / "ledger"
    # The teacher, 2 trials of 2 families, the student 2 seeds, ssim and mix seed 1, mix_kd 2.
    assert len(list(ledger.rglob("*.json"))) == 1 + 2 * 2 + 2 + 2 + 2
    shutil.move(str(runs), str(tmp_path / "runs.lost"))
    _study(tmp_path, ARGS + ["--report-only"])
    assert (tmp_path / "results.md").read_text() == md  # the same evidence, from the ledger

    # Without runs/ and ledger, the report would be empty: refused, the results stay.
    shutil.move(str(ledger), str(tmp_path / "ledger.lost"))
    proc = _study(tmp_path, ARGS + ["--report-only"], ok=False)
    assert "Refusing to overwrite" in proc.stderr and "--restore-from" in proc.stderr
    assert (tmp_path / "results.md").read_text() == md
    # An earlier results.json rebuilds the ledger.
    _study(tmp_path, ARGS + ["--restore-from", str(tmp_path / "results.json")])
    assert (tmp_path / "results.md").read_text() == md
    assert json.loads((ledger / "teacher.json").read_text())["source"].startswith("restored from")

    # A lost run trains again; its teacher's weights are gone, so the teacher is retrained first
    # and must reproduce its recorded dev AP bit for bit. Its record stays the run the report is
    # about (time, CPU, test): the retrain only recreated the weights.
    teacher_record = (ledger / "teacher.json").read_text()
    (ledger / "final" / "ssim" / "seed1.json").unlink()
    proc = _study(tmp_path, ARGS)
    assert "the teacher's weights are missing" in proc.stdout
    assert proc.stdout.count(": training; log in") == 2  # the teacher and ssim seed 1 only
    assert (ledger / "teacher.json").read_text() == teacher_record
    assert json.loads((ledger / "final" / "ssim" / "seed1.json").read_text())["source"] == "trained"


def test_generalization_takes_the_two_best_methods_by_dev_ap():
    runs = lambda *aps: {"runs": [{"dev": {"AP": a}, "test": {"AP": 99.0}} for a in aps]}  # noqa
    study = {"methods": {"student": runs(50.0), "ssim": runs(20.0, 22.0), "mse": runs(30.0),
                         "mix": runs(10.0, 40.0)}}  # fmt: skip
    best, dev = gen.best_methods(study)
    assert best == ["mse", "mix"] and dev["ssim"] == 21.0
    assert gen.chosen_methods(None, study)[0] == ["mse", "mix"]
    # Named methods run as given, once each; the student always runs, so it is not repeated. The
    # dev ranking is kept either way, so a results file shows what the study would have chosen.
    assert gen.chosen_methods(["ssim", "student", "ssim"], study) == (["ssim"], dev)
    # No names: only the teacher and the student, which can start before the study has finished.
    assert gen.chosen_methods([], study) == ([], dev)
    assert gen.chosen_methods([], {}) == ([], {})


def test_run_study_report_only_trains_nothing(tmp_path):
    proc = _study(tmp_path, ARGS + ["--report-only"])
    assert ": training; log in" not in proc.stdout and not (tmp_path / "runs").exists()
    assert "Partial" in (tmp_path / "results.md").read_text()


def test_run_study_rejects_unknown_family(tmp_path):
    proc = _study(tmp_path, ["--families", "ssim", "distill_everything"], ok=False)
    assert "Unknown families ['distill_everything']" in proc.stderr


def test_regime_checks_follow_their_definitions():
    curve = lambda *aps: [[200 * (i + 1) - 1, a] for i, a in enumerate(aps)]  # noqa: E731
    student = [
        {"dev": {"AP": d}, "test": {"AP": t}, "curve": curve(10, 20, 25, 30, c), "seconds": 60}
        for d, t, c in ((30.0, 29.0, 30.0), (31.0, 30.0, 31.0), (32.0, 31.0, 32.0))
    ]
    res = {"teacher": {"curve": curve(20, 30, 35, 40, 40.5), "test": {"AP": 40.0},
                       "dev": {"AP": 40.5}, "seconds": 60},
           "methods": {"student": {"label": "student alone", "runs": student}}}  # fmt: skip
    checks = report.regime_checks(res)
    # Last quarter of 1000 iterations: from the evaluation at iteration 800 to the end.
    assert checks["teacher_last_quarter_change"] == 40.5 - 40
    assert checks["student_last_quarter_change"] == [0.0, 1.0, 2.0]
    assert checks["student_dev_seed_std"] == 1.0
    assert checks["student_plateau"] is False  # a change of 1 and 2 AP is not below a std of 1
    # The regime criterion is on dev (a choice); test is reported beside it.
    assert checks["gap_dev_AP"] == 40.5 - 31.0 and checks["gap_test_AP"] == 40.0 - 30.0
    res["preset"] = {"num_train": 4, "num_dev": 2, "num_test": 2, "image_size": 64, "iters": 10,
                     "teacher_iters": 20, "batch": 2}  # fmt: skip
    res.update(seeds=[0, 1, 2], jobs=1, finished_runs=3, expected_runs=3)
    md = report.results_markdown(res)
    assert (
        "- teacher-student gap on dev: 9.5 AP (meets the 8 AP the study needs); on test: 10.0 AP."
        in md
    )
    diff = report.versus_student([{"test": {"AP": 33.0}}, {"test": {"AP": 35.0}}], student, "ssim")
    # Welch: mean 34 - 30 = 4; standard error sqrt(var 2 / 2 + var 1 / 3) = 1.15; 4 > 2 x 1.15.
    assert diff == "+4.0 +- 1.2 *"


def test_run_time_counts_every_process_of_a_resumed_run(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text(
        "[12/02 02:49:38] detectron2 INFO: Rank of current process: 0. World size: 1\n"
        "  an untimed continuation line\n"
        "[12/02 02:55:38] d2.utils.events INFO:  iter: 19\n"  # first process: 6 min
        "[12/02 03:09:18] detectron2 INFO: Rank of current process: 0. World size: 1\n"
        "[12/02 03:10:00] d2.utils.events INFO:  iter: 39\n"
        "[12/02 03:19:18] d2.engine.hooks INFO: Overall training speed\n"  # second: 10 min
    )
    # The 14 minutes between the processes (the session that ended) are not the run's.
    assert report.log_seconds(str(log)) == 6 * 60 + 10 * 60
    log.write_text("[12/31 23:59:00] detectron2 INFO: Rank of current process: 0.\n"
                   "[01/01 00:01:00] d2 INFO: a new year\n")  # fmt: skip
    assert report.log_seconds(str(log)) == 120
    assert report.log_seconds(str(tmp_path / "missing.txt")) is None


def test_invocations_are_recorded_once_each(tmp_path):
    report.record_invocation(str(tmp_path), 1_800_000_000, 2, 1)
    report.record_invocation(str(tmp_path), 1_800_000_000, 2, 3)  # the same invocation, later
    report.record_invocation(str(tmp_path), 1_800_090_000, 2, 1)  # a second one
    rows = report.invocations(str(tmp_path))
    assert [r["trained"] for r in rows] == [3, 1]
    assert rows[0]["start"] == "2027-01-15T08:00:00Z" and rows[0]["jobs"] == 2


def test_verdicts_and_answers_follow_welch():
    runs = lambda *aps, dev=30.0: [{"test": {"AP": a}, "dev": {"AP": dev}} for a in aps]  # noqa
    res = {
        "teacher": {"test": {"AP": 40.0}},
        "methods": {
            "student": {"label": "student alone", "runs": runs(29.0, 30.0, 31.0)},
            # mean 36, var 1: diff 6, se sqrt(1/3 + 1/3) = 0.816 -> pays off; closes 60 %.
            "ssim": {"label": "+ SSIM", "runs": runs(35.0, 36.0, 37.0, dev=33.0)},
            # mean 31, var 4: diff 1, se sqrt(4/3 + 1/3) = 1.29 -> no effect shown.
            "mse": {"label": "+ MSE", "runs": runs(29.0, 31.0, 33.0, dev=31.0)},
            # mean 26, var 1: diff -4 -> hurts.
            "mix": {"label": "+ mixing", "runs": runs(25.0, 26.0, 27.0)},
        },
    }
    m = res["methods"]
    assert v.method_verdict(m["ssim"]["runs"], m["student"]["runs"]) == "pays off"
    assert v.method_verdict(m["mse"]["runs"], m["student"]["runs"]) == "no effect shown"
    assert v.method_verdict(m["mix"]["runs"], m["student"]["runs"]) == "hurts"
    assert v.method_verdict(runs(40.0), m["student"]["runs"]) == ""  # one seed: no error bar
    text = "\n".join(v.answers(res))
    # SSIM - MSE = 5 +- sqrt(1/3 + 4/3) = 1.29; the larger seed std is 2: beats it.
    assert "SSIM hints against MSE hints (each tuned): +5.0 +- 1.3 test AP" in text
    assert "SSIM beats MSE by more than the seed spread" in text
    # The best offline method is chosen by dev AP (SSIM, 33.0), and reported on test.
    assert (
        "'+ SSIM' (33.0 dev AP); on test it closes 60% of the teacher-student gap (at least" in text
    )
    assert "+ mixing against the student alone: -4.0 +- 0.8 test AP (hurts)." in text
    # Mixing on top of hints is compared with the hints family the dev sweeps picked (MSE here,
    # 31.5 dev AP against SSIM's 31.0), not with the student alone only.
    sweep = lambda ap: {"pick": "a", "trials": [{"name": "a", "dev_AP": ap}]}  # noqa
    res["dev_sweep"] = {"ssim": sweep(31.0), "mse": sweep(31.5)}
    res["methods"]["mix_kd"] = {"label": "+ hints + mixing", "runs": runs(32.0, 33.0, 34.0)}
    text = "\n".join(v.answers(res))
    # 33 - 31 = 2 +- sqrt(1/3 + 4/3) = 1.29 -> no effect shown.
    assert (
        "+ hints + mixing against the same hints without mixing (+ MSE): +2.0 +- 1.3 test AP "
        "(no effect shown)." in text
    )
    # A tie goes to the earlier family of the plan, in the study's choice and in the report.
    res["dev_sweep"]["mse"] = sweep(31.0)
    assert v.feature_pick(res) == "ssim"
    # A partial table: the best by dev has no test run yet, so no lesser method takes its place.
    res["methods"]["pkd"] = {"label": "+ PKD", "runs": [{"test": None, "dev": {"AP": 35.0}}]}
    text = "\n".join(v.answers(res))
    assert "'+ PKD' (35.0 dev AP); it has no test run yet." in text
    assert "closes" not in text


def test_selection_check_separates_the_dev_pick_from_fresh_seeds():
    run = lambda ap, reused=None: {"test": {"AP": ap}, "reused_dev_trial": reused}  # noqa: E731
    res = {
        "methods": {
            "student": {"label": "student alone", "runs": [run(30.0), run(31.0), run(32.0)]},
            "pkd": {"label": "+ PKD", "runs": [run(36.0, "pkd/w3.0"), run(33.0), run(34.0)]},
        }
    }
    text = "\n".join(v.selection_check(res))
    # all seeds: (36 + 33 + 34) / 3 = 34.33; fresh seeds: 33.5; the pick: 36.
    assert "+ PKD: 34.3 over all 3 seeds, 33.5 over the 2 seed(s) that were not the dev" in text
    assert "(the pick itself: 36.0)" in text
    assert "student alone" not in text  # untuned: nothing was picked
    assert v.selection_check({"methods": {"student": res["methods"]["student"]}}) == []


def test_start_order_completes_the_dev_ranking_then_starts_online_runs():
    finals = plan.finals()
    order = [(f.name, s) for f, s in plan.start_order(finals, [0, 1, 2])]
    assert sorted(order) == sorted((f.name, s) for f in finals for s in [0, 1, 2])
    # Methods without a dev trial: their seed 0 gives the dev AP the ranking still lacks.
    untried = [f.name for f in finals if not f.reuses and f.name != "student"]
    assert untried == ["mix_kd", "online_cutnmix"]
    assert order[:2] == [("online_cutnmix", 0), ("mix_kd", 0)]  # the longer first
    # Then the remaining online runs (the longest), then the rest in listed order and by seed.
    online = [p for p in order[2:] if p[0] in ("online", "online_cutnmix")]
    assert (
        order[2 : 2 + len(online)]
        == online
        == [
            ("online", 0),
            ("online", 1),
            ("online", 2),
            ("online_cutnmix", 1),
            ("online_cutnmix", 2),
        ]
    )
    rest = order[2 + len(online) :]
    listed = [f.name for f in finals]
    assert rest == sorted(rest, key=lambda p: (listed.index(p[0]), p[1]))
    assert ("student", 0) in rest and ("mix_kd", 1) in rest


def test_generalization_table_gives_each_method_a_verdict():
    runs = lambda *aps: [{"test": {"AP": a}, "dev": {"AP": a}} for a in aps]  # noqa: E731
    res = {
        "data": "datasets/animal_scenes",
        "teacher": {"test": {"AP": 50.0}, "bbox": {"AP": 49.0}},
        "methods": {
            "student": {"label": "student alone", "runs": runs(30.0, 32.0)},
            # +10 +- sqrt(2/2 + 2/2) = 1.41: pays off; closes (41 - 31) / (50 - 31) = 53 %.
            "pkd": {"label": "+ PKD hints (tuned)", "runs": runs(40.0, 42.0)},
            # +1 +- 1.41: no effect shown.
            "mse": {"label": "+ MSE hints (tuned)", "runs": runs(31.0, 33.0)},
        },
    }
    preset = {"iters": 1000, "teacher_iters": 3000, "batch": 8, "image_size": 128}
    md = gen.markdown(res, 6, preset, [0, 1])
    assert (
        "| + PKD hints (tuned) | 41.0 +- 1.4 | +10.0 +- 1.4 * | pays off | +53% | 41.0 | 2 |" in md
    )
    assert "| + MSE hints (tuned) | 32.0 +- 1.4 | +1.0 +- 1.4 | no effect shown |" in md
    assert "| teacher (Lite2-FPN) | 50.0 | | | | 49.0 | 1 |" in md
    assert "Partial" not in md


def test_picks_resolve_the_picks_a_pick_names():
    """The multi-level pick "with the best feature loss" names @pick:feature: a final built from
    it needs both picks to expand (the study stopped on a KeyError without this)."""
    pkd = plan.Trial("pkd", "w12.0", plan.KD, ("MODEL.KD.FEATURE.LOSS", "pkd"), True)
    best = plan.Trial("multilevel", "best_feature", plan.MULTILEVEL, ("@pick:feature",), True)
    chosen = {"multilevel": best, "feature": pkd}
    asked = []
    picks = plan.resolve_picks(["multilevel"], lambda f: asked.append(f) or chosen[f])
    assert picks == chosen and asked == ["multilevel", "feature"]
    final = next(f for f in plan.finals() if f.name == "multilevel")
    assert plan.expand(final.opts, picks) == ["MODEL.KD.FEATURE.LOSS", "pkd"]
    assert plan.resolve_picks(["multilevel"], {"multilevel": best}.get) is None  # no feature pick
