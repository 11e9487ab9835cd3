// Causal attention with dropout on the weights, forward and backward, for bf16 on CPUs
// with AVX512-BF16: the fast path of gptkit.model.ops.sdpa._DropoutAttention (whose Python
// tiles define the semantics and serve every other case) and _QKVAttention. This file also
// binds the module, elementwise.cpp's kernels included.
//
// Per (batch row, head), in blocks of MB query rows: S = Q Kᵀ in fp32, an exact softmax
// over the block's causal prefix of keys (a row's keys fit in cache, so no online
// rescaling is needed), dropout, O = P V. Backward recomputes P from the saved row
// log-sum-exp and accumulates dK and dV in fp32. Nothing of size (T, S) per head outlives
// a block, and no mask is stored: the dropout bits are keep.h's hash of (seed, position),
// made again in backward. q, k and v are read in place (any row stride: views of the qkv
// projection's output), the output and the gradients are written as (B, T, H, hs), and
// the scales (1/sqrt(hs) on the scores, 1/(1 - p) on the kept weights) are applied on the
// way, so no pass over memory happens outside the kernel.
//
// Every product is C (+)= A · B, bf16 in, fp32 out, with B in the pair ("VNNI") layout
// that vdpbf16ps reads: B[p][n][t] = B(2p + t, n), two bf16 of consecutive k in one
// 32-bit lane.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "keep.h"
#include "simd.h"

at::Tensor keep_mask(int64_t seed, int64_t threshold, int64_t rows, int64_t cols);
at::Tensor dropout(at::Tensor x, int64_t seed, int64_t threshold, double scale,
                   at::ScalarType dtype);
at::Tensor dropout_add(at::Tensor x, at::Tensor y, int64_t seed, int64_t threshold,
                       double scale);
at::Tensor gelu_backward(at::Tensor grad, at::Tensor x);
std::vector<at::Tensor> layer_norm_forward(at::Tensor x, at::Tensor weight, at::Tensor bias,
                                           double eps);
std::vector<at::Tensor> layer_norm_backward(at::Tensor grad, at::Tensor x, at::Tensor mean,
                                            at::Tensor rstd, at::Tensor weight, bool has_bias);

