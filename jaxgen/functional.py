"""The model as pure functions: load once, then `jit`, `grad` and `vmap` your own code over it.

    from jaxgen import functional as F

    model = F.load_model(model_dir)                       # model.config: hashable, model.params: a pytree
    model = F.from_generator(generator)                   # or the weights a Generator already holds
    logits = F.forward(model.params, model.config, tokens, lengths)          # [B, T, V] float32
    lp = jax.jit(F.log_probs, static_argnums=1)(model.params, model.config, tokens, lengths)
    grads = jax.grad(lambda p: F.log_probs(p, model.config, tokens, lengths).sum())(model.params)

These are the functions the `Generator` runs (`forward_batch` and `score_batch` call the same
`jaxgen.decoding.scoring` passes over the same `jaxgen.model.decoder`): there is one implementation.
Inputs are right-padded token ids `tokens` int32 [B, T] with `lengths` int32 [B] (1 <= length <= T);
values at positions past a row's length are computed from padding and mean nothing (`log_probs`
zeroes them). Sequences run in chunks of `config.chunk` positions (bounded memory). Reverse-mode
differentiation (`jax.grad`) works on sequences of one chunk (512 positions by default on CPU) whose
attention is small enough to run in one einsum; for longer ones load the model with
`attention="dense"` (the blocked attention bounds its loops by traced positions, which
`jax.grad` cannot differentiate).
Shapes: B batch, T positions, D hidden size, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from jaxgen.decoding.scoring import SCORE_CHUNK, forward_logits, pad_for_pass, pass_plan, target_log_probs
from jaxgen.model import decoder
from jaxgen.model.config import ModelConfig
from jaxgen.model.loading import JNP_DTYPES, load_params
from jaxgen.runtime.devices import resolve_devices

__all__ = ["Config", "Model", "load_model", "from_generator", "forward", "embed", "log_probs"]


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything static about a loaded model: hashable, so pass it as a `jit` static argument.

    model: the architecture (`ModelConfig`; its fields are also readable here, e.g. `vocab_size`).
    dtype: the activation type ("float32", "bfloat16", "float16"). attention: the attention
    implementation ("flash", "dense", ...; see `jaxgen.model.attention`). chunk: positions per
    chunk of a pass (a multiple of 32).
    """

    model: ModelConfig
    dtype: str = "float32"
    attention: str = "flash"
    chunk: int = 512

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    @property
    def jnp_dtype(self):
        return JNP_DTYPES[self.dtype]


class Model(NamedTuple):
    """A loaded model: `config` (hashable, static), `params` (a plain pytree of device arrays),
    and `vocabulary` (token strings, index = id)."""

    config: Config
    params: dict
    vocabulary: List[str]


def load_model(model_dir: str, compute_type: str = "default", device: Optional[Union[str, jax.Device]] = None, *,
               attention: str = "auto", chunk: Optional[int] = None) -> Model:
    """Loads a model directory (made by `jaxgen convert`) onto one device.

    compute_type: as `Generator`'s ("default" keeps the saved type, "float32", "bfloat16", "int8", ...).
    device: None (JAX's default device), "cpu" / "cuda" / "tpu" / "auto", or a `jax.Device`.
    attention / chunk: as `Generator`'s `attention` / `prefill_chunk`.
    Raises TypeError / ValueError for bad arguments before reading the weights.
    """
    if device is None:
        jax_device = jax.devices()[0]
    elif isinstance(device, jax.Device):
        jax_device = device
    elif isinstance(device, str):
        jax_device = resolve_devices(device, 0)[1][0]
    else:
        raise TypeError(f"device must be None, a str or a jax.Device, got {type(device).__name__}")
    platform = "cuda" if jax_device.platform == "gpu" else jax_device.platform
    model_config, params, vocabulary, ctype = load_params(model_dir, compute_type, platform)
    plan = pass_plan(attention, chunk, platform, model_config, ctype.dtype, chunk_name="chunk")
    config = Config(model=model_config, dtype=ctype.activations, attention=plan.impl, chunk=plan.chunk)
    return Model(config, jax.device_put(params, jax_device), list(vocabulary))


def from_generator(generator) -> Model:
    """The model a `jaxgen.Generator` holds, as a `Model` sharing its weights (no copy, no load).

    Its first replica's params, with the Generator's activation type, attention and chunk size, so
    `forward` / `log_probs` here compute what its `forward_batch` / `score_batch` compute. Raises
    TypeError for anything but a Generator, ValueError when its model is unloaded.
    """
    from jaxgen.generator import Generator

    if not isinstance(generator, Generator):
        raise TypeError(f"from_generator takes a jaxgen.Generator, got {type(generator).__name__}")
    if not generator.model_is_loaded:
        raise ValueError("the Generator's model is unloaded: call generator.load_model() first")
    plan = generator._plan
    config = Config(model=generator.config, dtype=generator._ctype.activations, attention=plan.impl,
                    chunk=plan.chunk)
    return Model(config, generator._pool.replicas[0].params, list(generator._vocab.tokens))


