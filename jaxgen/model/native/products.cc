// jaxgen's native CPU matrix products, XLA FFI custom calls (see jaxgen/model/native.py).
//
//   out[m, n] = sum_k x[m, k] * w[n, k]      w stored [N, K] (the "nk" layout)
//   jaxgen_int8_gemm_nk: x int8 [M, K], w int8 [N, K] -> int32 [M, N]
//   jaxgen_f32_gemm_nk:  x float32 [M, K], w float32 [N, K] -> float32 [M, N]
//
// The int8 product is exact in int32 (|x|, |w| <= 128, K < 2^17), so its result is identical to
// every other exact formulation of jaxgen.model.int8; the float32 one sums in its own order (float
// rounding). Written first for the products where XLA:CPU's own lowering is far from the memory
// bandwidth (one to a few dozen rows: decoding): each thread takes a chunk of w's rows and reads
// each weight once per call, streaming one w row at a time past a group of rows of x (16 for
// int8, 8 for float32) held in L1, eight rows at a time in registers. w's rows go in blocks that
// stay in the L2 cache while each group of x passes over them, so with more rows than one group
// a weight is still read from memory once; that also made the int8 product faster than XLA's
// float32 one at hundreds of rows (prefill, scoring) on an AVX2 AMD EPYC.
// The instruction set is the compiling machine's (-march=native), chosen at compile time:
//   int8     AVX-512 VNNI: vpdpbusd on (x + 128) as unsigned bytes, minus 128 * the row sums of w;
//            AVX2: vpmaddubsw on |w| and x with w's sign (pairs of products fit int16 since
//            |x| <= 127), then vpmaddwd with ones into int32
//   float32  AVX-512F or AVX2 + FMA: fused multiply-adds, two accumulators per row of x up to 4 rows
//   both     otherwise a plain loop the compiler vectorizes (NEON, SVE, SSE)
// Whether it is used at all is measured per CPU and shape (jaxgen.model.cpu_kernels).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using jaxgen_native::ParallelFor;

namespace {

#ifndef PF_BYTES
#define PF_BYTES 4096
#endif
// Software prefetch distance along w (bytes). One w row is streamed at a time: with several rows
// interleaved, the hardware prefetchers kept up far worse (a one-row product of the 640 x 262,144
// head read 6 GB/s per thread with four rows at once, 10.6 with one, on an AVX2 AMD EPYC).
constexpr int64_t kPrefetchBytes = PF_BYTES;
#ifndef MAX_ROWS
#define MAX_ROWS 8
#endif
#ifndef BLOCK_BYTES
#define BLOCK_BYTES (96 * 1024)
#endif
constexpr int kMaxRows = MAX_ROWS;  // x rows computed together against one w row (its loads shared)
// w's rows are taken in blocks of about this many bytes: a block stays in the L2 cache while
// every group of x's rows (Dot::group_rows) passes over it, so it is read from memory once.
constexpr int64_t kBlockBytes = BLOCK_BYTES;

// ---------------------------------------------------------------------------- int8 x int8 -> int32
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr int64_t kLanes = 64;
using XElem = uint8_t;  // x + 128 as unsigned bytes (prepared once per call)

// out[i * ldo] = sum_c x[i * k + c] * w[c] over the first kv elements, for i < R.
template <int R>
void DotRows(const XElem* x, int64_t kv, int64_t k, const int8_t* w, int32_t* out, int64_t ldo) {
  __m512i acc[R];
  __m512i sums = _mm512_setzero_si512();
  const __m512i ones = _mm512_set1_epi8(1);
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_si512();
  for (int64_t c = 0; c < kv; c += kLanes) {
    _mm_prefetch(reinterpret_cast<const char*>(w + c + kPrefetchBytes), _MM_HINT_T0);
    const __m512i wv = _mm512_loadu_si512(w + c);
    sums = _mm512_dpbusd_epi32(sums, ones, wv);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_loadu_si512(x + r * k + c), wv);
  }
  const int32_t shift = 128 * _mm512_reduce_add_epi32(sums);  // (x + 128) . w - 128 * sum(w)
  for (int r = 0; r < R; ++r) out[r * ldo] = _mm512_reduce_add_epi32(acc[r]) - shift;
}
#elif defined(__AVX2__)
constexpr int64_t kLanes = 32;
using XElem = int8_t;