namespace {

using gptkit::exp512;
using gptkit::first_n;
using gptkit::Keep;

using bf16 = uint16_t;
constexpr int MB = 64;  // query rows per block

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// ---- the micro-kernel ------------------------------------------------------------------

// C[MR rows][16 NV columns] (+)= A · B over Kp pairs of k. A as 32-bit pairs, row-major
// (A[r][p] at r * lda2 + p) or, with AT, pair-major (A[r][p] at p * lda2 + r: the layout B
// has, so a product can read a transposed operand without transposing it).
template <int MR, int NV, bool AT>
void tile(int Kp, const uint32_t* A, int lda2, const uint32_t* B, int ldb, float* C, int ldc,
          bool accumulate) {
  __m512 c[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v)
      c[r][v] = accumulate ? _mm512_loadu_ps(C + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int p = 0; p < Kp; ++p) {
    __m512bh b[NV];
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(B + p * ldb + 16 * v);
    for (int r = 0; r < MR; ++r) {
      uint32_t pair = AT ? A[p * lda2 + r] : A[r * lda2 + p];
      __m512bh a = (__m512bh)_mm512_set1_epi32((int)pair);
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_dpbf16_ps(c[r][v], a, b[v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + r * ldc + 16 * v, c[r][v]);
}

template <int MR, bool AT>
void tile_row(int nv, int Kp, const uint32_t* A, int lda2, const uint32_t* B, int ldb, float* C,
              int ldc, bool acc) {
  switch (nv) {
    case 1: return tile<MR, 1, AT>(Kp, A, lda2, B, ldb, C, ldc, acc);
    case 2: return tile<MR, 2, AT>(Kp, A, lda2, B, ldb, C, ldc, acc);
    case 3: return tile<MR, 3, AT>(Kp, A, lda2, B, ldb, C, ldc, acc);
    default: return tile<MR, 4, AT>(Kp, A, lda2, B, ldb, C, ldc, acc);
  }
}

// What a tile of rows m0 .. m0 + 3 of C needs: columns [0, n) and pairs of k [p0, p1).
struct Span {
  int n, p0, p1;
};

// Causal blocks: products whose operands are zero past the diagonal skip those parts. Row
// r of a score block sees keys [0, vis + r); rows are queries, columns keys.
struct SeenKeys {  // Q Kᵀ, dO Vᵀ: only the columns of keys a row of the tile sees
  int N, Kp, vis;
  Span operator()(int m0) const { return {std::min(N, round_up(vis + m0 + 3, 16)), 0, Kp}; }
};
struct SeenPairs {  // P V, dS K: only the pairs of keys a row of the tile sees
  int N, Kp, vis;
  Span operator()(int m0) const { return {N, 0, std::min(Kp, (vis + m0 + 4) / 2)}; }
};
struct SeeingQueries {  // Pᵀ dO, dSᵀ Q (rows are keys): only the pairs of queries that see them
  int N, Kp, vis;
  Span operator()(int m0) const { return {N, std::max(0, m0 - vis + 1) / 2, Kp}; }
};

// C (M × N fp32, ldc) (+)= A (M × 2 Kp) · B (Kp rows of ldb pairs, the first N used), the
// parts of each 4-row tile that `span` names; N % 16 == 0; lda2 and ldb count 32-bit pairs.
template <bool AT, class Spans>
void gemm(int M, const bf16* A, int lda2, const bf16* B, int ldb, float* C, int ldc, bool acc,
          Spans span) {
  auto A32 = reinterpret_cast<const uint32_t*>(A);
  auto B32 = reinterpret_cast<const uint32_t*>(B);
  auto run = [&](int m0, int mr) {
    Span sp = span(m0);
    const uint32_t* a = (AT ? A32 + m0 + (int64_t)sp.p0 * lda2 : A32 + m0 * lda2 + sp.p0);
    const uint32_t* b = B32 + (int64_t)sp.p0 * ldb;
    int kp = std::max(0, sp.p1 - sp.p0);
    if (kp == 0 && acc) return;
    for (int n0 = 0; n0 < sp.n; n0 += 64) {
      int nv = std::min(4, (sp.n - n0) / 16);
      float* c = C + m0 * ldc + n0;
      switch (mr) {
        case 4: tile_row<4, AT>(nv, kp, a, lda2, b + n0, ldb, c, ldc, acc); break;
        case 3: tile_row<3, AT>(nv, kp, a, lda2, b + n0, ldb, c, ldc, acc); break;
        case 2: tile_row<2, AT>(nv, kp, a, lda2, b + n0, ldb, c, ldc, acc); break;
        default: tile_row<1, AT>(nv, kp, a, lda2, b + n0, ldb, c, ldc, acc); break;
      }
    }
  };
  for (int m0 = 0; m0 < M; m0 += 4) run(m0, std::min(4, M - m0));
}

// ---- packing ---------------------------------------------------------------------------

// The pair form of Xᵀ, X (n rows of ld, the first k (even) used): out[p][j] = pair p of
// row j, for j < Np (a multiple of 16; zero past n).
void pack_transposed(const bf16* X, int n, int64_t ld, int Np, int k, bf16* out) {
  auto x = reinterpret_cast<const int*>(X);
  auto o = reinterpret_cast<uint32_t*>(out);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int p = 0; p < k / 2; ++p)
    for (int j = 0; j < Np; j += 16) {
      __m512i row = _mm512_add_epi32(lane, _mm512_set1_epi32(j));
      __m512i idx = _mm512_add_epi32(_mm512_mullo_epi32(row, _mm512_set1_epi32((int)(ld / 2))),
                                     _mm512_set1_epi32(p));
      __m512i w = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), first_n(n - j), idx, x, 4);
      _mm512_storeu_si512(o + p * Np + j, w);
    }
}

// Interleave 16 bf16 of r0 and of r1: out[2t] = r0[t], out[2t + 1] = r1[t].
inline void interleave16(__m256i r0, __m256i r1, bf16* out) {
  static const uint16_t order[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                     8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_loadu_si512(order);
  __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(r0), r1, 1);
  _mm512_storeu_si512(out, _mm512_permutexvar_epi16(idx, both));
}

// The pair form of X (k rows of ld, the first n % 16 == 0 used): out[p][j][t] = X(2p + t, j)
// for p < kp, zero for rows past k; rows of out are ldo pairs apart.
void pack_rows(const bf16* X, int k, int n, int64_t ld, int kp, int ldo, bf16* out) {
  const __m256i zero = _mm256_setzero_si256();
  for (int p = 0; p < kp; ++p) {
    const bf16* r0 = X + (int64_t)(2 * p) * ld;
    const bf16* r1 = r0 + ld;
    for (int j = 0; j < n; j += 16) {
      __m256i a = 2 * p < k ? _mm256_loadu_si256((const __m256i*)(r0 + j)) : zero;
      __m256i b = 2 * p + 1 < k ? _mm256_loadu_si256((const __m256i*)(r1 + j)) : zero;
      interleave16(a, b, out + ((int64_t)p * ldo + j) * 2);
    }
  }
}

// ---- element-wise ----------------------------------------------------------------------

inline __m256i to_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

inline __m512 from_bf16(const bf16* x) {
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

// ---- forward ---------------------------------------------------------------------------

// One head's rows: element (t, c) at p[t * ld + c].
struct Rows {
  const bf16* p;
  int64_t ld;
  const bf16* row(int t) const { return p + t * ld; }
};

struct Forward {  // one thread's buffers
  int Sp, S2;
  std::vector<bf16> kt, vv, p;
  std::vector<float> s, o;
  Forward(int S, int d)
      : Sp(round_up(S, 16)), S2(round_up(S, 2)), kt((size_t)d * Sp), vv((size_t)S2 * d),
        p((size_t)MB * Sp), s((size_t)MB * Sp), o((size_t)MB * d) {}

  // softmax(scale · q kᵀ, causal) with dropout, times v · vscale, into out; lse per row
  // (query blocks [b0, b1) of the head; all by default). Mask row row0 + t: query t.
  void head(Rows q, Rows k, Rows v, const Keep& keep, const uint32_t* cols, int64_t row0, int T,
            int S, int d, float scale, float vscale, bf16* out, int64_t ldo, float* lse,
            int b0 = 0, int b1 = 1 << 30) {
    int kmax = std::min(S, std::min(T, b1 * MB) + S - T);  // the keys these blocks see
    pack_transposed(k.p, kmax, k.ld, Sp, d, kt.data());
    pack_rows(v.p, kmax, d, v.ld, round_up(kmax, 2) / 2, d, vv.data());
    const __m512 sc = _mm512_set1_ps(scale), vsc = _mm512_set1_ps(vscale);
    for (int i0 = b0 * MB; i0 < std::min(T, b1 * MB); i0 += MB) {
      int m = std::min(MB, T - i0);
      int kend = std::min(S, i0 + m + S - T), np = round_up(kend, 16);
      int vis = i0 + S - T + 1;  // keys the block's first query sees
      gemm<false>(m, q.row(i0), q.ld / 2, kt.data(), Sp, s.data(), Sp, false,
                  SeenKeys{np, d / 2, vis});
      for (int r = 0; r < m; ++r) {
        int lim = i0 + r + S - T + 1;  // keys this query sees
        float* sr = s.data() + (int64_t)r * Sp;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int j = 0; j < lim; j += 16)
          mx = _mm512_mask_max_ps(mx, first_n(lim - j), mx, _mm512_loadu_ps(sr + j));
        float smax = _mm512_reduce_max_ps(mx) * scale;
        __m512 vmax = _mm512_set1_ps(smax), sum = _mm512_setzero_ps();
        for (int j = 0; j < lim; j += 16) {
          __m512 e = exp512(_mm512_fmsub_ps(_mm512_loadu_ps(sr + j), sc, vmax));
          e = _mm512_maskz_mov_ps(first_n(lim - j), e);
          _mm512_storeu_ps(sr + j, e);
          sum = _mm512_add_ps(sum, e);
        }
        float rsum = _mm512_reduce_add_ps(sum);
        lse[i0 + r] = smax + std::log(rsum);
        __m512 inv = _mm512_set1_ps(1.0f / rsum);
        uint32_t key = keep.key(row0 + i0 + r);
        bf16* pr = p.data() + (int64_t)r * Sp;
        for (int j = 0; j < np; j += 16) {
          __mmask16 kept = j < lim ? first_n(lim - j) & keep.bits16(key, cols + j) : 0;
          __m512 x = _mm512_maskz_mul_ps(kept, _mm512_loadu_ps(sr + j), inv);
          _mm256_storeu_si256((__m256i*)(pr + j), to_bf16(x));
        }
      }
      gemm<false>(m, p.data(), Sp / 2, vv.data(), d, o.data(), d, false,
                  SeenPairs{d, round_up(kend, 2) / 2, vis});
      for (int r = 0; r < m; ++r)
        for (int c = 0; c < d; c += 16)
          _mm256_storeu_si256((__m256i*)(out + (i0 + r) * ldo + c),
                              to_bf16(_mm512_mul_ps(_mm512_loadu_ps(o.data() + r * d + c), vsc)));
    }
  }
};

// ---- backward --------------------------------------------------------------------------

struct Backward {  // one thread's buffers
  int Sp, S2;
  std::vector<bf16> kt, vt, kv, pk, ds, pv, dsv, dov, qv;
  std::vector<float> s, dp, dq32, dk32, dv32, D;
  Backward(int S, int d)
      : Sp(round_up(S, 16)), S2(round_up(S, 2)), kt((size_t)d * Sp), vt((size_t)d * Sp),
        kv((size_t)S2 * d), pk((size_t)MB * Sp), ds((size_t)MB * Sp), pv((size_t)MB * Sp),
        dsv((size_t)MB * Sp), dov((size_t)MB * d), qv((size_t)MB * d), s((size_t)MB * Sp),
        dp((size_t)MB * Sp), dq32((size_t)MB * d), dk32((size_t)Sp * d), dv32((size_t)Sp * d),
        D(MB) {}

