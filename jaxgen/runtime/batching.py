"""Splitting a batch into sub-batches (max_batch_size / batch_type) and padding to shape buckets
(and to whole chunks for chunked passes)."""

from __future__ import annotations

from typing import List

BATCH_TYPES = ("examples", "tokens")


def bucket(n: int, minimum: int = 16) -> int:
    """Smallest padded size >= n: powers of two from `minimum` up to 256, then multiples of 256.

    Keeps the number of distinct compiled shapes small without doubling long inputs.
    """
    size = max(minimum, 1)
    while size < n and size < 256:
        size *= 2
    if size >= n:
        return size
    return -(-n // 256) * 256


def pass_width(length: int, chunk: int) -> int:
    """Padded length of a full pass over `length` tokens: a chunk's multiple past one chunk."""
    return length if length <= chunk else -(-length // chunk) * chunk


def split_batches(lengths: List[int], max_batch_size: int, batch_type: str) -> List[List[int]]:
    """Indices of the sub-batches, as CTranslate2 forms them.

    0 -> one sub-batch in input order. Otherwise examples are sorted by length, longest first,
    and cut into groups of at most `max_batch_size` examples ("examples") or of at most
    `max_batch_size` padded tokens, i.e. count x longest ("tokens"); an over-long example still
    forms its own group.
    """
    if not lengths:
        return []
    if max_batch_size == 0:
        return [list(range(len(lengths)))]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: List[List[int]] = []
    current: List[int] = []
    longest = 0
    for i in order:
        if batch_type == "tokens":
            new_longest = max(longest, lengths[i])
            if current and (len(current) + 1) * new_longest > max_batch_size:
                groups.append(current)
                current, new_longest = [], lengths[i]
            current.append(i)
            longest = new_longest
        else:
            if len(current) == max_batch_size:
                groups.append(current)
                current = []
            current.append(i)
    if current:
        groups.append(current)
    return groups
