"""Streaming and iterable helpers on top of `Generator.generate_batch` / `score_batch` (spec §3)."""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Callable, Iterable, Iterator, List

from jaxgen.runtime.batching import BATCH_TYPES

_END = object()


class TokenStream:
    """Iterator of GenerationStepResult fed by a background generation job.

    `close()` (also called on garbage collection) makes the job's callback return True, so every
    row stops at its next decoded chunk; close() then waits for the job, so nothing runs on.
    """

    def __init__(self, submit: Callable[[Callable], List], user_callback=None):
        self._queue: "queue.Queue" = queue.Queue()
        self._closed = threading.Event()
        items, closed = self._queue, self._closed

        def callback(step) -> bool:
            stop = bool(user_callback(step)) if user_callback is not None else False
            items.put(step)
            return closed.is_set() or stop

        futures = submit(callback)
        self._waiter = threading.Thread(target=_wait_all, args=(futures, items), daemon=True)
        self._waiter.start()

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self):
        if self._closed.is_set() and self._queue.empty():
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._closed.set()
            raise StopIteration
        if isinstance(item, BaseException):
            self._closed.set()
            raise item
        return item

    def close(self) -> None:
        self._closed.set()
        self._waiter.join()

    def __del__(self) -> None:
        try:
            self._closed.set()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


def _wait_all(futures, items: "queue.Queue") -> None:
    try:
        for f in futures:
            f.result()
    except BaseException as exc:  # surfaced to the consumer
        items.put(exc)
        return
    items.put(_END)


async def bridge_async(stream: TokenStream):
    """Async iterator over a TokenStream that never blocks the event loop."""
    loop = asyncio.get_running_loop()
    out: "asyncio.Queue" = asyncio.Queue()

    def pump() -> None:
        try:
            for step in stream:
                loop.call_soon_threadsafe(out.put_nowait, step)
            loop.call_soon_threadsafe(out.put_nowait, _END)
        except BaseException as exc:  # re-raised in the event loop
            loop.call_soon_threadsafe(out.put_nowait, exc)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        while True:
            item = await out.get()
            if item is _END:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        await loop.run_in_executor(None, stream.close)


def iterate_in_chunks(items: Iterable, submit: Callable[[List], List], max_batch_size: int, batch_type: str,
                      length: Callable = len) -> Iterator:
    """Reads `items` in chunks of 16 x max_batch_size examples (or tokens), submits each chunk
    asynchronously and yields results in input order, as soon as the head of the queue is ready."""
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError("max_batch_size must be >= 1")
    if batch_type not in BATCH_TYPES:
        raise ValueError(f"Invalid batch type: {batch_type}")
    read_size = 16 * max_batch_size
    pending: List = []
    chunk: List = []
    longest = 0

    def flush():
        nonlocal chunk, longest
        if chunk:
            pending.extend(submit(chunk))
        chunk, longest = [], 0

    for item in items:
        if batch_type == "tokens":
            new_longest = max(longest, length(item))
            if chunk and (len(chunk) + 1) * new_longest > read_size:
                flush()
                new_longest = length(item)
            longest = new_longest
        chunk.append(item)
        if batch_type == "examples" and len(chunk) >= read_size:
            flush()
        while pending and pending[0].done():
            yield pending.pop(0).result()
    flush()
    while pending:
        yield pending.pop(0).result()
