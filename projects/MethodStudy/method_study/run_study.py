"""The method study: a dev sweep of every kd_det method, then three seeds of each on test.

One command, resumable (each run is a ``tools/train_net.py`` process whose finished result is
reused when nothing that defines it changed; an interrupted run resumes bit-identically from its
last checkpoint). The protocol and the trials are in :mod:`method_study.plan`. Each finished run
also leaves a small record in ``<output>/ledger/`` (:mod:`method_study.ledger`; committed, unlike
``runs/``), from which the reports are built and a fresh clone resumes. Writes into ``--output``:

* ``dev_sweep.md``: every trial of every family with its final dev AP, and the pick;
* ``results.md`` / ``results.json``: test AP (mean +- std over seeds), gap closed, wall time; a
  table written while runs are missing says it is partial;
* ``ap_curves.png``: dev AP against iteration for the teacher and every method (mean of seeds);
* ``dev_sweep.png``: dev AP against iteration for every trial of the dev sweep, by family;
* ``eval_noise``: the bootstrap spread of test AP over test images, next to the seed spread.

    python -m method_study.run_study --jobs 2          # the README's study (see its wall time)
    python -m method_study.run_study --report-only     # tables of what has finished so far
    python -m method_study.run_study --restore-from projects/MethodStudy/results/results.json
    python -m method_study.run_study --preset quick --families ssim mix --max-trials 2   # smoke
"""

import argparse
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from kd_det.collect_env import cpu_model

from . import REPO, RESULTS, ledger, plan, report

#: The README's study: generated scenes of 128 px (README, "Method study", for why these sizes).
FULL = dict(num_train=400, num_dev=300, num_test=300, image_size=128, teacher_iters=3000,
            iters=1000, batch=8, evals=5)  # fmt: skip
#: A smoke-test size (projects/MethodStudy/tests/test_run_study.py).
QUICK = dict(num_train=8, num_dev=4, num_test=4, image_size=64, teacher_iters=2, iters=2,
             batch=2, evals=1)  # fmt: skip
PRESETS = {"full": FULL, "quick": QUICK}
DATA_NAMES = {"train": "synthetic_study_train", "dev": "synthetic_study_val",
              "test": "synthetic_study_test"}  # fmt: skip


def parse_args(argv=None, output=RESULTS, presets=None, description=None):
    """The study's command line; ``output`` and ``presets`` are a family driver's defaults
    (:mod:`method_study.run_retinanet`)."""
    presets = presets or PRESETS
    p = argparse.ArgumentParser(description=description or __doc__.split("\n\n")[0])
    p.add_argument("--output", default=output)
    p.add_argument("--preset", choices=sorted(presets), default="full")
    for k in FULL:
        p.add_argument("--" + k.replace("_", "-"), type=int, default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--families",
        nargs="+",
        default=None,
        help="limit the study to these families (and the finals built from them)",
    )
    p.add_argument(
        "--max-trials",
        type=int,
        default=0,
        help="at most this many trials per family (smoke tests; breaks equal budgets)",
    )
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained side by side, each with cores/jobs threads")  # fmt: skip
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: tabulate the runs that finished")  # fmt: skip
    p.add_argument("--force", action="store_true", help="retrain finished runs")
    p.add_argument(
        "--restore-from",
        default=None,
        metavar="RESULTS_JSON",
        help="write the ledger records of the runs an earlier results.json holds (for a study "
        "whose runs/ is lost), then report; trains nothing",
    )
    p.add_argument("--opts", nargs="+", default=[],
                   help="KEY VALUE overrides added to every run but the teacher")  # fmt: skip
    p.add_argument("--list", action="store_true", help="print the plan and exit")
    return p.parse_args(argv)


