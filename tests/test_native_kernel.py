"""jaxgen's native CPU products (`jaxgen.model.native`: candidates "c8", int8, and "c32", float32,
of the CPU chooser).

* It compiles on a machine with a C++ compiler (this test fails if a compiler is there and the
  build does not work) and says which instruction set it was built for.
* Exact against an int64 reference over the shapes its code paths split on: one to many rows
  (groups of 8 plus 1-7 left, blocks of w's rows), K that is not a multiple of the vector width (the scalar tail),
  N not a multiple of a thread's chunk, extreme values (-128 weights, +-127 activations), the
  head's width; under jit and vmap.
* The float32 product is within float32 rounding of an float64 reference over the same shapes, and
  differentiable (its tangents are plain dots); `decoder.linear` runs it where the chooser picks it.
* Without a compiler (or with JAXGEN_NATIVE=0) it is unavailable with a reason, the chooser does
  not offer it, and nothing raises; the chooser offers it for [N, K] weights only.
* The compiled library is cached: a second load in a new process does not compile.
* The decode-step attention kernel (`native.decode_attention`) equals XLA's formulation (GQA/MHA/
  MQA, soft-capping, a cache read up to N slots, rows that see nothing; jit, vmap, grad), and
  generation through it gives XLA's tokens and scores.
* The causal attention kernel of fresh chunks (`native.causal_attention`) equals XLA's formulation
  (GQA/MHA/MQA, head dims off and on the vector width, sliding windows, soft-capping, padded and
  empty rows, padding it must not read; jit, vmap, grad), and generation and scoring through it give
  XLA's tokens and scores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.model import native
from jaxgen.model.cpu_kernels import KernelChooser
from jaxgen.model.int8 import int8_dot

HAS_COMPILER = native._compiler() is not None
needs_kernel = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler on this machine")


@needs_kernel
def test_builds_on_a_machine_with_a_compiler():
    assert native.available(), native.unavailable_reason()
    assert native.isa() in ("avx512vnni", "avx2", "portable")


def _reference(xq: np.ndarray, w_nk: np.ndarray) -> np.ndarray:
    return xq.astype(np.int64) @ w_nk.astype(np.int64).T


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17])
@pytest.mark.parametrize("k,n", [(64, 40), (77, 33), (2048 + 17, 65), (640, 4099)])
def test_exact_over_shapes(rows, k, n):
    rng = np.random.default_rng(rows * 1000 + k + n)
    xq = rng.integers(-127, 128, (rows, k), dtype=np.int8)
    w = rng.integers(-128, 128, (n, k), dtype=np.int8)
    xq[0, :] = 127
    xq[-1, : k // 2] = -127
    w[0, :] = -128  # |w| = 128: vpmaddubsw's pairs still fit int16 (2 * 128 * 127 < 2^15)
    w[-1, :] = 127
    got = jax.jit(native.int8_gemm_nk)(jnp.asarray(xq), jnp.asarray(w))
    assert got.dtype == jnp.int32 and got.shape == (rows, n)
    np.testing.assert_array_equal(np.asarray(got), _reference(xq, w))


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 4, 8, 9, 17])
@pytest.mark.parametrize("k,n", [(77, 33), (2048 + 9, 65), (640, 4099)])
def test_float32_within_rounding(rows, k, n):
    rng = np.random.default_rng(rows + k + n)
    x = rng.standard_normal((2, rows, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    got = np.asarray(jax.jit(native.float32_matmul_nk)(jnp.asarray(x), jnp.asarray(w)))
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    assert got.shape == (2, rows, n) and got.dtype == np.float32
    # float32 sums of k terms of unit-variance products: a few ulp of sqrt(k)
    assert np.abs(got - ref).max() <= 1e-6 * np.sqrt(k) * np.abs(ref).max()
    grads = jax.grad(lambda a, b: (native.float32_matmul_nk(a, b) ** 2).sum(), argnums=(0, 1))(x, w)
    expected = jax.grad(lambda a, b: ((a @ b.T) ** 2).sum(), argnums=(0, 1))(x, w)
    for g, e in zip(grads, expected):  # the same math, float32 sums in other orders
        g, e = np.asarray(g), np.asarray(e)
        assert np.abs(g - e).max() <= 1e-5 * np.abs(e).max()


@needs_kernel
def test_linear_runs_the_float32_kernel_where_chosen():
    from jaxgen.model import cpu_kernels
    from jaxgen.model.decoder import linear

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((16, 256)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((512, 256)).astype(np.float32))  # [N, K], 2^17 elements: timed
    texts = {}
    for winner in ("c32", "f32"):
        ch = KernelChooser(None, lambda cands, m, k, n, w_=winner: {c: 1.0 if c.startswith(w_) else 2.0 for c in cands},
                           native=True)
        cpu_kernels.set_default_chooser(ch)
        try:
            fn = jax.jit(lambda a, b: linear(a, {"weight_nk": b}))
            texts[winner] = fn.lower(x, w).as_text()
            np.testing.assert_allclose(np.asarray(fn(x, w)), np.asarray(x) @ np.asarray(w).T, rtol=1e-4, atol=1e-4)
        finally:
            cpu_kernels.set_default_chooser(None)
    assert "jaxgen_f32_gemm_nk" in texts["c32"] and "jaxgen_f32_gemm_nk" not in texts["f32"]


@needs_kernel
def test_through_int8_dot_jit_and_vmap():
    rng = np.random.default_rng(0)
    xq = rng.integers(-127, 128, (3, 6, 96), dtype=np.int8)
    w = rng.integers(-127, 128, (50, 96), dtype=np.int8)
    ref = np.stack([_reference(a, w) for a in xq])
    got = jax.jit(jax.vmap(lambda a: int8_dot(a, jnp.asarray(w), True, "c8")))(jnp.asarray(xq))
    np.testing.assert_array_equal(np.asarray(got), ref)
    stacked = jnp.asarray(np.stack([w, w[::-1]]))  # a batch of weights: one product each
    got = jax.vmap(lambda a, b: int8_dot(a, b, True, "c8"))(jnp.asarray(xq[:2]), stacked)
    np.testing.assert_array_equal(np.asarray(got), np.stack([_reference(xq[0], w), _reference(xq[1], w[::-1])]))


def _in_new_process(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


PROBE = ("from jaxgen.model import native; from jaxgen.model.cpu_kernels import KernelChooser;"
         "print(native.available(), '|', native.unavailable_reason(), '|', KernelChooser(None).int8_kinds('nk'))")


def test_without_a_compiler_it_is_unavailable_and_not_offered(tmp_path):
    done = _in_new_process(PROBE, {"CXX": str(tmp_path / "no-such-compiler"), "PATH": "/nonexistent",
                                   "JAXGEN_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    available, reason, kinds = [p.strip() for p in done.stdout.strip().splitlines()[-1].split("|")]
    assert available == "False" and "no C++ compiler" in reason and "c8" not in kinds
    done = _in_new_process(PROBE, {"JAXGEN_NATIVE": "0", "JAXGEN_HOME": str(tmp_path)})
    assert "JAXGEN_NATIVE=0" in done.stdout and "c8" not in done.stdout.splitlines()[-1]


def test_a_failing_compiler_is_a_reason_not_an_error(tmp_path):
    fake = tmp_path / "cxx"
    fake.write_text("#!/bin/sh\necho 'broken compiler' >&2\nexit 1\n")
    fake.chmod(0o755)
    done = _in_new_process(PROBE, {"CXX": str(fake), "JAXGEN_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("False") and "broken compiler" in line and "c8" not in line.split("|")[2]
    assert not list((tmp_path / "native").glob("*.so"))  # no half-written library left behind


def test_offered_for_nk_weights_only():
    on, off = KernelChooser(None, native=True), KernelChooser(None, native=False)
    assert "c8" in on.int8_kinds("nk") and "c8" not in on.int8_kinds("kn")
    assert "c32" in on.float_kinds("nk") and "c32" not in on.float_kinds("kn")
    assert "c8" not in off.int8_kinds("nk") and "c32" not in off.float_kinds("nk")


@needs_kernel
def test_the_library_is_cached_per_machine(tmp_path):
    env = {"JAXGEN_HOME": str(tmp_path), "CXX": shutil.which(os.environ.get("CXX") or "c++")}
    first = _in_new_process(PROBE, env)
    assert first.stdout.startswith("True"), first.stdout + first.stderr
    built = list((tmp_path / "native").glob("products-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    again = _in_new_process(PROBE, env)
    assert again.stdout.startswith("True")
    assert [p.stat().st_mtime_ns for p in (tmp_path / "native").glob("products-*.so")] == [mtime]


# ---------------------------------------------------------------------------- decode attention
@needs_kernel
@pytest.mark.parametrize("hq, hkv, hd", [(4, 2, 20), (3, 3, 16), (4, 1, 256)])
@pytest.mark.parametrize("softcap", [0.0, 2.5])
def test_decode_attention_matches_the_xla_reference(hq, hkv, hd, softcap):
    """GQA, MHA and MQA heads, head dims below, at and above the kernel's 16-wide sums, soft-capping,
    a cache read up to N < S slots, and a row that sees no slot (zeros); under jit, vmap and grad."""
    from jaxgen.model.attention import decode_attention_reference

    b, s, n = 3, 12, 9
    keys = jax.random.split(jax.random.PRNGKey(hq * 100 + hd), 4)
    q = jax.random.normal(keys[0], (b, hq, hd))
    k = jax.random.normal(keys[1], (b, s, hkv, hd)).at[:, n:].set(jnp.nan)  # slots past N must not be read
    v = jax.random.normal(keys[2], (b, s, hkv, hd)).at[:, n:].set(jnp.nan)
    visible = jax.random.bernoulli(keys[3], 0.6, (b, n)).at[0, 0].set(True).at[2].set(False)
    out = jax.jit(lambda *a: native.decode_attention(*a, 0.3, softcap))(q, k, v, visible)
    ref = decode_attention_reference(q, k, v, visible, 0.3, softcap)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6)
    assert float(jnp.abs(out[2]).max()) == 0.0
    both = jax.vmap(lambda q: native.decode_attention(q, k, v, visible, 0.3, softcap))(jnp.stack([q, 2 * q]))
    np.testing.assert_allclose(np.asarray(both[1]), np.asarray(decode_attention_reference(2 * q, k, v, visible, 0.3, softcap)),
                               atol=2e-6)
    grad = jax.grad(lambda q: native.decode_attention(q, k, v, visible, 0.3, softcap).sum())(q)
    grad_ref = jax.grad(lambda q: decode_attention_reference(q, k, v, visible, 0.3, softcap).sum())(q)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(grad_ref), atol=1e-5)


@needs_kernel
def test_generation_runs_the_native_decode_attention(cli_tiny_model, monkeypatch):
    """A gemma3-like model (sliding-window rings and full layers): decoding through the native
    kernel gives XLA's tokens and scores, with and without a static prompt and at several widths."""
    import jaxgen
    from jaxgen.model import attention

    calls = []
    real = native.decode_attention
    monkeypatch.setattr(native, "decode_attention", lambda *a: calls.append(1) or real(*a))
    prompts = [[2, 5 + i, 9, 13 + 2 * i, 4] * (1 + i) for i in range(4)]

    def run():
        jax.clear_caches()
        g = jaxgen.Generator(cli_tiny_model)
        tokens = [g.vocabulary.to_tokens(p) for p in prompts]
        kwargs = dict(max_length=40, include_prompt_in_result=False, end_token=[], return_scores=True)
        return (g.generate_batch(tokens, **kwargs) + g.generate_batch(tokens[:1], **kwargs)
                + g.generate_batch(tokens[1:3], static_prompt=g.vocabulary.to_tokens([2, 7, 7, 8]), **kwargs))

    native_results = run()
    assert calls, "the decode steps did not run the native attention"
    monkeypatch.setattr(attention, "uses_native", lambda *a: False)
    calls.clear()
    xla_results = run()
    assert not calls
    for a, b in zip(native_results, xla_results):
        assert a.sequences_ids == b.sequences_ids
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)
    jax.clear_caches()


