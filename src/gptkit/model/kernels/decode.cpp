// Inference kernels for decoding a few tokens at a time, where torch's general kernels spend
// more time in set-up than in arithmetic: RMSNorm in one pass; attention of a few query rows
// over a KV cache under a boolean mask, with grouped-query heads read in place (no repeated
// keys, no copy of the cache to another dtype); and the rotary embedding of one new token
// per row with its keys and values written into the cache. fp32 sums throughout; the
// Python paths they replace (F.rms_norm, F.scaled_dot_product_attention, the model's
// apply_rope and cache writes) define the results (model/decode_step.py uses all three).
// For CPUs with AVX2 and no AVX-512: int4 products with int8 activations (int4_gemv, for
// quant.Int4Linear), and every block of such an int4 model's decoding step in one call
// (int4_blocks).

// No fused multiply-adds where the model rounds a product before adding (rotary embedding).
#pragma GCC optimize("fp-contract=off")

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "vec16.h"

namespace {

namespace simd = gptkit::v16;
using simd::first;
using simd::load;
using simd::store;

bool float_or_bf16(const at::Tensor& t) {
  return t.device().is_cpu() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16);
}

bool bf(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16; }

}  // namespace

// RMSNorm of x (..., C) contiguous, fp32 or bf16, with weight (C,) fp32: x / sqrt(mean(x²) +
// eps) · weight, as F.rms_norm computes it (in fp32), in `dtype` (fp32 or bf16: rounded once,
// as F.rms_norm(x).to(dtype) rounds).
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps, at::ScalarType dtype) {
  TORCH_CHECK(float_or_bf16(x) && x.is_contiguous() && x.dim() >= 1,
              "rms_norm kernel: x contiguous fp32 or bf16 on the CPU");
  const int64_t C = x.size(-1), rows = C ? x.numel() / C : 0;
  TORCH_CHECK(weight.numel() == C && weight.scalar_type() == at::kFloat && weight.is_contiguous(),
              "rms_norm kernel: weight fp32 of x's last dimension");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "rms_norm kernel: fp32 or bf16 out");
  auto y = at::empty(x.sizes(), x.options().dtype(dtype));
  const bool xbf = bf(x), ybf = dtype == at::kBFloat16;
  const void* xp = x.data_ptr();
  const float* wp = weight.data_ptr<float>();
  void* yp = y.data_ptr();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) {
                       simd::vec q = simd::zero();
                       for (int64_t c = 0; c < C; c += 16) {
                         simd::vec x = load(xp, xbf, r * C + c, first(C - c));
                         q = simd::fmadd(x, x, q);
                       }
                       float rs = 1.0f / std::sqrt(simd::sum(q) / (float)C + (float)eps);
                       simd::vec vr = simd::set1(rs);
                       for (int64_t c = 0; c < C; c += 16) {
                         simd::mask n = first(C - c);
                         simd::vec h = simd::mul(load(xp, xbf, r * C + c, n), vr);
                         store(yp, ybf, r * C + c, n, simd::mul(h, load(wp, false, c, n)));
                       }
                     }
                   });
  return y;
}

