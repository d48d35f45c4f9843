"""kd_det's configuration: every key with its default, and the range checks of their values.

* :mod:`.defaults`: :func:`add_kd_config` adds kd_det's keys (one comment per key) to detectron2's
  config; :func:`get_kd_cfg` is detectron2's default config with them.
* :mod:`.validation`: :func:`validate_kd_config` checks every value's range before a model is
  built, and names each bad key.
"""

from .defaults import add_kd_config, get_kd_cfg
from .validation import validate_kd_config

__all__ = ["add_kd_config", "get_kd_cfg", "validate_kd_config"]
