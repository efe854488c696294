"""Choosing the next token: argmax, or top-k -> temperature -> top-p -> categorical draw (spec §5.4)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxgen.executables import cached_jit


class SamplingOptions(NamedTuple):
    """Traced sampling options; a new value never recompiles."""

    topk: jax.Array  # [] int32; 0 = the full distribution
    topp: jax.Array  # [] float32 in (0, 1]
    temperature: jax.Array  # [] float32 > 0


def candidate_count(topk: int, vocab_size: int, minimum: int = 64) -> int:
    """Static number of candidates `lax.top_k` keeps for a requested top-k (bucketed)."""
    if topk == 0 or topk >= vocab_size:
        return vocab_size
    size = minimum
    while size < topk:
        size *= 2
    return min(size, vocab_size)


def filtered_candidates(scores: jax.Array, opts: SamplingOptions, k_static: int):
    """scores [B, V] -> (values [B, K] ready for a categorical draw, their ids [B, K]).

    Values outside top-k or top-p are -inf; values are divided by the temperature.
    """
    values, ids = jax.lax.top_k(scores, k_static)
    rank = jnp.arange(k_static)[None, :]
    values = jnp.where((opts.topk > 0) & (rank >= opts.topk), -jnp.inf, values)
    values = values / opts.temperature
    probs = jax.nn.softmax(values, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    values = jnp.where((opts.topp < 1.0) & (mass_before >= opts.topp), -jnp.inf, values)
    return values, ids


def sample(keys: jax.Array, scores: jax.Array, opts: SamplingOptions, k_static: int) -> jax.Array:
    """One draw per row, each with its own key: keys [B, 2] uint32, scores [B, V] -> ids [B] int32.

    Per-row keys make a row's draws independent of the other rows of the batch."""
    values, ids = filtered_candidates(scores, opts, k_static)
    choice = jax.vmap(jax.random.categorical)(keys, values)
    return jnp.take_along_axis(ids, choice[:, None], axis=1)[:, 0].astype(jnp.int32)


@cached_jit
def row_keys(seeds: jax.Array, batch_ids: jax.Array, hypothesis_ids: jax.Array) -> jax.Array:
    """The sampling key of each row: PRNGKey(seed) folded with the row's prompt index, then with
    its hypothesis index. seeds, batch_ids, hypothesis_ids [B] -> keys [B, 2] uint32.

    A prompt's samples therefore depend on the seed and its index in the caller's input only,
    not on the rows it shares a batch with."""
    def one(seed, b, h):
        return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), b), h)

    return jax.vmap(one)(seeds, batch_ids, hypothesis_ids)


def split_rows(keys: jax.Array):
    """keys [B, 2] -> (next keys [B, 2], keys to draw with now [B, 2])."""
    split = jax.vmap(jax.random.split)(keys)
    return split[:, 0], split[:, 1]


def greedy(scores: jax.Array) -> jax.Array:
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)
