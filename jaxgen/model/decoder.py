"""The one decoder: pure functions over a params pytree and a KV cache.

Every architecture is this function with different `ModelConfig` values. The same `forward`
serves a full pass (scoring, `forward_batch`), prompt prefill and one-token decode: it writes the
new tokens' keys/values into cache slots `[write_index, write_index + T)` and attends over the
whole cache, masking by the absolute position stored for each slot (`slot_pos`, -1 = empty).
That mask handles padding, causality and sliding windows the same way in every mode.

Shapes: B batch, T new tokens, S cache slots, L layers, D hidden, V vocabulary,
Hq / Hkv query / key-value heads, hd head dim.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.model.config import ModelConfig

MASK_VALUE = -1e30  # finite, so that a fully masked (padding) query yields no NaN


class KVCache(NamedTuple):
    """Per-layer key/value buffers (separate arrays, so each is updated in place)."""

    k: Tuple[jax.Array, ...]  # L x [B, S, Hkv, hd]
    v: Tuple[jax.Array, ...]  # L x [B, S, Hkv, hd]
    slot_pos: jax.Array  # [B, S] int32: absolute position of the token in each slot, -1 if empty

    @property
    def dtype(self):
        return self.k[0].dtype

    @property
    def length(self) -> int:
        return self.slot_pos.shape[1]

    def map_rows(self, fn) -> "KVCache":
        """Applies fn to the batch axis of every buffer (axis 0), e.g. a gather of beams."""
        return KVCache(tuple(fn(a) for a in self.k), tuple(fn(a) for a in self.v), fn(self.slot_pos))


def init_cache(config: ModelConfig, batch: int, length: int, dtype) -> KVCache:
    shape = (batch, length, config.num_kv_heads, config.head_dim)
    layers = range(config.num_layers)
    return KVCache(tuple(jnp.zeros(shape, dtype) for _ in layers), tuple(jnp.zeros(shape, dtype) for _ in layers),
                   jnp.full((batch, length), -1, jnp.int32))


# ---------------------------------------------------------------------------- building blocks
def linear(x: jax.Array, p: dict) -> jax.Array:
    """x [..., in] @ weight [in, out] (+ bias); int8 weights carry a per-output `weight_scale`."""
    w = p["weight"]
    if w.dtype == jnp.int8:
        y = jnp.dot(x, w.astype(x.dtype)) * p["weight_scale"].astype(x.dtype)
    else:
        y = jnp.dot(x, w)
    if "bias" in p:
        y = y + p["bias"].astype(y.dtype)
    return y


def norm(x: jax.Array, p: dict, config: ModelConfig) -> jax.Array:
    """RMSNorm or LayerNorm over the last axis, computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    if config.norm_type == "layer":
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + config.norm_eps)
    else:
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + config.norm_eps)
    y = y * (config.norm_offset + p["weight"].astype(jnp.float32))
    if "bias" in p:
        y = y + p["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


def activation(x: jax.Array, name: str) -> jax.Array:
    if name == "silu":
        return jax.nn.silu(x)
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    return jax.nn.relu(x)


def embed(params: dict, config: ModelConfig, tokens: jax.Array, dtype) -> jax.Array:
    """tokens [B, T] -> [B, T, D] (scaled for Gemma)."""
    w = params["embed"]["weight"]
    x = jnp.take(w, tokens, axis=0)
    if w.dtype == jnp.int8:
        x = x.astype(dtype) * jnp.take(params["embed"]["weight_scale"], tokens, axis=0)[..., None].astype(dtype)
    x = x.astype(dtype)
    if config.embedding_scale is not None:
        # HF casts the multiplier to the activation dtype first; doing the same keeps bf16 parity.
        x = x * jnp.asarray(config.embedding_scale, dtype)
    return x


def compute_logits(params: dict, config: ModelConfig, hidden: jax.Array) -> jax.Array:
    """hidden [..., D] (already final-normed) -> float32 logits [..., V]."""
    if config.tie_word_embeddings:
        w = params["embed"]["weight"]
        if w.dtype == jnp.int8:
            logits = jnp.dot(hidden, w.astype(hidden.dtype).T) * params["embed"]["weight_scale"].astype(hidden.dtype)
        else:
            logits = jnp.dot(hidden, w.T)
        if "lm_head" in params and "bias" in params["lm_head"]:
            logits = logits + params["lm_head"]["bias"].astype(logits.dtype)
    else:
        logits = linear(hidden, params["lm_head"])
    logits = logits.astype(jnp.float32)
    if config.final_logit_softcapping:
        cap = config.final_logit_softcapping
        logits = jnp.tanh(logits / cap) * cap
    return logits


# ---------------------------------------------------------------------------- rotary embeddings
def rope_inv_freq(config: ModelConfig, local: bool) -> Tuple[np.ndarray, float]:
    """Inverse frequencies [rotary/2] and the cos/sin multiplier, following HF's rope variants."""
    dim = config.rotary
    theta = config.rope_local_theta if (local and config.rope_local_theta) else config.rope_theta
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    scaling = {} if local and config.rope_local_theta else config.rope_scaling_dict
    kind = scaling.get("rope_type")
    attention_factor = 1.0
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_context = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_context / low, old_context / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    elif kind == "longrope":
        # Short factors (sequences within the original context), as HF uses for such lengths.
        original = scaling.get("original_max_position_embeddings", config.max_position_embeddings)
        ext = np.asarray(scaling["short_factor"], dtype=np.float32)
        inv_freq = 1.0 / (ext * theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
        factor = config.max_position_embeddings / original
        attention_factor = scaling.get("attention_factor") or (
            1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original)))
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_cos_sin(config: ModelConfig, positions: jax.Array, local: bool) -> Tuple[jax.Array, jax.Array]:
    """positions [B, T] -> cos, sin [B, T, rotary] (float32)."""
    inv_freq, factor = rope_inv_freq(config, local)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * factor, jnp.sin(emb) * factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, H, hd]; rotates the first `rotary` dims (rotate-half convention)."""
    rot = cos.shape[-1]
    x32 = x.astype(jnp.float32)
    xr, xp = x32[..., :rot], x32[..., rot:]
    half = rot // 2
    rotated = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
    out = xr * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return jnp.concatenate([out, xp], axis=-1).astype(x.dtype)


# ---------------------------------------------------------------------------- the layer stack
def attention_masks(config: ModelConfig, q_pos: jax.Array, slot_pos: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """q_pos [B, T], slot_pos [B, S] -> (full mask, sliding mask), each bool [B, T, S]."""
    k = slot_pos[:, None, :]
    q = q_pos[:, :, None]
    full = (k >= 0) & (k <= q)
    if config.has_sliding_layers:
        sliding = full & (q - k < config.sliding_window)
    else:
        sliding = full
    return full, sliding


def _layer(config: ModelConfig, x: jax.Array, lp: dict, k_cache: jax.Array, v_cache: jax.Array,
           is_sliding: bool, write_index: jax.Array, rope: dict, masks: Tuple[jax.Array, jax.Array],
           attend_len: Optional[int]):
    b, t, _ = x.shape
    hq, hkv, hd = config.num_heads, config.num_kv_heads, config.head_dim
    h = norm(x, lp["attn_norm"], config)
    q = linear(h, lp["q"]).reshape(b, t, hq, hd)
    k = linear(h, lp["k"]).reshape(b, t, hkv, hd)
    v = linear(h, lp["v"]).reshape(b, t, hkv, hd)
    if config.qk_norm:
        q = norm(q, lp["q_norm"], config)
        k = norm(k, lp["k_norm"], config)
    if config.position_embedding == "rope":
        cos, sin = rope["local" if is_sliding else "full"]
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, write_index, 0, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, write_index, 0, 0))

    k_seen, v_seen = (k_cache, v_cache) if attend_len is None else (k_cache[:, :attend_len], v_cache[:, :attend_len])
    groups = hq // hkv
    qg = q.reshape(b, t, hkv, groups, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k_seen.astype(q.dtype),
                        preferred_element_type=jnp.float32) * config.scale
    if config.attn_logit_softcapping:
        cap = config.attn_logit_softcapping
        scores = jnp.tanh(scores / cap) * cap
    mask = masks[1 if is_sliding else 0][:, None, None, :, :]
    scores = jnp.where(mask, scores, MASK_VALUE)
    weights = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    attn = jnp.einsum("bkgts,bskd->btkgd", weights, v_seen.astype(q.dtype)).reshape(b, t, hq * hd)
    out = linear(attn, lp["o"])
    if config.post_attention_norm:
        out = norm(out, lp["post_attn_norm"], config)
    x = x + out

    h = norm(x, lp["mlp_norm"], config)
    if config.gated_mlp:
        h = activation(linear(h, lp["gate"]), config.activation) * linear(h, lp["up"])
    else:
        h = activation(linear(h, lp["up"]), config.activation)
    h = linear(h, lp["down"])
    if config.post_mlp_norm:
        h = norm(h, lp["post_mlp_norm"], config)
    return x + h, k_cache, v_cache


def forward(params: dict, config: ModelConfig, tokens: jax.Array, positions: jax.Array,
            cache: KVCache, write_index: jax.Array, attend_len: Optional[int] = None) -> Tuple[jax.Array, KVCache]:
    """Runs the decoder on new tokens and updates the cache.

    tokens, positions: int32 [B, T]; a position of -1 marks padding (never attended to).
    cache: slots [write_index, write_index + T) receive the new keys/values.
    attend_len: static; when every visible slot lies below it, attention reads only those slots
    (a prompt prefill need not scan the empty slots reserved for generated tokens).
    Returns the final-normed hidden states [B, T, D] and the updated cache.
    """
    dtype = cache.dtype
    x = embed(params, config, tokens, dtype)
    clipped = jnp.maximum(positions, 0)
    if config.position_embedding == "learned":
        x = x + jnp.take(params["pos_embed"]["weight"], clipped, axis=0).astype(dtype)
    slot_pos = jax.lax.dynamic_update_slice(cache.slot_pos, positions.astype(jnp.int32), (0, write_index))
    masks = attention_masks(config, positions, slot_pos if attend_len is None else slot_pos[:, :attend_len])
    rope = {}
    if config.position_embedding == "rope":
        rope["full"] = rope_cos_sin(config, clipped, local=False)
        rope["local"] = rope_cos_sin(config, clipped, local=True) if config.rope_local_theta else rope["full"]
    k_new, v_new = [], []
    for i, lp in enumerate(params["layers"]):
        x, k_l, v_l = _layer(config, x, lp, cache.k[i], cache.v[i], config.layer_types[i] == "sliding",
                             write_index, rope, masks, attend_len)
        k_new.append(k_l)
        v_new.append(v_l)
    hidden = norm(x, params["final_norm"], config)
    return hidden, KVCache(tuple(k_new), tuple(v_new), slot_pos)


def full_pass(params: dict, config: ModelConfig, tokens: jax.Array, lengths: jax.Array, dtype) -> jax.Array:
    """Non-incremental pass over right-padded tokens [B, T] with lengths [B] -> hidden [B, T, D]."""
    b, t = tokens.shape
    pos = jnp.arange(t, dtype=jnp.int32)[None, :]
    positions = jnp.where(pos < lengths[:, None], pos, -1)
    cache = init_cache(config, b, t, dtype)
    hidden, _ = forward(params, config, tokens, positions, cache, jnp.int32(0))
    return hidden
