"""SSIM where its window sees structure: the study's comparison at an input where P2-P4 fit an
11-pixel window.

Issue 29, part 2. At the study's 128 px, FPN maps are P2 32x32, P3 16x16, P4 8x8, P5 4x4 and P6
2x2: the tuned 7-pixel window shrinks to 3 on P5 and skips P6, and an 11-pixel window (the SSIM-KD
paper's) fits only P2-P3. At 256 px (generated at that size, :data:`SIZE`) P4 is 16x16 and P5 8x8.
This driver repeats the study's protocol there for the methods that answer "does SSIM pay off once
its window fits" (:data:`METHODS`): the student alone, MSE, SSIM and PKD at the study's tuned
settings (unchanged: tuned on the 128 px dev split), the SSIM diagnosis's best variant
(:mod:`method_study.ssim_diagnosis`), and the paper's 11-pixel window, 3 seeds each, on test.

The regime is checked before any distillation run trains (:func:`regime_gate`): a teacher of the
study's recipe at this size, the student alone's plateau (last-quarter dev-AP change below its seed
spread) and a teacher-student gap of at least 8 AP on dev. A regime that fails stops the driver
(``--ignore-regime`` to go on anyway).

Runs are the study's (:class:`method_study.run_study.Study`, one thread each, resumable, ledger
records in ``<output>/ledger/``); the order puts one seed of every method before the second seed
of any, and ``results.md`` is rewritten after every run, so a partial table is always current::

    OMP_NUM_THREADS=1 python -m method_study.ssim_window          # train what is missing
    python -m method_study.ssim_window --report-only              # tables of what finished
"""

import argparse
import json
import os
import statistics

from . import RESULTS, ledger, plan, report
from .run_study import PRESETS, Study
from .ssim_diagnosis import BY_NAME, MSE, PKD, TUNED_SSIM, kd_terms
from .ssim_diagnosis_report import _f, _vs

#: Input side (images generated at this size; every run trains and tests at it).
SIZE = 256
#: Minimal gap teacher - student alone on dev (the study's criterion).
MIN_GAP = 8.0


class Method:
    def __init__(self, name, label, config, opts, teacher):
        self.name, self.label, self.config = name, label, config
        self.opts, self.teacher = tuple(opts), teacher


def methods(best_name, best_opts):
    """The compared methods; ``best_*``: the diagnosis's best SSIM variant (None: left out)."""
    size = plan.STUDENT_SIZE
    out = [
        Method("student", "student alone", plan.STUDENT, size, False),
        Method("mse", "+ MSE hints (study's pick)", plan.KD, size + MSE, True),
        Method("ssim", "+ SSIM hints (study's pick, window 7)", plan.KD, size + TUNED_SSIM, True),
        Method("pkd", "+ PKD hints (study's pick)", plan.KD, size + PKD, True),
    ]
    if best_name and best_name != "tuned":
        label = f"+ SSIM, diagnosis's best variant: {BY_NAME[best_name].label}"
        out.append(Method("ssim_best", label, plan.KD, size + tuple(best_opts), True))
    out.append(Method("ssim_win11", "+ SSIM hints, the paper's 11-pixel window", plan.KD,
                      size + plan.SSIM_PAPER, True))  # fmt: skip
    return out


def best_variant(diag_results):
    """``(name, opts)`` of the diagnosis's best SSIM-only variant: by mean test AP among those
    settled on test, else by dev AP; ``(None, None)`` without a diagnosis."""
    if not os.path.exists(diag_results):
        return None, None
    with open(diag_results) as f:
        res = json.load(f)
    tested = {n: statistics.mean(r["test"]["AP"] for r in runs)
              for n, runs in res.get("test", {}).items()
              if BY_NAME[n].ssim and runs and all(r.get("test") for r in runs)}  # fmt: skip
    pool = tested or {n: e["dev"]["AP"] for n, e in res.get("variants", {}).items()
                      if BY_NAME[n].ssim}  # fmt: skip
    if not pool:
        return None, None
    name = max(pool, key=pool.get)
    return name, res["variants"][name]["opts"]


def order(meths, seeds):
    """Student seeds first (the regime checks), then one seed of every method at a time."""
    jobs = [("student", s) for s in seeds]
    for s in seeds:
        jobs += [(m.name, s) for m in meths if m.name != "student"]
    return jobs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=os.path.join(RESULTS, f"ssim_{SIZE}"))
    p.add_argument("--diagnosis", default=os.path.join(RESULTS, "ssim_diagnosis", "results.json"))
    p.add_argument("--image-size", type=int, default=SIZE)
    p.add_argument("--preset", default="full", choices=sorted(PRESETS))
    p.add_argument("--methods", nargs="+", default=None, help="only these methods")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--force", action="store_true")
    p.add_argument(
        "--ignore-regime",
        action="store_true",
        help="train the distillation runs even if the regime checks fail",
    )
    p.add_argument("--opts", nargs="+", default=[],
                   help="KEY VALUE overrides added to every run but the teacher")  # fmt: skip
    return p.parse_args(argv)


