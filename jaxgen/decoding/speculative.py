"""Prompt-lookup speculative decoding: greedy search that emits several tokens per decoder pass.

Each loop iteration, every row drafts up to K tokens by copying what followed the latest earlier
occurrence of its text's last n-gram (n = LookupSpec.max_ngram down to min_ngram) in its context
(static prompt + prompt + tokens generated so far), then runs ONE decoder pass over
[last token, draft_1 .. draft_K] at the row's own positions (the cache is indexed by position:
each token's keys/values go to the slot of its position). Position j's processed logits give
greedy's choice after the draft's first j tokens; the row keeps the longest prefix of the draft
that agrees with those choices, plus the model's own next token. So the output is exactly greedy
search's (the same processors, per position, with the history extended by the draft tokens
before it), and every pass emits between 1 and K + 1 tokens per row. Keys/values written for
rejected draft tokens sit at positions past the row's new position: in a cache indexed by
position the next pass overwrites them before any query can see them (a query at position p sees
keys at positions <= p only, and the pass writes every position from the row's position on). A
sliding-window ring, though, recycles the slot of the position `ring` back, which later queries
still see: the slots of rejected tokens get their previous contents back after the pass
(`_restore_rings`), which needs K + 1 <= the ring size (`max_draft`).

When no row has a draft, the iteration runs a plain one-token step instead (`lax.cond`), so text
without repetitions costs about what greedy search costs.
Shapes: B rows, K draft tokens, W = K + 1 verified positions, N output slots, C context, V vocabulary.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from jaxgen.decoding.processors import History, append_history
from jaxgen.decoding.sampling import greedy
from jaxgen.decoding.search import DecodeConsts, DecodeState
from jaxgen.decoding.step import model_logits, process
from jaxgen.decoding.stops import advance, completed
from jaxgen.model.config import ModelConfig
from jaxgen.model.decoder import KVCache, layer_slots


class LookupSpec(NamedTuple):
    """Static choices of the prompt-lookup loop."""

    config: ModelConfig
    draft: int  # K: draft tokens per pass
    max_ngram: int = 3  # longest suffix n-gram looked up
    min_ngram: int = 1  # shortest
    attend_len: Optional[int] = None  # full layers read cache slots [0, attend_len) (see search.live_length)


class LookupState(NamedTuple):
    rows: DecodeState  # the greedy loop's state (its `key` and `logits` are unused here)
    context: jax.Array  # [B, C] int32 static prompt + prompt + generated tokens (last_token last)
    context_len: jax.Array  # [B] int32
    accepted: jax.Array  # [B] int32 draft tokens accepted so far (tokens emitted beyond one per pass)


def max_draft(config: ModelConfig, cache_length: int, requested: int) -> int:
    """Draft tokens per pass for a cache of `cache_length` positions: `requested`, capped so that a
    pass's tokens fit in the smallest sliding-window ring (K + 1 <= ring); 0: no speculation."""
    rings = [layer_slots(config, i, cache_length) for i in range(config.num_layers)
             if config.layer_types and config.layer_types[i] == "sliding"]
    return max(0, min([requested] + [r - 1 for r in rings]))


def _pass_positions(position: jax.Array, width: int) -> jax.Array:
    """position [B] -> [B, W]: the positions a pass of W tokens writes (a ring slot is one mod its size)."""
    return position[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :]


def _save_rings(cache: KVCache, position: jax.Array, width: int):
    """Per layer: None (indexed by position) or the (k, v) contents [B, W, Hkv, hd] of the ring
    slots that positions [position, position + W) will overwrite."""
    rows = jnp.arange(position.shape[0])[:, None]
    saved = []
    for k, v in zip(cache.k, cache.v):
        if k.shape[1] >= cache.length:
            saved.append(None)
            continue
        slots = jnp.mod(_pass_positions(position, width), k.shape[1])
        saved.append((k[rows, slots], v[rows, slots]))
    return saved


