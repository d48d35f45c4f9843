"""Helpers for the method study's tests (as ``kd_det.utils.testing`` is for kd_det's).

A study module runs in its own process exactly as a user runs it, ``python -m
method_study.<module> ARGS`` from the kd_det checkout (:func:`run_module`), one compute thread per
process, so the study's smoke tests do not compete for cores and match what users type.
"""

import os
import subprocess
import sys

from . import REPO

__all__ = ["run_module"]


def run_module(module, args, timeout=600, env=None):
    """Run ``python -m method_study.<module> ARGS`` from the checkout, one thread per process.

    Returns:
        subprocess.CompletedProcess: with text ``stdout`` / ``stderr``.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", f"method_study.{module}"] + [str(a) for a in args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
