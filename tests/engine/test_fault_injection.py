"""Fault injection: broken checkpoints, tags, images, boxes and configs.

Every case injects one fault and asserts two things: no complete checkpoint is lost (file bytes
compared before and after) and the message names the problem. Models are built only where the
fault needs one; most cases use an ``nn.Linear`` behind the real checkpointer.
"""

import os
import stat

import pytest
import torch
from torch import nn

from conftest import CONFIGS, file_digests, tiny_overrides
from kd_det.engine.checkpoint import (
    AtomicDetectionCheckpointer,
    CheckpointResumeError,
    atomic_torch_save,
    atomic_write_text,
)

# ------------------------------------------------------------------------------------------------
# checkpoints and the last_checkpoint tag
# ------------------------------------------------------------------------------------------------


def _truncate(path, keep=0.5):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def _saved_run(directory):
    """model_0000001.pth (weight 1), model_0000003.pth (weight 3), tag naming the latter."""
    model = nn.Linear(3, 2)
    ckpt = AtomicDetectionCheckpointer(model, save_dir=str(directory))
    for it in (1, 3):
        with torch.no_grad():
            model.weight.fill_(float(it))
        ckpt.save(f"model_{it:07d}", iteration=it)
    return directory


def _tag(d, text):
    (d / "last_checkpoint").write_bytes(text)


# fault -> (what it does to the directory, iteration expected to be resumed, words of the message)
RESUME_FAULTS = {
    "tag_deleted": (lambda d: (d / "last_checkpoint").unlink(), 3, "no last_checkpoint tag"),
    "tag_empty": (lambda d: _tag(d, b""), 3, "last_checkpoint is empty"),
    "tag_truncated": (lambda d: _tag(d, b"model_00"), 3, "model_00 (named by last_checkpoint)"),
    "tag_not_text": (lambda d: _tag(d, b"\xff\xfe\x00"), 3, "last_checkpoint cannot be read"),
    "tag_names_missing_file": (
        lambda d: _tag(d, b"model_0000009.pth"),
        3,
        "model_0000009.pth (named by last_checkpoint) is missing",
    ),
    "newest_truncated": (
        lambda d: _truncate(d / "model_0000003.pth"),
        1,
        "model_0000003.pth cannot be loaded",
    ),
    "newest_truncated_to_zero": (
        lambda d: _truncate(d / "model_0000003.pth", 0),
        1,
        "model_0000003.pth cannot be loaded",
    ),
    "newest_not_a_checkpoint": (
        lambda d: (d / "model_0000003.pth").write_text("not a checkpoint"),
        1,
        "model_0000003.pth cannot be loaded",
    ),
    "newest_truncated_and_tag_deleted": (
        lambda d: (_truncate(d / "model_0000003.pth"), (d / "last_checkpoint").unlink()),
        1,
        "model_0000003.pth cannot be loaded",
    ),
}


@pytest.mark.parametrize("fault", sorted(RESUME_FAULTS))
def test_resume_falls_back_to_newest_loadable_checkpoint(tmp_path, kd_log, fault):
    inject, expected_iter, words = RESUME_FAULTS[fault]
    d = _saved_run(tmp_path)
    inject(d)
    before = file_digests(d)

    model = nn.Linear(3, 2)
    ckpt = AtomicDetectionCheckpointer(model, save_dir=str(d))
    extra = ckpt.resume_or_load("", resume=True)
    assert extra["iteration"] == expected_iter
    assert torch.all(model.weight == expected_iter)
    assert ckpt.has_checkpoint()
    assert words in kd_log.text
    assert f"Resuming from {d / f'model_{expected_iter:07d}.pth'}" in kd_log.text

    # The resumed run saves the iterations after the one it loaded; nothing it did not write is
    # overwritten (an unreadable model_0000003.pth is renamed aside with its bytes intact).
    ckpt.save("model_0000003", iteration=3)
    ckpt.save("model_final", iteration=4)
    after = file_digests(d)
    for name, digest in before.items():
        if name == "last_checkpoint":
            continue
        kept = [n for n in after if n == name or n.startswith(name + ".bak-")]
        assert any(after[n] == digest for n in kept), f"{name} lost"
    assert (d / "last_checkpoint").read_text() == "model_final.pth"