  // The gradients of Forward::head's output (o) for dout, into dq, dk, dv.
  void head(Rows q, Rows k, Rows v, Rows o, Rows dout, const float* lse, const Keep& keep,
            const uint32_t* cols, int64_t row0, int T, int S, int d, float scale, float vscale,
            bf16* dq, int64_t ldq, bf16* dk, int64_t ldk, bf16* dv, int64_t ldv) {
    pack_transposed(k.p, S, k.ld, Sp, d, kt.data());
    pack_transposed(v.p, S, v.ld, Sp, d, vt.data());
    pack_rows(k.p, S, d, k.ld, S2 / 2, d, kv.data());
    std::fill(dk32.begin(), dk32.end(), 0.0f);
    std::fill(dv32.begin(), dv32.end(), 0.0f);
    const __m512 sc = _mm512_set1_ps(scale), vsc = _mm512_set1_ps(vscale);
    for (int i0 = 0; i0 < T; i0 += MB) {
      int m = std::min(MB, T - i0), m2 = round_up(m, 2);
      int kend = std::min(S, i0 + m + S - T), np = round_up(kend, 16), k2 = round_up(kend, 2);
      const bf16* qi = q.row(i0);
      const bf16* di = dout.row(i0);
      int vis = i0 + S - T + 1;  // keys the block's first query sees
      SeenKeys seen{np, d / 2, vis};
      gemm<false>(m, qi, q.ld / 2, kt.data(), Sp, s.data(), Sp, false, seen);  // Q Kᵀ
      gemm<false>(m, di, dout.ld / 2, vt.data(), Sp, dp.data(), Sp, false, seen);  // dO Vᵀ
      for (int r = 0; r < m; ++r) {  // D = rowsum(dO ∘ O)
        __m512 acc = _mm512_setzero_ps();
        for (int c = 0; c < d; c += 16)
          acc = _mm512_fmadd_ps(from_bf16(dout.row(i0 + r) + c), from_bf16(o.row(i0 + r) + c), acc);
        D[r] = _mm512_reduce_add_ps(acc);
      }
      for (int r = 0; r < m; ++r) {
        int lim = i0 + r + S - T + 1;
        const float* sr = s.data() + (int64_t)r * Sp;
        const float* dpr = dp.data() + (int64_t)r * Sp;
        __m512 l = _mm512_set1_ps(lse[i0 + r]), Dr = _mm512_set1_ps(D[r]);
        uint32_t key = keep.key(row0 + i0 + r);
        for (int j = 0; j < np; j += 16) {
          __mmask16 seen = j < lim ? first_n(lim - j) : 0;
          __mmask16 kept = seen ? seen & keep.bits16(key, cols + j) : 0;
          __m512 P = exp512(_mm512_fmsub_ps(_mm512_loadu_ps(sr + j), sc, l));
          P = _mm512_maskz_mov_ps(seen, P);
          __m512 dP = _mm512_maskz_mul_ps(kept, _mm512_loadu_ps(dpr + j), vsc);
          __m512 dS = _mm512_mul_ps(P, _mm512_sub_ps(dP, Dr));
          _mm256_storeu_si256((__m256i*)(pk.data() + (int64_t)r * Sp + j),
                              to_bf16(_mm512_maskz_mov_ps(kept, P)));
          _mm256_storeu_si256((__m256i*)(ds.data() + (int64_t)r * Sp + j), to_bf16(dS));
        }
      }
      pack_rows(pk.data(), m, np, Sp, m2 / 2, Sp, pv.data());
      pack_rows(ds.data(), m, np, Sp, m2 / 2, Sp, dsv.data());
      pack_rows(di, m, d, dout.ld, m2 / 2, d, dov.data());
      pack_rows(qi, m, d, q.ld, m2 / 2, d, qv.data());
      SeeingQueries seeing{d, m2 / 2, vis};
      gemm<true>(np, pv.data(), Sp, dov.data(), d, dv32.data(), d, true, seeing);  // Pdᵀ dO
      gemm<true>(np, dsv.data(), Sp, qv.data(), d, dk32.data(), d, true, seeing);  // dSᵀ Q
      gemm<false>(m, ds.data(), Sp / 2, kv.data(), d, dq32.data(), d, false,
                  SeenPairs{d, k2 / 2, vis});  // dS K
      for (int r = 0; r < m; ++r)
        for (int c = 0; c < d; c += 16)
          _mm256_storeu_si256((__m256i*)(dq + (i0 + r) * ldq + c),
                              to_bf16(_mm512_mul_ps(_mm512_loadu_ps(dq32.data() + r * d + c), sc)));
    }
    for (int j = 0; j < S; ++j)
      for (int c = 0; c < d; c += 16) {
        __m512 gk = _mm512_mul_ps(_mm512_loadu_ps(dk32.data() + j * d + c), sc);
        __m512 gv = _mm512_mul_ps(_mm512_loadu_ps(dv32.data() + j * d + c), vsc);
        _mm256_storeu_si256((__m256i*)(dk + j * ldk + c), to_bf16(gk));
        _mm256_storeu_si256((__m256i*)(dv + j * ldv + c), to_bf16(gv));
      }
  }
};

// (B, H, T, hs) bf16 on the CPU, hs contiguous, rows an even number of elements apart.
void check_heads(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4 && t.scalar_type() == at::kBFloat16 && t.device().is_cpu(),
              "attention kernel: ", name, " must be a (B, H, T, hs) bf16 CPU tensor");
  TORCH_CHECK(t.stride(3) == 1 && t.stride(0) % 2 == 0 && t.stride(1) % 2 == 0 &&
                  t.stride(2) % 2 == 0 && t.storage_offset() % 2 == 0,
              "attention kernel: ", name, " needs unit stride in hs and even other strides");
}

