"""Length-grouped batching for text: batches of similar-length sequences waste less padding.

With dynamic padding (each batch padded to its own longest sequence), grouping samples of similar
length shrinks every batch's padded width. `LengthGroupedSampler` is a `RandomSampler`: ungrouped it
yields exactly RandomSampler's order from the same generator (runs without grouping are unchanged and
resume exactly); grouped, it shuffles, cuts the permutation into buckets of `bucket_size` samples and
sorts each bucket longest-first (HF's mega-batch scheme), so the largest batch comes first and an
out-of-memory error surfaces at once. The bucket order stays random, so batches stay shuffled.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import RandomSampler


class LengthGroupedSampler(RandomSampler):
    """RandomSampler that can group indices by sequence length (toggle `group_by_length`)."""

    def __init__(self, data_source: Any, lengths: Sequence[int], *, generator: torch.Generator | None = None,
                 group_by_length: bool = False, bucket_size: int = 1024) -> None:
        super().__init__(data_source, generator=generator)
        if len(lengths) != len(data_source):
            raise ValueError(f"{len(lengths)} lengths for {len(data_source)} samples")
        if bucket_size < 1:
            raise ValueError("bucket_size must be >= 1")
        self.lengths = [int(n) for n in lengths]
        self.group_by_length = group_by_length
        self.bucket_size = bucket_size

    def set_batch_size(self, batch_size: int) -> None:
        """Keep buckets at 50 batches when a loop rebuilds its loader with another batch size."""
        self.bucket_size = 50 * batch_size

    def __iter__(self) -> Iterator[int]:
        if not self.group_by_length:
            yield from super().__iter__()
            return
        generator = self.generator
        if generator is None:  # same seeding as RandomSampler without a generator
            generator = torch.Generator()
            generator.manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        yield from self.grouped_order(torch.randperm(len(self.lengths), generator=generator).tolist())

    def grouped_order(self, permutation: list[int]) -> list[int]:
        """The permutation cut into buckets, each sorted longest-first."""
        order: list[int] = []
        for i in range(0, len(permutation), self.bucket_size):
            order += sorted(permutation[i:i + self.bucket_size], key=lambda j: -self.lengths[j])
        return order


def padded_tokens(lengths: Sequence[int], order: Sequence[int], batch_size: int, multiple_of: int = 1) -> int:
    """Tokens the model processes when `order` is cut into batches padded to their longest sequence."""
    total = 0
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        width = max(lengths[j] for j in chunk)
        width = -(-width // multiple_of) * multiple_of
        total += width * len(chunk)
    return total


@dataclass
class PaddingPlan:
    """Tokens per epoch: real ones, and as processed with random vs length-grouped batches."""

    real_tokens: int
    random_tokens: int
    grouped_tokens: int

    @property
    def grouped_ratio(self) -> float:
        """Processed tokens grouped / random (< 1: grouping saves work)."""
        return self.grouped_tokens / self.random_tokens if self.random_tokens else 1.0


def plan_padding(sampler: LengthGroupedSampler, batch_size: int, multiple_of: int = 1) -> PaddingPlan:
    """Compare one epoch's batches with and without grouping, from a copy of the sampler's generator.

    Exact counts for this dataset and batch size; the run's generator is not advanced.
    """
    generator = torch.Generator()
    if sampler.generator is not None:
        generator.set_state(sampler.generator.get_state())
    perm = torch.randperm(len(sampler.lengths), generator=generator).tolist()
    lengths = sampler.lengths
    return PaddingPlan(real_tokens=sum(lengths),
                       random_tokens=padded_tokens(lengths, perm, batch_size, multiple_of),
                       grouped_tokens=padded_tokens(lengths, sampler.grouped_order(perm), batch_size, multiple_of))
