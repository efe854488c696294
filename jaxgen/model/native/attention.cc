// jaxgen's native CPU attention, XLA FFI custom calls (see jaxgen/model/native.py and
// jaxgen.model.attention.attend). G = Hq / Hkv query heads share each key/value head.
//
//   jaxgen_decode_attention: one new token per row (a decode step). q f32 [B, Hq, hd], k/v f32
//   [B, S, Hkv, hd], visible u8 [B, N] (N <= S: only the first N slots are read), attributes scale
//   and softcap (0: none) -> f32 [B, Hq, hd].
//   out[b, h] = softmax_s(scale * q[b, h] . k[b, s, h / G]) over the visible slots s, times v; a row
//   that sees nothing gets zeros. Why it exists: XLA:CPU lays the key cache out as [hd, S] for the
//   scores' dot, so each decode step copied every layer's whole key cache (at batch 16 on an AVX2
//   AMD EPYC, 11 ms of a 110 ms step), and ran the small dots through YNNPACK one call each. Here
//   each key and value row is read once, where it lies, for the G query heads that share it.
//
//   jaxgen_causal_attention: a fresh chunk's causal self-attention (a prefill, a scoring pass).
//   q f32 [B, T, Hq, hd], k/v f32 [B, T, Hkv, hd], lengths s32 [B] (row b's tokens are its first
//   lengths[b], the rest padding), attributes scale, softcap (0: none) and window (0: none)
//   -> f32 [B, T, Hq, hd]. Query i of row b sees keys j with i - window < j <= i; padding queries
//   get zeros. Each task takes a tile of query rows with their G heads: the scores against the
//   keys the tile can see and their products with v run as GemmKN (gemm.h, register-tiled), where
//   XLA:CPU ran the causal blocks' small dots and softmaxes one YNNPACK call each, with copies
//   between them (at 512 tokens on an AVX2 AMD EPYC, ~370 ms of a 1,200 ms int8 prefill).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "gemm.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using jaxgen_native::GemmKN;
using jaxgen_native::ParallelFor;

