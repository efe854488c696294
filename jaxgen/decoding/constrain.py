"""Constrained decoding inside the loops: each step asks the host for the allowed tokens of every
constrained row (`jax.experimental.io_callback` -> `jaxgen.runtime.matchers.advance`) and masks
the processed logits with them (`apply_mask`, in `jaxgen.decoding.step.process`).

The callback reads only what the loop state held before the step (each row's matcher handle, its
parent, the token fed, its generated count), not the step's logits, so XLA is free to run it beside
the forward pass. Loops compiled without constraints (`words == 0`) contain no callback.
Shapes: B rows, W = ceil(V_tok / 32) mask words (V_tok: the vocabulary's tokens), V logits.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import io_callback

from jaxgen.runtime import matchers


class Allowed(NamedTuple):
    mask: jax.Array  # [B, W] int32: bit t % 32 of word t // 32 set where token t is allowed
    complete: jax.Array  # [B] bool: the row's constraint is complete (its end tokens are allowed)
    free: jax.Array  # [B] bool: no constraint (or a finished row): logits untouched


def _host(handles, parents, tokens, counts, *, words: int):
    import numpy as np

    mask, complete = matchers.advance(np.asarray(handles), np.asarray(parents), np.asarray(tokens),
                                      np.asarray(counts), words)
    return mask, complete


def allowed_tokens(handles: jax.Array, parents: jax.Array, tokens: jax.Array, counts: jax.Array,
                   words: int) -> Allowed:
    """handles [B] int32 (matchers.FREE for free or finished rows), parents [B] int32 (the handle
    whose matcher each row continues), tokens [B] int32 (fed at this step: the last chosen),
    counts [B] int32 (tokens generated before this step) -> the rows' allowed tokens."""
    b = handles.shape[0]
    shapes = (jax.ShapeDtypeStruct((b, words), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.bool_))
    mask, complete = io_callback(partial(_host, words=words), shapes, handles.astype(jnp.int32),
                                 parents.astype(jnp.int32), tokens.astype(jnp.int32), counts.astype(jnp.int32),
                                 ordered=False)
    return Allowed(mask, complete, handles == matchers.FREE)


def apply_mask(logits: jax.Array, allowed: Allowed, end_ids: jax.Array) -> jax.Array:
    """logits [B, V] -> -inf where a token is not allowed. End ids (end_ids [E] int32, -1 =
    padding) are allowed exactly where the constraint is complete; a row with nothing allowed
    (a dead beam, or min_length against a finished constraint) may end. Free rows are unchanged."""
    b, v = logits.shape
    words = allowed.mask.shape[1]
    bits = (allowed.mask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)[None, None, :]) & 1
    bits = bits.reshape(b, words * 32).astype(bool)
    bits = bits[:, :v] if words * 32 >= v else jnp.pad(bits, ((0, 0), (0, v - words * 32)))
    is_end = jnp.zeros((v,), bool).at[jnp.where(end_ids >= 0, end_ids, v)].set(True, mode="drop")
    ok = jnp.where(is_end[None, :], allowed.complete[:, None], bits)
    stuck = ~jnp.any(ok, axis=1)
    ok = ok | (stuck[:, None] & is_end[None, :])
    return jnp.where(ok | allowed.free[:, None], logits, -jnp.inf)
