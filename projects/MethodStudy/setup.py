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
    extras_require={
        # method_study.make_external_coco: a detection dataset from third-party generators (scenes
        # by mnist-detection, animal silhouettes shipped in animal-shape-mnist's wheel). Pinned: the
        # scenes for a seed depend on the exact package code and data.
        "external": ["mnist-detection==0.1.7", "animal-shape-mnist==0.39"],
    },
)
