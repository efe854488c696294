"""jaxgen's native CPU kernels: `native/products.cc` (matrix products) and `native/attention.cc` (a
decode step's attention, a fresh chunk's causal self-attention), compiled on this machine at the
first use.

XLA:CPU's own int8 products are far from the memory bandwidth where decoding needs them most:
on an AVX2 AMD EPYC (Zen 3, no VNNI) a one-row int8 product with the 640 x 262,144 head took
32 ms (5 GB/s) against 12 ms (14 GB/s, about what the machine reads) for this kernel, which
streams each weight row once past the rows of x. The same loop in float32 serves float32 weights
(XLA's float32 products of 16 rows were compute-bound far below the machine's rate there). Each is
one more candidate of `jaxgen.model.cpu_kernels` ("c8": int8, "c32": float32; weights stored
[N, K]), used only where it measures fastest.

The source is compiled with the system's C++ compiler (`$CXX`, else `c++`) for this machine's
instruction set (`-march=native`) against the XLA FFI headers jaxlib ships, into
`<jaxgen cache dir>/native/<key>.so`, keyed by the source, the compiler, the flags, jaxlib and
the CPU: another machine compiles its own. It is then registered as the XLA FFI targets
`jaxgen_int8_gemm_nk`, `jaxgen_f32_gemm_nk`, `jaxgen_decode_attention` and
`jaxgen_causal_attention`. Without a compiler (or
`JAXGEN_NATIVE=0`) the kernels are unavailable and XLA's own formulations run; `unavailable_reason()`
says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

ENV_SWITCH = "JAXGEN_NATIVE"
TARGETS = {"jaxgen_int8_gemm_nk": "JaxgenInt8GemmNK", "jaxgen_f32_gemm_nk": "JaxgenF32GemmNK",
           "jaxgen_decode_attention": "JaxgenDecodeAttention",
           "jaxgen_causal_attention": "JaxgenCausalAttention"}  # name -> symbol
_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native")
SOURCES = tuple(os.path.join(_DIR, name) for name in ("products.cc", "attention.cc"))
HEADERS = tuple(os.path.join(_DIR, name) for name in ("parallel.h", "gemm.h"))
PRODUCT_FILES = tuple(os.path.join(_DIR, name) for name in ("products.cc", "parallel.h"))  # what the products are built from
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
COMPILE_TIMEOUT_S = 300

_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded library, or "reason": why there is none


def _compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CXX") or "c++")


def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def build_key(cxx: str) -> str:
    """What the compiled library depends on: the source, the compiler and its flags, jaxlib (the
    FFI headers) and the CPU (-march=native)."""
    import jaxlib

    from jaxgen.model.cpu_kernels import machine_fingerprint

    machine = {k: str(v) for k, v in machine_fingerprint().items() if k in ("cpu", "id", "machine", "isa")}
    sources = [open(path, "rb").read().decode() for path in SOURCES + HEADERS]
    parts = [*sources, cxx, _compiler_version(cxx), " ".join(FLAGS), jaxlib.__version__, repr(sorted(machine.items()))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _build(cxx: str, path: str) -> None:
    """Compiles SOURCES into `path` (atomically: concurrent processes may build the same file)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".so.tmp")
    os.close(fd)
    try:
        cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), *SOURCES, "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load() -> dict:
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return {"reason": f"{ENV_SWITCH}=0"}
    cxx = _compiler()
    if cxx is None:
        return {"reason": f"no C++ compiler ({os.environ.get('CXX') or 'c++'} not found; set CXX)"}
    from jaxgen.default_model import cache_dir

    path = os.path.join(cache_dir(), "native", f"products-{build_key(cxx)}.so")
    try:
        if not os.path.isfile(path):
            _build(cxx, path)
        lib = ctypes.CDLL(path)
        lib.JaxgenInt8GemmIsa.restype = ctypes.c_char_p
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
        return {"reason": f"{type(e).__name__}: {e}"}
    return {"lib": lib, "path": path}


def _ensure() -> dict:
    with _lock:
        if not _state:
            _state.update(_load())
        return _state


def available() -> bool:
    """Whether the native kernel is compiled and registered (compiles it at the first call, a few
    seconds once per machine)."""
    return "lib" in _ensure()


def unavailable_reason() -> Optional[str]:
    return _ensure().get("reason")


def isa() -> Optional[str]:
    """The instruction set the int8 kernel was compiled for ("avx512vnni", "avx2", "portable")."""
    lib = _ensure().get("lib")
    return lib.JaxgenInt8GemmIsa().decode() if lib is not None else None


def source_hash() -> str:
    """A hash of the products' source (part of the CPU kernel cache's machine fingerprint)."""
    return hashlib.sha256(b"".join(open(path, "rb").read() for path in PRODUCT_FILES)).hexdigest()[:12]


