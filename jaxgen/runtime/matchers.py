"""Host side of constrained decoding: the matchers of the constrained rows, advanced from inside the
decoding loops (`jaxgen.decoding.constrain` calls `advance` through `jax.experimental.io_callback`).

Each constrained row of a running loop holds a handle (an int, the loop state's `constraint`
field; -1 for a free row) to one matcher here: the row's copy of its compiled constraint
(`jaxgen.constraints.Compiled`) and the number of generated tokens it has consumed. At every
step the loop passes, per row, its handle, its parent's handle (beam search: the row the beam
came from at the last step; else the row itself), the token fed at this step and the row's
generated-token count; `advance` moves/copies parents' matchers to their children, consumes the
new token where the count moved on, and returns each row's packed mask of allowed tokens with
whether its constraint is complete (its end tokens are allowed). A repeated call with the same
counts consumes nothing (the callback is idempotent).

Handles are process-wide (one registry), so rows keep theirs when the slot scheduler moves them
between slots, and the loop executables do not depend on which matchers run.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

FREE = -1  # the handle of a free (unconstrained) row


class _Row:
    __slots__ = ("matcher", "count", "dead")

    def __init__(self, matcher):
        self.matcher = matcher
        self.count = 0  # generated tokens consumed
        self.dead = False  # a token the matcher refused (a beam of score -inf): nothing is allowed


_rows: Dict[int, _Row] = {}
_lock = threading.Lock()
_next = itertools.count()
_executor = None
_stats = {"calls": 0, "rows": 0, "seconds": 0.0}  # advance() calls, constrained rows served, time inside


def open_rows(compiled: Sequence[Optional[object]]) -> np.ndarray:
    """A fresh matcher for each compiled constraint (None: a free row) -> handles [n] int32."""
    handles = np.full((len(compiled),), FREE, np.int32)
    with _lock:
        for i, c in enumerate(compiled):
            if c is not None:
                h = next(_next) % (2**31 - 1)
                _rows[h] = _Row(c.matcher())
                handles[i] = h
    return handles


def close_rows(handles) -> None:
    """Forgets the rows' matchers (a handle may be FREE, or already closed)."""
    with _lock:
        for h in np.asarray(handles).reshape(-1).tolist():
            _rows.pop(int(h), None)


def open_count() -> int:
    """Matchers alive (the tests check that calls close theirs)."""
    with _lock:
        return len(_rows)


def stats() -> dict:
    """A copy of the counters: advance() calls (loop steps with constrained rows), constrained
    rows served, and seconds spent inside (host time: consuming tokens and computing masks)."""
    with _lock:
        return dict(_stats)


def _mask_executor():
    global _executor
    if _executor is None:
        import llguidance

        _executor = llguidance.LLExecutor()
    return _executor


def advance(handles: np.ndarray, parents: np.ndarray, tokens: np.ndarray, counts: np.ndarray,
            words: int) -> Tuple[np.ndarray, np.ndarray]:
    """The io_callback body. handles, parents, tokens, counts: [B] int32 (module docstring) ->
    (mask [B, words] int32, bit t % 32 of word t // 32 set where token t is allowed;
    complete [B] bool). Free rows (FREE) get every bit set and complete = True."""
    start = time.perf_counter()
    b = handles.shape[0]
    mask = np.full((b, words), -1, np.int32)
    complete = np.ones((b,), bool)
    with _lock:
        live = [i for i in range(b) if handles[i] != FREE and int(handles[i]) in _rows]
        if not live:
            return mask, complete
        _stats["calls"] += 1
        _stats["rows"] += len(live)
        rows = [_rows[int(handles[i])] for i in live]
        moving = [(i, row) for i, row in zip(live, rows) if int(counts[i]) == row.count + 1]
        # Parents' matchers go to their children first (copies for a parent's second child on),
        # then each child consumes its token: every copy is taken before any parent moves on.
        if any(int(parents[i]) != int(handles[i]) for i, _ in moving):
            sources = {int(parents[i]): _rows.get(int(parents[i])) for i, _ in moving}
            sources = {h: (r.matcher, r.dead) for h, r in sources.items() if r is not None}
            taken = set()
            for i, row in moving:
                p = int(parents[i])
                if p not in sources:
                    row.dead = True
                    continue
                matcher, dead = sources[p]
                row.matcher = matcher.deep_copy() if p in taken else matcher
                row.dead = dead
                taken.add(p)
        for i, row in moving:
            if not row.dead and not row.matcher.consume_token(int(tokens[i])):
                row.dead = True
            row.count = int(counts[i])
        targets = []
        for j, (i, row) in enumerate(zip(live, rows)):
            if row.dead or row.matcher.is_error():
                mask[i] = 0
                complete[i] = False
            else:
                targets.append((row.matcher, i))
                complete[i] = row.matcher.is_accepting()
        if len(targets) == 1:
            matcher, i = targets[0]
            out = mask[i]
            matcher.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)
        elif targets:
            _mask_executor().unsafe_compute_mask_ptr(targets, mask.ctypes.data, words * 4, b)
        _stats["seconds"] += time.perf_counter() - start
    return mask, complete


def completed(compiled: List[Optional[object]], generated: List[List[int]]) -> List[Optional[bool]]:
    """Whether each output (generated ids, end token stripped) completes its constraint (None:
    a free row): replayed on a fresh matcher, so it holds for any hypothesis (beam search too)."""
    return [None if c is None else c.accepts(ids) for c, ids in zip(compiled, generated)]
