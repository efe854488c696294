"""int8 compute: float activations quantized per row on the fly, times int8 weights, in int32.

`int8_matmul(x, w, scale)` is what `decoder.linear` runs for int8 weights with float32
activations (compute types int8 / int8_float32; `auto` on CPU). Each row of x (a token) is
quantized to int8 with its own symmetric scale (max |x| / 127), as CTranslate2 does, the product
is exact in int32, and the result is rescaled by the row scale and the weight's per-output-channel
scale. Gradients pass straight through (the tangent is x's tangent times the dequantized weight).
Accuracy is CTranslate2 int8's: on the default model, mean |delta log-prob| against float32 0.21
(CTranslate2 int8: 0.23; int8 weights with float32 activations, before: 0.09).

Why not int8 weights converted to float inside the dot? On XLA:CPU that converts the whole
weight to a float32 temporary on every call (4x the bytes of the int8 weight, then a float32
product), so int8 was slower than float32. XLA:CPU routes int8 x int8 -> int32 dots of two or
more rows to YNNPACK; uint8 x int8 runs 1.5-2x faster than int8 x int8 there (on this
development machine's AVX-512 VNNI, `vpdpbusd` multiplies unsigned by signed bytes; on AVX2,
`vpmaddubsw` does the same), but JAX promotes mixed-type dots to int32 first, so `int8_dot_p`
lowers the uint8 x int8 dot itself (CPU): uint8 rows = int8 rows + 128, plus a row of ones
whose product is each output channel's weight sum, to subtract 128 x that sum exactly. The ones
row also makes a one-row product (batch-1 decode) two rows: XLA turns a one-row int dot into a
matrix-vector product over an int32 copy of the weight (~20x slower). Other platforms lower the
plain int8 x int8 -> int32 dot. Measured per shape: `python benchmarks/run.py int8_kernels`.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.extend.mlir.dialects import stablehlo
from jax.interpreters import batching, mlir

__all__ = ["runs_int8_products", "quantize_rows", "int8_dot", "int8_matmul"]


def runs_int8_products(weight_dtype, activation_dtype) -> bool:
    """Whether `decoder.linear` runs int8 weights as `int8_matmul` (float32 activations) rather than
    converting them to the activation type inside the product."""
    return weight_dtype == jnp.int8 and activation_dtype == jnp.float32


def quantize_rows(x: jax.Array):
    """Symmetric int8 per row (last axis): x [..., K] float -> (int8 [..., K], float32 scale [..., 1]),
    x ~ q * scale. An all-zero row gets q = 0."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


def _dims(transpose_w: bool):
    # x [M, K] with w [K, N] (linear layers) or w [N, K] (a tied head: the embedding's rows)
    return (((1,), (1 if transpose_w else 0,)), ((), ()))


def _out_shape(x_shape, w_shape, transpose_w: bool):
    return (x_shape[0], w_shape[0] if transpose_w else w_shape[1])


# ---------------------------------------------------------------------------- uint8 x int8 -> int32 dot
# JAX promotes the operands of a mixed-type dot to a common type; this primitive lowers the
# StableHLO dot_general with uint8 and int8 operands as they are (XLA:CPU hands it to YNNPACK).
_mixed_dot_p = Primitive("jaxgen_u8s8_dot")


@_mixed_dot_p.def_abstract_eval
def _mixed_dot_abstract(x, w, *, transpose_w):
    return jax.core.ShapedArray(_out_shape(x.shape, w.shape, transpose_w), jnp.int32)


def _mixed_dot_lowering(ctx, x, w, *, transpose_w):
    (contract_x,), (contract_w,) = _dims(transpose_w)[0]
    numbers = stablehlo.DotDimensionNumbers.get(lhs_batching_dimensions=[], rhs_batching_dimensions=[],
                                                lhs_contracting_dimensions=[contract_x],
                                                rhs_contracting_dimensions=[contract_w])
    return [stablehlo.dot_general(mlir.aval_to_ir_type(ctx.module_context, ctx.avals_out[0]), x, w, numbers)]


mlir.register_lowering(_mixed_dot_p, _mixed_dot_lowering, platform="cpu")


