"""The method study's figures: dev-AP curves of the final methods and of every dev-sweep trial.

Both read ``results.json`` as :func:`study_report.assemble` builds it; each curve is
``[[iteration, dev AP], ...]`` from a run's periodic evaluations on the dev split.
"""

import statistics


def plot_ap_curves(res, path):
    """Dev AP against iteration: the teacher on its own schedule (left), every method's mean over
    its seeds with the teacher's final dev AP as a reference line (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [1, 2.5]})
    t = res.get("teacher")
    if t and t.get("curve"):
        its, aps = zip(*t["curve"])
        ax_t.plot(its, aps, "k.-")
        ax.axhline(aps[-1], color="k", linestyle="--", label="teacher (final)")
    ax_t.set_title("teacher")
    ax_t.set_xlabel("iteration")
    ax_t.set_ylabel("dev AP")
    for name, m in res["methods"].items():
        curves = [dict(map(tuple, r["curve"])) for r in m["runs"] if r.get("curve")]
        if not curves:
            continue
        its = sorted(set.intersection(*(set(c) for c in curves)))
        ax.plot(its, [statistics.mean(c[i] for c in curves) for i in its], ".-", label=m["label"])
    ax.set_xlabel("iteration")
    ax.set_ylabel("dev AP (mean over seeds)")
    ax.set_title("students (validation AP during training, dev split)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_dev_sweep(res, path):
    """Dev AP against iteration for every trial of every family, one panel per family, the pick
    drawn thick, the student alone's mean dev curve dashed: how each choice was made."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = [(f, e) for f, e in res["dev_sweep"].items() if any(t.get("curve") for t in e["trials"])]
    if not fams:
        return
    cols = min(4, len(fams))
    rows = (len(fams) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    student = [dict(map(tuple, r["curve"])) for r in
               res["methods"].get("student", {}).get("runs", []) if r.get("curve")]  # fmt: skip
    s_its = sorted(set.intersection(*(set(c) for c in student))) if student else []
    for ax, (fam, e) in zip(axes.flat, fams):
        if s_its:
            ax.plot(s_its, [statistics.mean(c[i] for c in student) for i in s_its], "k--",
                    lw=1, label="student alone")  # fmt: skip
        for t in e["trials"]:
            if t.get("curve"):
                its, aps = zip(*t["curve"])
                pick = t["name"] == e.get("pick")
                ax.plot(its, aps, ".-", lw=2.5 if pick else 1,
                        label=t["name"] + (" (pick)" if pick else ""))  # fmt: skip
        ax.set_title(fam + ("" if e.get("complete") else " (partial)"))
        ax.set_xlabel("iteration")
        ax.set_ylabel("dev AP")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(fams) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