namespace {

// What masked_attention's tasks read and write.
struct Rows {
  const char *q, *k, *v;
  const uint8_t* mask;
  char* out;
  at::IntArrayRef qs, ks, vs;
  int64_t mb, mt, ms, eq, ek, ev, eo;
  bool qbf, kbf, vbf, obf;
  int64_t H, T, d, S;
  float scale;
};

// Query heads g·n .. g·n + n - 1 of row b, query t, over keys s0 .. s1 - 1 of key head g,
// four heads at a time (each key and value row loaded once for them): CH chunks of 16 lanes
// per row (CH·16 >= d, the tail masked); p holds 4·(s1 - s0) scores. Without `part`, the
// result goes to the output; with it, each head's (max score, sum of weights, weighted sum
// of values unnormalised: CH·16 floats) goes there, n of them, for combine().
template <int CH>
void attend_group(const Rows& r, int64_t b, int64_t g, int64_t n, int64_t t, int64_t s0,
                  int64_t s1, float* p, float* part) {
  constexpr float none = -std::numeric_limits<float>::infinity();
  const int64_t d = r.d, S = s1 - s0;
  simd::mask lanes[CH];
  for (int c = 0; c < CH; ++c) lanes[c] = first(d - c * 16);
  const char* kb = r.k + (b * r.ks[0] + g * r.ks[1] + s0 * r.ks[2]) * r.ek;
  const char* vb = r.v + (b * r.vs[0] + g * r.vs[1] + s0 * r.vs[2]) * r.ev;
  const uint8_t* mr = r.mask + b * r.mb + t * r.mt + s0 * r.ms;
  float best[4];  // four query heads at a time
  for (int64_t h0 = 0; h0 < n; h0 += 4) {
    const int64_t nh = std::min<int64_t>(4, n - h0);
    simd::vec qv[4][CH];
    for (int64_t j = 0; j < nh; ++j) {
      const int64_t h = g * n + h0 + j;
      const char* qr = r.q + (b * r.qs[0] + h * r.qs[1] + t * r.qs[2]) * r.eq;
      for (int c = 0; c < CH; ++c) qv[j][c] = load(qr, r.qbf, c * 16, lanes[c]);
      best[j] = none;
    }
    for (int64_t s = 0; s < S; ++s) {
      if (!mr[s * r.ms]) {
        for (int64_t j = 0; j < nh; ++j) p[j * S + s] = none;
        continue;
      }
      const char* kr = kb + s * r.ks[2] * r.ek;
      simd::vec kv[CH], acc[4] = {simd::zero(), simd::zero(), simd::zero(), simd::zero()};
      for (int c = 0; c < CH; ++c) kv[c] = load(kr, r.kbf, c * 16, lanes[c]);
      for (int64_t j = 0; j < nh; ++j) {
        acc[j] = simd::mul(qv[j][0], kv[0]);
        for (int c = 1; c < CH; ++c) acc[j] = simd::fmadd(qv[j][c], kv[c], acc[j]);
      }
      float dots[4];
      simd::sum4(acc, dots);  // the four heads' sums at once
      for (int64_t j = 0; j < nh; ++j) {
        const float x = dots[j] * r.scale;
        p[j * S + s] = x;
        best[j] = std::max(best[j], x);
      }
    }
    float total[4] = {0, 0, 0, 0};
    for (int64_t j = 0; j < nh; ++j) {  // weights: exp(score - best), masked keys exactly 0
      if (best[j] == none) continue;
      float* pj = p + j * S;
      simd::vec vbest = simd::set1(best[j]), sum = simd::zero();
      for (int64_t s = 0; s < S; s += 16) {
        const simd::mask n = first(S - s);
        simd::vec x = load(pj, false, s, n);
        simd::vec w = simd::keep(simd::above_minus_inf(x, n), simd::exp(simd::sub(x, vbest)));
        store(pj, false, s, n, w);
        sum = simd::add(sum, w);
      }
      total[j] = simd::sum(sum);
    }
    simd::vec acc[4][CH];
    for (int64_t j = 0; j < 4; ++j)
      for (int c = 0; c < CH; ++c) acc[j][c] = simd::zero();
    for (int64_t s = 0; s < S; ++s) {
      if (!mr[s * r.ms]) continue;
      const char* vr = vb + s * r.vs[2] * r.ev;
      simd::vec vv[CH];
      for (int c = 0; c < CH; ++c) vv[c] = load(vr, r.vbf, c * 16, lanes[c]);
      for (int64_t j = 0; j < nh; ++j) {
        const simd::vec w = simd::set1(p[j * S + s]);
        for (int c = 0; c < CH; ++c) acc[j][c] = simd::fmadd(w, vv[c], acc[j][c]);
      }
    }
    for (int64_t j = 0; part != nullptr && j < nh; ++j) {
      float* slot = part + (h0 + j) * (CH * 16 + 2);
      slot[0] = best[j], slot[1] = total[j];
      for (int c = 0; c < CH; ++c) store(slot, false, 2 + c * 16, 0xFFFF, acc[j][c]);
    }
    for (int64_t j = 0; part == nullptr && j < nh; ++j) {  // a row that sees no key: zeros
      const int64_t h = g * n + h0 + j;
      char* orow = r.out + ((b * r.H + h) * r.T + t) * d * r.eo;
      const simd::vec inv = simd::set1(total[j] > 0.0f ? 1.0f / total[j] : 0.0f);
      for (int c = 0; c < CH; ++c)
        if (c * 16 < d) store(orow, r.obf, c * 16, lanes[c], simd::mul(acc[j][c], inv));
    }
  }
}

// The output row of query head h of row b, query t, from the parts of its P key ranges
// (attend_group's `part` slots, `stride` floats apart): softmax's sums rescaled to the largest
// score of all (Milakov & Gimelshein 2018; FlashDecoding splits the keys the same way).
template <int CH>
void combine(const Rows& r, int64_t b, int64_t h, int64_t t, const float* part, int64_t P,
             int64_t stride) {
  constexpr float none = -std::numeric_limits<float>::infinity();
  float best = none;
  for (int64_t c = 0; c < P; ++c) best = std::max(best, part[c * stride]);
  simd::vec acc[CH];
  for (int c = 0; c < CH; ++c) acc[c] = simd::zero();
  float total = 0.0f;
  for (int64_t c = 0; best != none && c < P; ++c) {
    const float* slot = part + c * stride;
    if (slot[0] == none) continue;
    const float w = std::exp(slot[0] - best);
    total += w * slot[1];
    for (int k = 0; k < CH; ++k)
      acc[k] = simd::fmadd(simd::set1(w), load(slot, false, 2 + k * 16, 0xFFFF), acc[k]);
  }
  char* orow = r.out + ((b * r.H + h) * r.T + t) * r.d * r.eo;
  const simd::vec inv = simd::set1(total > 0.0f ? 1.0f / total : 0.0f);
  for (int c = 0; c < CH; ++c)
    if (c * 16 < r.d) store(orow, r.obf, c * 16, first(r.d - c * 16), simd::mul(acc[c], inv));
}

template <int CH>
void attend(const Rows& r, int64_t B, int64_t Hkv, int64_t T, int64_t group) {
  // long caches are split into ranges of keys, so that every thread has work at batch 1, and
  // so are caches of 128 keys or more when there are fewer than four (b, key head, t): into
  // four ranges or more in all (the same split for any number of threads)
  const int64_t S = r.S, tasks = B * Hkv * T;
  int64_t chunk = S > 1024 ? 512 : std::max<int64_t>(S, 1);
  if (tasks < 4 && S >= 128) {
    const int64_t parts = (4 + tasks - 1) / tasks;
    chunk = std::min(chunk, (S + parts - 1) / parts);
  }
  const int64_t P = (S + chunk - 1) / chunk, stride = CH * 16 + 2;
  std::vector<float> parts(P > 1 ? B * Hkv * T * P * group * stride : 0);
  at::parallel_for(0, B * Hkv * T * P, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(4 * chunk);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bgt = i / P, c = i % P;
      const int64_t b = bgt / (Hkv * T), g = (bgt / T) % Hkv, t = bgt % T;
      float* part = P > 1 ? parts.data() + i * group * stride : nullptr;
      attend_group<CH>(r, b, g, group, t, c * chunk, std::min(S, (c + 1) * chunk), p.data(), part);
    }
  });
  if (P == 1) return;
  at::parallel_for(0, B * Hkv * T * group, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bgt = i / group, j = i % group;
      const int64_t b = bgt / (Hkv * T), g = (bgt / T) % Hkv, t = bgt % T;
      // part c of (b, g, t) starts at ((bgt · P) + c) · group · stride; head j at + j · stride
      combine<CH>(r, b, g * group + j, t, parts.data() + (bgt * P * group + j) * stride, P,
                  group * stride);
    }
  });
}

}  // namespace

