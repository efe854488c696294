"""int8 compute (`jaxgen.model.int8`): int8 weights with float32 activations run as per-row
quantized activations x int8 weights, accumulated in int32.

* `int8_dot` is exact (int64 reference) in both weight layouts, for one row (batch-1 decode, which
  the CPU lowering pads with its ones row), an odd number of rows and many; eager, jitted, vmapped.
* `int8_matmul` stays within the per-row quantization bound of the float32 product with the
  dequantized weight: |error[m, n]| <= (scale_x[m] / 2) * sum_k |w[k, n] * scale[n]| (+ float
  rounding), and its gradient is the straight-through one (the dequantized weight).
* `linear` / `compute_logits`: a tied int8 head (the embedding used transposed) equals the same
  weights as an untied [D, V] head; float32 weights are unchanged by the new `transposed` path.
* On CPU the compiled product never converts the whole weight to a wider type (the slow path
  this replaced: ~20x slower at batch 1).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.model.config import ModelConfig
from jaxgen.model.decoder import compute_logits, linear
from jaxgen.model.int8 import int8_dot, int8_matmul, quantize_rows


def _int8(rng, shape):
    return rng.integers(-127, 128, shape, dtype=np.int8)


@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 32])
def test_int8_dot_is_exact(rows, transpose_w):
    rng = np.random.default_rng(rows)
    k, n = 96, 40
    xq, w = _int8(rng, (rows, k)), _int8(rng, (k, n))
    xq[0, :] = 127  # extremes: the uint8 shift maps -127..127 to 1..255
    xq[-1, :3] = -127
    ref = xq.astype(np.int64) @ w.astype(np.int64)
    wj = jnp.asarray(np.ascontiguousarray(w.T) if transpose_w else w)
    for fn in (int8_dot, jax.jit(int8_dot, static_argnums=2)):
        got = fn(jnp.asarray(xq), wj, transpose_w)
        assert got.dtype == jnp.int32 and got.shape == (rows, n)
        np.testing.assert_array_equal(np.asarray(got), ref)
    # vmap over activations (folded into rows) and over weights (one product each)
    xb = jnp.asarray(np.stack([xq, xq[::-1]]))
    got = jax.vmap(lambda a: int8_dot(a, wj, transpose_w))(xb)
    np.testing.assert_array_equal(np.asarray(got), np.stack([ref, ref[::-1]]))
    got = jax.vmap(lambda a, b: int8_dot(a, b, transpose_w))(xb, jnp.stack([wj, wj]))
    np.testing.assert_array_equal(np.asarray(got), np.stack([ref, ref[::-1]]))


@pytest.mark.parametrize("transpose_w", [False, True])
def test_int8_matmul_within_quantization_bound(transpose_w):
    rng = np.random.default_rng(0)
    k, n = 256, 48
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    x[..., :4] *= 20.0  # outlier channels widen the row scales
    x[1, 2] = 0.0  # an all-zero row
    w = _int8(rng, (k, n))
    scale = (rng.random(n) * 0.02 + 1e-3).astype(np.float32)
    deq = w.astype(np.float64) * scale
    wj = jnp.asarray(np.ascontiguousarray(w.T) if transpose_w else w)
    got = np.asarray(jax.jit(int8_matmul, static_argnums=3)(jnp.asarray(x), wj, jnp.asarray(scale), transpose_w))
    ref = x.astype(np.float64) @ deq
    row_scale = np.abs(x).max(-1, keepdims=True) / 127.0
    bound = row_scale / 2 * np.abs(deq).sum(0) + 1e-5 * np.abs(ref).max()
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.all(np.abs(got - ref) <= bound)
    np.testing.assert_array_equal(got[1, 2], 0.0)
    # Typically far inside it: rounding errors are independent, uniform over a quantization step,
    # so the error's rms is row_scale / sqrt(12) * ||w[:, n] * scale[n]||.
    expected_rms = np.sqrt(np.mean((row_scale / np.sqrt(12) * np.sqrt((deq ** 2).sum(0))) ** 2))
    assert np.sqrt(np.mean((got - ref) ** 2)) <= 1.5 * expected_rms


def test_quantize_rows_round_trip():
    x = jnp.asarray([[0.0, 1.0, -2.0, 0.5], [0.0, 0.0, 0.0, 0.0]], jnp.float32)
    q, s = quantize_rows(x)
    assert q.dtype == jnp.int8 and s.shape == (2, 1)
    np.testing.assert_array_equal(np.asarray(q[0]), [0, 64, -127, 32])
    np.testing.assert_array_equal(np.asarray(q[1]), 0)
    np.testing.assert_allclose(np.asarray(q * s)[0], [0, 1.0079, -2, 0.5039], atol=1e-3)


def test_int8_matmul_gradient_is_straight_through():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 64)).astype(np.float32))
    w = _int8(rng, (64, 16))
    scale = jnp.asarray((rng.random(16) * 0.01).astype(np.float32))
    cot = rng.standard_normal((4, 16)).astype(np.float32)
    grad = jax.grad(lambda a: jnp.sum(int8_matmul(a, jnp.asarray(w), scale) * cot))(x)
    np.testing.assert_allclose(np.asarray(grad), cot @ (w.astype(np.float32) * np.asarray(scale)).T,
                               rtol=1e-5, atol=1e-6)


def test_tied_int8_head_equals_untied_head():
    v, d = 300, 32
    config = ModelConfig(architecture="test", vocab_size=v, hidden_size=d, num_layers=1, num_heads=2, num_kv_heads=1,
                         head_dim=16, intermediate_size=64, tie_word_embeddings=True)
    rng = np.random.default_rng(2)
    q, scale = _int8(rng, (v, d)), (rng.random(v) * 0.01 + 1e-3).astype(np.float32)
    hidden = jnp.asarray(rng.standard_normal((2, 3, d)).astype(np.float32))
    tied = compute_logits({"embed": {"weight": jnp.asarray(q), "weight_scale": jnp.asarray(scale)}}, config, hidden)
    untied = compute_logits({"lm_head": {"weight": jnp.asarray(np.ascontiguousarray(q.T)),
                                         "weight_scale": jnp.asarray(scale)}},
                            config.replace(tie_word_embeddings=False), hidden)
    np.testing.assert_allclose(np.asarray(tied), np.asarray(untied), rtol=1e-6, atol=1e-6)
    block = compute_logits({"embed": {"weight": jnp.asarray(q), "weight_scale": jnp.asarray(scale)}}, config,
                           hidden, 100, 50)
    np.testing.assert_allclose(np.asarray(block), np.asarray(tied)[..., 100:150], rtol=1e-6, atol=1e-6)
    deq = q.astype(np.float64) * scale[:, None]
    ref = np.asarray(hidden, np.float64) @ deq.T
    assert np.abs(np.asarray(tied) - ref).max() <= 0.02 * np.abs(ref).max()
    # float32 weights: the transposed path is the plain product
    wf = rng.standard_normal((v, d)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(linear(hidden, {"weight": jnp.asarray(wf)}, transposed=True)),
                               np.asarray(hidden) @ wf.T, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU lowering")
@pytest.mark.parametrize("rows", [1, 16])
def test_cpu_product_never_widens_the_weight(rows):
    k, n = 128, 512
    compiled = jax.jit(lambda x, w, s: int8_matmul(x, w, s, True)).lower(
        jax.ShapeDtypeStruct((rows, k), jnp.float32), jax.ShapeDtypeStruct((n, k), jnp.int8),
        jax.ShapeDtypeStruct((n,), jnp.float32)).compile().as_text()
    widened = re.findall(rf"(?:s32|f32|s16|f16|bf16)\[(?:{n},{k}|{k},{n})\]", compiled)
    assert not widened, f"the {n}x{k} int8 weight is converted to a wider type: {widened}"
    assert re.search(r"u8\[\d+,\d+\]", compiled), "the uint8 x int8 product is gone"