def _restore_rings(cache: KVCache, saved, position: jax.Array, keep: jax.Array) -> KVCache:
    """Puts the saved ring contents back in the slots of the positions not kept (keep [B, W] bool)."""
    rows = jnp.arange(position.shape[0])[:, None]
    ks, vs = list(cache.k), list(cache.v)
    for i, old in enumerate(saved):
        if old is None:
            continue
        size = ks[i].shape[1]
        slots = jnp.where(keep, size, jnp.mod(_pass_positions(position, keep.shape[1]), size))  # kept: dropped
        ks[i] = ks[i].at[rows, slots].set(old[0], mode="drop")
        vs[i] = vs[i].at[rows, slots].set(old[1], mode="drop")
    return KVCache(tuple(ks), tuple(vs), cache.length)


def find_draft(context: jax.Array, length: jax.Array, k: int, max_ngram: int,
               min_ngram: int) -> Tuple[jax.Array, jax.Array]:
    """Draft tokens per row: context int32 [B, C] valid up to length [B] -> (draft [B, K] int32,
    draft_len [B] int32, 0 when nothing matched).

    The draft is what followed the latest earlier occurrence of the context's last n tokens
    (the longest n in [min_ngram, max_ngram] that occurs), up to K tokens and the context's end.
    """
    b, c = context.shape
    i = jnp.arange(c)[None, :]
    start = jnp.full((b,), -1, jnp.int32)  # index of the first draft token; -1: none yet
    for n in range(max_ngram, min_ngram - 1, -1):
        # an occurrence at i (i + n <= length - 1, so at least one token follows it, and it is not the suffix)
        ok = (i + n < length[:, None]) & (length[:, None] > n)
        for j in range(n):
            suffix_token = jnp.take_along_axis(context, jnp.clip(length - n + j, 0, c - 1)[:, None], axis=1)
            shifted = jnp.pad(context, ((0, 0), (0, j)), constant_values=-1)[:, j:]  # shifted[:, i] = context[:, i + j]
            ok = ok & (shifted == suffix_token)
        latest = jnp.max(jnp.where(ok, i, -1), axis=1)
        start = jnp.where((start < 0) & (latest >= 0), latest + n, start)
    index = start[:, None] + jnp.arange(k)[None, :]
    draft = jnp.take_along_axis(context, jnp.clip(index, 0, c - 1), axis=1)
    draft_len = jnp.where(start >= 0, jnp.clip(length - start, 0, k), 0).astype(jnp.int32)
    return draft, draft_len


