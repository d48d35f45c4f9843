"""The LazyConfig RetinaNet R18 student (``retinanet_R18_FPN.py``) distilled with MSE hints on
P3-P7 from the YAML RetinaNet Lite2 teacher (``configs/Synthetic/retinanet_lite2_FPN.yaml``; train
it first with ``tools/train_net.py``). ``distill`` turns the student's recipe into the recipe of a
``DistillationRetinaNet``; ``kd`` holds ``MODEL.KD`` settings as in YAML, each overridable on the
command line (``model.kd.FEATURE.LOSS=pkd``). The two models use the same anchors, so the
dense-head terms (``model.kd.DENSE.CLS_WEIGHT=1.0``) are available too.
"""

from kd_det.modeling.lazy import distill

from .retinanet_R18_FPN import (
    dataloader,
    datasets,
    input_size,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model = distill(
    model,
    kd={
        "TEACHER": {
            "CONFIG_FILE": "configs/Synthetic/retinanet_lite2_FPN.yaml",
            "WEIGHTS": "output/synthetic/retinanet_lite2_FPN/model_final.pth",
        },
        "FEATURE": {"LOSS": "mse", "LEVELS": ["p3", "p4", "p5", "p6", "p7"], "WEIGHTS": [1.0]},
        "WARMUP_ITERS": 50,
    },
    datasets=["synthetic_train"],
)
train.output_dir = "output/synthetic/lazy_distill_retinanet_R18_mse"

__all__ = ["dataloader", "datasets", "input_size", "lr_multiplier", "model", "optimizer", "train"]
