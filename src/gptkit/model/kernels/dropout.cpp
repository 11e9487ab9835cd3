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

inline bool supported(const at::Tensor& t) {
  return t.is_contiguous() && t.device().is_cpu() &&
         (t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat);
}

// 16 elements (the first n) of a bf16 or fp32 array from element i, as fp32.
inline __m512 load16(const void* base, bool bf, int64_t i, __mmask16 n) {
  if (!bf) return _mm512_maskz_loadu_ps(n, reinterpret_cast<const float*>(base) + i);
  auto src = reinterpret_cast<const uint16_t*>(base) + i;
  __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(n, src));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

inline __m512 round_bf16(__m512 x) {  // to the nearest bf16 (even on ties), as fp32
  __m512i w = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

inline void store16(void* base, bool bf, int64_t i, __mmask16 n, __m512 x) {
  if (bf)
    _mm256_mask_storeu_epi16(reinterpret_cast<uint16_t*>(base) + i, n,
                             (__m256i)_mm512_cvtneps_pbh(x));
  else
    _mm512_mask_storeu_ps(reinterpret_cast<float*>(base) + i, n, x);
}

// out[i] = (x[i] as `dtype`) ∘ keep · scale, in `dtype` (bf16 or fp32), rounding as
// x.to(dtype) * keep * scale does; x contiguous bf16 or fp32, its last dimension the mask's
// columns. Dropout's forward (dtype = x's) and its backward on a gradient of another dtype.
at::Tensor dropout(at::Tensor x, int64_t seed, int64_t threshold, double scale,
                   at::ScalarType dtype) {
  TORCH_CHECK(supported(x) && (dtype == at::kBFloat16 || dtype == at::kFloat),
              "dropout kernel: x must be a contiguous bf16 or fp32 CPU tensor");
  int64_t rows, cols;
  shape2d(x, rows, cols);
  auto out = at::empty(x.sizes(), x.options().dtype(dtype));
  Keep keep(seed, threshold);
  auto colh = keep.columns(cols);
  const __m512 s = _mm512_set1_ps((float)scale);
  bool xbf = x.scalar_type() == at::kBFloat16, obf = dtype == at::kBFloat16;
  const void* xp = x.data_ptr();
  void* op = out.data_ptr();
  at::parallel_for(0, rows, grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      uint32_t k = keep.key(r);
      for (int64_t c = 0; c < cols; c += 16) {
        __mmask16 n = first_n(cols - c), m = keep.bits16(k, colh.data() + c) & n;
        int64_t i = r * cols + c;
        __m512 v = load16(xp, xbf, i, n);
        if (obf && !xbf) v = round_bf16(v);
        store16(op, obf, i, n, _mm512_maskz_mul_ps(m, v, s));
      }
    }
  });
  return out;
}

// x + dropout(y), as torch computes it (dropout's product rounded to y's dtype, the sum in
// fp32, rounded to the promoted dtype of x and y); x and y contiguous, the same shape.
at::Tensor dropout_add(at::Tensor x, at::Tensor y, int64_t seed, int64_t threshold,
                       double scale) {
  TORCH_CHECK(supported(x) && supported(y) && x.sizes() == y.sizes(),
              "dropout kernel: x and y must be contiguous bf16 or fp32 CPU tensors of one shape");
  int64_t rows, cols;
  shape2d(y, rows, cols);
  auto out = at::empty(x.sizes(), x.options().dtype(at::promote_types(x.scalar_type(),
                                                                       y.scalar_type())));
  Keep keep(seed, threshold);
  auto colh = keep.columns(cols);
  const __m512 s = _mm512_set1_ps((float)scale);
  bool xbf = x.scalar_type() == at::kBFloat16, ybf = y.scalar_type() == at::kBFloat16;
  bool obf = out.scalar_type() == at::kBFloat16;
  const void *xp = x.data_ptr(), *yp = y.data_ptr();
  void* op = out.data_ptr();
  at::parallel_for(0, rows, grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      uint32_t k = keep.key(r);
      for (int64_t c = 0; c < cols; c += 16) {
        __mmask16 n = first_n(cols - c), m = keep.bits16(k, colh.data() + c) & n;
        int64_t i = r * cols + c;
        __m512 d = _mm512_maskz_mul_ps(m, load16(yp, ybf, i, n), s);
        if (ybf) d = round_bf16(d);
        store16(op, obf, i, n, _mm512_add_ps(load16(xp, xbf, i, n), d));
      }
    }
  });
  return out;
}
