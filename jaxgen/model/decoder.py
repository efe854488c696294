"""The one decoder: pure functions over a params pytree and a KV cache.

Every architecture is this function with different `ModelConfig` values. The same `forward`
serves a full pass (scoring, `forward_batch`, in chunks), prompt prefill (in chunks) and decode.

Cache layout: every row's cache is indexed by absolute position. Full-attention layers keep one
slot per position (slot s holds position s); sliding-window layers keep a ring of
`min(window, length)` slots (slot = position mod ring size), so they do not grow with the
sequence. Slots past a row's current position may hold stale values: attention masks by
position (see `jaxgen.model.attention`), so no per-slot bookkeeping is stored. A static prompt
occupies positions [0, P) of every row; each prompt continues at position P.

Shapes: B batch, T new tokens, S cache slots, L layers, D hidden, V vocabulary,
Hq / Hkv query / key-value heads, hd head dim.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxgen.model.attention import AttentionSpec, attend, fused_self_attention, pallas_self_attention
from jaxgen.model.config import ModelConfig
from jaxgen.model.experts import experts_mlp
from jaxgen.model.int8 import int8_matmul, runs_int8_products


# Positions per prefill/full-pass chunk: long inputs run in chunks of this many tokens, which
# bounds activation memory. Accelerators take large chunks: fewer, bigger matrix products, and a
# prompt that fits one chunk runs its attention in the fused kernel (only a chunk without
# earlier context can; later chunks take the portable blocked path).
DEFAULT_CHUNKS = {"cpu": 512, "cuda": 16384, "tpu": 8192}


class PassPlan(NamedTuple):
    """How a Generator runs its passes (static: part of the compiled programs' keys)."""

    impl: str = "flash"  # attention implementation, resolved (see jaxgen.model.attention)
    chunk: int = 512  # positions per prefill / full-pass chunk


@jax.tree_util.register_pytree_node_class
class KVCache:
    """Per-layer key/value buffers (separate arrays, so each is updated in place).

    k[i], v[i]: [B, S_i, Hkv_i, hd_i] (the layer's stored KV heads and head dim, see
    `ModelConfig.layer_stored_kv_heads`: tensor parallelism may store copies of each head) with S_i = `length` for full layers and the ring size
    min(sliding_window, length) for sliding layers. `length` (static) is the number of positions
    the cache can hold.
    """

    def __init__(self, k: Tuple[jax.Array, ...], v: Tuple[jax.Array, ...], length: int):
        self.k = tuple(k)
        self.v = tuple(v)
        self.length = int(length)

    def tree_flatten(self):
        return (self.k, self.v), self.length

    @classmethod
    def tree_unflatten(cls, length, children):
        return cls(children[0], children[1], length)

    @property
    def dtype(self):
        return self.k[0].dtype

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    def map_rows(self, fn) -> "KVCache":
        """Applies fn to the batch axis of every buffer (axis 0), e.g. a gather of beams."""
        return KVCache(tuple(fn(a) for a in self.k), tuple(fn(a) for a in self.v), self.length)


def layer_slots(config: ModelConfig, layer: int, length: int) -> int:
    """Slots of layer `layer` in a cache of `length` positions (sliding layers keep a ring)."""
    if config.layer_types[layer] == "sliding":
        return min(config.sliding_window, length)
    return length


def init_cache(config: ModelConfig, batch: int, length: int, dtype) -> KVCache:
    """An empty cache (zeros) of `batch` rows and `length` positions, in the cache's dtype."""
    return _zero_cache(config, batch, length, jnp.dtype(dtype))


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _zero_cache(config: ModelConfig, batch: int, length: int, dtype) -> KVCache:
    # One compiled call: created op by op, the 2 x layers buffers took ~20 ms of host dispatch
    # before a scheduled prefill could start (a 512-token prompt's time to the first token).
    shapes = [(batch, layer_slots(config, i, length), config.layer_stored_kv_heads(i), config.layer_head_dim(i))
              for i in range(config.num_layers)]
    return KVCache(tuple(jnp.zeros(s, dtype) for s in shapes), tuple(jnp.zeros(s, dtype) for s in shapes), length)


# ---------------------------------------------------------------------------- building blocks
def pin(x: jax.Array, config: ModelConfig, *spec) -> jax.Array:
    """Under tensor parallelism (`config.mesh`), constrains x to PartitionSpec(*spec) over the
    mesh (no spec: replicated), so that XLA keeps the layout jaxgen.runtime.replicas intends instead of
    one it propagates from a weight (the hidden-axis split of the embedding, say). A no-op on one
    device."""
    if config.mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(config.mesh, PartitionSpec(*spec)))


