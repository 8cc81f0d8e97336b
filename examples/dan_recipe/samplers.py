"""Samplers of the recipe: per-epoch shuffles, rank shards, class-balanced draws.

Every draw is a pure function of ``(seed, epoch)`` (call ``set_epoch`` at the start
of each epoch), so a resumed run sees the same order as an uninterrupted one, and
all ranks of a distributed run agree on one global order before taking their share.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Sampler

__all__ = ["ClassBalancedSampler", "EpochShuffleSampler", "ShardSampler"]


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(n)`` that is a function of (seed, epoch) only."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class ShardSampler(Sampler[int]):
    """Rank ``r``'s share of another sampler's indices (or of ``range(n)``).

    With ``pad=True`` (training) every rank gets the same count, the list being
    wrapped around as DistributedSampler does; with ``pad=False`` (evaluation)
    each index is visited exactly once over all ranks, so summed confusion
    matrices count every sample once.
    """

    def __init__(self, base: Sampler[int] | int, rank: int, world: int, *, pad: bool) -> None:
        self.base = base
        self.rank = rank
        self.world = world
        self.pad = pad

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def _indices(self) -> list[int]:
        idx = list(range(self.base)) if isinstance(self.base, int) else list(iter(self.base))
        if self.pad and idx:
            total = math.ceil(len(idx) / self.world) * self.world
            idx = (idx * math.ceil(total / len(idx)))[:total]
        return idx[self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        n = self.base if isinstance(self.base, int) else len(self.base)
        if self.pad:
            return math.ceil(n / self.world)
        return len(range(self.rank, n, self.world))


class ClassBalancedSampler(Sampler[int]):
    """Sample indices with replacement, each with weight ``1 / count(its class)``.

    Every class is then drawn equally often in expectation, whatever its size
    (AffectNet's recipe). Works from any list of labels (not only an image folder).
    The draw of an epoch is a pure function of ``(seed, epoch)``; call
    :meth:`set_epoch` at the start of every epoch. With ``world_size > 1`` every
    rank takes the strided shard ``rank::world_size`` of the same global draw, so
    the ranks together see exactly one global draw (the draw is padded, with its
    own first indices, to a multiple of ``world_size``).

    Args:
        labels: Label of every dataset index (ints, any values).
        num_samples: Size of the global draw per epoch; default ``len(labels)``.
        seed: Base seed.
        rank: This process's rank.
        world_size: Number of processes.

    Raises:
        ValueError: On empty labels or bad sizes / ranks.
    """

    def __init__(
        self,
        labels: Sequence[int] | Tensor,
        num_samples: int | None = None,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        lab = torch.as_tensor(labels if not isinstance(labels, Tensor) else labels.cpu()).long().flatten()
        if lab.numel() == 0:
            raise ValueError("ClassBalancedSampler: expected a non-empty list of labels, got 0")
        if num_samples is None:
            num_samples = int(lab.numel())
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"ClassBalancedSampler num_samples: expected a positive int, got {num_samples!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ClassBalancedSampler: expected 0 <= rank < world_size, got {rank}, {world_size}")
        _, inverse, counts = torch.unique(lab, return_inverse=True, return_counts=True)
        self.weights = (1.0 / counts.double())[inverse]
        self.num_samples = num_samples
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the draw of ``epoch`` (deterministic given the seed)."""
        self.epoch = int(epoch)

    def global_indices(self) -> list[int]:
        """The whole draw of the current epoch (before sharding, after padding)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        idx = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=g).tolist()
        total = math.ceil(self.num_samples / self.world_size) * self.world_size
        idx += idx[: total - len(idx)]
        return idx

    def __iter__(self) -> Iterator[int]:
        return iter(self.global_indices()[self.rank :: self.world_size])

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.world_size)
