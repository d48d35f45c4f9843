"""Shared fixtures: a tiny generated COCO dataset and a tiny-model config builder."""

import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")

# Keep CPU tests predictable on a 2-core machine.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """16 train / 8 val generated scenes of 64 px (generated once per test session)."""
    from kd_det.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(str(root), num_train=16, num_val=8, image_size=64, seed=0, show_progress=False)
    return str(root)


def tiny_overrides(output_dir, synthetic_root=None, max_iter=2, batch=2):
    """Command-line style overrides that make any kd_det config tiny enough for a CPU test."""
    opts = [
        "MODEL.DEVICE", "cpu",
        "MODEL.FPN.OUT_CHANNELS", "32",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50",
        "MODEL.RPN.PRE_NMS_TOPK_TEST", "200",
        "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
        "INPUT.MIN_SIZE_TRAIN", "(64,)",
        "INPUT.MAX_SIZE_TRAIN", "96",
        "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "96",
        "SOLVER.IMS_PER_BATCH", str(batch),
        "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.STEPS", "()",
        "DATALOADER.NUM_WORKERS", "0",
        "TEST.EVAL_PERIOD", "0",
        "OUTPUT_DIR", str(output_dir),
    ]  # fmt: skip
    if synthetic_root is not None:
        opts += [
            "DATASETS.SYNTHETIC_ROOT", str(synthetic_root),
            "DATASETS.TRAIN", "('synthetic_train',)",
            "DATASETS.TEST", "('synthetic_val',)",
        ]  # fmt: skip
    return opts


class _Records(list):
    """Log records captured by :func:`kd_log`; ``text`` joins their messages."""

    @property
    def text(self):
        return "\n".join(r.getMessage() for r in self)


@pytest.fixture
def kd_log():
    """Records of kd_det's loggers at INFO and above.

    pytest's ``caplog`` listens on the root logger, which kd_det's records do not reach once
    ``setup_logger(name="kd_det")`` (tools/train_net.py, KDTrainer) turned propagation off; this
    handler sits on the "kd_det" logger itself.
    """
    import logging

    records = _Records()
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    log = logging.getLogger("kd_det")
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield records
    log.removeHandler(handler)
    log.setLevel(old_level)


def file_digests(directory):
    """``{name: sha256}`` of every file in ``directory`` (not recursive): to show nothing changed."""
    import hashlib

    out = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[name] = hashlib.sha256(f.read()).hexdigest()
    return out