# ---------------------------------------------------------------------------- causal attention
@needs_kernel
@pytest.mark.parametrize("hq, hkv, hd, t, window, softcap", [
    (4, 1, 256, 70, 0, 0.0),  # MQA, the default model's head dim, tiles of 16 rows
    (4, 2, 20, 37, 0, 0.0),  # GQA, a head dim below the 16-wide column tiles
    (3, 3, 80, 130, 16, 0.0),  # MHA with a sliding window shorter than a tile
    (8, 2, 16, 9, 4, 30.0),  # soft-capping, fewer tokens than a tile
])
def test_causal_attention_matches_the_xla_reference(hq, hkv, hd, t, window, softcap):
    """Rows of every length (full, padded, empty); padding must not be read (NaN there changes
    nothing); under jit, vmap and grad."""
    from jaxgen.model.attention import causal_attention_reference

    keys = jax.random.split(jax.random.PRNGKey(hq * 1000 + t), 3)
    q = 2 * jax.random.normal(keys[0], (3, t, hq, hd))
    k = jax.random.normal(keys[1], (3, t, hkv, hd))
    v = jax.random.normal(keys[2], (3, t, hkv, hd))
    lengths = jnp.array([t, t // 2 + 1, 0], jnp.int32)
    run = jax.jit(lambda q, k, v: native.causal_attention(q, k, v, lengths, 0.3, softcap, window))
    out = run(q, k, v)
    ref = causal_attention_reference(q, k, v, lengths, 0.3, softcap, window)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=2e-5)
    assert float(jnp.abs(out[1, t // 2 + 1:]).max(initial=0.0)) == 0.0 and float(jnp.abs(out[2]).max()) == 0.0
    padding = (jnp.arange(t)[None, :] >= lengths[:, None])[:, :, None, None]
    poisoned = [jnp.where(padding, jnp.nan, x) for x in (q, k, v)]
    np.testing.assert_array_equal(np.asarray(run(*poisoned)), np.asarray(out))
    both = jax.vmap(lambda q: native.causal_attention(q, k, v, lengths, 0.3, softcap, window))(jnp.stack([q, -q]))
    np.testing.assert_allclose(np.asarray(both[1]), np.asarray(
        causal_attention_reference(-q, k, v, lengths, 0.3, softcap, window)), rtol=1e-5, atol=2e-5)

    def loss(attend):
        return lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v, lengths, 0.3, softcap, window)))

    grads = jax.grad(loss(native.causal_attention), argnums=(0, 1, 2))(q, k, v)
    grads_ref = jax.grad(loss(causal_attention_reference), argnums=(0, 1, 2))(q, k, v)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-4, atol=1e-4)