namespace {

// Sixteen independent partial sums: the compiler turns the inner loop into vector multiply-adds
// without reassociating a single sum (no -ffast-math needed).
inline float Dot(const float* a, const float* b, int64_t n) {
  float acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
  float sum = 0.f;
  for (int j = 0; j < 16; ++j) sum += acc[j];
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// One (row b, key/value head h) pair: its G query heads against the first n slots.
void HeadAttention(const float* q, const float* k, const float* v, const uint8_t* visible, float* out,
                   int64_t n, int64_t g_count, int64_t hd, int64_t slot_stride, float scale, float softcap,
                   std::vector<float>& scores) {
  scores.assign(g_count * n, 0.f);
  bool any = false;
  for (int64_t s = 0; s < n; ++s) {
    if (!visible[s]) continue;
    any = true;
    const float* ks = k + s * slot_stride;
    for (int64_t g = 0; g < g_count; ++g) {
      float x = Dot(q + g * hd, ks, hd) * scale;
      if (softcap > 0.f) x = std::tanh(x / softcap) * softcap;
      scores[g * n + s] = x;
    }
  }
  std::memset(out, 0, sizeof(float) * g_count * hd);
  if (!any) return;
  for (int64_t g = 0; g < g_count; ++g) {
    float* sg = scores.data() + g * n;
    float m = -INFINITY;
    for (int64_t s = 0; s < n; ++s)
      if (visible[s]) m = std::max(m, sg[s]);
    float denom = 0.f;
    for (int64_t s = 0; s < n; ++s)
      if (visible[s]) denom += (sg[s] = std::exp(sg[s] - m));
    const float inv = 1.f / denom;
    float* og = out + g * hd;
    for (int64_t s = 0; s < n; ++s) {
      if (!visible[s]) continue;
      const float p = sg[s] * inv;
      const float* vs = v + s * slot_stride;
      for (int64_t d = 0; d < hd; ++d) og[d] += p * vs[d];
    }
  }
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::U8> visible, float scale, float softcap,
                           ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = visible.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || md.size() != 2)
    return ffi::Error::InvalidArgument("jaxgen_decode_attention: q [B, Hq, hd], k/v [B, S, Hkv, hd], visible [B, N]");
  const int64_t b = qd[0], hq = qd[1], hd = qd[2], s = kd[1], hkv = kd[2], n = md[1];
  if (kd[0] != b || kd[3] != hd || vd[0] != b || vd[1] != s || vd[2] != hkv || vd[3] != hd || md[0] != b ||
      n > s || hkv == 0 || hq % hkv != 0)
    return ffi::Error::InvalidArgument("jaxgen_decode_attention: inconsistent shapes");
  const int64_t g_count = hq / hkv;
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  const uint8_t* mp = visible.typed_data();
  float* op = out->typed_data();
  ParallelFor(pool, b * hkv, [&](int64_t task) {
    thread_local std::vector<float> scores;
    const int64_t row = task / hkv, h = task % hkv;
    const int64_t kv_offset = (row * s * hkv + h) * hd;  // slot 0 of head h in row `row`
    HeadAttention(qp + (row * hq + h * g_count) * hd, kp + kv_offset, vp + kv_offset, mp + row * n,
                  op + (row * hq + h * g_count) * hd, n, g_count, hd, hkv * hd, scale, softcap, scores);
  });
  return ffi::Error::Success();
}

using jaxgen_native::LoadVec8;
using jaxgen_native::StoreVec8;
using jaxgen_native::Vec8;
typedef int32_t Int32x8 __attribute__((vector_size(32)));

inline Vec8 Max(Vec8 a, Vec8 b) { return a > b ? a : b; }

// exp(x) for x <= 0 (scores minus their row's maximum), within about 2 ulp; x below -87 is taken
// as -87 (exp about 1.6e-38, nothing next to the maximum's own 1): Cephes' expf polynomial on eight
// lanes, where std::exp stays one scalar call per element without -ffast-math.
inline Vec8 ExpNonPositive(Vec8 x) {
  const Vec8 floor_x = Vec8{} - 87.f;
  x = Max(x, floor_x);
  const Vec8 n = (x * 1.44269504f + 12582912.f) - 12582912.f;  // round(x / ln 2): 1.5 * 2^23 rounds
  const Vec8 r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n ln 2, ln 2 in two parts
  Vec8 p = Vec8{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const Vec8 e = p * r * r + r + 1.f;  // exp(r), |r| <= ln 2 / 2
  const Int32x8 bits = (__builtin_convertvector(n, Int32x8) + 127) << 23;  // 2^n: n >= -126 here
  return e * reinterpret_cast<const Vec8&>(bits);
}

// exp(x[j] - max x) for j < n (n >= 1) in place, eight lanes at a time (the last partial vector
// through a padded copy); returns their sum.
float ExpShiftedInPlace(float* x, int64_t n) {
  const int64_t n8 = n / 8 * 8;
  float tail[8];
  std::fill(tail, tail + 8, -INFINITY);
  std::copy(x + n8, x + n, tail);
  Vec8 top = LoadVec8(tail);
  for (int64_t j = 0; j < n8; j += 8) top = Max(top, LoadVec8(x + j));
  float m = top[0];
  for (int l = 1; l < 8; ++l) m = std::max(m, top[l]);
  Vec8 sum = ExpNonPositive(LoadVec8(tail) - m);  // the -inf padding adds at most 8 x 1.6e-38
  StoreVec8(tail, sum);
  std::copy(tail, tail + (n - n8), x + n8);
  for (int64_t j = 0; j < n8; j += 8) {
    const Vec8 e = ExpNonPositive(LoadVec8(x + j) - m);
    StoreVec8(x + j, e);
    sum += e;
  }
  float total = 0.f;
  for (int l = 0; l < 8; ++l) total += sum[l];
  return total;  // >= 1: the maximum's own term
}

// Sizes of a causal call: q/out [B, T, Hq, hd], k/v [B, T, Hkv, hd], G = Hq / Hkv.
struct CausalDims {
  int64_t b, t, hq, hkv, g, hd;
};

// Query rows [i0, i0 + rows) of row `row`, key/value head h, with their G heads each, over the keys
// they see; `length` valid tokens. kt: the pair's keys transposed, [hd, T]. Buffers: q_tile and
// out_tile [rows * G, hd] (query i's heads at (i - i0) * G ...), scores [rows * G, keys seen],
// inverse [rows * G] (each softmax's 1 / sum, applied to its output row).
void CausalTile(const CausalDims& d, const float* q, const float* kt, const float* v, float* out, int64_t row,
                int64_t h, int64_t i0, int64_t rows, int64_t length, int64_t window, float scale, float softcap,
                std::vector<float>& q_tile, std::vector<float>& out_tile, std::vector<float>& scores,
                std::vector<float>& inverse) {
  const int64_t heads = d.g * d.hd;  // one query's G heads: contiguous in q and out
  auto at = [&](int64_t i) { return ((row * d.t + i) * d.hq + h * d.g) * d.hd; };
  const int64_t valid = std::clamp<int64_t>(length - i0, 0, rows);
  for (int64_t i = i0 + valid; i < i0 + rows; ++i) std::memset(out + at(i), 0, sizeof(float) * heads);
  if (valid == 0) return;
  const int64_t lo = window > 0 ? std::max<int64_t>(0, i0 - window + 1) : 0;
  const int64_t n = i0 + valid - lo;  // keys [lo, i0 + valid): every one some query of the tile sees
  const int64_t m = valid * d.g;
  q_tile.resize(m * d.hd);
  out_tile.resize(m * d.hd);
  scores.resize(m * n);
  for (int64_t i = 0; i < valid; ++i) {  // the scale applied here, once per query element
    const float* src = q + at(i0 + i);
    float* dst = q_tile.data() + i * heads;
    for (int64_t c = 0; c < heads; ++c) dst[c] = src[c] * scale;
  }
  float* s = scores.data();
  GemmKN(q_tile.data(), d.hd, kt + lo, d.t, s, n, m, n, d.hd);
  inverse.resize(m);
  for (int64_t r = 0; r < m; ++r) {
    const int64_t i = i0 + r / d.g;
    const int64_t a = (window > 0 ? std::max<int64_t>(lo, i - window + 1) : lo) - lo, b = i + 1 - lo;
    float* sr = s + r * n;
    if (softcap > 0.f)
      for (int64_t j = a; j < b; ++j) sr[j] = std::tanh(sr[j] / softcap) * softcap;
    inverse[r] = 1.f / ExpShiftedInPlace(sr + a, b - a);  // normalized on the output rows below
    std::fill(sr, sr + a, 0.f);
    std::fill(sr + b, sr + n, 0.f);
  }
  GemmKN(s, n, v + ((row * d.t + lo) * d.hkv + h) * d.hd, d.hkv * d.hd, out_tile.data(), d.hd, m, d.hd, n);
  for (int64_t i = 0; i < valid; ++i) {
    float* dst = out + at(i0 + i);
    const float* src = out_tile.data() + i * heads;
    for (int64_t g = 0; g < d.g; ++g)
      for (int64_t c = 0; c < d.hd; ++c) dst[g * d.hd + c] = src[g * d.hd + c] * inverse[i * d.g + g];
  }
}

ffi::Error CausalAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> lengths, float scale, float softcap,
                           int64_t window, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), ld = lengths.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || ld.size() != 1)
    return ffi::Error::InvalidArgument(
        "jaxgen_causal_attention: q [B, T, Hq, hd], k/v [B, T, Hkv, hd], lengths [B]");
  const int64_t hkv = kd[2];
  if (hkv == 0 || qd[2] % hkv != 0 || kd[0] != qd[0] || kd[1] != qd[1] || kd[3] != qd[3] || vd[0] != kd[0] ||
      vd[1] != kd[1] || vd[2] != kd[2] || vd[3] != kd[3] || ld[0] != qd[0])
    return ffi::Error::InvalidArgument("jaxgen_causal_attention: inconsistent shapes");
  const CausalDims d{qd[0], qd[1], qd[2], hkv, qd[2] / hkv, qd[3]};
  if (d.b * d.t * d.hq * d.hd == 0) return ffi::Error::Success();
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  const int32_t* lp = lengths.typed_data();
  float* op = out->typed_data();
  const int64_t pairs = d.b * d.hkv;  // (row, key/value head)
  // Each pair's keys transposed to [hd, T] once, the layout the scores' product reads.
  std::unique_ptr<float[]> kt(new float[pairs * d.hd * d.t]);  // every element written below
  constexpr int64_t kKeyBlock = 64;
  const int64_t key_blocks = (d.t + kKeyBlock - 1) / kKeyBlock;
  ParallelFor(pool, pairs * key_blocks, [&](int64_t task) {
    const int64_t pair = task / key_blocks, j0 = task % key_blocks * kKeyBlock, j1 = std::min(d.t, j0 + kKeyBlock);
    const float* src = kp + ((pair / d.hkv) * d.t * d.hkv + pair % d.hkv) * d.hd;  // key j at src + j * hkv * hd
    float* dst = kt.get() + pair * d.hd * d.t;
    for (int64_t c = 0; c < d.hd; ++c)
      for (int64_t j = j0; j < j1; ++j) dst[c * d.t + j] = src[j * d.hkv * d.hd + c];
  });
  // About 64 query vectors per tile: enough rows per pass over the keys, and tiles for every thread.
  const int64_t rows = std::min<int64_t>(d.t, std::max<int64_t>(4, 64 / d.g));
  const int64_t tiles = (d.t + rows - 1) / rows;
  ParallelFor(pool, pairs * tiles, [&](int64_t task) {
    thread_local std::vector<float> q_tile, out_tile, scores, inverse;
    const int64_t pair = task % pairs, tile = tiles - 1 - task / pairs;  // the longest tiles first
    const int64_t row = pair / d.hkv, i0 = tile * rows;
    CausalTile(d, qp, kt.get() + pair * d.hd * d.t, vp, op, row, pair % d.hkv, i0, std::min(rows, d.t - i0),
               std::clamp<int64_t>(lp[row], 0, d.t), window, scale, softcap, q_tile, out_tile, scores, inverse);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxgenDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxgenCausalAttention, CausalAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Attr<int64_t>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>());
