"""``KDTrainer``: detectron2's ``DefaultTrainer`` with what kd_det's users need on top.

What differs from ``DefaultTrainer`` and why:

* **DDP on CPU.** detectron2's ``create_ddp_model`` always passes ``device_ids=[local_rank]``, which
  DistributedDataParallel rejects for CPU modules; multi-process CPU (gloo) training is how kd_det
  is tested and how users without GPUs scale out. We pass ``device_ids=None`` for CPU models.
* **find_unused_parameters** comes from ``KD_TRAINER.FIND_UNUSED_PARAMETERS``: distillation parts
  that are switched off for a step would otherwise make DDP fail ("Expected to have finished
  reduction in the prior iteration").
* **Crash-safe checkpoints** (:class:`AtomicDetectionCheckpointer`) and a bounded number kept.
* **AMP on CPU**: detectron2's ``AMPTrainer`` requires CUDA; on CPU we autocast to bfloat16 without
  a grad scaler, so a GPU config with ``SOLVER.AMP.ENABLED`` still runs on a CPU machine.
* **Input checks before the first step** (:mod:`kd_det.data.checks`): every training and test
  image must exist and decode to 8-bit pixels, boxes must be numbers and training boxes lie in
  their image (and carry masks under ``MODEL.MASK_ON``), so a wrong dataset path or a truncated
  JPEG fails in seconds with the file named, not after the model and the teacher were built (or
  after training, for a test image).
* **Mixed-sample mapper** when ``INPUT.MIX.ENABLED``; a COCO evaluator by default.
* **One run per OUTPUT_DIR**: ``train`` holds the folder's lock (:mod:`.run_lock`) unless the
  script took it already, so two runs never write into one folder.
"""

import logging
import math
import os
import time
import weakref
from contextlib import nullcontext

