// Element-wise kernels, one pass over memory each: dropout from keep.h's counter-based mask
// (no mask in memory; backward is the same call on the gradient, as the same seed makes the
// same mask, so nothing is saved for it), dropout fused with the residual add, and GELU's
// backward.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "keep.h"
#include "simd.h"

namespace {

using gptkit::exp512;
using gptkit::first_n;
using gptkit::load16;
using gptkit::store16;
using gptkit::Keep;

// The (rows, cols) view of a tensor whose last dimension is its rows' length.
void shape2d(const at::Tensor& t, int64_t& rows, int64_t& cols) {
  cols = t.dim() ? t.size(-1) : 1;
  rows = cols ? t.numel() / cols : 0;
}

int64_t grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

// Calls f(i, n, m) for each 16 elements of a (rows, cols) tensor, in parallel over rows: i
// the flat index of the first, n the lanes inside the row, m those of them `keep` keeps.
template <class F>
void masked_rows(const Keep& keep, int64_t rows, int64_t cols, F f) {
  auto colh = keep.columns(cols);
  at::parallel_for(0, rows, grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      uint32_t k = keep.key(r);
      for (int64_t c = 0; c < cols; c += 16) {
        __mmask16 n = first_n(cols - c);
        f(r * cols + c, n, (__mmask16)(keep.bits16(k, colh.data() + c) & n));
      }
    }
  });
}

}  // namespace

// The keep mask (bool, rows × cols) of `seed` and `threshold` (keep.h).
at::Tensor keep_mask(int64_t seed, int64_t threshold, int64_t rows, int64_t cols) {
  TORCH_CHECK(rows >= 0 && cols >= 0 && cols < (int64_t{1} << 32), "keep_mask: bad shape");
  auto out = at::empty({rows, cols}, at::TensorOptions().dtype(at::kBool));
  auto o = reinterpret_cast<uint8_t*>(out.data_ptr<bool>());
  masked_rows(Keep(seed, threshold), rows, cols, [&](int64_t i, __mmask16 n, __mmask16 m) {
    _mm_mask_storeu_epi8(o + i, n, _mm_maskz_mov_epi8(m, _mm_set1_epi8(1)));
  });
  return out;
}

inline bool supported(const at::Tensor& t) {
  return t.is_contiguous() && t.device().is_cpu() &&
         (t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat);
}

