"""Device side of the slot scheduler (`jaxgen.runtime.scheduler`): put freshly prefilled rows into free
slots of a running greedy/sampling loop state, grow the state's capacity, and shrink it to its
last running rows. Pure and jitted.

A slot is a row of `DecodeState`. Its cache row is indexed by absolute position and attention
masks by position, so a new occupant needs no clearing: the rows it inherits are either
overwritten (its prompt, then each decoded token before it is read) or never visible.
Each operation is written once over the state's batch-major fields (`search.map_rows`, `zip_rows`),
so a per-row field added to `DecodeState` moves with its row without changes here.
Shapes: B slots, n new rows, S_i cache slots of layer i, N output slots, H history, V vocabulary.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jaxgen.decoding.search import DecodeState, blank_state, map_rows, zip_rows
from jaxgen.model.config import ModelConfig


@partial(jax.jit, donate_argnums=(0,))
def insert_rows(state: DecodeState, slots: jax.Array, rows: DecodeState) -> DecodeState:
    """Starts n prefilled rows in the given slots: every batch-major field of `rows` (a state of n
    rows with the same sizes as `state`, see generation.loop_state) goes to slots [n] int32 (B
    marks a padding row: dropped). `rows.step` is ignored."""
    return zip_rows(lambda dst, src: dst.at[slots].set(src.astype(dst.dtype), mode="drop"), state, rows)


@jax.jit
def keep_rows(state: DecodeState, rows: jax.Array) -> DecodeState:
    """The state of the slots `rows` [n] only (in that order): a smaller batch for the last
    running rows, whose steps then cost less."""
    return map_rows(lambda a: jnp.take(a, rows, axis=0), state)


@partial(jax.jit, static_argnames=("config", "batch", "length", "n_out", "hist_len"))
def grow_state(state: DecodeState, *, config: ModelConfig, batch: int, length: int, n_out: int,
               hist_len: int) -> DecodeState:
    """The same state with room for `batch` slots, `length` cache positions, `n_out` output
    tokens and `hist_len` history tokens per row (each at least the current size). New slots are
    free (done). Every array goes to the leading corner of its blank counterpart: a cache row grows
    at its end (full layers index by position, and a sliding layer's ring that grows was shorter
    than its window, so it held every position at its own slot, which stays valid in the larger ring)."""
    blank = blank_state(config, batch=batch, length=length, n_out=n_out, hist_len=hist_len,
                        cache_dtype=state.cache.dtype, logits_steps=state.logits.shape[1],
                        stop_count=state.stop.shape[1])
    corner = lambda dst, src: dst.at[tuple(slice(0, n) for n in src.shape)].set(src)  # noqa: E731
    return zip_rows(corner, blank, state)._replace(step=state.step)
