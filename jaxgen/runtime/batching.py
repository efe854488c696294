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


SLOT_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def slot_batch(n: int, width: int) -> int:
    """Rows of a slot-scheduler batch that holds n running rows (n <= width): the smallest of
    SLOT_SIZES (powers of two and three times them: steps of at most 1.5x), past 256 a multiple of
    64, capped at `width`. Finer than `bucket` because a job's tail runs on it: a step costs more
    with every row, and each size is one more compiled loop."""
    size = next((s for s in SLOT_SIZES if s >= n), -(-n // 64) * 64)
    return min(size, max(width, n))


def smaller_slot_batch(batch: int) -> int:
    """The largest slot batch size below `batch` (0 below 1)."""
    if batch > SLOT_SIZES[-1]:
        return max(SLOT_SIZES[-1], (batch - 1) // 64 * 64)
    return max((s for s in SLOT_SIZES if s < batch), default=0)


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