# ---------------------------------------------------------------------------- int8 x int8 -> int32 dot
int8_dot_p = Primitive("jaxgen_int8_dot")


@int8_dot_p.def_abstract_eval
def _int8_dot_abstract(xq, w, *, transpose_w):
    if xq.ndim != 2 or w.ndim != 2 or xq.dtype != jnp.int8 or w.dtype != jnp.int8:
        raise TypeError(f"int8_dot takes int8 [M, K] and int8 [K, N] (or [N, K]), got {xq} and {w}")
    return jax.core.ShapedArray(_out_shape(xq.shape, w.shape, transpose_w), jnp.int32)


def _int8_dot_reference(xq, w, *, transpose_w):
    return lax.dot_general(xq, w, _dims(transpose_w), preferred_element_type=jnp.int32)


def _int8_dot_cpu(xq, w, *, transpose_w):
    m, k = xq.shape
    xu = lax.bitcast_convert_type(xq, jnp.uint8) ^ jnp.uint8(0x80)  # = xq + 128, in [1, 255]
    rows = jnp.concatenate([xu, jnp.ones((1, k), jnp.uint8)])  # the last row: sum_k w[k, n]
    acc = _mixed_dot_p.bind(rows, w, transpose_w=transpose_w)
    return acc[:m] - 128 * acc[m:]


int8_dot_p.def_impl(partial(jax.jit, static_argnames="transpose_w")(_int8_dot_reference))
mlir.register_lowering(int8_dot_p, mlir.lower_fun(_int8_dot_reference, multiple_results=False))
mlir.register_lowering(int8_dot_p, mlir.lower_fun(_int8_dot_cpu, multiple_results=False), platform="cpu")


def _int8_dot_batching(args, dims, *, transpose_w):
    xq, w = args
    x_dim, w_dim = dims  # None: not batched
    if w_dim is not None:  # a batch of weights: one product each
        w = jnp.moveaxis(w, w_dim, 0)
        xq = (jnp.broadcast_to(xq, (w.shape[0],) + xq.shape) if x_dim is None else jnp.moveaxis(xq, x_dim, 0))
        return lax.map(lambda a: int8_dot(a[0], a[1], transpose_w=transpose_w), (xq, w)), 0
    xq = jnp.moveaxis(xq, x_dim, 0)
    b = xq.shape[0]
    out = int8_dot(xq.reshape(-1, xq.shape[-1]), w, transpose_w=transpose_w)  # the batch as more rows
    return out.reshape(b, -1, out.shape[-1]), 0


batching.primitive_batchers[int8_dot_p] = _int8_dot_batching


def int8_dot(xq: jax.Array, w: jax.Array, transpose_w: bool = False) -> jax.Array:
    """Exact int8 [M, K] x int8 [K, N] (transpose_w: [N, K]) -> int32 [M, N]."""
    return int8_dot_p.bind(xq, w, transpose_w=bool(transpose_w))


# ---------------------------------------------------------------------------- the linear layer
@partial(jax.custom_jvp, nondiff_argnums=(3,))
def int8_matmul(x: jax.Array, w: jax.Array, scale: jax.Array, transpose_w: bool = False) -> jax.Array:
    """x [..., K] float32 @ (w * scale) -> float32 [..., N], w int8 [K, N] (transpose_w: [N, K]) with
    a float32 per-output-channel scale [N]; x is quantized per row (see the module docstring)."""
    lead = x.shape[:-1]
    xq, row_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
    acc = int8_dot(xq, w, transpose_w)
    y = acc.astype(jnp.float32) * row_scale * scale.astype(jnp.float32)
    return y.reshape(*lead, y.shape[-1])


@int8_matmul.defjvp
def _int8_matmul_jvp(transpose_w, primals, tangents):
    x, w, scale = primals
    dx, _, dscale = tangents
    y = int8_matmul(x, w, scale, transpose_w)
    wf = w.astype(jnp.float32)  # straight through: the tangent uses the dequantized weight
    dy = lax.dot_general(dx, wf, (((dx.ndim - 1,), (1 if transpose_w else 0,)), ((), ()))) * scale
    dy = dy + y * (dscale / jnp.where(scale != 0, scale, 1.0))
    return y, dy
