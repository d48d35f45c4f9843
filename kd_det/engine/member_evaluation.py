"""Evaluating every member (peer and EMA teacher) of an online-distillation model."""

import logging
import os
from collections import OrderedDict

from kd_det.modeling.meta_arch.online_distillation_rcnn import OnlineDistillationRCNN

logger = logging.getLogger(__name__)

__all__ = ["evaluate_all_members"]


def evaluate_all_members(cfg, model, test_fn=None):
    """Evaluate every peer and EMA teacher with the run's test sets and evaluator.

    Args:
        cfg (CfgNode): the online-distillation config.
        model (OnlineDistillationRCNN): possibly DDP-wrapped, weights loaded.
        test_fn (callable): ``test_fn(cfg, model, evaluators)``, default ``KDTrainer.test``.

    Returns:
        OrderedDict: ``{"peer0": results, "peer1": results, ..., "ema0": results, ...}``. Each
        member's evaluator writes to ``OUTPUT_DIR/inference/<member>/<dataset>``.
    """
    from kd_det.engine import KDTrainer

    core = getattr(model, "module", model)
    if not isinstance(core, OnlineDistillationRCNN):
        raise ValueError(
            f"Evaluating all members needs an OnlineDistillationRCNN, got {type(core).__name__}."
        )
    test_fn = test_fn or KDTrainer.test
    previous = core.inference_member
    results = OrderedDict()
    try:
        for name in core.member_names():
            core.set_inference_member(name)
            evaluators = [
                KDTrainer.build_evaluator(
                    cfg, ds, output_folder=os.path.join(cfg.OUTPUT_DIR, "inference", name, ds)
                )
                for ds in cfg.DATASETS.TEST
            ]
            logger.info(f"Evaluating member {name}")
            results[name] = test_fn(cfg, model, evaluators)
    finally:
        core.set_inference_member(previous)
    return results
