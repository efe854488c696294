"""The prefix cache: KV states of token prefixes, kept per device and reused instead of prefilling
the same tokens again (a few-shot context shared by many requests, a static prompt).

An entry holds, for one device, the batch-1 KV cache after a prefix of `length` tokens (positions
[0, length)), and optionally the log-probabilities of its tokens but the first (what scoring
returns for them) with their greedy flags. Entries are keyed by hash chains over blocks of
`block` tokens, as vLLM's prefix caching keys its blocks: the key of a prefix ending on a block
boundary is hash(key of the prefix one block shorter, the block's tokens), so the longest cached
prefix of a sequence is found with one hash per block. A prefix that does not end on a boundary
(a static prompt) is keyed by its last boundary's key and its remaining tokens. Every entry keeps
its tokens, compared on a hit, so a hash collision is a miss, never a wrong state.

Memory is bounded: entries are evicted least recently used first once their bytes pass
`max_bytes` per device; static prompts are also limited to `static_entries` per device
(CTranslate2's `static_prompt_cache_size`). Thread-safe. The KV buffers are immutable JAX arrays:
an entry is tiled into a call's rows (`jaxgen.decoding.search.start_cache`, `gather_prefixes`),
never written in place.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from jaxgen.decoding.search import start_cache
from jaxgen.model.decoder import KVCache, init_cache
from jaxgen.runtime.batching import bucket, pass_width
from jaxgen.runtime.generation import prefill_sequences

DEFAULT_BLOCK = 32  # tokens per key block
DEFAULT_MAX_BYTES = 2 << 30  # per device


@dataclasses.dataclass
class PrefixEntry:
    """A cached prefix on one device: `tokens` (length = len(tokens)), its batch-1 KV `cache`
    (cache.length >= length), and with scores `log_probs` [length - 1] float32 and `greedy`
    [length - 1] bool of tokens[1:] (None without)."""

    device: str
    tokens: Tuple[int, ...]
    cache: KVCache
    log_probs: Optional[np.ndarray] = None
    greedy: Optional[np.ndarray] = None
    static: bool = False  # made for a static prompt (counted against static_entries)

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def has_scores(self) -> bool:
        return self.log_probs is not None

    @property
    def nbytes(self) -> int:
        return sum(int(a.size) * a.dtype.itemsize for a in self.cache.k + self.cache.v)


def block_keys(tokens: Sequence[int], block: int) -> List[int]:
    """Hash-chain keys of tokens' prefixes of block, 2 * block, ... tokens (one per whole block)."""
    keys, key = [], 0
    for start in range(0, len(tokens) - block + 1, block):
        key = hash((key, tuple(tokens[start:start + block])))
        keys.append(key)
    return keys


