"""The teacher check: evaluate the teacher on a few validation images before the first step.

Strict loading cannot catch a teacher that loads cleanly and is useless (the wrong checkpoint,
input format or label order). So, on a fresh start, the teacher's box AP is measured on the first
``MODEL.KD.TEACHER.CHECK_IMAGES`` images of ``DATASETS.TEST[0]``, fed exactly as the student's
evaluation feeds it (:class:`~kd_det.modeling.teacher.TeacherInference`) and scored by
``COCOEvaluator``; it is logged, written to ``OUTPUT_DIR/teacher_check.json`` and ``metrics.json``,
and an AP below ``MODEL.KD.TEACHER.MIN_AP`` stops the run with the likely causes listed. Skipped
on resume, for random teachers, for teachers of other classes and without a test dataset.
See docs/own_coco_data.md, "3. The teacher check", for why each choice was made.
"""

import json
import logging
import os
import tempfile
import time

from detectron2.data import DatasetCatalog, build_detection_test_loader
from detectron2.data.dataset_mapper import DatasetMapper
from detectron2.engine import HookBase
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, inference_on_dataset
from detectron2.utils import comm

logger = logging.getLogger(__name__)


class TeacherCheckError(RuntimeError):
    """The teacher's AP on the check images is below ``MODEL.KD.TEACHER.MIN_AP``."""


class _OnImages(DatasetEvaluator):
    """A ``COCOEvaluator`` scoring only ``img_ids`` (the rest of the ground truth is ignored)."""

    def __init__(self, evaluator, img_ids):
        self.evaluator, self.img_ids = evaluator, img_ids
        self.detections = 0  # on this process

    def reset(self):
        self.evaluator.reset()
        self.detections = 0

    def process(self, inputs, outputs):
        self.detections += sum(len(o["instances"]) for o in outputs if "instances" in o)
        self.evaluator.process(inputs, outputs)

    def evaluate(self):
        return self.evaluator.evaluate(img_ids=self.img_ids)


def skip_reason(cfg, model):
    """Why the check does not apply to this config and model, or None if it does."""
    from kd_det.data.builtin import compare_teacher_classes
    from kd_det.modeling.meta_arch import DistillationRCNN, DistillationRetinaNet
    from kd_det.modeling.teacher import build_teacher_cfg, teacher_data_cfg

    t = cfg.MODEL.KD.TEACHER
    if not isinstance(model, (DistillationRCNN, DistillationRetinaNet)) or model.teacher is None:
        return "no teacher"
    if t.CHECK_IMAGES <= 0:
        return "MODEL.KD.TEACHER.CHECK_IMAGES is 0"
    if t.ALLOW_RANDOM or not t.WEIGHTS:
        return "the teacher is random (MODEL.KD.TEACHER.ALLOW_RANDOM)"
    if not cfg.DATASETS.TEST:
        return "DATASETS.TEST is empty"
    if compare_teacher_classes(cfg, teacher_data_cfg(cfg, build_teacher_cfg(cfg))):
        return "the teacher was trained on other classes"
    return None


def evaluate_teacher(cfg, model, num_images, mapper=None):
    """Box AP of ``model``'s teacher on the first ``num_images`` images of ``DATASETS.TEST[0]``,
    read by ``mapper`` (default: the student's test mapper of a YAML config, which a LazyConfig
    run replaces with its ``dataloader.test.mapper``).

    Returns:
        dict: COCO bbox metrics (``AP``, ``AP50``, ...) on every process, ``images``, ``dataset``.
    """
    from kd_det.modeling.teacher import TeacherInference

    name = cfg.DATASETS.TEST[0]
    dicts = DatasetCatalog.get(name)[:num_images]
    mapper = mapper if mapper is not None else DatasetMapper(cfg, False)
    loader = build_detection_test_loader(dicts, mapper=mapper, num_workers=0)
    teacher = TeacherInference(model.teacher, cfg.INPUT.FORMAT, model.teacher_input_format)
    teacher.eval()  # inference_on_dataset restores this mode afterwards: keep the teacher in eval
    on_images = _OnImages(None, [d["image_id"] for d in dicts])
    with tempfile.TemporaryDirectory() as tmp:
        on_images.evaluator = COCOEvaluator(name, tasks=("bbox",), distributed=True, output_dir=tmp)
        res = inference_on_dataset(teacher, loader, on_images)
    bbox = comm.all_gather(dict(res.get("bbox", {})) if res else {})[0]  # rank 0 evaluated
    detections = sum(comm.all_gather(on_images.detections))
    objects = sum(not a.get("iscrowd", 0) for d in dicts for a in d.get("annotations", []))
    if detections == 0 and objects > 0:
        # COCOEvaluator reports NaN when nothing was predicted ("No predictions from the
        # model!"), which reads as "nothing to judge"; a teacher that finds none of the objects
        # there has an AP of 0.
        bbox = {k: 0.0 for k in bbox} or {"AP": 0.0}
    return dict(bbox, images=len(dicts), dataset=name, detections=detections, objects=objects)


