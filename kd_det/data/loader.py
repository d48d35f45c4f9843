"""A training data loader whose batches depend only on the seed and the iteration.

:func:`build_resumable_train_loader` keeps detectron2's pieces (``TrainingSampler``'s seeded
stream, ``DatasetFromList``, the mapper, aspect-ratio grouping) but forms the batches in the main
process (:class:`ResumableBatchSampler`, which can start at any iteration by replaying the index
stream) and maps every sample with the global generators seeded from ``(seed, rank, position)``
(:func:`seeded_global_rng`). So a resumed run continues exactly, the worker count changes nothing,
and mixing can stop for the last iterations (``INPUT.MIX.CLEAN_TAIL``). Other samplers and
iterable datasets keep detectron2's loader; a partner cache makes batches depend on the workers.
See docs/reproducibility.md, "The training loader", for why detectron2's loader is not enough.
"""

import contextlib
import logging
import random
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.utils.data as torchdata
from detectron2.data.common import DatasetFromList
from detectron2.data.samplers import TrainingSampler
from detectron2.utils import comm

logger = logging.getLogger(__name__)

#: One sample request: (iteration of its batch, position in this rank's stream, dataset index).
SampleKey = Tuple[int, int, int]


@contextlib.contextmanager
def seeded_global_rng(seed: int):
    """Seed ``random``, ``numpy.random`` and torch's CPU generator; restore all three afterwards.

    detectron2's augmentations draw from the global ``numpy.random``; kd_det's mixed-sample mapper
    keys its own generator on ``torch.initial_seed()``. Seeding all three makes one sample's
    mapping reproducible; restoring them keeps the caller's random stream (e.g. the ROI sampler's
    ``torch.randperm`` in the main process) unaffected by how many samples were mapped there. Only
    the CPU generator is touched: CUDA generators are left alone.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    torch_state = torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.random.set_rng_state(torch_state)


def sample_seed(seed: int, rank: int, position: int) -> int:
    """A 32-bit seed for one sample, a function of the run's seed, the rank and the position."""
    return int(np.random.SeedSequence([seed % 2**32, rank, position]).generate_state(1)[0])


class ResumableBatchSampler(torchdata.Sampler):
    """Batches of :data:`SampleKey` from a detectron2 sampler's stream, starting at an iteration.

    Grouping by aspect ratio follows ``AspectRatioGroupedDataset``: two buckets (width > height,
    and the rest), a batch is emitted when its bucket is full. The grouping is computed from the
    dataset's ``width``/``height`` fields, not from mapped images, so skipping ``start_iter``
    batches costs only a pass over indices.
    """

    def __init__(
        self,
        sampler: Sequence[int],
        batch_size: int,
        landscape: Optional[Sequence[bool]] = None,
        start_iter: int = 0,
    ):
        """
        Args:
            sampler: an infinite index stream (detectron2's ``TrainingSampler``).
            batch_size: images per batch on this rank.
            landscape: per dataset index, whether width > height; None disables grouping.
            start_iter: the iteration of the first batch yielded.
        """
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.landscape = None if landscape is None else [bool(x) for x in landscape]
        self.start_iter = int(start_iter)

    def __iter__(self) -> Iterator[List[SampleKey]]:
        buckets: List[List[Tuple[int, int]]] = [[], []]
        iteration = 0
        for position, index in enumerate(self.sampler):
            bucket = buckets[0 if self.landscape is None or self.landscape[index] else 1]
            bucket.append((position, index))
            if len(bucket) == self.batch_size:
                if iteration >= self.start_iter:
                    yield [(iteration, pos, idx) for pos, idx in bucket]
                bucket.clear()
                iteration += 1


