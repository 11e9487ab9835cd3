// Dropout's keep mask as a counter-based hash: whether element (row, col) of a (rows, cols)
// tensor is kept is a function of the seed and the position alone, so each thread makes
// the bits it needs where it needs them, and backward makes them again instead of saving
// them. `keep_mask` in gpt.py is the reference (and `random_keep_reference` in the tests
// is this formula in torch ops):
//
//   mix(x)       = x ^= x >> 16; x *= 0x21f0aaad; x ^= x >> 15; x *= 0x735a2d97; x ^= x >> 15
//                  (uint32; Wellons' "lowbias32" finaliser, a bijection)
//   key(row)     = mix(mix(low32(row) ^ s0) + high32(row))     s0, s1: the seed's two halves
//   hash(row, c) = mix(mix(mix(c ^ s1) ^ key(row)))
//   kept         = hash >= threshold,  threshold = round(p * 2^32)
//
// so an element is dropped with probability p (to 2^-32).

#pragma once

#include <immintrin.h>

#include <cstdint>

namespace gptkit {

inline uint32_t mix(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21f0aaadu;
  x ^= x >> 15;
  x *= 0x735a2d97u;
  x ^= x >> 15;
  return x;
}

inline __m512i mix16(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x21f0aaad));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x735a2d97));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
}

struct Keep {  // the mask of one seed and dropout probability
  uint32_t s0, s1, threshold;
  bool all;  // p == 0: every element kept, nothing to hash

  Keep(int64_t seed, int64_t thr)
      : s0((uint32_t)seed), s1((uint32_t)((uint64_t)seed >> 32)), threshold((uint32_t)thr),
        all(thr == 0) {}

  uint32_t key(int64_t row) const {
    return mix(mix((uint32_t)row ^ s0) + (uint32_t)((uint64_t)row >> 32));
  }

  // Bits of columns c .. c + 15 of the row with key `k` (bit i: column c + i kept).
  __mmask16 bits16(uint32_t k, int64_t c) const {
    if (all) return (__mmask16)0xFFFF;
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i col = _mm512_add_epi32(_mm512_set1_epi32((int)(uint32_t)c), lane);
    __m512i h = mix16(_mm512_xor_si512(col, _mm512_set1_epi32((int)s1)));
    h = mix16(mix16(_mm512_xor_si512(h, _mm512_set1_epi32((int)k))));
    return _mm512_cmpge_epu32_mask(h, _mm512_set1_epi32((int)threshold));
  }
};

}  // namespace gptkit