def select(args, preset, study_plan=plan):
    """The dev trials and finals this invocation covers."""
    trials = study_plan.dev_trials(preset["iters"])
    finals = study_plan.finals()
    if args.families:
        fams = set(args.families)
        unknown = fams - {t.family for t in trials} - {f.name for f in finals}
        if unknown:
            raise SystemExit(
                f"Unknown families {sorted(unknown)}; choose from "
                f"{sorted({t.family for t in trials} | {f.name for f in finals})}."
            )
        trials = [t for t in trials if t.family in fams]
        # The student, the named finals, and the finals built only from named families' picks.
        picks_of = lambda f: [o[6:] for o in f.opts if o.startswith("@pick:")]  # noqa: E731
        finals = [f for f in finals if f.name in fams or f.name == "student" or picks_of(f)
                  or f.reuses.split("/")[0] in fams]  # fmt: skip
    if args.max_trials:
        kept, count = [], {}
        for t in trials:
            count[t.family] = count.get(t.family, 0) + 1
            if count[t.family] <= args.max_trials:
                kept.append(t)
        trials = kept
    have = {t.family for t in trials}

    def ok(needs):  # every pick these options name can be made by this invocation
        feature = plan.FEATURE and have & set(study_plan.FEATURE_FAMILIES)
        return all(n in have or (n == plan.FEATURE and feature) for n in needs)

    trials = [t for t in trials if ok(t.needs())]
    keys = {t.key for t in trials}  # a final whose seed 0 is one named trial needs that trial
    finals = [f for f in finals if ok([o[6:] for o in f.opts if o.startswith("@pick:")])
              and ("/" not in f.reuses or f.reuses in keys)]  # fmt: skip
    return trials, finals


#: How far a retrained teacher's dev AP may lie from its record when another CPU model trained it
#: (or the record does not say which). Round-off differs in the last bits between CPU vendors
#: (docs/reproducibility.md) and 3000 SGD steps amplify it into a different run, as a new seed
#: would; the study's seed spread of the student is 0.9 AP (std over 3 seeds), so a teacher
#: within 1 AP is the same teacher for its students' purposes. Not measured across vendors here.
TEACHER_AP_TOLERANCE = 1.0


def check_teacher(dev, record, cpu=None):
    """Check a retrained teacher against its ledger record (its recorded students were distilled
    from the recorded teacher).

    On the CPU model that wrote the record, training is deterministic, so the dev AP must be bit
    for bit the same. On another CPU model (or a record that names none), it must lie within
    :data:`TEACHER_AP_TOLERANCE`; the run continues with a note.

    Returns:
        str or None: the note logged when the teacher was accepted within the tolerance.

    Raises:
        RuntimeError: what differs, where, and why; the fix (``--force``) in the message.
    """
    if record is None:
        return None
    want, got = record.get("dev", {}).get("AP"), dev["AP"]
    if want == got:
        return None
    here, there = cpu or cpu_model(), record.get("cpu")
    if here and here == there:
        raise RuntimeError(
            f"The retrained teacher's dev AP {got!r} differs from its ledger record's {want!r}, "
            f"on the CPU model that recorded it ({here}): training should repeat bit for bit "
            "there, so the code or the data changed. Its students would mix two teachers. Rerun "
            "with --force to retrain every run from one teacher."
        )
    where = f"this CPU ({here or 'unknown'}) is not the recording one ({there or 'not recorded'})"
    if want is None or not abs(got - want) <= TEACHER_AP_TOLERANCE:
        raise RuntimeError(
            f"The retrained teacher's dev AP {got!r} differs from its ledger record's {want!r} by "
            f"more than {TEACHER_AP_TOLERANCE} AP; {where}, and its round-off changed the run "
            "more than a new seed usually does. Its students would mix two different teachers. "
            "Rerun with --force to retrain every run from one teacher on this machine."
        )
    note = (
        f"[study] note: the retrained teacher's dev AP {got!r} differs from its record's {want!r} "
        f"by {abs(got - want):.2f} AP, within the {TEACHER_AP_TOLERANCE} AP allowed across CPU "
        f"models: {where}. Recorded students keep their results; new students learn from this "
        "teacher."
    )
    print(note, flush=True)
    return note


