"""What the method study's test numbers say: per-method verdicts and the issue's questions.

A verdict compares a method's test AP over its seeds with the student alone's (Welch: the
difference of means and its standard error, no equal-variance assumption). With three seeds per
side, a difference counts only beyond two standard errors; inside that band the study shows no
effect, which is not the same as showing there is none. The questions are the ones the study was
built to answer (README, "Method study"); each answer is computed here from ``results.json`` so
the README's sentences come from a command.
"""

import statistics

from .plan import FEATURE_FAMILIES, best_feature

#: Offline methods, for "the best offline method": distillation from a trained teacher.
OFFLINE = ("ssim", "mse", "l1", "pkd", "cwd", "multilevel", "dynamic", "mix_kd")


def aps_on_test(runs):
    """The test AP of every run that has one."""
    return [(r.get("test") or {}).get("AP") for r in runs if (r.get("test") or {}).get("AP")
            is not None]  # fmt: skip


def welch(a, b):
    """``(mean(a) - mean(b), its standard error)``; the error is None below 2 values a side."""
    if not a or not b:
        return None, None
    diff = statistics.mean(a) - statistics.mean(b)
    if len(a) < 2 or len(b) < 2:
        return diff, None
    return diff, (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5


def verdict(diff, se):
    """The verdict on a difference: "pays off" or "hurts" beyond two standard errors, else
    "no effect shown" ("" without a standard error)."""
    if diff is None or se is None:
        return ""
    if diff > 2 * se:
        return "pays off"
    if diff < -2 * se:
        return "hurts"
    return "no effect shown"


def method_verdict(runs, student_runs):
    return verdict(*welch(aps_on_test(runs), aps_on_test(student_runs)))


def _dev_mean(m):
    devs = [r["dev"]["AP"] for r in m["runs"] if r.get("dev")]
    return statistics.mean(devs) if devs else None


def feature_pick(res):
    """The family ``@pick:feature`` chose (:func:`study_plan.best_feature` on the picks' dev AP
    in ``res``), or None before the feature sweeps have picks."""
    pick_ap = {}
    for fam in FEATURE_FAMILIES:
        sweep = (res.get("dev_sweep") or {}).get(fam) or {}
        ap = {t["name"]: t.get("dev_AP") for t in sweep.get("trials", [])}.get(sweep.get("pick"))
        if ap is not None:
            pick_ap[fam] = ap
    return best_feature(pick_ap) if pick_ap else None


def answers(res):
    """Markdown bullets answering the study's questions from ``res`` (``results.json``).

    Questions whose methods have no finished test run are left out.
    """
    methods = res["methods"]
    runs = {k: aps_on_test(m["runs"]) for k, m in methods.items()}
    student = runs.get("student", [])
    t_ap = ((res.get("teacher") or {}).get("test") or {}).get("AP")
    out = []

    def vs(a, b):
        d, se = welch(runs.get(a, []), runs.get(b, []))
        if d is None:
            return None
        return d, se, (f"{d:+.1f}" if se is None else f"{d:+.1f} +- {se:.1f}")

    ssim_mse = vs("ssim", "mse")
    if ssim_mse and len(runs["ssim"]) > 1 and len(runs["mse"]) > 1:
        d, se, txt = ssim_mse
        spread = max(statistics.stdev(runs["ssim"]), statistics.stdev(runs["mse"]))
        yes = d > spread
        out.append(f"- SSIM hints against MSE hints (each tuned): {txt} test AP; the larger seed "
                   f"std of the two is {spread:.1f}: SSIM {'beats' if yes else 'does not beat'} "
                   "MSE by more than the seed spread.")  # fmt: skip
    # The best by dev among every offline method with a dev AP, tested or not: a partial table
    # must not crown a lesser method because the best has no test run yet.
    offline = {k: _dev_mean(methods[k]) for k in OFFLINE if k in methods}
    offline = {k: v for k, v in offline.items() if v is not None}
    if offline and student and t_ap is not None:
        best = max(offline, key=lambda k: offline[k])
        if not runs.get(best):
            out.append(f"- The best offline method by mean dev AP is {methods[best]['label']!r} "
                       f"({offline[best]:.1f} dev AP); it has no test run yet.")  # fmt: skip
            best = None
    if offline and student and t_ap is not None and best is not None:
        s_ap = statistics.mean(student)
        closed = (statistics.mean(runs[best]) - s_ap) / (t_ap - s_ap) if t_ap > s_ap else None
        if closed is not None:
            out.append(f"- The best offline method by mean dev AP is {methods[best]['label']!r} "
                       f"({offline[best]:.1f} dev AP); on test it closes {closed:.0%} of the "
                       f"teacher-student gap ({'at least' if closed >= 0.5 else 'less than'} "
                       "50 %).")  # fmt: skip
    for key in ("mix", "mix_kd", "online", "online_cutnmix"):
        r = vs(key, "student")
        if r is None or key not in methods:
            continue
        d, se, txt = r
        v = verdict(d, se) or "too few seeds to tell"
        out.append(f"- {methods[key]['label']} against the student alone: {txt} test AP "
                   f"({v}).")  # fmt: skip
    # What mixing adds to distillation: the same tuned hints with and without it.
    fam = feature_pick(res)
    r = vs("mix_kd", fam) if fam in methods and "mix_kd" in methods else None
    if r is not None:
        d, se, txt = r
        v = verdict(d, se) or "too few seeds to tell"
        out.append(f"- {methods['mix_kd']['label']} against the same hints without mixing "
                   f"({methods[fam]['label']}): {txt} test AP ({v}).")  # fmt: skip
    return out


def selection_check(res):
    """Markdown bullets on the winner's curse of reusing the dev pick as the seed-0 final run.

    A tuned method's seed-0 final run is the dev trial that won its family's sweep: the best of
    several trials at seed 0. Dev and test come from one generator, so a trial whose seed-0
    training happened to go well is likely to look good on test too, and the seed-0 run can sit
    above what a fresh seed gives. The other seeds were never part of a choice. This prints, per
    tuned method, its mean test AP over the seeds not used for the pick beside the mean over all,
    so a reader can see how much of a method's lead could be selection.
    """
    out = []
    for m in res["methods"].values():
        runs = m["runs"]
        fresh = aps_on_test([r for r in runs if not r.get("reused_dev_trial")])
        picked = aps_on_test([r for r in runs if r.get("reused_dev_trial")])
        if not picked or not fresh:
            continue
        every = statistics.mean(fresh + picked)
        out.append(f"- {m['label']}: {every:.1f} over all {len(fresh) + len(picked)} seeds, "
                   f"{statistics.mean(fresh):.1f} over the {len(fresh)} seed(s) that were not "
                   f"the dev pick (the pick itself: {statistics.mean(picked):.1f}).")  # fmt: skip
    if out:
        head = (
            "Selection check (test AP; a tuned method's seed-0 run is its dev pick, the best "
            "of its sweep, so it may be luckier than a fresh seed):"
        )
        out.insert(0, head)
    return out
