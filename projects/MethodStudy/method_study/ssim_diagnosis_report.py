"""The SSIM diagnosis's report (:mod:`method_study.ssim_diagnosis`): what it writes and how.

``results.json`` holds every finished dev variant with its per-level distillation losses and
KD/detection ratio over each tenth of training, the variants settled on test with their seeds, and
the study's own test runs they are compared with; ``results.md`` turns it into two tables (dev,
one factor at a time; test, with Welch differences) and ``kd_terms.png`` draws the per-level
losses. A report never replaces one that holds more finished runs (``ledger.refuse_to_shrink``).
"""

import json
import os

from . import ledger, report, verdicts
from .ssim_diagnosis import BY_NAME, VARIANTS, study_dev_record, study_results


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


def assemble(study, runs, tests, matched, pkd_rec, args, preset):
    """Everything the report shows, as JSON (every AP names its split)."""
    main = study_results(args.study)
    t = study.results["teacher"] or {}
    res = {"preset": preset, "splits": {"dev": "val (every choice)", "test": "test (reported)"},
           "teacher": {"dev_AP": t.get("dev", {}).get("AP"),
                       "test_AP": (t.get("test") or {}).get("AP")},
           "matched_weight": matched.get("ratio_pkd"), "matched_weights": matched,
           "pkd_ratio_study": pkd_rec.get("kd_detection_ratio"),
           "seeds": list(args.seeds), "variants": {}, "test": {}, "study_test": {}}  # fmt: skip
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
    settled = {n: [r["test"]["AP"] for r in s if r.get("test")] for n, s in res["test"].items()}
    names = list(settled)  # in the order they were settled
    pairs = [f"`{a}` - `{b}`: {_vs(settled[a], settled[b])}" for i, a in enumerate(names)
             for b in names[i + 1 :] if settled[a] and settled[b]]  # fmt: skip
    if pairs:  # e.g. the balanced SSIM against the MSE control, both at PKD's ratio
        lines += ["", "Between the variants settled on test: " + "; ".join(pairs) + "."]
    lines += ["", "Differences: mean test AP difference +- its Welch standard error; `*` beyond "
              "two standard errors. Seed 0 of a variant is its dev run."]  # fmt: skip
    expected = len(VARIANTS)
    n_seeds = len(res.get("seeds", [0, 1, 2]))
    short = [f"`{n}` {len(a)} of {n_seeds}" for n, a in settled.items() if len(a) < n_seeds]
    if len(v) < expected or short:
        lines += ["", f"**Partial**: {len(v)} of {expected} dev variants finished"
                  + (f"; test seeds evaluated for the variants picked to settle: {', '.join(short)}"
                     if short else "") + "."]  # fmt: skip
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