void check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t threshold) {
  check_heads(q, "q");
  check_heads(k, "k");
  check_heads(v, "v");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(1) == k.size(1) &&
                  q.size(3) == k.size(3) && q.size(2) <= k.size(2),
              "attention kernel: q (B, H, T, hs), k and v (B, H, S, hs) with T <= S");
  TORCH_CHECK(q.size(3) % 16 == 0, "attention kernel: head size must be a multiple of 16");
  TORCH_CHECK(threshold >= 0 && threshold < (int64_t{1} << 32),
              "attention kernel: the dropout threshold must be in [0, 2^32)");
}

Rows rows(const at::Tensor& t, int64_t bh) {
  int64_t H = t.size(1);
  auto base = reinterpret_cast<const bf16*>(t.data_ptr());
  return {base + (bh / H) * t.stride(0) + (bh % H) * t.stride(1), t.stride(2)};
}

bf16* rows_out(at::Tensor& t, int64_t bh) { return const_cast<bf16*>(rows(t, bh).p); }

// A (B, H, n, hs) tensor laid out as (B, n, H, hs): what the output projection reads.
at::Tensor heads_like(const at::Tensor& t, int64_t n) {
  return at::empty({t.size(0), n, t.size(1), t.size(3)}, t.options()).transpose(1, 2);
}

}  // namespace