@needs_kernel
def test_prefill_and_scoring_run_the_native_causal_attention(cli_tiny_model, monkeypatch):
    """A gemma3-like model (sliding and full layers): prompts of several lengths in one batch
    (right-padded first chunks), a static prompt, and score_batch give XLA's tokens and scores."""
    import jaxgen
    from jaxgen.model import attention

    calls = []
    real = native.causal_attention
    monkeypatch.setattr(native, "causal_attention", lambda *a: calls.append(1) or real(*a))
    prompts = [[2, 5 + i, 9, 13 + 2 * i, 4] * (2 + 3 * i) for i in range(3)]

    def run():
        jax.clear_caches()
        g = jaxgen.Generator(cli_tiny_model)
        tokens = [g.vocabulary.to_tokens(p) for p in prompts]
        kwargs = dict(max_length=8, include_prompt_in_result=False, end_token=[], return_scores=True)
        generated = (g.generate_batch(tokens, **kwargs)
                     + g.generate_batch(tokens[1:], static_prompt=g.vocabulary.to_tokens([2, 7, 7, 8]), **kwargs))
        return [r.sequences_ids for r in generated], [r.scores for r in generated], g.score_batch(tokens)

    native_ids, native_scores, native_logprobs = run()
    assert calls, "the first chunks did not run the native causal attention"
    monkeypatch.setattr(attention, "uses_native", lambda *a: False)
    calls.clear()
    xla_ids, xla_scores, xla_logprobs = run()
    assert not calls
    assert native_ids == xla_ids
    np.testing.assert_allclose(native_scores, xla_scores, atol=1e-4)
    for a, b in zip(native_logprobs, xla_logprobs):
        assert a.tokens == b.tokens
        np.testing.assert_allclose(a.log_probs, b.log_probs, atol=1e-4)
    jax.clear_caches()