// Attention of q (B, H, T, d) over the first S keys and values of k, v (B, Hkv, >= S, d) — S
// the mask's length (a cache is read up to it in place), H a multiple of Hkv, query head h
// reading key head h / (H / Hkv) — under mask (B or 1, 1, T, S) bool (True = attend), scaled
// by 1/sqrt(d): softmax(q kᵀ / sqrt(d) masked) v, in q's dtype, laid out (B, H, T, d). Any
// strides for q, k, v and the mask (the cache's slices are read in place); fp32 or bf16 each.
// A query row that sees no key gets zeros (SDPA gives NaN there). Work: one (b, key head, t)
// per task, the group's query heads reading each key and value once.
at::Tensor masked_attention(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor mask,
                            at::ScalarType dtype) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 4,
              "masked_attention: q, k, v and mask must be 4-D");
  TORCH_CHECK(float_or_bf16(q) && float_or_bf16(k) && float_or_bf16(v) &&
                  mask.scalar_type() == at::kBool && mask.device().is_cpu(),
              "masked_attention: fp32 or bf16 q, k, v and a bool mask on the CPU");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), d = q.size(3);
  const int64_t Hkv = k.size(1), S = mask.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && k.size(2) >= S &&
                  v.size(2) == k.size(2) && k.size(3) == d && v.size(3) == d && Hkv > 0 &&
                  H % Hkv == 0,
              "masked_attention: k, v (B, Hkv, >= S, d) with H a multiple of Hkv");
  TORCH_CHECK((mask.size(0) == B || mask.size(0) == 1) && mask.size(1) == 1 &&
                  mask.size(2) == T && mask.size(3) == S,
              "masked_attention: mask (B or 1, 1, T, S)");
  // rows of d contiguous elements: the last dimension must be dense
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "masked_attention: the head dimension must be contiguous");
  TORCH_CHECK(d <= 256, "masked_attention: head size at most 256");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "masked_attention: fp32 or bf16 out");
  auto out = at::empty({B, H, T, d}, q.options().dtype(dtype));
  const bool qbf = bf(q), kbf = bf(k), vbf = bf(v), obf = bf(out);
  const int64_t esz_q = q.element_size(), esz_k = k.element_size(), esz_v = v.element_size();
  const auto* qp = static_cast<const char*>(q.data_ptr());
  const auto* kp = static_cast<const char*>(k.data_ptr());
  const auto* vp = static_cast<const char*>(v.data_ptr());
  const auto* mp = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  auto* op = static_cast<char*>(out.data_ptr());
  const int64_t mb = mask.size(0) == 1 ? 0 : mask.stride(0), mt = mask.stride(2),
                ms = mask.stride(3);
  const float scale = 1.0f / std::sqrt((float)d);
  const int64_t group = H / Hkv;
  const Rows rows{qp, kp, vp, mp, op, q.strides(), k.strides(), v.strides(), mb, mt, ms,
                  esz_q, esz_k, esz_v, out.element_size(), qbf, kbf, vbf, obf, H, T, d, S, scale};
  // one task per (b, key head, t) and range of keys: the query heads of a group read each
  // key and value once
  switch ((d + 15) / 16) {
    case 2: attend<2>(rows, B, Hkv, T, group); break;
    case 4: attend<4>(rows, B, Hkv, T, group); break;
    case 8: attend<8>(rows, B, Hkv, T, group); break;
    default: attend<16>(rows, B, Hkv, T, group);
  }
  return out;
}