@pytest.mark.parametrize(
    "inject",
    [
        lambda d: [_truncate(d / n) for n in ("model_0000001.pth", "model_0000003.pth")],
        lambda d: [(d / n).unlink() for n in ("model_0000001.pth", "model_0000003.pth")],
    ],
    ids=["every_checkpoint_truncated", "tag_left_without_checkpoints"],
)
def test_resume_without_a_loadable_checkpoint_says_how_to_start_over(tmp_path, inject):
    d = _saved_run(tmp_path)
    inject(d)
    before = file_digests(d)
    with pytest.raises(CheckpointResumeError, match="remove that directory or choose a new OUTPUT"):
        AtomicDetectionCheckpointer(nn.Linear(3, 2), save_dir=str(d)).resume_or_load(
            "", resume=True
        )
    assert file_digests(d) == before


def test_resume_in_an_empty_directory_starts_fresh(tmp_path):
    ckpt = AtomicDetectionCheckpointer(nn.Linear(3, 2), save_dir=str(tmp_path))
    assert ckpt.resume_or_load("", resume=True) == {}
    assert not ckpt.has_checkpoint()


def test_a_checkpoint_of_another_run_is_renamed_aside_not_overwritten(tmp_path, kd_log):
    d = _saved_run(tmp_path)
    before = file_digests(d)
    ckpt = AtomicDetectionCheckpointer(nn.Linear(3, 2), save_dir=str(d))
    ckpt.save("model_0000001", iteration=1)  # a fresh run (no --resume) reaching iteration 1
    ckpt.save("model_0000001", iteration=1)  # its own file: overwritten in place
    aside = [n for n in os.listdir(d) if n.startswith("model_0000001.pth.bak-")]
    assert len(aside) == 1 and file_digests(d)[aside[0]] == before["model_0000001.pth"]
    assert "was not written by this run" in kd_log.text


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
@pytest.mark.parametrize("writer", ["torch", "text"])
def test_atomic_files_get_the_umask_mode(tmp_path, umask, writer):
    path = str(tmp_path / "f")
    old = os.umask(umask)
    try:
        if writer == "torch":
            atomic_torch_save({"a": 1}, path)
        else:
            atomic_write_text("x", path)
        with open(tmp_path / "reference", "w"):
            pass  # what a plain open() (detectron2's own writers) gives under this umask
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert mode == 0o666 & ~umask
    assert mode == stat.S_IMODE(os.stat(tmp_path / "reference").st_mode)


# ------------------------------------------------------------------------------------------------
# the trainer: --resume without a tag, MAX_TO_KEEP across a resume, a fresh run in a used directory
# ------------------------------------------------------------------------------------------------

R18 = os.path.join(CONFIGS, "Synthetic", "faster_rcnn_R18_FPN.yaml")


def _trainer_cfg(out, root, *extra, max_iter=2):
    from kd_det.config import get_kd_cfg
    from kd_det.data.builtin import register_datasets_from_config

    cfg = get_kd_cfg()
    cfg.merge_from_file(R18)
    cfg.merge_from_list(tiny_overrides(out, root, max_iter=max_iter, batch=1))
    # One checkpoint per iteration; no evaluation at the end (not what these cases test).
    cfg.merge_from_list(["SOLVER.CHECKPOINT_PERIOD", "1", "DATASETS.TEST", "()"])
    cfg.merge_from_list(list(extra))
    cfg.freeze()
    register_datasets_from_config(cfg)
    return cfg


def _train(cfg, resume):
    from kd_det.engine import KDTrainer

    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    start = trainer.start_iter
    trainer.train()
    return start


def test_trainer_resume_without_tag_prunes_old_and_never_overwrites(
    tmp_path, synthetic_root, kd_log
):
    out = tmp_path / "run"
    keep = "KD_TRAINER.MAX_TO_KEEP"
    _train(_trainer_cfg(out, synthetic_root, keep, "0", max_iter=3), False)
    assert {"model_0000000.pth", "model_0000001.pth", "model_0000002.pth"} <= set(os.listdir(out))
    # A run killed after model_0000002 with its tag lost.
    (out / "model_final.pth").unlink()
    (out / "last_checkpoint").unlink()
    before = file_digests(out)

    assert _train(_trainer_cfg(out, synthetic_root, keep, "2", max_iter=5), resume=True) == 3
    assert f"Resuming from {out / 'model_0000002.pth'}" in kd_log.text
    # MAX_TO_KEEP counts the checkpoints written before the resume too.
    periodic = sorted(n for n in os.listdir(out) if n.startswith("model_0"))
    assert periodic == ["model_0000003.pth", "model_0000004.pth"]
    assert "model_final.pth" in os.listdir(out)

    # Without --resume in the same directory: a clear warning, and nothing overwritten.
    before = file_digests(out)
    assert _train(_trainer_cfg(out, synthetic_root, keep, "0", max_iter=4), resume=False) == 0
    assert "already holds 3 checkpoint(s)" in kd_log.text
    after = file_digests(out)
    for name in ("model_0000003.pth", "model_0000004.pth", "model_final.pth"):
        kept = [n for n in after if n == name or n.startswith(name + ".bak-")]
        assert any(after[n] == before[name] for n in kept), f"{name} lost"


