"""Why tuned SSIM hints do no better than MSE and far worse than PKD: one factor at a time.

Issue 29. The study's tuned SSIM setting (:data:`TUNED_SSIM`: per-level min-max to [0, 1], window
7, ``(1 - SSIM) / 2``, weight 3, adapters) showed no effect on test; PKD closed 58 % of the gap.
The **diagnosis** changes one factor of it at a time, on the study's dev split, seed 0, with the
study's teacher, data and schedule (:data:`VARIANTS`):

* **levels**: SSIM on P2 only, on P2-P3, on all levels (the tuned setting, whose P5 is 4x4 and gets
  a 3-pixel window and whose P6 is 2x2 and is skipped at 128 px);
* **terms**: SSIM's structure term alone (``MODEL.KD.SSIM.TERMS structure``);
* **range policy**: ``teacher_absmax``, ``teacher_minmax``, ``standardize`` (``minmax`` is tuned);
* **balance**: the weight that gives SSIM PKD's distillation-to-detection loss ratio over the first
  tenth of training (:func:`matched_weight`, from the tuned run's ratio and the study's PKD pick);
* **on top of PKD**: PKD at its tuned weight plus SSIM at its own (``feature_sum``);
* **references**: the study's PKD and MSE picks, retrained here so their per-level losses and
  ratios are measured the same way;
* **control**: MSE with its weight matched to PKD's ratio the same way, so that a gain of the
  balanced SSIM over MSE is not only MSE's own under-weighting.

The tuned variant and the references have exactly the parameters of the study's dev trials, so
their dev AP must reproduce the study's (the report checks it). Every run records, besides the
study's fields, its per-level distillation losses and the KD/detection ratio over each tenth of
training (``kd_terms``). The promising variants are then **settled on test** as the study settles
a method (:func:`test_variants`): seeds 1 and 2 trained, seed 0 is the dev run, compared with the
study's own 3-seed test runs of the student alone, MSE, SSIM and PKD.

Runs are the study's (:class:`method_study.run_study.Study`): resumable ``tools/train_net.py``
processes, one thread each, reused from their ledger record; the teacher is the study's (retrained
once from its recipe if its weights are gone). Writes ``results.md``, ``results.json`` and
``kd_terms.png`` into ``--output``::

    OMP_NUM_THREADS=1 python -m method_study.ssim_diagnosis          # train what is missing
    python -m method_study.ssim_diagnosis --report-only              # tables of what finished
"""

import argparse
import contextlib
import json
import os
import statistics

from . import RESULTS, ledger, plan, report, verdicts
from .run_study import PRESETS, Study

_o = plan._o

#: The study's SSIM pick (dev trial ``ssim/win7``): the paper's setting with a 7-pixel window.
TUNED_SSIM = plan.SSIM_PAPER + _o("MODEL.KD.SSIM.WINDOW_SIZE", 7)
#: The study's PKD and MSE picks (dev trials ``pkd/w12.0`` and ``mse/w3.0``), option for option.
PKD = _o("MODEL.KD.FEATURE.LOSS", "pkd", "MODEL.KD.FEATURE.WEIGHTS", "[12.0]")
MSE = _o("MODEL.KD.FEATURE.LOSS", "mse", "MODEL.KD.FEATURE.RANGE_POLICY", "none",
         "MODEL.KD.FEATURE.WEIGHTS", "[3.0]")  # fmt: skip
#: Placeholder of the balance variant's weight, set from the tuned run's measured ratio.
MATCHED = "@matched_weight"


class Variant:
    """One diagnosis run: ``opts`` are complete (not a delta), so each run is what a user types."""

    def __init__(self, name, factor, label, opts, study_trial=None, ssim=True, ratio_of="tuned"):
        self.name, self.factor, self.label, self.opts = name, factor, label, tuple(opts)
        self.study_trial = study_trial  # the study's dev trial with the same parameters
        self.ssim = ssim  # an SSIM-only setting (a candidate for "the best SSIM setting")
        self.ratio_of = ratio_of  # the weight-3 run whose ratio a MATCHED weight scales


