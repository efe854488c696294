"""Stop strings matched inside the decoding loops (device side; the tables come from
`jaxgen.runtime.stops`).

Each stop string is a byte string s of length L_s, matched by its Knuth-Morris-Pratt automaton:
a row's progress on s is the length of the longest prefix of s that ends its generated text
(0..L_s - 1), and L_s once s occurred. A token appends several bytes at once, so the table holds,
for every string, progress and token, the progress after the token's bytes: one gather per step
follows every row on every string, whether the string spans tokens or ends inside one.
Shapes: S strings (padded), P progress values per table (>= max L_s), V vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class StopStrings(NamedTuple):
    """Traced stop-string tables of one call (S = 0: no stop strings, the operations are free)."""

    table: jax.Array  # [S, P, V] int8/int16: progress on string s after token t from progress q
    lengths: jax.Array  # [S] int32: L_s, the progress that means "occurred"; 0 marks a padding string


def advance(stops: StopStrings, progress: jax.Array, token: jax.Array) -> jax.Array:
    """progress int32 [..., S] after appending token int32 [...] -> int32 [..., S]."""
    s, p = stops.table.shape[:2]
    if s == 0:
        return progress
    q = jnp.minimum(progress, p - 1)  # a completed row is done: its progress is never read again
    return stops.table[jnp.arange(s), q, token[..., None]].astype(jnp.int32)


def completed(stops: StopStrings, progress: jax.Array) -> jax.Array:
    """bool [...]: some string occurred (progress [..., S] reached its length)."""
    return jnp.any((progress == stops.lengths) & (stops.lengths > 0), axis=-1)