# ------------------------------------------------------------------------------------------------
# bad config values: refused at build time, each named
# ------------------------------------------------------------------------------------------------

BAD_VALUES = [
    ("MODEL.KD.ROI.TEMPERATURE", "0.0", "must be > 0"),
    ("MODEL.KD.ROI.TEMPERATURE", "-2.0", "must be > 0"),
    ("MODEL.ONLINE_KD.TEMPERATURE", "0.0", "must be > 0"),
    ("MODEL.KD.FEATURE.WEIGHTS", "[1.0, -0.5]", ">= 0"),
    ("MODEL.KD.FEATURE.FOREGROUND_WEIGHT", "-1.0", ">= 0"),
    ("MODEL.KD.BACKBONE.WEIGHTS", "[-1.0]", ">= 0"),
    ("MODEL.KD.RPN.OBJECTNESS_WEIGHT", "-1.0", ">= 0"),
    ("MODEL.KD.RPN.DELTAS_WEIGHT", "-1.0", ">= 0"),
    ("MODEL.KD.ROI.CLS_WEIGHT", "-1.0", ">= 0"),
    ("MODEL.KD.ROI.BOX_WEIGHT", "-0.1", ">= 0"),
    ("MODEL.KD.HINT.META_LOSS_WEIGHT", "-1.0", ">= 0"),
    ("MODEL.ONLINE_KD.FEATURE_WEIGHTS", "[-1.0]", ">= 0"),
    ("MODEL.ONLINE_KD.LOGIT_WEIGHT", "-1.0", ">= 0"),
    ("MODEL.ONLINE_KD.EMA_FEATURE_WEIGHTS", "[1.0, -1.0]", ">= 0"),
    ("MODEL.ONLINE_KD.EMA_LOGIT_WEIGHT", "-1.0", ">= 0"),
    ("MODEL.ONLINE_KD.EMA_BOX_WEIGHT", "-1.0", ">= 0"),
    ("MODEL.ONLINE_KD.EMA_DECAY", "1.5", "[0, 1)"),
    ("MODEL.ONLINE_KD.EMA_DECAY", "1.0", "would freeze the EMA teachers"),
    ("MODEL.ONLINE_KD.EMA_DECAY", "1.0", "EMA_ENABLED False instead"),
    ("MODEL.KD.SSIM.WINDOW_SIZE", "10", "must be an odd integer >= 3"),
    ("MODEL.KD.SSIM.WINDOW_SIZE", "1", "must be an odd integer >= 3"),
    ("MODEL.KD.HINT.MIN_WEIGHT", "1.0", "[0, 1)"),
    ("MODEL.KD.HINT.HIDDEN_DIM", "0", ">= 1"),
    ("MODEL.KD.WARMUP_ITERS", "-1", ">= 0"),
    ("INPUT.MIX.PROB", "-0.1", "[0, 1]"),
    ("INPUT.MIX.PROB", "1.5", "[0, 1]"),
    ("INPUT.MIX.ALPHA", "0.0", "must be > 0"),
    ("INPUT.MIX.NUM_PATCHES", "0", "integer >= 1"),
    ("INPUT.MIX.MIN_VISIBLE", "1.5", "[0, 1]"),
    ("INPUT.MIX.MIN_BOX_SIZE", "-1.0", ">= 0"),
    ("INPUT.MIX.PARTNER_CACHE_SIZE", "-1", ">= 0"),
    ("INPUT.MIX.TYPE", "blend", "one of mixup, cutmix"),
    ("INPUT.MIX.BOX_RULE", "grow", "one of keep, shrink"),
    ("KD_TRAINER.CHECK_IMAGES", "sometimes", "one of decode, header, off"),
]


