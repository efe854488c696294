"""Attention of new tokens over keys that carry their absolute positions.

One function, `attend`, serves every pass of the decoder (prefill chunks, full passes for
scoring, one-token decode). Keys come with `k_pos` [B, S], the absolute position each key slot
holds (-1: empty). A query at position p sees a key at position k when

    0 <= k <= p   and, for sliding-window layers,   p - k < window,

which covers padding, causality, sliding windows, ring buffers and static-prompt prefixes alike.
GQA/MQA group the query heads of each key/value head (no key/value copies); attention logit
soft-capping is applied before masking.

Implementations (`ATTENTION_IMPLEMENTATIONS`):
- "flash": the portable path. Small problems (and decode steps) compute the masked scores in one
  einsum; larger ones run a blocked online-softmax ("flash") loop over key blocks for each query
  block, visiting only the key blocks that the block's positions can see, so memory is
  O(new tokens x block) whatever the number of key slots.
- "cudnn": NVIDIA's fused kernel through `jax.nn.dot_product_attention(implementation="cudnn")`
  where its constraints hold (see `cudnn_supported`): causal self-attention of a chunk that has
  no earlier context, 16-bit dtypes, no soft-capping. Every other call takes the portable path.
- "pallas": JAX's Pallas TPU "splash attention" kernel
  (`jax.experimental.pallas.ops.tpu.splash_attention`) for the same calls as "cudnn": causal
  self-attention of a chunk with no earlier context, sliding windows (a local mask) and logit
  soft-capping included, GQA without key/value copies (see `pallas_supported`,
  `pallas_self_attention`). Every other call takes the portable path.
- "dense": the reference: one masked softmax over all keys, [T, S] materialised (tests, debugging).
- "auto": "cudnn" on NVIDIA GPUs and "pallas" on TPUs when the model allows it, else "flash".

Shapes: B batch, T new tokens (queries), S key slots, Hq query heads, Hkv key/value heads,
G = Hq / Hkv, hd head dim.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

ATTENTION_IMPLEMENTATIONS = ("auto", "flash", "cudnn", "pallas", "dense")
MASK_VALUE = -1e30  # finite: a query that sees no key (padding) gets zeros, never NaN
BLOCK_Q = 512  # query rows per block of the blocked path
BLOCK_K = 512  # key slots per block of the blocked path
DENSE_MAX_ELEMENTS = 1 << 24  # B * Hq * T * S scores above which the blocked path runs
DENSE_MAX_QUERIES = 16  # decode steps (and small verifications) always take the one-einsum path
CAUSAL_SPLIT = 64  # query rows per static block of a fresh chunk's causal self-attention


class AttentionSpec(NamedTuple):
    """Static description of one layer's attention (hashable: part of jitted functions' keys)."""

    scale: float
    softcap: Optional[float]  # attention logit soft-capping (Gemma 2)
    window: Optional[int]  # sliding window, None for full attention
    impl: str = "flash"  # "flash" | "cudnn" | "pallas" | "dense" (already resolved from "auto")
    alibi: Optional[Tuple[float, ...]] = None  # ALiBi slope per query head: score += slope * (k_pos - q_pos)


def visible(q_pos: jax.Array, k_pos: jax.Array, window: Optional[int]) -> jax.Array:
    """q_pos [B, T], k_pos [B, S] -> bool [B, T, S]: which keys each query may attend to."""
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask = mask & (q - k < window)
    return mask


def _scores(q: jax.Array, k: jax.Array, q_pos: jax.Array, k_pos: jax.Array, spec: AttentionSpec) -> jax.Array:
    """q [B, T, Hkv, G, hd], k [B, S, Hkv, hd], q_pos [B, T], k_pos [B, S] -> float32 scores
    [B, Hkv, G, T, S] (ALiBi biases added; query head h = kv * G + g, as HF groups heads)."""
    s = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype), preferred_element_type=jnp.float32) * spec.scale
    if spec.softcap:
        s = jnp.tanh(s / spec.softcap) * spec.softcap
    if spec.alibi is not None:
        hkv, g = q.shape[2], q.shape[3]
        slopes = jnp.asarray(spec.alibi, jnp.float32).reshape(hkv, g)[None, :, :, None, None]
        distance = (k_pos[:, None, :] - q_pos[:, :, None]).astype(jnp.float32)  # [B, T, S], <= 0 where visible
        s = s + slopes * distance[:, None, None]
    return s


def _dense(q, k, v, q_pos, k_pos, spec: AttentionSpec) -> Tuple[jax.Array, jax.Array]:
    """One masked softmax over all S keys. Returns out [B, T, Hkv, G, hd] (q's dtype) and the
    log-sum-exp [B, Hkv, G, T] (MASK_VALUE where a query sees nothing)."""
    mask = visible(q_pos, k_pos, spec.window)[:, None, None]  # [B, 1, 1, T, S]
    s = jnp.where(mask, _scores(q, k, q_pos, k_pos, spec), MASK_VALUE)
    m = jnp.max(s, axis=-1, keepdims=True)
    # Masked scores are MASK_VALUE, so exp(s - m) is exactly 0 for them, except in a row that sees
    # no key (m == MASK_VALUE): shifting by at least MASK_VALUE / 2 makes those 0 too, without a
    # second pass over the mask.
    p = jnp.exp(s - jnp.maximum(m, MASK_VALUE / 2))
    denom = jnp.sum(p, axis=-1)
    weights = (p / jnp.maximum(denom, 1e-30)[..., None]).astype(q.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", weights, v.astype(q.dtype))
    lse = jnp.where(denom > 0, m[..., 0] + jnp.log(jnp.maximum(denom, 1e-30)), MASK_VALUE)
    return out, lse


def _pad_axis(x: jax.Array, axis: int, multiple: int, value) -> jax.Array:
    size = x.shape[axis]
    extra = -size % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _blocked(q, k, v, q_pos, k_pos, spec: AttentionSpec, linear_keys: bool) -> Tuple[jax.Array, jax.Array]:
    """Online-softmax attention over key blocks, one query block at a time.

    linear_keys: the keys satisfy k_pos[b, s] == s wherever valid (a cache indexed by position),
    so a query block visits only key blocks [lo, hi) that its positions can see.
    Same outputs as `_dense`; memory O(B * Hq * BLOCK_Q * BLOCK_K).
    """
    b, t, hkv, g, hd = q.shape
    bq = min(BLOCK_Q, t)
    q = _pad_axis(q, 1, bq, 0)
    q_pos = _pad_axis(q_pos, 1, bq, -1)
    k = _pad_axis(k, 1, BLOCK_K, 0)
    v = _pad_axis(v, 1, BLOCK_K, 0)
    k_pos = _pad_axis(k_pos, 1, BLOCK_K, -1)
    n_kblocks = k.shape[1] // BLOCK_K
    n_qblocks = q.shape[1] // bq

    def query_block(i):
        qb = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1)
        qpb = jax.lax.dynamic_slice_in_dim(q_pos, i * bq, bq, axis=1)
        if linear_keys:
            valid = qpb >= 0
            top = jnp.max(jnp.where(valid, qpb, -1))
            hi = jnp.clip(top // BLOCK_K + 1, 0, n_kblocks)
            lo = jnp.int32(0)
            if spec.window is not None:
                bottom = jnp.min(jnp.where(valid, qpb, jnp.iinfo(jnp.int32).max))
                lo = jnp.clip((bottom - spec.window + 1) // BLOCK_K, 0, n_kblocks)
        else:
            lo, hi = jnp.int32(0), jnp.int32(n_kblocks)

        def key_block(j, carry):
            m, l, acc = carry
            kb = jax.lax.dynamic_slice_in_dim(k, j * BLOCK_K, BLOCK_K, axis=1)
            vb = jax.lax.dynamic_slice_in_dim(v, j * BLOCK_K, BLOCK_K, axis=1)
            kpb = jax.lax.dynamic_slice_in_dim(k_pos, j * BLOCK_K, BLOCK_K, axis=1)
            mask = visible(qpb, kpb, spec.window)[:, None, None]
            s = jnp.where(mask, _scores(qb, kb, qpb, kpb, spec), MASK_VALUE)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            correction = jnp.exp(m - m_new)
            l = l * correction + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bkgts,bskd->bkgtd", p.astype(qb.dtype), vb.astype(qb.dtype),
                            preferred_element_type=jnp.float32)
            return m_new, l, acc * correction[..., None] + pv

        init = (jnp.full((b, hkv, g, bq), MASK_VALUE, jnp.float32), jnp.zeros((b, hkv, g, bq), jnp.float32),
                jnp.zeros((b, hkv, g, bq, hd), jnp.float32))
        m, l, acc = jax.lax.fori_loop(lo, hi, key_block, init)
        out = (acc / jnp.maximum(l, 1e-30)[..., None]).astype(q.dtype)  # [B, Hkv, G, bq, hd]
        lse = jnp.where(l > 0, m + jnp.log(jnp.maximum(l, 1e-30)), MASK_VALUE)
        return out.transpose(0, 3, 1, 2, 4), lse

    outs, lses = jax.lax.map(query_block, jnp.arange(n_qblocks))  # [nq, B, bq, Hkv, G, hd], [nq, B, Hkv, G, bq]
    out = outs.transpose(1, 0, 2, 3, 4, 5).reshape(b, n_qblocks * bq, hkv, g, hd)[:, :t]
    lse = lses.transpose(1, 2, 3, 0, 4).reshape(b, hkv, g, n_qblocks * bq)[..., :t]
    return out, lse


def uses_blocked(batch: int, heads: int, queries: int, keys: int) -> bool:
    """Whether the portable path runs blocked for these (static) sizes."""
    return queries > DENSE_MAX_QUERIES and batch * heads * queries * keys > DENSE_MAX_ELEMENTS


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, spec: AttentionSpec,
           *, linear_keys: bool = False, self_causal: bool = False, native: bool = False) -> jax.Array:
    """q [B, T, Hq, hd], k/v [B, S, Hkv, hd], q_pos [B, T], k_pos [B, N] -> [B, T, Hq * hd]: the
    keys are the first N <= S slots of k/v (a cache read up to a static length; passing it whole
    lets the native decode kernel read it in place, where a slice would be copied).

    `linear_keys` (static) promises k_pos[b, s] == s for every valid slot (a position-indexed
    cache), which lets the blocked path skip key blocks no query of a block can see.
    `self_causal` (static) promises more: k and v are the queries' own chunk (S == T, k_pos ==
    q_pos) and every valid position equals its index (a fresh, right-padded chunk), so query
    rows [i, j) see keys [i - window + 1, j) at most: the one-einsum path then runs in static
    blocks of CAUSAL_SPLIT rows over those keys only (about 56% of the work at T = 512).
    A query with position -1 (padding) yields zeros.
    `native` (static) allows jaxgen's native CPU kernels (`uses_native`: decode steps, and
    self_causal chunks); the caller says whether the arrays live on one device.
    """
    b, t, hq, hd = q.shape
    hkv = k.shape[2]
    if native and uses_native(q, k, v, spec, self_causal):
        from jaxgen.model import native as kernels

        if self_causal:
            lengths = jnp.sum(q_pos >= 0, axis=1)
            return kernels.causal_attention(q, k, v, lengths, spec.scale, spec.softcap,
                                            spec.window).reshape(b, t, hq * hd)
        mask = visible(q_pos, k_pos, spec.window)[:, 0]  # [B, N]
        return kernels.decode_attention(q[:, 0], k, v, mask, spec.scale, spec.softcap).reshape(b, 1, hq * hd)
    k, v = k[:, :k_pos.shape[1]], v[:, :k_pos.shape[1]]
    qg = q.reshape(b, t, hkv, hq // hkv, hd)
    if spec.impl != "dense" and uses_blocked(b, hq, t, k.shape[1]):
        out, _ = _blocked(qg, k, v, q_pos, k_pos, spec, linear_keys)
    elif spec.impl != "dense" and self_causal and t > CAUSAL_SPLIT:
        out = jnp.concatenate([_causal_block(qg, k, v, q_pos, start, min(start + CAUSAL_SPLIT, t), spec)
                               for start in range(0, t, CAUSAL_SPLIT)], axis=1)
    else:
        out, _ = _dense(qg, k, v, q_pos, k_pos, spec)
    return out.reshape(b, t, hq * hd)


def native_reason(platform: str, dtype, impl: str, alibi: bool) -> Optional[str]:
    """None when decode steps and fresh chunks can run jaxgen's native kernels
    (`jaxgen.model.native`): float32 on CPU, the portable implementation ("flash"; "dense" stays
    XLA's reference), no ALiBi, and the kernels compiled on this machine; else why they run XLA's
    formulation. The decode kernel reads each cache row once where XLA:CPU copied every layer's key
    cache into the [hd, S] layout of its dot each step; the causal one replaces XLA's small
    per-block dots and softmaxes."""
    if platform != "cpu" or jnp.dtype(dtype) != jnp.float32 or impl != "flash":
        return f"{impl} attention in {jnp.dtype(dtype).name} on {platform}"
    if alibi:
        return "the native kernels have no ALiBi"
    from jaxgen.model import native

    return None if native.available() else f"native kernels unavailable: {native.unavailable_reason()}"


def uses_native(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec, self_causal: bool = False) -> bool:
    """Whether `attend(native=True)` runs a native kernel: one query per row (decode) or a
    self_causal chunk, q, k and v of one dtype, and `native_reason` has no objection."""
    return ((self_causal or q.shape[1] == 1) and q.dtype == k.dtype == v.dtype
            and native_reason(jax.default_backend(), q.dtype, spec.impl, spec.alibi is not None) is None)


def decode_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, visible_slots: jax.Array, scale: float,
                               softcap: float = 0.0) -> jax.Array:
    """What the native decode kernel computes, in XLA: q [B, Hq, hd] over the first N slots of k/v
    [B, S, Hkv, hd] where visible_slots [B, N] is true -> [B, Hq, hd] (zeros for a row that sees nothing)."""
    b, hq, hd = q.shape
    n, hkv = visible_slots.shape[1], k.shape[2]
    k_pos = jnp.where(visible_slots, jnp.arange(n, dtype=jnp.int32)[None, :], -1)
    q_pos = jnp.full((b, 1), n, jnp.int32)  # after every slot: exactly the visible ones are seen
    out, _ = _dense(q.reshape(b, 1, hkv, hq // hkv, hd), k[:, :n], v[:, :n], q_pos, k_pos,
                    AttentionSpec(scale, softcap or None, None))
    return out.reshape(b, hq, hd)


def causal_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, scale: float,
                               softcap: float = 0.0, window: int = 0) -> jax.Array:
    """What the native causal kernel computes, in XLA: q [B, T, Hq, hd] over k/v [B, T, Hkv, hd],
    row b's first lengths[b] tokens real -> [B, T, Hq, hd] (zeros for padding queries)."""
    b, t, hq, hd = q.shape
    index = jnp.arange(t, dtype=jnp.int32)[None, :]
    pos = jnp.where(index < lengths[:, None], index, -1)
    out, _ = _dense(q.reshape(b, t, k.shape[2], hq // k.shape[2], hd), k, v, pos, pos,
                    AttentionSpec(scale, softcap or None, window or None))
    return out.reshape(b, t, hq, hd)


def _causal_block(qg, k, v, pos, start: int, stop: int, spec: AttentionSpec) -> jax.Array:
    """Query rows [start, stop) of a fresh chunk's self-attention over the only keys they can
    see, [start - window + 1, stop) (see `attend`'s self_causal). Returns [B, stop - start, Hkv, G, hd]."""
    lo = 0 if spec.window is None else max(0, start - spec.window + 1)
    out, _ = _dense(qg[:, start:stop], k[:, lo:stop], v[:, lo:stop], pos[:, start:stop], pos[:, lo:stop], spec)
    return out


# ---------------------------------------------------------------------------- fused kernels
def cudnn_supported(dtype, head_dim: int, softcap: Optional[float]) -> Optional[str]:
    """None when the cuDNN kernel can run this model's attention, else the reason it cannot."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"cuDNN attention needs float16/bfloat16, the model computes in {jnp.dtype(dtype).name}"
    if head_dim > 128 or head_dim % 8:
        return f"cuDNN attention needs a head dim <= 128 and a multiple of 8, got {head_dim}"
    if softcap:
        return "cuDNN attention has no logit soft-capping"
    return None


def fused_self_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, spec: AttentionSpec,
                         implementation: str = "cudnn") -> jax.Array:
    """Causal self-attention of a chunk with no earlier context, through `jax.nn.dot_product_attention`.

    q [B, T, Hq, hd], k/v [B, T, Hkv, hd]; row b's first lengths[b] tokens are real (positions
    0..lengths[b]-1), the rest padding. Returns [B, T, Hq * hd]. `implementation="xla"` runs the
    same call through XLA (used to check this path on machines without a GPU).
    """
    b, t, hq, hd = q.shape
    window = None if spec.window is None else (spec.window - 1, 0)
    lengths = jnp.maximum(lengths, 1).astype(jnp.int32)  # an empty row would give NaN; its output is unused
    out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), scale=spec.scale, is_causal=True,
                                       query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                       local_window_size=window, implementation=implementation)
    return out.reshape(b, t, hq * hd)


# Pallas TPU kernel (splash attention). Its tile sizes: sequence blocks of 128, 256 or 512 rows
# (multiples of the TPU's 128 lanes), so the chunk is padded to a multiple of 128 and the largest
# of these blocks that divides it is used; the head dim is zero-padded to a multiple of 128 (JAX's
# own tests of the kernel use head dims 128 and 256; zero columns change neither q.k nor the output
# columns that are kept). Inference only: no backward blocks are set.
PALLAS_LANES = 128
PALLAS_BLOCKS = (512, 256, 128)
PALLAS_MAX_HEAD_DIM = 256
# Test-only switch, read at trace time: run the Pallas kernel in interpret mode (plain XLA, any
# platform) and let resolve_attention accept attention="pallas" off a TPU. Never set in production.
_PALLAS_INTERPRET = False


def _splash_module():
    from jax.experimental.pallas.ops.tpu import splash_attention  # imported on use: TPU-only kernel

    return splash_attention


def pallas_supported(dtype, head_dim: int, softcap: Optional[float] = None) -> Optional[str]:
    """None when the Pallas TPU kernel can run this model's attention, else the reason it cannot.

    Soft-capping and sliding windows are supported by the kernel (softcap is accepted for a
    signature like `cudnn_supported`'s)."""
    del softcap  # supported: attn_logits_soft_cap
    try:
        _splash_module()
    except ImportError as exc:  # pragma: no cover - depends on the installed jax
        return f"this jax has no Pallas splash-attention kernel ({exc})"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        return (f"Pallas TPU attention is used with bfloat16/float32 only (the kernel's tested dtypes), the model "
                f"computes in {jnp.dtype(dtype).name}")
    if head_dim > PALLAS_MAX_HEAD_DIM:
        return f"Pallas TPU attention is used for head dims <= {PALLAS_MAX_HEAD_DIM}, got {head_dim}"
    return None


def pallas_self_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, spec: AttentionSpec,
                          interpret: Optional[bool] = None) -> jax.Array:
    """Causal self-attention of a chunk with no earlier context, through JAX's Pallas TPU
    splash-attention kernel. Same contract as `fused_self_attention`: q [B, T, Hq, hd],
    k/v [B, T, Hkv, hd]; row b's first lengths[b] tokens are real (positions 0..lengths[b]-1), the
    rest padding. Returns [B, T, Hq * hd], zeros at padding rows (like `attend`).

    Masks: causal, or a local window (q - k < spec.window) for sliding layers; padding is a
    separate segment (id 0, real tokens 1), so it never mixes with real tokens and every padding
    row still sees itself (no empty softmax). The kernel does not scale q.k: q is pre-scaled, which
    also makes its soft-capping tanh(q.k / cap) * cap match `_scores`. GQA: the kernel maps each
    query head to its key/value head itself (Hq % Hkv == 0), no copies. Batch rows are vmapped.
    `interpret` (None: the module's test-only `_PALLAS_INTERPRET`) runs the kernel in Pallas's
    interpret mode, on any platform.
    """
    sa = _splash_module()
    interpret = _PALLAS_INTERPRET if interpret is None else bool(interpret)
    b, t, hq, hd = q.shape
    dtype = q.dtype
    tp = t + (-t % PALLAS_LANES)
    block = next(n for n in PALLAS_BLOCKS if tp % n == 0)
    hdp = hd + (-hd % PALLAS_LANES)

    def heads_first(x):  # [B, T, H, hd] -> [B, H, Tp, hdp]
        x = jnp.pad(x.astype(dtype), ((0, 0), (0, tp - t), (0, 0), (0, hdp - hd)))
        return x.transpose(0, 2, 1, 3)

    qs = heads_first((q.astype(jnp.float32) * spec.scale).astype(dtype))
    ks, vs = heads_first(k), heads_first(v)
    real = jnp.arange(tp, dtype=jnp.int32)[None, :] < lengths.astype(jnp.int32)[:, None]  # [B, Tp]
    segments = real.astype(jnp.int32)
    if spec.window is None:
        mask = sa.CausalMask((tp, tp))
    else:
        mask = sa.LocalMask((tp, tp), (spec.window - 1, 0), 0)  # k in [q - window + 1, q]
    kernel = sa.make_splash_mha_single_device(
        sa.MultiHeadMask([mask] * hq), block_sizes=sa.BlockSizes(block_q=block, block_kv=block),
        attn_logits_soft_cap=spec.softcap, interpret=interpret)
    out = jax.vmap(lambda qb, kb, vb, sb: kernel(qb, kb, vb, sa.SegmentIds(q=sb, kv=sb)))(qs, ks, vs, segments)
    out = out[:, :, :t, :hd].transpose(0, 2, 1, 3)  # [B, T, Hq, hd]
    out = jnp.where(real[:, :t, None, None], out, jnp.zeros((), out.dtype))
    return out.reshape(b, t, hq * hd)


def _fused_reason(config) -> Optional[str]:
    """Why no fused kernel can run this model whatever the device (None: one may)."""
    if getattr(config, "position_embedding", None) == "alibi":
        return "the fused kernels take no ALiBi position biases"
    return None


def resolve_attention(requested: str, platform: str, config, dtype) -> str:
    """"auto" -> the implementation that runs on this platform for this model; explicit choices
    are checked (ValueError naming why a fused kernel cannot run)."""
    if requested not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}, got {requested!r}")
    reason = _fused_reason(config) or cudnn_supported(dtype, config.max_head_dim, config.attn_logit_softcapping)

    def pallas_reason() -> Optional[str]:  # asked only on a TPU or for "pallas": it imports the TPU kernel (0.3 s)
        return _fused_reason(config) or pallas_supported(dtype, config.max_head_dim, config.attn_logit_softcapping)

    if requested == "auto":
        if platform == "cuda" and reason is None:
            return "cudnn"
        if platform == "tpu" and pallas_reason() is None:
            return "pallas"
        return "flash"
    if requested == "cudnn":
        if platform != "cuda":
            raise ValueError(f"attention='cudnn' needs an NVIDIA GPU (device is {platform})")
        if reason is not None:
            raise ValueError(f"attention='cudnn' cannot run this model: {reason}")
    if requested == "pallas":
        if platform != "tpu" and not _PALLAS_INTERPRET:
            raise ValueError(f"attention='pallas' needs a TPU (device is {platform})")
        why = pallas_reason()
        if why is not None:
            raise ValueError(f"attention='pallas' cannot run this model: {why}")
    return requested


