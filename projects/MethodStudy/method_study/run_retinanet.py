"""The method study's RetinaNet family: the study's protocol for the SSIM-KD paper's detector.

Issue 28, item 5. The runner, ledger and reports are the study's (:mod:`method_study.run_study`:
resumable, one thread per run, ledger records committed, a partial table after every call); the
plan is :mod:`method_study.plan_retinanet`: a RetinaNet Lite2-FPN teacher, a RetinaNet Lite0
student with a 64-channel FPN, and five families (SSIM, MSE, PKD, dense-head KD, CrossKD) of five
dev trials each, then the picks and the SSIM-KD paper's setting with three seeds on test.

The input is :data:`SIZE` px, so that SSIM's 11x11 window fits P3-P5 (P3 48, P4 24, P5 12, P6 6,
P7 3 pixels wide; P6 and P7 use a shrunk window). Everything goes to ``results/retinanet/``::

    python -m method_study.run_retinanet --jobs 2          # trains what is missing
    python -m method_study.run_retinanet --report-only     # tables of what has finished
    python -m method_study.run_retinanet --list            # every trial and final run
"""

import os

from . import RESULTS, plan_retinanet
from .run_study import FULL, QUICK
from .run_study import main as study_main

#: Input side: generated at this size, trained and tested at it.
SIZE = 384
#: The Faster R-CNN family's schedule and splits at :data:`SIZE` px.
PRESETS = {"full": dict(FULL, image_size=SIZE), "quick": QUICK}
OUTPUT = os.path.join(RESULTS, "retinanet")


def main(argv=None):
    # The study's command line (run_study.parse_args, an ArgumentParser) with this family's
    # presets and output folder.
    study_main(argv, study_plan=plan_retinanet, presets=PRESETS, output=OUTPUT,
               description=__doc__.split("\n\n")[0])  # fmt: skip


if __name__ == "__main__":
    main()
