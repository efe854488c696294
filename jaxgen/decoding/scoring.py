"""Pure, jitted functions for full passes: forward logits and per-token log-likelihoods."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jaxgen.model.config import ModelConfig
from jaxgen.model.decoder import compute_logits, full_pass

SCORE_CHUNK = 32  # time steps whose [B, chunk, V] logits exist at once while scoring


@partial(jax.jit, static_argnames=("config", "dtype", "log_probs"))
def forward_logits(params: dict, tokens: jax.Array, lengths: jax.Array, *, config: ModelConfig, dtype,
                   log_probs: bool) -> jax.Array:
    """tokens [B, T] right-padded, lengths [B] -> float32 logits (or log-probs) [B, T, V]."""
    hidden = full_pass(params, config, tokens, lengths, dtype)
    logits = compute_logits(params, config, hidden)
    return jax.nn.log_softmax(logits, axis=-1) if log_probs else logits


@partial(jax.jit, static_argnames=("config", "dtype"))
def target_log_probs(params: dict, inputs: jax.Array, targets: jax.Array, lengths: jax.Array, *,
                     config: ModelConfig, dtype) -> jax.Array:
    """log p(targets[b, t] | inputs[b, :t+1]) as float32 [B, T]; T must divide by SCORE_CHUNK.

    Logits are computed SCORE_CHUNK positions at a time so that [B, T, V] never exists.
    """
    hidden = full_pass(params, config, inputs, lengths, dtype)  # [B, T, D]
    b, t, d = hidden.shape
    chunks = hidden.reshape(b, t // SCORE_CHUNK, SCORE_CHUNK, d).swapaxes(0, 1)
    target_chunks = targets.reshape(b, t // SCORE_CHUNK, SCORE_CHUNK).swapaxes(0, 1)

    def one_chunk(_, xs):
        h, tgt = xs
        logits = compute_logits(params, config, h)  # [B, C, V]
        picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        return None, picked - jax.nn.logsumexp(logits, axis=-1)

    _, out = jax.lax.scan(one_chunk, None, (chunks, target_chunks))
    return out.swapaxes(0, 1).reshape(b, t)
