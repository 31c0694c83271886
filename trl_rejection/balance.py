"""Token-balanced micro-batches: the rows of each optimizer step split so that every process (and every
accumulation micro-batch) gets about the same number of tokens.

Data-parallel steps wait for the slowest process. With padding-free batches a process's step time follows its
token count, so a random split of a global batch over processes loses the gap between the fullest micro-batch and
the mean. The split changes neither which rows form an optimizer step nor the loss (summed over the step's tokens).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .sampler import LengthSampler


def balanced_chunks(block: Sequence[int], lengths: Sequence[int], batch_size: int, chunks: int) -> list[list[int]]:
    """`block` (batch_size * chunks row indices) cut into `chunks` micro-batches of `batch_size` rows whose summed
    `lengths` are close: longest row first, each to the lightest micro-batch that still has room (LPT greedy)."""
    bins: list[list[int]] = [[] for _ in range(chunks)]
    load = [0] * chunks
    for i in sorted(block, key=lambda i: (-lengths[i], i)):
        j = min((k for k in range(chunks) if len(bins[k]) < batch_size), key=lambda k: (load[k], k))
        bins[j].append(i)
        load[j] += lengths[i]
    return bins


class TokenBalancedSampler(LengthSampler):
    """A seeded random order of the rows in which each run of `batch_size * chunks` rows (one optimizer step over
    `chunks` = processes x accumulation steps) is arranged as `chunks` token-balanced micro-batches.

    The processes take consecutive micro-batches in turn (accelerate's batch sharding), so each step's rows are
    those of a plain shuffle, only split differently; a trailing partial step keeps its shuffled order. The order
    depends only on `seed` and the epoch, so a 1-GPU run with accumulation sees the same micro-batches as a
    multi-GPU run with the same global batch.

    Example:
        >>> sampler = TokenBalancedSampler([10, 1, 1, 10], batch_size=2, chunks=2, seed=0)
        >>> sorted(sampler) == [0, 1, 2, 3]
        True
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, chunks: int, seed: int = 0):
        if batch_size < 1 or chunks < 1:
            raise ValueError("batch_size and chunks must be >= 1.")
        super().__init__(lengths, seed)
        self.batch_size = batch_size
        self.chunks = chunks

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(len(self.lengths), generator=self.generator()).tolist()
        step = self.batch_size * self.chunks
        for start in range(0, len(order), step):
            block = order[start:start + step]
            if len(block) < step:
                yield from block
                continue
            for chunk in balanced_chunks(block, self.lengths, self.batch_size, self.chunks):
                yield from chunk