// The attention input of one new token per row: q, k, v split from the projection's output
// qkv (B, 1, (H + 2 Hkv) d), q and k rotated (rotary embeddings in the "rotate half" layout:
// element i pairs with i ± d/2) by cos, sin (B, d) fp32 — none given (empty): no rotation — as
// (x · cos + rotate_half(x) · sin) in fp32, unfused, the model's own rounding; k and v written
// at slot pos[b] of row b of k_cache, v_cache (B, Hkv, L, d) contiguous, in the cache's dtype.
// `dtype` is the one the model's projection hands on (a bf16 product may go on as fp32): q
// comes back in it and the rotated k is rounded to it before the cache's dtype.
// Returns q (B, H, 1, d).
at::Tensor rope_store(at::Tensor qkv, at::Tensor cos, at::Tensor sin, at::Tensor k_cache,
                      at::Tensor v_cache, at::Tensor pos, int64_t H, int64_t Hkv,
                      at::ScalarType dtype) {
  TORCH_CHECK(float_or_bf16(qkv) && qkv.is_contiguous() && qkv.dim() == 3 && qkv.size(1) == 1,
              "rope_store: qkv (B, 1, (H + 2 Hkv) d) contiguous, fp32 or bf16");
  const int64_t B = qkv.size(0), d = qkv.size(2) / (H + 2 * Hkv);
  TORCH_CHECK(H > 0 && Hkv > 0 && d * (H + 2 * Hkv) == qkv.size(2) && d % 2 == 0,
              "rope_store: qkv's width is not (H + 2 Hkv) d with d even");
  TORCH_CHECK(float_or_bf16(k_cache) && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.scalar_type() == v_cache.scalar_type() && k_cache.dim() == 4 &&
                  k_cache.sizes() == v_cache.sizes() && k_cache.size(0) == B &&
                  k_cache.size(1) == Hkv && k_cache.size(3) == d,
              "rope_store: caches (B, Hkv, L, d) contiguous, one dtype");
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.numel() == B && pos.is_contiguous(),
              "rope_store: pos (B,) long");
  const bool rotate = cos.numel() > 0;
  TORCH_CHECK(!rotate || (cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
                          cos.is_contiguous() && sin.is_contiguous() && cos.numel() == B * d &&
                          sin.numel() == B * d),
              "rope_store: cos, sin (B, d) fp32 contiguous");
  const int64_t L = k_cache.size(2), half = d / 2;
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(pp[b] >= 0 && pp[b] < L, "rope_store: position outside the cache");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "rope_store: fp32 or bf16 q");
  auto q = at::empty({B, H, 1, d}, qkv.options().dtype(dtype));
  const bool xbf = bf(qkv), cbf = bf(k_cache), qbf = dtype == at::kBFloat16;
  const void* xp = qkv.data_ptr();
  void *qp = q.data_ptr(), *kp = k_cache.data_ptr(), *vp = v_cache.data_ptr();
  const float* cp = rotate ? cos.data_ptr<float>() : nullptr;
  const float* sp = rotate ? sin.data_ptr<float>() : nullptr;
  const int64_t width = (H + 2 * Hkv) * d;
  // head j of row b: j < H a query head, then Hkv key heads, then Hkv value heads
  at::parallel_for(0, B * (H + 2 * Hkv), 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / (H + 2 * Hkv), j = i % (H + 2 * Hkv);
      const int64_t src = b * width + j * d;
      void* dst;
      bool dbf;
      int64_t at;
      if (j < H) {
        dst = qp, dbf = qbf, at = (b * H + j) * d;
      } else {
        const int64_t g = j < H + Hkv ? j - H : j - H - Hkv;
        dst = j < H + Hkv ? kp : vp, dbf = cbf, at = ((b * Hkv + g) * L + pp[b]) * d;
      }
      if (!rotate || j >= H + Hkv) {  // copied (values are never rotated)
        for (int64_t c = 0; c < d; c += 16) {
          simd::mask n = first(d - c);
          store(dst, dbf, at + c, n, load(xp, xbf, src + c, n));
        }
        continue;
      }
      const float *cr = cp + b * d, *sr = sp + b * d;
      for (int64_t c = 0; c < half; c += 16) {
        simd::mask n = first(half - c);
        simd::vec x1 = load(xp, xbf, src + c, n), x2 = load(xp, xbf, src + half + c, n);
        simd::vec lo = simd::add(simd::mul(x1, load(cr, false, c, n)),
                           simd::mul(simd::sub(simd::zero(), x2), load(sr, false, c, n)));
        simd::vec hi = simd::add(simd::mul(x2, load(cr, false, half + c, n)),
                           simd::mul(x1, load(sr, false, half + c, n)));
        if (j < H) {  // q in `dtype`
          store(dst, qbf, at + c, n, lo);
          store(dst, qbf, at + half + c, n, hi);
        } else {  // k: rounded to `dtype` as the model's .to(x.dtype), then to the cache's
          if (qbf && !cbf) lo = simd::round_bf16(lo), hi = simd::round_bf16(hi);
          store(dst, dbf, at + c, n, lo);
          store(dst, dbf, at + half + c, n, hi);
        }
      }
    }
  });
  return q;
}


