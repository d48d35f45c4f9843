"""CPU-sized RetinaNet R18-FPN on the generated scenes, as a LazyConfig.

detectron2's model-zoo recipe (``common/models/retinanet.py``) with a ResNet-18 body trained from
scratch with BN, a 64-channel FPN, 12 classes and the anchors of
``configs/Synthetic/Base-Synthetic-RetinaNet.yaml``; data, input size and schedule as
``configs/Synthetic/Base-Synthetic.yaml``. Train it, or distill it with
``distill_retinanet_R18_mse.py``, with ``tools/lazyconfig_train_net.py``; as a teacher, name this
file in ``MODEL.KD.TEACHER.CONFIG_FILE``.
"""

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.evaluation import COCOEvaluator
from detectron2.layers import ShapeSpec
from detectron2.model_zoo import get_config
from detectron2.modeling.backbone import BasicStem, ResNet
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler
from omegaconf import OmegaConf

CHANNELS = 64

model = get_config("common/models/retinanet.py").model
model.backbone.bottom_up = L(ResNet)(
    stem=L(BasicStem)(in_channels=3, out_channels=64, norm="BN"),
    stages=L(ResNet.make_default_stages)(depth=18, norm="BN"),
    out_features=["res3", "res4", "res5"],
    freeze_at=0,
)
model.backbone.out_channels = CHANNELS
model.backbone.norm = "BN"
model.backbone.top_block = L(LastLevelP6P7)(in_channels=512, out_channels=CHANNELS)
model.head.input_shape = [ShapeSpec(channels=CHANNELS)] * 5
model.head.conv_dims = [CHANNELS] * 4
model.num_classes = 12
model.anchor_generator.sizes = [
    [x, x * 2 ** (1.0 / 3), x * 2 ** (2.0 / 3)] for x in [16, 32, 64, 128, 256]
]

# Input size of both loaders (override: input_size.min_size=... input_size.max_size=...).
input_size = dict(min_size=192, max_size=320)
dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="synthetic_train"),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(
                short_edge_length="${input_size.min_size}", max_size="${input_size.max_size}"
            ),
            L(T.RandomFlip)(horizontal=True),
        ],
        image_format="BGR",
    ),
    total_batch_size=8,
    num_workers=2,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="synthetic_val", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[
            L(T.ResizeShortestEdge)(
                short_edge_length="${input_size.min_size}", max_size="${input_size.max_size}"
            ),
        ],
        image_format="BGR",
    ),
    num_workers=2,
)
dataloader.evaluator = L(COCOEvaluator)(dataset_name="synthetic_val")
# kd_det registers the generated scenes the loaders name from here (tools/lazyconfig_train_net.py).
datasets = dict(SYNTHETIC_ROOT="datasets/synthetic", COCO=[])

optimizer = get_config("common/optim.py").SGD
optimizer.lr = 0.01
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01], milestones=[200, 270], num_updates=300
    ),
    warmup_length=50 / 300,
    warmup_factor=0.001,
)
train = get_config("common/train.py").train
train.init_checkpoint = ""
train.max_iter = 300
train.device = "cpu"
train.eval_period = 0
train.checkpointer = dict(period=100, max_to_keep=3)
train.seed = 42
train.output_dir = "output/synthetic/lazy_retinanet_R18_FPN"
