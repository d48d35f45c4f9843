#!/usr/bin/env python
"""kd_det's method study as an installable package (``method_study``), run with ``python -m``.

It works on the kd_det checkout it lives in (configs, ``tools/train_net.py``), so install it
editable from that checkout: ``pip install -e projects/MethodStudy`` (``make setup`` does).
"""

from setuptools import setup

setup(
    name="kd_det_method_study",
    version="0.1.0",
    description="kd_det's method study: dev sweeps, seeds, verdicts, generalization",
    packages=["method_study"],
    python_requires=">=3.9",
    install_requires=["kd_det"],
)