def regime_gate(res):
    """``(ok, reason)``: the student alone's seeds plateau and trail the teacher by at least
    :data:`MIN_GAP` AP on dev (None while runs are missing)."""
    checks = res.get("regime") or {}
    gap, plateau = checks.get("gap_dev_AP"), checks.get("student_plateau")
    if gap is not None and gap < MIN_GAP:
        return False, f"teacher-student gap on dev {gap:.1f} AP < {MIN_GAP}"
    if gap is None or plateau is None:
        return None, "teacher or student seeds (or their curves) missing"
    if not plateau:
        return False, "the student alone has not plateaued (last-quarter change >= seed std)"
    return True, f"gap {gap:.1f} AP on dev, student plateau"


def main(argv=None):
    from kd_det.data.synthetic import generate_dataset

    args = parse_args(argv)
    args.output = os.path.abspath(args.output)
    args.jobs, args.restore_from = 1, None
    preset = dict(PRESETS[args.preset])
    preset["image_size"] = args.image_size
    best_name, best_opts = best_variant(args.diagnosis)
    meths = [m for m in methods(best_name, best_opts)
             if args.methods is None or m.name in args.methods]  # fmt: skip
    if not args.report_only:
        generate_dataset(os.path.join(args.output, "data"), preset["num_train"],
                         preset["num_dev"], preset["image_size"], 0,
                         num_test=preset["num_test"])  # fmt: skip
    study = Study(args, preset, set())
    study.env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    by_name = {m.name: m for m in meths}
    jobs = order(meths, args.seeds)
    study.progress["total"] = len(jobs) + 1
    needs_teacher = any(m.teacher for m in meths)
    if needs_teacher or "student" in by_name:
        study.run_teacher()
    else:
        study.event("teacher").set()
    runs = {}
    res = assemble(study, meths, runs, preset, args, best_name, len(jobs))
    for name, seed in jobs:
        m = by_name[name]
        if m.teacher and not args.ignore_regime and not args.report_only:
            ok, why = regime_gate(res)
            if ok is False:
                write(res, args.output, final=True)
                raise SystemExit(f"[ssim_window] regime check failed: {why}. No distillation run "
                                 "trained; see results.md (--ignore-regime to go on).")  # fmt: skip
        run = one(study, m, seed, preset, args)
        if run is not None:
            runs.setdefault(name, []).append(run)
        res = assemble(study, meths, runs, preset, args, best_name, len(jobs))
        write(res, args.output)
    write(res, args.output, final=True)
    print(open(os.path.join(args.output, "results.md")).read())


def one(study, m, seed, preset, args):
    """Train (or reuse) one method at one seed, evaluate it on test, record its KD terms."""
    from kd_det.utils.runs import STAMP

    out = os.path.join(args.output, "runs", "final", m.name, f"seed{seed}")
    all_opts = study.data_opts + study.sched(preset["iters"]) + ["SEED", str(seed)]
    opts = list(m.opts) + list(args.opts)
    params = dict(study.base, iters=preset["iters"], seed=seed, opts=opts)
    run = study.train(f"{m.name}/seed{seed}", m.config, all_opts + opts, out, params, m.teacher)
    if run is None:
        return None
    if os.path.exists(os.path.join(out, STAMP)):
        terms = kd_terms(out)
        if terms is not None:
            run["record"] = ledger.save(ledger.record_path(args.output, out), kd_terms=terms)
    study.report(f"{m.name} seed {seed}", run)
    run = study.test(run)
    if run is not None:
        run["seed"] = seed
    return run


def assemble(study, meths, runs, preset, args, best_name, expected):
    t = study.results.get("teacher") or {}
    res = {"preset": preset, "best_variant": best_name, "expected_runs": expected,
           "teacher": {k: t.get(k) for k in ("dev", "test", "seconds", "curve")} if t else None,
           "methods": {}}  # fmt: skip
    for m in meths:
        rs = []
        for r in runs.get(m.name, []):
            rec = r.get("record") or {}
            rs.append({"seed": r["seed"], "dev": r["dev"], "test": r.get("test"),
                       "seconds": r.get("seconds"), "curve": r.get("curve"),
                       "kd_detection_ratio": rec.get("kd_detection_ratio"),
                       "train_detection_loss_end": rec.get("train_detection_loss_end"),
                       "out": os.path.relpath(r["out"], args.output)})  # fmt: skip
        res["methods"][m.name] = {"label": m.label, "opts": list(m.opts), "runs": rs}
    res["regime"] = report.regime_checks(res) if t else {}
    return res