inline int32_t Hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// vpmaddubsw multiplies unsigned by signed bytes: |w| times x with w's sign, pairs summed in
// int16 (at most 2 * 128 * 127 < 2^15: x is in [-127, 127]), then widened to int32 by vpmaddwd.
template <int R>
void DotRows(const XElem* x, int64_t kv, int64_t k, const int8_t* w, int32_t* out, int64_t ldo) {
  __m256i acc[R];
  const __m256i ones = _mm256_set1_epi16(1);
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
  for (int64_t c = 0; c < kv; c += kLanes) {
    _mm_prefetch(reinterpret_cast<const char*>(w + c + kPrefetchBytes), _MM_HINT_T0);
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c));
    const __m256i wabs = _mm256_abs_epi8(wv);
    for (int r = 0; r < R; ++r) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + r * k + c));
      const __m256i pairs = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xv, wv));
      acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(pairs, ones));
    }
  }
  for (int r = 0; r < R; ++r) out[r * ldo] = Hsum(acc[r]);
}
#else
constexpr int64_t kLanes = 1;
using XElem = int8_t;

template <int R>
void DotRows(const XElem* x, int64_t kv, int64_t k, const int8_t* w, int32_t* out, int64_t ldo) {
  int32_t acc[R] = {};
  for (int64_t c = 0; c < kv; ++c)
    for (int r = 0; r < R; ++r) acc[r] += int32_t(x[r * k + c]) * int32_t(w[c]);
  for (int r = 0; r < R; ++r) out[r * ldo] = acc[r];
}
#endif

struct Int8Dot {
  using X = XElem;
  using W = int8_t;
  using Out = int32_t;
  using Scalar = int8_t;  // x as given, for the tail
  static constexpr int64_t lanes = kLanes;
  // Rows of x that take turns on each w row, and the bytes of x kept in L1 for them (see GemmRows).
  // Measured on an AVX2 AMD EPYC (ms, 16 x 640 x 262,144): 8 rows, no chunks 36; 16 rows 27.
  static constexpr int64_t group_rows = 16;
  static constexpr int64_t panel_bytes = 16 * 1024;
  template <int R>
  static void Rows(const X* x, int64_t kv, int64_t k, const W* w, Out* out, int64_t ldo) {
    DotRows<R>(x, kv, k, w, out, ldo);
  }
};

// ---------------------------------------------------------------------------- float32
#if defined(__AVX512F__)
constexpr int64_t kF32Lanes = 32;  // two vectors of 16 per step: two accumulators per row

