#!/usr/bin/env python
"""How far round-off moves the golden-loss values: the evidence behind their tolerances.

The golden values of ``tests/modeling/test_golden_losses.py`` were recorded with kernels capped at
AVX2 on one CPU. Another CPU vendor (MKL and oneDNN pick other code paths on Intel) differs in the
last bits; so do other kernel widths on this CPU, which is what this script can run anywhere. It
runs the golden test once per instruction-set variant, each in its own process with the test's
``KD_DET_GOLDEN_DUMP`` hook, and prints, per variant, the smallest tolerances that would accept
what it computed: ``atol`` at the test's ``LOSS_RTOL`` for the losses, and the largest weight-sum
difference as a fraction of the tensor's absolute sum (the test's ``STATE_RTOL`` scale).

    python dev/golden_roundoff.py
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "tests", "modeling", "golden", "losses.json")
TEST = os.path.join(REPO, "tests", "modeling", "test_golden_losses.py")
#: Environment of each variant; the golden file itself was written with ``avx2_cap``.
VARIANTS = {
    "avx2_cap": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                 "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "ALL",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "unvectorized": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                     "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}  # fmt: skip


def needed_tolerances(got, want, loss_rtol):
    """``(loss atol, state ratio, exact)``: the smallest ``atol`` with which every loss of ``got``
    is within ``loss_rtol * |w| + atol`` of ``want``, the largest ``|got - want| / sum(|w|)`` of
    the weight sums, and whether everything was bit-identical."""
    atol, ratio, exact = 0.0, 0.0, True
    for name, w_case in want.items():
        g_case = got[name]
        for g, w in zip(g_case["losses"], w_case["losses"]):
            for k, v in w.items():
                exact &= g[k] == v
                atol = max(atol, abs(g[k] - v) - loss_rtol * abs(v))
        for k, v in w_case["state_sums"].items():
            d = abs(g_case["state_sums"][k] - v)
            exact &= d == 0
            ratio = max(ratio, d / max(w_case["state_scales"][k], 1e-30))
    return atol, ratio, exact


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--loss-rtol", type=float, default=1e-5)
    args = p.parse_args(argv)
    with open(GOLDEN) as f:
        want = json.load(f)
    print(f"{'variant':14s} {'bit-identical':>13s} {'loss atol needed':>17s} {'weight ratio':>13s}")
    for variant in args.variants:
        with tempfile.TemporaryDirectory() as dump:
            env = dict(os.environ, KD_DET_GOLDEN_DUMP=dump, **VARIANTS[variant])
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST, "-k",
                   "equal_golden"]  # fmt: skip
            subprocess.run(cmd, env=env, cwd=REPO, check=False, capture_output=True)
            got = {}
            for name in want:
                path = os.path.join(dump, f"{name}.json")
                if not os.path.isfile(path):
                    sys.exit(f"{variant}: the golden test wrote no values for {name}.")
                with open(path) as f:
                    got[name] = json.load(f)
        atol, ratio, exact = needed_tolerances(got, want, args.loss_rtol)
        print(f"{variant:14s} {str(exact):>13s} {atol:17.2e} {ratio:13.2e}")


if __name__ == "__main__":
    main()
