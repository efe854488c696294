"""Pure, jitted functions for full passes: forward logits and per-token log-likelihoods.

Both run the decoder over the inputs in chunks of `chunk` positions (`chunked_pass`), so memory
stays bounded for long sequences: attention is blocked, and logits exist for at most one
SCORE_CHUNK x vocabulary slice per row at a time while scoring.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jaxgen.executables import cached_jit
from jaxgen.model.attention import resolve_attention
from jaxgen.model.config import ModelConfig
from jaxgen.model.decoder import DEFAULT_CHUNKS, KVCache, PassPlan, chunked_pass, compute_logits, forward
from jaxgen.model.int8 import runs_int8_products
from jaxgen.runtime.batching import bucket, pass_width

SCORE_CHUNK = 32  # positions are scored in pieces of a multiple of this many
LOGIT_ROWS = 512  # rows (batch x positions) of one scoring piece, when the shape allows
VOCAB_BLOCK = 16384  # vocabulary columns whose logits exist at once while scoring
# The same with an int8 head and float32 activations (int8 x int8 -> int32 products, see
# jaxgen.model.int8): 512 rows x 16,384 columns of int32 partial sums are 32 MiB, past this CPU's
# caches, and the product then runs at a third of its speed with 4,096 columns
# (benchmarks/run.py int8_kernels --shapes head_block,head_block_int8; 7.8 vs 20.5 ms per 16,384 columns).
VOCAB_BLOCK_INT8 = 4096


def score_width(longest: int, chunk: int) -> int:
    """Padded positions of a scoring pass over rows of up to `longest` tokens: a bucket, a
    multiple of SCORE_CHUNK, and of `chunk` past one chunk."""
    t = max(bucket(longest), SCORE_CHUNK)
    return pass_width(-(-t // SCORE_CHUNK) * SCORE_CHUNK, chunk)


def score_piece(batch: int, width: int) -> int:
    """Positions per scoring piece: about LOGIT_ROWS rows of logits (a small batch scores more
    positions per piece, so the head's weights are read fewer times), a multiple of SCORE_CHUNK
    that divides `width` (itself a multiple of SCORE_CHUNK)."""
    piece = SCORE_CHUNK
    while piece * 2 * batch <= LOGIT_ROWS and width % (piece * 2) == 0:
        piece *= 2
    return piece


def target_log_prob(params: dict, config: ModelConfig, hidden: jax.Array, targets: jax.Array,
                    greedy: bool = False):
    """log softmax(logits(hidden))[targets]: hidden [..., D], targets [...] int -> float32 [...];
    with `greedy`, also bool [...]: the target has the highest logit (greedy decoding's choice, ties included).

    The vocabulary is visited in blocks of VOCAB_BLOCK columns (VOCAB_BLOCK_INT8 for an int8 head
    with float32 activations) with a running log-sum-exp, so only one block's logits exist at a
    time: they stay in cache between the matrix product and
    the exponentials (on this CPU 1.5x faster than logits over the whole vocabulary followed by
    a log-sum-exp), and memory no longer grows with the vocabulary.
    """
    v = config.vocab_size
    head = params["embed"] if config.tie_word_embeddings else params["lm_head"]
    int8 = runs_int8_products(head["weight"].dtype, hidden.dtype)
    block = min(VOCAB_BLOCK_INT8 if int8 else VOCAB_BLOCK, v)
    shape = targets.shape

    def one_block(i, carry):
        running_max, running_sum, picked = carry
        first = i * block
        start = jnp.minimum(first, v - block)  # the last block may overlap the one before it...
        logits = compute_logits(params, config, hidden, start, block)
        column = start + jnp.arange(block)
        logits = jnp.where(column >= first, logits, -jnp.inf)  # ...whose columns count once
        new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1))
        running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.sum(jnp.exp(logits - new_max[..., None]),
                                                                              axis=-1)
        index = targets - start
        inside = (targets >= first) & (index < block)
        value = jnp.take_along_axis(logits, jnp.clip(index, 0, block - 1)[..., None], axis=-1)[..., 0]
        return new_max, running_sum, picked + jnp.where(inside, value, 0.0)

    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
    running_max, running_sum, picked = jax.lax.fori_loop(0, -(-v // block), one_block, init)
    log_prob = picked - (running_max + jnp.log(running_sum))
    return (log_prob, picked >= running_max) if greedy else log_prob


@cached_jit(static_argnames=("config", "dtype", "log_probs", "chunk", "impl"))
def forward_logits(params: dict, tokens: Optional[jax.Array], lengths: jax.Array, *, config: ModelConfig, dtype,
                   log_probs: bool, chunk: int, impl: str = "flash",
                   embeddings: Optional[jax.Array] = None) -> jax.Array:
    """tokens int32 [B, T] right-padded, lengths int32 [B] -> float32 logits (or log-probs) [B, T, V].

    embeddings: input embeddings [B, T, D] in place of tokens (then None); see decoder.forward.
    T must be <= chunk or a multiple of it (see `pad_for_pass`)."""
    def per_chunk(hidden, _):
        logits = compute_logits(params, config, hidden)
        return jax.nn.log_softmax(logits, axis=-1) if log_probs else logits

    t = (tokens if embeddings is None else embeddings).shape[1]
    return chunked_pass(params, config, tokens, lengths, dtype, min(chunk, t), per_chunk, impl, embeddings)


def pad_for_pass(x: jax.Array, chunk: int, multiple: int = 1) -> jax.Array:
    """x [B, T, ...] right-padded with zeros on axis 1 to the width a chunked pass takes: a
    multiple of `multiple` (e.g. SCORE_CHUNK for `target_log_probs`), and of `chunk` when longer
    than one chunk (`jaxgen.runtime.batching.pass_width`). Shapes are static, so this traces under jit."""
    t = x.shape[1]
    width = pass_width(-(-t // multiple) * multiple, chunk)
    if width == t:
        return x
    return jnp.pad(x, [(0, 0), (0, width - t)] + [(0, 0)] * (x.ndim - 2))


@cached_jit(static_argnames=("config", "dtype", "chunk", "impl", "greedy"))
def target_log_probs(params: dict, inputs: jax.Array, targets: jax.Array, lengths: jax.Array, *,
                     config: ModelConfig, dtype, chunk: int, impl: str = "flash", greedy: bool = False):
    """log p(targets[b, t] | inputs[b, :t+1]) as float32 [B, T]; with `greedy`, a pair with bool
    [B, T]: each target is the most likely token there (see target_log_prob).

    T must divide by SCORE_CHUNK and be <= chunk or a multiple of it (chunk a multiple of
    SCORE_CHUNK). Logits are computed `score_piece` positions at a time so that [B, T, V] never
    exists.
    """
    width = min(chunk, inputs.shape[1])

    def per_chunk(hidden, i):  # hidden [B, width, D]
        return _score_hidden(params, config, hidden, jax.lax.dynamic_slice_in_dim(targets, i * width, width, axis=1),
                             greedy)

    return chunked_pass(params, config, inputs, lengths, dtype, width, per_chunk, impl)


def _score_hidden(params: dict, config: ModelConfig, hidden: jax.Array, targets: jax.Array, greedy: bool):
    """target_log_prob of hidden [B, W, D] and targets [B, W], `score_piece` positions at a time
    (W a multiple of SCORE_CHUNK) -> float32 [B, W] (with `greedy`, and bool [B, W])."""
    b, width, d = hidden.shape
    piece = score_piece(b, width)
    pieces = hidden.reshape(b, width // piece, piece, d).swapaxes(0, 1)
    target_pieces = targets.reshape(b, width // piece, piece).swapaxes(0, 1)

    def one_piece(_, xs):
        h, tg = xs
        return None, target_log_prob(params, config, h, tg, greedy)
    _, out = jax.lax.scan(one_piece, None, (pieces, target_pieces))
    return jax.tree_util.tree_map(lambda a: a.swapaxes(0, 1).reshape(b, width), out)


@cached_jit(static_argnames=("config", "chunk", "impl", "greedy", "scores", "score_count"), donate_argnums=(1,))
def extend_log_probs(params: dict, cache: KVCache, tokens: jax.Array, positions: jax.Array, targets: jax.Array,
                     score_from: Optional[jax.Array] = None, *, config: ModelConfig, chunk: int, impl: str = "flash",
                     greedy: bool = False, scores: bool = True, score_count: int = 0):
    """Feeds tokens [B, T] at their own positions [B, T] (-1: padding; each row's valid positions
    consecutive, its earlier positions already in `cache`, e.g. a shared prefix tiled into the
    rows) and scores targets [B, T] there: log p(targets[b, t] | the row's tokens up to
    positions[b, t]). Returns (float32 [B, T] log-probs, or with `greedy` a pair with bool [B, T]
    flags as in target_log_prob; the updated cache); with scores=False only the cache is updated
    (a prefill without the vocabulary head) and the log-probs are zeros.

    score_count K > 0 (static; T <= chunk): only columns score_from[b] ... score_from[b] + K - 1
    of each row are scored (the vocabulary head runs on B x K positions, not B x T), returned as
    [B, K] (columns past T repeat the last one).

    T must divide by SCORE_CHUNK and be <= chunk or a multiple of it; the chunks run in turn,
    each writing its keys and values at their positions before the next reads them."""
    b, t = tokens.shape
    width = min(chunk, t)
    if score_count and width != t:
        raise ValueError(f"score_count needs one chunk: {t} columns, chunk {chunk}")

    def run(cache, c):
        tok = jax.lax.dynamic_slice_in_dim(tokens, c * width, width, axis=1)
        pos = jax.lax.dynamic_slice_in_dim(positions, c * width, width, axis=1)
        hidden, cache = forward(params, config, tok, pos, cache, None, impl=impl)
        if not scores:
            zeros = jnp.zeros((b, width), jnp.float32)
            return cache, (zeros, jnp.zeros((b, width), bool)) if greedy else zeros
        tgt = jax.lax.dynamic_slice_in_dim(targets, c * width, width, axis=1)
        if score_count:
            columns = jnp.minimum(score_from[:, None] + jnp.arange(score_count, dtype=jnp.int32)[None, :], t - 1)
            picked = jnp.take_along_axis(hidden, columns[..., None], axis=1)  # [B, K, D]
            return cache, target_log_prob(params, config, picked, jnp.take_along_axis(tgt, columns, axis=1), greedy)
        return cache, _score_hidden(params, config, hidden, tgt, greedy)

    if score_count:
        cache, out = run(cache, jnp.int32(0))
        return out, cache
    cache, out = jax.lax.scan(run, cache, jnp.arange(t // width, dtype=jnp.int32))
    # out: [n, B, width] -> [B, T]
    out = jax.tree_util.tree_map(lambda a: jnp.moveaxis(a, 0, 1).reshape(b, t), out)
    return out, cache


def pass_plan(attention: str, chunk: Optional[int], platform: str, config: ModelConfig, dtype,
              chunk_name: str = "prefill_chunk") -> PassPlan:
    """Validates the attention name and the chunk size of full passes and resolves them for the
    platform and model -> PassPlan. chunk: positions per chunk (None: the platform's default), a
    positive multiple of SCORE_CHUNK; `chunk_name` names it in errors."""
    if not isinstance(attention, str):
        raise TypeError(f"attention must be a str, got {type(attention).__name__}")
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool)):
        raise TypeError(f"{chunk_name} must be an int, got {type(chunk).__name__}")
    if chunk is not None and (chunk < SCORE_CHUNK or chunk % SCORE_CHUNK):
        raise ValueError(f"{chunk_name} must be a positive multiple of {SCORE_CHUNK}, got {chunk}")
    return PassPlan(impl=resolve_attention(attention, platform, config, dtype),
                    chunk=chunk or DEFAULT_CHUNKS.get(platform, 512))
