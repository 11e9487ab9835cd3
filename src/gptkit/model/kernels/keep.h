// Dropout's keep mask as a counter-based hash: whether element (row, col) of a (rows, cols)
// tensor is kept is a function of the seed and the position alone, so each thread makes
// the bits it needs where it needs them, and backward makes them again instead of saving
// them. `keep_mask` in ops/masks.py returns this mask (and `reference_keep` in the tests is the
// formula in torch ops):
//
//   mix(x)       = x ^= x >> 16; x *= 0x21f0aaad; x ^= x >> 15; x *= 0x735a2d97; x ^= x >> 15
//                  (uint32; Wellons' "lowbias32" finaliser, a bijection)
//   key(row)     = mix(mix(low32(row) ^ s0) + high32(row))     s0, s1: the seed's two halves
//   col(c)       = mix(mix(c ^ s1))
//   hash(row, c) = mix(key(row) ^ col(c))
//   kept         = hash >= threshold,  threshold = round(p * 2^32)
//
// so an element is dropped with probability p (to 2^-32). Rows and columns each take two
// rounds once; an element takes one (two multiplies per 16 elements, whose throughput is
// what the hash costs on AVX-512).

#pragma once

#include <immintrin.h>

#include <cstdint>
#include <vector>

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

  // col(c) for c < n, padded with zeros to a multiple of 16.
  std::vector<uint32_t> columns(int64_t n) const {
    std::vector<uint32_t> out((size_t)((n + 15) / 16 * 16), 0u);
    for (int64_t c = 0; c < n; ++c) out[(size_t)c] = mix(mix((uint32_t)c ^ s1));
    return out;
  }

  // Bits of the 16 columns whose col() values start at `cols` (bit i: column i kept), in
  // the row with key `k`.
  __mmask16 bits16(uint32_t k, const uint32_t* cols) const {
    if (all) return (__mmask16)0xFFFF;
    __m512i h = _mm512_xor_si512(_mm512_loadu_si512(cols), _mm512_set1_epi32((int)k));
    return _mm512_cmpge_epu32_mask(mix16(h), _mm512_set1_epi32((int)threshold));
  }
};

}  // namespace gptkit
