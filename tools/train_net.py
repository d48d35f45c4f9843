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
"""

import json
import logging
import os
import sys

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
    list_checkpoints,
)
from kd_det.engine.trainer import fall_back_to_cpu
from kd_det.modeling.common import STUDENT_ARCHITECTURES
from kd_det.modeling.teacher import TeacherInference

logger = logging.getLogger("kd_det")

#: Errors about the user's input that name what to fix: reported without a traceback.
USER_ERRORS = (CheckpointResumeError, ConfigFileError, UnsafeFileError, WeightsMismatchError)


def setup(args):
    """Build the config (detectron2 defaults + kd_det keys + file + command line) and register
    data."""
    cfg = get_kd_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    fall_back_to_cpu(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    # default_setup sets up detectron2's and fvcore's loggers only: kd_det's lines (teacher
    # loading, resume fallbacks, input checks) go to the console and OUTPUT_DIR/log.txt too.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="kd_det")
    register_datasets_from_config(cfg)
    return cfg


def main(args):
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
        "--eval-all-peers",
        action="store_true",
        help="online distillation: evaluate every peer and EMA teacher of MODEL.WEIGHTS (or the "
        "last checkpoint with --resume); writes OUTPUT_DIR/members_results.json",
    )
    return parser


def check_args(args):
    """Checks that need only the config, run before any process is started (clean exit)."""
    cfg = get_kd_cfg()
    try:
        cfg.merge_from_file(args.config_file)
    except ConfigFileError as e:
        sys.exit(f"train_net.py: error: {e}")
    cfg.merge_from_list(args.opts)
    if not (args.eval_only or args.eval_all_peers) or args.eval_teacher:
        return
    try:
        check_eval_weights(cfg, args)
    except ValueError as e:
        sys.exit(f"train_net.py: error: {e}")


if __name__ == "__main__":
    args = build_parser().parse_args()
    print("Command Line Args:", args)
    check_args(args)
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