class SeededMapDataset(torchdata.Dataset):
    """Maps a :data:`SampleKey` to a training sample with RNGs seeded from its position."""

    def __init__(
        self,
        dataset: Sequence[dict],
        mapper: Callable[[dict], Optional[dict]],
        seed: int,
        plain_mapper: Optional[Callable[[dict], Optional[dict]]] = None,
        plain_from_iter: Optional[int] = None,
    ):
        """
        Args:
            dataset: dataset dicts (a ``DatasetFromList``; each access returns a fresh copy).
            mapper: maps a dataset dict to the model's input (``DatasetMapper`` and subclasses).
            seed: the run's seed.
            plain_mapper: the mapper used from ``plain_from_iter`` on (e.g. without mixing).
            plain_from_iter: first iteration mapped by ``plain_mapper``; None: never.
        """
        self.dataset = dataset
        self.mapper = mapper
        self.seed = int(seed)
        self.rank = comm.get_rank()
        self.plain_mapper = plain_mapper
        self.plain_from_iter = plain_from_iter

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key: SampleKey) -> dict:
        iteration, position, index = key
        mapper = self.mapper
        if self.plain_mapper is not None and self.plain_from_iter is not None:
            if iteration >= self.plain_from_iter:
                mapper = self.plain_mapper
        with seeded_global_rng(sample_seed(self.seed, self.rank, position)):
            # Like detectron2's MapDataset, a sample the mapper rejects (None) is replaced, here by
            # the next index, so the replacement is as reproducible as the rest.
            for attempt in range(len(self.dataset)):
                out = mapper(self.dataset[(index + attempt) % len(self.dataset)])
                if out is not None:
                    if attempt:
                        logger.warning(f"Sample {index} was rejected by the mapper; used "
                                       f"{(index + attempt) % len(self.dataset)}.")  # fmt: skip
                    return out
        raise RuntimeError("The mapper rejected every sample of the training set.")


class ResumableTrainLoader:
    """An iterable of training batches that can start at any iteration (set ``start_iter``).

    ``SimpleTrainer`` creates its iterator at the first step, after ``resume_or_load`` decided the
    start iteration, so the trainer sets ``start_iter`` in between (``KDTrainer.train``).
    """

    def __init__(self, batch_sampler: ResumableBatchSampler, dataset: SeededMapDataset, workers):
        self.batch_sampler = batch_sampler
        self.dataset = dataset
        self.num_workers = int(workers)

    @property
    def start_iter(self) -> int:
        return self.batch_sampler.start_iter

    @start_iter.setter
    def start_iter(self, value: int):
        self.batch_sampler.start_iter = int(value)

    def __iter__(self):
        # A generator of its own: DataLoader would otherwise draw its base seed from torch's
        # global generator, shifting the model's random stream by one draw per iterator created.
        loader = torchdata.DataLoader(
            self.dataset,
            batch_sampler=self.batch_sampler,
            num_workers=self.num_workers,
            collate_fn=list,
            generator=torch.Generator().manual_seed(self.dataset.seed),
            persistent_workers=False,
        )
        return iter(loader)


def build_resumable_train_loader(
    dataset_dicts: List[dict],
    mapper: Callable[[dict], Optional[dict]],
    *,
    total_batch_size: int,
    seed: int,
    num_workers: int = 0,
    aspect_ratio_grouping: bool = True,
    plain_mapper: Optional[Callable[[dict], Optional[dict]]] = None,
    plain_from_iter: Optional[int] = None,
    start_iter: int = 0,
) -> ResumableTrainLoader:
    """The loader of this module's docstring (docs/reproducibility.md), from detectron2's inputs.

    Args:
        dataset_dicts: training dataset dicts (``get_detection_dataset_dicts``).
        mapper: the training mapper.
        total_batch_size: images per iteration over all ranks (``SOLVER.IMS_PER_BATCH``).
        seed: shuffling and augmentation seed (``cfg.SEED``); must be >= 0.
        num_workers: data-loader worker processes; results do not depend on it.
        aspect_ratio_grouping: batch landscape and portrait images separately.
        plain_mapper, plain_from_iter: see :class:`SeededMapDataset`.
        start_iter: the first iteration's batch (usually set later through ``start_iter``).
    """
    world = comm.get_world_size()
    if total_batch_size % world != 0:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({total_batch_size}) must be divisible by the number of "
            f"processes ({world})."
        )
    if seed < 0:
        raise ValueError(f"A resumable loader needs a fixed seed; got SEED={seed}.")
    landscape = None
    if aspect_ratio_grouping:
        landscape = [d.get("width", 1) > d.get("height", 0) for d in dataset_dicts]
    sampler = TrainingSampler(len(dataset_dicts), shuffle=True, seed=seed)
    batches = ResumableBatchSampler(sampler, total_batch_size // world, landscape, start_iter)
    data = SeededMapDataset(
        DatasetFromList(dataset_dicts, copy=False), mapper, seed, plain_mapper, plain_from_iter
    )
    return ResumableTrainLoader(batches, data, num_workers)
