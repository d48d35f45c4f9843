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

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm

import kd_det  # noqa: F401  (registers kd_det's components)
from kd_det.config import get_kd_cfg
from kd_det.data.builtin import register_datasets_from_config
from kd_det.engine import KDTrainer
from kd_det.engine.trainer import fall_back_to_cpu
from kd_det.modeling.teacher import TeacherInference

logger = logging.getLogger("kd_det")


def setup(args):
    """Build the config (detectron2 defaults + kd_det keys + file + command line) and register
    data."""
    cfg = get_kd_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    fall_back_to_cpu(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    register_datasets_from_config(cfg)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_all_peers:
        return evaluate_all_peers(cfg, args)
    if args.eval_only or args.eval_teacher:
        model = KDTrainer.build_model(cfg)
        if args.eval_teacher:
            model = teacher_for_evaluation(cfg, model)
        else:
            DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
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


def teacher_for_evaluation(cfg, model):
    """The distillation model's teacher, fed the student's test inputs (same loader, evaluator)."""
    teacher = getattr(model, "teacher", None)
    if teacher is None:
        raise ValueError(
            "--eval-teacher needs a distillation config (MODEL.META_ARCHITECTURE DistillationRCNN "
            "with MODEL.KD.TEACHER.* and at least one non-zero distillation weight)."
        )
    return TeacherInference(teacher, cfg.INPUT.FORMAT, model.teacher_input_format)


def evaluate_all_peers(cfg, args):
    """Online distillation: evaluate every peer and EMA teacher of a checkpoint, labelled."""
    from kd_det.modeling.online_distillation import evaluate_all_members

    model = KDTrainer.build_model(cfg)
    DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
        cfg.MODEL.WEIGHTS, resume=args.resume
    )
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


if __name__ == "__main__":
    args = build_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