template <int R>
void F32Rows(const float* x, int64_t kv, int64_t k, const float* w, float* out, int64_t ldo) {
  constexpr int A = R <= 4 ? 2 : 1;  // accumulators per row (see the AVX2 version)
  __m512 acc[A][R];
  for (int a = 0; a < A; ++a)
    for (int r = 0; r < R; ++r) acc[a][r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < kv; c += 16 * A) {
    _mm_prefetch(reinterpret_cast<const char*>(w + c) + kPrefetchBytes, _MM_HINT_T0);
    for (int a = 0; a < A; ++a) {
      const __m512 wv = _mm512_loadu_ps(w + c + 16 * a);
      for (int r = 0; r < R; ++r) acc[a][r] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * k + c + 16 * a), wv, acc[a][r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r * ldo] = _mm512_reduce_add_ps(A == 2 ? _mm512_add_ps(acc[0][r], acc[A - 1][r]) : acc[0][r]);
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t kF32Lanes = 16;

inline float HsumPs(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int R>
void F32Rows(const float* x, int64_t kv, int64_t k, const float* w, float* out, int64_t ldo) {
  // Two accumulators per row hide the fused multiply-add's latency for up to 4 rows; with more
  // rows there are enough independent sums already (and not enough registers for two each).
  constexpr int A = R <= 4 ? 2 : 1;
  __m256 acc[A][R];
  for (int a = 0; a < A; ++a)
    for (int r = 0; r < R; ++r) acc[a][r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < kv; c += 8 * A) {
    _mm_prefetch(reinterpret_cast<const char*>(w + c) + kPrefetchBytes, _MM_HINT_T0);
    for (int a = 0; a < A; ++a) {
      const __m256 wv = _mm256_loadu_ps(w + c + 8 * a);
      for (int r = 0; r < R; ++r) acc[a][r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * k + c + 8 * a), wv, acc[a][r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r * ldo] = HsumPs(A == 2 ? _mm256_add_ps(acc[0][r], acc[A - 1][r]) : acc[0][r]);
}
#else
constexpr int64_t kF32Lanes = 1;

template <int R>
void F32Rows(const float* x, int64_t kv, int64_t k, const float* w, float* out, int64_t ldo) {
  float acc[R] = {};
  for (int64_t c = 0; c < kv; ++c)
    for (int r = 0; r < R; ++r) acc[r] += x[r * k + c] * w[c];
  for (int r = 0; r < R; ++r) out[r * ldo] = acc[r];
}
#endif

struct F32Dot {
  using X = float;
  using W = float;
  using Out = float;
  using Scalar = float;
  static constexpr int64_t lanes = kF32Lanes;
  // Float32 did better with one group of 8 rows at a time (16 x 640 x 262,144: 62 ms against 73
  // with 16 rows taking turns, in chunks of 256 columns or none).
  static constexpr int64_t group_rows = kMaxRows;
  static constexpr int64_t panel_bytes = 32 * 1024;
  template <int R>
  static void Rows(const X* x, int64_t kv, int64_t k, const W* w, Out* out, int64_t ldo) {
    F32Rows<R>(x, kv, k, w, out, ldo);
  }
};

// ---------------------------------------------------------------------------- shared
// Dot::Rows<R> for x rows r < R against one w row over kv columns: out[r * ldo] is set to the
// dot product, or has it added when `add` (a later chunk of columns).
template <typename Dot, int R>
void RowsInto(const typename Dot::X* x, int64_t kv, int64_t k, const typename Dot::W* w, typename Dot::Out* out,
              int64_t ldo, bool add) {
  typename Dot::Out sums[R];
  Dot::template Rows<R>(x, kv, k, w, sums, 1);
  for (int r = 0; r < R; ++r) out[r * ldo] = add ? out[r * ldo] + sums[r] : sums[r];
}

// Rows [g0, g1) of x (xv: in the vector code's form) against w's rows [j0, j1) over the columns
// [c0, c1) of both: out[r, j] is set to that partial dot product, or has it added when `add`.
// Every row of the group takes its turn on a w row (kMaxRows at a time) before the next w row.
template <typename Dot>
void GroupRows(const typename Dot::X* xv, const typename Dot::W* w, typename Dot::Out* out, int64_t n,
               int64_t k, int64_t g0, int64_t g1, int64_t c0, int64_t c1, int64_t j0, int64_t j1, bool add) {
  const int64_t kc = c1 - c0;
  const int64_t full = g0 + (g1 - g0) / kMaxRows * kMaxRows;
  const auto* xt = xv + full * k + c0;
  for (int64_t j = j0; j < j1; ++j) {
    const typename Dot::W* wj = w + j * k + c0;
    for (int64_t i = g0; i < full; i += kMaxRows)
      RowsInto<Dot, kMaxRows>(xv + i * k + c0, kc, k, wj, out + i * n + j, n, add);
    auto* ot = out + full * n + j;
    switch (g1 - full) {
      case 7: RowsInto<Dot, 7>(xt, kc, k, wj, ot, n, add); break;
      case 6: RowsInto<Dot, 6>(xt, kc, k, wj, ot, n, add); break;
      case 5: RowsInto<Dot, 5>(xt, kc, k, wj, ot, n, add); break;
      case 4: RowsInto<Dot, 4>(xt, kc, k, wj, ot, n, add); break;
      case 3: RowsInto<Dot, 3>(xt, kc, k, wj, ot, n, add); break;
      case 2: RowsInto<Dot, 2>(xt, kc, k, wj, ot, n, add); break;
      case 1: RowsInto<Dot, 1>(xt, kc, k, wj, ot, n, add); break;
      default: break;
    }
  }
}

// Rows [n0, n1) of w against every row of x: out[:, n0:n1]. xv: x in the vector code's form,
// xs: x as given (for the tail of each dot past the last full vector).
//
// The schedule: w's rows in blocks that stay in L2 (read from memory once); per block, x's rows
// in groups of up to Dot::group_rows, and each group's columns in chunks small enough that the
// group's part of x (a panel) stays in L1 while the block's rows stream past it, up to kMaxRows
// rows of x per pass (their sums in registers). A group's rows thus do all their work on a weight
// while it is in the cache, and reading w overlaps with computing on it.
template <typename Dot>
void GemmRows(const typename Dot::X* xv, const typename Dot::Scalar* xs, const typename Dot::W* w,
              typename Dot::Out* out, int64_t m, int64_t n, int64_t k, int64_t n0, int64_t n1) {
  using Out = typename Dot::Out;
  const int64_t lanes = Dot::lanes;
  const int64_t kv = k - k % lanes;
  const int64_t block = std::max<int64_t>(1, kBlockBytes / int64_t(k * sizeof(typename Dot::W)));
  for (int64_t j0 = n0; j0 < n1; j0 += block) {
    const int64_t j1 = std::min(n1, j0 + block);
    for (int64_t g0 = 0; g0 < m; g0 += Dot::group_rows) {
      const int64_t g1 = std::min(m, g0 + Dot::group_rows);
      const int64_t chunk = std::max<int64_t>(lanes, Dot::panel_bytes / int64_t((g1 - g0) * sizeof(typename Dot::X)) / lanes * lanes);
      for (int64_t c0 = 0; c0 == 0 || c0 < kv; c0 += chunk) {  // once with kv == 0: the sums are set to 0
        GroupRows<Dot>(xv, w, out, n, k, g0, g1, c0, std::min(kv, c0 + chunk), j0, j1, c0 > 0);
      }
    }
    if (kv < k) {
      for (int64_t j = j0; j < j1; ++j) {
        const typename Dot::W* wj = w + j * k;
        for (int64_t r = 0; r < m; ++r) {
          Out tail = 0;
          for (int64_t c = kv; c < k; ++c) tail += Out(xs[r * k + c]) * Out(wj[c]);
          out[r * n + j] += tail;
        }
      }
    }
  }
}

// Chunks of w's rows, about 8 per thread so uneven threads even out, and at least 64 KiB of
// weight each so scheduling stays negligible.
int64_t ChunkRows(ffi::ThreadPool& pool, int64_t n, int64_t row_bytes) {
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  return std::max<int64_t>({int64_t(1), (64 * 1024) / row_bytes, (n + 8 * threads - 1) / (8 * threads)});
}

ffi::Error Int8GemmNK(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w,
                      ffi::ResultBuffer<ffi::S32> out) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("jaxgen_int8_gemm_nk: x [M, K] and w [N, K] expected");
  const int64_t m = xd[0], k = xd[1], n = wd[0];
  const int8_t* xs = x.typed_data();
  const int8_t* wp = w.typed_data();
  int32_t* op = out->typed_data();
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::memset(op, 0, sizeof(int32_t) * m * n);
    return ffi::Error::Success();
  }
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  std::vector<uint8_t> shifted(m * k);
  for (int64_t i = 0; i < m * k; ++i) shifted[i] = uint8_t(xs[i]) ^ 0x80;  // x + 128
  const XElem* xv = shifted.data();
#else
  const XElem* xv = xs;
#endif
  const int64_t rows = ChunkRows(pool, n, k);
  ParallelFor(pool, (n + rows - 1) / rows, [&](int64_t c) {
    GemmRows<Int8Dot>(xv, xs, wp, op, m, n, k, c * rows, std::min(n, (c + 1) * rows));
  });
  return ffi::Error::Success();
}

ffi::Error F32GemmNK(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                     ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("jaxgen_f32_gemm_nk: x [M, K] and w [N, K] expected");
  const int64_t m = xd[0], k = xd[1], n = wd[0];
  float* op = out->typed_data();
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::memset(op, 0, sizeof(float) * m * n);
    return ffi::Error::Success();
  }
  const float* xs = x.typed_data();
  const float* wp = w.typed_data();
  const int64_t rows = ChunkRows(pool, n, 4 * k);
  ParallelFor(pool, (n + rows - 1) / rows, [&](int64_t c) {
    GemmRows<F32Dot>(xs, xs, wp, op, m, n, k, c * rows, std::min(n, (c + 1) * rows));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxgenInt8GemmNK, Int8GemmNK,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxgenF32GemmNK, F32GemmNK,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

extern "C" const char* JaxgenInt8GemmIsa() {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return "avx512vnni";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "portable";
#endif
}