def _check(config: Config, tokens: Optional[jax.Array], lengths: jax.Array, embeddings: Optional[jax.Array]) -> None:
    """Static checks of shapes and dtypes (they hold under jit too)."""
    if not isinstance(config, Config):
        raise TypeError(f"config must be a jaxgen.functional.Config (model.config), got {type(config).__name__}")
    if embeddings is None:
        if tokens is None or jnp.ndim(tokens) != 2:
            raise ValueError(f"tokens must have shape [batch, time], got {jnp.shape(tokens)}")
        if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
            raise TypeError(f"tokens must be integer ids, got {jnp.result_type(tokens)}")
        b, t = jnp.shape(tokens)
    else:
        if jnp.ndim(embeddings) != 3 or jnp.shape(embeddings)[2] != config.model.hidden_size:
            raise ValueError(f"embeddings must have shape [batch, time, {config.model.hidden_size}], "
                             f"got {jnp.shape(embeddings)}")
        b, t = jnp.shape(embeddings)[:2]
    if t < 1:
        raise ValueError("inputs must have at least one position")
    if jnp.shape(lengths) != (b,):
        raise ValueError(f"lengths must have shape [{b}], got {jnp.shape(lengths)}")
    if not jnp.issubdtype(jnp.result_type(lengths), jnp.integer):
        raise TypeError(f"lengths must be integers, got {jnp.result_type(lengths)}")


def embed(params: dict, config: Config, tokens: jax.Array) -> jax.Array:
    """Input embeddings of token ids [B, T] -> [B, T, D] in the activation dtype (Gemma's
    embedding scale included): `forward(..., embeddings=embed(params, config, tokens))` equals
    `forward(params, config, tokens, lengths)`."""
    if not isinstance(config, Config):
        raise TypeError(f"config must be a jaxgen.functional.Config (model.config), got {type(config).__name__}")
    return decoder.embed(params, config.model, jnp.asarray(tokens, jnp.int32), config.jnp_dtype)


def forward(params: dict, config: Config, tokens: Optional[jax.Array], lengths: jax.Array, *,
            embeddings: Optional[jax.Array] = None) -> jax.Array:
    """Logits of every position: float32 [B, T, V], logits[b, t] predicting token t + 1.

    tokens: int32 [B, T] right-padded ids; lengths: int32 [B]. embeddings: input embeddings
    [B, T, D] (e.g. from `embed`, perturbed or differentiated) in place of tokens, which may then
    be None. Jit-able with `config` static; differentiable in params and embeddings.
    """
    _check(config, tokens, lengths, embeddings)
    t = (tokens if embeddings is None else embeddings).shape[1]
    tokens = None if embeddings is not None else pad_for_pass(jnp.asarray(tokens, jnp.int32), config.chunk)
    embeddings = None if embeddings is None else pad_for_pass(embeddings, config.chunk)
    out = forward_logits(params, tokens, jnp.asarray(lengths, jnp.int32), config=config.model,
                         dtype=config.jnp_dtype, log_probs=False, chunk=config.chunk, impl=config.attention,
                         embeddings=embeddings)
    return out[:, :t]


def log_probs(params: dict, config: Config, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
    """log p(tokens[b, t + 1] | tokens[b, :t + 1]): float32 [B, T - 1], zero at t >= lengths[b] - 1.

    The values `Generator.score_batch` returns for the same sequences (it runs this same pass).
    Jit-able with `config` static; differentiable in params.
    """
    _check(config, tokens, lengths, None)
    tokens = jnp.asarray(tokens, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    t = tokens.shape[1]
    if t < 2:
        return jnp.zeros((tokens.shape[0], 0), jnp.float32)
    inputs = pad_for_pass(tokens[:, :-1], config.chunk, SCORE_CHUNK)
    targets = pad_for_pass(tokens[:, 1:], config.chunk, SCORE_CHUNK)
    n = jnp.maximum(lengths - 1, 1)  # a length-1 row scores nothing (masked below); its pass needs one token
    out = target_log_probs(params, inputs, targets, n, config=config.model, dtype=config.jnp_dtype,
                           chunk=config.chunk, impl=config.attention)[:, :t - 1]
    return jnp.where(jnp.arange(t - 1)[None, :] < (lengths - 1)[:, None], out, 0.0)
