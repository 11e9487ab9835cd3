// Dropout on the CPU from keep.h's counter-based mask: one pass over the tensor, no mask
// in memory, and backward is the same call on the gradient (the same seed makes the same
// mask), so nothing is saved for it.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>

#include "keep.h"

namespace {

using gptkit::Keep;

inline __mmask16 first_n(int64_t n) {
  return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

// The (rows, cols) view of a tensor whose last dimension is its rows' length.
void shape2d(const at::Tensor& t, int64_t& rows, int64_t& cols) {
  cols = t.dim() ? t.size(-1) : 1;
  rows = cols ? t.numel() / cols : 0;
}

int64_t grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

}  // namespace

// The keep mask (bool, rows × cols) of `seed` and `threshold` (keep.h).
at::Tensor keep_mask(int64_t seed, int64_t threshold, int64_t rows, int64_t cols) {
  TORCH_CHECK(rows >= 0 && cols >= 0 && cols < (int64_t{1} << 32), "keep_mask: bad shape");
  auto out = at::empty({rows, cols}, at::TensorOptions().dtype(at::kBool));
  auto o = reinterpret_cast<uint8_t*>(out.data_ptr<bool>());
  Keep keep(seed, threshold);
  auto colh = keep.columns(cols);
  at::parallel_for(0, rows, grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      uint32_t k = keep.key(r);
      for (int64_t c = 0; c < cols; c += 16) {
        __mmask16 m = keep.bits16(k, colh.data() + c);
        _mm_mask_storeu_epi8(o + r * cols + c, first_n(cols - c),
                             _mm_maskz_mov_epi8(m, _mm_set1_epi8(1)));
      }
    }
  });
  return out;
}

// x ∘ keep · scale, x contiguous bf16 or fp32 (its last dimension the mask's columns).
at::Tensor dropout(at::Tensor x, int64_t seed, int64_t threshold, double scale) {
  TORCH_CHECK(x.is_contiguous() && x.device().is_cpu() &&
                  (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "dropout kernel: x must be a contiguous bf16 or fp32 CPU tensor");
  int64_t rows, cols;
  shape2d(x, rows, cols);
  auto out = at::empty_like(x);
  Keep keep(seed, threshold);
  auto colh = keep.columns(cols);
  const __m512 s = _mm512_set1_ps((float)scale);
  bool bf = x.scalar_type() == at::kBFloat16;
  auto xp = reinterpret_cast<const char*>(x.data_ptr());
  auto op = reinterpret_cast<char*>(out.data_ptr());
  at::parallel_for(0, rows, grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      uint32_t k = keep.key(r);
      for (int64_t c = 0; c < cols; c += 16) {
        __mmask16 n = first_n(cols - c), m = keep.bits16(k, colh.data() + c) & n;
        int64_t i = r * cols + c;
        if (bf) {
          auto src = reinterpret_cast<const uint16_t*>(xp) + i;
          __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(n, src));
          __m512 y = _mm512_maskz_mul_ps(m, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), s);
          _mm256_mask_storeu_epi16(reinterpret_cast<uint16_t*>(op) + i, n,
                                   (__m256i)_mm512_cvtneps_pbh(y));
        } else {
          auto src = reinterpret_cast<const float*>(xp) + i;
          __m512 y = _mm512_maskz_mul_ps(m, _mm512_maskz_loadu_ps(n, src), s);
          _mm512_mask_storeu_ps(reinterpret_cast<float*>(op) + i, n, y);
        }
      }
    }
  });
  return out;
}
