#!/usr/bin/env python
"""Train or evaluate a LazyConfig model with kd_det: a plain detectron2 LazyConfig, or a
distillation model made with ``kd_det.modeling.lazy.distill``.

detectron2's ``tools/lazyconfig_train_net.py``, with kd_det's trainers
(``kd_det.engine.lazy_train``: AMP and DDP on CPU, crash-safe checkpoints, kd_det's datasets,
the teacher check of a distillation run).
``--num-gpus``, ``--resume``, ``--eval-only`` and ``key=value`` overrides behave as in
detectron2. A ``.py`` config is Python code: it runs when loaded, so give only files you trust.
As with ``tools/train_net.py``, one run at a time may use a ``train.output_dir`` (a second one
stops before it starts, naming the first), and ``--resume`` refuses a config whose ``model`` or
``dataloader.train`` differ from the run's ``config.yaml`` unless ``--allow-config-change``.

Examples:
    python tools/lazyconfig_train_net.py --config-file configs/Synthetic/lazy/retinanet_R18_FPN.py
    python tools/lazyconfig_train_net.py \
        --config-file configs/Synthetic/lazy/distill_retinanet_R18_mse.py train.max_iter=100
    python tools/lazyconfig_train_net.py --config-file CFG --eval-only \
        train.init_checkpoint=output/model_final.pth
"""

import logging
import sys

from detectron2.config import LazyConfig
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from hydra.errors import OverrideParseException

import kd_det  # noqa: F401  (registers kd_det's components)
from kd_det.engine.checkpoint import AtomicDetectionCheckpointer
from kd_det.engine.lazy_train import build_model, do_test, do_train, register_lazy_datasets
from kd_det.engine.resume_check import ResumeConfigError, check_lazy_resume_config
from kd_det.engine.run_lock import OutputDirError, OutputDirInUseError, OutputDirLock

logger = logging.getLogger("kd_det")


def main(args):
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    default_setup(cfg, args)
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="kd_det")
    if comm.is_main_process():
        for line in getattr(args, "resume_changes", None) or []:
            logger.warning(line)
    register_lazy_datasets(cfg)
    if args.eval_only:
        model = build_model(cfg)
        AtomicDetectionCheckpointer(model).load(cfg.train.init_checkpoint)
        return do_test(cfg, model)
    return do_train(cfg, resume=args.resume)


class OverridesError(ValueError):
    """The command line's overrides cannot be parsed."""


def preflight(args):
    """Before any process starts and ``default_setup`` rewrites ``config.yaml``: take the lock
    of ``train.output_dir`` (held by this process for the whole run) and check what ``--resume``
    resumes (the lines to log kept in ``args.resume_changes``). Nothing on other machines."""
    try:
        cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    except OverrideParseException as e:
        raise OverridesError(
            f"an override is not key=value ({str(e).splitlines()[0]}). Overrides come last; "
            "flags such as --resume go before them: lazyconfig_train_net.py --config-file CFG "
            "--resume key=value ..."
        ) from None
    args.resume_changes = []
    if args.machine_rank != 0:
        return None
    lock = OutputDirLock(cfg.train.output_dir, key="train.output_dir").acquire()
    if args.resume and not args.eval_only:
        args.resume_changes = check_lazy_resume_config(cfg, args.allow_config_change)
    return lock


if __name__ == "__main__":
    parser = default_argument_parser()
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="--resume even if model.* or dataloader.train.* changed (logged)",
    )
    args = parser.parse_args()
    try:
        _LOCK = preflight(args)  # held until this process exits
    except (OverridesError, OutputDirError, OutputDirInUseError, ResumeConfigError) as e:
        sys.exit(f"lazyconfig_train_net.py: error: {e}")
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
