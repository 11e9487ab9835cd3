// Inference kernels for decoding a few tokens at a time, where torch's general kernels spend
// more time in set-up than in arithmetic: RMSNorm in one pass; attention of a few query rows
// over a KV cache under a boolean mask, with grouped-query heads read in place (no repeated
// keys, no copy of the cache to another dtype); and the rotary embedding of one new token
// per row with its keys and values written into the cache. fp32 sums throughout; the
// Python paths they replace (F.rms_norm, F.scaled_dot_product_attention, the model's
// apply_rope and cache writes) define the results (model/decode_step.py uses all three).

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
      simd::vec kv[CH];
      for (int c = 0; c < CH; ++c) kv[c] = load(kr, r.kbf, c * 16, lanes[c]);
      for (int64_t j = 0; j < nh; ++j) {
        simd::vec acc = simd::mul(qv[j][0], kv[0]);
        for (int c = 1; c < CH; ++c) acc = simd::fmadd(qv[j][c], kv[c], acc);
        const float x = simd::sum(acc) * r.scale;
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
  // long caches are split into ranges of keys, so that every thread has work at batch 1
  const int64_t S = r.S, chunk = S > 1024 ? 512 : std::max<int64_t>(S, 1);
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

// The integer dot product of 32 weights (16 bytes of nibbles) and 32 int8 activations in the
// nibbles' order (low nibbles first), as eight int32 partial sums.
inline __m256i block_dot(const uint8_t* w, const int8_t* x) {
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m128i w16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  const __m256i wv = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(w16, 4), w16), low);
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), ones);
}

// Eight groups of 32 of one weight row against the activations: each group's integer dot
// product summed across its lanes, the eight sums as one vector.
inline __m256i dots8(const uint8_t* w, const int8_t* x) {
  __m256i d[8];
  for (int g = 0; g < 8; ++g) d[g] = block_dot(w + 16 * g, x + 32 * g);
  const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(d[0], d[1]), _mm256_hadd_epi32(d[2], d[3]));
  const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(d[4], d[5]), _mm256_hadd_epi32(d[6], d[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

// Row n of int4_gemv for groups of 32, eight groups at a time: the scales of eight groups
// multiplied in one vector (the (scale, zero) pairs read as eight 32-bit words).
inline float gemv_row32(const uint8_t* w, const uint16_t* sz, const int8_t* x, const float* xs,
                        const float* xsum, int64_t G) {
  const __m256i high = _mm256_set1_epi32((int)0xFFFF0000);
  __m256 acc = _mm256_setzero_ps(), rest = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= G; g += 8) {
    const __m256 dot = _mm256_cvtepi32_ps(dots8(w + 16 * g, x + 32 * g));
    const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sz + 2 * g));
    const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
    const __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(pairs, high));
    acc = _mm256_fmadd_ps(dot, _mm256_mul_ps(scale, _mm256_loadu_ps(xs + g)), acc);
    const __m256 offset = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), scale, zero);  // zero - 8 scale
    rest = _mm256_fmadd_ps(_mm256_loadu_ps(xsum + g), offset, rest);
  }
  acc = _mm256_add_ps(acc, rest);
  __m128 t = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  t = _mm_add_ps(t, _mm_movehl_ps(t, t));
  float total = _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
  for (; g < G; ++g) {  // the last groups one at a time
    const __m256i d = block_dot(w + 16 * g, x + 32 * g);
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(d), _mm256_extracti128_si256(d, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    uint32_t su = (uint32_t)sz[2 * g] << 16, zu = (uint32_t)sz[2 * g + 1] << 16;
    float scale, zero;
    std::memcpy(&scale, &su, 4), std::memcpy(&zero, &zu, 4);
    total += (float)_mm_cvtsi128_si32(s) * (scale * xs[g]) + xsum[g] * (zero - 8.0f * scale);
  }
  return total;
}

}  // namespace

