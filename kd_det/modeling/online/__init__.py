"""What only online distillation uses: its peers (configs, weights, adapters) and EMA teachers.

* :mod:`.peers`: each peer's config, initial weights, label-space checks and mutual adapters.
* :mod:`.ema`: the self-ensemble teacher, an EMA copy of a peer held as buffers.
"""
