#!/usr/bin/env python
"""The method study: a dev sweep of every kd_det method, then three seeds of each on test.

One command, resumable (each run is a ``tools/train_net.py`` process whose finished result is
reused when nothing that defines it changed; an interrupted run resumes bit-identically from its
last checkpoint). The protocol and the trials are in ``tools/study_plan.py``. Writes into
``--output``:

* ``dev_sweep.md``: every trial of every family with its final dev AP, and the pick;
* ``results.md`` / ``results.json``: test AP (mean +- std over seeds), gap closed, wall time; a
  table written while runs are missing says it is partial;
* ``ap_curves.png``: dev AP against iteration for the teacher and every method (mean of seeds);
* ``dev_sweep.png``: dev AP against iteration for every trial of the dev sweep, by family;
* ``eval_noise``: the bootstrap spread of test AP over test images, next to the seed spread.

    python tools/run_study.py --jobs 2                 # the README's study (see its wall time)
    python tools/run_study.py --report-only            # tables of what has finished so far
    python tools/run_study.py --preset quick --families ssim mix --max-trials 2   # smoke test
"""

import argparse
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
sys.path.insert(0, TOOLS)
sys.path.insert(0, REPO)

import study_plan as plan  # noqa: E402
import study_report as report  # noqa: E402

#: The README's study: generated scenes of 128 px (README, "Method study", for why these sizes).
FULL = dict(num_train=400, num_dev=300, num_test=300, image_size=128, teacher_iters=3000,
            iters=1000, batch=8, evals=5)  # fmt: skip
#: A smoke-test size (tests/tools/test_run_study.py).
QUICK = dict(num_train=8, num_dev=4, num_test=4, image_size=64, teacher_iters=2, iters=2,
             batch=2, evals=1)  # fmt: skip
PRESETS = {"full": FULL, "quick": QUICK}
DATA_NAMES = {"train": "synthetic_study_train", "dev": "synthetic_study_val",
              "test": "synthetic_study_test"}  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=os.path.join(REPO, "study"))
    p.add_argument("--preset", choices=sorted(PRESETS), default="full")
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
    p.add_argument("--opts", nargs="+", default=[],
                   help="KEY VALUE overrides added to every run but the teacher")  # fmt: skip
    p.add_argument("--list", action="store_true", help="print the plan and exit")
    return p.parse_args(argv)


def select(args, preset):
    """The dev trials and finals this invocation covers."""
    trials = plan.dev_trials(preset["iters"])
    finals = plan.finals()
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
        finals = [f for f in finals
                  if f.name in fams or f.name == "student" or picks_of(f)]  # fmt: skip
    if args.max_trials:
        kept, count = [], {}
        for t in trials:
            count[t.family] = count.get(t.family, 0) + 1
            if count[t.family] <= args.max_trials:
                kept.append(t)
        trials = kept
    have = {t.family for t in trials}

    def ok(needs):  # every pick these options name can be made by this invocation
        feature = plan.FEATURE and have & set(plan.FEATURE_FAMILIES)
        return all(n in have or (n == plan.FEATURE and feature) for n in needs)

    trials = [t for t in trials if ok(t.needs())]
    finals = [f for f in finals if ok([o[6:] for o in f.opts if o.startswith("@pick:")])]
    return trials, finals