def linear(x: jax.Array, p: dict, transposed: bool = False) -> jax.Array:
    """x [..., in] @ weight [in, out] (+ bias); transposed, or the weight stored as "weight_nk":
    weight [out, in] (a tied head: the embedding's rows; a layer weight whose measured CPU layout
    is [out, in], see `jaxgen.model.cpu_kernels.arrange_for_cpu`). int8 weights carry a per-output
    `weight_scale`; with float32 activations they run as int8 products in the formulation measured
    fastest on this CPU for the shape (`jaxgen.model.int8`), with other float types as weights
    converted to that type."""
    if "weight_nk" in p:
        w, transposed = p["weight_nk"], True
    else:
        w = p["weight"]
    if runs_int8_products(w.dtype, x.dtype):
        y = int8_matmul(x, w, p["weight_scale"], transposed)
    elif w.dtype == jnp.int8:
        y = jnp.dot(x, (w.T if transposed else w).astype(x.dtype)) * p["weight_scale"].astype(x.dtype)
    else:
        y = _float_product(x, w, transposed)
    if "bias" in p:
        y = y + p["bias"].astype(y.dtype)
    return y


def _float_product(x: jax.Array, w: jax.Array, transposed: bool) -> jax.Array:
    """x [..., K] @ w [K, N] (transposed: w [N, K]). On CPU a float32 [N, K] weight runs in the
    formulation measured fastest there for the product's rows: XLA's dot or jaxgen's native
    kernel (`jaxgen.model.cpu_kernels`, "c32")."""
    if transposed and x.dtype == w.dtype == jnp.float32 and jax.default_backend() == "cpu":
        from jaxgen.model.cpu_kernels import default_chooser

        n, k = w.shape
        if default_chooser().float_kind(math.prod(x.shape[:-1]), k, n, "nk") == "c32":
            from jaxgen.model.native import float32_matmul_nk

            return float32_matmul_nk(x, w)
    return jnp.dot(x, w.T if transposed else w)


def norm(x: jax.Array, p: Optional[dict], config: ModelConfig) -> jax.Array:
    """RMSNorm or LayerNorm over the last axis, computed in float32, returned in x's dtype
    (p None: without a weight, Gemma 4's value norm)."""
    x32 = x.astype(jnp.float32)
    if config.norm_type == "layer":
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + config.norm_eps)
    else:
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + config.norm_eps)
    if p is None:
        return y.astype(x.dtype)
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


def lookup(p: dict, tokens: jax.Array, dtype) -> jax.Array:
    """Rows of an embedding table {"weight" [V, E] (+ int8 "weight_scale" [V])} -> [..., E] in dtype."""
    w = p["weight"]
    x = jnp.take(w, tokens, axis=0)
    if w.dtype == jnp.int8:
        x = x.astype(dtype) * jnp.take(p["weight_scale"], tokens, axis=0)[..., None].astype(dtype)
    return x.astype(dtype)


def embed(params: dict, config: ModelConfig, tokens: jax.Array, dtype) -> jax.Array:
    """tokens [B, T] -> [B, T, D] (scaled for Gemma; projected to the hidden size when the
    embeddings are narrower, OPT-350m)."""
    x = lookup(params["embed"], tokens, dtype)
    if config.embedding_scale is not None:
        # HF casts the multiplier to the activation dtype first; doing the same keeps bf16 parity.
        x = x * jnp.asarray(config.embedding_scale, dtype)
    if config.embedding_size is not None:
        x = linear(x, params["embed_in"])
    return x


