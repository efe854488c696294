"""score_batch's work on one device: per-token log-likelihoods of sequences, with shared prefixes
computed once.

Without sharing, the rows run one full chunked pass (`jaxgen.decoding.scoring.target_log_probs`).
With a prefix cache (`jaxgen.runtime.prefix_cache`), each row is split at a block boundary E:
- E is the longest whole-block prefix of the row's inputs (the sequence less its last token)
  that is cached on the device, or that another row of the same call shares (then its state is
  computed once, itself from the longest shorter prefix that is cached or shared by several of
  the new prefixes: a few-shot context first, then each question after it);
- the prefix states are tiled into the rows (`gather_prefixes`) and only the rest of each row
  runs (`extend_log_probs`), from position E - 1 (its token is fed again, so that the
  log-probability of token E is computed with the row's own next token).
A prefix state holds the log-probabilities of its own tokens when some row needs them (a row's
`offset` below E - 1); otherwise it is a plain prefill, without the vocabulary head.

Results equal the unshared pass's within float rounding (the same math in other batch shapes).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.decoding.scoring import SCORE_CHUNK, extend_log_probs, target_log_probs
from jaxgen.decoding.search import gather_prefixes, start_cache
from jaxgen.executables import cached_jit
from jaxgen.model.decoder import KVCache, PassPlan, init_cache, layer_slots
from jaxgen.runtime.batching import bucket, pass_width
from jaxgen.runtime.prefix_cache import PrefixCache, PrefixEntry


def truncate_for_scoring(ids: List[int], max_input_length: int, eos_ids: Sequence[int]) -> List[int]:
    """CTranslate2's truncation: keep the first ids, but keep a final EOS as the last element."""
    if max_input_length <= 0 or len(ids) <= max_input_length or len(ids) < 2:
        return ids
    out = ids[:max_input_length]
    if ids[-1] in eos_ids:
        out[-1] = ids[-1]
    return out


def pad_rows(seqs: List[List[int]], lens: List[int], t: int, b: int) -> Tuple[jax.Array, jax.Array]:
    """Right-padded int32 [b, t] rows and their lengths [b] (padding rows: one dummy token)."""
    arr = np.zeros((b, t), np.int32)
    for i, s in enumerate(seqs):
        arr[i, :len(s)] = s
    lengths = np.zeros((b,), np.int32)
    lengths[:len(lens)] = lens
    lengths[len(lens):] = 1
    return jnp.asarray(arr), jnp.asarray(lengths)


