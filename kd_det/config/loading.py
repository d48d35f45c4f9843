"""Reading config YAML as data: no Python objects, no key given twice, no ``_BASE_`` cycle.

detectron2's ``CfgNode.merge_from_file`` passes ``allow_unsafe=True``, and fvcore then retries a
file its safe loader refuses with ``yaml.unsafe_load``: a config (or a teacher's config named by
``MODEL.KD.TEACHER.CONFIG_FILE``) holding ``!!python/object/apply:os.system [...]`` runs the
command. Concepts:

* **The strict loader** (:func:`load_yaml`): ``yaml.SafeLoader`` that also refuses a key given
  twice in one mapping (YAML keeps the last silently: a second ``SOLVER:`` block drops the first).
* **``_BASE_`` inheritance** (:func:`load_config_yaml`): fvcore's merge rules, each file read with
  the strict loader, and a cycle (a.yaml -> b.yaml -> a.yaml) named file by file instead of a
  ``RecursionError``.
* **:class:`KDCfgNode`**: the config class :func:`kd_det.config.get_kd_cfg` returns; its
  ``merge_from_file`` reads through :func:`load_config_yaml`, whatever ``allow_unsafe`` says.
"""

import os

import yaml
from detectron2.config import CfgNode

__all__ = ["ConfigFileError", "KDCfgNode", "load_config_yaml", "load_yaml"]

BASE_KEY = "_BASE_"


class ConfigFileError(ValueError):
    """A config file kd_det will not read: a Python tag, a duplicate key, a ``_BASE_`` cycle."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose mappings refuse a key given twice."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                continue  # the base class reports unhashable keys itself
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found the key {key!r} twice (first at line {seen[key] + 1}); YAML would "
                    "keep only the last one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path):
    """Parse a YAML file with a safe loader that also refuses duplicate keys.

    Raises:
        ConfigFileError: a tag that needs PyYAML's unsafe loader (``!!python/...``), a key given
            twice, text that is not UTF-8 or not YAML; the message names the file, the line and
            the fix.
        FileNotFoundError: no such file.
    """
    with open(path, encoding="utf-8") as f:
        try:
            return yaml.load(f, Loader=_UniqueKeyLoader)
        except UnicodeDecodeError as e:
            raise ConfigFileError(
                f"Config file '{path}' is not UTF-8 ({e}). Re-save it as UTF-8."
            ) from None
        except yaml.constructor.ConstructorError as e:
            where = f"{os.fspath(path)}, line {e.problem_mark.line + 1}" if e.problem_mark else path
            if "twice" in str(e.problem):
                raise ConfigFileError(
                    f"Config file '{where}': {e.problem}. Merge the two blocks into one."
                ) from None
            raise ConfigFileError(
                f"Config file '{where}': {e.problem}. kd_det reads configs with a safe YAML "
                "loader and never builds Python objects from tags such as !!python/...: they "
                "can run code. Write plain values (numbers, strings, lists, mappings)."
            ) from None
        except yaml.YAMLError as e:
            raise ConfigFileError(f"Config file '{path}' is not valid YAML: {e}") from None


def _merge_a_into_b(a, b, path):
    """fvcore's ``_BASE_`` merge: values of ``a`` overwrite ``b``, mappings merge key by key."""
    for k, v in a.items():
        if isinstance(v, dict) and k in b:
            if not isinstance(b[k], dict):
                raise ConfigFileError(
                    f"Config file '{path}': '{k}' is a mapping here but not in its _BASE_ file; "
                    "it cannot inherit from it."
                )
            _merge_a_into_b(v, b[k], path)
        else:
            b[k] = v


def _base_path(base, filename):
    """``base`` as fvcore resolves it: ``~`` expanded, relative to the including file."""
    if base.startswith("~"):
        base = os.path.expanduser(base)
    if not any(map(base.startswith, ["/", "https://", "http://"])):
        base = os.path.join(os.path.dirname(filename), base)
    return base


def load_config_yaml(filename, _chain=()):
    """A config file as a dict, with its ``_BASE_`` files merged in (fvcore's rules), each read
    by :func:`load_yaml`.

    Raises:
        ConfigFileError: see :func:`load_yaml`; also a ``_BASE_`` chain that comes back to a file
            it already passed (the chain is named), or a file that is not a mapping.
    """
    from detectron2.utils.file_io import PathManager

    local = PathManager.get_local_path(filename)
    key = os.path.realpath(local)
    if key in [k for k, _ in _chain]:
        names = [name for _, name in _chain] + [filename]
        raise ConfigFileError(
            "Config files form a _BASE_ cycle: "
            + " -> ".join(f"'{n}'" for n in names)
            + f". Remove the _BASE_ entry of '{_chain[-1][1]}' that points back."
        )
    chain = _chain + ((key, filename),)
    cfg = load_yaml(local)
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ConfigFileError(
            f"Config file '{filename}' holds a {type(cfg).__name__}, not a mapping of keys."
        )
    if BASE_KEY not in cfg:
        return cfg
    bases = cfg.pop(BASE_KEY)
    merged = {}
    for base in bases if isinstance(bases, list) else [bases]:
        if not isinstance(base, str):
            raise ConfigFileError(
                f"Config file '{filename}': _BASE_ must name files, got {base!r}."
            )
        _merge_a_into_b(load_config_yaml(_base_path(base, filename), chain), merged, filename)
    _merge_a_into_b(cfg, merged, filename)
    return merged


class KDCfgNode(CfgNode):
    """detectron2's ``CfgNode`` whose files are read by :func:`load_config_yaml` (never unsafely).

    detectron2's ``merge_from_file`` calls ``load_yaml_with_base(..., allow_unsafe=True)``; here
    ``allow_unsafe`` is ignored. Everything else (versions, ``merge_from_list``, ``dump``) is
    detectron2's.
    """

    @classmethod
    def load_yaml_with_base(cls, filename, allow_unsafe=False):
        return load_config_yaml(filename)
