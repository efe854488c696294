"""The attention of every pass (jaxgen.model.attention) and the cache layout it reads.

- The blocked online-softmax path equals the one-einsum path on random inputs (windows,
  soft-capping, padding, GQA, key-block skipping).
- On every architecture's tiny model, long mixed-length inputs run in 32-token chunks with
  8 x 8 attention blocks (forced) and ring buffers for sliding layers, and give the logits of
  the dense reference (one pass, scores materialised) and of HF transformers within 1e-4;
  scores and greedy generation with a static prompt agree too.
- The fused-kernel call (cuDNN on GPUs) is checked through XLA's implementation of the same call.
- Decode split into live-length segments gives the same tokens as one segment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgen
from jaxgen.decoding import search
from jaxgen.model import attention
from jaxgen.model.attention import AttentionSpec, attend, fused_self_attention, resolve_attention

hf_models = pytest.importorskip("hf_models")

ARCHS = list(hf_models.ARCHITECTURES)
LONG_LENGTHS = (64, 45, 33, 9, 1)  # two 32-token chunks, every sliding window (4-6) exceeded
TOLERANCE = 1e-4


@pytest.fixture
def small_blocks(monkeypatch):
    """Forces the blocked path with 8 x 8 blocks (compiled programs are dropped before and after)."""
    monkeypatch.setattr(attention, "BLOCK_Q", 8)
    monkeypatch.setattr(attention, "BLOCK_K", 8)
    monkeypatch.setattr(attention, "DENSE_MAX_ELEMENTS", 0)
    monkeypatch.setattr(attention, "DENSE_MAX_QUERIES", 0)
    jax.clear_caches()
    yield
    jax.clear_caches()


def _long_batch(vocab_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.integers(4, vocab_size, size=n).tolist() for n in LONG_LENGTHS]


def _valid(logits, batch) -> np.ndarray:
    return np.concatenate([np.asarray(logits)[i, :len(s)] for i, s in enumerate(batch)])


# ---------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("window", [None, 5, 300])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_blocked_equals_dense(window, softcap):
    b, t, s, hkv, g, hd = 2, 70, 150, 2, 3, 8
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (b, t, hkv, g, hd))
    k = jax.random.normal(keys[1], (b, s, hkv, hd))
    v = jax.random.normal(keys[2], (b, s, hkv, hd))
    # Row 0: 70 queries at positions 80..149; row 1: 30 real queries, then padding.
    q_pos = jnp.stack([jnp.arange(t) + 80, jnp.where(jnp.arange(t) < 30, jnp.arange(t) + 80, -1)])
    k_pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    spec = AttentionSpec(0.3, softcap, window)
    ref_out, ref_lse = attention._dense(q, k, v, q_pos, k_pos, spec)
    for linear_keys in (True, False):
        out, lse = jax.jit(lambda *a: attention._blocked(*a, spec, linear_keys))(q, k, v, q_pos, k_pos)
        assert float(jnp.abs(out - ref_out).max()) < 1e-5
        assert float(jnp.abs(lse - ref_lse).max()) < 1e-4
    assert float(jnp.abs(ref_out[1, 30:]).max()) == 0.0  # padding queries get zeros, not NaN


@pytest.mark.parametrize("window", [None, 5, 100, 300])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_causal_blocks_of_a_fresh_chunk_equal_dense(window, softcap):
    """self_causal: a fresh chunk's query blocks read only the keys they can see, and give the
    one-einsum result (right padding, GQA, windows shorter and longer than a block)."""
    b, t, hq, hkv, hd = 2, 300, 6, 2, 8  # blocks of CAUSAL_SPLIT rows, the last one short
    assert t > 2 * attention.CAUSAL_SPLIT
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    q = jax.random.normal(keys[0], (b, t, hq, hd))
    k = jax.random.normal(keys[1], (b, t, hkv, hd))
    v = jax.random.normal(keys[2], (b, t, hkv, hd))
    pos = jnp.stack([jnp.arange(t), jnp.where(jnp.arange(t) < 170, jnp.arange(t), -1)])  # row 1: 170 tokens
    ref = attend(q, k, v, pos, pos, AttentionSpec(0.3, softcap, window, "dense"))
    out = jax.jit(lambda *a: attend(*a, AttentionSpec(0.3, softcap, window, "flash"), self_causal=True))(
        q, k, v, pos, pos)
    assert float(jnp.abs(out - ref).max()) < 1e-5
    assert float(jnp.abs(out[1, 170:]).max()) == 0.0


def test_blocked_visits_only_visible_key_blocks(monkeypatch):
    """With linear keys, a query block reads no key block past its last position: keys there are
    NaN here and would poison the result if they were read."""
    monkeypatch.setattr(attention, "BLOCK_Q", 8)
    monkeypatch.setattr(attention, "BLOCK_K", 8)
    b, t, s, hd = 1, 16, 64, 4
    q = jnp.ones((b, t, 1, 1, hd))
    k = jnp.ones((b, s, 1, hd)).at[:, 24:].set(jnp.nan)
    v = jnp.ones((b, s, 1, hd)).at[:, 24:].set(jnp.nan)
    q_pos = jnp.arange(t)[None] + 8  # positions 8..23
    k_pos = jnp.arange(s)[None]
    out, _ = attention._blocked(q, k, v, q_pos, k_pos, AttentionSpec(1.0, None, None), True)
    assert bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize("window", [None, 6])
def test_fused_call_matches_portable_attention(window):
    """The arguments given to jax.nn.dot_product_attention (cuDNN on GPUs) mean the same masks as
    the portable path: checked with XLA's implementation of the same call."""
    b, t, hq, hkv, hd = 3, 40, 4, 2, 16
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    q = jax.random.normal(keys[0], (b, t, hq, hd))
    k = jax.random.normal(keys[1], (b, t, hkv, hd))
    v = jax.random.normal(keys[2], (b, t, hkv, hd))
    lengths = jnp.array([40, 17, 1])
    pos = jnp.where(jnp.arange(t)[None] < lengths[:, None], jnp.arange(t)[None], -1)
    spec = AttentionSpec(0.3, None, window)
    ref = attend(q, k, v, pos, pos, spec)
    got = fused_self_attention(q, k, v, lengths, spec, implementation="xla")
    valid = (pos >= 0)[:, :, None]
    assert float(jnp.abs(jnp.where(valid, got - ref, 0)).max()) < 1e-5


