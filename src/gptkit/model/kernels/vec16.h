// Sixteen fp32 lanes for the decoding kernels (decode.cpp), built twice: one AVX-512
// register where the compiler targets AVX-512 (with AVX512-BF16's conversion), two AVX2
// registers elsewhere. Loads and stores read and write fp32 or bf16 (rounded to nearest
// even), the first n lanes of sixteen where a mask says so; lanes outside it load as zero and
// are never touched in memory.

#pragma once

#include <immintrin.h>

#include <cstdint>

namespace gptkit::v16 {

using mask = uint16_t;  // one bit per lane

// The first n of 16 lanes (none for n <= 0).
inline mask first(int64_t n) { return n >= 16 ? 0xFFFF : n <= 0 ? 0 : (mask)((1u << n) - 1); }

#ifdef __AVX512F__

struct vec {
  __m512 r;
};

inline vec zero() { return {_mm512_setzero_ps()}; }
inline vec set1(float x) { return {_mm512_set1_ps(x)}; }
inline vec add(vec a, vec b) { return {_mm512_add_ps(a.r, b.r)}; }
inline vec sub(vec a, vec b) { return {_mm512_sub_ps(a.r, b.r)}; }
inline vec mul(vec a, vec b) { return {_mm512_mul_ps(a.r, b.r)}; }
inline vec fmadd(vec a, vec b, vec c) { return {_mm512_fmadd_ps(a.r, b.r, c.r)}; }
inline float sum(vec a) { return _mm512_reduce_add_ps(a.r); }
inline void sum4(const vec* a, float* out) {  // out[j] = sum(a[j]), four at once
  for (int j = 0; j < 4; ++j) out[j] = sum(a[j]);
}

inline vec load(const void* base, bool bf, int64_t i, mask n) {
  if (!bf) return {_mm512_maskz_loadu_ps(n, reinterpret_cast<const float*>(base) + i)};
  auto src = reinterpret_cast<const uint16_t*>(base) + i;
  __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(n, src));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
}

inline void store(void* base, bool bf, int64_t i, mask n, vec x) {
  if (bf)
    _mm256_mask_storeu_epi16(reinterpret_cast<uint16_t*>(base) + i, n,
                             (__m256i)_mm512_cvtneps_pbh(x.r));
  else
    _mm512_mask_storeu_ps(reinterpret_cast<float*>(base) + i, n, x.r);
}

// x rounded to bf16 and back.
inline vec round_bf16(vec x) {
  __m512i w = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x.r));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
}

// The lanes of n where x is not -inf.
inline mask above_minus_inf(vec x, mask n) {
  return _mm512_cmp_ps_mask(x.r, _mm512_set1_ps(-__builtin_inff()), _CMP_NEQ_OQ) & n;
}

inline vec keep(mask m, vec x) { return {_mm512_maskz_mov_ps(m, x.r)}; }

