"""Resumable, seeded batching: the data a step sees depends only on (seed, epoch, position).

* :class:`EpochBatchSampler` shuffles with a generator seeded by ``seed + epoch``, shards the
  permutation over ranks like ``DistributedSampler`` (padding by wrap-around so every rank has
  the same number of batches), drops the last incomplete batch (as the reference's
  ``BatchSampler(drop_last=True)``) and can start an epoch at any batch, so a resumed run picks
  up exactly where the checkpoint was written.
* :class:`SeededSamples` runs each sample's random augmentation under its own seed, derived
  from (seed, epoch, index). Augmentations therefore do not depend on the number of loader
  workers, on which process loads a sample, or on what happened before a resume, and they never
  consume the training process's global random streams (dropout etc.).
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Iterator

import torch
from torch.utils.data import Dataset, Sampler

SampleKey = tuple[int, int]  # (dataset index, augmentation seed)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample in one epoch (stable across processes and Python runs)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class EpochBatchSampler(Sampler[list[SampleKey]]):
    """Batches of ``(index, augmentation seed)`` for one rank; ``set_epoch`` before iterating."""

    def __init__(self, num_samples: int, batch_size: int, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True, seed: int = 42, drop_last: bool = True):
        if num_samples < 1:
            raise ValueError("the dataset is empty")
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0
        self.per_rank = math.ceil(num_samples / num_replicas)
        if drop_last and self.per_rank < batch_size:
            raise ValueError(f"batch_size {batch_size} x {num_replicas} process(es) is larger than the "
                             f"dataset ({num_samples} samples): no complete batch per epoch")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate epoch ``epoch`` from its batch ``start_batch`` (0 = from the beginning)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} outside the epoch's {len(self)} batches")
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        if self.drop_last:
            return self.per_rank // self.batch_size
        return math.ceil(self.per_rank / self.batch_size)

    def rank_indices(self, epoch: int) -> list[int]:
        """This rank's dataset indices for ``epoch`` (padded by wrap-around to equal length)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        total = self.per_rank * self.num_replicas
        order = (order * math.ceil(total / len(order)))[:total]
        return order[self.rank:total:self.num_replicas]

    def __iter__(self) -> Iterator[list[SampleKey]]:
        indices = self.rank_indices(self.epoch)
        for b in range(self.start_batch, len(self)):
            chunk = indices[b * self.batch_size:(b + 1) * self.batch_size]
            yield [(i, sample_seed(self.seed, self.epoch, i)) for i in chunk]


class SeededSamples(Dataset):
    """``dataset[index]`` evaluated with torch's and Python's CPU generators seeded per sample."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey):
        index, seed = key
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only (what the transforms draw from): torch.manual_seed would
            # reseed the CUDA generators too, which fork_rng(devices=[]) does not restore.
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(python_state)