@pytest.mark.parametrize("key,value,rule", BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_bad_config_value_is_named(key, value, rule):
    from kd_det.config import get_kd_cfg
    from kd_det.config.validation import validate_kd_config

    cfg = get_kd_cfg()
    validate_kd_config(cfg)  # the defaults are valid
    cfg.merge_from_list([key, value])  # INPUT.MIX.ENABLED stays False: checked anyway
    with pytest.raises(ValueError) as info:
        validate_kd_config(cfg)
    lines = [x for x in str(info.value).splitlines() if x.startswith("  - ")]
    assert len(lines) == 1 and lines[0].startswith(f"  - {key} = ") and rule in lines[0]


def test_bad_value_stops_before_teacher_data_or_model(tmp_path):
    """A zero temperature used to give NaN at iteration 0; now KDTrainer and the model builder
    refuse it first -- before the (here missing) data and teacher checkpoint are even looked at."""
    from detectron2.modeling import build_model

    from kd_det.engine import KDTrainer

    from kd_det.config import get_kd_cfg

    cfg = get_kd_cfg()
    cfg.merge_from_file(R18)
    cfg.merge_from_list(tiny_overrides(tmp_path / "out"))
    cfg.merge_from_list(["MODEL.META_ARCHITECTURE", "DistillationRCNN"])
    cfg.merge_from_list(["MODEL.KD.TEACHER.CONFIG_FILE", R18])
    cfg.merge_from_list(["MODEL.KD.TEACHER.WEIGHTS", str(tmp_path / "missing.pth")])
    cfg.merge_from_list(["MODEL.KD.ROI.TEMPERATURE", "0.0", "MODEL.KD.ROI.CLS_WEIGHT", "1.0"])
    cfg.DATASETS.TRAIN = ("no_such_dataset",)
    for build in (KDTrainer, build_model):
        with pytest.raises(ValueError, match=r"MODEL.KD.ROI.TEMPERATURE = 0.0: must be > 0"):
            build(cfg)
    out = tmp_path / "out"
    assert not out.exists() or not [n for n in os.listdir(out) if n != "log.txt"]


# ------------------------------------------------------------------------------------------------
# divergence: the error names the non-finite term
# ------------------------------------------------------------------------------------------------


def test_divergence_names_the_non_finite_term(tmp_path, synthetic_root):
    from kd_det.engine import KDTrainer

    cfg = _trainer_cfg(tmp_path, synthetic_root, max_iter=3)
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    model, forward = trainer.model, trainer.model.forward

    def diverging(data):
        losses = forward(data)
        losses["loss_kd_fake"] = torch.tensor(float("nan"))
        return losses

    model.forward = diverging
    with pytest.raises(FloatingPointError) as info:
        trainer.train()
    msg = str(info.value)
    assert "Loss became infinite or NaN at iteration=0" in msg
    assert "Non-finite terms on this process: loss_kd_fake;" in msg
    assert "'loss_cls':" in msg
    assert not any(n.startswith("model_") for n in os.listdir(tmp_path))


# ------------------------------------------------------------------------------------------------
# images and boxes: checked at start, train and test, with the file named
# ------------------------------------------------------------------------------------------------


def _data_copy(tmp_path, synthetic_root, case):
    """A private copy of the generated data under a dataset prefix of its own."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    prefix = "synthetic_fi_" + case
    return root, ["DATASETS.TRAIN", f"('{prefix}_train',)", "DATASETS.TEST", f"('{prefix}_val',)"]


def _edit_json(path, edit):
    import json

    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _with_good_checkpoint(out):
    out.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"model": {"w": torch.ones(2)}, "iteration": 9}, str(out / "model_final.pth"))
    atomic_write_text("model_final.pth", str(out / "last_checkpoint"))
    return file_digests(out)


def _first(root, split):
    return sorted((root / split).iterdir())[0]


# fault -> (what it does to the data root, words of the message besides the file, exception)
IMAGE_FAULTS = {
    "train_jpeg_truncated": (lambda r: _truncate(_first(r, "train"), 0.6), "truncated", ValueError),
    "val_jpeg_truncated": (lambda r: _truncate(_first(r, "val"), 0.6), "truncated", ValueError),
    "train_jpeg_garbage": (
        lambda r: _first(r, "train").write_bytes(b"not a jpeg"),
        "cannot be read",
        ValueError,
    ),
    "train_jpeg_empty": (lambda r: _truncate(_first(r, "train"), 0), "cannot be read", ValueError),
    "val_image_missing": (lambda r: _first(r, "val").unlink(), "do not exist", FileNotFoundError),
    "train_size_mismatch": (
        lambda r: _edit_json(r / "train.json", lambda d: d["images"][0].update(width=99)),
        "but the annotation file says 99x64",
        ValueError,
    ),
}


@pytest.mark.parametrize("fault", sorted(IMAGE_FAULTS))
def test_bad_image_stops_before_the_model_is_built(tmp_path, synthetic_root, fault):
    from kd_det.engine import KDTrainer

    inject, words, exc = IMAGE_FAULTS[fault]
    root, names = _data_copy(tmp_path, synthetic_root, fault)
    split = "val" if fault.startswith("val") else "train"
    victim = _first(root, split).name
    inject(root)
    out = tmp_path / "out"
    before = _with_good_checkpoint(out)
    cfg = _trainer_cfg(out, root, *names)
    cfg.defrost()
    cfg.DATASETS.TEST = (names[3].strip("(),'"),)  # _trainer_cfg turns evaluation off
    with pytest.raises(exc) as info:
        KDTrainer(cfg)
    assert victim in str(info.value) and words in str(info.value)
    assert {k: v for k, v in file_digests(out).items() if k != "log.txt"} == before


def test_unreadable_images_skipped_on_request_with_a_count(tmp_path, synthetic_root, kd_log):
    from detectron2.data import DatasetCatalog

    from kd_det.engine.trainer import check_inputs

    root, names = _data_copy(tmp_path, synthetic_root, "skip")
    _truncate(_first(root, "train"), 0.6)
    cfg = _trainer_cfg(tmp_path / "out", root, *names, "KD_TRAINER.SKIP_UNREADABLE_IMAGES", "True")
    check_inputs(cfg)
    assert "skipping 1 of 16 images that cannot be read" in kd_log.text
    kept = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    assert len(kept) == 15 and not any(d["file_name"].endswith("/000000.jpg") for d in kept)


# fault -> (the bbox of the first annotation of image 000000.jpg, words of the message)
BOX_FAULTS = {
    "negative_width": ([10.0, 10.0, -5.0, 8.0], "has a negative width or height"),
    "negative_height": ([10.0, 10.0, 5.0, -8.0], "has a negative width or height"),
    "wholly_right_of_image": ([70.0, 10.0, 5.0, 5.0], "lies wholly outside the 64x64 image"),
    "wholly_above_image": ([10.0, -30.0, 5.0, 20.0], "lies wholly outside the 64x64 image"),
}


@pytest.mark.parametrize("fault", sorted(BOX_FAULTS))
def test_invalid_box_is_named_with_image_and_annotation(tmp_path, synthetic_root, fault):
    from kd_det.engine import KDTrainer

    bbox, words = BOX_FAULTS[fault]
    root, names = _data_copy(tmp_path, synthetic_root, fault)
    _edit_json(root / "train.json", _first_annotation_of_image_1(bbox))
    out = tmp_path / "out"
    before = _with_good_checkpoint(out)
    with pytest.raises(ValueError) as info:
        KDTrainer(_trainer_cfg(out, root, *names))
    msg = str(info.value)
    assert "000000.jpg' (image_id 1), annotation index 0" in msg and words in msg
    assert {k: v for k, v in file_digests(out).items() if k != "log.txt"} == before


def _first_annotation_of_image_1(bbox):
    def edit(data):
        first = next(a for a in data["annotations"] if a["image_id"] == 1)
        first["bbox"] = bbox

    return edit


def test_boxes_partly_outside_are_counted(tmp_path, synthetic_root, kd_log):
    from kd_det.engine.trainer import check_inputs

    root, names = _data_copy(tmp_path, synthetic_root, "clip")
    _edit_json(root / "train.json", _first_annotation_of_image_1([-4.0, 10.0, 20.0, 20.0]))
    check_inputs(_trainer_cfg(tmp_path / "out", root, *names))
    assert "1 boxes lie partly outside their image and will be clipped" in kd_log.text
