// jaxgen's native CPU attention for one new token per row (a decode step), an XLA FFI custom call
// (see jaxgen/model/native.py and jaxgen.model.attention.attend).
//
//   jaxgen_decode_attention: q f32 [B, Hq, hd], k/v f32 [B, S, Hkv, hd], visible u8 [B, N] (N <= S:
//   only the first N slots are read), attributes scale and softcap (0: none) -> f32 [B, Hq, hd]
//
// out[b, h] = softmax_s(scale * q[b, h] . k[b, s, h / G]) over the visible slots s, times v; a row
// that sees nothing gets zeros. Why it exists: XLA:CPU lays the key cache out as [hd, S] for the
// scores' dot, so each decode step copied every layer's whole key cache (at batch 16 on an AVX2
// AMD EPYC, 11 ms of a 110 ms step), and ran the small dots through YNNPACK one call each. Here
// each key and value row is read once, where it lies, for the G query heads that share it.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
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