def compute_logits(params: dict, config: ModelConfig, hidden: jax.Array, start=0,
                   size: Optional[int] = None) -> jax.Array:
    """hidden [..., E] (what `forward` returns) -> float32 logits [..., size] of the vocabulary
    slice [start, start + size) (default: the whole vocabulary). `start` may be traced;
    `size` is static."""
    size = config.vocab_size if size is None else size
    whole = size == config.vocab_size

    def cut(a: jax.Array, axis: int) -> jax.Array:
        return a if whole else jax.lax.dynamic_slice_in_dim(a, start, size, axis)

    if config.tie_word_embeddings:
        embed = params["embed"]
        head = {"weight": cut(embed["weight"], 0)}  # [size, D]: used transposed, not copied
        if "weight_scale" in embed:
            head["weight_scale"] = cut(embed["weight_scale"], 0)
        if "lm_head" in params and "bias" in params["lm_head"]:
            head["bias"] = cut(params["lm_head"]["bias"], 0)
    else:
        head = {k: cut(a, a.ndim - 1) for k, a in params["lm_head"].items()}  # weight [D, V], scale/bias [V]
    logits = linear(hidden, head, transposed=config.tie_word_embeddings).astype(jnp.float32)
    if config.logit_scale is not None:
        logits = logits * config.logit_scale
    if config.final_logit_softcapping:
        cap = config.final_logit_softcapping
        logits = jnp.tanh(logits / cap) * cap
    return logits


