"""User logits processors: JAX functions traced into the decoding loops (no host round trip).

A processor is `fn(logits, generated, step) -> logits`:
  logits    float32 [B, V]: the step's logits after CTranslate2's processors (penalties, bans;
            `jaxgen.decoding.processors`), before the greedy / sampling / beam choice;
  generated int32 [B, N]: each row's tokens chosen so far, in columns [0, step); the columns from
            `step` on hold GENERATED_FILL (-1). N (static) is the loop's output capacity (>= max_length);
  step      int32 scalar: the loop step, i.e. the number of tokens each running row has generated
            (calls with processors run on static sub-batches, whose rows all start at step 0, so
            one scalar is every running row's step; finished rows keep their tokens and are ignored).
With beam search the rows are examples x beams (B * beam_size) and `generated` holds each beam's
own history. Processors run in list order. They are part of the loop's compile key (the tuple of
function objects): pass the same function objects to reuse the compiled loop.
"""

from __future__ import annotations

from typing import Callable, Sequence, Tuple

import jax
import jax.numpy as jnp

GENERATED_FILL = -1  # `generated` past each row's step


def processor_name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def as_processors(value) -> Tuple[Callable, ...]:
    """None or a list/tuple of callables -> a tuple (hashable: part of the loop's static spec)."""
    if value is None:
        return ()
    if callable(value) or isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise TypeError(f"logits_processors must be a list of callables, got {type(value).__name__}")
    for i, fn in enumerate(value):
        if not callable(fn):
            raise TypeError(f"logits_processors[{i}] is not callable: {type(fn).__name__}")
    return tuple(value)


def generated_tokens(out_tokens: jax.Array, length: jax.Array) -> jax.Array:
    """out_tokens int32 [B, N] with length [B] valid columns (or a scalar) -> [B, N], GENERATED_FILL past them."""
    column = jnp.arange(out_tokens.shape[1])[None, :]
    return jnp.where(column < jnp.reshape(length, (-1, 1)), out_tokens, GENERATED_FILL)


def apply_processors(processors: Sequence[Callable], logits: jax.Array, generated: jax.Array,
                     step: jax.Array) -> jax.Array:
    """Runs the processors in order (at trace time: shapes are checked while tracing). Raises
    ValueError naming the processor that raised or returned something other than float32 [B, V]."""
    for fn in processors:
        name = processor_name(fn)
        try:
            out = fn(logits, generated, step)
        except Exception as exc:
            raise ValueError(f"logits processor {name} raised {type(exc).__name__}: {exc}") from exc
        shape, dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
        if shape != logits.shape or dtype != jnp.float32:
            raise ValueError(f"logits processor {name} must return float32 logits of shape {logits.shape}, "
                             f"got {type(out).__name__} of shape {shape} and dtype {dtype}")
        logits = out
    return logits


def check_processors(processors: Sequence[Callable], batch: int, n_out: int, vocab_size: int) -> None:
    """Traces the processors on abstract inputs of these shapes (`jax.eval_shape`, nothing runs),
    so that a bad one fails before any work with a ValueError naming it."""
    if not processors:
        return
    jax.eval_shape(lambda l, g, s: apply_processors(processors, l, g, s),
                   jax.ShapeDtypeStruct((batch, vocab_size), jnp.float32),
                   jax.ShapeDtypeStruct((batch, n_out), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32))
