"""Pure, jitted functions for full passes: forward logits and per-token log-likelihoods.

Both run the decoder over the inputs in chunks of `chunk` positions (`chunked_pass`), so memory
stays bounded for long sequences: attention is blocked, and logits exist for at most one
SCORE_CHUNK x vocabulary slice per row at a time while scoring.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jaxgen.model.config import ModelConfig
from jaxgen.model.decoder import chunked_pass, compute_logits

SCORE_CHUNK = 32  # positions are scored in pieces of a multiple of this many
LOGIT_ROWS = 256  # rows (batch x positions) of one piece's [rows, V] logits, when the shape allows


def score_piece(batch: int, width: int) -> int:
    """Positions per scoring piece: about LOGIT_ROWS rows of logits (a small batch scores more
    positions per piece, so the head's weights are read fewer times), a multiple of SCORE_CHUNK
    that divides `width` (itself a multiple of SCORE_CHUNK)."""
    piece = SCORE_CHUNK
    while piece * 2 * batch <= LOGIT_ROWS and width % (piece * 2) == 0:
        piece *= 2
    return piece


def pass_width(length: int, chunk: int) -> int:
    """Padded length of a full pass over `length` tokens: a chunk's multiple past one chunk."""
    return length if length <= chunk else -(-length // chunk) * chunk


@partial(jax.jit, static_argnames=("config", "dtype", "log_probs", "chunk", "impl"))
def forward_logits(params: dict, tokens: jax.Array, lengths: jax.Array, *, config: ModelConfig, dtype,
                   log_probs: bool, chunk: int, impl: str = "flash") -> jax.Array:
    """tokens [B, T] right-padded, lengths [B] -> float32 logits (or log-probs) [B, T, V].

    T must be <= chunk or a multiple of it."""
    def per_chunk(hidden, _):
        logits = compute_logits(params, config, hidden)
        return jax.nn.log_softmax(logits, axis=-1) if log_probs else logits

    return chunked_pass(params, config, tokens, lengths, dtype, min(chunk, tokens.shape[1]), per_chunk, impl)


@partial(jax.jit, static_argnames=("config", "dtype", "chunk", "impl"))
def target_log_probs(params: dict, inputs: jax.Array, targets: jax.Array, lengths: jax.Array, *,
                     config: ModelConfig, dtype, chunk: int, impl: str = "flash") -> jax.Array:
    """log p(targets[b, t] | inputs[b, :t+1]) as float32 [B, T].

    T must divide by SCORE_CHUNK and be <= chunk or a multiple of it (chunk a multiple of
    SCORE_CHUNK). Logits are computed `score_piece` positions at a time so that [B, T, V] never
    exists.
    """
    b, t = inputs.shape
    width = min(chunk, t)

    piece = score_piece(b, width)

    def per_chunk(hidden, i):  # hidden [B, width, D]
        d = hidden.shape[-1]
        tgt = jax.lax.dynamic_slice_in_dim(targets, i * width, width, axis=1)
        pieces = hidden.reshape(b, width // piece, piece, d).swapaxes(0, 1)
        target_pieces = tgt.reshape(b, width // piece, piece).swapaxes(0, 1)

        def one_piece(_, xs):
            h, tg = xs
            logits = compute_logits(params, config, h)  # [B, C, V]
            picked = jnp.take_along_axis(logits, tg[..., None], axis=-1)[..., 0]
            return None, picked - jax.nn.logsumexp(logits, axis=-1)

        _, out = jax.lax.scan(one_piece, None, (pieces, target_pieces))
        return out.swapaxes(0, 1).reshape(b, width)

    return chunked_pass(params, config, inputs, lengths, dtype, width, per_chunk, impl)
