"""Device side of the slot scheduler (`jaxgen.runtime.scheduler`): put freshly prefilled rows into free
slots of a running greedy/sampling loop state, grow the state's capacity, and shrink it to its
last running rows. Pure and jitted.

A slot is a row of `DecodeState`. Its cache row is indexed by absolute position and attention
masks by position, so a new occupant needs no clearing: the rows it inherits are either
overwritten (its prompt, then each decoded token before it is read) or never visible.
Shapes: B slots, n new rows, S_i cache slots of layer i, N output slots, H history, V vocabulary.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jaxgen.decoding.processors import History
from jaxgen.decoding.search import DecodeState
from jaxgen.model.config import ModelConfig
from jaxgen.model.decoder import KVCache, layer_slots


@partial(jax.jit, donate_argnums=(0,))
def insert_rows(state: DecodeState, slots: jax.Array, cache: KVCache, history: History, last_token: jax.Array,
                position: jax.Array, keys: jax.Array) -> DecodeState:
    """Starts n prefilled rows in the given slots.

    slots [n] int32 (B marks a padding row: dropped); cache: n rows of the same length as the
    state's (see generation.prefill_rows); history: n rows [n, H]; last_token / position [n]:
    each row's last prompt token and its position; keys [n, 2]: each row's sampling key.
    """
    def put(dst: jax.Array, src: jax.Array) -> jax.Array:
        return dst.at[slots].set(src.astype(dst.dtype), mode="drop")

    n = slots.shape[0]
    return state._replace(
        last_token=put(state.last_token, last_token),
        position=put(state.position, position),
        done=put(state.done, jnp.zeros((n,), bool)),
        gen_len=put(state.gen_len, jnp.zeros((n,), jnp.int32)),
        history=History(*(put(d, s) for d, s in zip(state.history, history))),
        cache=KVCache(tuple(put(d, s) for d, s in zip(state.cache.k, cache.k)),
                      tuple(put(d, s) for d, s in zip(state.cache.v, cache.v)), state.cache.length),
        key=put(state.key, keys),
    )


@jax.jit
def keep_rows(state: DecodeState, rows: jax.Array) -> DecodeState:
    """The state of the slots `rows` [n] only (in that order): a smaller batch for the last
    running rows, whose steps then cost less. Every field but `step` is batch-major."""
    def take(a: jax.Array) -> jax.Array:
        return jnp.take(a, rows, axis=0)

    cache = state.cache
    return DecodeState(
        step=state.step, last_token=take(state.last_token), position=take(state.position), done=take(state.done),
        out_tokens=take(state.out_tokens), out_log_probs=take(state.out_log_probs), gen_len=take(state.gen_len),
        history=History(*(take(a) for a in state.history)),
        cache=KVCache(tuple(take(a) for a in cache.k), tuple(take(a) for a in cache.v), cache.length),
        key=take(state.key), logits=take(state.logits))


def _pad(a: jax.Array, shape, fill) -> jax.Array:
    """a in the leading corner of a `shape` array filled with `fill`."""
    return jnp.full(shape, fill, a.dtype).at[tuple(slice(0, n) for n in a.shape)].set(a)


@partial(jax.jit, static_argnames=("config", "batch", "length", "n_out", "hist_len"))
def grow_state(state: DecodeState, *, config: ModelConfig, batch: int, length: int, n_out: int,
               hist_len: int) -> DecodeState:
    """The same state with room for `batch` slots, `length` cache positions, `n_out` output
    tokens and `hist_len` history tokens per row (each at least the current size). New slots are
    free (done). A cache row grows at its end: full layers index by position, and a sliding
    layer's ring that grows was shorter than its window, so it held every position at its own
    slot, which stays valid in the larger ring."""
    cache = state.cache
    k = tuple(_pad(a, (batch, layer_slots(config, i, length)) + a.shape[2:], 0) for i, a in enumerate(cache.k))
    v = tuple(_pad(a, (batch, layer_slots(config, i, length)) + a.shape[2:], 0) for i, a in enumerate(cache.v))
    hist = state.history
    return DecodeState(
        step=state.step,
        last_token=_pad(state.last_token, (batch,), 0),
        position=_pad(state.position, (batch,), 0),
        done=_pad(state.done, (batch,), True),
        out_tokens=_pad(state.out_tokens, (batch, n_out), 0),
        out_log_probs=_pad(state.out_log_probs, (batch, n_out), 0),
        gen_len=_pad(state.gen_len, (batch,), 0),
        history=History(_pad(hist.tokens, (batch, hist_len), 0), _pad(hist.length, (batch,), 0),
                        _pad(hist.presence, (batch, hist.presence.shape[1]), False)),
        cache=KVCache(k, v, length),
        key=_pad(state.key, (batch, 2), 0),
        logits=_pad(state.logits, (batch,) + state.logits.shape[1:], 0),
    )