// int4 weights times a few rows of activations, llama.cpp's way (Q4_1 x Q8_1): each group of
// the activations quantized to int8 (scale max|x| / 127), the products summed in integers
// (vpmaddubsw: the weight's nibbles, unsigned, times the activations' int8), then scaled.
// x (M, K) fp32 or bf16; weight (N, K/2) uint8 two nibbles a byte, column 2j in the low one;
// sz (N, K/group, 2) bf16 (scale, zero): w = (q - 8) · scale + zero. Out (M, N) bf16, the
// dtype torch's int4 kernel hands on. Needs AVX2 (built in both modules).
at::Tensor int4_gemv(at::Tensor x, at::Tensor weight, at::Tensor sz, int64_t group) {
  TORCH_CHECK(float_or_bf16(x) && x.dim() == 2 && x.is_contiguous(),
              "int4_gemv: x (M, K) contiguous fp32 or bf16");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), G = K / std::max<int64_t>(group, 1);
  TORCH_CHECK(group % 32 == 0 && group > 0 && K % group == 0, "int4_gemv: group a multiple of 32 dividing K");
  TORCH_CHECK(weight.scalar_type() == at::kByte && weight.is_contiguous() && weight.size(1) * 2 == K,
              "int4_gemv: weight (N, K/2) uint8 contiguous");
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.dim() == 3 &&
                  sz.size(0) == N && sz.size(1) == G && sz.size(2) == 2,
              "int4_gemv: sz (N, K/group, 2) bf16 contiguous");
  // the activations: int8 per group, in the nibbles' order within each block of 32
  // (block byte j < 16 is column 2j, byte 16 + j column 2j + 1), with each group's scale
  // and scale x (sum of its int8 values)
  std::vector<int8_t> xq(M * K);
  std::vector<float> xs(M * G), xsum(M * G);
  const bool xbf = bf(x);
  const float* xf = xbf ? nullptr : x.data_ptr<float>();
  const at::BFloat16* xb = xbf ? x.data_ptr<at::BFloat16>() : nullptr;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float v[256], top = 0.0f;
      for (int64_t i = 0; i < group; ++i) {
        const int64_t at = m * K + g * group + i;
        v[i] = xbf ? (float)xb[at] : xf[at];
        top = std::max(top, std::fabs(v[i]));
      }
      const float scale = top / 127.0f, inv = top > 0.0f ? 127.0f / top : 0.0f;
      int total = 0;
      int8_t* out = xq.data() + m * K + g * group;
      for (int64_t b = 0; b < group; b += 32)
        for (int j = 0; j < 16; ++j)
          for (int odd = 0; odd < 2; ++odd) {
            const int q = (int)std::nearbyint(v[b + 2 * j + odd] * inv);
            out[b + 16 * odd + j] = (int8_t)q;
            total += q;
          }
      xs[m * G + g] = scale, xsum[m * G + g] = scale * (float)total;
    }
  auto y = at::empty({M, N}, x.options().dtype(at::kBFloat16));
  const uint8_t* wp = weight.data_ptr<uint8_t>();
  const auto* szp = reinterpret_cast<const uint16_t*>(sz.data_ptr());
  auto* yp = y.data_ptr<at::BFloat16>();
  const auto bf16 = [](uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; std::memcpy(&f, &u, 4); return f; };
  if (group == 32) {  // the common case (GGUF's Q4 blocks): eight groups at a time
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n)
        for (int64_t m = 0; m < M; ++m)
          yp[m * N + n] = at::BFloat16(gemv_row32(wp + n * (K / 2), szp + n * G * 2,
                                                  xq.data() + m * K, xs.data() + m * G,
                                                  xsum.data() + m * G, G));
    });
    return y;
  }
  // other group sizes: four weight rows at a time, four independent sums
  at::parallel_for(0, (N + 3) / 4, 4, [&](int64_t begin, int64_t end) {
    for (int64_t n0 = begin * 4; n0 < std::min(N, end * 4); n0 += 4) {
      const int64_t rows = std::min<int64_t>(4, N - n0);
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* xr = xq.data() + m * K;
        __m256 acc[4];
        float rest[4] = {0, 0, 0, 0};
        for (int r = 0; r < 4; ++r) acc[r] = _mm256_setzero_ps();
        for (int64_t g = 0; g < G; ++g) {
          __m256i dot[4];
          for (int r = 0; r < 4; ++r) dot[r] = _mm256_setzero_si256();
          for (int64_t b = g * group; b < (g + 1) * group; b += 32) {
            for (int r = 0; r < 4; ++r) {  // past the last row: the last row again, unused
              const uint8_t* wr = wp + (n0 + std::min<int64_t>(r, rows - 1)) * (K / 2) + b / 2;
              dot[r] = _mm256_add_epi32(dot[r], block_dot(wr, xr + b));
            }
          }
          const float sx = xs[m * G + g], tx = xsum[m * G + g];
          for (int r = 0; r < 4; ++r) {
            const uint16_t* sr = szp + ((n0 + std::min<int64_t>(r, rows - 1)) * G + g) * 2;
            const float scale = bf16(sr[0]), zero = bf16(sr[1]);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r]), _mm256_set1_ps(sx * scale), acc[r]);
            rest[r] += tx * (zero - 8.0f * scale);
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          __m128 t = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
          t = _mm_add_ps(t, _mm_movehl_ps(t, t));
          yp[m * N + n0 + r] = at::BFloat16(_mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t))) + rest[r]);
        }
      }
    }
  });
  return y;
}