def _require() -> None:
    """Raises RuntimeError (with the reason) if the native kernels are unavailable."""
    state = _ensure()
    if "lib" not in state:
        raise RuntimeError(f"jaxgen's native CPU kernels are unavailable: {state['reason']}")


def _call(target: str, x: jax.Array, w: jax.Array, out_dtype) -> jax.Array:
    _require()
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), out_dtype)
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(x, w)


def int8_gemm_nk(xq: jax.Array, w: jax.Array) -> jax.Array:
    """int8 xq [M, K] . int8 w [N, K]^T -> exact int32 [M, N] through the native kernel (CPU only;
    raises RuntimeError if it is unavailable)."""
    return _call("jaxgen_int8_gemm_nk", xq, w, jnp.int32)


def f32_gemm_nk(x: jax.Array, w: jax.Array) -> jax.Array:
    """float32 x [M, K] . float32 w [N, K]^T -> float32 [M, N] through the native kernel (CPU only;
    raises RuntimeError if it is unavailable). Not differentiable: `float32_matmul` is."""
    return _call("jaxgen_f32_gemm_nk", x, w, jnp.float32)


@jax.custom_jvp
def float32_matmul_nk(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., K] float32 @ w [N, K]^T -> [..., N] through the native float32 kernel, differentiable
    (the tangents are plain dots)."""
    y = f32_gemm_nk(x.reshape(-1, x.shape[-1]), w)
    return y.reshape(*x.shape[:-1], w.shape[0])


@float32_matmul_nk.defjvp
def _float32_matmul_nk_jvp(primals, tangents):
    x, w = primals
    dx, dw = tangents
    return float32_matmul_nk(x, w), jnp.dot(dx, w.T) + jnp.dot(x, dw.T)


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, scale: float,
                     softcap) -> jax.Array:
    """One new token per row attending to a cache (CPU only, float32; raises RuntimeError if the
    kernel is unavailable): q [B, Hq, hd], k/v [B, S, Hkv, hd], visible bool [B, N] with N <= S
    (only the first N slots are read) -> [B, Hq, hd]; a row that sees nothing gets zeros.
    Differentiable: the tangents go through `jaxgen.model.attention`'s XLA formulation."""
    return _decode_attention(q, k, v, visible, float(scale), float(softcap or 0.0))


@partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def _decode_attention(q, k, v, visible, scale: float, softcap: float):
    _require()
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return jax.ffi.ffi_call("jaxgen_decode_attention", out, vmap_method="sequential")(
        q, k, v, visible.astype(jnp.uint8), scale=np.float32(scale), softcap=np.float32(softcap))


@_decode_attention.defjvp
def _decode_attention_jvp(scale, softcap, primals, tangents):
    from jaxgen.model.attention import decode_attention_reference

    q, k, v, visible = primals
    dq, dk, dv, _ = tangents
    out = _decode_attention(q, k, v, visible, scale, softcap)
    _, dout = jax.jvp(lambda q, k, v: decode_attention_reference(q, k, v, visible, scale, softcap), (q, k, v),
                      (dq, dk, dv))
    return out, dout


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, scale: float, softcap,
                     window) -> jax.Array:
    """A fresh chunk's causal self-attention (CPU only, float32; raises RuntimeError if the kernel is
    unavailable): q [B, T, Hq, hd], k/v [B, T, Hkv, hd], lengths int [B] (row b's first lengths[b]
    tokens are real, at positions 0, 1, ...; the rest is padding) -> [B, T, Hq, hd]. Query i sees
    keys j with i - window < j <= i (window None: no limit); padding queries get zeros.
    Differentiable: the tangents go through `jaxgen.model.attention`'s XLA formulation."""
    return _causal_attention(q, k, v, lengths, float(scale), float(softcap or 0.0), int(window or 0))


@partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6))
def _causal_attention(q, k, v, lengths, scale: float, softcap: float, window: int):
    _require()
    return jax.ffi.ffi_call("jaxgen_causal_attention", jax.ShapeDtypeStruct(q.shape, jnp.float32),
                            vmap_method="sequential")(
        q, k, v, lengths.astype(jnp.int32), scale=np.float32(scale), softcap=np.float32(softcap),
        window=np.int64(window))


@_causal_attention.defjvp
def _causal_attention_jvp(scale, softcap, window, primals, tangents):
    from jaxgen.model.attention import causal_attention_reference

    q, k, v, lengths = primals
    dq, dk, dv, _ = tangents
    out = _causal_attention(q, k, v, lengths, scale, softcap, window)
    _, dout = jax.jvp(lambda q, k, v: causal_attention_reference(q, k, v, lengths, scale, softcap, window),
                      (q, k, v), (dq, dk, dv))
    return out, dout
