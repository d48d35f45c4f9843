#!/usr/bin/env python
"""Train or evaluate a detector (plain or distilled) with kd_det.

Follows detectron2's ``tools/train_net.py`` template: ``default_argument_parser`` and ``launch``, so
``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url``, ``--resume`` and
``--eval-only`` behave as in detectron2. Without GPUs, ``--num-gpus N`` starts N CPU processes that
train with the gloo backend.

Examples:
    python tools/train_net.py --config-file configs/Synthetic/faster_rcnn_R18_FPN.yaml
    python tools/train_net.py --config-file CFG --num-gpus 8
    python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS out/model_final.pth
    python tools/train_net.py --config-file CFG --resume  # continue from OUTPUT_DIR/last_checkpoint
    python tools/train_net.py --config-file CFG --eval-all-peers MODEL.WEIGHTS out/model_final.pth

One run per ``OUTPUT_DIR``: a second run into a folder that a live run uses is refused (the lock
is released when that run's process exits, however it exits). ``--resume`` compares the config
with the run's ``OUTPUT_DIR/config.yaml`` and refuses changes to the model, its losses or its
training data unless ``--allow-config-change``; with no checkpoint there, it warns and starts at
iteration 0. SIGTERM and SIGINT finish the checkpoint being written and print the command that
resumes the run.
"""

import json
import logging
import os
import signal
import sys

import torch

from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import kd_det  # noqa: F401  (registers kd_det's components)
from kd_det.checkpoint import UnsafeFileError, WeightsMismatchError
from kd_det.config import ConfigFileError, get_kd_cfg
from kd_det.data.builtin import register_datasets_from_config
from kd_det.engine import KDTrainer
from kd_det.engine.checkpoint import (
    AtomicDetectionCheckpointer,
    CheckpointResumeError,
    CheckpointSaveError,
    list_checkpoints,
)
from kd_det.engine.interrupt import install_interrupt_handlers, received_signal, resume_hint
from kd_det.engine.resume_check import ResumeConfigError
from kd_det.engine.run_lock import OutputDirError, OutputDirInUseError, guard_run
from kd_det.engine.trainer import fall_back_to_cpu
from kd_det.modeling.common import STUDENT_ARCHITECTURES
from kd_det.modeling.teacher import TeacherInference

logger = logging.getLogger("kd_det")

#: Errors about the user's input or a decision of theirs, whose message names what to do:
#: reported without a traceback.
USER_ERRORS = (
    CheckpointResumeError,
    CheckpointSaveError,
    ConfigFileError,
    OutputDirError,
    OutputDirInUseError,
    ResumeConfigError,
    UnsafeFileError,
    WeightsMismatchError,
)


def load_cfg(args):
    """detectron2's defaults + kd_det's keys + the file + the command line, not frozen."""
    cfg = get_kd_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    return cfg


