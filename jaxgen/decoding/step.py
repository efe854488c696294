"""The next-token logits of one decoding step, shared by every loop (greedy/sampling in `search`,
beam search in `beam`, prompt lookup in `speculative`):

    forward (the fed tokens, at their positions) -> logits -> CTranslate2's processors
    (`processors.process_logits`) -> the user's logits processors (`custom.apply_processors`)
    -> the constrained rows' token masks (`constrain.apply_mask`).

A loop then only chooses tokens from the processed logits and updates its own state.
Shapes: B rows, W tokens fed per row, N output slots, V vocabulary.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import jax

from jaxgen.decoding.constrain import Allowed, apply_mask
from jaxgen.decoding.custom import apply_processors, generated_tokens
from jaxgen.decoding.processors import History, ProcessorOptions, process_logits
from jaxgen.model.config import ModelConfig
from jaxgen.model.decoder import KVCache, compute_logits, forward


def model_logits(params: dict, config: ModelConfig, tokens: jax.Array, positions: jax.Array, cache: KVCache,
                 attend_len: Optional[int]) -> Tuple[jax.Array, KVCache]:
    """Feeds tokens / positions int32 [B, W] (each at the cache slot of its position) -> raw float32
    logits [B, W, V] and the updated cache. attend_len: see search.live_length."""
    hidden, cache = forward(params, config, tokens, positions, cache, attend_len=attend_len)
    return compute_logits(params, config, hidden), cache


def process(logits: jax.Array, history: History, proc: ProcessorOptions, ban_end: jax.Array,
            processors: Sequence[Callable] = (), outputs: Optional[Tuple[jax.Array, jax.Array]] = None,
            step: Optional[jax.Array] = None, allowed: Optional[Allowed] = None) -> jax.Array:
    """Raw logits [B, V] -> the logits the loop chooses from: CTranslate2's processors, then the
    user's, then the constraints' masks. ban_end [B] bool forbids the end ids (min_length).
    outputs: (tokens [B, N], length [B] or scalar) generated so far, and step: the loop step, both
    read only when there are user processors (see `jaxgen.decoding.custom`). allowed: the
    constrained rows' allowed tokens (`jaxgen.decoding.constrain`), None in unconstrained loops."""
    processed = process_logits(logits, history, proc, ban_end=ban_end)
    if processors:
        processed = apply_processors(processors, processed, generated_tokens(*outputs), step)
    if allowed is not None:
        processed = apply_mask(processed, allowed, proc.end_ids)
    return processed


def next_logits(params: dict, config: ModelConfig, token: jax.Array, position: jax.Array, cache: KVCache,
                history: History, proc: ProcessorOptions, ban_end: jax.Array, *, attend_len: Optional[int],
                processors: Sequence[Callable] = (), outputs: Optional[Tuple[jax.Array, jax.Array]] = None,
                step: Optional[jax.Array] = None, allowed: Optional[Allowed] = None) -> Tuple[jax.Array, KVCache]:
    """One token per row: token / position int32 [B] -> (processed logits float32 [B, V], cache)."""
    logits, cache = model_logits(params, config, token[:, None], position[:, None], cache, attend_len)
    return process(logits[:, 0], history, proc, ban_end, processors, outputs, step, allowed), cache
