"""Passes that start rows from shared prefix states (`jaxgen.runtime.prefix_cache`) instead of
prefilling the same tokens again: choosing each row's prefix, computing the missing prefix states
once, tiling them into the rows and running only the rest of each row.

Choosing: a row's prefix is the longest whole-block prefix of its tokens (those its pass would
feed) that is cached on the device, or that another row of the same call shares; a shared prefix
that is not cached yet is computed once, itself from the longest shorter prefix that is cached or
shared by several of the new prefixes (a few-shot context first, then each question after it).
A prefix state holds the log-probabilities of its own tokens only when a scored row needs them.

The rest of every row then runs in one pass (`jaxgen.decoding.scoring.extend_log_probs`) with each
row at its own positions, its prefix tiled in (`jaxgen.decoding.search.gather_prefixes`). Results
equal the unshared passes' within float rounding (the same math in other batch shapes). Sliding-
window layers share exactly: a prefix state's ring holds the prefix's last `window` positions,
what the unshared pass holds there too.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np

from jaxgen.decoding.scoring import extend_log_probs, score_width
from jaxgen.decoding.search import gather_prefixes, start_cache
from jaxgen.executables import cached_jit
from jaxgen.model.decoder import KVCache, PassPlan, init_cache, layer_slots
from jaxgen.runtime.devices import on_device, on_device_int32
from jaxgen.runtime.batching import bucket
from jaxgen.runtime.prefix_cache import PrefixCache, PrefixEntry

NO_SCORES = 1 << 62  # an offset past every row: no log-probs needed


@cached_jit(static_argnames=("config", "length"))
def row_prefix(cache: KVCache, row: jax.Array, *, config, length: int) -> KVCache:
    """Row `row` of a cache as a batch-1 cache of `length` positions (its first `length`
    positions; a sliding layer's ring is cut only when nothing past `length` was written)."""
    def cut(layer: int, a: jax.Array) -> jax.Array:
        slots = min(layer_slots(config, layer, length), a.shape[1])
        return jax.lax.dynamic_slice_in_dim(a, row, 1, axis=0)[:, :slots]

    return KVCache(tuple(cut(i, a) for i, a in enumerate(cache.k)), tuple(cut(i, a) for i, a in enumerate(cache.v)),
                   length)


@dataclasses.dataclass
class Needed:
    """A prefix state to compute in this call."""

    tokens: Tuple[int, ...]
    scores: bool  # some row needs its tokens' log-probs
    base: Optional[PrefixEntry] = None


class PrefixPasses:
    """Prefix-sharing passes of one Generator (see the module docstring): its model `config`,
    pass `plan` and cache `dtype`, over the prefix cache `prefixes`."""

    def __init__(self, config, plan: PassPlan, dtype, prefixes: PrefixCache):
        self.config = config
        self.plan = plan
        self.dtype = dtype
        self.prefixes = prefixes

    # ------------------------------------------------------------------ choosing
    def choose(self, device: str, rows: List[Sequence[int]], offsets: List[int]):
        """Per row (tokens its pass feeds; offsets[i]: its first scored values it does not need,
        NO_SCORES for none) its prefix: (length, cached entry or None when the state is among the
        returned `needed` ones), or None (no shared prefix). Returns (chosen, needed by tokens)."""
        block = self.prefixes.block
        keys = [self.prefixes.keys(x) for x in rows]
        counts = collections.Counter(k for ks in keys for k in set(ks))
        chosen: List[Optional[Tuple[int, Optional[PrefixEntry]]]] = []
        needed: Dict[Tuple[int, ...], Needed] = {}
        for x, ks, offset in zip(rows, keys, offsets):
            shared = next((n for n in range(len(ks), 0, -1) if counts[ks[n - 1]] >= 2), 0) * block
            entry = self.cached(device, x, len(x), offset, ks)
            cached = entry.length if entry is not None else 0
            if shared > cached:
                tokens = tuple(x[:shared])
                need = needed.setdefault(tokens, Needed(tokens, False, entry))
                need.scores |= offset < shared - 1
                chosen.append((shared, None))
            elif cached:
                chosen.append((cached, entry))
            else:
                chosen.append(None)
        # Every row but the first of each new prefix state starts from tokens it does not compute.
        self.prefixes.reused(sum(c[0] for c in chosen if c is not None) - sum(len(t) for t in needed))
        return chosen, needed

    def cached(self, device: str, tokens: Sequence[int], limit: int, offset: int,
               keys: Optional[List[int]] = None) -> Optional[PrefixEntry]:
        """The longest cached prefix of tokens (<= limit) usable by a row with this offset."""
        entry = self.prefixes.longest(device, tokens, limit, keys=keys)
        if entry is not None and not entry.has_scores and offset < entry.length - 1:
            entry = self.prefixes.longest(device, tokens, limit, need_scores=True, keys=keys)
        return entry

    # ------------------------------------------------------------------ prefix states
    def make(self, replica, needed: List[Needed]) -> Dict[Tuple[int, ...], PrefixEntry]:
        """Computes the needed prefix states (shorter ones that several of them share first),
        stores them in the cache and returns them by tokens."""
        if not needed:
            return {}
        block = self.prefixes.block
        keys = [self.prefixes.keys(n.tokens) for n in needed]
        counts = collections.Counter(k for ks in keys for k in set(ks[:-1]))
        inner: Dict[Tuple[int, ...], Needed] = {}
        for n, ks in zip(needed, keys):
            shared = next((m for m in range(len(ks) - 1, 0, -1) if counts[ks[m - 1]] >= 2), 0) * block
            if shared > (n.base.length if n.base is not None else 0):
                tokens = n.tokens[:shared]
                base = self.prefixes.longest(replica.name, tokens, shared - 1, need_scores=n.scores)
                part = inner.setdefault(tokens, Needed(tokens, False, base))
                part.scores |= n.scores
        made = self.make(replica, list(inner.values()))
        for n in needed:
            best = max((e for t, e in made.items() if n.tokens[:len(t)] == t), key=lambda e: e.length, default=None)
            if best is not None and (n.base is None or best.length > n.base.length):
                n.base = best
            if n.scores and n.base is not None and not n.base.has_scores:
                n.base = None
        starts = [max(n.base.length - 1, 0) if n.base is not None else 0 for n in needed]
        tokens = [list(n.tokens[s:]) for n, s in zip(needed, starts)]
        targets = [list(n.tokens[s + 1:]) + [0] for n, s in zip(needed, starts)]
        scores = any(n.scores for n in needed)
        log_probs, flags, cache = self.extend(replica, [n.base for n in needed], starts, tokens, targets, scores,
                                              scores)
        for j, (n, s) in enumerate(zip(needed, starts)):
            length = len(n.tokens)
            state = row_prefix(cache, on_device_int32(j), config=self.config, length=bucket(length, minimum=64))
            lp = fl = None
            if scores and (n.base is None or n.base.has_scores):
                count = length - 1 - s
                lp = np.concatenate([n.base.log_probs[:s] if n.base is not None else np.zeros((0,), np.float32),
                                     log_probs[j, :count]]).astype(np.float32)
                fl = np.concatenate([n.base.greedy[:s] if n.base is not None else np.zeros((0,), bool),
                                     flags[j, :count]])
            made[n.tokens] = self.prefixes.put(PrefixEntry(replica.name, n.tokens, state, lp, fl))
        return made

    # ------------------------------------------------------------------ passes
    def extend(self, replica, bases: List[Optional[PrefixEntry]], starts: List[int], tokens: List[List[int]],
               targets: List[List[int]], greedy: bool, scores: bool, batch: Optional[int] = None,
               length: Optional[int] = None, score_from: Optional[List[int]] = None):
        """One pass: row r starts from bases[r]'s state (None: nothing) and feeds tokens[r] at
        positions starts[r]..., scoring targets[r] (with `scores`; only from its column
        score_from[r] on when given: the values before are NaN). Rows are padded to `batch`
        (default: bucketed) in a cache of `length` positions (default: what the rows need,
        bucketed). Returns (log-probs [B, W], flags [B, W] or None, the cache)."""
        n = len(tokens)
        b = batch or bucket(n, minimum=1)
        t = score_width(max([len(x) for x in tokens] + [1]), self.plan.chunk)
        need = max(s + len(x) for s, x in zip(starts, tokens))
        length = length or bucket(need, minimum=64)
        if length < need:
            raise ValueError(f"a cache of {length} positions cannot hold {need}")
        tok = np.zeros((b, t), np.int32)
        tgt = np.zeros((b, t), np.int32)
        pos = np.full((b, t), -1, np.int32)
        pos[n:, 0] = 0  # padding rows: one dummy token at position 0
        for r, (s, x, y) in enumerate(zip(starts, tokens, targets)):
            tok[r, :len(x)] = x
            tgt[r, :len(y)] = y
            pos[r, :len(x)] = s + np.arange(len(x))
        cache = self.gather(bases, b, length)
        count = 0
        if scores and score_from is not None and t <= self.plan.chunk:
            count = bucket(max(len(x) - f for x, f in zip(tokens, score_from)), minimum=8)
            count = count if count < t else 0
        first = np.zeros((b,), np.int32)
        if count:
            first[:n] = score_from
        out, cache = extend_log_probs(replica.params, cache, on_device(tok), on_device(pos), on_device(tgt),
                                      on_device(first), config=self.config, chunk=self.plan.chunk,
                                      impl=self.plan.impl, greedy=bool(greedy and scores), scores=bool(scores),
                                      score_count=count)
        if not scores:
            return None, None, cache
        log_probs, flags = (np.asarray(out[0]), np.asarray(out[1])) if greedy else (np.asarray(out), None)
        if count:  # [B, K] from each row's first scored column -> [B, T], NaN (flags False) before
            wide = np.full((b, t), np.nan, np.float32)
            wide_flags = np.zeros((b, t), bool)
            for r in range(n):
                m = min(count, t - first[r])
                wide[r, first[r]:first[r] + m] = log_probs[r, :m]
                if greedy:
                    wide_flags[r, first[r]:first[r] + m] = flags[r, :m]
            log_probs, flags = wide, wide_flags if greedy else None
        return log_probs, flags, cache

    def gather(self, bases: List[Optional[PrefixEntry]], batch: int, length: int) -> KVCache:
        """A cache of `batch` rows x `length` positions, row r holding bases[r]'s state."""
        if all(e is None for e in bases):
            return init_cache(self.config, batch, length, self.dtype)
        distinct: Dict[int, int] = {}
        caches: List[KVCache] = []
        for e in bases:
            if e is not None and id(e) not in distinct:
                distinct[id(e)] = len(caches)
                caches.append(e.cache)
        common = max(c.length for c in caches)
        caches = [c if c.length == common else start_cache(c, config=self.config, batch=1, length=common)
                  for c in caches]
        blank = None
        if any(e is None for e in bases):
            blank = len(caches)
            caches.append(init_cache(self.config, 1, common, self.dtype))
        index = [distinct[id(e)] if e is not None else blank for e in bases] + [0] * (batch - len(bases))
        caches += [caches[0]] * (bucket(len(caches), minimum=1) - len(caches))
        return gather_prefixes(tuple(caches), on_device(np.array(index, np.int32)), config=self.config,
                               length=length)

    # ------------------------------------------------------------------ generation
    def prefill(self, replica, static: Optional[PrefixEntry], rows: List[List[int]], batch: int,
                length: int) -> Optional[KVCache]:
        """A generation loop's cache of `batch` rows x `length` positions holding each row's
        tokens `rows[i]` (static prompt + prompt but its last token), computed from shared
        prefixes; None when no row has a shared prefix past the static prompt `static` (its
        entry, or None without one): the caller prefills as usual then."""
        floor = static.length if static is not None else 0
        chosen, needed = self.choose(replica.name, rows, [NO_SCORES] * len(rows))
        if not any(c is not None and c[0] > floor for c in chosen):
            return None
        made = self.make(replica, list(needed.values()))
        bases = []
        for x, c in zip(rows, chosen):
            if c is None or c[0] <= floor:
                bases.append(static)
            else:
                bases.append(c[1] or made[tuple(x[:c[0]])])
        starts = [e.length if e is not None else 0 for e in bases]
        _, _, cache = self.extend(replica, bases, starts, [x[s:] for x, s in zip(rows, starts)],
                                  [[] for _ in rows], False, False, batch=batch, length=length)
        return cache