class Study:
    """Schedules the runs (dependencies by events), remembers their results, writes reports."""

    def __init__(self, args, preset, trial_families, study_plan=plan):
        from kd_det.utils.runs import schedule_opts

        self.args, self.preset, self.plan = args, preset, study_plan
        self.trial_families = set(trial_families)
        self.env = None
        if args.jobs > 1:
            threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
            self.env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        data = os.path.join(args.output, "data")
        self.data_opts = ["DATASETS.SYNTHETIC_ROOT", data, "DATASETS.TRAIN",
                          f"('{DATA_NAMES['train']}',)", "DATASETS.TEST",
                          f"('{DATA_NAMES['dev']}',)", "DATALOADER.NUM_WORKERS", "0"]  # fmt: skip
        keys = ("num_train", "num_dev", "num_test", "image_size", "batch")
        self.base = {k: preset[k] for k in keys}

        def sched(iters):
            period = max(1, iters // preset["evals"])
            return schedule_opts(iters, preset["batch"], preset["image_size"]) + [
                "TEST.EVAL_PERIOD", str(period)]  # fmt: skip

        self.sched = sched
        self.lock = threading.Lock()
        self.test_locks = {}  # run folder -> threading.Lock (see :meth:`test`)
        self.done = {}  # key -> threading.Event
        self.results = {"teacher": None, "dev": {}, "final": {}}
        self.t0 = time.time()
        self.progress = {"done": 0, "trained": 0, "total": 0}
        self.teacher_lock = threading.Lock()
        self.restore_from, self.restore_name = None, None
        if args.restore_from:
            with open(args.restore_from) as f:
                self.restore_from = json.load(f)
            self.restore_name = os.path.relpath(os.path.abspath(args.restore_from), REPO)

    # -- bookkeeping --------------------------------------------------------------------------
    def event(self, key):
        with self.lock:
            return self.done.setdefault(key, threading.Event())

    def report(self, name, run):
        with self.lock:  # invocations.json too: runs finish side by side at --jobs 2
            self.progress["done"] += 1
            self.progress["trained"] += not run["reused"]
            p = dict(self.progress)
            if not run["reused"]:
                report.record_invocation(self.args.output, self.t0, self.args.jobs, p["trained"])
        elapsed = time.time() - self.t0
        eta = (f"{elapsed / p['trained'] * (p['total'] - p['done']) / 60:.0f} min"
               if p["trained"] else "n/a")  # fmt: skip
        print(f"[study] {p['done']}/{p['total']} done: {name} (elapsed {elapsed / 60:.0f} min, "
              f"ETA {eta})", flush=True)  # fmt: skip

    # -- one run ------------------------------------------------------------------------------
    def train(self, name, config, opts, out, params, teacher_needed, use_record=True):
        """Train one run, or reuse it: from its output directory (stamp) or from its ledger
        record (:mod:`method_study.ledger`). A run that must train and needs a teacher whose
        weights are gone (a fresh clone) retrains the teacher first (:meth:`teacher_weights`)."""
        from kd_det.utils.runs import finished_run, train_and_evaluate, with_config_digest

        if teacher_needed:
            self.event("teacher").wait()
            t = self.results["teacher"]
            if not t:
                return None
            opts = list(opts) + ["MODEL.KD.TEACHER.WEIGHTS", t["weights"]]
            params = dict(params, teacher=t["identity"])
        full = with_config_digest(config, params, REPO)
        rec_path = ledger.record_path(self.args.output, out)
        self.restore(rec_path, out, full)
        recipe = dict(name=name, config=config, opts=opts, out=out, params=params,
                      teacher_needed=teacher_needed)  # fmt: skip
        stamped = not self.args.force and finished_run(out, full) is not None
        rec = ledger.load(rec_path, full) if use_record and not self.args.force else None
        if rec is not None and not stamped:
            print(f"[run] {name}: reusing its ledger record {rec_path}", flush=True)
            return {"dev": rec["dev"], "seconds": rec["seconds"], "curve": rec.get("curve"),
                    "reused": True, "out": out, "record": rec, "recipe": recipe}  # fmt: skip
        if teacher_needed and not stamped and not self.args.report_only:
            self.teacher_weights()
        run = train_and_evaluate(name, config, opts, out, params, self.args.force, quiet=True,
                                 env=self.env, finished_only=self.args.report_only,
                                 repo=REPO)  # fmt: skip
        if run is None:
            return None
        run["dev"] = run.pop("bbox")
        # Every process that trained it (resumes included), not only this invocation's.
        run["seconds"] = report.log_seconds(os.path.join(out, "log.txt")) or run["seconds"]
        run["curve"] = report.ap_curve(os.path.join(out, "metrics.json"))
        run["out"] = out
        run["recipe"] = recipe
        if name == "teacher":
            prior = ledger.load(rec_path, full)
            check_teacher(run["dev"], prior)
            if prior is not None:
                # A retrain that recreated lost weights: the record keeps the run the report is
                # about (its time, CPU and test), which check_teacher has just reproduced.
                run.update(dev=prior["dev"], seconds=prior["seconds"], record=prior)
                return run
        fresh = {} if run["reused"] else {"test": None, "test_bootstrap_std": None,
                                          "cpu": cpu_model()}  # fmt: skip
        run["record"] = ledger.save(
            rec_path, params=full, dev=run["dev"], seconds=run["seconds"], curve=run["curve"],
            train_detection_loss_end=report.detection_loss_end(out),
            kd_detection_ratio=report.kd_detection_ratio(out),
            source=(ledger.load(rec_path) or {}).get("source", "trained") if run["reused"]
            else "trained", **fresh)  # fmt: skip
        return run

    def restore(self, rec_path, out, params):
        """``--restore-from``: write the record of a run that an earlier results.json holds."""
        if self.restore_from is None or os.path.exists(rec_path):
            return
        rel = os.path.relpath(out, os.path.join(self.args.output, "runs"))
        fields = ledger.restored_fields(self.restore_from, rel)
        if fields:
            ledger.save(rec_path, params=params, source=f"restored from {self.restore_name}",
                        **fields)  # fmt: skip

    def teacher_weights(self):
        """Make sure the teacher's weights exist: retrain a teacher known only from its record,
        once, and check it reproduces the recorded dev AP bit for bit (its students were
        distilled from that teacher)."""
        from kd_det.utils.runs import STAMP, train_and_evaluate

        with self.teacher_lock:
            t = self.results["teacher"]
            if os.path.exists(t["weights"]):
                return
            print("[study] the teacher's weights are missing (its ledger record has no weights); "
                  "retraining it before the first student that must train", flush=True)  # fmt: skip
            r = t["recipe"]
            run = train_and_evaluate("teacher (weights)", r["config"], r["opts"], r["out"],
                                     r["params"], force=os.path.exists(os.path.join(
                                         r["out"], STAMP)), quiet=True, env=self.env,
                                     repo=REPO)  # fmt: skip
            check_teacher(run["bbox"], t["record"])

    def test(self, run):
        """Evaluate a finished run on the test split with its own config (cached next to its
        weights, and in its ledger record). A run known only from its record and without a test
        result is retrained first (outside ``--report-only``)."""
        if run is None:
            return None
        rec = run.get("record") or {}
        weights = os.path.join(run["out"], "model_final.pth")
        if not os.path.exists(weights):
            if rec.get("test") is not None or self.args.report_only:
                run["test"] = rec.get("test")
                return run
            r = run["recipe"]
            print(f"[run] {r['name']}: its record has no test result and its weights are gone; "
                  "retraining it", flush=True)  # fmt: skip
            keep = {k: run[k] for k in ("reused_dev_trial", "seed", "opts", "trial") if k in run}
            run = dict(self.train(**r, use_record=False), **keep)
            if run["dev"]["AP"] != rec.get("dev", {}).get("AP"):
                print(f"[run] {r['name']}: WARNING: retrained, its dev AP {run['dev']['AP']!r} "
                      f"differs from its record's {rec.get('dev', {}).get('AP')!r}; training did "
                      "not reproduce", flush=True)  # fmt: skip
        root = ["DATASETS.SYNTHETIC_ROOT", self.data_opts[1]]  # the data where it is now
        # Two finals may stand on one dev run (a family's pick that is also a paper's setting):
        # one evaluation and record update per run folder at a time; the second reads the first's
        # cache.
        with self.lock:
            folder_lock = self.test_locks.setdefault(run["out"], threading.Lock())
        with folder_lock:
            run["test"] = report.evaluate_on_test(run["out"], DATA_NAMES["test"], env=self.env,
                                                  finished_only=self.args.report_only,
                                                  opts=root)  # fmt: skip
            if run["test"] is not None:
                rec_path = ledger.record_path(self.args.output, run["out"])
                run["record"] = ledger.save(rec_path, test=run["test"])
            else:  # --report-only and no evaluation cached beside the weights: the recorded one
                run["test"] = (run.get("record") or {}).get("test")
        return run

    # -- stages -------------------------------------------------------------------------------
    def run_teacher(self):
        try:
            iters = self.preset["teacher_iters"]
            out = os.path.join(self.args.output, "runs", "teacher")
            run = self.train("teacher", self.plan.TEACHER, self.data_opts + self.sched(iters)
                             + ["SEED", "42"], out, dict(self.base, iters=iters, seed=42),
                             False)  # fmt: skip
            if run is not None:
                run["weights"] = os.path.join(out, "model_final.pth")
                # Students are keyed by how their teacher was made, not by its file: training is
                # bit-reproducible (tests/engine/test_resume.py), so a teacher retrained from the
                # same recipe (:meth:`teacher_weights` checks it) is the same teacher.
                run["identity"] = ledger.identity(run["record"]["params"])
                run = self.test(run)
                self.report("teacher", run)
            self.results["teacher"] = run
        finally:
            self.event("teacher").set()

    def picks(self, families):
        """Wait for the sweeps of ``families`` and return ``{family: picked Trial}``, including
        the picks that those picks' own options name (the multi-level pick may be "with the best
        feature loss", ``@pick:feature``), so :func:`study_plan.expand` can resolve every one."""
        return plan.resolve_picks(families, self._pick)

    def _pick(self, fam):
        """The picked trial of one family (or of the best feature loss), None if there is none."""
        if fam == plan.FEATURE:
            fams = [f for f in self.plan.FEATURE_FAMILIES if f in self.trial_families]
            for f in fams:
                self.event(f"pick:{f}").wait()
            chosen = {f: self.results["dev"][f]["pick_trial"] for f in fams
                      if self.results["dev"].get(f, {}).get("pick_trial")}  # fmt: skip
            if not chosen:
                return None
            return chosen[plan.best_feature({f: self.results["dev"][f]["pick_ap"] for f in chosen})]
        self.event(f"pick:{fam}").wait()
        return self.results["dev"].get(fam, {}).get("pick_trial")

    def run_trial(self, trial):
        try:
            picks = self.picks(trial.needs())
            if picks is None:
                return None
            opts = plan.expand(trial.opts, picks)
            out = os.path.join(self.args.output, "runs", "dev", trial.family, trial.name, "seed0")
            size = list(self.plan.student_opts(trial.config))
            all_opts = (
                self.data_opts + self.sched(self.preset["iters"]) + ["SEED", "0"] + size + opts
            )
            params = dict(self.base, iters=self.preset["iters"], seed=0,
                          opts=size + opts + self.args.opts)  # fmt: skip
            run = self.train(trial.key, trial.config, all_opts + self.args.opts, out, params,
                             trial.teacher)  # fmt: skip
            if run is not None:
                run.update(trial=trial.name, opts=opts)
                self.report(trial.key, run)
            with self.lock:
                self.results["dev"].setdefault(trial.family, {"trials": {}})["trials"][
                    trial.name
                ] = run
            return run
        finally:
            self.event(f"trial:{trial.key}").set()

    def close_family(self, family, trials):
        """Once every trial of ``family`` finished: the pick (best final dev AP)."""
        try:
            for t in trials:
                self.event(f"trial:{t.key}").wait()
            runs = self.results["dev"].get(family, {}).get("trials", {})
            best = None
            for t in trials:  # trial order breaks ties
                r = runs.get(t.name)
                if r is not None and (best is None or r["dev"]["AP"] > best[1]):
                    best = (t, r["dev"]["AP"])
            entry = self.results["dev"].setdefault(family, {"trials": {}})
            entry["complete"] = all(runs.get(t.name) is not None for t in trials)
            if best is not None and entry["complete"]:
                entry.update(pick=best[0].name, pick_trial=best[0], pick_ap=best[1])
        finally:
            self.event(f"pick:{family}").set()

    def run_final(self, final, seed):
        needs = [o[6:] for o in final.opts if o.startswith("@pick:")]
        picks = self.picks(needs)
        if picks is None:
            return None
        opts = list(self.plan.student_opts(final.config)) + plan.expand(final.opts, picks)
        if final.reuses and seed == 0:
            if "/" in final.reuses:  # one named trial (a paper's setting), with the same opts
                self.event(f"trial:{final.reuses}").wait()
                fam, name = final.reuses.split("/")
            else:
                fam, name = final.reuses, picks[final.reuses].name
            run = self.results["dev"].get(fam, {}).get("trials", {}).get(name)
            if run is None:
                return None
            run = dict(run, reused_dev_trial=f"{fam}/{name}")
        else:
            out = os.path.join(self.args.output, "runs", "final", final.name, f"seed{seed}")
            all_opts = self.data_opts + self.sched(self.preset["iters"]) + ["SEED", str(seed)]
            params = dict(self.base, iters=self.preset["iters"], seed=seed,
                          opts=opts + self.args.opts)  # fmt: skip
            run = self.train(
                f"{final.name}/seed{seed}",
                final.config,
                all_opts + opts + self.args.opts,
                out,
                params,
                final.teacher,
            )
            if run is not None:
                self.report(f"{final.name} seed {seed}", run)
        if run is None:
            return None
        # --eval-only builds a distillation config's student without its teacher.
        run = self.test(run)
        if run is not None:
            run.update(seed=seed, opts=opts)
        return run


def main(argv=None, study_plan=plan, presets=None, output=RESULTS, description=None):
    """Run (or report) the study of ``study_plan``: :mod:`method_study.plan` (Faster R-CNN, the
    default) or a family's plan with its presets and output folder
    (:mod:`method_study.run_retinanet`)."""
    presets = presets or PRESETS
    args = parse_args(argv, output, presets, description)
    args.output = os.path.abspath(args.output)
    args.report_only = args.report_only or bool(args.restore_from)
    preset = dict(presets[args.preset])
    for k in FULL:
        if getattr(args, k) is not None:
            preset[k] = getattr(args, k)
    trials, finals = select(args, preset, study_plan)
    if args.list:
        for t in trials:
            print(f"dev   {t.key:28s} {os.path.relpath(t.config, REPO)} {' '.join(t.opts)}")
        for f in finals:
            print(f"final {f.name:28s} {os.path.relpath(f.config, REPO)} {' '.join(f.opts)}")
        return
    from kd_det.data.synthetic import generate_dataset

    if not args.report_only:
        generate_dataset(os.path.join(args.output, "data"), preset["num_train"],
                         preset["num_dev"], preset["image_size"], 0,
                         num_test=preset["num_test"])  # fmt: skip
    study = Study(args, preset, {t.family for t in trials}, study_plan)
    families = {}
    for t in trials:
        families.setdefault(t.family, []).append(t)
    needs_teacher = any(t.teacher for t in trials) or any(f.teacher for f in finals)
    final_runs = [(f, s) for f in finals for s in args.seeds
                  if not (f.reuses and s == 0)]  # fmt: skip
    study.progress["total"] = len(trials) + len(final_runs) + needs_teacher
    # Submission order is a topological order (dependencies first), so with FIFO workers a task
    # only ever waits for tasks that already started: no deadlock at any --jobs. The student
    # alone goes first, beside the teacher: its seeds and the teacher decide the regime checks
    # (plateau, gap), which should be known before the bulk of the runs.
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        jobs = []
        if needs_teacher:
            jobs.append(pool.submit(study.run_teacher))
        else:
            study.event("teacher").set()
        final_jobs = {("student", s): pool.submit(study.run_final, f, s) for f in finals
                      if f.name == "student" for s in args.seeds}  # fmt: skip
        trial_jobs = [pool.submit(study.run_trial, t) for t in trials]
        closers = threading.Thread(target=lambda: [study.close_family(fam, ts)
                                                   for fam, ts in families.items()])  # fmt: skip
        closers.start()
        final_jobs.update({(f.name, s): pool.submit(study.run_final, f, s)
                           for f, s in study_plan.start_order(finals, args.seeds)
                           if f.name != "student"})  # fmt: skip
        for j in jobs + trial_jobs:
            j.result()
        closers.join()
        for (name, seed), j in final_jobs.items():
            run = j.result()
            if run is not None:
                study.results["final"].setdefault(name, {})[seed] = run
    results = report.assemble(study, finals, families, preset, args)
    if args.families and report.drops_methods(results, args.output) and not args.force:
        # A subset invocation (e.g. to train the best methods first) adds its runs to the ledger;
        # the study's full report stays as it is until a call over every family rewrites it.
        print(f"[study] --families {' '.join(args.families)}: the runs are in the ledger; "
              f"{args.output}/results.md is left as it is (a subset report would drop the other "
              "families): `python -m method_study.run_study --report-only` rewrites "
              "it.")  # fmt: skip
        return
    report.write_all(results, args.output, allow_fewer=args.force,
                     teacher_label=study_plan.TEACHER_LABEL)  # fmt: skip
    print(open(os.path.join(args.output, "dev_sweep.md")).read())
    print(open(os.path.join(args.output, "results.md")).read())


if __name__ == "__main__":
    main()
