// Small AVX-512 helpers the kernels share.

#pragma once

#include <immintrin.h>

#include <cstdint>

namespace gptkit {

// The first n of 16 lanes (none for n <= 0).
inline __mmask16 first_n(int64_t n) {
  return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

inline __m512 exp512(__m512 x) {  // e^x, relative error ~1e-7, 0 below -87
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.0f / 720);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f / 120));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f / 24));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f / 6));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(0.5f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}

// 16 elements (the first n) of a bf16 or fp32 array from element i, as fp32.
inline __m512 load16(const void* base, bool bf, int64_t i, __mmask16 n) {
  if (!bf) return _mm512_maskz_loadu_ps(n, reinterpret_cast<const float*>(base) + i);
  auto src = reinterpret_cast<const uint16_t*>(base) + i;
  __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(n, src));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

inline void store16(void* base, bool bf, int64_t i, __mmask16 n, __m512 x) {
  if (bf)
    _mm256_mask_storeu_epi16(reinterpret_cast<uint16_t*>(base) + i, n,
                             (__m256i)_mm512_cvtneps_pbh(x));
  else
    _mm512_mask_storeu_ps(reinterpret_cast<float*>(base) + i, n, x);
}

}  // namespace gptkit
