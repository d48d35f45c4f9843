"""Do the study's tuned settings hold on data kd_det's generator did not write?

The method study (:mod:`method_study.run_study`) tunes every method on dev scenes of kd_det's own
generator. A recommendation that holds only there is not a recommendation, so this tool takes the
study's tuned settings **unchanged** to a COCO-format dataset from another source (e.g. the one
:mod:`method_study.make_external_coco` writes) and trains there: the teacher (same config and
schedule as the study's), the student alone, and the study's two best methods by **dev** AP (never
by test AP), each with ``--seeds`` seeds, evaluated on that dataset's test split.

The dataset directory holds ``train.json``, ``val.json`` and ``test.json`` (COCO format); each
split's images are in ``<dir>/<split>/`` or, if that folder does not exist, in ``<dir>/images/``.
Registration goes through ``DATASETS.COCO``, exactly as a user's own data would. Runs are
resumable and reused like the study's, and kept in a committed ledger like the study's
(``<output>/ledger/``, :mod:`method_study.ledger`). Writes ``results.md`` / ``results.json`` into
``--output``.

    python -m method_study.run_generalization --data datasets/external --jobs 2
"""

import argparse
import ast
import json
import os
import statistics
import threading
from concurrent.futures import ThreadPoolExecutor

from kd_det.collect_env import cpu_model

from . import REPO, RESULTS, ledger, plan, report
from .run_study import PRESETS, check_teacher

SPLITS = ("train", "val", "test")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="directory with train/val/test.json")
    p.add_argument(
        "--study",
        default=os.path.join(RESULTS, "results.json"),
        help="the study's results.json (tuned options and dev AP of every method)",
    )
    p.add_argument("--output", default=os.path.join(RESULTS, "generalization"))
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="full",
        help="schedule sizes (iterations, batch, image size) as in run_study",
    )
    p.add_argument(
        "--methods",
        nargs="*",
        default=None,
        help="methods to run beside the student (default: the study's two best by mean dev AP); "
        "given with no names, only the teacher and the student alone are trained, which need no "
        "finished study method and so can start while the study still runs",
    )
    p.add_argument(
        "--diagnosis",
        default=os.path.join(RESULTS, "ssim_diagnosis", "results.json"),
        help="the SSIM diagnosis's results.json: methods named ssim_<variant> (or ssim_best, its "
        "best SSIM-only variant) take their options from it (method_study.ssim_diagnosis)",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])  # as the study
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--force", action="store_true",
                   help="retrain finished runs; replace a results.json with more runs")  # fmt: skip
    p.add_argument("--restore-from", default=None, metavar="RESULTS_JSON",
                   help="write the ledger records of the runs an earlier results.json holds, "
                   "then report; trains nothing")  # fmt: skip
    p.add_argument(
        "--opts",
        nargs="+",
        default=[],
        help="KEY VALUE overrides added to every run but the teacher",
    )
    return p.parse_args(argv)  # fmt: skip


def dataset_opts(data):
    """``DATASETS.*`` overrides registering ``data``'s three splits, and its class count."""
    entries = []
    for split in SPLITS:
        js = os.path.join(data, f"{split}.json")
        if not os.path.exists(js):
            raise SystemExit(f"{js} is missing: --data needs train.json, val.json and test.json "
                             "(method_study.make_external_coco writes them).")  # fmt: skip
        root = os.path.join(data, split)
        if not os.path.isdir(root):
            root = os.path.join(data, "images")
        entries.append([f"external_{split}", js, root])
    with open(entries[0][1]) as f:
        num_classes = len(json.load(f)["categories"])
    opts = ["DATASETS.COCO", str(entries), "DATASETS.TRAIN", "('external_train',)",
            "DATASETS.TEST", "('external_val',)", "DATALOADER.NUM_WORKERS", "0",
            "MODEL.ROI_HEADS.NUM_CLASSES", str(num_classes)]  # fmt: skip
    return opts, num_classes


