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

The tables and the figure are :mod:`method_study.ssim_diagnosis_report`'s. Runs are the study's
(:class:`method_study.run_study.Study`): resumable ``tools/train_net.py``
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

from . import RESULTS, ledger, plan
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
    names = test_variants(dev_ap) if args.test_variants is None else list(args.test_variants)
    # Variants an earlier call settled on test stay in the report, in its order, reused and never
    # trained: a call that settles one more variant must not drop (or be refused for dropping)
    # the others, and a rebuild gives the same table.
    earlier = [n for n in reported_test_variants(args.output) if n in BY_NAME]
    tests = {}
    for name in earlier + [n for n in names if n not in earlier]:
        seeds = []
        reuse_only = (args.test_variants is None and name not in chosen) or name not in names
        for seed in args.seeds:
            run = runs.get(name) if seed == 0 else None
            with _reuse_only(study, reuse_only):
                if seed != 0 and runs.get(name) is not None:
                    run = study.variant_run(name, runs[name]["opts"], seed, "final")
                run = study.test(run)
            if run is not None:
                run["seed"] = seed
                seeds.append(run)
        tests[name] = seeds
    matched = {v.name: weights[v.ratio_of] for v in VARIANTS
               if MATCHED in v.opts and v.ratio_of in weights}  # fmt: skip
    from .ssim_diagnosis_report import assemble, write

    res = assemble(study, runs, tests, matched, pkd_rec, args, preset)
    write(res, args.output)
    print(open(os.path.join(args.output, "results.md")).read())


def reported_test_variants(output):
    """The variants settled on test in ``<output>/results.json`` (none without one)."""
    path = os.path.join(output, "results.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(json.load(f).get("test", {}))


@contextlib.contextmanager
def _reuse_only(study, on):
    """While ``on``, the study reuses finished runs and trains nothing (as with --report-only)."""
    saved = study.args.report_only
    study.args.report_only = saved or on
    try:
        yield
    finally:
        study.args.report_only = saved


if __name__ == "__main__":
    main()
