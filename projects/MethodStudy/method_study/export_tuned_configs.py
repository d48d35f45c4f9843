"""Write the study's tuned settings as config files users start from.

The method study (:mod:`method_study.run_study`) picks each method's setting on the dev split.
This tool turns every method's picked options (from the study's ``results.json``) into a YAML
config that inherits the method's shipped config (``_BASE_``) and sets only what the study changed,
plus a Markdown table of those settings with the loss balance they produced (the study's test
results stay in its README, which the table links). A user starts from
``configs/Synthetic/tuned/<method>.yaml`` (or copies its keys into their own config) instead of
re-running the sweep.

    python -m method_study.export_tuned_configs     # results/results.json -> configs/.../tuned
"""

import argparse
import ast
import json
import os

from kd_det.config import get_kd_cfg
from kd_det.utils.loss_balance import balance
from kd_det.utils.runs import SCHEDULE_RELATIVE, rescale_schedule

from . import REPO, RESULTS, plan

#: Where the study's test results are stated (the configs and their table link it).
STUDY_README = "projects/MethodStudy/README.md"
#: Keys that describe the study's setup (data, schedule, seed, teacher weights), not a method.
SETUP_PREFIXES = ("DATASETS.", "SOLVER.", "INPUT.MIN_SIZE", "SEED", "OUTPUT_DIR", "TEST.",
                  "DATALOADER.", "MODEL.KD.TEACHER.WEIGHTS")  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", default=os.path.join(RESULTS, "results.json"))
    p.add_argument("--output", default=os.path.join(REPO, "configs", "Synthetic", "tuned"))
    return p.parse_args(argv)