class Study:
    """Schedules the runs (dependencies by events), remembers their results, writes reports."""

    def __init__(self, args, preset, trial_families):
        from runs import schedule_opts

        self.args, self.preset = args, preset
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
        self.done = {}  # key -> threading.Event
        self.results = {"teacher": None, "dev": {}, "final": {}}
        self.t0 = time.time()
        self.progress = {"done": 0, "trained": 0, "total": 0}

    # -- bookkeeping --------------------------------------------------------------------------
    def event(self, key):
        with self.lock:
            return self.done.setdefault(key, threading.Event())

    def report(self, name, run):
        with self.lock:
            self.progress["done"] += 1
            self.progress["trained"] += not run["reused"]
            p = dict(self.progress)
        elapsed = time.time() - self.t0
        if not run["reused"]:
            report.record_invocation(self.args.output, self.t0, self.args.jobs, p["trained"])
        eta = (f"{elapsed / p['trained'] * (p['total'] - p['done']) / 60:.0f} min"
               if p["trained"] else "n/a")  # fmt: skip
        print(f"[study] {p['done']}/{p['total']} done: {name} (elapsed {elapsed / 60:.0f} min, "
              f"ETA {eta})", flush=True)  # fmt: skip

    # -- one run ------------------------------------------------------------------------------
    def train(self, name, config, opts, out, params, teacher_needed):
        from runs import train_and_evaluate

        if teacher_needed:
            self.event("teacher").wait()
            t = self.results["teacher"]
            if not t:
                return None
            opts = list(opts) + ["MODEL.KD.TEACHER.WEIGHTS", t["weights"]]
            params = dict(params, teacher=report.file_id(t["weights"]))
        run = train_and_evaluate(name, config, opts, out, params, self.args.force, quiet=True,
                                 env=self.env, finished_only=self.args.report_only)  # fmt: skip
        if run is None:
            return None
        run["dev"] = run.pop("bbox")
        # Every process that trained it (resumes included), not only this invocation's.
        run["seconds"] = report.log_seconds(os.path.join(out, "log.txt")) or run["seconds"]
        run["curve"] = report.ap_curve(os.path.join(out, "metrics.json"))
        run["out"] = out
        return run

    def test(self, run):
        """Evaluate a finished run on the test split with its own config (cached next to its
        weights)."""
        if run is None:
            return None
        root = ["DATASETS.SYNTHETIC_ROOT", self.data_opts[1]]  # the data where it is now
        run["test"] = report.evaluate_on_test(run["out"], DATA_NAMES["test"], env=self.env,
                                              finished_only=self.args.report_only,
                                              opts=root)  # fmt: skip
        return run

    # -- stages -------------------------------------------------------------------------------
    def run_teacher(self):
        try:
            iters = self.preset["teacher_iters"]
            out = os.path.join(self.args.output, "runs", "teacher")
            run = self.train("teacher", plan.TEACHER, self.data_opts + self.sched(iters)
                             + ["SEED", "42"], out, dict(self.base, iters=iters, seed=42),
                             False)  # fmt: skip
            if run is not None:
                run["weights"] = os.path.join(out, "model_final.pth")
                self.test(run)
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
            fams = [f for f in plan.FEATURE_FAMILIES if f in self.trial_families]
            for f in fams:
                self.event(f"pick:{f}").wait()
            chosen = {f: self.results["dev"][f]["pick_trial"] for f in fams
                      if self.results["dev"].get(f, {}).get("pick_trial")}  # fmt: skip
            if not chosen:
                return None
            dev_ap = {t.key: self.results["dev"][t.family]["pick_ap"] for t in chosen.values()}
            return plan.best_feature(chosen, dev_ap)
        self.event(f"pick:{fam}").wait()
        return self.results["dev"].get(fam, {}).get("pick_trial")

    def run_trial(self, trial):
        try:
            picks = self.picks(trial.needs())
            if picks is None:
                return None
            opts = plan.expand(trial.opts, picks)
            out = os.path.join(self.args.output, "runs", "dev", trial.family, trial.name, "seed0")
            size = list(plan.student_opts(trial.config))
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
        opts = list(plan.student_opts(final.config)) + plan.expand(final.opts, picks)
        if final.reuses and seed == 0:
            trial = picks[final.reuses]
            run = self.results["dev"][final.reuses]["trials"].get(trial.name)
            if run is None:
                return None
            run = dict(run, reused_dev_trial=trial.key)
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


def main(argv=None):
    args = parse_args(argv)
    args.output = os.path.abspath(args.output)
    preset = dict(PRESETS[args.preset])
    for k in FULL:
        if getattr(args, k) is not None:
            preset[k] = getattr(args, k)
    trials, finals = select(args, preset)
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
    study = Study(args, preset, {t.family for t in trials})
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
                           for f, s in plan.start_order(finals, args.seeds)
                           if f.name != "student"})  # fmt: skip
        for j in jobs + trial_jobs:
            j.result()
        closers.join()
        for (name, seed), j in final_jobs.items():
            run = j.result()
            if run is not None:
                study.results["final"].setdefault(name, {})[seed] = run
    results = report.assemble(study, finals, families, preset, args)
    report.write_all(results, args.output)
    print(open(os.path.join(args.output, "dev_sweep.md")).read())
    print(open(os.path.join(args.output, "results.md")).read())


if __name__ == "__main__":
    main()