inline __m512 round_bf16(__m512 x) {  // to the nearest bf16 (even on ties), as fp32
  __m512i w = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
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
  const __m512 s = _mm512_set1_ps((float)scale);
  bool xbf = x.scalar_type() == at::kBFloat16, obf = dtype == at::kBFloat16;
  const void* xp = x.data_ptr();
  void* op = out.data_ptr();
  masked_rows(Keep(seed, threshold), rows, cols, [&](int64_t i, __mmask16 n, __mmask16 m) {
    __m512 v = load16(xp, xbf, i, n);
    if (obf && !xbf) v = round_bf16(v);
    store16(op, obf, i, n, _mm512_maskz_mul_ps(m, v, s));
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
  const __m512 s = _mm512_set1_ps((float)scale);
  bool xbf = x.scalar_type() == at::kBFloat16, ybf = y.scalar_type() == at::kBFloat16;
  bool obf = out.scalar_type() == at::kBFloat16;
  const void *xp = x.data_ptr(), *yp = y.data_ptr();
  void* op = out.data_ptr();
  masked_rows(Keep(seed, threshold), rows, cols, [&](int64_t i, __mmask16 n, __mmask16 m) {
    __m512 d = _mm512_maskz_mul_ps(m, load16(yp, ybf, i, n), s);
    if (ybf) d = round_bf16(d);
    store16(op, obf, i, n, _mm512_add_ps(load16(xp, xbf, i, n), d));
  });
  return out;
}

// grad · GELU'(x) for GELU's exact (erf) form: Φ(x) + x φ(x), with erf by Abramowitz and
// Stegun 7.1.26 (absolute error below 1.5e-7, far below bf16's rounding); x and grad
// contiguous bf16 of one shape. One pass, where torch's bf16 gelu_backward takes twice the
// memory traffic's time on a CPU.
at::Tensor gelu_backward(at::Tensor grad, at::Tensor x) {
  TORCH_CHECK(x.is_contiguous() && grad.is_contiguous() && x.sizes() == grad.sizes() &&
                  x.scalar_type() == at::kBFloat16 && grad.scalar_type() == at::kBFloat16,
              "gelu kernel: x and grad must be contiguous bf16 tensors of one shape");
  auto out = at::empty_like(x);
  int64_t n = x.numel();
  const void *xp = x.data_ptr(), *gp = grad.data_ptr();
  void* op = out.data_ptr();
  at::parallel_for(0, (n + 15) / 16, 4096, [&](int64_t begin, int64_t end) {
    const __m512 one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f);
    for (int64_t v = begin; v < end; ++v) {
      int64_t i = v * 16;
      __mmask16 m = first_n(n - i);
      __m512 xv = load16(xp, true, i, m);
      __m512 e = exp512(_mm512_mul_ps(_mm512_mul_ps(xv, xv), _mm512_set1_ps(-0.5f)));  // e^(-x²/2)
      __m512 z = _mm512_mul_ps(_mm512_abs_ps(xv), _mm512_set1_ps(0.70710678f));  // |x| / √2
      __m512 den = _mm512_fmadd_ps(z, _mm512_set1_ps(0.3275911f), one);
      __m512 t = _mm512_rcp14_ps(den);
      t = _mm512_mul_ps(t, _mm512_fnmadd_ps(den, t, _mm512_set1_ps(2.0f)));  // Newton step
      __m512 poly = _mm512_set1_ps(1.061405429f);
      poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-1.453152027f));
      poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(1.421413741f));
      poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-0.284496736f));
      poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.254829592f));
      __m512 h = _mm512_mul_ps(_mm512_mul_ps(poly, t), _mm512_mul_ps(e, half));  // 1 - Φ(|x|)
      __mmask16 neg = _mm512_cmp_ps_mask(xv, _mm512_setzero_ps(), _CMP_LT_OQ);
      __m512 cdf = _mm512_mask_blend_ps(neg, _mm512_sub_ps(one, h), h);  // Φ(x)
      __m512 d = _mm512_fmadd_ps(_mm512_mul_ps(xv, e), _mm512_set1_ps(0.39894228f), cdf);
      store16(op, true, i, m, _mm512_mul_ps(load16(gp, true, i, m), d));
    }
  });
  return out;
}

// Layer norm of fp32 rows into bf16, the dtype the next matmul takes under autocast (one
// pass instead of torch's fp32 norm and a cast): x (rows, C) fp32 contiguous, weight and
// bias (an empty bias: none) fp32 of C. Returns (y, mean, rstd), the last two per row.
std::vector<at::Tensor> layer_norm_forward(at::Tensor x, at::Tensor weight, at::Tensor bias,
                                           double eps) {
  int64_t rows, C;
  shape2d(x, rows, C);
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat && weight.numel() == C &&
                  weight.scalar_type() == at::kFloat && weight.is_contiguous() &&
                  (bias.numel() == 0 || (bias.numel() == C && bias.scalar_type() == at::kFloat &&
                                         bias.is_contiguous())),
              "layer norm kernel: x fp32 (..., C), weight and bias fp32 of C");
  auto y = at::empty(x.sizes(), x.options().dtype(at::kBFloat16));
  auto mean = at::empty({rows}, x.options()), rstd = at::empty({rows}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  float *mp = mean.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  void* yp = y.data_ptr();
  at::parallel_for(0, rows, grain(C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * C;
      __m512 s = _mm512_setzero_ps();
      for (int64_t c = 0; c < C; c += 16) s = _mm512_add_ps(s, load16(xr, false, c, first_n(C - c)));
      float mu = _mm512_reduce_add_ps(s) / (float)C;
      __m512 vm = _mm512_set1_ps(mu), q = _mm512_setzero_ps();
      for (int64_t c = 0; c < C; c += 16) {
        __mmask16 n = first_n(C - c);
        __m512 d = _mm512_maskz_sub_ps(n, load16(xr, false, c, n), vm);
        q = _mm512_fmadd_ps(d, d, q);
      }
      float rs = 1.0f / std::sqrt(_mm512_reduce_add_ps(q) / (float)C + (float)eps);
      mp[r] = mu;
      rp[r] = rs;
      __m512 vr = _mm512_set1_ps(rs);
      for (int64_t c = 0; c < C; c += 16) {
        __mmask16 n = first_n(C - c);
        __m512 h = _mm512_mul_ps(_mm512_sub_ps(load16(xr, false, c, n), vm), vr);
        h = _mm512_mul_ps(h, load16(wp, false, c, n));
        if (bp) h = _mm512_add_ps(h, load16(bp, false, c, n));
        store16(yp, true, r * C + c, n, h);
      }
    }
  });
  return {y, mean, rstd};
}

