"""The `--max_samples` sample of a benchmark: seeded, stratified by category, the same in every process.

Example:
    >>> allocate({"a": 6, "b": 3, "c": 1}, 5)
    {'a': 3, 'b': 1, 'c': 1}
"""

from __future__ import annotations

import random
from typing import Sequence

from trl_rejection.eval.records import EvalRecord

SAMPLING_RULE = ("stratified by category: each category first gets one record (when max_samples >= the number of "
                 "categories), then each further record goes to the category furthest below its proportional share "
                 "max_samples x category size / benchmark size (ties: the larger category, then the one first in the "
                 "file); within a category, a seeded shuffle picks the records, kept in file order")


def allocate(sizes: dict[str, int], n: int) -> dict[str, int]:
    """How many of `n` records each category (of `sizes`, in file order) gets under `SAMPLING_RULE`.

    Example:
        >>> allocate({"a": 6, "b": 3, "c": 1}, 5)
        {'a': 3, 'b': 1, 'c': 1}
    """
    total = sum(sizes.values())
    if n >= total:
        return dict(sizes)
    counts = {c: int(n >= len(sizes)) for c in sizes}
    order = {c: i for i, c in enumerate(sizes)}
    for _ in range(n - sum(counts.values())):  # deficit n*size/total - count, compared exactly in integers
        best = max(sizes, key=lambda c: (n * sizes[c] - counts[c] * total, sizes[c], -order[c]))
        counts[best] += 1
    return counts


def sample_records(records: Sequence[EvalRecord], max_samples: int | None, seed: int = 0) -> list[EvalRecord]:
    """At most `max_samples` records of each benchmark, drawn by `SAMPLING_RULE` with `seed`; all when None.
    The same records, seed and `max_samples` always give the same sample (Python's string seeding is stable).

    Example:
        >>> rows = [EvalRecord(str(i), "b", "ab"[i % 2], "p", None, True) for i in range(6)]
        >>> sorted(r.category for r in sample_records(rows, 2))
        ['a', 'b']
    """
    if max_samples is None:
        return list(records)
    keep: set[int] = set()
    for bench in dict.fromkeys(r.benchmark for r in records):
        by_category: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            if r.benchmark == bench:
                by_category.setdefault(r.category, []).append(i)
        counts = allocate({c: len(idx) for c, idx in by_category.items()}, max_samples)
        for category, idx in by_category.items():
            shuffled = list(idx)
            random.Random(f"{seed}/{bench}/{category}").shuffle(shuffled)
            keep.update(shuffled[:counts[category]])
    return [r for i, r in enumerate(records) if i in keep]