def with_sub_model_data(opts, config, data_opts):
    """The teacher's (``MODEL.KD.TEACHER.OPTS``) and online peers' (``PEER_OPTS``) configs are
    built from their own files: give them the dataset's class count and label space too."""
    opts = list(opts)
    if config == plan.ONLINE:
        key = "MODEL.ONLINE_KD.PEER_OPTS"
        if key in opts:
            i = opts.index(key)
            opts[i + 1] = str(list(ast.literal_eval(opts[i + 1])) + data_opts)
        else:
            opts += [key, str(data_opts)]
    elif config != plan.STUDENT:
        opts += ["MODEL.KD.TEACHER.OPTS", str(data_opts)]
    return opts


def best_methods(study, k=2):
    """The ``k`` methods (not the student) with the best mean dev AP over their seeds."""
    dev = {}
    for name, m in study.get("methods", {}).items():
        aps = [r["dev"]["AP"] for r in m.get("runs", [])]
        if name != "student" and aps:
            dev[name] = statistics.mean(aps)
    return sorted(dev, key=lambda n: -dev[n])[:k], dev


def chosen_methods(names, study):
    """``(methods, dev AP by method)``: the study's two best when ``names`` is None, else ``names``
    without repeats and without the student, which always runs (an empty list trains only the
    teacher and the student alone). The dev ranking is returned either way, so that a results
    file records what the study's own choice would have been beside what was run."""
    best, dev = best_methods(study)
    methods = best if names is None else names
    return [m for m in dict.fromkeys(methods) if m != "student"], dev


def finished_count(results):
    """The teacher and the finished runs in a results dict of this tool."""
    return bool(results.get("teacher")) + sum(
        len(m["runs"]) for m in results.get("methods", {}).values()
    )


def restored_fields(results, out_rel):
    """The ledger fields of one run (``teacher`` or ``<method>/seed<s>``) as an earlier
    results.json of this tool holds them, or None."""
    if out_rel == "teacher":
        t = results.get("teacher")
        return t and {"dev": t["bbox"], "test": t.get("test"), "seconds": t["seconds"]}
    name, _, seed = out_rel.partition("/seed")
    for r in results.get("methods", {}).get(name, {}).get("runs", []):
        if str(r["seed"]) == seed:
            return {"dev": r["dev"], "test": r.get("test"), "seconds": r["seconds"]}
    return None


def diagnosis_methods(names, diag_path):
    """``{name: Final}`` for the SSIM diagnosis's variants among ``names`` (``ssim_<variant>``,
    ``ssim_best`` resolved to its best SSIM-only variant's name), with the diagnosis's options
    and the study's student size; ``names`` with ``ssim_best`` replaced. Unknown names are left to
    the caller's check."""
    from .ssim_diagnosis import BY_NAME
    from .ssim_window import best_variant

    if not names or not os.path.exists(diag_path):
        return names, {}
    with open(diag_path) as f:
        variants = json.load(f).get("variants", {})
    best, _ = best_variant(diag_path)
    names = [f"ssim_{best}" if n == "ssim_best" and best else n for n in names]
    out = {}
    for n in names:
        v = n[len("ssim_") :] if n.startswith("ssim_") else None
        if v in variants and v in BY_NAME:
            opts = plan.STUDENT_SIZE + tuple(variants[v]["opts"])
            out[n] = plan.Final(n, f"+ SSIM, {BY_NAME[v].label} (SSIM diagnosis)", plan.KD, opts,
                                True)  # fmt: skip
    return names, out