def _value(text):
    """A command-line override's value as YAML would hold it (numbers, lists, booleans)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return {"True": True, "False": False}.get(text, text)


def nested(opts):
    """``["A.B", "1", "A.C", "x"]`` -> ``{"A": {"B": 1, "C": "x"}}`` (later keys win)."""
    if len(opts) % 2:
        raise ValueError(f"Options must be KEY VALUE pairs, got an odd list: {opts}")
    out = {}
    for key, value in zip(opts[0::2], opts[1::2]):
        if key.startswith(SETUP_PREFIXES):
            continue
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _value(value) if isinstance(value, str) else value
    return out


def write_configs(results, output):
    """One YAML per method with finished runs; returns ``[(method, path, opts)]``."""
    import yaml

    finals = {f.name: f for f in plan.finals()}
    os.makedirs(output, exist_ok=True)
    written = []
    for name, m in results["methods"].items():
        runs = [r for r in m["runs"] if r.get("opts") is not None]
        if not runs or name not in finals:
            continue
        opts = runs[0]["opts"]
        base = os.path.relpath(finals[name].config, output)
        note = ""
        study_iters = (results.get("preset") or {}).get("iters")
        relative = [k for k in opts[0::2] if k in SCHEDULE_RELATIVE]
        if study_iters and relative:
            cfg = get_kd_cfg()
            cfg.merge_from_file(finals[name].config)
            opts = rescale_schedule(opts, study_iters, cfg.SOLVER.MAX_ITER)
            note = (f"# {', '.join(relative)}: a fraction of the study's {study_iters} iterations, "
                    f"scaled to this config's SOLVER.MAX_ITER ({cfg.SOLVER.MAX_ITER}); scale it "
                    "with your schedule.\n")  # fmt: skip
        body = nested(opts)
        path = os.path.join(output, f"{name}.yaml")
        header = (
            f"# {m['label']}: the setting the method study picked on its dev split.\n"
            f"# Written by method_study.export_tuned_configs from "
            f"{os.path.basename(results['_path'])}; test results: {STUDY_README}.\n"
        )
        with open(path, "w") as f:
            f.write(header + note)
            yaml.safe_dump({"_BASE_": base, **body}, f, sort_keys=False)
        written.append((name, path, [o for o in opts]))
    return written


def ranking(results):
    """Methods (not the student alone) ordered by mean dev AP, the statistic the study selects by
    (test AP is reported, never used to choose); ``make demo`` shows the first."""
    rows = []
    for name, m in results["methods"].items():
        dev = [r["dev"]["AP"] for r in m["runs"] if r.get("dev")]
        test = [r["test"]["AP"] for r in m["runs"] if r.get("test")]
        if name != "student" and dev:
            rows.append({"method": name, "label": m["label"], "dev_AP": sum(dev) / len(dev),
                         "test_AP": sum(test) / len(test) if test else None})  # fmt: skip
    return sorted(rows, key=lambda r: -r["dev_AP"])


def beyond_base(opts, config):
    """The ``(key, value)`` pairs of ``opts`` that a user must set on top of ``config``.

    A trial's options are the paper's setting followed by the one factor it changes, so a key can
    appear twice (``WINDOW_SIZE 11`` then ``7``); the last value is the one trained, as with
    detectron2's ``merge_from_list``. Keys whose final value the shipped config already holds, and
    setup keys (data, schedule, seed), are left out.
    """
    cfg = get_kd_cfg()
    cfg.merge_from_file(config)
    final = {}
    for key, value in zip(opts[0::2], opts[1::2]):
        if not key.startswith(SETUP_PREFIXES):
            final[key] = value  # a repeated key keeps its first position, takes the last value
    out = []
    for key, value in final.items():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part, None) if node is not None else None
        v = _value(value) if isinstance(value, str) else value
        same = node is not None and (list(node) if isinstance(node, (list, tuple)) else node) == (
            list(v) if isinstance(v, (list, tuple)) else v
        )
        if not same:
            out.append((key, value))
    return out


def loss_ratios(results, name):
    """``(start, end)``: the distillation-to-detection loss ratio over the first and the last
    tenth of training (:mod:`kd_det.utils.loss_balance`), each the mean over a method's runs, or
    None where no run directory has a metrics.json.

    A weight carries over to other data only as this ratio, so the table gives it beside the
    setting; the start value is the one a user can compare after a few hundred iterations."""
    study_dir = os.path.dirname(os.path.abspath(results["_path"]))
    found = {"start": [], "end": []}
    for r in results["methods"][name]["runs"]:
        metrics = os.path.join(study_dir, r.get("out") or "", "metrics.json")
        b = balance(metrics) if r.get("out") and os.path.exists(metrics) else None
        if b is None and r.get("kd_detection_ratio"):  # the run's ledger record kept it
            b = dict(zip(found, r["kd_detection_ratio"]))
        for k in found:
            if b and b[k] is not None:
                found[k].append(b[k])
    return tuple(sum(v) / len(v) if v else None for v in found.values())


def previous_ratio_cells(readme):
    """``{config path: "start / end"}`` from the table an earlier export wrote: runs restored
    from a results.json that predates the ledger's loss ratios have none, and a regenerated table
    keeps what it cannot recompute rather than drop it."""
    cells = {}
    if os.path.exists(readme):
        with open(readme) as f:
            for line in f:
                parts = [p.strip() for p in line.split("|")]
                if len(parts) > 5 and parts[2].endswith(".yaml`") and "n/a" not in parts[4]:
                    cells[parts[2].strip("`")] = parts[4]
    return cells


def markdown(written, results, previous=None):
    previous = previous or {}
    lines = [
        "| method | config | settings (beyond the shipped config) | kd / detection loss, first / "
        "last tenth |",
        "|---|---|---|---|",
    ]
    finals = {f.name: f for f in plan.finals()}
    for name, path, opts in written:
        pairs = [f"`{k} {v}`" for k, v in beyond_base(opts, finals[name].config)]
        ratio = " / ".join("n/a" if v is None else f"{v:.2f}" for v in loss_ratios(results, name))
        rel = os.path.relpath(path, REPO)
        if ratio == "n/a / n/a" and rel in previous:
            ratio = previous[rel]
        lines.append(f"| {results['methods'][name]['label']} | `{rel}` | {' '.join(pairs)} | "
                     f"{ratio} |")  # fmt: skip
    lines += ["", "kd / detection loss: the sum of the `loss_kd_*` terms over the sum of the "
              "detection losses in the first and the last tenth of training, mean over the "
              "method's runs (`python tools/loss_balance.py RUN_DIR` gives it for your run; the "
              "meta-weight network's `loss_hint_meta` counts as neither). A tuned weight "
              "carries over to other data as this ratio, not as its number: after a few hundred "
              "iterations, scale your weight until your first-tenth ratio is near this "
              "one.", "",
              f"How each method did (test AP over seeds, verdicts): {STUDY_README}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if not os.path.exists(args.study):
        raise SystemExit(f"{args.study} not found: run python -m method_study.run_study first.")
    with open(args.study) as f:
        results = json.load(f)
    results["_path"] = args.study
    written = write_configs(results, args.output)
    with open(os.path.join(args.output, "ranking.json"), "w") as f:
        json.dump(ranking(results), f, indent=2)
    md = markdown(written, results, previous_ratio_cells(os.path.join(args.output, "README.md")))
    done, expected = results.get("finished_runs"), results.get("expected_runs")
    if done is not None and expected and done < expected:
        md += (f"\n**Partial**: {done} of the study's {expected} final runs had finished; a method "
               "without a finished run has no config yet.\n")  # fmt: skip
    with open(os.path.join(args.output, "README.md"), "w") as f:
        f.write("# Tuned settings from the method study\n\n" + md)
    print(md)


if __name__ == "__main__":
    main()