def _verify(params: dict, s: LookupState, consts: DecodeConsts, spec: LookupSpec, draft: jax.Array,
            draft_len: jax.Array, width: int) -> LookupState:
    """One pass over [last token, draft[:, :width - 1]]; emits the agreeing prefix + one token."""
    r = s.rows
    b, n_out = r.out_tokens.shape
    active = ~r.done
    offsets = jnp.arange(width, dtype=jnp.int32)
    fed = jnp.concatenate([r.last_token[:, None], draft[:, :width - 1]], axis=1)  # [B, W]
    positions = r.position[:, None] + offsets[None, :]
    positions = jnp.where(positions < r.cache.length, positions, -1)  # past the cache: padding (never emitted)
    saved = _save_rings(r.cache, r.position, width) if width > 1 else None
    logits, cache = model_logits(params, spec.config, fed, positions, r.cache, spec.attend_len)  # [B, W, V]

    def choose(history: History, j):
        processed = process(logits[:, j], history, consts.proc, r.gen_len + j < consts.min_new)
        token = greedy(processed)
        log_prob = jnp.take_along_axis(jax.nn.log_softmax(processed, axis=-1), token[:, None], axis=1)[:, 0]
        following = jnp.take_along_axis(draft, jnp.minimum(j, draft.shape[1] - 1)[None, None].repeat(b, 0), axis=1)
        return append_history(history, following[:, 0], active), (token, log_prob)

    if width == 1:
        _, (chosen, log_probs) = choose(r.history, jnp.int32(0))
        chosen, log_probs = chosen[:, None], log_probs[:, None]
    else:
        _, (chosen, log_probs) = jax.lax.scan(choose, r.history, offsets)
        chosen, log_probs = chosen.T, log_probs.T  # [B, W]
    agree = (draft[:, :width - 1] == chosen[:, :width - 1]) & (offsets[None, :width - 1] < draft_len[:, None])
    accepted = jnp.sum(jnp.cumprod(agree.astype(jnp.int32), axis=1), axis=1)  # [B] in [0, W - 1]
    is_end = jnp.any(chosen[..., None] == consts.proc.end_ids[None, None, :], axis=-1)  # [B, W]
    progress = [r.stop]  # stop-string progress after each chosen token: a completion ends the row there
    for j in range(width):
        progress.append(advance(consts.stops, progress[-1], chosen[:, j]))
    progress = jnp.stack(progress, axis=1)  # [B, W + 1, S]
    is_end = is_end | completed(consts.stops, progress[:, 1:])
    first_end = jnp.min(jnp.where(is_end, offsets[None, :], width), axis=1)
    emit = jnp.minimum(jnp.minimum(accepted + 1, first_end + 1), consts.max_new - r.gen_len)
    emit = jnp.where(active, jnp.maximum(emit, 0), 0)  # [B] tokens emitted by each row

    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, width))
    keep = offsets[None, :] < emit[:, None]
    column = jnp.where(keep, r.gen_len[:, None] + offsets[None, :], n_out)  # dropped when not kept
    out_tokens = r.out_tokens.at[rows, column].set(chosen, mode="drop")
    out_log_probs = r.out_log_probs.at[rows, column].set(log_probs, mode="drop")
    ctx_column = jnp.where(keep, s.context_len[:, None] + offsets[None, :], s.context.shape[1])
    context = s.context.at[rows, ctx_column].set(chosen, mode="drop")
    if saved is not None:
        cache = _restore_rings(cache, saved, r.position, keep)
    history = r.history
    for j in range(width):
        history = append_history(history, chosen[:, j], keep[:, j])
    last = jnp.take_along_axis(chosen, jnp.maximum(emit - 1, 0)[:, None], axis=1)[:, 0]
    gen_len = r.gen_len + emit
    ended = active & ((first_end < emit) | (gen_len >= consts.max_new))
    rows_state = r._replace(
        step=r.step + 1,
        last_token=jnp.where(emit > 0, last, r.last_token),
        position=r.position + emit,
        done=r.done | ended,
        out_tokens=out_tokens,
        out_log_probs=out_log_probs,
        gen_len=gen_len,
        history=history,
        stop=jnp.take_along_axis(progress, emit[:, None, None], axis=1)[:, 0],
        cache=cache,
    )
    return LookupState(rows=rows_state, context=context, context_len=s.context_len + emit,
                       accepted=s.accepted + jnp.maximum(emit - 1, 0))


def _pass(params: dict, s: LookupState, consts: DecodeConsts, spec: LookupSpec) -> LookupState:
    draft, draft_len = find_draft(s.context, s.context_len, spec.draft, spec.max_ngram, spec.min_ngram)
    draft_len = jnp.where(s.rows.done, 0, draft_len)
    return jax.lax.cond(jnp.any(draft_len > 0),
                        lambda st: _verify(params, st, consts, spec, draft, draft_len, spec.draft + 1),
                        lambda st: _verify(params, st, consts, spec, draft, draft_len, 1), s)


@partial(jax.jit, static_argnames=("spec",), donate_argnums=(1,))
def lookup_decode(params: dict, state: LookupState, consts: DecodeConsts, *, spec: LookupSpec) -> LookupState:
    """Runs passes until every row is done, or (spec.attend_len below the cache length) a
    running row's next pass would reach spec.attend_len (the host then continues with a larger bound)."""
    bounded = spec.attend_len is not None and spec.attend_len < state.rows.cache.length

    def cond(s: LookupState):
        r = s.rows
        go = ~jnp.all(r.done)
        if bounded:
            go = go & (jnp.max(jnp.where(r.done, 0, r.position)) + spec.draft < spec.attend_len)
        return go

    return jax.lax.while_loop(cond, lambda s: _pass(params, s, consts, spec), state)