namespace {

// One row of activations x (K) as int8 per group, llama.cpp's Q8_1: scale max|x| / 127, q =
// round(x / scale) (to nearest even), and each group's scale and scale x (sum of its q).
void quantize_row(const float* x, int64_t K, int64_t group, int8_t* q, float* scale, float* sum) {
  const __m256 absolute = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t g = 0; g < K / group; ++g) {
    const float* v = x + g * group;
    __m256 top8 = _mm256_setzero_ps();
    for (int64_t i = 0; i < group; i += 8) top8 = _mm256_max_ps(top8, _mm256_and_ps(_mm256_loadu_ps(v + i), absolute));
    __m128 t = _mm_max_ps(_mm256_castps256_ps128(top8), _mm256_extractf128_ps(top8, 1));
    t = _mm_max_ps(t, _mm_movehl_ps(t, t));
    const float top = _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
    const __m256 inv = _mm256_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
    __m256i total = _mm256_setzero_si256();
    for (int64_t i = 0; i < group; i += 32) {
      __m256i r[4];
      for (int j = 0; j < 4; ++j) {  // rounded to nearest even, as std::nearbyint
        r[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + i + 8 * j), inv));
        total = _mm256_add_epi32(total, r[j]);
      }
      const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + g * group + i), _mm256_permutevar8x32_epi32(bytes, order));
    }
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    scale[g] = top / 127.0f, sum[g] = scale[g] * (float)_mm_cvtsi128_si32(s);
  }
}