def test_attention_choice_and_errors(jaxgen_tiny_model):
    path = jaxgen_tiny_model("llama")
    config = jaxgen.Generator(path).config
    assert resolve_attention("auto", "cpu", config, jnp.float32) == "flash"
    assert resolve_attention("auto", "cuda", config, jnp.bfloat16) == "cudnn"
    assert resolve_attention("auto", "cuda", config, jnp.float32) == "flash"  # cuDNN needs 16-bit types
    assert resolve_attention("auto", "cuda", config.replace(attn_logit_softcapping=50.0), jnp.bfloat16) == "flash"
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        jaxgen.Generator(path, attention="cudnn")
    with pytest.raises(ValueError, match="attention must be one of"):
        jaxgen.Generator(path, attention="splash")
    with pytest.raises(TypeError, match="attention must be a str"):
        jaxgen.Generator(path, attention=1)
    with pytest.raises(ValueError, match="prefill_chunk must be a positive multiple of 32"):
        jaxgen.Generator(path, prefill_chunk=40)
    assert jaxgen.Generator(path, attention="dense").attention == "dense"


# ---------------------------------------------------------------------------- whole model
@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a in ("qwen2", "qwen3", "gemma") else a
                                  for a in ARCHS])  # attention like llama's or gemma2/3's: `make test-slow`
def test_chunked_blocked_attention_matches_dense_and_hf(arch, hf_tiny_model, jaxgen_tiny_model, small_blocks):
    tiny = hf_tiny_model(arch)
    path = jaxgen_tiny_model(arch)
    batch = _long_batch(tiny.vocab_size)
    dense = jaxgen.Generator(path, attention="dense")
    flash = jaxgen.Generator(path, attention="flash", prefill_chunk=32)
    ref = _valid(dense.forward_batch(batch), batch)
    got = _valid(flash.forward_batch(batch), batch)
    diff = float(np.abs(got - ref).max())
    assert diff <= TOLERANCE, f"{arch}: chunked/blocked vs dense max |logit diff| {diff:.3g}"
    if arch != "phi3":  # HF switches longrope to its long factors past 16 tokens; jaxgen keeps the short ones
        hf = _valid(tiny.logits(batch), batch)
        diff = float(np.abs(got - hf).max())
        assert diff <= TOLERANCE, f"{arch}: chunked/blocked vs HF max |logit diff| {diff:.3g}"

    scored_dense = dense.score_batch(batch)
    scored_flash = flash.score_batch(batch)
    for a, b in zip(scored_dense, scored_flash):
        assert a.tokens == b.tokens
        assert np.allclose(a.log_probs, b.log_probs, atol=TOLERANCE)


