"""Where partners come from, and the random stream every mixing decision draws from.

:class:`ProcessGenerator` is the mapper's ``numpy.random.Generator``, created lazily in the
process that maps from ``torch.initial_seed()`` and a salt, and re-created when the process or
that seed changes; augmentations keep numpy's global generator, as in ``DatasetMapper``.
:class:`PartnerPool` reads partners from the training set or, with
``INPUT.MIX.PARTNER_CACHE_SIZE > 0``, draws them from its process's cache of recently mapped
samples (cheaper, but the draw then depends on the worker's history).
See docs/mixed_sample.md, "How the mixing stream is seeded" and "Speed: the partner cache".
"""

import os
from collections import deque
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data.common import DatasetFromList

from .geometry import Sample, sample_from_output

__all__ = ["PartnerPool", "ProcessGenerator"]

# Mixed into the seed so the mapper's stream differs from numpy's global RNG seeded with the same
# integer by detectron2 (the ASCII of "kdmix").
_RNG_SALT = 0x6B646D6978


class ProcessGenerator:
    """A ``numpy.random.Generator`` per process and torch seed (docs/mixed_sample.md)."""

    def __init__(self):
        self._rng: Optional[np.random.Generator] = None
        self._key: Optional[Tuple[int, int]] = None

    def get(self) -> np.random.Generator:
        key = (os.getpid(), torch.initial_seed())
        if self._rng is None or self._key != key:
            self._rng = np.random.Generator(
                np.random.PCG64(np.random.SeedSequence([key[1], _RNG_SALT]))
            )
            self._key = key
        return self._rng


class PartnerPool:
    """Partners from the training set or from this process's cache of recent samples."""

    def __init__(self, dataset_dicts: Sequence[dict], cache_size: int, map_plain: Callable):
        """
        Args:
            dataset_dicts: the training set; stored serialized, like detectron2's
                ``DatasetFromList``, so that worker processes share it cheaply.
            cache_size: samples kept for reuse (0: always read fresh partners).
            map_plain: ``dataset_dict -> DatasetMapper output``, the main samples' pipeline.
        """
        self._dataset = DatasetFromList(list(dataset_dicts), copy=True, serialize=True)
        self.cache_size = int(cache_size)
        self._map_plain = map_plain
        self._cache: deque = deque(maxlen=max(self.cache_size, 1))
        self._cache_owner: Optional[int] = None

    def __len__(self):
        """Partner candidates in the training set."""
        return len(self._dataset)

    def remember(self, sample: Sample, returned: bool) -> None:
        """Put a plainly mapped sample into this process's partner cache.

        Args:
            returned: whether ``sample.image`` itself is handed out (the sample was not mixed).
                It is then copied: the returned tensor travels through shared memory and could be
                modified in place downstream. A mixed sample's own image is never handed out.
        """
        if self.cache_size == 0:
            return
        if self._cache_owner != os.getpid():  # a forked worker must not reuse its parent's cache
            self._cache = deque(maxlen=self.cache_size)
            self._cache_owner = os.getpid()
        self._cache.append(
            Sample(
                sample.image.clone() if returned else sample.image,
                sample.boxes,
                sample.classes,
                sample.has_instances,
                "cache",
                None,
                sample.file_name,
            )
        )

    def draw(self, n: int, rng: np.random.Generator) -> List[Sample]:
        """``n`` partners, distinct while the data allows, read or taken from the cache."""
        if (
            self.cache_size > 0
            and self._cache_owner == os.getpid()
            and len(self._cache) == self.cache_size
        ):
            picks = rng.choice(len(self._cache), size=n, replace=n > len(self._cache))
            return [self._cache[int(i)] for i in picks]
        total = len(self._dataset)
        picks = rng.choice(total, size=n, replace=n > total)
        return [
            sample_from_output(self._map_plain(self._dataset[int(i)]), "dataset", int(i))
            for i in picks
        ]