// Eight weight rows (one tile of int4_gemv's layout) against R rows of int8 activations:
// for each, the eight outputs, lane r for weight row r. For each group and each 32 of its
// columns, four 32-byte chunks; chunk c's byte 4r + j holds row r's column 8c + j in its low
// nibble and 8c + 4 + j in its high one, so one vpmaddubsw against four activations
// broadcast gives each row's products in its own lanes, no horizontal sums. Eight of them
// summed in int16 cannot overflow (8 · 2 · 15 · 127 < 2^15). After a group's chunks: its
// eight scales and eight zeros, bf16. The nibbles are unpacked once for the R rows; each
// row's sums are made in the same order whatever R, so its outputs do not depend on R.
template <int R>
void tile_dot(const uint8_t* p, const int8_t* const* xq, const float* const* xs,
              const float* const* xsum, int64_t G, int64_t group, __m256* out) {
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[R], rest[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps(), rest[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i dot[R];
    for (int r = 0; r < R; ++r) dot[r] = _mm256_setzero_si256();
    for (int64_t b = 0; b < group; b += 32, p += 128) {
      // the stream eight chunks ahead (a model's weights are read once a step, from memory)
      _mm_prefetch(reinterpret_cast<const char*>(p + 1024), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p + 1088), _MM_HINT_T0);
      __m256i lo[4], hi[4];
      for (int c = 0; c < 4; ++c) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * c));
        lo[c] = _mm256_and_si256(w, low), hi[c] = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
      }
      for (int r = 0; r < R; ++r) {
        const int8_t* x = xq[r] + g * group + b;
        __m256i d16 = _mm256_setzero_si256();
        for (int c = 0; c < 4; ++c) {
          int32_t x_lo, x_hi;
          std::memcpy(&x_lo, x + 8 * c, 4), std::memcpy(&x_hi, x + 8 * c + 4, 4);
          d16 = _mm256_add_epi16(d16, _mm256_maddubs_epi16(lo[c], _mm256_set1_epi32(x_lo)));
          d16 = _mm256_add_epi16(d16, _mm256_maddubs_epi16(hi[c], _mm256_set1_epi32(x_hi)));
        }
        dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(d16, ones));
      }
    }
    const auto bf16s = [](const uint8_t* at) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(at));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    };
    const __m256 scale = bf16s(p), zero = bf16s(p + 16);
    p += 32;
    const __m256 offset = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), scale, zero);  // zero - 8 scale
    for (int r = 0; r < R; ++r) {
      const __m256 sx = _mm256_mul_ps(scale, _mm256_set1_ps(xs[r][g]));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r]), sx, acc[r]);
      rest[r] = _mm256_fmadd_ps(_mm256_set1_ps(xsum[r][g]), offset, rest[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm256_add_ps(acc[r], rest[r]);
}

}  // namespace