def markdown(res):
    p = res["preset"]
    t = res.get("teacher") or {}
    st = [r["test"]["AP"] for r in res["methods"].get("student", {}).get("runs", [])
          if r.get("test")]  # fmt: skip
    ref = {n: [r["test"]["AP"] for r in res["methods"].get(n, {}).get("runs", []) if r.get("test")]
           for n in ("mse", "ssim", "pkd")}  # fmt: skip
    t_ap = (t.get("test") or {}).get("AP")
    lines = [
        f"# SSIM where its window sees structure: {p['image_size']} px (issue 29)",
        "",
        f"Generated scenes at {p['image_size']} px ({p['num_train']} train / {p['num_dev']} dev / "
        f"{p['num_test']} test), teacher Lite2-FPN {p['teacher_iters']} iterations, students "
        f"{p['iters']}, batch {p['batch']}; FPN maps P2 {p['image_size'] // 4}, "
        f"P3 {p['image_size'] // 8}, P4 {p['image_size'] // 16}, P5 {p['image_size'] // 32}, "
        f"P6 {-(-p['image_size'] // 64)} pixels wide. Test split, mean +- std over seeds. "
        "Rebuild: `python -m method_study.ssim_window --report-only`.",
        "",
        f"Teacher: dev AP {_f((t.get('dev') or {}).get('AP'), 1)}, test AP {_f(t_ap, 1)}.",
        "",
        "| method | seeds | test AP | vs student alone | vs MSE | vs SSIM (window 7) | vs PKD "
        "| gap closed | dev AP | KD/det ratio, first tenth | min / run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    done = 0
    for name, m in res["methods"].items():
        rs = m["runs"]
        done += len(rs)
        aps = [r["test"]["AP"] for r in rs if r.get("test")]
        mean, sd = report.summarize(aps)
        dev, _ = report.summarize([r["dev"]["AP"] for r in rs])
        cell = "n/a" if mean is None else f"{mean:.1f} +- {sd:.1f}"
        s_mean = statistics.mean(st) if st else None
        gap = ""
        if None not in (mean, t_ap, s_mean) and t_ap > s_mean and name != "student":
            gap = f"{(mean - s_mean) / (t_ap - s_mean):+.0%}"
        ratios = [r["kd_detection_ratio"][0] for r in rs if r.get("kd_detection_ratio")]
        mins = [r["seconds"] / 60 for r in rs if r.get("seconds")]
        vs = [
            ("" if name == n else _vs(aps, ref_aps))
            for n, ref_aps in (
                ("student", st),
                ("mse", ref["mse"]),
                ("ssim", ref["ssim"]),
                ("pkd", ref["pkd"]),
            )
        ]
        lines.append(
            f"| {m['label']} | {len(rs)} | {cell} | {' | '.join(vs)} | {gap} | {_f(dev, 1)} | "
            f"{_f(statistics.mean(ratios)) if ratios else 'n/a'} | "
            f"{_f(statistics.mean(mins), 0) if mins else 'n/a'} |"
        )
    r = res.get("regime") or {}
    ok, why = regime_gate(res)
    changes = ", ".join(f"{c:+.1f}" for c in r.get("student_last_quarter_change", []))
    lines += [
        "",
        "Differences: mean test AP difference +- its Welch standard error; `*` beyond two standard "
        "errors.",
        "",
        f"**Regime checks**: teacher's last-quarter dev-AP change "
        f"{_f(r.get('teacher_last_quarter_change'), 1)}; student alone's per seed [{changes}] "
        f"against its dev seed std {_f(r.get('student_dev_seed_std'), 1)}; gap teacher - student "
        f"alone {_f(r.get('gap_dev_AP'), 1)} AP on dev (>= {MIN_GAP:.0f} needed), "
        f"{_f(r.get('gap_test_AP'), 1)} on test. Verdict: "
        + ("pending" if ok is None else ("met" if ok else "NOT met"))
        + f" ({why}).",
    ]
    t_min = (t.get("seconds") or 0) / 60
    total = t_min + sum(r["seconds"] / 60 for m in res["methods"].values() for r in m["runs"]
                        if r.get("seconds"))  # fmt: skip
    lines += ["", f"**Cost** (one thread each, measured from each run's log): teacher "
              f"{t_min:.0f} min; {total / 60:.1f} h of training in all so far."]  # fmt: skip
    if done < res["expected_runs"]:
        lines += ["", f"**Partial**: {done} of {res['expected_runs']} student runs have finished."]
    return "\n".join(lines) + "\n"


def _count(res):
    return sum(len(m["runs"]) for m in res["methods"].values())


def write(res, output, final=False):
    """Write results.json / results.md. While runs are still being collected (``final`` False) a
    table with fewer runs than the one on disk is not written (a resumed call passes over the
    finished runs first); the final write refuses to shrink it (:func:`ledger.refuse_to_shrink`)."""
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, "results.json")
    if not final and os.path.exists(path):
        with open(path) as f:
            if _count(json.load(f)) > _count(res):
                return
    ledger.refuse_to_shrink(path, res, _count)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(output, "results.md"), "w") as f:
        f.write(markdown(res))


if __name__ == "__main__":
    main()
