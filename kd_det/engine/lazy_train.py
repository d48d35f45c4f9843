"""Training and evaluating a LazyConfig model: detectron2's ``tools/lazyconfig_train_net.py`` with
kd_det's trainers.

The steps are detectron2's (``instantiate`` the model, optimizer and loaders; ``SimpleTrainer`` or
``AMPTrainer`` with the iteration timer, LR scheduler, periodic checkpointer, evaluation and
writers; ``resume_or_load``), so a LazyConfig written for detectron2 trains unchanged. What kd_det
adds, for the same reasons as in :class:`~kd_det.engine.KDTrainer`:

* a distillation model (:func:`kd_det.modeling.lazy.distill`) trains like any model: its
  ``loss_kd_*`` terms are logged as losses;
* AMP on CPU (bfloat16, :class:`~kd_det.engine.trainer.CPUAMPTrainer`) and DDP on CPU (gloo,
  ``device_ids=None``);
* crash-safe checkpoints (:class:`~kd_det.engine.checkpoint.AtomicDetectionCheckpointer`);
* the teacher check of a fresh distillation run (:mod:`kd_det.engine.teacher_check`: the
  teacher's AP on the first test images, read by ``dataloader.test.mapper``, before the first
  step; ``model.kd.TEACHER.MIN_AP`` and ``CHECK_IMAGES`` as in YAML);
* kd_det's datasets: the generated scenes and ``DATASETS.COCO``-style entries are registered
  from an optional top-level ``datasets`` node of the config (``SYNTHETIC_ROOT``, ``COCO``) for
  the dataset names the loaders use.
"""

import logging

from detectron2.config import instantiate
from detectron2.engine import hooks
from detectron2.engine.defaults import create_ddp_model, default_writers
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from omegaconf import OmegaConf

from .checkpoint import AtomicDetectionCheckpointer
from .teacher_check import TeacherCheckHook
from .trainer import CPUAMPTrainer, KDSimpleTrainer

logger = logging.getLogger(__name__)

__all__ = ["do_test", "do_train", "register_lazy_datasets"]


def register_lazy_datasets(cfg):
    """Register the kd_det datasets that ``cfg``'s loaders name (see the module docstring)."""
    from kd_det.config import get_kd_cfg
    from kd_det.data.builtin import register_datasets_from_config

    def names(path):
        value = OmegaConf.select(cfg, path, default=None)
        if value is None:
            return ()
        return (value,) if isinstance(value, str) else tuple(value)

    ycfg = get_kd_cfg()
    extra = OmegaConf.select(cfg, "datasets", default=None)
    if extra is not None:
        extra = OmegaConf.to_container(extra, resolve=True)
        if "SYNTHETIC_ROOT" in extra:
            ycfg.DATASETS.SYNTHETIC_ROOT = extra["SYNTHETIC_ROOT"]
        ycfg.DATASETS.COCO = [list(e) for e in extra.get("COCO", [])]
    ycfg.DATASETS.TRAIN = names("dataloader.train.dataset.names")
    ycfg.DATASETS.TEST = names("dataloader.test.dataset.names")
    register_datasets_from_config(ycfg)


def do_test(cfg, model):
    """Evaluate ``model`` with ``cfg.dataloader.test`` and ``.evaluator`` (when it has one)."""
    if "evaluator" not in cfg.dataloader:
        return {}
    ret = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    print_csv_format(ret)
    return ret


def _wrap_ddp(cfg, model):
    if comm.get_world_size() == 1:
        return model
    on_cpu = next(model.parameters()).device.type == "cpu"
    ddp = dict(cfg.train.get("ddp", {}))
    if on_cpu:
        ddp["device_ids"] = None
    return create_ddp_model(model, **ddp)


def build_model(cfg):
    """``instantiate(cfg.model)`` on ``cfg.train.device``."""
    model = instantiate(cfg.model)
    return model.to(cfg.train.device)


def _teacher_check_hook(cfg):
    """The teacher check of a :func:`~kd_det.modeling.lazy.distill` model, or None for a plain
    model (the hook skips itself on resume, as in :class:`~kd_det.engine.KDTrainer`)."""
    from kd_det.modeling.lazy import recipe_kd_cfg

    kcfg = recipe_kd_cfg(cfg.model)
    if kcfg is None:
        return None
    names = OmegaConf.select(cfg, "dataloader.test.dataset.names", default=None)
    kcfg.DATASETS.TEST = () if names is None else ((names,) if isinstance(names, str) else
                                                   tuple(names))  # fmt: skip
    kcfg.OUTPUT_DIR = cfg.train.output_dir
    mapper = instantiate(cfg.dataloader.test.mapper) if "test" in cfg.dataloader else None
    return TeacherCheckHook(kcfg, mapper)


def do_train(cfg, resume=False):
    """Train ``cfg.model`` (detectron2's ``do_train``; see the module docstring).

    Returns:
        dict: the last evaluation's results ({} without an evaluator).
    """
    model = build_model(cfg)
    logger.info(f"Model:\n{model}")
    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    model = _wrap_ddp(cfg, model)
    trainer_cls = CPUAMPTrainer if cfg.train.amp.enabled else KDSimpleTrainer
    trainer = trainer_cls(model, train_loader, optim)
    checkpointer = AtomicDetectionCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    results = {}

    def test_and_keep():
        results.update(do_test(cfg, model))
        return results

    trainer.register_hooks(
        [
            _teacher_check_hook(cfg),
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            (
                hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
                if comm.is_main_process()
                else None
            ),
            hooks.EvalHook(cfg.train.eval_period, test_and_keep),
            (
                hooks.PeriodicWriter(
                    default_writers(cfg.train.output_dir, cfg.train.max_iter),
                    period=cfg.train.log_period,
                )
                if comm.is_main_process()
                else None
            ),
        ]
    )
    if resume and not checkpointer.has_checkpoint() and comm.is_main_process():
        # detectron2 silently starts again from train.init_checkpoint; say so (as KDTrainer does).
        # Loud, not an error: pre-emption scripts pass --resume on the first start too.
        logger.warning(
            f"--resume: train.output_dir '{cfg.train.output_dir}' holds no checkpoint, so "
            "training starts at iteration 0 from train.init_checkpoint. Expected on a run's "
            "first start; otherwise check train.output_dir (a typo starts a new run here)."
        )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
    return results