// The fp32 weight (N, K) of int4_gemv's operands: (q - 8) · scale + zero, for products of
// many rows (a prefill), where one fp32 GEMM on it beats torch's int4 kernel on AVX2 CPUs.
at::Tensor int4_dequantize(at::Tensor weight, at::Tensor sz, int64_t group) {
  const int64_t N = weight.size(0), K = weight.size(1) * 2, G = K / std::max<int64_t>(group, 1);
  TORCH_CHECK(weight.scalar_type() == at::kByte && weight.is_contiguous() && group > 0 &&
                  K % group == 0 && group % 2 == 0,
              "int4_dequantize: weight (N, K/2) uint8 contiguous, group dividing K");
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.dim() == 3 &&
                  sz.size(0) == N && sz.size(1) == G && sz.size(2) == 2,
              "int4_dequantize: sz (N, K/group, 2) bf16 contiguous");
  auto w = at::empty({N, K}, weight.options().dtype(at::kFloat));
  const uint8_t* wp = weight.data_ptr<uint8_t>();
  const auto* szp = reinterpret_cast<const uint16_t*>(sz.data_ptr());
  float* out = w.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t g = 0; g < G; ++g) {
        uint32_t su = (uint32_t)szp[(n * G + g) * 2] << 16, zu = (uint32_t)szp[(n * G + g) * 2 + 1] << 16;
        float scale, zero;
        std::memcpy(&scale, &su, 4), std::memcpy(&zero, &zu, 4);
        const uint8_t* src = wp + n * (K / 2) + g * group / 2;
        float* dst = out + n * K + g * group;
        for (int64_t j = 0; j < group / 2; ++j) {  // no fused multiply-add: as torch rounds
          dst[2 * j] = (float)((src[j] & 0x0F) - 8) * scale + zero;
          dst[2 * j + 1] = (float)((src[j] >> 4) - 8) * scale + zero;
        }
      }
  });
  return w;
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
// x (B, C) fp32; weights: ten a layer (norm_1, qkv, its row scales, proj, its row scales,
// norm_2, fc, its row scales, mlp proj, its row scales); k_caches, v_caches one a layer;
// cos, sin, pos as rope_store takes them; mask (B, 1, 1, S). Returns x after the last block.
at::Tensor int4_blocks(at::Tensor x, std::vector<at::Tensor> weights,
                       std::vector<at::Tensor> k_caches, std::vector<at::Tensor> v_caches,
                       at::Tensor cos, at::Tensor sin, at::Tensor pos, at::Tensor mask, int64_t H,
                       int64_t Hkv, double eps, int64_t group) {
  const size_t L = k_caches.size();
  TORCH_CHECK(weights.size() == 10 * L && v_caches.size() == L,
              "int4_blocks: ten weights and two caches a layer");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "int4_blocks: x (B, C) fp32");
  const int64_t B = x.size(0);
  const auto bf16 = at::kBFloat16;
  x = x.contiguous().clone();  // added to in place
  for (size_t i = 0; i < L; ++i) {
    const at::Tensor* w = weights.data() + 10 * i;
    const at::Tensor qkv = int4_gemv(rms_norm(x, w[0], eps, bf16), w[1], w[2], group);
    const at::Tensor q = rope_store(qkv.view({B, 1, qkv.size(1)}), cos, sin, k_caches[i],
                                    v_caches[i], pos, H, Hkv, at::kFloat);
    const at::Tensor y = masked_attention(q, k_caches[i], v_caches[i], mask, bf16);
    add_bf16(x, int4_gemv(y.view({B, y.numel() / B}), w[3], w[4], group));
    const at::Tensor h = int4_gemv(rms_norm(x, w[5], eps, bf16), w[6], w[7], group);
    add_bf16(x, int4_gemv(swiglu_bf16(h), w[8], w[9], group));
  }
  return x;
}

#ifdef GPTKIT_DECODE_ONLY  // built alone (the AVX2 module); else attention.cpp binds these
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm in one pass, fp32 or bf16, fp32 weight");
  m.def("masked_attention", &masked_attention, "attention of a few rows under a bool mask, GQA");
  m.def("rope_store", &rope_store, "rotary q, k of one token per row; k, v into the cache");
  m.def("int4_gemv", &int4_gemv, "int4 weights x a few rows, activations as int8 per group");
  m.def("int4_dequantize", &int4_dequantize, "int4_gemv's weight as fp32 (N, K)");
  m.def("int4_blocks", &int4_blocks, "every pre-norm SwiGLU block of int4 layers, one token a row");
}
#endif