import torch
from detectron2.data import (
    DatasetMapper,
    MetadataCatalog,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from kd_det.config.validation import validate_kd_config
from kd_det.data.builtin import check_dataset_name
from kd_det.data.catalog import parse_each_dataset_once
from kd_det.data.checks import check_dataset_files, check_instance_masks
from kd_det.data.loader import ResumableTrainLoader, build_resumable_train_loader

from .checkpoint import (
    AtomicDetectionCheckpointer,
    PruningPeriodicCheckpointer,
    list_checkpoints,
    periodic_iteration,
)
from .hooks import EMAUpdateHook
from .rng import GlobalRNGState, preserved_global_rng
from .run_lock import run_lock
from .teacher_check import TeacherCheckHook

logger = logging.getLogger(__name__)


class LossReportMixin:
    """Makes detectron2's divergence error name the non-finite terms of that iteration.

    ``SimpleTrainer.write_metrics`` raises ``FloatingPointError("Loss became infinite or NaN at
    iteration=...")`` with the loss dict averaged over processes. With a dozen ``loss_kd_*``
    terms the culprit is easier to see listed by name, with this process's own values.
    """

    def _write_metrics(self, loss_dict, data_time, prefix="", iter=None):
        try:
            super()._write_metrics(loss_dict, data_time, prefix=prefix, iter=iter)
        except FloatingPointError as e:
            values = {k: float(v.detach().float().cpu()) for k, v in loss_dict.items()}
            bad = [k for k, v in values.items() if not math.isfinite(v)]
            raise FloatingPointError(
                f"{e}\nNon-finite terms on this process: {', '.join(bad) or 'none'}; its loss "
                f"dict: {values}. See docs/troubleshooting.md (NaN or infinite losses)."
            ) from e


class KDSimpleTrainer(LossReportMixin, SimpleTrainer):
    """detectron2's ``SimpleTrainer`` whose divergence error names the non-finite terms."""


class CPUAMPTrainer(LossReportMixin, AMPTrainer):
    """``AMPTrainer`` that also runs CPU models: bfloat16 autocast on CPU, no grad scaler.

    bfloat16 has float32's exponent range, so the loss scaling that float16 needs is unnecessary.
    The path follows the device of the model's parameters, not whether a GPU exists: a CPU model
    on a machine with CUDA would otherwise run under CUDA autocast, which leaves every CPU op in
    float32. For a CUDA model it behaves exactly like detectron2's ``AMPTrainer``.
    """

    def __init__(self, model, data_loader, optimizer, **kwargs):
        self.device_type = next(model.parameters()).device.type
        if self.device_type != "cuda" and kwargs.get("grad_scaler") is None:
            # detectron2 builds a CUDA GradScaler by default; a CPU model never scales.
            kwargs["grad_scaler"] = torch.amp.GradScaler("cuda", enabled=False)
        super().__init__(model, data_loader, optimizer, **kwargs)

    def run_step(self):
        if self.device_type == "cuda":
            return super().run_step()
        assert self.model.training, "[CPUAMPTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        with torch.autocast(device_type=self.device_type, dtype=torch.bfloat16):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses = loss_dict
                loss_dict = {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        losses.backward()
        self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


def check_inputs(cfg):
    """Check the training and test images (and training boxes) before the model is built.

    See :mod:`kd_det.data.checks`: a missing, truncated or corrupt image, or an invalid box,
    stops the run here with the file named, not hours in inside a data-loader worker -- or after
    training, for a test image. ``KD_TRAINER.CHECK_IMAGES`` picks full decode or headers only;
    ``KD_TRAINER.SKIP_UNREADABLE_IMAGES`` drops unreadable images instead (with a count logged).
    """
    opts = dict(
        mode=cfg.KD_TRAINER.CHECK_IMAGES,
        skip_unreadable=cfg.KD_TRAINER.SKIP_UNREADABLE_IMAGES,
    )
    check_dataset_files(cfg.DATASETS.TRAIN, check_boxes=True, **opts)
    test_only = [n for n in cfg.DATASETS.TEST if n not in cfg.DATASETS.TRAIN]
    check_dataset_files(test_only, check_boxes=False, **opts)
    if cfg.MODEL.MASK_ON:
        check_instance_masks(cfg.DATASETS.TRAIN)


def setup_kd_logger(output_dir):
    """Give kd_det's loggers ("kd_det.*") the console and ``output_dir/log.txt``, if nothing did.

    detectron2's ``default_setup`` configures only the "detectron2" and "fvcore" loggers, so
    without this kd_det's own lines (``Loaded teacher weights from ...``, resume fallbacks, input
    check counts) go nowhere. ``tools/train_net.py`` calls detectron2's ``setup_logger`` for
    "kd_det" itself; this covers scripts and notebooks that build a ``KDTrainer`` directly. Only
    handlers are added: whether records also reach the root logger stays the application's choice.
    """
    log = logging.getLogger("kd_det")
    if log.handlers:
        return
    propagate = log.propagate
    setup_logger(output_dir or None, distributed_rank=comm.get_rank(), name="kd_det")
    log.propagate = propagate


def clean_tail_start(cfg):
    """First iteration trained without mixing: the last ``INPUT.MIX.CLEAN_TAIL`` fraction of
    ``SOLVER.MAX_ITER`` (None when the tail is empty), as detectors turn strong augmentation off
    for the end of a schedule so the last updates see the test distribution."""
    tail = cfg.INPUT.MIX.CLEAN_TAIL
    if tail <= 0:
        return None
    return int(round(cfg.SOLVER.MAX_ITER * (1.0 - tail)))


def _why_not_resumable(cfg):
    """Why kd_det's resumable loader cannot serve ``cfg`` ("" when it can)."""
    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        return f"DATALOADER.SAMPLER_TRAIN is {cfg.DATALOADER.SAMPLER_TRAIN}"
    if cfg.SEED < 0:
        return "SEED is negative (random)"
    if cfg.MODEL.KEYPOINT_ON:
        return "keypoint training filters images by keypoint count"
    return ""


def _rng_neutral(hook):
    """Make a hook's calls leave the global random state as they found it."""
    for name in ("before_train", "after_step", "after_train"):
        fn = getattr(hook, name)

        def wrapped(*args, _fn=fn, **kwargs):
            with preserved_global_rng():
                return _fn(*args, **kwargs)

        setattr(hook, name, wrapped)
    return hook


def fall_back_to_cpu(cfg):
    """Switch ``MODEL.DEVICE`` from CUDA to CPU when no GPU exists, with a warning.

    COCO configs say ``cuda`` (detectron2's default); kd_det promises that everything also runs on a
    CPU, so instead of failing in ``model.to("cuda")`` the config is adapted. Call before freezing.
    """
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning(f"MODEL.DEVICE={cfg.MODEL.DEVICE} but CUDA is not available; using cpu.")
        cfg.MODEL.DEVICE = "cpu"
    return cfg


class KDTrainer(DefaultTrainer):
    """The trainer behind ``tools/train_net.py`` (see the module docstring for what it changes)."""

    def __init__(self, cfg):
        # Same construction order as DefaultTrainer.__init__, with our DDP and checkpointer.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        setup_kd_logger(cfg.OUTPUT_DIR)
        validate_kd_config(cfg)
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        # The checks, the loader and the mixing mapper each ask for the training set: parse each
        # json once (kd_det/data/catalog.py).
        with parse_each_dataset_once():
            check_inputs(cfg)
            model = self.build_model(cfg)
            optimizer = self.build_optimizer(cfg, model)
            data_loader = self.build_train_loader(cfg)

        model = self.wrap_ddp(cfg, model)
        trainer_cls = CPUAMPTrainer if cfg.SOLVER.AMP.ENABLED else KDSimpleTrainer
        self._trainer = trainer_cls(model, data_loader, optimizer)

        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicDetectionCheckpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        # The global random state (proposal/ROI sampling) travels with every checkpoint.
        self.checkpointer.add_checkpointable("rng", GlobalRNGState())
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def resume_or_load(self, resume=True):
        """detectron2's ``resume_or_load`` with kd_det's safety nets.

        With ``resume``, the checkpointer falls back to the newest loadable checkpoint (see
        :meth:`AtomicDetectionCheckpointer.find_resumable`), and the periodic checkpoints written
        before the resume join the ``KD_TRAINER.MAX_TO_KEEP`` window: detectron2's
        ``PeriodicCheckpointer`` only remembers the files it wrote itself, so without this every
        restart would leave its predecessors' checkpoints on disk forever. Without ``resume``, a
        directory that already holds checkpoints gets a warning: this run starts from iteration 0,
        and its saves rename those files aside rather than overwrite them. With ``resume`` but no
        checkpoint, a warning names the folder (training starts at 0: not an error, since
        pre-emption scripts pass ``--resume`` on the first start too).
        """
        existing = list_checkpoints(self.cfg.OUTPUT_DIR)
        super().resume_or_load(resume=resume)
        resumed = self.checkpointer.resumed_from
        if resume and resumed is None and comm.is_main_process():
            # Loud, not an error: pre-emption scripts pass --resume on the first start too.
            logger.warning(
                f"--resume: OUTPUT_DIR '{self.cfg.OUTPUT_DIR}' holds no checkpoint, so training "
                "starts at iteration 0 from MODEL.WEIGHTS. Expected on a run's first start; "
                "otherwise check OUTPUT_DIR (a typo starts a new run here)."
            )
        if resumed is None and existing and comm.is_main_process():
            logger.warning(
                f"OUTPUT_DIR '{self.cfg.OUTPUT_DIR}' already holds {len(existing)} checkpoint(s) "
                f"(newest: {existing[0]}) and training starts from iteration 0 without --resume. "
                "Checkpoints this run would overwrite are renamed to <name>.pth.bak-<time>. Pass "
                "--resume to continue that run instead, or choose a new OUTPUT_DIR."
            )
        if resumed is not None and periodic_iteration(resumed) is not None:
            done = periodic_iteration(resumed)
            periodic = [n for n in existing if periodic_iteration(n) is not None]
            earlier = sorted(periodic, key=periodic_iteration)
            for h in self._hooks:
                if isinstance(h, hooks.PeriodicCheckpointer) and h.max_to_keep:
                    h.recent_checkpoints = [
                        os.path.join(self.cfg.OUTPUT_DIR, n)
                        for n in earlier
                        if periodic_iteration(n) <= done
                    ]

    def train(self):
        """Run training; returns the last evaluation's results (also without EXPECTED_RESULTS).

        A resumable loader starts at the batch of the first iteration to run (``start_iter`` is
        known only after ``resume_or_load``), so a resumed run sees the batches an uninterrupted
        one would have seen.
        """
        loader = self._trainer.data_loader
        if isinstance(loader, ResumableTrainLoader):
            loader.start_iter = self.start_iter
        # One run per OUTPUT_DIR also for a script that took no lock (run_lock.guard_run): the
        # first process holds it for the loop, the final evaluation included.
        with run_lock(self.cfg.OUTPUT_DIR) if comm.is_main_process() else nullcontext():
            super().train()
        return getattr(self, "_last_eval_results", None)

    @classmethod
    def build_model(cls, cfg):
        """``DefaultTrainer.build_model``, with the faster bit-identical CPU ROIAlign backward
        (``KD_TRAINER.FAST_CPU_ROI_ALIGN``) swapped into the model's poolers."""
        model = super().build_model(cfg)
        if cfg.KD_TRAINER.FAST_CPU_ROI_ALIGN and cfg.MODEL.DEVICE == "cpu":
            from kd_det.layers.roi_align import use_fast_cpu_roi_align

            use_fast_cpu_roi_align(model)
        return model

    @staticmethod
    def wrap_ddp(cfg, model):
        """Wrap in DistributedDataParallel when there are several processes, CPU included."""
        if comm.get_world_size() == 1:
            return model
        on_cpu = next(model.parameters()).device.type == "cpu"
        return create_ddp_model(
            model,
            broadcast_buffers=False,
            device_ids=None if on_cpu else [comm.get_local_rank()],
            find_unused_parameters=cfg.KD_TRAINER.FIND_UNUSED_PARAMETERS,
        )

    def build_hooks(self):
        ret = super().build_hooks()
        for i, h in enumerate(ret):
            if isinstance(h, hooks.PeriodicCheckpointer):
                max_to_keep = self.cfg.KD_TRAINER.MAX_TO_KEEP or None
                ret[i] = PruningPeriodicCheckpointer(
                    self.checkpointer, self.cfg.SOLVER.CHECKPOINT_PERIOD, max_to_keep=max_to_keep
                )
        # Models with EMA teachers (OnlineDistillationRCNN) average the weights each optimizer
        # step produced: update right after the step, before checkpointing and evaluation see it.
        core = getattr(self.model, "module", self.model)
        if callable(getattr(core, "update_ema", None)):
            at = next((i + 1 for i, h in enumerate(ret) if isinstance(h, hooks.LRScheduler)), 0)
            ret.insert(at, EMAUpdateHook(core))
        # Distillation: the teacher's AP on a few test images before the first step.
        ret.insert(0, TeacherCheckHook(self.cfg))
        # Evaluations must not consume the random streams training draws from (see engine/rng.py).
        for h in ret:
            if isinstance(h, (hooks.EvalHook, TeacherCheckHook)):
                _rng_neutral(h)
        return ret

    @classmethod
    def build_train_loader(cls, cfg):
        """The resumable loader of :mod:`kd_det.data.loader` (batches depend only on the seed and
        the iteration), or detectron2's where that loader does not apply; with mixing,
        ``INPUT.MIX.CLEAN_TAIL`` of the last iterations are mapped without it."""
        mapper, plain, plain_from = DatasetMapper(cfg, True), None, None
        if cfg.INPUT.MIX.ENABLED:
            from kd_det.data.mix import MixedSampleDatasetMapper

            mapper, plain = MixedSampleDatasetMapper(cfg, True), mapper
            plain_from = clean_tail_start(cfg)
        reason = _why_not_resumable(cfg)
        if reason:
            logger.warning(f"Using detectron2's training loader: {reason}. A resumed run will not "
                           "repeat an uninterrupted one exactly.")  # fmt: skip
            if plain_from is not None:
                raise ValueError(
                    f"INPUT.MIX.CLEAN_TAIL needs kd_det's resumable loader ({reason})."
                )
            return build_detection_train_loader(cfg, mapper=mapper)
        if cfg.INPUT.MIX.ENABLED and cfg.INPUT.MIX.PARTNER_CACHE_SIZE > 0:
            logger.warning("INPUT.MIX.PARTNER_CACHE_SIZE > 0 draws partners from each worker's "
                           "history: batches depend on DATALOADER.NUM_WORKERS and resumed runs "
                           "differ from uninterrupted ones. Set it to 0 for exact "
                           "reproducibility.")  # fmt: skip
        dicts = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
        return build_resumable_train_loader(
            dicts,
            mapper,
            total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
            seed=cfg.SEED,
            num_workers=cfg.DATALOADER.NUM_WORKERS,
            aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
            plain_mapper=plain,
            plain_from_iter=plain_from,
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """COCO box AP with pycocotools (the official implementation; detectron2's fast C++
        COCOeval needs its compiled ops, which kd_det does not require)."""
        if output_folder is None:
            check_dataset_name(dataset_name, "DATASETS.TEST")  # it becomes a path part
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
        if evaluator_type != "coco":
            raise NotImplementedError(
                f"Dataset '{dataset_name}' has evaluator_type '{evaluator_type}'; kd_det's trainer "
                "evaluates COCO-format datasets. Override KDTrainer.build_evaluator for others."
            )
        return COCOEvaluator(
            dataset_name, tasks=("bbox",), distributed=True, output_dir=output_folder
        )
