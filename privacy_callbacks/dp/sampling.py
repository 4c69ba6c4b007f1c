"""Poisson sampling identical on every rank, and seeds that no position of a run reuses."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any, Iterator

import torch
from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty
from torch.utils.data import DataLoader, Sampler

__all__ = ["PoissonBatchSampler", "entropy_seed", "mixed_seed", "poisson_loader"]


class PoissonBatchSampler(Sampler[list[int]]):
    """Poisson sampling of the whole dataset, identical on every rank, cut into physical batches.

    Every rank draws the same mask (seeded from rank 0), so the global batch holds each sample
    with probability ``logical_rate``, as in a one-process run, and no sample lands on two ranks
    (rank ``r`` takes every ``world_size``-th index). Each selected sample goes to one of the
    ``accumulate`` batches of its window at random, so the first ``j`` are a Poisson sample at
    rate ``j * logical_rate / accumulate``: a window cut short is exactly the sample its step is
    charged for. Empty batches are yielded, never skipped: every rank takes the same steps.
    """

    #: Read by the compliance audit: the accountant's Poisson assumption holds for this loader.
    poisson_sampling = True

    def __init__(self, *, num_samples: int, logical_rate: float, steps: int, accumulate: int,
                 rank: int, world_size: int, generator: torch.Generator) -> None:
        self.num_samples, self.logical_rate, self.steps = num_samples, logical_rate, steps
        self.accumulate, self.rank, self.world_size = accumulate, rank, world_size
        self._generator = generator

    def __len__(self) -> int:
        return self.steps * self.accumulate

    def __iter__(self) -> Iterator[list[int]]:
        gen = self._generator
        for _ in range(self.steps):
            selected = (torch.rand(self.num_samples, generator=gen) < self.logical_rate
                        ).nonzero().flatten()
            slot = torch.randint(0, self.accumulate, (len(selected),), generator=gen)
            for j in range(self.accumulate):
                yield selected[slot == j][self.rank::self.world_size].tolist()


def poisson_loader(dataloader: DataLoader, sampler: PoissonBatchSampler) -> DataLoader:
    """``dataloader``'s dataset and worker settings with batches from ``sampler``; an empty batch
    keeps the samples' shapes and dtypes (Opacus' collate), so its step runs and is accounted."""
    sample = dataloader.dataset[0]
    fields = sample if isinstance(sample, (tuple, list)) else None
    collate = wrap_collate_with_empty(
        collate_fn=dataloader.collate_fn,
        sample_empty_shapes=None if fields is None else [(0, *shape_safe(x)) for x in fields],
        dtypes=None if fields is None else [dtype_safe(x) for x in fields])
    workers: dict[str, Any] = ({"prefetch_factor": dataloader.prefetch_factor,
                                "persistent_workers": dataloader.persistent_workers}
                               if dataloader.num_workers else {})
    return DataLoader(dataloader.dataset, batch_sampler=sampler, collate_fn=collate,
                      num_workers=dataloader.num_workers, pin_memory=dataloader.pin_memory,
                      timeout=dataloader.timeout, worker_init_fn=dataloader.worker_init_fn,
                      multiprocessing_context=dataloader.multiprocessing_context, **workers)


def entropy_seed() -> int:
    """A seed from the operating system's entropy: no ``seed_everything`` or resume replays it."""
    return secrets.randbits(62)


def mixed_seed(seed: int, *parts: object) -> int:
    """A 62-bit seed from ``seed`` and the run's position, so no position reuses a stream."""
    text = ":".join(str(x) for x in (seed, *parts)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") >> 2