# ---------------------------------------------------------------------------- rotary embeddings
def rope_inv_freq(config: ModelConfig, local: bool) -> Tuple[np.ndarray, float]:
    """Inverse frequencies [rotary/2] and the cos/sin multiplier, following HF's rope variants
    (of sliding layers when `local`, else of full layers)."""
    dim = config.rotary_of(local)
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
    elif kind == "proportional":
        # Gemma 4: the first partial_rotary_factor of the frequencies (exponents over the whole
        # head dim), the rest 0 (those dims are not rotated)
        angles = int(scaling.get("partial_rotary_factor", 1.0) * dim // 2)
        rotated = 1.0 / (theta ** (np.arange(0, 2 * angles, 2, dtype=np.int64).astype(np.float32) / dim))
        inv_freq = np.concatenate([rotated, np.zeros(dim // 2 - angles, np.float32)]) / scaling.get("factor", 1.0)
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
def ring_positions(last: jax.Array, slots: int) -> jax.Array:
    """Positions held by a ring of `slots` slots whose newest position is last [B] -> [B, slots]
    (-1 where nothing was written), assuming every position <= last was written in order."""
    j = jnp.arange(slots, dtype=jnp.int32)[None, :]
    held = last[:, None] - jnp.mod(last[:, None] - j, slots)
    return jnp.where(held >= 0, held, -1)


def _write_ring(buf: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Scatters new [B, T, ...] into ring buf [B, R, ...] at position mod R. Padding (-1) and
    tokens that a later token of the same call overwrites are dropped (no duplicate indices)."""
    b, t = positions.shape
    r = buf.shape[1]
    newest = jnp.max(positions, axis=1, keepdims=True)
    keep = (positions >= 0) & (positions > newest - r)
    slots = jnp.where(keep, jnp.mod(positions, r), r)  # r is out of bounds: dropped
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    return buf.at[rows, slots].set(new.astype(buf.dtype), mode="drop")


def _store(buf: jax.Array, new: jax.Array, positions: jax.Array, write_index, ring: bool) -> jax.Array:
    """Writes new keys or values [B, T, Hkv, hd] into one layer's buffer: a ring (by position mod
    its size), a chunk at slots [write_index, write_index + T), or each token at its position."""
    if ring:
        return _write_ring(buf, new, positions)
    if write_index is not None:
        return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, write_index, 0, 0))
    b, t = positions.shape
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    index = jnp.where(positions >= 0, positions, buf.shape[1])  # padding: out of bounds, dropped
    return buf.at[rows, index].set(new.astype(buf.dtype), mode="drop")


class PassArgs(NamedTuple):
    """What every layer of one `forward` call shares (see `forward` for their meaning):
    positions [B, T], write_index (None or a scalar), rope {"full"/"local": (cos, sin)} (empty
    without rotary embeddings), and the static attend_len, impl and fresh."""

    positions: jax.Array
    write_index: Optional[jax.Array]
    rope: dict
    attend_len: Optional[int]
    impl: str
    fresh: bool


def _attention(config: ModelConfig, q, k, v, k_cache, v_cache, is_sliding: bool, args: PassArgs):
    """Writes the new keys/values into this layer's cache and attends. Returns (out [B, T, Hq*hd],
    k_cache, v_cache).

    Sliding layers keep a ring of min(window, length) slots (when that is `length`, slot ==
    position still); full layers one slot per position."""
    positions, write_index, impl = args.positions, args.write_index, args.impl
    spec = AttentionSpec(config.scale, config.attn_logit_softcapping,
                         config.sliding_window if is_sliding else None,
                         "flash" if impl in ("cudnn", "pallas") else impl,  # fused kernels: `fresh` only
                         config.alibi_slopes if config.position_embedding == "alibi" else None)
    b, t = positions.shape
    slots = k_cache.shape[1]

    def store(k_cache, v_cache):
        return (_store(k_cache, k, positions, write_index, is_sliding),
                _store(v_cache, v, positions, write_index, is_sliding))

    if args.fresh and t > 1:
        # No earlier context: attend over the new tokens only (a fused kernel can run this).
        lengths = jnp.sum(positions >= 0, axis=1)
        if impl == "cudnn":
            out = fused_self_attention(q, k, v, lengths, spec)
        elif impl == "pallas":  # sliding layers too: the splash kernel takes a local (window) mask
            out = pallas_self_attention(q, k, v, lengths, spec)
        else:
            out = attend(q, k, v, positions, positions, spec, self_causal=True, native=config.mesh is None)
        return (out,) + store(k_cache, v_cache)
    if is_sliding and t > 1:
        # Later tokens of the chunk would overwrite ring slots its earlier tokens still see: read
        # the ring as it was, together with the new keys, then write.
        start = positions[:, 0] if write_index is None else jnp.broadcast_to(write_index, (b,))
        k_all = jnp.concatenate([k_cache.astype(k.dtype), k], axis=1)
        v_all = jnp.concatenate([v_cache.astype(v.dtype), v], axis=1)
        k_pos = jnp.concatenate([ring_positions(start - 1, slots), positions], axis=1)
        return (attend(q, k_all, v_all, positions, k_pos, spec),) + store(k_cache, v_cache)
    k_cache, v_cache = store(k_cache, v_cache)
    if is_sliding and (args.attend_len is None or args.attend_len > slots):
        # One token: the slot it overwrote held a position `slots` back, outside the window.
        return (attend(q, k_cache, v_cache, positions, ring_positions(positions[:, 0], slots), spec,
                       native=config.mesh is None), k_cache, v_cache)
    # Full layers; and sliding layers whose ring has not wrapped: every running row's position is
    # below attend_len <= slots, so slot == position there too, and slots past attend_len are unused.
    n = slots if args.attend_len is None else min(args.attend_len, slots)
    k_pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None, :], (b, n))
    out = attend(q, k_cache, v_cache, positions, k_pos, spec, linear_keys=True, native=config.mesh is None)
    return out, k_cache, v_cache


def _self_attention(config: ModelConfig, layer: int, h: jax.Array, lp: dict, k_cache, v_cache, args: PassArgs,
                    reused: Optional[Tuple[jax.Array, jax.Array]] = None):
    """The attention sublayer on normed inputs h [B, T, D]: projections, q/k (and v) norms, rotary
    embeddings, attention, output projection. A layer that reuses an earlier layer's keys and
    values (`config.kv_sources`) takes them as `reused` (k, v [B, T, Hkv, hd], as that layer
    stored them) and writes them into its own cache. Returns (out [B, T, D], k_cache, v_cache,
    (k, v) of this call's tokens)."""
    b, t, _ = h.shape
    hq, hkv, hd = config.num_heads, config.layer_stored_kv_heads(layer), config.layer_head_dim(layer)
    is_sliding = config.layer_types[layer] == "sliding"
    cos_sin = args.rope["local" if is_sliding else "full"] if config.layer_uses_rope(layer) else None
    q = linear(h, lp["q"])
    if config.qk_norm == "full":  # over every head at once, before the heads are split (OLMo 2)
        q = norm(q, lp["q_norm"], config)
    q = q.reshape(b, t, hq, hd)
    if config.qk_norm == "head":
        q = norm(q, lp["q_norm"], config)
    if cos_sin is not None:
        q = apply_rope(q, *cos_sin)
    if reused is not None:
        k, v = reused
    else:
        k, v = linear(h, lp["k"]), linear(h, lp["v"])
        if config.qk_norm == "full":
            k = norm(k, lp["k_norm"], config)
        k, v = k.reshape(b, t, hkv, hd), v.reshape(b, t, hkv, hd)
        if config.qk_norm == "head":
            k = norm(k, lp["k_norm"], config)
        if config.value_norm:
            v = norm(v, None, config)
        if cos_sin is not None:
            k = apply_rope(k, *cos_sin)
    out, k_cache, v_cache = _attention(config, q, k, v, k_cache, v_cache, is_sliding, args)
    return linear(out, lp["o"]), k_cache, v_cache, (k, v)


def gated_mlp(h: jax.Array, gate: dict, up: dict, down: dict, act: str) -> jax.Array:
    """act(h . gate) * (h . up), projected by down: [..., D] -> [..., D] (a dense MLP or one expert)."""
    return linear(activation(linear(h, gate), act) * linear(h, up), down)


def _mlp(config: ModelConfig, layer: int, h: jax.Array, lp: dict, x: jax.Array) -> jax.Array:
    """The MLP sublayer on normed inputs h [B, T, D] -> [B, T, D]: plain, gated, experts, or (Gemma
    4) a gated MLP and experts side by side, the experts on their own norm of the residual stream x
    [B, T, D] and routed on x itself, each output normed."""
    kind = config.layer_mlp(layer)
    if kind == "experts":
        return experts_mlp(config, h, lp)
    if kind == "gated_and_experts":
        dense = gated_mlp(h, lp["gate"], lp["up"], lp["down"], config.activation)
        routed = experts_mlp(config, norm(x, lp["mlp_norm_2"], config), lp, router_input=x)
        return norm(dense, lp["post_mlp_norm_1"], config) + norm(routed, lp["post_mlp_norm_2"], config)
    if kind == "gated":
        return gated_mlp(h, lp["gate"], lp["up"], lp["down"], config.activation)
    return linear(activation(linear(h, lp["up"]), config.activation), lp["down"])


def _per_layer_input(config: ModelConfig, x: jax.Array, lp: dict, inputs: jax.Array) -> jax.Array:
    """Gemma 4's per-layer input after a layer's MLP: x + norm(proj(act(x . gate) * inputs)),
    inputs [B, T, P] this layer's slice of `per_layer_inputs`."""
    h = activation(linear(x, lp["per_layer_gate"]), config.activation) * inputs
    return x + norm(linear(h, lp["per_layer_proj"]), lp["per_layer_norm"], config)


def per_layer_inputs(params: dict, config: ModelConfig, tokens: jax.Array, x: jax.Array) -> jax.Array:
    """Gemma 4's per-layer inputs [B, T, L, P] from tokens [B, T] and the scaled embeddings x [B, T, D]:
    (norm(x . W / sqrt(D)) + sqrt(P) * per_layer_embed[tokens]) / sqrt(2), per layer."""
    b, t, d = x.shape
    size, layers = config.per_layer_input_size, config.num_layers
    ids = lookup(params["per_layer_embed"], tokens, x.dtype) * jnp.asarray(size ** 0.5, x.dtype)
    proj = linear(x, params["per_layer_model_proj"]) * jnp.asarray(d ** -0.5, x.dtype)
    proj = norm(proj.reshape(b, t, layers, size), params["per_layer_model_norm"], config)
    return (proj + ids.reshape(b, t, layers, size)) * jnp.asarray(2.0 ** -0.5, x.dtype)


def _layer(config: ModelConfig, layer: int, x: jax.Array, lp: dict, k_cache: jax.Array, v_cache: jax.Array,
           args: PassArgs, reused=None, layer_inputs: Optional[jax.Array] = None):
    """One layer: its block (sequential or parallel residual) with the config's norm placement,
    then (Gemma 4) its per-layer input `layer_inputs` [B, T, P] and its scale. `reused`: see
    `_self_attention`. Returns (x [B, T, D], k_cache, v_cache, (k, v) of this call's tokens)."""
    def scaled(y):
        return y if config.residual_scale is None else y * jnp.asarray(config.residual_scale, y.dtype)

    if config.block == "parallel":
        h = norm(x, lp["attn_norm"], config)
        attn, k_cache, v_cache, kv = _self_attention(config, layer, h, lp, k_cache, v_cache, args, reused)
        h_mlp = h if config.shared_block_norm else norm(x, lp["mlp_norm"], config)
        x = x + scaled(attn + _mlp(config, layer, h_mlp, lp, x))
        return _layer_end(config, x, lp, layer_inputs), k_cache, v_cache, kv

    placement = config.norm_placement

    def sublayer_input(x, pre: str):
        return x if placement in ("output", "post") else norm(x, lp[pre], config)

    def residual(x, y, pre: str, post: str):
        if placement in ("sandwich", "output"):
            y = norm(y, lp[post], config)
        x = x + scaled(y)
        return norm(x, lp[pre], config) if placement == "post" else x

    attn, k_cache, v_cache, kv = _self_attention(config, layer, sublayer_input(x, "attn_norm"), lp, k_cache,
                                                 v_cache, args, reused)
    x = residual(x, attn, "attn_norm", "post_attn_norm")
    x = residual(x, _mlp(config, layer, sublayer_input(x, "mlp_norm"), lp, x), "mlp_norm", "post_mlp_norm")
    return _layer_end(config, x, lp, layer_inputs), k_cache, v_cache, kv


def _layer_end(config: ModelConfig, x: jax.Array, lp: dict, layer_inputs: Optional[jax.Array]) -> jax.Array:
    """What follows a layer's block (Gemma 4): its per-layer input, then its scale."""
    if layer_inputs is not None:
        x = _per_layer_input(config, x, lp, layer_inputs)
    if config.layer_scale:
        x = x * lp["layer_scale"]["weight"].astype(x.dtype)
    return x


def forward(params: dict, config: ModelConfig, tokens: Optional[jax.Array], positions: jax.Array, cache: KVCache,
            write_index: Optional[jax.Array] = None, *, attend_len: Optional[int] = None, impl: str = "flash",
            fresh: bool = False, embeddings: Optional[jax.Array] = None) -> Tuple[jax.Array, KVCache]:
    """Runs the decoder on new tokens and updates the cache.

    tokens, positions: int32 [B, T]; a position of -1 marks padding (never attended to, never
    stored in a ring).
    embeddings: [B, T, D] input embeddings used in place of `embed(tokens)` (tokens is then
      ignored and may be None): what `embed` returns, the embedding scale included; learned
      position embeddings are still added. Cast to the cache's dtype.
    write_index: None (decode): each token goes to the slot of its own position, row by row.
      A scalar (a chunk): every row's tokens sit at positions [write_index, write_index + T) (or
      are padding), written as one block.
    attend_len (static): full layers read only slots [0, attend_len): every query's position
      must be below it (decode bounds its reads by the live length this way).
    impl (static): the attention implementation ("flash", "cudnn", "dense"; see attention.py).
    fresh (static): the chunk starts at position 0 with nothing before it (write_index == 0),
      and each row's valid positions equal their index (right padding), so attention reads only
      the new tokens, each query block only the keys up to its last row.
    Returns the final-normed hidden states [B, T, D] and the updated cache.
    """
    dtype = cache.dtype
    x = embed(params, config, tokens, dtype) if embeddings is None else embeddings.astype(dtype)
    x = pin(x, config)
    clipped = jnp.maximum(positions, 0)
    if config.position_embedding == "learned":
        x = x + jnp.take(params["pos_embed"]["weight"], clipped, axis=0).astype(dtype)
    if config.embedding_norm:
        x = norm(x, params["embed_norm"], config)
    layer_inputs = None
    if config.per_layer_input_size:
        if tokens is None:
            raise ValueError("this model's per-layer inputs (Gemma 4) are computed from token ids: "
                             "input embeddings alone cannot run it")
        layer_inputs = per_layer_inputs(params, config, tokens, x)
    rope = {}
    if config.position_embedding == "rope":
        rope["full"] = rope_cos_sin(config, clipped, local=False)
        separate = config.rope_local_theta or config.rotary_of(True) != config.rotary_of(False)
        rope["local"] = rope_cos_sin(config, clipped, local=True) if separate else rope["full"]
    args = PassArgs(positions, write_index, rope, attend_len, impl, fresh)
    k_new, v_new = [], []
    sources = set(config.kv_sources) if config.kv_sources else set()
    reusable = {}  # layer -> its (k, v) of this call, for the layers that reuse them
    for i, lp in enumerate(params["layers"]):
        source = config.kv_source(i)
        x, k_l, v_l, kv = _layer(config, i, x, lp, cache.k[i], cache.v[i], args,
                                 reusable[source] if source != i else None,
                                 None if layer_inputs is None else layer_inputs[:, :, i])
        if i in sources:
            reusable[i] = kv
        x = pin(x, config)
        k_new.append(k_l)
        v_new.append(v_l)
    hidden = norm(x, params["final_norm"], config) if config.final_norm else x
    if config.embedding_size is not None:
        hidden = linear(hidden, params["embed_out"])
    return hidden, KVCache(tuple(k_new), tuple(v_new), cache.length)


def chunk_positions(lengths: jax.Array, start, width: int) -> jax.Array:
    """Positions [B, width] of the chunk starting at `start` of right-padded rows of `lengths` [B]
    (-1 past a row's length)."""
    pos = start + jnp.arange(width, dtype=jnp.int32)[None, :]
    return jnp.where(pos < lengths[:, None], pos, -1)


def chunked_pass(params: dict, config: ModelConfig, tokens: Optional[jax.Array], lengths: jax.Array, dtype,
                 chunk: int, per_chunk, impl: str = "flash", embeddings: Optional[jax.Array] = None):
    """A full (non-incremental) pass over right-padded tokens [B, T] in chunks of `chunk` tokens
    (or over input embeddings [B, T, D] in their place: see `forward`).

    T must be a multiple of `chunk`. Each chunk's final-normed hidden states [B, chunk, D] go to
    `per_chunk(hidden, chunk_index)`, whose outputs are stacked on axis 1 and returned, so that
    neither [T, T] attention scores nor [B, T, D]-sized intermediates of every chunk exist at
    once; the KV cache holds T positions (rings for sliding layers).
    """
    b, t = (tokens if embeddings is None else embeddings).shape[:2]
    n = t // chunk
    cache = init_cache(config, b, t, dtype)

    def run(cache, i, fresh):
        start = i * chunk
        if embeddings is None:
            ids, x = jax.lax.dynamic_slice_in_dim(tokens, start, chunk, axis=1), None
        else:
            ids, x = None, jax.lax.dynamic_slice_in_dim(embeddings, start, chunk, axis=1)
        hidden, cache = forward(params, config, ids, chunk_positions(lengths, start, chunk), cache, start,
                                impl=impl, fresh=fresh, embeddings=x)
        return cache, per_chunk(hidden, i)

    cache, first = run(cache, jnp.int32(0), True)
    if n == 1:
        return first
    _, rest = jax.lax.scan(lambda c, i: run(c, i, False), cache, jnp.arange(1, n, dtype=jnp.int32))
    # rest: [n-1, B, chunk, ...] -> [B, (n-1) * chunk, ...]
    rest = jax.tree_util.tree_map(lambda a: jnp.moveaxis(a, 0, 1).reshape((b, (n - 1) * chunk) + a.shape[3:]), rest)
    return jax.tree_util.tree_map(lambda f, r: jnp.concatenate([f, r], axis=1), first, rest)
