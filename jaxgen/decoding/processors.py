"""Logits processing, in CTranslate2's order (spec §5.3). Pure functions on [rows, V] arrays.

Every option is a traced array, so a new value never recompiles:
  min-length EOS ban -> repetition penalty -> no-repeat n-grams -> disable_unk ->
  suppress_sequences -> forbidden ids set to the lowest finite float.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxgen.executables import cached_jit

LOWEST = float(jnp.finfo(jnp.float32).min)


def mark(mask: jax.Array, rows: jax.Array, cols: jax.Array, valid: jax.Array) -> jax.Array:
    """Sets mask[rows, cols] = True where valid (others are dropped as out-of-bounds writes)."""
    return mask.at[rows, jnp.where(valid, cols, mask.shape[-1])].set(True, mode="drop")


class ProcessorOptions(NamedTuple):
    """Traced per-call options (shapes bucketed by the caller)."""

    end_ids: jax.Array  # [E] int32, -1 = unused slot
    repetition_penalty: jax.Array  # [] float32, 1 = off
    no_repeat_ngram_size: jax.Array  # [] int32, 0 = off
    unk_id: jax.Array  # [] int32, -1 = disable_unk off
    suppress: jax.Array  # [N, M] int32 token sequences, -1 padded
    suppress_lens: jax.Array  # [N] int32, 0 = unused row


class History(NamedTuple):
    """What the loop has output per row (CTranslate2's "loop history")."""

    tokens: jax.Array  # [B, H] int32
    length: jax.Array  # [B] int32
    presence: jax.Array  # [B, V] bool: token occurred in the history


@cached_jit(static_argnames=("vocab_size",))
def init_history(tokens: jax.Array, length: jax.Array, vocab_size: int) -> History:
    """tokens [B, H] (valid up to length [B]) -> History with its presence mask."""
    b, h = tokens.shape
    valid = jnp.arange(h)[None, :] < length[:, None]
    presence = jnp.zeros((b, vocab_size), bool)
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, h))
    return History(tokens, length, mark(presence, rows, tokens, valid))


def append_history(history: History, token: jax.Array, active: jax.Array) -> History:
    """Appends token [B] to the rows where active [B]."""
    b, h = history.tokens.shape
    rows = jnp.arange(b)
    index = jnp.minimum(history.length, h - 1)
    tokens = history.tokens.at[rows, index].set(jnp.where(active, token, history.tokens[rows, index]))
    presence = mark(history.presence, rows, token, active)
    return History(tokens, history.length + active.astype(jnp.int32), presence)


def _ngram_bans(history: History, n: jax.Array, vocab_size: int) -> jax.Array:
    """[B, V] bool: tokens that would repeat an n-gram of the history."""
    tokens, length = history.tokens, history.length
    b, h = tokens.shape
    j = jnp.arange(h)[None, :]

    def match_one(d, ok):
        # history[j - d] must equal history[length - d] for d = 1 .. n-1
        prev = jnp.take_along_axis(tokens, jnp.clip(j - d, 0, h - 1), axis=1)
        last = jnp.take_along_axis(tokens, jnp.clip(length - d, 0, h - 1)[:, None], axis=1)
        return ok & (j - d >= 0) & (prev == last)

    ok = jax.lax.fori_loop(1, jnp.maximum(n, 1), match_one, jnp.ones((b, h), bool))
    ok = ok & (j < length[:, None]) & (n > 0) & (length[:, None] >= n)
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, h))
    return mark(jnp.zeros((b, vocab_size), bool), rows, tokens, ok)


def _suppress_bans(history: History, seqs: jax.Array, lens: jax.Array, vocab_size: int) -> jax.Array:
    """[B, V] bool: last tokens of suppressed sequences whose other tokens end the history."""
    tokens, length = history.tokens, history.length
    b, h = tokens.shape
    n, m = seqs.shape
    i = jnp.arange(m)[None, :]  # position inside a sequence
    prefix_len = jnp.maximum(lens - 1, 0)  # [N]
    # history index holding sequence element i: length - prefix_len + i
    idx = length[:, None, None] - prefix_len[None, :, None] + i[None]  # [B, N, M]
    hist = jnp.take_along_axis(tokens[:, None, :], jnp.clip(idx, 0, h - 1), axis=2)
    needed = i[None] < prefix_len[None, :, None]
    matches = jnp.all(~needed | ((idx >= 0) & (hist == seqs[None])), axis=2)  # [B, N]
    active = matches & (lens[None, :] > 0)
    last = jnp.take_along_axis(seqs, jnp.maximum(lens - 1, 0)[:, None], axis=1)[:, 0]  # [N]
    cols = jnp.broadcast_to(last[None, :], (b, n))
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, n))
    return mark(jnp.zeros((b, vocab_size), bool), rows, cols, active)


def process_logits(logits: jax.Array, history: History, opts: ProcessorOptions,
                   ban_end: jax.Array) -> jax.Array:
    """logits [B, V] float32 -> processed logits; ban_end [B] bool forbids the end ids (min_length)."""
    b, v = logits.shape
    forbid = jnp.zeros((b, v), bool)
    end_valid = opts.end_ids >= 0
    end_mask = jnp.zeros((v,), bool).at[jnp.where(end_valid, opts.end_ids, v)].set(True, mode="drop")
    forbid = forbid | (ban_end[:, None] & end_mask[None, :])

    p = opts.repetition_penalty
    penalised = jnp.where(logits < 0, logits * p, logits / p)
    logits = jnp.where(history.presence & (p != 1.0), penalised, logits)

    forbid = forbid | _ngram_bans(history, opts.no_repeat_ngram_size, v)
    unk = opts.unk_id
    forbid = forbid | ((jnp.arange(v) == unk) & (unk >= 0))[None, :]
    forbid = forbid | _suppress_bans(history, opts.suppress, opts.suppress_lens, v)
    return jnp.where(forbid, LOWEST, logits)