def describe_attention(config, platform: str, dtype=None, requested: str = "auto") -> str:
    """One line for `jaxgen info`: which attention runs, and why not the fused kernel."""
    dtype = dtype if dtype is not None else jnp.dtype(config.weight_dtype if config.weight_dtype != "int8"
                                                      else "float32")
    impl = resolve_attention(requested, platform, config, dtype)
    if impl == "cudnn":
        return ("cudnn (fused kernel for chunks without earlier context; portable blocked attention for "
                "chunks after a prefix and for decode)")
    if impl == "pallas":
        return ("pallas (Pallas TPU splash-attention kernel for chunks without earlier context; portable "
                "blocked attention for chunks after a prefix and for decode)")
    text = (f"{impl} (portable: one einsum for small inputs and decode, causal query blocks for a first chunk, "
            f"blocked online softmax for long inputs)" if impl == "flash" else
            f"{impl} (the reference: one einsum over every key, scores materialised)")
    if impl == "flash" and platform == "cpu" and jnp.dtype(dtype) == jnp.float32:
        reason = native_reason(platform, dtype, impl, config.position_embedding == "alibi")
        text += ("; decode steps and first chunks: jaxgen's native kernels" if reason is None
                 else f"; decode steps and first chunks: XLA ({reason})")
    if platform == "cuda":
        reason = _fused_reason(config) or cudnn_supported(dtype, config.max_head_dim, config.attn_logit_softcapping)
        text += f"; cuDNN not used: {reason or f'attention={requested!r} requested'}"
    if platform == "tpu":
        reason = _fused_reason(config) or pallas_supported(dtype, config.max_head_dim, config.attn_logit_softcapping)
        text += f"; Pallas kernel not used: {reason or f'attention={requested!r} requested'}"
    return text
