#!/usr/bin/env python3
"""Install detectron2 into the current Python environment, choosing the best path available.

detectron2 is not published on PyPI under its own name, so ``pip install kd_det`` cannot pull it in.
This script is what ``make setup`` runs. It tries, in order:

  (a) ``keep``:   detectron2 already imports -> leave it alone (a user's own CUDA build stays).
  (b) ``source``: the official GitHub source at a pinned commit, built with
                  ``pip install --no-build-isolation`` (compiles the C++ ops, and CUDA ops on a
                  machine with a CUDA toolkit). Needs GitHub to be reachable.
  (c) ``pypi``:   the pure-Python package of the PyPI repackaging ``sal-detectron2==0.7.2``. Its
                  only wheel is tagged CPython 3.10 and its compiled ``_C`` extension is unusable
                  elsewhere, so the wheel is unpacked into site-packages with ``--target`` and
                  detectron2's runtime dependencies are installed explicitly. kd_det never needs
                  ``_C``: ROIAlign and NMS come from torchvision and COCO evaluation falls back to
                  pycocotools.

It prints which path it took and records it in ``<sys.prefix>/kd_det-detectron2-install.txt`` so
``python -m kd_det.collect_env`` can report it. Only the standard library is used, so the script
runs before anything else is installed. ``--dry-run`` prints the decision and the commands without
running them.
"""

import argparse
import os
import socket
import subprocess
import sys
import sysconfig

# Newest upstream commit known to build against torch 2.14 (main, 2026-06-06).
DETECTRON2_COMMIT = "02b5c4e295e990042a714712c21dc79b731e8833"
DETECTRON2_GIT = "https://github.com/facebookresearch/detectron2.git"
PYPI_REPACKAGING = "sal-detectron2==0.7.2"
# detectron2's runtime dependencies (from its setup.py), needed explicitly on the ``pypi`` path
# because the repackaged wheel is installed with --no-deps. opencv is needed by its Visualizer.
RUNTIME_DEPS = [
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.11",
    "pycocotools>=2.0.2",
    "omegaconf>=2.1,<2.4",
    "hydra-core>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "termcolor>=1.1",
    "cloudpickle",
    "matplotlib",
    "tensorboard",
    "Pillow>=7.1",
    "tqdm>4.29.0",
    "packaging",
    "black",
    "opencv-python-headless",
    "setuptools<81",
]
RECORD_NAME = "kd_det-detectron2-install.txt"
PATHS = ("keep", "source", "pypi")


def detectron2_importable(python=sys.executable):
    """Whether ``import detectron2`` works in the target interpreter (checked in a subprocess so a
    half-installed package in this process cannot mask the answer)."""
    res = subprocess.run(
        [python, "-c", "import detectron2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return res.returncode == 0


def github_reachable(host="github.com", port=443, timeout=5.0):
    """Whether a TCP connection to GitHub can be opened. Where the network is limited to package
    registries this fails fast (DNS or connection refused); a timeout bounds the slow case."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def choose_path(importable, reachable, forced=None):
    """Pick the install path.

    Args:
        importable (bool): detectron2 already imports.
        reachable (bool): GitHub answers.
        forced (str or None): a path named by ``--path``/``KD_DET_D2_INSTALL``; validated.

    Returns:
        str: one of ``PATHS``.
    """
    if forced:
        if forced not in PATHS:
            raise ValueError(
                f"Unknown detectron2 install path {forced!r}; choose one of {', '.join(PATHS)}."
            )
        return forced
    if importable:
        return "keep"
    if reachable:
        return "source"
    return "pypi"


def commands_for(path, python=sys.executable, site_packages=None):
    """The pip commands each path runs (a list of argv lists)."""
    pip = [python, "-m", "pip", "install"]
    if path == "keep":
        return []
    if path == "source":
        return [pip + ["--no-build-isolation", f"git+{DETECTRON2_GIT}@{DETECTRON2_COMMIT}"]]
    if path == "pypi":
        site_packages = site_packages or sysconfig.get_paths()["purelib"]
        return [
            pip
            + [
                "--no-deps",
                "--only-binary=:all:",
                "--python-version",
                "3.10",
                "--implementation",
                "cp",
                "--upgrade",
                "--target",
                site_packages,
                PYPI_REPACKAGING,
            ],
            pip + RUNTIME_DEPS,
        ]
    raise ValueError(path)


def _target_site_packages(python):
    out = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def _target_prefix(python):
    out = subprocess.run(
        [python, "-c", "import sys; print(sys.prefix)"], check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter to install into")
    parser.add_argument(
        "--path",
        default=os.environ.get("KD_DET_D2_INSTALL") or None,
        help=f"force one of {PATHS} (default: automatic; env KD_DET_D2_INSTALL)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the decision only")
    parser.add_argument(
        "--probe",
        default="github.com:443",
        metavar="HOST:PORT",
        help="where GitHub's reachability is tested (decides source or pypi)",
    )
    args = parser.parse_args(argv)

    importable = detectron2_importable(args.python)
    host, _, port = args.probe.rpartition(":")
    reachable = False if importable and not args.path else github_reachable(host, int(port))
    path = choose_path(importable, reachable, args.path)
    reasons = {
        "keep": "detectron2 already imports; keeping it",
        "source": f"GitHub reachable; building detectron2 from source at {DETECTRON2_COMMIT[:12]}",
        "pypi": "GitHub unreachable; installing the pure-Python package of "
        f"{PYPI_REPACKAGING} (no compiled ops; kd_det does not need them)",
    }
    print(f"[install_detectron2] path ({path}): {reasons[path]}", flush=True)
    site = _target_site_packages(args.python) if path == "pypi" else None
    cmds = commands_for(path, args.python, site)
    for cmd in cmds:
        print("[install_detectron2] $ " + " ".join(cmd), flush=True)
        if not args.dry_run:
            subprocess.run(cmd, check=True)
    if args.dry_run:
        return 0
    if not detectron2_importable(args.python):
        print(
            "[install_detectron2] ERROR: detectron2 still does not import after the "
            f"{path!r} path. Rerun with --path pypi or install detectron2 by hand.",
            file=sys.stderr,
        )
        return 1
    if path != "keep" or not os.path.exists(os.path.join(_target_prefix(args.python), RECORD_NAME)):
        with open(os.path.join(_target_prefix(args.python), RECORD_NAME), "w") as f:
            f.write(path + "\n")
    print("[install_detectron2] detectron2 imports.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
