#!/usr/bin/env bash
# Run dev/benchmark_gpu.py on a CUDA machine that has torch but no network and no detectron2.
#
# Before (on a machine with the package registries), put the wheels it lacks in .gpu/whl/ (an
# ignored folder that travels with the checkout): sal-detectron2 0.7.2, fvcore, iopath, yacs,
# omegaconf, antlr4-python3-runtime 4.9.3, termcolor, pytorch-msssim and pycocotools, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d .gpu/whl pycocotools==2.0.11
# The wheels are unzipped, not installed (sal-detectron2's wheel is tagged cp310, its package is
# pure Python). Then, on the GPU machine, from the checkout:
#   OUT=/path/to/results bash dev/gpu_machine.sh [benchmark_gpu.py arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=${KD_DET_GPU_SITE:-/tmp/kd_det_site}
mkdir -p "$SITE"
for wheel in .gpu/whl/*.whl; do
    python3 -m zipfile -e "$wheel" "$SITE"
done
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-output}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 -c "import torch, detectron2; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
python3 dev/benchmark_gpu.py --device cuda --output "$OUT/benchmark_gpu" "$@"