def exact_key(tokens: Sequence[int], block: int, keys: Optional[List[int]] = None) -> int:
    """The key of the prefix `tokens` itself (its last boundary's key and the tokens past it)."""
    keys = block_keys(tokens, block) if keys is None else keys
    whole = len(tokens) // block * block
    if whole == len(tokens):
        return keys[-1] if keys else 0
    return hash((keys[whole // block - 1] if whole else 0, tuple(tokens[whole:]), "tail"))


class PrefixCache:
    """Prefix KV states per device, LRU with a byte budget (see the module docstring).

    block: tokens per key block (a shared prefix is reused in whole blocks); max_bytes: KV bytes
    kept per device; static_entries: static-prompt entries kept per device."""

    def __init__(self, block: int = DEFAULT_BLOCK, max_bytes: int = DEFAULT_MAX_BYTES, static_entries: int = 16):
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        self.block = int(block)
        self.max_bytes = int(max_bytes)
        self.static_entries = int(static_entries)
        self._entries: "collections.OrderedDict[tuple, PrefixEntry]" = collections.OrderedDict()
        self._lock = threading.Lock()
        self.stats = {"hits": 0, "misses": 0, "inserted": 0, "evicted": 0, "reused_tokens": 0}

    # ------------------------------------------------------------------ lookups
    def keys(self, tokens: Sequence[int]) -> List[int]:
        return block_keys(tokens, self.block)

    def longest(self, device: str, tokens: Sequence[int], max_length: int, *, need_scores: bool = False,
                keys: Optional[List[int]] = None) -> Optional[PrefixEntry]:
        """The cached entry of the longest whole-block prefix of `tokens` no longer than
        `max_length` (with scores when `need_scores`), marked recently used; None if none."""
        keys = self.keys(tokens) if keys is None else keys
        with self._lock:
            for n in range(min(len(keys), max_length // self.block), 0, -1):
                entry = self._entries.get((device, keys[n - 1]))
                if entry is not None and (entry.has_scores or not need_scores) \
                        and entry.tokens == tuple(tokens[:n * self.block]):
                    self._entries.move_to_end((device, keys[n - 1]))
                    self.stats["hits"] += 1
                    return entry
            self.stats["misses"] += 1
        return None

    def reused(self, tokens: int) -> None:
        """Counts prefix tokens that rows started from instead of computing them (stats["reused_tokens"])."""
        with self._lock:
            self.stats["reused_tokens"] += int(tokens)

    def get(self, device: str, tokens: Sequence[int]) -> Optional[PrefixEntry]:
        """The entry of exactly `tokens` (a static prompt), marked recently used; None if none."""
        key = (device, exact_key(tokens, self.block))
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.tokens != tuple(tokens):
                self.stats["misses"] += 1
                return None
            self._entries.move_to_end(key)
            self.stats["hits"] += 1
            self.stats["reused_tokens"] += entry.length
            return entry

    # ------------------------------------------------------------------ inserting / evicting
    def put(self, entry: PrefixEntry) -> PrefixEntry:
        """Stores an entry (replacing one of the same tokens unless that one has scores and this
        one not), then evicts least recently used entries of its device past the budgets.
        Returns the entry kept."""
        key = (entry.device, exact_key(entry.tokens, self.block))
        with self._lock:
            old = self._entries.get(key)
            if old is not None and old.tokens == entry.tokens and old.has_scores and not entry.has_scores:
                self._entries.move_to_end(key)
                return old
            self._entries[key] = entry
            self._entries.move_to_end(key)
            self.stats["inserted"] += 1
            self._evict(entry.device, key)
        return entry

    def _evict(self, device: str, keep: tuple) -> None:
        """LRU eviction on `device` past the budgets; `keep` (the entry just stored) stays."""
        mine = [k for k in self._entries if k[0] == device and k != keep]
        total = sum(self._entries[k].nbytes for k in mine) + self._entries[keep].nbytes
        static = [k for k in mine if self._entries[k].static] + ([keep] if self._entries[keep].static else [])
        for k in static[:max(len(static) - self.static_entries, 0)]:
            if k != keep:
                total -= self._entries.pop(k).nbytes
                self.stats["evicted"] += 1
        for k in mine:
            if total <= self.max_bytes:
                break
            if k in self._entries:
                total -= self._entries.pop(k).nbytes
                self.stats["evicted"] += 1

    def clear(self, static: Optional[bool] = None) -> None:
        """Drops every entry (only static-prompt entries with static=True, only the others with False)."""
        with self._lock:
            for k in [k for k, e in self._entries.items() if static is None or e.static == static]:
                del self._entries[k]

    def count(self, static: Optional[bool] = None) -> int:
        """Entries held (on every device), static-prompt ones only or others only when asked."""
        with self._lock:
            return sum(1 for e in self._entries.values() if static is None or e.static == static)

    def nbytes(self, device: Optional[str] = None) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values() if device is None or e.device == device)

    def entries(self) -> Dict[tuple, PrefixEntry]:
        with self._lock:
            return dict(self._entries)


class StaticPrompts:
    """Where a generation call's rows start: the static prompt's KV state, kept in the prefix
    cache (`(replica, resolved options) -> (batch-1 KVCache, static prompt length)`), and with
    prefix passes the prompts' shared prefixes (`sharing`). The slot scheduler and the static
    sub-batches start every row from them."""

    def __init__(self, prefixes: PrefixCache, config, plan, dtype, passes=None):
        self.prefixes = prefixes
        self.config = config
        self.plan = plan
        self.dtype = dtype
        self.passes = passes  # jaxgen.runtime.prefix_passes.PrefixPasses; None: no sharing

    def __call__(self, replica, resolved) -> Tuple[KVCache, int]:
        return self.state(replica, resolved.static_prompt_ids, resolved.options.cache_static_prompt)

    def state(self, replica, ids: Sequence[int], use_cache: bool) -> Tuple[KVCache, int]:
        """KV state (batch 1) after the static prompt `ids`, from the cache when allowed."""
        if not ids:
            return init_cache(self.config, 1, 0, self.dtype), 0
        if use_cache:
            entry = self.prefixes.get(replica.name, ids)
            if entry is not None:
                return entry.cache, len(ids)
        length = pass_width(bucket(len(ids), minimum=16), self.plan.chunk)
        cache = start_cache(init_cache(self.config, 1, 0, self.dtype), config=self.config, batch=1, length=length)
        cache = prefill_sequences(replica.params, self.config, cache, [list(ids)], 0, length, self.plan)
        if use_cache and self.prefixes.static_entries > 0:
            self.prefixes.put(PrefixEntry(replica.name, tuple(ids), cache, static=True))
        return cache, len(ids)

    def sharing(self, replica, resolved, prefix: KVCache):
        """prefill_rows' `share` for a call (`jaxgen.runtime.generation.prefill_rows`): rows
        sharing a prefix of static prompt + prompt start from its state; None without prefix
        passes. prefix: the static prompt's state (from `state`)."""
        if self.passes is None:
            return None
        static_ids = list(resolved.static_prompt_ids)
        static = PrefixEntry(replica.name, tuple(static_ids), prefix) if static_ids else None

        def share(rows, batch: int, length: int):
            return self.passes.prefill(replica, static, [static_ids + r.prompt[:-1] for r in rows], batch, length)
        return share
