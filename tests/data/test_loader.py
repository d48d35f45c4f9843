"""The resumable training loader: batches depend only on the seed and the iteration."""

import itertools

import numpy as np
import pytest
import torch

from conftest import CONFIGS, tiny_overrides

R18 = f"{CONFIGS}/Synthetic/faster_rcnn_R18_FPN.yaml"


def _cfg(tmp_path, root, *extra):
    from kd_det.config import get_kd_cfg
    from kd_det.data.builtin import register_datasets_from_config

    cfg = get_kd_cfg()
    cfg.merge_from_file(R18)
    cfg.merge_from_list(tiny_overrides(tmp_path, root, max_iter=8, batch=2) + list(extra))
    register_datasets_from_config(cfg)
    return cfg


def _batches(loader, n):
    return [
        [(d["file_name"], d["image"].clone(), d["instances"].gt_boxes.tensor.clone()) for d in b]
        for b in itertools.islice(iter(loader), n)
    ]


def _same(a, b):
    return all(
        x[0] == y[0] and torch.equal(x[1], y[1]) and torch.equal(x[2], y[2])
        for ba, bb in zip(a, b)
        for x, y in zip(ba, bb)
    ) and len(a) == len(b)


MIX = ["INPUT.MIX.ENABLED", "True", "INPUT.MIX.TYPE", "cutnmix", "INPUT.MIX.PROB", "0.7"]


def test_batches_do_not_depend_on_workers_and_resume_where_they_stopped(tmp_path, synthetic_root):
    from kd_det.engine import KDTrainer

    cfg = _cfg(tmp_path, synthetic_root, *MIX)
    ref = _batches(KDTrainer.build_train_loader(cfg), 5)
    cfg2 = cfg.clone()
    cfg2.DATALOADER.NUM_WORKERS = 2
    assert _same(_batches(KDTrainer.build_train_loader(cfg2), 5), ref)
    later = KDTrainer.build_train_loader(cfg)
    later.start_iter = 3
    assert _same(_batches(later, 2), ref[3:])
    # A different seed gives a different stream (the comparison above can fail).
    cfg3 = cfg.clone()
    cfg3.SEED = cfg.SEED + 1
    assert not _same(_batches(KDTrainer.build_train_loader(cfg3), 5), ref)


def test_mapping_in_the_main_process_leaves_global_rng_alone(tmp_path, synthetic_root):
    from kd_det.engine import KDTrainer

    loader = KDTrainer.build_train_loader(_cfg(tmp_path, synthetic_root, *MIX))
    torch.manual_seed(123)
    np.random.seed(123)
    expected = (torch.rand(3), np.random.rand(3))
    torch.manual_seed(123)
    np.random.seed(123)
    _batches(loader, 3)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])


def test_clean_tail_maps_the_last_iterations_without_mixing(tmp_path, synthetic_root):
    from kd_det.engine import KDTrainer
    from kd_det.engine.trainer import clean_tail_start

    always = ["INPUT.MIX.ENABLED", "True", "INPUT.MIX.TYPE", "mixup", "INPUT.MIX.PROB", "1.0"]
    cfg = _cfg(tmp_path, synthetic_root, *always, "INPUT.MIX.CLEAN_TAIL", "0.25")
    assert clean_tail_start(cfg) == 6  # 8 iterations, the last 2 clean
    plain = _batches(KDTrainer.build_train_loader(_cfg(tmp_path, synthetic_root)), 8)
    tail = _batches(KDTrainer.build_train_loader(cfg), 8)
    assert _same(tail[6:], plain[6:])  # no mixing in the tail: exactly the plain mapper's samples
    mixed = [
        not torch.equal(a[1], b[1]) for ba, bb in zip(tail[:6], plain[:6]) for a, b in zip(ba, bb)
    ]
    # PROB 1: every earlier sample was mixed (one may have drawn itself as its MixUp partner).
    assert sum(mixed) >= len(mixed) - 1


def test_unsupported_settings_fall_back_to_detectron2_and_clean_tail_refuses(
    tmp_path, synthetic_root
):
    from kd_det.data.loader import ResumableTrainLoader
    from kd_det.engine import KDTrainer

    cfg = _cfg(tmp_path, synthetic_root, "DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler")
    assert not isinstance(KDTrainer.build_train_loader(cfg), ResumableTrainLoader)
    cfg.merge_from_list(MIX + ["INPUT.MIX.CLEAN_TAIL", "0.1"])
    with pytest.raises(ValueError, match="CLEAN_TAIL needs kd_det's resumable loader"):
        KDTrainer.build_train_loader(cfg)