// q (B, H, T, hs), k and v (B, H, S, hs), the last T queries of S positions, causal;
// dropout keeps weight (b, h, t, s) where keep.h's mask of `seed` and `threshold` keeps
// element ((b H + h) T + t, s) (threshold 0: no dropout).
// Returns out = softmax(scale q kᵀ) ∘ keep · v · vscale (laid out as (B, T, H, hs)) and
// each row's log-sum-exp of scale q kᵀ.
std::vector<at::Tensor> attention_forward(at::Tensor q, at::Tensor k, at::Tensor v,
                                          int64_t seed, int64_t threshold, double scale,
                                          double vscale) {
  check(q, k, v, threshold);
  int64_t B = q.size(0), H = q.size(1), T = q.size(2), S = k.size(2), d = q.size(3);
  auto out = heads_like(q, T);
  auto lse = at::empty({B, H, T}, q.options().dtype(at::kFloat));
  auto lp = lse.data_ptr<float>();
  Keep keep(seed, threshold);
  auto cols = keep.columns(S);
  // Few heads (a single prompt's prefill): each query block is a task of its own, so that
  // every thread has work; otherwise a head is one task and packs its keys once.
  int64_t blocks = (T + MB - 1) / MB;
  int64_t split = B * H < 4 * at::get_num_threads() ? blocks : 1;
  at::parallel_for(0, B * H * split, 1, [&](int64_t begin, int64_t end) {
    Forward f((int)S, (int)d);
    for (int64_t task = begin; task < end; ++task) {
      int64_t bh = task / split;
      int b0 = split == 1 ? 0 : (int)(task % split), b1 = split == 1 ? (int)blocks : b0 + 1;
      f.head(rows(q, bh), rows(k, bh), rows(v, bh), keep, cols.data(), bh * T, (int)T, (int)S,
             (int)d, (float)scale, (float)vscale, rows_out(out, bh), out.stride(2), lp + bh * T,
             b0, b1);
    }
  });
  return {out, lse};
}

