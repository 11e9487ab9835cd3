// Small AVX-512 helpers the training kernels share (attention.cpp, elementwise.cpp): the
// AVX-512 side of vec16.h, on bare registers.

#pragma once

#include <immintrin.h>

#include <cstdint>

#include "vec16.h"

namespace gptkit {

// The first n of 16 lanes (none for n <= 0).
inline __mmask16 first_n(int64_t n) { return v16::first(n); }

// e^x, relative error ~1e-7, 0 below -87.
inline __m512 exp512(__m512 x) { return v16::exp({x}).r; }

// 16 elements (the first n) of a bf16 or fp32 array from element i, as fp32.
inline __m512 load16(const void* base, bool bf, int64_t i, __mmask16 n) {
  return v16::load(base, bf, i, n).r;
}

inline void store16(void* base, bool bf, int64_t i, __mmask16 n, __m512 x) {
  v16::store(base, bf, i, n, {x});
}

}  // namespace gptkit