def score_width(longest: int, chunk: int) -> int:
    """Padded positions of a scoring pass over rows of up to `longest` tokens."""
    t = max(bucket(longest), SCORE_CHUNK)
    return pass_width(-(-t // SCORE_CHUNK) * SCORE_CHUNK, chunk)


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
class _Needed:
    """A prefix state to compute in this call."""

    tokens: Tuple[int, ...]
    scores: bool  # some row needs its tokens' log-probs
    base: Optional[PrefixEntry] = None


class Scorer:
    """Scores rows on one replica (see the module docstring). prefixes: the Generator's prefix
    cache; share: use it for scoring (False: every row runs the unshared pass)."""

    def __init__(self, config, plan: PassPlan, dtype, prefixes: PrefixCache, share: bool):
        self.config = config
        self.plan = plan
        self.dtype = dtype
        self.prefixes = prefixes
        self.share = share

    # ------------------------------------------------------------------ entry point
    def score(self, replica, seqs: List[List[int]], greedy: bool = False,
              offsets: Optional[List[int]] = None) -> List[Tuple[list, list]]:
        """Per sequence (>= 2 tokens): (log-probs of its tokens but the first, and with `greedy`
        whether each is the most likely token there, else []). offsets[i]: the first offsets[i]
        values are not used by the caller (they may be NaN when a prefix state lacks them)."""
        offsets = [0] * len(seqs) if offsets is None else offsets
        if not self.share:
            return self._plain(replica, seqs, greedy)
        block = self.prefixes.block
        inputs = [s[:-1] for s in seqs]
        keys = [self.prefixes.keys(x) for x in inputs]
        counts = collections.Counter(k for ks in keys for k in set(ks))
        chosen: List[Optional[Tuple[int, Optional[PrefixEntry]]]] = []
        needed: Dict[Tuple[int, ...], _Needed] = {}
        for i, x in enumerate(inputs):
            shared = next((n for n in range(len(keys[i]), 0, -1) if counts[keys[i][n - 1]] >= 2), 0) * block
            entry = self._cached(replica.name, x, len(x), offsets[i], keys[i])
            cached = entry.length if entry is not None else 0
            if shared > cached:
                tokens = tuple(x[:shared])
                need = needed.setdefault(tokens, _Needed(tokens, False, entry))
                need.scores |= offsets[i] < shared - 1
                chosen.append((shared, None))
            elif cached:
                chosen.append((cached, entry))
            else:
                chosen.append(None)
        made = self._make(replica, list(needed.values()))
        rows = [i for i, c in enumerate(chosen) if c is not None]
        out: List[Optional[Tuple[list, list]]] = [None] * len(seqs)
        plain = [i for i, c in enumerate(chosen) if c is None]
        if plain:
            for i, r in zip(plain, self._plain(replica, [seqs[i] for i in plain], greedy)):
                out[i] = r
        if rows:
            entries = [chosen[i][1] or made[tuple(inputs[i][:chosen[i][0]])] for i in rows]
            starts = [e.length - 1 for e in entries]
            tokens = [inputs[i][s:] for i, s in zip(rows, starts)]
            targets = [seqs[i][s + 1:] for i, s in zip(rows, starts)]
            log_probs, flags, _ = self._extend(replica, entries, starts, tokens, targets, greedy, True)
            for j, (i, e) in enumerate(zip(rows, entries)):
                n = len(tokens[j])
                head = (e.log_probs[:e.length - 1] if e.has_scores
                        else np.full((e.length - 1,), np.nan, np.float32))
                lp = np.concatenate([head, log_probs[j, :n]]).astype(np.float32).tolist()
                if greedy:
                    head_flags = e.greedy[:e.length - 1] if e.has_scores else np.zeros((e.length - 1,), bool)
                    fl = np.concatenate([head_flags, flags[j, :n]]).tolist()
                else:
                    fl = []
                out[i] = (lp, fl)
        return out

    def _cached(self, device: str, tokens: Sequence[int], limit: int, offset: int,
                keys: List[int]) -> Optional[PrefixEntry]:
        """The longest cached prefix of tokens (<= limit) usable for a row with this offset."""
        entry = self.prefixes.longest(device, tokens, limit, keys=keys)
        if entry is not None and not entry.has_scores and offset < entry.length - 1:
            entry = self.prefixes.longest(device, tokens, limit, need_scores=True, keys=keys)
        return entry

    # ------------------------------------------------------------------ prefix states
    def _make(self, replica, needed: List[_Needed]) -> Dict[Tuple[int, ...], PrefixEntry]:
        """Computes the needed prefix states (shorter ones that several of them share first),
        stores them in the cache and returns them by tokens."""
        if not needed:
            return {}
        block = self.prefixes.block
        keys = [self.prefixes.keys(n.tokens) for n in needed]
        counts = collections.Counter(k for ks in keys for k in set(ks[:-1]))
        inner: Dict[Tuple[int, ...], _Needed] = {}
        for n, ks in zip(needed, keys):
            shared = next((m for m in range(len(ks) - 1, 0, -1) if counts[ks[m - 1]] >= 2), 0) * block
            if shared > (n.base.length if n.base is not None else 0):
                tokens = n.tokens[:shared]
                base = self.prefixes.longest(replica.name, tokens, shared - 1, need_scores=n.scores)
                part = inner.setdefault(tokens, _Needed(tokens, False, base))
                part.scores |= n.scores
        made = self._make(replica, list(inner.values()))
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
        log_probs, flags, cache = self._extend(replica, [n.base for n in needed], starts, tokens, targets, scores,
                                               scores)
        for j, (n, s) in enumerate(zip(needed, starts)):
            length = len(n.tokens)
            state = row_prefix(cache, jnp.int32(j), config=self.config, length=bucket(length, minimum=64))
            lp = fl = None
            if scores:
                count = length - 1 - (n.base.length - 1 if n.base is not None else 0)
                base_lp = n.base.log_probs[:max(s, 0)] if n.base is not None and n.base.has_scores else None
                base_fl = n.base.greedy[:max(s, 0)] if n.base is not None and n.base.has_scores else None
                if n.base is None or base_lp is not None:
                    lp = np.concatenate([base_lp if base_lp is not None else np.zeros((0,), np.float32),
                                         log_probs[j, :count]]).astype(np.float32)
                    fl = np.concatenate([base_fl if base_fl is not None else np.zeros((0,), bool),
                                         flags[j, :count]])
            made[n.tokens] = self.prefixes.put(PrefixEntry(replica.name, n.tokens, state, lp, fl))
        return made

    # ------------------------------------------------------------------ passes
    def _extend(self, replica, bases: List[Optional[PrefixEntry]], starts: List[int], tokens: List[List[int]],
                targets: List[List[int]], greedy: bool, scores: bool):
        """One pass: row r starts from bases[r]'s state (None: nothing) and feeds tokens[r] at
        positions starts[r]..., scoring targets[r]. Returns (log-probs [B, W], flags [B, W] or
        None, the cache)."""
        n = len(tokens)
        b = bucket(n, minimum=1)
        t = score_width(max(len(x) for x in tokens), self.plan.chunk)
        length = bucket(max(s + len(x) for s, x in zip(starts, tokens)), minimum=64)
        tok = np.zeros((b, t), np.int32)
        tgt = np.zeros((b, t), np.int32)
        pos = np.full((b, t), -1, np.int32)
        pos[n:, 0] = 0  # padding rows: one dummy token at position 0
        for r, (s, x, y) in enumerate(zip(starts, tokens, targets)):
            tok[r, :len(x)] = x
            tgt[r, :len(y)] = y
            pos[r, :len(x)] = s + np.arange(len(x))
        cache = self._gather(bases, b, length)
        out, cache = extend_log_probs(replica.params, cache, jnp.asarray(tok), jnp.asarray(pos), jnp.asarray(tgt),
                                      config=self.config, chunk=self.plan.chunk, impl=self.plan.impl,
                                      greedy=bool(greedy and scores), scores=bool(scores))
        if greedy and scores:
            return np.asarray(out[0]), np.asarray(out[1]), cache
        return np.asarray(out), None, cache

    def _gather(self, bases: List[Optional[PrefixEntry]], batch: int, length: int) -> KVCache:
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
        return gather_prefixes(tuple(caches), jnp.asarray(np.array(index, np.int32)), config=self.config,
                               length=length)

    def _plain(self, replica, seqs: List[List[int]], greedy: bool) -> List[Tuple[list, list]]:
        """The unshared pass over whole sequences."""
        inputs = [s[:-1] for s in seqs]
        targets = [s[1:] for s in seqs]
        lens = [len(s) for s in inputs]
        t = score_width(max(lens), self.plan.chunk)
        b = bucket(len(seqs), minimum=1)
        inp, lengths = pad_rows(inputs, lens, t, b)
        tgt, _ = pad_rows(targets, lens, t, b)
        out = target_log_probs(replica.params, inp, tgt, lengths, config=self.config, dtype=self.dtype,
                               chunk=self.plan.chunk, impl=self.plan.impl, **({"greedy": True} if greedy else {}))
        out, flags = (np.asarray(out[0]), np.asarray(out[1])) if greedy else (np.asarray(out), None)
        return [(out[i, :n].astype(np.float32).tolist(), flags[i, :n].tolist() if greedy else [])
                for i, n in enumerate(lens)]
