"""kd_det's configuration: every key with its default, and the range checks of their values.

* :mod:`.defaults`: :func:`add_kd_config` adds kd_det's keys (one comment per key) to detectron2's
  config; :func:`get_kd_cfg` is detectron2's default config with them.
* :mod:`.validation`: :func:`validate_kd_config` checks every value's range before a model is
  built, and names each bad key.
* :mod:`.loading`: config YAML read as data (no Python tags, no duplicate keys, no ``_BASE_``
  cycles), for kd_det's configs and every teacher's and peer's.
"""

from .defaults import add_kd_config, get_kd_cfg
from .loading import ConfigFileError, KDCfgNode, load_yaml
from .validation import validate_kd_config

__all__ = [
    "ConfigFileError",
    "KDCfgNode",
    "add_kd_config",
    "get_kd_cfg",
    "load_yaml",
    "validate_kd_config",
]