def check_teacher(cfg, model, output_dir=None, mapper=None):
    """Run the check (see the module docstring); write ``output_dir/teacher_check.json``.
    ``mapper`` as in :func:`evaluate_teacher`.

    Returns:
        dict or None: the check's result, None when skipped.

    Raises:
        TeacherCheckError: the AP is below ``MODEL.KD.TEACHER.MIN_AP``.
    """
    reason = skip_reason(cfg, model)
    if reason:
        logger.info(f"Teacher check skipped: {reason}.")
        return None
    start = time.perf_counter()
    res = evaluate_teacher(cfg, model, cfg.MODEL.KD.TEACHER.CHECK_IMAGES, mapper)
    res["seconds"] = time.perf_counter() - start
    ap, floor = res.get("AP", float("nan")), cfg.MODEL.KD.TEACHER.MIN_AP
    where = f"the first {res['images']} images of '{res['dataset']}'"
    logger.info(
        f"Teacher check: box AP {ap:.1f} (AP50 {res.get('AP50', float('nan')):.1f}) on {where} "
        f"in {res['seconds']:.1f} s (floor MODEL.KD.TEACHER.MIN_AP {floor})."
    )
    if output_dir and comm.is_main_process():
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "teacher_check.json"), "w") as f:
            json.dump(res, f, indent=2)
    if not ap >= 0:  # NaN or COCO's -1: no ground-truth box among the check images
        logger.warning(f"Teacher check: no AP on {where} (no objects?); not judged.")
    elif floor > 0 and ap < floor:
        t = cfg.MODEL.KD.TEACHER
        raise TeacherCheckError(
            f"Teacher check failed: the teacher's box AP on {where} is {ap:.1f}, below "
            f"MODEL.KD.TEACHER.MIN_AP {floor}. A teacher that loads but scores this low usually "
            "has one of these problems:\n"
            f"  - wrong checkpoint: MODEL.KD.TEACHER.WEIGHTS '{t.WEIGHTS}' is not the trained "
            "teacher (an early or backbone-only checkpoint, another run's model);\n"
            "  - wrong input format: the teacher config's INPUT.FORMAT (RGB/BGR) or "
            "MODEL.PIXEL_MEAN / MODEL.PIXEL_STD differ from those it was trained with "
            f"(MODEL.KD.TEACHER.CONFIG_FILE '{t.CONFIG_FILE}', MODEL.KD.TEACHER.OPTS);\n"
            "  - wrong label order: the teacher was trained with other category ids or another "
            "category order than DATASETS.TEST's json.\n"
            "Evaluate it on the whole test set with tools/train_net.py --config-file <this config> "
            "--eval-teacher. If the teacher is simply weak on this data, lower "
            "MODEL.KD.TEACHER.MIN_AP (0.0 only logs the AP), or skip the check with "
            "MODEL.KD.TEACHER.CHECK_IMAGES 0."
        )
    return res


class TeacherCheckHook(HookBase):
    """Runs :func:`check_teacher` in ``before_train`` of a fresh (not resumed) run; ``cfg`` is the
    run's config (for a LazyConfig run, :func:`kd_det.modeling.lazy.recipe_kd_cfg` with
    ``OUTPUT_DIR`` and ``DATASETS.TEST`` set), ``mapper`` as in :func:`evaluate_teacher`."""

    def __init__(self, cfg, mapper=None):
        self.cfg, self.mapper = cfg, mapper

    def before_train(self):
        if self.trainer.start_iter > 0:
            logger.info("Teacher check skipped: resumed run (checked when it started).")
            return
        model = getattr(self.trainer.model, "module", self.trainer.model)
        res = check_teacher(self.cfg, model, self.cfg.OUTPUT_DIR, self.mapper)
        if res is not None and res.get("AP", -1) >= 0:
            self.trainer.storage.put_scalar("teacher_check/AP", res["AP"], smoothing_hint=False)
            self.trainer.storage.put_scalar("teacher_check/seconds", res["seconds"])