// Its gradients for grad (bf16, y's shape): (dx fp32, dweight, dbias (empty without bias)).
std::vector<at::Tensor> layer_norm_backward(at::Tensor grad, at::Tensor x, at::Tensor mean,
                                            at::Tensor rstd, at::Tensor weight, bool has_bias) {
  int64_t rows, C;
  shape2d(x, rows, C);
  TORCH_CHECK(grad.is_contiguous() && grad.scalar_type() == at::kBFloat16 &&
                  grad.sizes() == x.sizes(),
              "layer norm kernel: grad must be contiguous bf16 of x's shape");
  auto dx = at::empty_like(x);
  int nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
  auto partial = at::zeros({nt, 2, C}, x.options());  // each thread's sums for dw and db
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  const float *mp = mean.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  const void* gp = grad.data_ptr();
  float *dxp = dx.data_ptr<float>(), *pp = partial.data_ptr<float>();
  const float inv = 1.0f / (float)C;
  at::parallel_for(0, nt, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      float *dw = pp + t * 2 * C, *db = dw + C;
      for (int64_t r = rows * t / nt; r < rows * (t + 1) / nt; ++r) {
        const float* xr = xp + r * C;
        __m512 vm = _mm512_set1_ps(mp[r]), vr = _mm512_set1_ps(rp[r]);
        __m512 sa = _mm512_setzero_ps(), sb = _mm512_setzero_ps();
        for (int64_t c = 0; c < C; c += 16) {  // sums of g w and g w xhat; dw, db
          __mmask16 n = first_n(C - c);
          __m512 g = load16(gp, true, r * C + c, n);
          __m512 xh = _mm512_mul_ps(_mm512_maskz_sub_ps(n, load16(xr, false, c, n), vm), vr);
          __m512 gw = _mm512_mul_ps(g, load16(wp, false, c, n));
          sa = _mm512_add_ps(sa, gw);
          sb = _mm512_fmadd_ps(gw, xh, sb);
          _mm512_mask_storeu_ps(dw + c, n, _mm512_fmadd_ps(g, xh, _mm512_maskz_loadu_ps(n, dw + c)));
          _mm512_mask_storeu_ps(db + c, n, _mm512_add_ps(g, _mm512_maskz_loadu_ps(n, db + c)));
        }
        __m512 a = _mm512_set1_ps(_mm512_reduce_add_ps(sa) * inv);
        __m512 b = _mm512_set1_ps(_mm512_reduce_add_ps(sb) * inv);
        for (int64_t c = 0; c < C; c += 16) {  // dx = rstd (g w - mean(g w) - xhat mean(g w xhat))
          __mmask16 n = first_n(C - c);
          __m512 g = load16(gp, true, r * C + c, n);
          __m512 xh = _mm512_mul_ps(_mm512_sub_ps(load16(xr, false, c, n), vm), vr);
          __m512 gw = _mm512_mul_ps(g, load16(wp, false, c, n));
          __m512 d = _mm512_fnmadd_ps(xh, b, _mm512_sub_ps(gw, a));
          _mm512_mask_storeu_ps(dxp + r * C + c, n, _mm512_mul_ps(d, vr));
        }
      }
    }
  });
  auto sums = partial.sum(0);  // (2, C)
  return {dx, sums[0].contiguous(), has_bias ? sums[1].contiguous() : at::Tensor()};
}
