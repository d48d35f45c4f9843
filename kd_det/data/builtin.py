"""Register the datasets a config names, so ``tools/train_net.py`` needs no extra code.

detectron2 registers COCO/LVIS/... under ``$DETECTRON2_DATASETS`` itself. kd_det adds the generated
scenes: any dataset named ``synthetic*_train`` / ``synthetic*_val`` is registered from
``cfg.DATASETS.SYNTHETIC_ROOT`` (one root per config; use different prefixes for different roots).
"""

from detectron2.data import DatasetCatalog


def register_datasets_from_config(cfg):
    """Register every generated dataset that ``cfg.DATASETS.TRAIN``/``TEST`` names.

    Raises:
        FileNotFoundError: the generated data is missing; the message gives the command that
            makes it.
    """
    from .synthetic import register_synthetic_coco

    prefixes = set()
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        if name in DatasetCatalog.list():
            continue
        if name.startswith("synthetic") and name.rsplit("_", 1)[-1] in ("train", "val"):
            prefixes.add(name.rsplit("_", 1)[0])
    for prefix in sorted(prefixes):
        register_synthetic_coco(prefix, cfg.DATASETS.SYNTHETIC_ROOT)