inline vec scale_pow2(vec y, vec n) { return {_mm512_scalef_ps(y.r, n.r)}; }  // y · 2^n
inline vec round_int(vec x) {
  return {_mm512_roundscale_ps(x.r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
inline vec maximum(vec a, vec b) { return {_mm512_max_ps(a.r, b.r)}; }
inline vec minimum(vec a, vec b) { return {_mm512_min_ps(a.r, b.r)}; }
inline vec fnmadd(vec a, vec b, vec c) { return {_mm512_fnmadd_ps(a.r, b.r, c.r)}; }

#else  // AVX2 and FMA

struct vec {
  __m256 lo, hi;
};

inline vec zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline vec set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline vec add(vec a, vec b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline vec sub(vec a, vec b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline vec mul(vec a, vec b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline vec fmadd(vec a, vec b, vec c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}

inline float sum(vec a) {
  __m256 s = _mm256_add_ps(a.lo, a.hi);
  __m128 t = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  t = _mm_add_ps(t, _mm_movehl_ps(t, t));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

inline void sum4(const vec* a, float* out) {  // out[j] = sum(a[j]), four at once
  const __m256 s01 = _mm256_hadd_ps(_mm256_add_ps(a[0].lo, a[0].hi), _mm256_add_ps(a[1].lo, a[1].hi));
  const __m256 s23 = _mm256_hadd_ps(_mm256_add_ps(a[2].lo, a[2].hi), _mm256_add_ps(a[3].lo, a[3].hi));
  const __m256 s = _mm256_hadd_ps(s01, s23);  // lane j: a[j]'s low half, lane 4 + j its high
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
}

// Eight lanes' bits of m as a vector mask (all ones where the bit is set).
inline __m256i lanes8(unsigned m) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)m), bit), bit);
}

inline __m256 widen_bf16(__m128i h) {  // eight bf16 as fp32
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline __m128i narrow_bf16(__m256 x) {  // eight fp32 to bf16, nearest even; NaN as 0x7FC0
  const __m256i u = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd);
  r = _mm256_srli_epi32(r, 16);
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

inline vec load(const void* base, bool bf, int64_t i, mask n) {
  if (!bf) {
    auto src = reinterpret_cast<const float*>(base) + i;
    if (n == 0xFFFF) return {_mm256_loadu_ps(src), _mm256_loadu_ps(src + 8)};
    return {_mm256_maskload_ps(src, lanes8(n & 0xFF)), _mm256_maskload_ps(src + 8, lanes8(n >> 8))};
  }
  auto src = reinterpret_cast<const uint16_t*>(base) + i;
  alignas(32) uint16_t part[16] = {};
  if (n != 0xFFFF) {  // no 16-bit masked load in AVX2: the lanes one by one
    for (int l = 0; l < 16; ++l)
      if (n >> l & 1) part[l] = src[l];
    src = part;
  }
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  return {widen_bf16(_mm256_castsi256_si128(w)), widen_bf16(_mm256_extracti128_si256(w, 1))};
}

inline void store(void* base, bool bf, int64_t i, mask n, vec x) {
  if (!bf) {
    auto dst = reinterpret_cast<float*>(base) + i;
    if (n == 0xFFFF) {
      _mm256_storeu_ps(dst, x.lo), _mm256_storeu_ps(dst + 8, x.hi);
    } else {
      _mm256_maskstore_ps(dst, lanes8(n & 0xFF), x.lo);
      _mm256_maskstore_ps(dst + 8, lanes8(n >> 8), x.hi);
    }
    return;
  }
  auto dst = reinterpret_cast<uint16_t*>(base) + i;
  const __m128i lo = narrow_bf16(x.lo), hi = narrow_bf16(x.hi);
  if (n == 0xFFFF) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), lo);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 8), hi);
    return;
  }
  alignas(32) uint16_t part[16];
  _mm_store_si128(reinterpret_cast<__m128i*>(part), lo);
  _mm_store_si128(reinterpret_cast<__m128i*>(part + 8), hi);
  for (int l = 0; l < 16; ++l)
    if (n >> l & 1) dst[l] = part[l];
}

inline vec round_bf16(vec x) { return {widen_bf16(narrow_bf16(x.lo)), widen_bf16(narrow_bf16(x.hi))}; }

inline mask above_minus_inf(vec x, mask n) {
  const __m256 none = _mm256_set1_ps(-__builtin_inff());
  const unsigned lo = _mm256_movemask_ps(_mm256_cmp_ps(x.lo, none, _CMP_NEQ_OQ));
  const unsigned hi = _mm256_movemask_ps(_mm256_cmp_ps(x.hi, none, _CMP_NEQ_OQ));
  return (mask)((lo | hi << 8) & n);
}

inline vec keep(mask m, vec x) {
  return {_mm256_and_ps(x.lo, _mm256_castsi256_ps(lanes8(m & 0xFF))),
          _mm256_and_ps(x.hi, _mm256_castsi256_ps(lanes8(m >> 8)))};
}

inline __m256 pow2(__m256 n) {  // 2^n for integral n in [-126, 127]
  const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
}
inline vec scale_pow2(vec y, vec n) {  // y · 2^n, n integral in [-126, 127]
  return {_mm256_mul_ps(y.lo, pow2(n.lo)), _mm256_mul_ps(y.hi, pow2(n.hi))};
}
inline vec round_int(vec x) {
  constexpr int m = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(x.lo, m), _mm256_round_ps(x.hi, m)};
}
inline vec maximum(vec a, vec b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline vec minimum(vec a, vec b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
inline vec fnmadd(vec a, vec b, vec c) {
  return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}

#endif

// e^x for x <= 88, relative error ~1e-7, 0 below -87 (a degree-6 polynomial on the remainder
// of x / ln 2, ln 2 split in two for accuracy).
inline vec exp(vec x) {
  x = minimum(maximum(x, set1(-87.0f)), set1(88.0f));
  const vec n = round_int(mul(x, set1(1.44269504f)));
  vec r = fnmadd(n, set1(0.693359375f), x);
  r = fnmadd(n, set1(-2.12194440e-4f), r);
  vec y = set1(1.0f / 720);
  for (float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) y = fmadd(y, r, set1(c));
  return scale_pow2(y, n);
}

}  // namespace gptkit::v16