def main(argv=None):
    from kd_det.utils.runs import (
        finished_run,
        schedule_opts,
        train_and_evaluate,
        with_config_digest,
    )

    args = parse_args(argv)
    args.report_only = args.report_only or bool(args.restore_from)
    preset = dict(PRESETS[args.preset])
    data = os.path.abspath(args.data)
    data_opts, num_classes = dataset_opts(data)
    with open(args.study) as f:
        study = json.load(f)
    names, diag = diagnosis_methods(args.methods, args.diagnosis)
    methods, dev = chosen_methods(names, study)
    finals = {f.name: f for f in plan.finals()}
    unknown = [m for m in methods if m not in diag
               and (m not in finals or not study["methods"].get(m, {}).get("runs"))]  # fmt: skip
    if unknown:
        raise SystemExit(f"No finished study runs for {unknown} in {args.study}.")
    env = None
    if args.jobs > 1:
        threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
        env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)

    def sched(iters):
        period = max(1, iters // preset["evals"])
        return schedule_opts(iters, preset["batch"], preset["image_size"]) + [
            "TEST.EVAL_PERIOD", str(period)]  # fmt: skip

    def test(out):
        # The run's own config sets the input size; DATASETS.COCO registers the data where it is
        # now (data_opts[:2]), which leaves DATASETS.TEST to the test split.
        return report.evaluate_on_test(out, "external_test", env=env,
                                       finished_only=args.report_only,
                                       opts=data_opts[:2])  # fmt: skip

    base = dict(data=data, num_classes=num_classes, preset=preset)
    t_out = os.path.join(args.output, "runs", "teacher")
    t_iters = preset["teacher_iters"]
    t_recipe = (plan.TEACHER, data_opts + sched(t_iters) + ["SEED", "42"], t_out,
                dict(base, iters=t_iters, seed=42))  # fmt: skip
    weights = os.path.join(t_out, "model_final.pth")
    restored = None
    if args.restore_from:
        with open(args.restore_from) as f:
            restored = json.load(f)
    lock = threading.Lock()

    def trained(name, config, opts, out, params, needs_teacher=False):
        """Train a run, or reuse it from its output directory or its ledger record (as the
        study does, :mod:`method_study.ledger`); a run that must train retrains a lost teacher
        first, which must reproduce its recorded dev AP."""
        full = with_config_digest(config, params, REPO)
        rec_path = ledger.record_path(args.output, out)
        if restored is not None and not os.path.exists(rec_path):
            fields = restored_fields(
                restored, os.path.relpath(out, os.path.join(args.output, "runs"))
            )
            if fields:
                ledger.save(rec_path, params=full, source="restored from "
                            + os.path.relpath(os.path.abspath(args.restore_from), REPO),
                            **fields)  # fmt: skip
        rec = None if args.force else ledger.load(rec_path, full)
        if rec is not None and finished_run(out, full) is None:
            print(f"[run] {name}: reusing its ledger record {rec_path}", flush=True)
            return {"bbox": rec["dev"], "test": rec.get("test"), "seconds": rec["seconds"],
                    "reused": True}  # fmt: skip
        if needs_teacher and not args.report_only:
            with lock:
                if not os.path.exists(weights):
                    t_rec = ledger.load(ledger.record_path(args.output, t_out))
                    run = train_and_evaluate("teacher (weights)", *t_recipe, quiet=True,
                                             env=env, repo=REPO)  # fmt: skip
                    check_teacher(run["bbox"], t_rec)
        run = train_and_evaluate(name, config, opts, out, params, args.force, quiet=True,
                                 env=env, finished_only=args.report_only, repo=REPO)  # fmt: skip
        if run is None:
            return None
        if name == "teacher":
            check_teacher(run["bbox"], rec)
            if rec is not None and rec.get("test") is not None:
                # Weights recreated by a retrain for the students: the record stays the run the
                # report is about (its time and test), which check_teacher has just reproduced.
                return {"bbox": rec["dev"], "test": rec["test"], "seconds": rec["seconds"],
                        "reused": True}  # fmt: skip
        run["test"] = test(out)
        if run["test"] is None and run["reused"] and rec is not None:
            # A reused run whose test evaluation is not cached beside its weights (a teacher
            # retrained for its students): keep the recorded test result, never erase it.
            run["test"] = rec.get("test")
        source = (rec or {}).get("source", "trained") if run["reused"] else "trained"
        machine = {} if run["reused"] else {"cpu": cpu_model()}
        ledger.save(rec_path, params=full, dev=run["bbox"], test=run["test"],
                    seconds=run["seconds"], source=source, **machine)  # fmt: skip
        return run

    teacher = trained("teacher", *t_recipe)
    study_path = os.path.abspath(args.study)
    if study_path.startswith(REPO + os.sep):  # a committed results file names no checkout
        study_path = os.path.relpath(study_path, REPO)
    results = {"data": data, "study": study_path, "methods_by_dev_AP": dev,
               "teacher": teacher, "methods": {}}  # fmt: skip
    t_id = ledger.identity(with_config_digest(plan.TEACHER, t_recipe[3], REPO))

    def one(name, seed):
        final = diag.get(name) or finals[name]
        if name in diag:  # an SSIM diagnosis variant: its options, the study's student size
            opts = list(final.opts)
        else:
            opts = list(study["methods"][name]["runs"][0]["opts"] or [])  # the tuned options
        opts = with_sub_model_data(opts, final.config, data_opts) + list(args.opts)
        out = os.path.join(args.output, "runs", name, f"seed{seed}")
        run_opts = data_opts + sched(preset["iters"]) + ["SEED", str(seed)] + opts
        params = dict(base, iters=preset["iters"], seed=seed, opts=opts)
        if final.teacher:
            if teacher is None:
                return None
            run_opts += ["MODEL.KD.TEACHER.WEIGHTS", weights]
            params["teacher"] = t_id  # how the teacher was made (the study's rule)
        run = trained(f"{name}/seed{seed}", final.config, run_opts, out, params, final.teacher)
        if run is not None:
            run["dev"] = run.pop("bbox")
            run.update(seed=seed, opts=opts)
        return run

    todo = [(n, s) for n in ["student"] + list(methods) for s in args.seeds]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {key: pool.submit(one, *key) for key in todo}
    for (name, seed), fut in futures.items():
        run = fut.result()
        if run is not None:
            label = (diag.get(name) or finals[name]).label
            results["methods"].setdefault(name, {"label": label, "runs": []})
            results["methods"][name]["runs"].append(run)
    os.makedirs(args.output, exist_ok=True)
    old_path = os.path.join(args.output, "results.json")
    if not args.force:
        ledger.refuse_to_shrink(old_path, results, finished_count)
    with open(old_path, "w") as f:
        json.dump(results, f, indent=2)
    md = markdown(results, len(todo), preset, args.seeds)
    with open(os.path.join(args.output, "results.md"), "w") as f:
        f.write(md)
    print(md)


def markdown(res, expected, preset, seeds):
    t = res.get("teacher") or {}
    t_ap = (t.get("test") or {}).get("AP")
    s_runs = res["methods"].get("student", {}).get("runs", [])
    s_ap = report.summarize([(r["test"] or {}).get("AP") for r in s_runs])[0]
    shown = (
        os.path.relpath(res["data"], REPO) if res["data"].startswith(REPO + os.sep) else res["data"]
    )
    lines = [f"External data ({shown}), test split; the study's tuned settings unchanged; "
             f"mean +- std over seeds {seeds}.", "",
             "| method | test AP | vs student alone | verdict | gap closed | dev AP | seeds |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    if t:
        lines.append(f"| teacher (Lite2-FPN) | {report.fmt(t_ap)} | | | | "
                     f"{report.fmt(t['bbox']['AP'] if 'bbox' in t else None)} | 1 |")  # fmt: skip
    done = 0
    for name, m in res["methods"].items():
        runs = m["runs"]
        done += len(runs)
        ap, sd = report.summarize([(r["test"] or {}).get("AP") for r in runs])
        dev, _ = report.summarize([r["dev"]["AP"] for r in runs])
        gap = ""
        if None not in (ap, t_ap, s_ap) and t_ap > s_ap and name != "student":
            gap = f"{(ap - s_ap) / (t_ap - s_ap):+.0%}"
        cell = "n/a" if ap is None else f"{ap:.1f} +- {sd:.1f}"
        v = "" if name == "student" else report.verdicts.method_verdict(runs, s_runs)
        lines.append(f"| {m['label']} | {cell} | {report.versus_student(runs, s_runs, name)} | "
                     f"{v} | {gap} | {report.fmt(dev)} | {len(runs)} |")  # fmt: skip
    lines += ["", "vs student alone: difference of mean test AP +- its Welch standard error; "
              "verdict: pays off / hurts beyond two standard errors, else no effect shown "
              "(method_study/verdicts.py)."]  # fmt: skip
    lines += ["", f"Students {preset['iters']} iterations, teacher {preset['teacher_iters']}, "
              f"batch {preset['batch']}, {preset['image_size']} px."]  # fmt: skip
    if done < expected:
        lines.append(f"**Partial**: {done} of {expected} runs had finished.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