def setup(args):
    """Build the config, set up logging into OUTPUT_DIR and register data."""
    cfg = load_cfg(args)
    fall_back_to_cpu(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    # default_setup sets up detectron2's and fvcore's loggers only: kd_det's lines (teacher
    # loading, resume fallbacks, input checks) go to the console and OUTPUT_DIR/log.txt too.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="kd_det")
    if comm.is_main_process():
        for line in getattr(args, "resume_changes", None) or []:
            logger.warning(line)
    register_datasets_from_config(cfg)
    return cfg


def _training(args):
    return not (args.eval_only or args.eval_teacher or args.eval_all_peers)


def main(args):
    """Run in every process; SIGTERM/SIGINT end it with the command that resumes it."""
    install_interrupt_handlers()
    try:
        return _run(args)
    except BaseException:
        signum = received_signal()
        if signum is None:
            raise
    if comm.is_main_process():
        cfg = load_cfg(args)
        if _training(args):
            msg = resume_hint(cfg.OUTPUT_DIR, signum)
        else:
            msg = f"Stopped by {signal.Signals(signum).name}; the evaluation did not finish."
        logger.warning(msg)
        print(f"train_net.py: {msg}", file=sys.stderr)
    sys.exit(128 + signum)


def _run(args):
    cfg = setup(args)
    if args.eval_all_peers:
        return evaluate_all_peers(cfg, args)
    if args.eval_only or args.eval_teacher:
        if args.eval_teacher:
            model = teacher_for_evaluation(cfg, KDTrainer.build_model(cfg))
        else:
            check_eval_weights(cfg, args)
            model = KDTrainer.build_model(student_only_cfg(cfg))
            _eval_checkpointer(model, cfg, args).resume_or_load(
                cfg.MODEL.WEIGHTS, resume=args.resume
            )
        res = KDTrainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
            _write_results(
                cfg, res, "teacher_results.json" if args.eval_teacher else "eval_results.json"
            )
        return res

    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    res = trainer.train()
    if comm.is_main_process() and res:
        _write_results(cfg, res)
    return res


def check_eval_weights(cfg, args):
    """Refuse to evaluate without trained weights (an untrained model scores ~0 AP and exits 0).

    Raises:
        ValueError: neither ``MODEL.WEIGHTS`` nor, with ``--resume``, a checkpoint in OUTPUT_DIR.
    """
    if cfg.MODEL.WEIGHTS:
        return
    if args.resume and (
        list_checkpoints(cfg.OUTPUT_DIR)
        or os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    ):
        return
    flag = "--eval-all-peers" if args.eval_all_peers else "--eval-only"
    raise ValueError(
        f"{flag} needs trained weights, but MODEL.WEIGHTS is empty"
        + (f" and OUTPUT_DIR '{cfg.OUTPUT_DIR}' holds no checkpoint" if args.resume else "")
        + f". Pass MODEL.WEIGHTS <checkpoint> (e.g. {cfg.OUTPUT_DIR}/model_final.pth), or "
        "--resume to evaluate the last checkpoint in OUTPUT_DIR."
    )


def _eval_checkpointer(model, cfg, args):
    """The checkpointer of an evaluation: weights that leave part of the model random (another
    backbone, other sizes) are refused with the keys named, instead of fvcore's one "Skip
    loading" line per key and an AP of a half-random model."""
    what = "The checkpoint --resume found" if args.resume else "MODEL.WEIGHTS"
    checkpointer = AtomicDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
    return checkpointer.refuse_mismatch(what, args.config_file)


def student_only_cfg(cfg):
    """The config evaluated by ``--eval-only``: a distillation student as a plain detector.

    ``DistillationRCNN`` (``DistillationRetinaNet``) builds (and loads) its teacher whenever a
    distillation weight is set, but inference is the student's own ``GeneralizedRCNN``
    (``RetinaNet``) forward: evaluating the student must not need the teacher's checkpoint. The
    checkpoint's ``kd_adapters.*`` keys are then unused.
    """
    if cfg.MODEL.META_ARCHITECTURE not in STUDENT_ARCHITECTURES:
        return cfg
    plain = STUDENT_ARCHITECTURES[cfg.MODEL.META_ARCHITECTURE]
    logger.info(
        f"--eval-only: evaluating the student as a {plain} (no teacher is built; the "
        "distillation adapters in the checkpoint are training-only and are not loaded)."
    )
    out = cfg.clone()
    out.defrost()
    out.MODEL.META_ARCHITECTURE = plain
    out.freeze()
    return out


def teacher_for_evaluation(cfg, model):
    """The distillation model's teacher, fed the student's test inputs (same loader, evaluator)."""
    teacher = getattr(model, "teacher", None)
    if teacher is None:
        raise ValueError(
            "--eval-teacher needs a distillation config (MODEL.META_ARCHITECTURE DistillationRCNN "
            "or DistillationRetinaNet, with MODEL.KD.TEACHER.* and at least one non-zero "
            "distillation weight)."
        )
    return TeacherInference(teacher, cfg.INPUT.FORMAT, model.teacher_input_format)


def evaluate_all_peers(cfg, args):
    """Online distillation: evaluate every peer and EMA teacher of a checkpoint, labelled."""
    from kd_det.engine.member_evaluation import evaluate_all_members

    check_eval_weights(cfg, args)
    model = KDTrainer.build_model(cfg)
    _eval_checkpointer(model, cfg, args).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
    res = evaluate_all_members(cfg, model, KDTrainer.test)
    if comm.is_main_process():
        _write_results(cfg, res, "members_results.json")
    return res


def _write_results(cfg, res, name="final_results.json"):
    path = os.path.join(cfg.OUTPUT_DIR, name)
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    logger.info(f"Wrote {path}")


def build_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--eval-teacher",
        action="store_true",
        help="evaluate the teacher of a distillation config with the student's evaluator",
    )
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume: resume even though keys that change the model, its losses or its "
        "training data differ from OUTPUT_DIR/config.yaml (the change is logged)",
    )
    parser.add_argument(
        "--eval-all-peers",
        action="store_true",
        help="online distillation: evaluate every peer and EMA teacher of MODEL.WEIGHTS (or the "
        "last checkpoint with --resume); writes OUTPUT_DIR/members_results.json",
    )
    return parser


def preflight(args):
    """What needs only the config, once, before any process starts: the eval weights exist,
    OUTPUT_DIR can be a folder and no live run uses it (its lock is taken here and held by this
    process for the whole run), and ``--resume`` resumes the same model (the changes found are
    kept in ``args.resume_changes`` for the log).

    Returns:
        OutputDirLock or None: the held lock (None on machines other than the first).

    Raises:
        ValueError: evaluation without weights; and see :data:`USER_ERRORS`.
    """
    cfg = load_cfg(args)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"  # as setup() will do (and log) in the run itself
    if (args.eval_only or args.eval_all_peers) and not args.eval_teacher:
        check_eval_weights(cfg, args)
    args.resume_changes = []
    if args.machine_rank != 0:
        return None
    resume = args.resume and _training(args)
    lock, args.resume_changes = guard_run(cfg, resume, args.allow_config_change)
    return lock


if __name__ == "__main__":
    args = build_parser().parse_args()
    print("Command Line Args:", args)
    try:
        _LOCK = preflight(args)  # held until this process exits
    except (ValueError,) + USER_ERRORS as e:
        sys.exit(f"train_net.py: error: {e}")
    try:
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except USER_ERRORS as e:  # the user's input or decision, not a bug: no traceback
        sys.exit(f"train_net.py: error: {e}")
