"""Print what kd_det runs on: ``python -m kd_det.collect_env``.

Reports torch/torchvision/detectron2 versions, where detectron2 came from (the path
``tools/install_detectron2.py`` took, or the distribution that provides it), whether detectron2's
compiled ops are present (kd_det does not need them), and the device training will use. Paste its
output into bug reports.
"""

import importlib.metadata
import os
import sys


def detectron2_source():
    """How detectron2 was installed: the installer's record, else the distribution's name."""
    record = os.path.join(
        sys.prefix, "kd_det-detectron2-install.txt"
    )  # see tools/install_detectron2.py
    recorded = None
    if os.path.exists(record):
        with open(record) as f:
            recorded = f.read().strip()
    dist = None
    for name in ("detectron2", "sal-detectron2"):
        try:
            dist = f"{name}=={importlib.metadata.version(name)}"
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    labels = {
        "keep": "already installed before kd_det's setup",
        "source": "built from the official GitHub source",
        "pypi": "pure-Python package of the PyPI repackaging sal-detectron2",
    }
    parts = []
    if recorded:
        parts.append(f"{recorded} ({labels.get(recorded, 'unknown')})")
    parts.append(f"distribution: {dist or 'unknown (not installed by pip)'}")
    return "; ".join(parts)


def cpu_model():
    """The CPU's model name (e.g. "AMD EPYC 9R14", "Intel(R) Xeon(R) Platinum 8488C"), or "".

    Float results are reproducible bit for bit on one CPU model; across vendors MKL and oneDNN
    round differently (docs/reproducibility.md), so runs record which CPU produced them.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or ""


def compiled_ops_available():
    """Whether ``detectron2._C`` imports (deformable conv, rotated boxes, fast COCOeval)."""
    try:
        from detectron2 import _C  # noqa: F401

        return True
    except Exception:
        return False


def collect_env_info():
    """Return the report as a list of (name, value) rows."""
    import torch
    import torchvision

    rows = [("Python", sys.version.split()[0]), ("torch", torch.__version__)]
    rows.append(("torchvision", torchvision.__version__))
    try:
        import detectron2

        rows.append(
            ("detectron2", f"{detectron2.__version__} @ {os.path.dirname(detectron2.__file__)}")
        )
        rows.append(("detectron2 source", detectron2_source()))
        rows.append(
            (
                "detectron2 compiled ops",
                "yes" if compiled_ops_available() else "no (not needed by kd_det)",
            )
        )
    except ImportError:
        rows.append(
            ("detectron2", "NOT INSTALLED: run `make setup` or tools/install_detectron2.py")
        )
    try:
        import pytorch_msssim

        rows.append(("pytorch-msssim", getattr(pytorch_msssim, "__version__", "installed")))
    except ImportError:
        rows.append(("pytorch-msssim", "not installed"))
    try:
        import kd_det

        rows.append(("kd_det", f"{kd_det.__version__} @ {os.path.dirname(kd_det.__file__)}"))
    except Exception as e:  # report, don't crash: this tool is for diagnosing broken installs
        rows.append(("kd_det", f"import failed: {e!r}"))
    rows.append(("CPU", cpu_model() or "unknown"))
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        rows.append(("device", f"cuda ({torch.cuda.device_count()}: {names})"))
    else:
        rows.append(("device", f"cpu ({torch.get_num_threads()} threads; no CUDA device)"))
    return rows


def main():
    rows = collect_env_info()
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
