"""Fault injection against the command-line tools: export into a folder holding a good export,
unwritable output, ``--eval-only`` without weights or without the teacher's checkpoint.

Each case asserts that the good files are byte-identical afterwards and that the message names
the problem (the config, the checkpoint, the keys, the directory).
"""

import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from conftest import CONFIGS, REPO, file_digests, tiny_overrides
from kd_det.config import get_kd_cfg
from kd_det.export.student import ExportError, export_student
from kd_det.utils.testing import run_tool

R18 = os.path.join(CONFIGS, "Synthetic", "faster_rcnn_R18_FPN.yaml")
LITE0 = os.path.join(CONFIGS, "Synthetic", "faster_rcnn_lite0_FPN.yaml")


def _cfg(config, out, *extra):
    cfg = get_kd_cfg()
    cfg.merge_from_file(config)
    cfg.merge_from_list(tiny_overrides(out) + list(extra))
    if "EFFICIENTNET" in cfg.MODEL:
        cfg.MODEL.EFFICIENTNET.PRETRAINED = False
    return cfg


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A good export of a tiny R-18 detector, and checkpoints of other architectures."""
    d = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(_cfg(R18, d)), save_dir=str(d)).save("r18")
    wide = _cfg(R18, d, "MODEL.FPN.OUT_CHANNELS", "48")
    DetectionCheckpointer(build_model(wide), save_dir=str(d)).save("r18_fpn48")
    good = d / "good"
    export_student(_cfg(R18, d), str(d / "r18.pth"), str(good), config_file=R18)
    return d


def _truncated(d):
    data = (d / "r18.pth").read_bytes()
    (d / "r18_truncated.pth").write_bytes(data[: len(data) // 2])
    return str(d / "r18_truncated.pth")


# fault -> (config file, weights in the fixture dir, exception, words of the message)
EXPORT_FAULTS = {
    "shape_mismatch": (R18, lambda d: str(d / "r18_fpn48.pth"), ExportError, "shape mismatches"),
    "other_backbone": (LITE0, lambda d: str(d / "r18.pth"), ExportError, "missing keys"),
    "truncated_checkpoint": (R18, _truncated, ExportError, "cannot be read"),
    "missing_checkpoint": (R18, lambda d: str(d / "nope.pth"), FileNotFoundError, "nope.pth"),
}


@pytest.mark.parametrize("fault", sorted(EXPORT_FAULTS))
def test_failed_export_leaves_the_good_export_intact(exported, fault):
    config, weights_of, exc, words = EXPORT_FAULTS[fault]
    good = exported / "good"
    before = file_digests(good)
    weights = weights_of(exported)
    with pytest.raises(exc) as info:
        export_student(_cfg(config, exported), weights, str(good), config_file=config)
    assert words in str(info.value)
    assert weights in str(info.value)
    if exc is ExportError and "match" in str(info.value):
        assert config in str(info.value)
    assert file_digests(good) == before


def test_export_killed_mid_write_leaves_the_good_export_intact(exported, monkeypatch):
    good = exported / "good"
    before = file_digests(good)

    def dying_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        export_student(_cfg(R18, exported), str(exported / "r18.pth"), str(good), config_file=R18)
    assert file_digests(good) == before  # no partial file, no temporary file left behind


@pytest.mark.parametrize("where", ["output_is_a_file", "output_under_a_file"])
def test_unwritable_output_is_refused_before_work(exported, where):
    blocker = exported / "a_file"
    blocker.write_text("x")
    output = blocker if where == "output_is_a_file" else blocker / "sub"
    with pytest.raises(ExportError, match=f"Cannot write to --output '{output}'"):
        export_student(_cfg(R18, exported), str(exported / "missing.pth"), str(output))
    assert blocker.read_text() == "x"


def test_export_cli_mismatch_message_names_config_checkpoint_and_keys(exported):
    good = exported / "good"
    before = file_digests(good)
    weights = str(exported / "r18_fpn48.pth")
    proc = run_tool(
        REPO,
        "export_student.py",
        ["--config-file", R18, "--weights", weights, "--output", str(good)]
        + tiny_overrides(exported),
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    msg = proc.stderr
    assert f"Checkpoint '{weights}' does not match config '{R18}'" in msg
    assert "checkpoint (48," in msg and "vs model (32," in msg
    assert file_digests(good) == before


def test_exported_files_are_readable_by_others(exported):
    old = os.umask(0o022)
    try:
        out = export_student(
            _cfg(R18, exported), str(exported / "r18.pth"), str(exported / "perm"), config_file=R18
        )
    finally:
        os.umask(old)
    for key in ("weights", "config"):
        assert os.stat(out[key]).st_mode & 0o777 == 0o644


# ------------------------------------------------------------------------------------------------
# train_net: kd_det's log lines, --eval-only without weights or without the teacher's checkpoint
# ------------------------------------------------------------------------------------------------

TRAIN_NET_FAULTS = {
    "eval_only_without_weights": ([], "--eval-only needs trained weights, but MODEL.WEIGHTS is"),
    "eval_only_resume_in_empty_dir": (
        ["--resume"],
        "holds no checkpoint. Pass MODEL.WEIGHTS <checkpoint>",
    ),
}


@pytest.mark.parametrize("fault", sorted(TRAIN_NET_FAULTS))
def test_eval_only_without_weights_refuses(tmp_path, synthetic_root, fault):
    flags, words = TRAIN_NET_FAULTS[fault]
    proc = run_tool(
        REPO,
        "train_net.py",
        ["--config-file", R18, "--eval-only"] + flags + tiny_overrides(tmp_path, synthetic_root),
    )
    assert proc.returncode != 0
    assert words in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "eval_results.json").exists()


def test_kd_log_lines_reach_log_txt_and_eval_only_needs_no_teacher(tmp_path, synthetic_root):
    """A tiny distillation run from an EfficientNet-Lite0 teacher (FrozenBN, weights from its
    checkpoint): kd_det's own lines are in log.txt, the misleading FrozenBN warning is not; then
    --eval-only evaluates the student after the teacher's checkpoint was deleted."""
    t_dir = tmp_path / "teacher"
    t_dir.mkdir()
    t_opts = tiny_overrides(t_dir) + ["MODEL.EFFICIENTNET.PRETRAINED", "False"]
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(_cfg(LITE0, t_dir)), save_dir=str(t_dir)).save("teacher")
    kd = [
        "MODEL.META_ARCHITECTURE", "DistillationRCNN",
        "MODEL.KD.TEACHER.CONFIG_FILE", LITE0,
        "MODEL.KD.TEACHER.WEIGHTS", str(t_dir / "teacher.pth"),
        "MODEL.KD.TEACHER.OPTS", str(t_opts),
        "MODEL.KD.TEACHER.CHECK_IMAGES", "0",
        "MODEL.KD.FEATURE.LEVELS", "['p3']",
    ]  # fmt: skip
    out = tmp_path / "student"
    opts = tiny_overrides(out, synthetic_root, max_iter=1) + kd + ["DATASETS.TEST", "()"]
    proc = run_tool(REPO, "train_net.py", ["--config-file", R18] + opts)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert f"Loaded teacher weights from {t_dir / 'teacher.pth'}" in log
    assert "PRETRAINED is False but NORM is 'FrozenBN'" not in log + proc.stderr

    (t_dir / "teacher.pth").unlink()
    proc = run_tool(
        REPO,
        "train_net.py",
        ["--config-file", R18, "--eval-only"]
        + tiny_overrides(out, synthetic_root)
        + kd
        + ["MODEL.WEIGHTS", str(out / "model_final.pth")],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "AP" in (out / "eval_results.json").read_text()


def test_resume_with_every_checkpoint_truncated_stops_with_how_to_start_over(
    tmp_path, synthetic_root
):
    out = tmp_path / "run"
    out.mkdir()
    torch.manual_seed(0)
    model = build_model(_cfg(R18, out))
    ckpt = DetectionCheckpointer(model, save_dir=str(out))
    for name in ("model_0000001", "model_0000003"):
        ckpt.save(name, iteration=int(name[-1]))
        data = (out / f"{name}.pth").read_bytes()
        (out / f"{name}.pth").write_bytes(data[: len(data) // 3])  # a full disk, say
    before = file_digests(out)
    proc = run_tool(
        REPO,
        "train_net.py",
        ["--config-file", R18, "--resume"] + tiny_overrides(out, synthetic_root),
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "model_0000003.pth cannot be loaded (truncated" in proc.stderr
    assert (
        "remove that directory or choose a new OUTPUT_DIR, or run without --resume" in proc.stderr
    )
    after = file_digests(out)
    assert all(after[n] == d for n, d in before.items())  # nothing rewritten or removed
