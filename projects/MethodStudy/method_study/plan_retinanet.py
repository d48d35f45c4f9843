"""What :mod:`method_study.run_retinanet` trains: the study's protocol for a RetinaNet student.

The SSIM-KD paper's own detector family (issue 28, item 5): a RetinaNet Lite0 student
(``DistillationRetinaNet``) under the protocol of :mod:`method_study.plan` (dev sweep with seed 0
and an equal budget, the picks with three seeds on test). Five families of five trials each, every
family starting from its paper's setting:

* feature hints on P3-P7: SSIM (the SSIM-KD paper's setting first), MSE, PKD;
* dense-head KD (``MODEL.KD.DENSE``) and CrossKD (``MODEL.KD.CROSSKD``), without hints.

Besides each family's pick, the SSIM-KD paper's setting itself is reported on test (its seed 0 is
its dev trial), so the paper's claim is tested as stated, not only through our sweep.
"""

import os
from typing import List, Tuple

# SSIM_PAPER: the SSIM-KD paper's setting (per-level min-max to [0, 1], window 11, sigma 1.5,
# (1 - SSIM) / 2, lambda 3, a 1x1 adapter), as in the Faster R-CNN family; KD holds it too.
from .plan import FEATURE, SSIM_PAPER, SYN, Final, Trial, _o, lp_trials  # noqa: F401

TEACHER = os.path.join(SYN, "retinanet_lite2_FPN.yaml")
STUDENT = os.path.join(SYN, "retinanet_lite0_FPN.yaml")
#: The SSIM-KD paper's setting on P3-P7; every feature trial changes it.
KD = os.path.join(SYN, "distill_retinanet_lite2_to_lite0_ssim.yaml")
HEAD = os.path.join(SYN, "distill_retinanet_lite2_to_lite0_head.yaml")
CROSSKD = os.path.join(SYN, "distill_retinanet_lite2_to_lite0_crosskd.yaml")
#: The teacher's row in the report.
TEACHER_LABEL = "teacher (RetinaNet Lite2-FPN)"

#: As in the Faster R-CNN family, the student's FPN (and so its head) has 64 channels against the
#: teacher's 128: a cheaper student, and every feature hint goes through a 1x1 adapter.
STUDENT_SIZE = ("MODEL.FPN.OUT_CHANNELS", "64")

FEATURE_FAMILIES = ("ssim", "mse", "pkd")
FAMILIES = FEATURE_FAMILIES + ("head", "crosskd")


def student_opts(config: str) -> Tuple[str, ...]:
    """The overrides that make ``config``'s student the study's RetinaNet student."""
    return STUDENT_SIZE


def _dense(prefix: str, w: float) -> Tuple[str, ...]:
    return _o(f"MODEL.KD.{prefix}.CLS_WEIGHT", w, f"MODEL.KD.{prefix}.BOX_WEIGHT", w)


def dev_trials(iters: int) -> List[Trial]:
    """Every dev-sweep trial, five per family, in the order they are scheduled.

    Args:
        iters (int): the students' schedule length (unused: no trial here depends on it; the
            runner's API).
    """
    t: List[Trial] = [Trial("ssim", "paper", KD, SSIM_PAPER, True)]
    for name, extra in (
        ("lambda1", _o("MODEL.KD.FEATURE.WEIGHTS", "[1.0]")),
        ("lambda10", _o("MODEL.KD.FEATURE.WEIGHTS", "[10.0]")),
        ("win7", _o("MODEL.KD.SSIM.WINDOW_SIZE", 7)),
        ("teacher_absmax", _o("MODEL.KD.FEATURE.RANGE_POLICY", "teacher_absmax")),
    ):
        t.append(Trial("ssim", name, KD, SSIM_PAPER + extra, True))
    t += lp_trials("mse", KD)
    # PKD: mmrazor's FPN setting is loss weight 6; five weights around it.
    pkd = _o("MODEL.KD.FEATURE.LOSS", "pkd")
    t += [Trial("pkd", f"w{w}", KD, pkd + _o("MODEL.KD.FEATURE.WEIGHTS", f"[{w}]"), True)
          for w in (6.0, 1.0, 3.0, 12.0, 24.0)]  # fmt: skip
    # Dense-head KD (the shipped config: class and box weight 1, focal beta 1, L1 deltas).
    t += [
        Trial("head", "w1_beta1", HEAD, _dense("DENSE", 1.0), True),
        Trial("head", "w0.5", HEAD, _dense("DENSE", 0.5), True),
        Trial("head", "w2", HEAD, _dense("DENSE", 2.0), True),
        Trial("head", "beta2", HEAD, _dense("DENSE", 1.0) + _o("MODEL.KD.DENSE.CLS_BETA", 2.0),
              True),  # fmt: skip
        Trial("head", "giou", HEAD, _dense("DENSE", 1.0) + _o("MODEL.KD.DENSE.BOX_LOSS", "giou"),
              True),  # fmt: skip
    ]
    # CrossKD (the shipped config: weights 1, the teacher's last tower block).
    convs = lambda n: _o("MODEL.KD.CROSSKD.TEACHER_CONVS", n)  # noqa: E731
    t += [
        Trial("crosskd", "w1_convs1", CROSSKD, _dense("CROSSKD", 1.0) + convs(1), True),
        Trial("crosskd", "convs0", CROSSKD, _dense("CROSSKD", 1.0) + convs(0), True),
        Trial("crosskd", "convs2", CROSSKD, _dense("CROSSKD", 1.0) + convs(2), True),
        Trial("crosskd", "w0.5", CROSSKD, _dense("CROSSKD", 0.5) + convs(1), True),
        Trial("crosskd", "w2", CROSSKD, _dense("CROSSKD", 2.0) + convs(1), True),
    ]
    return t


def finals() -> List[Final]:
    """The methods reported on test (three seeds each)."""
    labels = {"ssim": "+ SSIM hints (tuned)", "mse": "+ MSE hints (tuned)",
              "pkd": "+ PKD hints (tuned)", "head": "+ dense-head KD (tuned)",
              "crosskd": "+ CrossKD (tuned)"}  # fmt: skip
    config = {"ssim": KD, "mse": KD, "pkd": KD, "head": HEAD, "crosskd": CROSSKD}
    out = [Final("student", "student alone (RetinaNet Lite0)", STUDENT, (), False)]
    out += [Final(f, labels[f], config[f], _o(f"@pick:{f}"), True, f) for f in FAMILIES]
    out.append(Final("ssim_paper", "+ SSIM hints, the SSIM-KD paper's setting", KD, SSIM_PAPER,
                     True, "ssim/paper"))  # fmt: skip
    return out


def start_order(finals, seeds):
    """Finals in listed order, one seed of every method before the next seed."""
    return [(f, s) for s in seeds for f in finals]
