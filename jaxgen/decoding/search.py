"""Greedy search and random sampling as a `lax.while_loop` over one-token decoder steps.

The loop state lives on device; the host only sets options (traced arrays) and, for streaming,
callbacks or the slot scheduler, runs the loop a bounded number of steps at a time (`until`,
`stop_done`), reading tokens between chunks. Every row keeps its own step count (`gen_len`), its
own position and its own sampling key, so a row may start in a slot at any loop step (the
scheduler refills finished slots, see `insert_rows`). Shapes: B rows, N output slots, V vocabulary.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxgen.decoding.constrain import allowed_tokens
from jaxgen.decoding.processors import History, ProcessorOptions, append_history
from jaxgen.decoding.sampling import SamplingOptions, greedy, sample, split_rows
from jaxgen.decoding.step import next_logits
from jaxgen.decoding.stops import StopStrings, advance, completed
from jaxgen.executables import cached_jit
from jaxgen.model.config import ModelConfig
from jaxgen.model.decoder import KVCache, forward, init_cache


class LoopSpec(NamedTuple):
    """Static (compile-time) choices of the loop; everything else is traced."""

    config: ModelConfig
    sampling: bool  # False: argmax
    k_static: int  # candidates kept by lax.top_k when sampling
    return_logits: bool  # keep every step's processed logits
    attend_len: Optional[int] = None  # decode reads cache slots [0, attend_len) (see live_length)
    processors: tuple = ()  # user logits processors (jaxgen.decoding.custom), in order
    constraint_words: int = 0  # > 0: rows may be constrained, masks of this many int32 words (constrain.py)


class DecodeConsts(NamedTuple):
    proc: ProcessorOptions
    samp: SamplingOptions
    max_new: jax.Array  # [B] int32: tokens a row may generate
    min_new: jax.Array  # [B] int32: end ids are forbidden while the row has generated fewer
    stops: StopStrings  # stop strings: a row ends at the token that completes one (kept in its output)


class DecodeState(NamedTuple):
    """The loop state. Every field but `step` is batch-major (axis 0 = row, pytrees included), so
    the row operations (`map_rows`; `jaxgen.decoding.slots`: insert, keep, grow) are written once
    over the fields: a new per-row feature adds a field here and in `blank_state`, and moves with
    its row. The prompt-lookup loop carries the same state (`speculative.LookupState`)."""

    step: jax.Array  # [] int32 loop iterations run
    last_token: jax.Array  # [B] token fed at the next step
    position: jax.Array  # [B] its absolute position (frozen once the row is done)
    done: jax.Array  # [B] bool
    out_tokens: jax.Array  # [B, N] int32: row i's t-th generated token at [i, t]
    out_log_probs: jax.Array  # [B, N] float32 (log p of each chosen token, temperature 1)
    gen_len: jax.Array  # [B] int32 tokens produced (end token included)
    history: History
    cache: KVCache
    key: jax.Array  # [B, 2] uint32: each row's sampling key (see sampling.row_keys)
    logits: jax.Array  # [B, N, V] float32 when spec.return_logits, else [B, 0, V]
    stop: jax.Array  # [B, S] int32 progress on each stop string (jaxgen.decoding.stops)
    constraint: jax.Array  # [B] int32 the row's matcher handle (jaxgen.runtime.matchers), -1: free row


@cached_jit(static_argnames=("config", "batch", "length"))
def start_cache(prefix: KVCache, *, config: ModelConfig, batch: int, length: int) -> KVCache:
    """A cache of `length` positions per row whose first positions hold a batch-1 `prefix` (tiled).

    A prefix layer's slots go to the same slots of the new cache: full layers index by position,
    and a sliding layer's ring is either the same size or (prefix shorter than the window)
    indexed by position too.
    """
    cache = init_cache(config, batch, length, prefix.dtype)
    if prefix.length == 0:
        return cache

    def place(dst: jax.Array, src: jax.Array) -> jax.Array:
        # A prefix cache padded past `length` holds only padding there (its positions are < length).
        src = src[:, :dst.shape[1]]
        return dst.at[:, :src.shape[1]].set(jnp.broadcast_to(src, (batch,) + src.shape[1:]))

    return KVCache(tuple(place(d, s) for d, s in zip(cache.k, prefix.k)),
                   tuple(place(d, s) for d, s in zip(cache.v, prefix.v)), length)


@cached_jit(static_argnames=("config", "length"))
def gather_prefixes(prefixes: tuple, index: jax.Array, *, config: ModelConfig, length: int) -> KVCache:
    """A cache of `length` positions for rows [B] whose row b starts with prefixes[index[b]]:
    prefixes is a tuple of batch-1 caches of one length (see start_cache for how a prefix's slots
    map to the new cache's, rings included)."""
    batch = index.shape[0]
    cache = init_cache(config, batch, length, prefixes[0].dtype)

    def place(dst: jax.Array, srcs) -> jax.Array:
        src = jnp.concatenate(srcs, axis=0)[:, :dst.shape[1]]
        return dst.at[:, :src.shape[1]].set(jnp.take(src, index, axis=0))

    return KVCache(tuple(place(d, [p.k[i] for p in prefixes]) for i, d in enumerate(cache.k)),
                   tuple(place(d, [p.v[i] for p in prefixes]) for i, d in enumerate(cache.v)), length)


@cached_jit(static_argnames=("config", "impl", "fresh"), donate_argnums=(1,))
def prefill(params: dict, cache: KVCache, tokens: jax.Array, positions: jax.Array, write_index: jax.Array,
            *, config: ModelConfig, impl: str = "flash", fresh: bool = False) -> KVCache:
    """Writes the keys/values of a chunk of tokens [B, T] (positions -1 = padding) at positions
    [write_index, write_index + T). fresh: the chunk starts the cache (write_index 0)."""
    _, cache = forward(params, config, tokens, positions, cache, write_index, impl=impl, fresh=fresh)
    return cache


LIVE_SLOT_ROWS = 2048  # the first live bound: about this many cache slots x batch rows per layer


def live_length(needed: int, length: int, rows: int = 1, minimum: Optional[int] = None) -> int:
    """Static bound on the cache slots decode reads while positions stay below `needed`: a
    power of two >= needed, capped by the cache `length`, and at least `minimum`, by default
    512 / 256 / 128 for a batch of up to 4 / 8 / more `rows`. Every bound is one more compiled
    loop; a large batch reads `rows` x bound slots per layer per step (at batch 16 a 512-slot
    bound read 4x the float32 keys and values of 128), so it starts lower."""
    if minimum is None:
        minimum = max(128, min(512, LIVE_SLOT_ROWS // max(rows, 1)))
    size = 1 << (max(minimum, 1) - 1).bit_length()
    while size < needed:
        size *= 2
    return min(size, length)


ROW_FIELDS = tuple(f for f in DecodeState._fields if f != "step")


def map_rows(fn: Callable[[jax.Array], jax.Array], state: DecodeState) -> DecodeState:
    """fn applied to every batch-major array of the state (the rows' axis is axis 0)."""
    return state._replace(**{f: jax.tree_util.tree_map(fn, getattr(state, f)) for f in ROW_FIELDS})


def zip_rows(fn: Callable[[jax.Array, jax.Array], jax.Array], state: DecodeState, other: DecodeState) -> DecodeState:
    """fn(a, b) over the matching batch-major arrays of two states (state's `step` is kept). The
    result keeps `state`'s static metadata (a cache's length) where the two differ."""
    def zipped(a, b):
        leaves, treedef = jax.tree_util.tree_flatten(a)
        return jax.tree_util.tree_unflatten(treedef, [fn(x, y) for x, y in zip(leaves, jax.tree_util.tree_leaves(b))])

    return state._replace(**{f: zipped(getattr(state, f), getattr(other, f)) for f in ROW_FIELDS})


def blank_state(config: ModelConfig, *, batch: int, length: int, n_out: int, hist_len: int, cache_dtype,
                logits_steps: int, stop_count: int) -> DecodeState:
    """A state of `batch` free rows (done) with `length` cache positions, `n_out` output slots,
    `hist_len` history tokens, `logits_steps` stored logits and `stop_count` stop strings per row
    (traceable: shapes static)."""
    zeros = lambda shape, dtype: jnp.zeros(shape, dtype)  # noqa: E731
    return DecodeState(
        step=jnp.int32(0), last_token=zeros((batch,), jnp.int32), position=zeros((batch,), jnp.int32),
        done=jnp.ones((batch,), bool), out_tokens=zeros((batch, n_out), jnp.int32),
        out_log_probs=zeros((batch, n_out), jnp.float32), gen_len=zeros((batch,), jnp.int32),
        history=History(zeros((batch, hist_len), jnp.int32), zeros((batch,), jnp.int32),
                        zeros((batch, config.vocab_size), bool)),
        cache=init_cache(config, batch, length, cache_dtype), key=zeros((batch, 2), jnp.uint32),
        logits=zeros((batch, logits_steps, config.vocab_size), jnp.float32),
        stop=zeros((batch, stop_count), jnp.int32), constraint=jnp.full((batch,), -1, jnp.int32))


def _step(params: dict, state: DecodeState, consts: DecodeConsts, spec: LoopSpec) -> DecodeState:
    allowed = None
    if spec.constraint_words:
        handles = jnp.where(state.done, -1, state.constraint)
        allowed = allowed_tokens(handles, handles, state.last_token, state.gen_len, spec.constraint_words)
    processed, cache = next_logits(params, spec.config, state.last_token, state.position, state.cache,
                                   state.history, consts.proc, state.gen_len < consts.min_new,
                                   attend_len=spec.attend_len, processors=spec.processors,
                                   outputs=(state.out_tokens, state.gen_len), step=state.step, allowed=allowed)
    key, draw_keys = split_rows(state.key)
    if spec.sampling:
        log_probs = jax.nn.log_softmax(processed, axis=-1)
        token = sample(draw_keys, log_probs, consts.samp, spec.k_static)
    else:
        token = greedy(processed)
    active = ~state.done
    token = jnp.where(active, token, 0)
    if spec.sampling:
        chosen_log_prob = jnp.take_along_axis(log_probs, token[:, None], axis=1)[:, 0]
    else:
        # greedy needs only the chosen token's log-prob: logit - logsumexp, two passes over the
        # [batch, vocab] logits instead of a materialized log_softmax (a large share of a 16-row step)
        chosen_log_prob = (jnp.take_along_axis(processed, token[:, None], axis=1)[:, 0]
                           - jax.nn.logsumexp(processed, axis=-1))
    rows = jnp.arange(token.shape[0])
    column = jnp.where(active, state.gen_len, state.out_tokens.shape[1])  # done rows: out of bounds, dropped
    out_tokens = state.out_tokens.at[rows, column].set(token, mode="drop")
    out_log_probs = state.out_log_probs.at[rows, column].set(chosen_log_prob, mode="drop")
    out_logits = state.logits.at[rows, column].set(processed, mode="drop") if spec.return_logits else state.logits
    is_end = jnp.any(token[:, None] == consts.proc.end_ids[None, :], axis=-1)
    stop = jnp.where(active[:, None], advance(consts.stops, state.stop, token), state.stop)
    finished = active & (is_end | completed(consts.stops, stop) | (state.gen_len + 1 >= consts.max_new))
    return DecodeState(
        step=state.step + 1,
        last_token=token,
        position=state.position + active.astype(jnp.int32),
        done=state.done | finished,
        out_tokens=out_tokens,
        out_log_probs=out_log_probs,
        gen_len=state.gen_len + active.astype(jnp.int32),
        history=append_history(state.history, token, active),
        cache=cache,
        key=key,
        logits=out_logits,
        stop=stop,
        constraint=state.constraint,
    )


@cached_jit(static_argnames=("spec",), donate_argnums=(1,))
def decode(params: dict, state: DecodeState, consts: DecodeConsts, until: jax.Array, stop_done: jax.Array, *,
           spec: LoopSpec) -> DecodeState:
    """Runs decoder steps while step < until, some row is not done, fewer than `stop_done` rows
    are done (the scheduler refills them) and every running row's position is below
    spec.attend_len (the host then continues with a larger bound)."""
    def cond(s: DecodeState):
        done = jnp.sum(s.done.astype(jnp.int32))
        go = (s.step < until) & (done < jnp.minimum(stop_done, s.done.shape[0]))
        if spec.attend_len is not None:
            go = go & (jnp.max(jnp.where(s.done, 0, s.position)) < spec.attend_len)
        return go

    return jax.lax.while_loop(cond, lambda s: _step(params, s, consts, spec), state)


def set_done(state: DecodeState, done) -> DecodeState:
    """Marks rows finished from the host (callbacks that returned True)."""
    return state._replace(done=state.done | jnp.asarray(done))