VARIANTS = [
    Variant("tuned", "reference", "tuned SSIM (all levels P2-P6)", TUNED_SSIM, "ssim/win7"),
    Variant("p2", "levels", "SSIM on P2 only",
            TUNED_SSIM + _o("MODEL.KD.FEATURE.LEVELS", "['p2']")),
    Variant("p2_p3", "levels", "SSIM on P2-P3",
            TUNED_SSIM + _o("MODEL.KD.FEATURE.LEVELS", "['p2', 'p3']")),
    Variant("structure", "terms", "structure term alone",
            TUNED_SSIM + _o("MODEL.KD.SSIM.TERMS", "structure")),
    Variant("teacher_absmax", "range policy", "range policy teacher_absmax",
            TUNED_SSIM + _o("MODEL.KD.FEATURE.RANGE_POLICY", "teacher_absmax")),
    Variant("teacher_minmax", "range policy", "range policy teacher_minmax",
            TUNED_SSIM + _o("MODEL.KD.FEATURE.RANGE_POLICY", "teacher_minmax")),
    Variant("standardize", "range policy", "range policy standardize (data range 6)",
            TUNED_SSIM + _o("MODEL.KD.FEATURE.RANGE_POLICY", "standardize")),
    Variant("ratio_pkd", "balance", "weight matched to PKD's KD/detection ratio",
            TUNED_SSIM + _o("MODEL.KD.FEATURE.WEIGHTS", MATCHED)),
    Variant("on_pkd", "on top of PKD", "PKD (weight 12) + SSIM (weight 3)",
            TUNED_SSIM + _o("MODEL.KD.FEATURE.LOSS", "feature_sum",
                            "MODEL.KD.FEATURE_SUM.LOSSES", "['pkd', 'ssim']",
                            "MODEL.KD.FEATURE_SUM.WEIGHTS", "[12.0, 3.0]",
                            "MODEL.KD.FEATURE.WEIGHTS", "[1.0]"), ssim=False),
    Variant("pkd", "reference", "PKD alone (study's pick, weight 12)", PKD, "pkd/w12.0", False),
    Variant("mse", "reference", "MSE (study's pick, weight 3)", MSE, "mse/w3.0", False),
    Variant("mse_ratio_pkd", "control", "MSE, weight matched to PKD's KD/detection ratio",
            MSE + _o("MODEL.KD.FEATURE.WEIGHTS", MATCHED), ssim=False, ratio_of="mse"),
]  # fmt: skip
BY_NAME = {v.name: v for v in VARIANTS}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=os.path.join(RESULTS, "ssim_diagnosis"))
    p.add_argument("--study", default=RESULTS, help="the method study's output (teacher, data, "
                   "ledger and results.json of the picks this diagnosis starts from)")  # fmt: skip
    p.add_argument("--preset", choices=sorted(PRESETS), default="full")
    p.add_argument("--variants", nargs="+", default=None, choices=list(BY_NAME),
                   help="only these dev variants (default: all)")  # fmt: skip
    p.add_argument(
        "--test-variants",
        nargs="*",
        default=None,
        help="settle these on test (default: test_variants' rule; none: skip test)",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--report-only", action="store_true", help="train nothing")
    p.add_argument("--force", action="store_true", help="retrain finished runs")
    p.add_argument("--opts", nargs="+", default=[],
                   help="KEY VALUE overrides added to every run but the teacher")  # fmt: skip
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# Per-level losses and balance over training
# ------------------------------------------------------------------------------------------------
def kd_terms(out_dir, parts=10):
    """Each distillation term (``loss_kd_*``, weighted as trained), the detection loss and their
    ratio, averaged over each ``1/parts`` of a run's logged training rows.

    Returns:
        dict or None: ``{"iteration": [last iteration of each part], "terms": {name: [...]},
        "detection": [...], "ratio": [...]}``; None without a ``metrics.json``.
    """
    from kd_det.utils.loss_balance import detection_terms, loss_rows, ratio

    path = os.path.join(out_dir, "metrics.json")
    if not os.path.exists(path):
        return None
    rows = loss_rows(path)
    if not rows:
        return None
    names = sorted({k for _, losses in rows for k in losses if k.startswith("loss_kd_")})
    out = {"iteration": [], "terms": {n: [] for n in names}, "detection": [], "ratio": []}
    for i in range(parts):
        chunk = rows[i * len(rows) // parts : (i + 1) * len(rows) // parts]
        if not chunk:
            continue
        out["iteration"].append(chunk[-1][0] + 1)
        for n in names:
            out["terms"][n].append(statistics.mean(losses.get(n, 0.0) for _, losses in chunk))
        out["detection"].append(
            statistics.mean(sum(detection_terms(losses).values()) for _, losses in chunk)
        )
        vals = [r for r in (ratio(losses) for _, losses in chunk) if r is not None]
        out["ratio"].append(statistics.mean(vals) if vals else None)
    return out


def matched_weight(tuned_ratio_start, pkd_ratio_start, tuned_weight=3.0):
    """The SSIM weight whose KD/detection ratio over the first tenth of training equals PKD's:
    the terms scale linearly with the weight, so ``3 * r_pkd / r_ssim`` (two significant
    digits). The ratio moves once training responds to the new weight; the run records the ratio
    it actually had."""
    w = tuned_weight * pkd_ratio_start / tuned_ratio_start
    return float(f"{w:.2g}")


def expand(variant, weight=None):
    """A variant's options with the matched weight filled in (None if it is not known yet)."""
    if MATCHED not in variant.opts:
        return list(variant.opts)
    if weight is None:
        return None
    return [f"[{weight}]" if o == MATCHED else o for o in variant.opts]


def test_variants(dev_ap, max_ssim=2):
    """The variants settled on test, from their seed-0 dev AP (``{name: AP}``).

    * the best SSIM-only variant other than the tuned one (the study already has the tuned one's
      seeds), and any other SSIM-only variant above the tuned setting's dev AP, ``max_ssim`` in
      all, best first;
    * SSIM on top of PKD when it is above PKD alone on dev;
    * the MSE control beside the balanced SSIM whenever that goes to test.
    """
    ssim = sorted((n for n in dev_ap if BY_NAME[n].ssim and n != "tuned"),
                  key=lambda n: -dev_ap[n])  # fmt: skip
    chosen = ssim[:1] + [n for n in ssim[1:] if dev_ap[n] > dev_ap.get("tuned", float("inf"))]
    chosen = chosen[:max_ssim]
    if "on_pkd" in dev_ap and dev_ap["on_pkd"] > dev_ap.get("pkd", float("inf")):
        chosen.append("on_pkd")
    if "ratio_pkd" in chosen and "mse_ratio_pkd" in dev_ap:
        chosen.append("mse_ratio_pkd")
    return chosen


# ------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------
class DiagnosisStudy(Study):
    """The study's run machinery, writing into the diagnosis's output, with the study's teacher
    and data (its ``runs/teacher`` and ``data/``) rather than copies of them."""

    def __init__(self, args, preset):
        super().__init__(args, preset, set())
        one = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.env = one  # the study's runs trained on one thread each
        main_args = argparse.Namespace(**vars(args))
        main_args.output = os.path.abspath(args.study)
        main_args.restore_from = None
        self.main = Study(main_args, preset, set())
        self.main.env = one
        data = os.path.join(main_args.output, "data")
        i = self.data_opts.index("DATASETS.SYNTHETIC_ROOT")
        self.data_opts[i + 1] = data

    def run_teacher(self):
        try:
            self.main.run_teacher()
            self.results["teacher"] = self.main.results["teacher"]
        finally:
            self.event("teacher").set()

    def teacher_weights(self):
        self.main.teacher_weights()

    def variant_run(self, name, opts, seed, out_kind):
        """Train (or reuse) one run of ``opts`` at ``seed`` into ``runs/<out_kind>/<name>``; its
        record gains ``kd_terms``."""
        from kd_det.utils.runs import STAMP

        out = os.path.join(self.args.output, "runs", out_kind, name, f"seed{seed}")
        size = list(plan.STUDENT_SIZE)
        iters = self.preset["iters"]
        extra = list(opts) + list(self.args.opts)  # as the study's dev trials add them
        all_opts = self.data_opts + self.sched(iters) + ["SEED", str(seed)] + size + extra
        params = dict(self.base, iters=iters, seed=seed, opts=size + extra)
        run = self.train(f"{name}/seed{seed}", plan.KD, all_opts, out, params, True)
        if run is None:
            return None
        if os.path.exists(os.path.join(out, STAMP)):
            terms = kd_terms(out)
            if terms is not None:
                rec_path = ledger.record_path(self.args.output, out)
                run["record"] = ledger.save(rec_path, kd_terms=terms)
        self.report(f"{name} seed {seed}", run)
        return run


def study_results(study_dir):
    """The method study's ``results.json`` (test runs of the student alone and the picks)."""
    with open(os.path.join(study_dir, "results.json")) as f:
        return json.load(f)


def study_dev_record(study_dir, trial):
    """The study's ledger record of dev trial ``family/name`` (None if missing)."""
    return ledger.load(os.path.join(study_dir, "ledger", "dev", trial, "seed0.json"))


def main(argv=None):
    args = parse_args(argv)
    args.output = os.path.abspath(args.output)
    args.study = os.path.abspath(args.study)
    if args.list:
        for v in VARIANTS:
            print(f"{v.name:15s} {v.factor:14s} {' '.join(v.opts)}")
        return
    # Study's interface: fields it reads from its own argparse namespace.
    args.jobs, args.restore_from = 1, None
    preset = dict(PRESETS[args.preset])
    if not args.report_only:  # the study's data, regenerated if this machine lacks it (seeded)
        from kd_det.data.synthetic import generate_dataset

        generate_dataset(os.path.join(args.study, "data"), preset["num_train"],
                         preset["num_dev"], preset["image_size"], 0,
                         num_test=preset["num_test"])  # fmt: skip
    study = DiagnosisStudy(args, preset)
    study.run_teacher()
    if study.results["teacher"] is None:
        raise SystemExit(f"No teacher: {args.study} has neither its weights nor its record.")
    chosen = {v.name for v in VARIANTS if args.variants is None or v.name in args.variants}
    study.progress["total"] = len(VARIANTS)
    pkd_rec = study_dev_record(args.study, "pkd/w12.0") or {}
    runs, weights = {}, {}
    # Variants outside --variants are only reused (never trained), so the report keeps them all.
    for v in VARIANTS:
        if MATCHED in v.opts and v.ratio_of not in weights:
            ref = (runs.get(v.ratio_of) or {}).get("record") or {}
            r_ref = (ref.get("kd_detection_ratio") or [None])[0]
            r_pkd = (pkd_rec.get("kd_detection_ratio") or [None])[0]
            if r_ref and r_pkd:
                weights[v.ratio_of] = matched_weight(r_ref, r_pkd)
        opts = expand(v, weights.get(v.ratio_of))
        if opts is None:
            if v.name in chosen:
                print(f"[diagnosis] {v.name}: needs the {v.ratio_of} run's ratio first; skipped",
                      flush=True)  # fmt: skip
            continue
        with _reuse_only(study, v.name not in chosen):
            runs[v.name] = study.variant_run(v.name, opts, 0, "dev")
        if runs[v.name] is not None:
            runs[v.name]["opts"] = opts
    dev_ap = {n: r["dev"]["AP"] for n, r in runs.items() if r is not None}
    names = test_variants(dev_ap) if args.test_variants is None else args.test_variants
    tests = {}
    for name in names:
        seeds = []
        for seed in args.seeds:
            run = runs.get(name) if seed == 0 else None
            with _reuse_only(study, args.test_variants is None and name not in chosen):
                if seed != 0 and runs.get(name) is not None:
                    run = study.variant_run(name, runs[name]["opts"], seed, "final")
                run = study.test(run)
            if run is not None:
                run["seed"] = seed
                seeds.append(run)
        tests[name] = seeds
    matched = {v.name: weights[v.ratio_of] for v in VARIANTS
               if MATCHED in v.opts and v.ratio_of in weights}  # fmt: skip
    res = assemble(study, runs, tests, matched, pkd_rec, args, preset)
    write(res, args.output)
    print(open(os.path.join(args.output, "results.md")).read())


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def _slim(run, output):
    rec = run.get("record") or {}
    return {
        "seed": run.get("seed", 0),
        "out": os.path.relpath(run["out"], output),
        "dev": run["dev"],
        "test": run.get("test") or rec.get("test"),
        "seconds": run.get("seconds"),
        "curve": run.get("curve"),
        "kd_detection_ratio": rec.get("kd_detection_ratio"),
        "train_detection_loss_end": rec.get("train_detection_loss_end"),
        "kd_terms": rec.get("kd_terms"),
    }


@contextlib.contextmanager
def _reuse_only(study, on):
    """While ``on``, the study reuses finished runs and trains nothing (as with --report-only)."""
    saved = study.args.report_only
    study.args.report_only = saved or on
    try:
        yield
    finally:
        study.args.report_only = saved


def assemble(study, runs, tests, matched, pkd_rec, args, preset):
    """Everything the report shows, as JSON (every AP names its split)."""
    main = study_results(args.study)
    t = study.results["teacher"] or {}
    res = {"preset": preset, "splits": {"dev": "val (every choice)", "test": "test (reported)"},
           "teacher": {"dev_AP": t.get("dev", {}).get("AP"),
                       "test_AP": (t.get("test") or {}).get("AP")},
           "matched_weight": matched.get("ratio_pkd"), "matched_weights": matched,
           "pkd_ratio_study": pkd_rec.get("kd_detection_ratio"),
           "variants": {}, "test": {}, "study_test": {}}  # fmt: skip
    for v in VARIANTS:
        run = runs.get(v.name)
        if run is None:
            continue
        entry = dict(_slim(run, args.output), factor=v.factor, label=v.label, opts=run.get("opts"))
        if v.study_trial:
            rec = study_dev_record(args.study, v.study_trial) or {}
            entry["study_trial"] = v.study_trial
            entry["study_dev_AP"] = (rec.get("dev") or {}).get("AP")
        res["variants"][v.name] = entry
    for name, seeds in tests.items():
        res["test"][name] = [_slim(r, args.output) for r in seeds]
    for m in ("student", "mse", "ssim", "pkd"):
        res["study_test"][m] = [(r.get("test") or {}).get("AP")
                                for r in main["methods"].get(m, {}).get("runs", [])]  # fmt: skip
    return res


def _f(v, d=2):
    return "n/a" if v is None else f"{v:.{d}f}"


def _per_level(terms, idx):
    """``p2 0.31, p3 ...`` of the FPN terms at part ``idx`` of training."""
    if not terms:
        return "n/a"
    parts = []
    for name, vals in sorted(terms["terms"].items()):
        if name.startswith("loss_kd_fpn_") and len(vals) > abs(idx):
            parts.append(f"{name[len('loss_kd_fpn_'):]} {vals[idx]:.3f}")
    return ", ".join(parts) or "n/a"


def _vs(a, b):
    diff, se = verdicts.welch(a, b)
    if diff is None:
        return ""
    if se is None:
        return f"{diff:+.1f}"
    return f"{diff:+.1f} +- {se:.1f}{' *' if se > 0 and abs(diff) > 2 * se else ''}"


def markdown(res):
    v = res["variants"]
    tuned = (v.get("tuned") or {}).get("dev", {}).get("AP")
    lines = [
        "# SSIM diagnosis (issue 29): one factor at a time from the tuned SSIM setting",
        "",
        f"Dev split, seed 0, the study's teacher (dev AP {_f(res['teacher']['dev_AP'], 1)}) and "
        f"schedule ({res['preset']['iters']} iterations, {res['preset']['image_size']} px). "
        "Rebuild: `python -m method_study.ssim_diagnosis --report-only`.",
        "",
        "| variant | factor | dev AP | vs tuned SSIM | KD/det ratio, first tenth | last tenth "
        "| per-level KD loss, first tenth | last tenth | det. loss, end | min |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in v.items():
        ap = e["dev"]["AP"]
        ratio = e.get("kd_detection_ratio") or [None, None]
        delta = "" if tuned is None or name == "tuned" else f"{ap - tuned:+.1f}"
        terms = e.get("kd_terms")
        lines.append(
            f"| {e['label']} (`{name}`) | {e['factor']} | {ap:.1f} | {delta} | {_f(ratio[0])} | "
            f"{_f(ratio[1])} | {_per_level(terms, 0)} | {_per_level(terms, -1)} | "
            f"{_f(e.get('train_detection_loss_end'))} | {_f((e.get('seconds') or 0) / 60, 0)} |"
        )
    lines += ["", "KD/det ratio: the `loss_kd_*` terms over the detection losses "
              "(kd_det.utils.loss_balance), mean over the first / last tenth of the logged rows. "
              "Per-level KD loss: each `loss_kd_fpn_<level>` as trained (weight included); a level "
              "that is skipped (P6 at window 7) logs 0. Every tenth is in results.json "
              "(`kd_terms`) and kd_terms.png."]  # fmt: skip
    r_pkd = _f((res.get("pkd_ratio_study") or [None])[0])
    for name, w in (res.get("matched_weights") or {}).items():
        ref = BY_NAME[name].ratio_of
        lines += ["", f"Balance (`{name}`): weight {w} = 3 x PKD's first-tenth ratio {r_pkd} "
                  f"(study record `ledger/dev/pkd/w12.0`) / the `{ref}` run's."]  # fmt: skip
    repro = [
        f"`{n}` {_f(e['dev']['AP'], 4)} vs the study's `{e['study_trial']}` "
        f"{_f(e.get('study_dev_AP'), 4)}"
        for n, e in v.items()
        if e.get("study_trial")
    ]
    if repro:
        lines += ["", "Reproduction of the study's dev trials (same parameters): "
                  + "; ".join(repro) + "."]  # fmt: skip
    st = res["study_test"]
    lines += ["", "## On test (seeds as in the study)", "",
              "| method | seeds | test AP | vs student alone | vs MSE | vs tuned SSIM | vs PKD |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip

    def row(label, aps):
        mean, sd = report.summarize(aps)
        cell = "n/a" if mean is None else f"{mean:.1f} +- {sd:.1f}"
        vs = " | ".join(_vs(aps, st[m]) for m in ("student", "mse", "ssim", "pkd"))
        return f"| {label} | {len(aps)} | {cell} | {vs} |"

    for m, label in (("student", "student alone (study)"), ("mse", "+ MSE (study)"),
                     ("ssim", "+ tuned SSIM (study)"), ("pkd", "+ PKD (study)")):  # fmt: skip
        lines.append(row(label, [a for a in st[m] if a is not None]))
    for name, seeds in res["test"].items():
        aps = [r["test"]["AP"] for r in seeds if r.get("test")]
        lines.append(row(f"+ {BY_NAME[name].label} (`{name}`)", aps))
    lines += ["", "Differences: mean test AP difference +- its Welch standard error; `*` beyond "
              "two standard errors. Seed 0 of a variant is its dev run."]  # fmt: skip
    expected = len(VARIANTS)
    if len(v) < expected or any(len(s) < 3 for s in res["test"].values()):
        lines += ["", f"**Partial**: {len(v)} of {expected} dev variants finished."]
    return "\n".join(lines) + "\n"


def plot_kd_terms(res, path):
    """Per-level KD loss (and the KD/det ratio) over training, one panel per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [(n, e) for n, e in res["variants"].items() if e.get("kd_terms")]
    if not items:
        return
    cols = 4
    rows = (len(items) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (name, e) in zip(axes.flat, items):
        t = e["kd_terms"]
        for term, vals in sorted(t["terms"].items()):
            ax.plot(t["iteration"], vals, ".-", label=term.replace("loss_kd_fpn_", ""))
        ax.set_title(f"{name}: dev AP {e['dev']['AP']:.1f}", fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax2 = ax.twinx()
        ax2.plot(t["iteration"], t["ratio"], "k--", label="KD/det")
        ax2.tick_params(labelsize=7)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper right")
    for ax in list(axes.flat)[len(items) :]:
        ax.axis("off")
    fig.suptitle("per-level KD loss (lines, left axis) and KD/detection ratio (dashed, right)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write(res, output):
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, "results.json")
    count = lambda r: len(r["variants"]) + sum(len(s) for s in r["test"].values())  # noqa: E731
    ledger.refuse_to_shrink(path, res, count)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(output, "results.md"), "w") as f:
        f.write(markdown(res))
    plot_kd_terms(res, os.path.join(output, "kd_terms.png"))


if __name__ == "__main__":
    main()