// The gradients of attention_forward's out for dout: (dq, dk, dv), laid out as (B, T, H, hs),
// or written into dqkv (B, T, 3, H, hs) where it is not empty.
std::vector<at::Tensor> attention_backward(at::Tensor q, at::Tensor k, at::Tensor v,
                                           at::Tensor out, at::Tensor dout, at::Tensor lse,
                                           int64_t seed, int64_t threshold, double scale,
                                           double vscale, at::Tensor dqkv) {
  check(q, k, v, threshold);
  check_heads(out, "out");
  check_heads(dout, "dout");
  TORCH_CHECK(out.sizes() == q.sizes() && dout.sizes() == q.sizes() && lse.is_contiguous(),
              "attention kernel: out and dout must have q's shape");
  int64_t B = q.size(0), H = q.size(1), T = q.size(2), S = k.size(2), d = q.size(3);
  at::Tensor dq, dk, dv;
  if (dqkv.numel()) {  // one (B, T, 3 H hs) gradient for the qkv projection's output
    TORCH_CHECK(T == S && dqkv.is_contiguous() && dqkv.scalar_type() == at::kBFloat16 &&
                    dqkv.numel() == 3 * B * T * H * d,
                "attention kernel: dqkv must be a contiguous (B, T, 3 H hs) bf16 tensor");
    auto parts = dqkv.view({B, T, 3, H, d});
    dq = parts.select(2, 0).transpose(1, 2);
    dk = parts.select(2, 1).transpose(1, 2);
    dv = parts.select(2, 2).transpose(1, 2);
  } else {
    dq = heads_like(q, T), dk = heads_like(k, S), dv = heads_like(v, S);
  }
  auto lp = lse.data_ptr<float>();
  Keep keep(seed, threshold);
  auto cols = keep.columns(S);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    Backward b((int)S, (int)d);
    for (int64_t bh = begin; bh < end; ++bh)
      b.head(rows(q, bh), rows(k, bh), rows(v, bh), rows(out, bh), rows(dout, bh), lp + bh * T,
             keep, cols.data(), bh * T, (int)T, (int)S, (int)d, (float)scale, (float)vscale,
             rows_out(dq, bh), dq.stride(2), rows_out(dk, bh), dk.stride(2), rows_out(dv, bh),
             dv.stride(2));
  });
  return {dq, dk, dv};
}

