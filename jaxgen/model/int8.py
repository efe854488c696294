"""int8 compute: float activations quantized per row on the fly, times int8 weights, in int32.

`int8_matmul(x, w, scale)` is what `decoder.linear` runs for int8 weights with float32
activations (compute types int8 / int8_float32; `auto` on CPU). Each row of x (a token) is
quantized to int8 with its own symmetric scale (max |x| / 127), as CTranslate2 does, the product
is exact in int32, and the result is rescaled by the row scale and the weight's per-output-channel
scale. Gradients pass straight through (the tangent is x's tangent times the dequantized weight).
Accuracy is CTranslate2 int8's: on the default model, mean |delta log-prob| against float32 0.21
(CTranslate2 int8: 0.23; int8 weights with float32 activations, before: 0.09).

Which formulation runs is measured per CPU and shape (`jaxgen.model.cpu_kernels`; `kind`
below), since the fastest differs by CPU by factors of 2-10:
  a8   int8 x int8 -> int32 dot_general (on an AMD EPYC Zen 3, AVX2, the fastest at 16 rows);
  u8   uint8 x int8 -> int32: XLA:CPU hands the dot to YNNPACK, whose `vpdpbusd` (AVX-512 VNNI)
       multiplies unsigned by signed bytes, 1.5-2x faster than a8 on the Xeon this path was
       written on, but 3-10x slower than a8 on the AVX2 EPYC. JAX promotes mixed-type dots to
       int32, so `int8_dot_p` lowers it itself: uint8 rows = int8 rows + 128, plus a row of ones
       whose product is each output channel's weight sum, to subtract 128 x that sum exactly;
  a8t  a8 with the weight as the left operand (w [N, K] . x^T): a matrix-vector style product
       over contiguous weight rows, the fastest at one row on the EPYC;
  c8   jaxgen's native kernel (`jaxgen.model.native`, compiled on the machine; weights [N, K]
       only): each weight row streamed once past the rows of x, near the memory bandwidth where
       XLA's lowerings are not (one-row products 2-7x faster than a8 on the AVX2 EPYC);
  w8   weight-only: x stays float32, the weight is converted to float32 one block of columns at a
       time (never the whole weight: XLA:CPU would convert all of it to a float32 temporary on
       every call, 4x the bytes, which made int8 slower than float32 before).
a8, u8, a8t and c8 give identical int32 products. A one-row product (batch-1 decode) is padded to two
rows: XLA turns a one-row int dot into a matrix-vector product over an int32 copy of the weight
(~20x slower). Other platforms lower the plain int8 x int8 -> int32 dot. Measured per shape:
`python benchmarks/run.py int8_kernels`.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.extend.mlir.dialects import stablehlo
from jax.interpreters import batching, mlir

__all__ = ["runs_int8_products", "quantize_rows", "int8_dot", "int8_matmul", "weight_only_matmul", "EXACT_KINDS",
           "KINDS"]


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
# Exact formulations of one product (`EXACT_KINDS`); which is fastest depends on the CPU (its
# instruction set, its cores) and on the shape, so `jaxgen.model.cpu_kernels` measures them:
#   a8   int8 x int8 -> int32 dot_general (Eigen / oneDNN-style kernels; best on AVX2 here)
#   u8   uint8 x int8 -> int32 with a ones row (YNNPACK; `vpdpbusd` on AVX-512 VNNI)
#   a8t  the weight as the left operand: w . xq^T -> [N, M], transposed back (a matrix-vector
#        style product over the weight's rows: fast at one row with w [N, K])
#   c8   the native kernel (`jaxgen.model.native`), w [N, K] only
# A one-row product is padded to two rows (XLA turns a one-row int dot into a matrix-vector
# product over an int32 copy of the weight, ~20x slower).
EXACT_KINDS = ("a8", "u8", "a8t", "c8")
int8_dot_p = Primitive("jaxgen_int8_dot")


@int8_dot_p.def_abstract_eval
def _int8_dot_abstract(xq, w, *, transpose_w, kind):
    if xq.ndim != 2 or w.ndim != 2 or xq.dtype != jnp.int8 or w.dtype != jnp.int8:
        raise TypeError(f"int8_dot takes int8 [M, K] and int8 [K, N] (or [N, K]), got {xq} and {w}")
    return jax.core.ShapedArray(_out_shape(xq.shape, w.shape, transpose_w), jnp.int32)


def _int8_dot_reference(xq, w, *, transpose_w, kind):
    return lax.dot_general(xq, w, _dims(transpose_w), preferred_element_type=jnp.int32)


def _pad_to_two_rows(xq):
    return jnp.pad(xq, ((0, 1), (0, 0))) if xq.shape[0] == 1 else xq


def _int8_dot_cpu(xq, w, *, transpose_w, kind):
    m, k = xq.shape
    if kind == "c8":
        from jaxgen.model import native

        return native.int8_gemm_nk(xq, w)
    if kind == "u8":
        xu = lax.bitcast_convert_type(xq, jnp.uint8) ^ jnp.uint8(0x80)  # = xq + 128, in [1, 255]
        rows = jnp.concatenate([xu, jnp.ones((1, k), jnp.uint8)])  # the last row: sum_k w[k, n]
        acc = _mixed_dot_p.bind(rows, w, transpose_w=transpose_w)
        return acc[:m] - 128 * acc[m:]
    xp = _pad_to_two_rows(xq)
    if kind == "a8t":  # w [N, K] . xp [M, K] -> [N, M] (or w [K, N] contracted on axis 0)
        acc = lax.dot_general(w, xp, (((1 if transpose_w else 0,), (1,)), ((), ())),
                              preferred_element_type=jnp.int32).T
    else:
        acc = lax.dot_general(xp, w, _dims(transpose_w), preferred_element_type=jnp.int32)
    return acc[:m]


int8_dot_p.def_impl(partial(jax.jit, static_argnames=("transpose_w", "kind"))(_int8_dot_reference))
mlir.register_lowering(int8_dot_p, mlir.lower_fun(_int8_dot_reference, multiple_results=False))
mlir.register_lowering(int8_dot_p, mlir.lower_fun(_int8_dot_cpu, multiple_results=False), platform="cpu")


def _int8_dot_batching(args, dims, *, transpose_w, kind):
    xq, w = args
    x_dim, w_dim = dims  # None: not batched
    if w_dim is not None:  # a batch of weights: one product each
        w = jnp.moveaxis(w, w_dim, 0)
        xq = (jnp.broadcast_to(xq, (w.shape[0],) + xq.shape) if x_dim is None else jnp.moveaxis(xq, x_dim, 0))
        return lax.map(lambda a: int8_dot(a[0], a[1], transpose_w, kind), (xq, w)), 0
    xq = jnp.moveaxis(xq, x_dim, 0)
    b = xq.shape[0]
    out = int8_dot(xq.reshape(-1, xq.shape[-1]), w, transpose_w, kind)  # the batch as more rows
    return out.reshape(b, -1, out.shape[-1]), 0


batching.primitive_batchers[int8_dot_p] = _int8_dot_batching


def int8_dot(xq: jax.Array, w: jax.Array, transpose_w: bool = False, kind: str = "a8") -> jax.Array:
    """Exact int8 [M, K] x int8 [K, N] (transpose_w: [N, K]) -> int32 [M, N], in the formulation
    `kind` (one of `EXACT_KINDS`; every one gives the same result)."""
    if kind not in EXACT_KINDS:
        raise ValueError(f"int8_dot kind must be one of {EXACT_KINDS}, got {kind!r}")
    if kind == "c8" and not transpose_w:
        raise ValueError("int8_dot kind 'c8' (the native kernel) takes the weight stored [N, K]: transpose_w=True")
    return int8_dot_p.bind(xq, w, transpose_w=bool(transpose_w), kind=kind)


# ---------------------------------------------------------------------------- weight-only int8
def _column_block(n: int, k: int) -> int:
    """Columns per block of the weight-only product: ~256 KiB of float32 weight per block (it stays
    in the core's cache between its conversion and its product), a divisor of n."""
    target = max(1, (256 * 1024) // (4 * k))
    for b in range(min(n, target), 0, -1):
        if n % b == 0:
            return b
    return n


def weight_only_matmul(x: jax.Array, w: jax.Array, scale: jax.Array, transpose_w: bool = False) -> jax.Array:
    """x [M, K] float32 @ (w * scale) with int8 w [K, N] (transpose_w: [N, K]), the weight converted
    to float32 one block of columns at a time (never the whole weight at once); x not quantized, so
    the result is the float32 product with the dequantized weight (up to float rounding)."""
    k = x.shape[-1]
    n = w.shape[0] if transpose_w else w.shape[1]
    nb = _column_block(n, k)

    def block(i):
        wb = lax.dynamic_slice_in_dim(w, i * nb, nb, axis=0 if transpose_w else 1).astype(jnp.float32)
        return lax.dot_general(x, wb, _dims(transpose_w))  # [M, nb]

    if nb == n:
        y = block(0)
    else:
        y = lax.map(block, jnp.arange(n // nb))  # [n / nb, M, nb]
        y = jnp.moveaxis(y, 0, 1).reshape(x.shape[0], n)
    return y * scale.astype(jnp.float32)


# ---------------------------------------------------------------------------- the linear layer
KINDS = EXACT_KINDS + ("w8",)


def int8_matmul(x: jax.Array, w: jax.Array, scale: jax.Array, transpose_w: bool = False,
                kind: str = "auto") -> jax.Array:
    """x [..., K] float32 @ (w * scale) -> float32 [..., N], w int8 [K, N] (transpose_w: [N, K]) with
    a float32 per-output-channel scale [N]. kind: an exact formulation (`EXACT_KINDS`: x quantized
    per row, see the module docstring; all give identical results), "w8" (weight-only: x stays
    float32, `weight_only_matmul`), or "auto": on CPU the one measured fastest on this machine for
    this shape (`jaxgen.model.cpu_kernels`), elsewhere "a8"."""
    if kind == "auto":
        kind = "a8"
        if jax.default_backend() == "cpu":
            from jaxgen.model.cpu_kernels import default_chooser

            n, k = w.shape if transpose_w else w.shape[::-1]
            rows = math.prod(x.shape[:-1])
            kind = default_chooser().int8_kind(rows, k, n, "nk" if transpose_w else "kn")
    if kind not in KINDS:
        raise ValueError(f"int8_matmul kind must be one of {KINDS} or 'auto', got {kind!r}")
    return _int8_matmul(x, w, scale, bool(transpose_w), kind)


@partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _int8_matmul(x: jax.Array, w: jax.Array, scale: jax.Array, transpose_w: bool, kind: str) -> jax.Array:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    if kind == "w8":
        y = weight_only_matmul(x2, w, scale, transpose_w)
    else:
        xq, row_scale = quantize_rows(x2)
        acc = int8_dot(xq, w, transpose_w, kind)
        y = acc.astype(jnp.float32) * row_scale * scale.astype(jnp.float32)
    return y.reshape(*lead, y.shape[-1])


@_int8_matmul.defjvp
def _int8_matmul_jvp(transpose_w, kind, primals, tangents):
    x, w, scale = primals
    dx, _, dscale = tangents
    y = _int8_matmul(x, w, scale, transpose_w, kind)
    wf = w.astype(jnp.float32)  # straight through: the tangent uses the dequantized weight
    dy = lax.dot_general(dx, wf, (((dx.ndim - 1,), (1 if transpose_w else 0,)), ((), ()))) * scale
    dy = dy + y * (dscale / jnp.where(scale != 0, scale, 1.0))
    return y, dy