// int4 weights times rows of activations, llama.cpp's way (Q4_1 x Q8_1): each group of
// the activations quantized to int8 (scale max|x| / 127), the products summed in integers
// (vpmaddubsw: the weight's nibbles, unsigned, times the activations' int8), then scaled,
// w = (q - 8) · scale + zero. x (M, K) fp32 or bf16; tiles (ceil(N/8), K/group, 4 group + 32)
// uint8: eight rows at a time, their nibbles interleaved and their (scale, zero) pairs after
// each group (tile_dot; quant.gemv_tiles makes it). Out (M, N) bf16, the dtype torch's int4
// kernel hands on. Needs AVX2 (built in both modules).
at::Tensor int4_gemv(at::Tensor x, at::Tensor tiles, int64_t N, int64_t group) {
  constexpr int ROWS = 4;  // activation rows per pass over a tile: its nibbles unpacked once
  TORCH_CHECK(float_or_bf16(x) && x.dim() == 2 && x.is_contiguous(),
              "int4_gemv: x (M, K) contiguous fp32 or bf16");
  const int64_t M = x.size(0), K = x.size(1), G = K / std::max<int64_t>(group, 1);
  TORCH_CHECK(group % 32 == 0 && group > 0 && K % group == 0, "int4_gemv: group a multiple of 32 dividing K");
  TORCH_CHECK(tiles.scalar_type() == at::kByte && tiles.is_contiguous() && tiles.dim() == 3 &&
                  tiles.size(0) == (N + 7) / 8 && tiles.size(1) == G && tiles.size(2) == 4 * group + 32,
              "int4_gemv: tiles (ceil(N/8), K/group, 4 group + 32) uint8 contiguous (quant.gemv_tiles)");
  const at::Tensor xf = x.to(at::kFloat);
  std::vector<int8_t> xq(M * K);
  std::vector<float> xs(M * G), xsum(M * G);
  for (int64_t m = 0; m < M; ++m)
    quantize_row(xf.data_ptr<float>() + m * K, K, group, xq.data() + m * K, xs.data() + m * G,
                 xsum.data() + m * G);
  auto y = at::empty({M, N}, x.options().dtype(at::kBFloat16));
  const uint8_t* tp = tiles.data_ptr<uint8_t>();
  auto* yp = y.data_ptr<at::BFloat16>();
  const int64_t tile = tiles.size(1) * tiles.size(2);
  at::parallel_for(0, (N + 7) / 8, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t m = 0; m < M;) {  // ROWS activation rows at a time, the last ones singly
        const int rows = M - m >= ROWS ? ROWS : 1;
        const int8_t* q[ROWS];
        const float *s[ROWS], *z[ROWS];
        for (int r = 0; r < rows; ++r)
          q[r] = xq.data() + (m + r) * K, s[r] = xs.data() + (m + r) * G, z[r] = xsum.data() + (m + r) * G;
        __m256 dots[ROWS];
        if (rows == ROWS) tile_dot<ROWS>(tp + t * tile, q, s, z, G, group, dots);
        else tile_dot<1>(tp + t * tile, q, s, z, G, group, dots);
        for (int r = 0; r < rows; ++r) {
          float out[8];
          _mm256_storeu_ps(out, dots[r]);
          for (int64_t n = 0; n < std::min<int64_t>(8, N - 8 * t); ++n)
            yp[(m + r) * N + 8 * t + n] = at::BFloat16(out[n]);
        }
        m += rows;
      }
  });
  return y;
}