// decode.cpp's
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps, at::ScalarType dtype);
at::Tensor masked_attention(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor mask,
                            at::ScalarType dtype);
at::Tensor rope_store(at::Tensor qkv, at::Tensor cos, at::Tensor sin, at::Tensor k_cache,
                      at::Tensor v_cache, at::Tensor pos, int64_t H, int64_t Hkv,
                      at::ScalarType dtype);
at::Tensor int4_gemv(at::Tensor x, at::Tensor tiles, int64_t N, int64_t group);
at::Tensor int4_blocks(at::Tensor x, std::vector<at::Tensor> weights,
                       std::vector<at::Tensor> k_caches, std::vector<at::Tensor> v_caches,
                       at::Tensor cos, at::Tensor sin, at::Tensor pos, at::Tensor mask, int64_t H,
                       int64_t Hkv, double eps, int64_t group);

// The extension's functions: this file's, elementwise.cpp's and decode.cpp's.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attention_forward", &attention_forward, "causal attention with dropout, bf16: (out, lse)");
  m.def("attention_backward", &attention_backward, "its gradients: (dq, dk, dv)");
  m.def("dropout", &dropout, "x.to(dtype) * keep * scale, keep.h's mask (bf16 or fp32)");
  m.def("dropout_add", &dropout_add, "x + dropout(y), keep.h's mask (bf16 or fp32)");
  m.def("gelu_backward", &gelu_backward, "grad * GELU'(x), the erf form, bf16");
  m.def("layer_norm_forward", &layer_norm_forward, "layer norm, fp32 in, bf16 out");
  m.def("layer_norm_backward", &layer_norm_backward, "its gradients: (dx, dweight, dbias)");
  m.def("keep_mask", &keep_mask, "keep.h's mask of (seed, threshold), rows x cols, bool");
  m.def("rms_norm", &rms_norm, "RMSNorm in one pass, fp32 or bf16, fp32 weight");
  m.def("masked_attention", &masked_attention, "attention of a few rows under a bool mask, GQA");
  m.def("rope_store", &rope_store, "rotary q, k of one token per row; k, v into the cache");
  m.def("int4_gemv", &int4_gemv, "int4 weights (quant.gemv_tiles) x rows, activations as int8 per group");
  m.def("int4_blocks", &int4_blocks, "every pre-norm SwiGLU block of int4 layers, one token a row");
}
