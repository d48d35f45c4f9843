"""Helpers for tests of kd_det and of code built on it (as ``detectron2.utils.testing``).

Tiny CPU models need a config small enough to build and step in seconds (:func:`tiny_overrides`),
inputs shaped like a ``DatasetMapper``'s output (:func:`random_batch`), a saved detector to serve
as a teacher (:func:`save_random_detector`), digests that show files did not change
(:func:`file_digests`) and a way to run the repository's scripts as a user does, in a subprocess
(:func:`run_script`; :func:`run_tool` for the user commands in ``tools/``), and files whose
loading would run code (:func:`write_code_payloads`).
Paths to the repository are always passed in: an installed kd_det has no repository to guess.
"""

import os
import subprocess
import sys

import torch

__all__ = [
    "copy_dataset",
    "edit_json",
    "file_digests",
    "model_overrides",
    "perturb_online_peers",
    "random_batch",
    "run_script",
    "run_tool",
    "save_random_detector",
    "tiny_overrides",
    "write_code_payloads",
]


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


def model_overrides(*extra):
    """The ``MODEL.*`` pairs of :func:`tiny_overrides` plus ``extra``: what a sub-model built from
    its own file (an online peer, via ``MODEL.ONLINE_KD.PEER_OPTS``) needs to be tiny."""
    t = tiny_overrides("unused")
    pairs = [x for k, v in zip(t[0::2], t[1::2]) if k.startswith("MODEL.") for x in (k, v)]
    return pairs + list(extra)


def random_batch(seed=0, n=2, size=64, num_classes=12, num_boxes=3):
    """``n`` training inputs as ``DatasetMapper`` gives them: random ``(3, size, size)`` float
    images and ``num_boxes`` random ground-truth boxes (8-24 px) with random classes each.

    All draws come from a generator seeded with ``seed``, so the batch is the same in every
    process and does not touch the global RNG.
    """
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        inst = Instances((size, size))
        xy = torch.rand(num_boxes, 2, generator=g) * (size - 24)
        wh = 8 + torch.rand(num_boxes, 2, generator=g) * 16
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
        inst.gt_classes = torch.randint(0, num_classes, (num_boxes,), generator=g)
        img = torch.randint(0, 256, (3, size, size), generator=g).float()
        out.append({"image": img, "instances": inst, "height": size, "width": size})
    return out


def save_random_detector(config_file, output_dir, opts=(), seed=123, name="teacher"):
    """Build the detector of ``config_file`` + ``opts`` with random weights (seeded) and save it
    with detectron2's checkpointer: a teacher whose weights really load.

    Returns:
        dict: ``{"path": <output_dir>/<name>.pth, "opts": list(opts)}``.
    """
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from kd_det.config import get_kd_cfg

    cfg = get_kd_cfg()
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    torch.manual_seed(seed)
    model = build_model(cfg)
    DetectionCheckpointer(model, save_dir=str(output_dir)).save(name)
    return {"path": os.path.join(str(output_dir), f"{name}.pth"), "opts": list(opts)}


def file_digests(directory):
    """``{name: sha256}`` of the files in ``directory`` (not recursive): shows nothing changed."""
    import hashlib

    out = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def copy_dataset(root, destination):
    """A private copy of a data folder (e.g. generated scenes) for a test to damage."""
    import shutil

    shutil.copytree(str(root), str(destination))
    return destination


def edit_json(path, edit):
    """Load the json at ``path``, let ``edit(data)`` change it in place, write it back."""
    import json

    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


def run_script(repo, script, args, timeout=600, threads=1, **kwargs):
    """Run the script ``<repo>/<script>`` (e.g. ``dev/benchmark.py``) with this interpreter from
    ``repo``, one thread per process: a command line exactly as a user types it.

    Returns:
        subprocess.CompletedProcess: with text ``stdout`` / ``stderr``.
    """
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env.update(kwargs.pop("env", {}))
    return subprocess.run(
        [sys.executable, os.path.join(repo, script)] + [str(a) for a in args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def run_tool(repo, tool, args, timeout=600, threads=1, **kwargs):
    """Run the user command ``<repo>/tools/<tool>``: :func:`run_script` of ``tools/<tool>``."""
    return run_script(repo, os.path.join("tools", tool), args, timeout, threads, **kwargs)


def perturb_online_peers(model, seed=3, scale=0.05):
    """Move every online peer's weights and BN running means away from their EMA copies, so that
    a test can tell a peer from its self-ensemble teacher (freshly built, the two are equal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for peer in model.peers:
            for p in peer.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)
            for name, b in peer.named_buffers():
                if name.endswith("running_mean"):
                    b.add_(torch.rand(b.shape, generator=g))


class MarkerPayload:
    """Unpickling this calls ``os.system("touch <marker>")``: proof that a loader ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_code_payloads(directory, marker, stem="evil"):
    """Files whose unsafe loading creates ``marker``: ``<stem>.pth`` (``torch.save``),
    ``<stem>.pkl`` (detectron2 model-zoo layout, protocol 2) and ``<stem>.yaml`` (a Python tag).

    Returns:
        dict: ``{"pth": path, "pkl": path, "yaml": path}``.
    """
    import pickle

    os.makedirs(directory, exist_ok=True)
    paths = {ext: os.path.join(str(directory), f"{stem}.{ext}") for ext in ("pth", "pkl", "yaml")}
    torch.save({"model": {"w": torch.ones(2)}, "x": MarkerPayload(marker)}, paths["pth"])
    with open(paths["pkl"], "wb") as f:
        pickle.dump({"model": {}, "__author__": MarkerPayload(marker)}, f, protocol=2)
    with open(paths["yaml"], "w") as f:
        f.write(f'SEED: !!python/object/apply:os.system ["touch {marker}"]\n')
    return paths