namespace {

// x += y, x (B, C) fp32 and y bf16 of the same shape, both contiguous: torch's x + y.
void add_bf16(const at::Tensor& x, const at::Tensor& y) {
  float* xp = x.data_ptr<float>();
  const at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  for (int64_t i = 0, n = x.numel(); i < n; ++i) xp[i] += (float)yp[i];
}

// SwiGLU of h (B, 2F) bf16, its gate the first half of each row: silu(gate) · up in bf16, as
// the model's (F.silu(gate) * up).to(bf16) on h.float().chunk(2, -1). torch computes silu,
// on a view with the same strides as the model's, so exp rounds the same way.
at::Tensor swiglu_bf16(const at::Tensor& h) {
  const int64_t B = h.size(0), F = h.size(1) / 2;
  auto buf = at::empty({B, 2 * F}, h.options().dtype(at::kFloat));
  const at::BFloat16* hp = h.data_ptr<at::BFloat16>();
  float* bp = buf.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t f = 0; f < F; ++f) bp[b * 2 * F + f] = (float)hp[b * 2 * F + f];
  at::Tensor gate = buf.slice(1, 0, F);
  at::silu_(gate);
  auto out = at::empty({B, F}, h.options());
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t f = 0; f < F; ++f)
      op[b * F + f] = at::BFloat16(bp[b * 2 * F + f] * (float)hp[b * 2 * F + F + f]);
  return out;
}

}  // namespace

// Every block of a model for one new token per row, in one call, where its blocks are pre-norm
// with RMSNorm, SwiGLU and four int4 products without biases (int4_gemv's operands): what
// model/decode_step.py's _bf16_block computes layer after layer, the same kernels in the same
// order with the same roundings (the norms and the attention write bf16 rows for the
// products), so the numbers are the same bit for bit. On a slow core the Python calls
// between a layer's kernels cost half as much again as the kernels.
// x (B, C) fp32; weights: six a layer (norm_1, the tiles of qkv and proj, norm_2, the tiles
// of fc and the MLP's proj: every width a multiple of eight); k_caches, v_caches one a layer;
// cos, sin, pos as rope_store takes them; mask (B, 1, 1, S). Returns x after the last block.
at::Tensor int4_blocks(at::Tensor x, std::vector<at::Tensor> weights,
                       std::vector<at::Tensor> k_caches, std::vector<at::Tensor> v_caches,
                       at::Tensor cos, at::Tensor sin, at::Tensor pos, at::Tensor mask, int64_t H,
                       int64_t Hkv, double eps, int64_t group) {
  const size_t L = k_caches.size();
  TORCH_CHECK(weights.size() == 6 * L && v_caches.size() == L,
              "int4_blocks: six weights and two caches a layer");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "int4_blocks: x (B, C) fp32");
  const int64_t B = x.size(0);
  const auto bf16 = at::kBFloat16;
  const auto product = [&](const at::Tensor& rows, const at::Tensor& tiles) {
    return int4_gemv(rows, tiles, tiles.size(0) * 8, group);
  };
  x = x.contiguous().clone();  // added to in place
  for (size_t i = 0; i < L; ++i) {
    const at::Tensor* w = weights.data() + 6 * i;
    const at::Tensor qkv = product(rms_norm(x, w[0], eps, bf16), w[1]);
    const at::Tensor q = rope_store(qkv.view({B, 1, qkv.size(1)}), cos, sin, k_caches[i],
                                    v_caches[i], pos, H, Hkv, at::kFloat);
    const at::Tensor y = masked_attention(q, k_caches[i], v_caches[i], mask, bf16);
    add_bf16(x, product(y.view({B, y.numel() / B}), w[2]));
    const at::Tensor h = product(rms_norm(x, w[3], eps, bf16), w[4]);
    add_bf16(x, product(swiglu_bf16(h), w[5]));
  }
  return x;
}

#ifdef GPTKIT_DECODE_ONLY  // built alone (the AVX2 module); else attention.cpp binds these
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm in one pass, fp32 or bf16, fp32 weight");
  m.def("masked_attention", &masked_attention, "attention of a few rows under a bool mask, GQA");
  m.def("rope_store", &rope_store, "rotary q, k of one token per row; k, v into the cache");
  m.def("int4_gemv", &int4_gemv, "int4 weights (quant.gemv_tiles) x rows, activations as int8 per group");
  m.def("int4_blocks", &int4_blocks, "every pre-norm SwiGLU block of int4 layers, one token a row");
}
#endif
