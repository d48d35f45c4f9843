"""Mix strategies are a registry: a user's own strategy, registered in this test file, is chosen by
``INPUT.MIX.TYPE`` and its layers go through the mapper's box rules."""

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from kd_det.config import get_kd_cfg
from kd_det.config.validation import validate_kd_config
from kd_det.data.mix import MIX_STRATEGY_REGISTRY, MixedSampleDatasetMapper
from kd_det.data.mix.geometry import fit_layer, main_layer


@MIX_STRATEGY_REGISTRY.register()
def right_half_from_partner(mapper, main, rng):
    """The right half of the frame shows a partner (a user's own strategy)."""
    h, w = main.image.shape[-2:]
    (partner,) = mapper.draw_partners(1, rng)
    region = (w // 2, 0, w, h)
    layer = fit_layer(partner, h, w, region, rng)
    image = main.image.clone()
    image[:, :, w // 2 :] = layer.pixels
    return image, [main_layer(main), layer], True, {"split": w // 2}


@pytest.fixture
def dicts(tmp_path):
    out = []
    for i, value in enumerate((0, 255)):
        path = str(tmp_path / f"{i}.png")
        cv2.imwrite(path, np.full((40, 60, 3), value, np.uint8))
        annos = [
            {"bbox": box, "bbox_mode": BoxMode.XYWH_ABS, "category_id": i}
            for box in ([2, 2, 20, 30], [36, 4, 20, 30])
        ]
        out.append(
            {"file_name": path, "height": 40, "width": 60, "image_id": i, "annotations": annos}
        )
    return out


def test_user_strategy_is_named_by_mix_type(dicts):
    cfg = get_kd_cfg()
    cfg.INPUT.MIX.TYPE = "right_half_from_partner"
    validate_kd_config(cfg)  # a registered name is a valid INPUT.MIX.TYPE
    torch.manual_seed(0)
    mapper = MixedSampleDatasetMapper(
        True,
        augmentations=[T.NoOpTransform()],
        image_format="BGR",
        mix_enabled=True,
        mix_type="right_half_from_partner",
        mix_prob=1.0,
        dataset_dicts=dicts[1:],  # the white image is the only partner
        return_mix_info=True,
    )
    ret = mapper(dict(dicts[0]))
    image = ret["image"]
    assert (image[:, :, :30] == 0).all() and (image[:, :, 30:] == 255).all()
    assert ret["mix_info"]["type"] == "right_half_from_partner" and ret["mix_info"]["split"] == 30
    # The main image's right box is hidden by the partner's half; the partner's left box is outside
    # its region; one box of each survives.
    assert sorted(ret["instances"].gt_classes.tolist()) == [0, 1]


def test_unregistered_type_names_the_registry(dicts):
    with pytest.raises(ValueError, match="MIX_STRATEGY_REGISTRY"):
        MixedSampleDatasetMapper(
            True, augmentations=[], image_format="BGR", mix_enabled=True, mix_type="nope",
            dataset_dicts=dicts,
        )  # fmt: skip