@pytest.mark.parametrize("arch", ["llama", pytest.param("gemma2", marks=pytest.mark.slow), "gemma3_text",
                                  pytest.param("gpt2", marks=pytest.mark.slow), pytest.param("qwen2", marks=pytest.mark.slow)])
def test_generation_with_static_prompt_matches_dense(arch, jaxgen_tiny_model, small_blocks):
    """Chunked prefill (a 10-token static prompt, then prompts of 40/21/5 tokens in 32-token chunks)
    and ring-buffer decode give the dense reference's tokens and scores."""
    path = jaxgen_tiny_model(arch)
    dense = jaxgen.Generator(path, attention="dense")
    flash = jaxgen.Generator(path, attention="flash", prefill_chunk=32)
    vocab = dense.vocabulary
    rng = np.random.default_rng(3)
    prompts = [[vocab.tokens[i] for i in rng.integers(4, 200, size=n)] for n in (40, 21, 5)]
    static = [vocab.tokens[i] for i in rng.integers(4, 200, size=10)]
    kwargs = dict(max_length=10, static_prompt=static, return_scores=True, include_prompt_in_result=False,
                  end_token=[])
    for beam_size in (1, 3):
        ref = dense.generate_batch(prompts, beam_size=beam_size, **kwargs)
        got = flash.generate_batch(prompts, beam_size=beam_size, **kwargs)
        for r, g in zip(ref, got):
            assert g.sequences_ids == r.sequences_ids
            assert np.allclose(g.scores, r.scores, atol=TOLERANCE)


@pytest.mark.parametrize("model, continuous", [
    ("llama", False), pytest.param("llama", True, marks=pytest.mark.slow),
    pytest.param("sliding", False, marks=pytest.mark.slow), ("sliding", True),
], ids=["llama-static", "llama-scheduler", "sliding-static", "sliding-scheduler"])
def test_decode_in_live_segments_matches_one_segment(jaxgen_tiny_model, cli_tiny_model, monkeypatch, continuous,
                                                     model):
    """Decode bounds its reads by the live length in power-of-two segments (llama: 16, 32, 64, 128;
    the gemma3-like model, sliding window 8: 4 and 8, where its sliding layers read the unwrapped
    ring as a position-indexed cache, then 16-128, where they read it as a ring): the tokens equal those of one
    segment that reads the whole cache."""
    # 104 positions, past the tiny llama's 64: the context check is lifted (this is about cache reads)
    path, minimum = (jaxgen_tiny_model("llama"), 16) if model == "llama" else (cli_tiny_model, 4)
    generator = jaxgen.Generator(path, continuous_batching=continuous, context_length=256)
    module = "jaxgen.runtime.scheduler" if continuous else "jaxgen.runtime.generation"
    prompt = [generator.vocabulary.tokens[i] for i in (5, 9, 11, 40, 7)][:5 if model == "llama" else 3]
    options = dict(max_length=100, end_token=[], include_prompt_in_result=False, return_scores=True)
    real_live_length = search.live_length
    calls = []

    def small_segments(needed, length, rows=1):
        calls.append(real_live_length(needed, length, rows, minimum=minimum))
        return calls[-1]

    monkeypatch.setattr(f"{module}.live_length", small_segments)
    segmented = generator.generate_batch([prompt, prompt[:2]], **options)
    assert sorted(set(calls)) == [s for s in (4, 8, 16, 32, 64, 128) if s >= minimum]
    monkeypatch.setattr(f"{module}.live_length", lambda needed, length, rows=1: length)
    whole = generator.generate_batch([prompt, prompt[:2]], **options)
    for s, w in zip(segmented, whole):
        assert s.sequences_ids == w.sequences_ids
        assert len(w.sequences_ids[0]) == 100
        assert np.allclose(s.scores, w.scores, atol=1e-5)


def test_live_length_starts_lower_for_large_batches():
    assert [search.live_length(10, 4096, rows) for rows in (1, 4, 8, 16, 64)] == [512, 512, 256, 128, 128]
    assert search.live_length(600, 4096, 16) == 1024 and search.live_length(600, 700, 1) == 700
    assert search.live_length(3, 4096, minimum=4) == 4
