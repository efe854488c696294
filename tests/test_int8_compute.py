"""int8 compute (`jaxgen.model.int8`): int8 weights with float32 activations run as per-row
quantized activations x int8 weights, accumulated in int32.

* `int8_dot` is exact (int64 reference) in every formulation the CPU chooser picks among (a8, u8,
  a8t, and c8, the native kernel, where it compiles: `jaxgen.model.cpu_kernels`) and both weight
  layouts (c8: [N, K] only), for one row (batch-1 decode, which the
  CPU lowering pads to two), an odd number of rows and many; eager, jitted, vmapped; so
  `int8_matmul` gives the same result whichever exact formulation runs (up to 1 ulp of fusion).
* the weight-only formulation (w8: the weight converted to float32 in blocks of columns) is within
  float32 rounding of the dequantized weight's product, without converting the whole weight.
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
from jaxgen.model import native
from jaxgen.model.int8 import EXACT_KINDS, int8_dot, int8_matmul, quantize_rows, weight_only_matmul

# c8 where the native kernel compiles (tests/test_native_kernel.py fails when a compiler is there
# and it does not)
KINDS_HERE = tuple(k for k in EXACT_KINDS if k != "c8" or native.available())


def _layout_allows(kind: str, transpose_w: bool) -> bool:
    return kind != "c8" or transpose_w


def _int8(rng, shape):
    return rng.integers(-127, 128, shape, dtype=np.int8)


@pytest.mark.parametrize("kind", KINDS_HERE)
@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 32])
def test_int8_dot_is_exact(rows, transpose_w, kind):
    rng = np.random.default_rng(rows)
    k, n = 96, 40
    xq, w = _int8(rng, (rows, k)), _int8(rng, (k, n))
    if not _layout_allows(kind, transpose_w):
        with pytest.raises(ValueError, match=r"\[N, K\]"):
            int8_dot(jnp.asarray(xq), jnp.asarray(w), transpose_w, kind)
        return
    xq[0, :] = 127  # extremes: the uint8 shift maps -127..127 to 1..255
    xq[-1, :3] = -127
    ref = xq.astype(np.int64) @ w.astype(np.int64)
    wj = jnp.asarray(np.ascontiguousarray(w.T) if transpose_w else w)
    for fn in (int8_dot, jax.jit(int8_dot, static_argnums=(2, 3))):
        got = fn(jnp.asarray(xq), wj, transpose_w, kind)
        assert got.dtype == jnp.int32 and got.shape == (rows, n)
        np.testing.assert_array_equal(np.asarray(got), ref)
    # vmap over activations (folded into rows) and over weights (one product each)
    xb = jnp.asarray(np.stack([xq, xq[::-1]]))
    got = jax.vmap(lambda a: int8_dot(a, wj, transpose_w, kind))(xb)
    np.testing.assert_array_equal(np.asarray(got), np.stack([ref, ref[::-1]]))
    got = jax.vmap(lambda a, b: int8_dot(a, b, transpose_w, kind))(xb, jnp.stack([wj, wj]))
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
@pytest.mark.parametrize("kind", KINDS_HERE)
@pytest.mark.parametrize("rows", [1, 16])
def test_cpu_product_never_widens_the_weight(rows, kind):
    k, n = 128, 512
    compiled = jax.jit(lambda x, w, s: int8_matmul(x, w, s, True, kind)).lower(
        jax.ShapeDtypeStruct((rows, k), jnp.float32), jax.ShapeDtypeStruct((n, k), jnp.int8),
        jax.ShapeDtypeStruct((n,), jnp.float32)).compile().as_text()
    widened = re.findall(rf"(?:s32|f32|s16|f16|bf16)\[(?:{n},{k}|{k},{n})\]", compiled)
    assert not widened, f"the {n}x{k} int8 weight is converted to a wider type: {widened}"
    assert bool(re.search(r"u8\[\d+,\d+\]", compiled)) == (kind == "u8"), "the uint8 x int8 product"


@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("rows", [1, 5])
def test_exact_kinds_give_identical_results(rows, transpose_w):
    """Whichever exact formulation the CPU chooser picks, int8_matmul's result is the same (its
    int32 products are identical; the float rescaling may differ by XLA's fusion: 1 ulp)."""
    rng = np.random.default_rng(7)
    k, n = 640, 256
    x = jnp.asarray(rng.standard_normal((rows, k)).astype(np.float32))
    w = _int8(rng, (k, n))
    wj = jnp.asarray(np.ascontiguousarray(w.T) if transpose_w else w)
    scale = jnp.asarray((rng.random(n) * 0.01 + 1e-3).astype(np.float32))
    kinds = [kind for kind in KINDS_HERE if _layout_allows(kind, transpose_w)]
    outs = {kind: np.asarray(jax.jit(int8_matmul, static_argnums=(3, 4))(x, wj, scale, transpose_w, kind))
            for kind in kinds}
    xq, _ = quantize_rows(x)
    for kind in kinds:
        np.testing.assert_array_equal(np.asarray(int8_dot(xq, wj, transpose_w, kind)),
                                      np.asarray(int8_dot(xq, wj, transpose_w, "a8")))
        np.testing.assert_allclose(outs[kind], outs["a8"], rtol=2e-7, atol=0)


@pytest.mark.parametrize("transpose_w", [False, True])
def test_weight_only_within_float_rounding(transpose_w):
    """w8 (the weight converted to float32 in blocks of columns) is the float32 product with the
    dequantized weight: |error| <= 1e-5 relative to the output's largest value (float32 sums of
    K = 640 terms). n = 1,000 columns run as 10 blocks of 100 (K = 640: ~256 KiB per block)."""
    rng = np.random.default_rng(3)
    k, n = 640, 1000
    x = rng.standard_normal((3, 2, k)).astype(np.float32)
    w = _int8(rng, (k, n))
    scale = (rng.random(n) * 0.01 + 1e-3).astype(np.float32)
    wj = jnp.asarray(np.ascontiguousarray(w.T) if transpose_w else w)
    got = np.asarray(jax.jit(int8_matmul, static_argnums=(3, 4))(jnp.asarray(x), wj, jnp.asarray(scale),
                                                                 transpose_w, "w8"))
    ref = x.astype(np.float64) @ (w.astype(np.float64) * scale)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    compiled = jax.jit(lambda a, b, c: weight_only_matmul(a, b, c, transpose_w)).lower(
        jnp.asarray(x[0]), wj, jnp.asarray(scale)).compile().as_text()
    assert not re.search(rf"f32\[(?:{n},{k}|{k},{n})\]", compiled), "the whole weight is converted at once"


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="kind"):
        int8_matmul(jnp.ones((2, 8)), jnp.ones((8, 4), jnp.int8), jnp.ones(4), False, "fp8")
    with pytest.raises(ValueError, match="kind"):
        int8_dot(jnp.ones((2, 8), jnp.int8), jnp.ones((8, 4), jnp.int8), False, "w8")
