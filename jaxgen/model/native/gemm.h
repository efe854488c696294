// A float32 matrix product for jaxgen's native attention (attention.cc), in portable vector code:
//
//   GemmKN: c[m, n] = a[m, k] . b[k, n], b row-major: register tiles of 6 rows x 16 columns of c
//   summed by broadcast multiply-adds (no horizontal sums), for small, compute-bound products whose
//   operands are in the cache. (products.cc's GemmRows is the other shape of product: each row of a
//   big weight streamed once past the rows of x.)
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace jaxgen_native {

// ---------------------------------------------------------------------------- GemmKN
// Eight floats in whatever vectors the target has (one AVX register; two SSE or NEON ones).
typedef float Vec8 __attribute__((vector_size(32)));

inline Vec8 LoadVec8(const float* p) {
  Vec8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void StoreVec8(float* p, Vec8 v) { std::memcpy(p, &v, sizeof(v)); }

// c[r, 8 * v ...] (r < R, v < V) = (add ? c : 0) + sum_{p < k} a[r, p] * b[p, 8 * v ...].
template <int R, int V>
void KernelKN(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t k, bool add) {
  Vec8 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = add ? LoadVec8(c + r * ldc + 8 * v) : Vec8{};
  for (int64_t p = 0; p < k; ++p) {
    Vec8 bv[V];
    for (int v = 0; v < V; ++v) bv[v] = LoadVec8(b + p * ldb + 8 * v);
    for (int r = 0; r < R; ++r) {
      const float x = a[r * lda + p];
      const Vec8 av = {x, x, x, x, x, x, x, x};  // a broadcast load (Vec8{} + x would add a zero first)
      for (int v = 0; v < V; ++v) acc[r][v] += av * bv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) StoreVec8(c + r * ldc + 8 * v, acc[r][v]);
}

template <int V>
void KernelRowsKN(int rows, const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                  int64_t k, bool add) {
  switch (rows) {
    case 6: KernelKN<6, V>(a, lda, b, ldb, c, ldc, k, add); break;
    case 5: KernelKN<5, V>(a, lda, b, ldb, c, ldc, k, add); break;
    case 4: KernelKN<4, V>(a, lda, b, ldb, c, ldc, k, add); break;
    case 3: KernelKN<3, V>(a, lda, b, ldb, c, ldc, k, add); break;
    case 2: KernelKN<2, V>(a, lda, b, ldb, c, ldc, k, add); break;
    case 1: KernelKN<1, V>(a, lda, b, ldb, c, ldc, k, add); break;
    default: break;
  }
}

// c[m, n] = a[m, k] . b[k, n] in float32, row strides lda, ldb, ldc. Per chunk of 256 along k,
// each 16 columns of b are copied into a contiguous panel (its rows ldb apart would map onto a
// few L1 sets when ldb is a power of two) that every 6 rows of a then pass over.
inline void GemmKN(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t m,
                   int64_t n, int64_t k) {
  constexpr int64_t kRows = 6, kChunk = 256;
  const int64_t n16 = n / 16 * 16, n8 = n / 8 * 8;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i) std::memset(c + i * ldc, 0, sizeof(float) * n);
    return;
  }
  alignas(64) float panel[kChunk * 16];
  for (int64_t p0 = 0; p0 < k; p0 += kChunk) {
    const int64_t kc = std::min(kChunk, k - p0);
    const bool add = p0 > 0;
    const float* bp = b + p0 * ldb;
    for (int64_t j0 = 0; j0 < n8; j0 += 16) {
      const int64_t width = j0 < n16 ? 16 : 8;
      for (int64_t p = 0; p < kc; ++p) std::memcpy(panel + p * width, bp + p * ldb + j0, sizeof(float) * width);
      for (int64_t i0 = 0; i0 < m; i0 += kRows) {
        const int rows = int(std::min(kRows, m - i0));
        if (width == 16) KernelRowsKN<2>(rows, a + i0 * lda + p0, lda, panel, 16, c + i0 * ldc + j0, ldc, kc, add);
        else KernelRowsKN<1>(rows, a + i0 * lda + p0, lda, panel, 8, c + i0 * ldc + j0, ldc, kc, add);
      }
    }
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = n8; j < n; ++j) {
        float sum = add ? c[i * ldc + j] : 0.f;
        for (int64_t p = 0; p < kc; ++p) sum += a[i * lda + p0 + p] * bp[p * ldb + j];
        c[i * ldc + j] = sum;
      }
  }
}

}  // namespace jaxgen_native
