// The arithmetic ceiling of int8 products on an AVX2 CPU (no VNNI): how many 8-bit multiply-adds
// per second one core does in each formulation, with the data in registers (no loads, no memory).
//
//   g++ -O2 -march=native benchmarks/avx2_int8_ops.cc -o /tmp/avx2_int8_ops && /tmp/avx2_int8_ops
//
// Eight rows of x against one row of w, as jaxgen's native kernel (jaxgen/model/native/products.cc)
// runs them. The formulations, per 32 multiply-adds of one row:
//   exact       vpsignb + vpmaddubsw + vpmaddwd + vpaddd: |w| times x with w's sign, so no pair of
//               products saturates int16 (jaxgen's `c8`; ggml's q8_0 dot does the same)
//   saturating  vpmaddubsw + vpmaddwd + vpaddd on (x + 128) as unsigned bytes: a pair of products
//               can exceed int16 and saturate (oneDNN's u8s8 GEMM on AVX2, which CTranslate2 runs
//               on non-Intel CPUs: its backend picks oneDNN there and shifts activations to uint8)
//   int16       vpmaddwd + vpaddd on int16 operands, 16 multiply-adds per instruction
// The question it answers: how far is jaxgen's exact product from the saturating one CTranslate2
// runs, in arithmetic alone? (The exact one takes one instruction more per 32 multiply-adds.)
// On the AVX2 AMD EPYC (Zen 3, 2 vCPUs, shared) three runs gave exact 39.9-40.8, saturating
// 32.7-45.0, int16 30.5-31.5 GMAC/s per core; runs on a busy machine move by 20% or more.
#include <chrono>
#include <cstdio>

#if defined(__AVX2__)
#include <immintrin.h>

enum Formulation { kExact, kSaturating, kInt16 };

template <Formulation F>
__attribute__((noinline)) __m256i Run(long iters, __m256i a, __m256i b) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[8], xs[8];
  for (int r = 0; r < 8; ++r) {
    acc[r] = _mm256_setzero_si256();
    xs[r] = _mm256_add_epi8(a, _mm256_set1_epi8(char(r)));
  }
  for (long i = 0; i < iters; ++i) {
    b = _mm256_add_epi8(b, ones);  // a new w vector each step (as a load would give)
    const __m256i babs = _mm256_abs_epi8(b);
    for (int r = 0; r < 8; ++r) {
      __m256i products;
      if (F == kExact) products = _mm256_madd_epi16(_mm256_maddubs_epi16(babs, _mm256_sign_epi8(xs[r], b)), ones);
      if (F == kSaturating) products = _mm256_madd_epi16(_mm256_maddubs_epi16(xs[r], b), ones);
      if (F == kInt16) products = _mm256_madd_epi16(xs[r], b);
      acc[r] = _mm256_add_epi32(acc[r], products);
    }
  }
  __m256i s = acc[0];
  for (int r = 1; r < 8; ++r) s = _mm256_add_epi32(s, acc[r]);
  return s;
}

template <Formulation F>
void Report(const char* name, double macs_per_op) {
  const long iters = 50000000;
  double best = 1e30;
  int sink = 0;
  for (int round = 0; round < 3; ++round) {  // best of 3: the machine may be shared
    const auto t0 = std::chrono::steady_clock::now();
    sink += _mm256_extract_epi32(Run<F>(iters, _mm256_set1_epi8(3), _mm256_set1_epi8(5)), 0);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (seconds < best) best = seconds;
  }
  std::printf("%-12s %6.1f GMAC/s per core  (%.3f ns per 32 multiply-adds of one row)%s\n", name,
              iters * 8 * macs_per_op / best / 1e9, best / iters / 8 * 1e9 * 32 / macs_per_op, sink == 1 ? " " : "");
}

int main() {
  Report<kExact>("exact", 32);
  Report<kSaturating>("saturating", 32);
  Report<kInt16>("int16", 16);
  return 0;
}
#else
int main() {
  std::printf("needs AVX2 (compile with -march=native on an AVX2 CPU)\n");
  return 0;
}
#endif
