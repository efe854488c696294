"""Microbenchmark of int8 matrix-product formulations on XLA:CPU, in the default model's shapes.

For y = x @ (q * scale) with x float32 [M, K], q int8 and a per-output-channel float32 scale,
times each candidate formulation (alternating candidates, medians) at M = 1 (decode, batch 1),
16 (decode, batch 16) and 512 (prefill / scoring rows), and checks its error against the float32
product with the dequantized weight:

  f32       float32 weights (what a float32 model runs; the speed to beat)
  w8        int8 weights converted to float32 inside the dot (jaxgen's int8 before this change)
  a8        activations quantized per row (dynamic symmetric int8) x int8 weights -> int32
            (`lax.dot(..., preferred_element_type=int32)`), rescaled; M = 1 is padded to 2 rows
  a8_m1     the same without the padding (M = 1 only): XLA turns the vector-matrix product into
            an int32 matrix-vector product over a converted copy of the weight
  a8x2      two int8 digits of each activation row (x / s ~ hi + lo / 128) stacked as 2M rows of
            one int8 x int8 -> int32 product: ~15-bit activations at the cost of twice the rows
            (free at M = 1, which needs a second row anyway)
  a8_wl     a8 with the weight as the left operand (w . xq^T -> [N, M], transposed back)
  u8        jaxgen's int8 path (`jaxgen.model.int8.int8_matmul`): a8's activations + 128 as uint8,
            uint8 x int8 -> int32 (a dot JAX would promote to int32: jaxgen lowers it itself), plus
            a row of ones whose product is each channel's weight sum, to subtract 128 x that sum

Each candidate but w8 runs with the weight in [K, N] ("kn", the layout of jaxgen's linear layers)
and in [N, K] ("nk", the layout of a tied head: the embedding); w8 in the shape's own layout. Error: max |y - ref| /
rms(ref) over the output, ref = x @ dequantized weight in float64.

    python benchmarks/bench_int8_kernels.py                  # every shape, M = 1,16,512
    python benchmarks/bench_int8_kernels.py --shapes head --ms 1,16 --reps 9
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import jax
import jax.numpy as jnp
from jax import lax

from jaxgen.model.int8 import int8_matmul, quantize_rows

SHAPES = {  # name -> (K, N, layout of the stored weight)
    "up": (640, 2048, "kn"), "down": (2048, 640, "kn"), "q": (640, 1024, "kn"), "o": (1024, 640, "kn"),
    "kv": (640, 256, "kn"), "head_block": (640, 16384, "nk"), "head_block_int8": (640, 4096, "nk"),
    "head": (640, 262144, "nk"),
}
NT = (((1,), (1,)), ((), ()))  # x [M, K] . w [N, K]


def int_dot(xq, w, layout, dtype=jnp.int32):
    if layout == "kn":
        return lax.dot(xq, w, preferred_element_type=dtype)
    return lax.dot_general(xq, w, NT, preferred_element_type=dtype)


def pad_rows(x, rows):
    return jnp.pad(x, ((0, rows - x.shape[0]), (0, 0))) if x.shape[0] < rows else x


def make_candidates(layout):
    def f32(x, w, s):  # w is float32 here
        return lax.dot(x, w) if layout == "kn" else lax.dot_general(x, w, NT)

    def w8(x, w, s):
        wf = w.astype(jnp.float32)
        return (lax.dot(x, wf) if layout == "kn" else lax.dot_general(x, wf, NT)) * s

    def a8(x, w, s):
        m = x.shape[0]
        xq, sx = quantize_rows(pad_rows(x, 2))
        return (int_dot(xq, w, layout).astype(jnp.float32) * sx * s)[:m]

    def a8_m1(x, w, s):
        xq, sx = quantize_rows(x)
        return int_dot(xq, w, layout).astype(jnp.float32) * sx * s

    def a8x2(x, w, s):
        m = x.shape[0]
        sx = jnp.maximum(jnp.max(jnp.abs(x), axis=-1, keepdims=True), 1e-30) / 127.0
        hi = jnp.round(x / sx)
        lo = jnp.round((x / sx - hi) * 254.0)  # |x/sx - hi| <= 0.5 -> |lo| <= 127
        both = jnp.concatenate([hi, lo]).astype(jnp.int8)
        acc = int_dot(both, w, layout).astype(jnp.float32)
        return (acc[:m] + acc[m:] * (1.0 / 254.0)) * sx * s

    def u8(x, w, s):  # jaxgen's int8 path
        return int8_matmul(x, w, s, layout == "nk")

    def a8_wl(x, w, s):  # the weight as the left operand: w [N, K] . xq [M, K] -> [N, M]
        m = x.shape[0]
        xq, sx = quantize_rows(pad_rows(x, 2))
        dims = (((1,), (1,)), ((), ())) if layout == "nk" else (((0,), (1,)), ((), ()))
        acc = lax.dot_general(w, xq, dims, preferred_element_type=jnp.int32).T
        return (acc.astype(jnp.float32) * sx * s)[:m]

    return {"f32": f32, "w8": w8, "a8": a8, "a8_m1": a8_m1, "a8x2": a8x2, "u8": u8, "a8_wl": a8_wl}


def bench_shape(name, k, n, stored_layout, ms, reps, candidates, rng):
    wf = rng.standard_normal((k, n)).astype(np.float32) / np.sqrt(k)  # [K, N]
    scale = np.abs(wf).max(axis=0) / 127.0
    q = np.clip(np.rint(wf / scale), -127, 127).astype(np.int8)
    deq = q.astype(np.float64) * scale
    rows = []
    arrays = {}
    for layout in ("kn", "nk"):
        qq = q if layout == "kn" else np.ascontiguousarray(q.T)
        arrays[layout] = dict(q=jnp.asarray(qq), f=jnp.asarray(wf if layout == "kn" else np.ascontiguousarray(wf.T)),
                              s=jnp.asarray(scale))
    for m in ms:
        x = rng.standard_normal((m, k)).astype(np.float32)
        x[:, : max(1, k // 64)] *= 8.0  # a few outlier channels, as in real activations
        ref = x.astype(np.float64) @ deq
        xj = jnp.asarray(x)
        fns = {}
        for layout in ("kn", "nk"):
            for cname, fn in make_candidates(layout).items():
                if cname not in candidates or (cname == "a8_m1" and m != 1):
                    continue
                if cname == "w8" and layout != stored_layout:
                    continue
                a = arrays[layout]
                w = a["f"] if cname == "f32" else a["q"]
                key = f"{cname}/{layout}"
                fns[key] = (jax.jit(fn), (xj, w, a["s"]))
        errs = {}
        for key, (fn, args) in fns.items():
            out = np.asarray(fn(*args), np.float64)
            ref_k = x.astype(np.float64) @ (wf.astype(np.float64)) if key.startswith("f32") else ref
            errs[key] = np.abs(out - ref_k).max() / np.sqrt(np.mean(ref_k ** 2))
        times = {key: [] for key in fns}
        for _ in range(reps):
            for key, (fn, args) in fns.items():
                t0 = time.perf_counter()
                fn(*args).block_until_ready()
                times[key].append(time.perf_counter() - t0)
        base = np.median(times["f32/kn"]) if "f32/kn" in times else None
        for key in fns:
            med = np.median(times[key])
            rows.append((name, f"{k}x{n}", m, key, med * 1e3, base / med if base else float("nan"), errs[key]))
            print(f"{name:10s} {k}x{n:<7d} M={m:<4d} {key:10s} {med * 1e3:9.3f} ms  x{rows[-1][5]:5.2f} vs f32/kn"
                  f"  err {errs[key]:.2e}", flush=True)
        del fns
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {','.join(SHAPES)}")
    parser.add_argument("--ms", default="1,16,512", help="rows of x (default 1,16,512)")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per candidate (default 7)")
    parser.add_argument("--candidates", default="f32,w8,a8,a8_m1,a8x2,u8,a8_wl")
    parser.add_argument("--output", help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    candidates = set(args.candidates.split(","))
    ms = [int(v) for v in args.ms.split(",")]
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    rows = []
    for name in args.shapes.split(","):
        k, n, layout = SHAPES[name]
        m_list = [m for m in ms if not (name == "head" and m > 64)]  # the whole head is never run at 512 rows
        rows += bench_shape(name, k, n, layout, m_list, args.reps, candidates, rng)
    lines = ["| shape | K x N | M | candidate/layout | median ms | speed vs f32/kn | max err / rms |",
             "| :--- | :--- | ---: | :--- | ---: | ---: | ---: |"]
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.3f} | {r[5]:.2f}x | {r[6]:.1e} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
