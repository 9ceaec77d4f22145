// Matrix-vector products of decoding (one to four rows of activations against a weight: a
// sequence, or a batch of them):
// C (M, N) = A (M, K) B (N, K)^T [+ bias], M <= kGemvMaxRows. They are bound by reading B once
// from memory, which oneDNN's GEMMs at M = 1 do at half the bandwidth or less (bf16 weights no
// faster than fp32 ones; measured with `lmforge bench matmul --shape 1xNxK`). Here each thread
// streams a contiguous band of B's rows, one row at a time against every row of A (one
// sequential stream: interleaving four rows' streams ran at 18-19 GB/s, one at 26-35, on a
// 2-core Zen 4), accumulating in fp32 vector lanes and summing the lanes once per output.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/backend/cpu/vecmath.h"
#include "lmforge/core/error.h"

// GCC 12 reports the intrinsics' deliberately undefined pass-through operands as
// maybe-uninitialized once inlined (as in matmul.cpp): off for this file's kernels.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace lmforge::cpu {

namespace {

constexpr int kUnroll = 4;  // vectors of K in flight per row of A

// Output n of each of the M rows of C from its kUnroll vectors of partial sums (+ bias; added to
// C with accumulate).
template <int M>
LMF_AVX512 void finish(const __m512 (&acc)[M][kUnroll], int64_t n, const float* bias,
                       bool accumulate, float* C, int64_t ldc) {
  for (int m = 0; m < M; ++m) {
    __m512 sum = acc[m][0];
    for (int u = 1; u < kUnroll; ++u) sum = _mm512_add_ps(sum, acc[m][u]);
    float v = _mm512_reduce_add_ps(sum);
    if (bias) v += bias[n];
    float& c = C[m * ldc + n];
    c = accumulate ? c + v : v;
  }
}

// Output n (one row of B) for the M rows of A: B's row streamed once, kUnroll vectors of 16
// elements at a time (B fp32 or bf16, widened exactly), partial sums in M x kUnroll lanes.
template <int M, typename TB>
LMF_AVX512 void row_avx512(const float* A, int64_t lda, const TB* B, int64_t ldb, int64_t K,
                           int64_t n, const float* bias, bool accumulate, float* C, int64_t ldc) {
  const TB* b = B + n * ldb;
  __m512 acc[M][kUnroll] = {};
  int64_t k = 0;
  for (; k + 16 * kUnroll <= K; k += 16 * kUnroll)
    for (int u = 0; u < kUnroll; ++u) {
      const __m512 bv = load16(b + k + 16 * u);
      for (int m = 0; m < M; ++m)
        acc[m][u] = _mm512_fmadd_ps(load16(A + m * lda + k + 16 * u), bv, acc[m][u]);
    }
  for (; k < K; k += 16) {
    const __mmask16 mk = lanes(K - k);
    const __m512 bv = load16(b + k, mk);
    for (int m = 0; m < M; ++m)
      acc[m][0] = _mm512_fmadd_ps(load16(A + m * lda + k, mk), bv, acc[m][0]);
  }
  finish<M>(acc, n, bias, accumulate, C, ldc);
}

LMF_AVX512_BF16 inline __m512bh bh(__m512i v) { return reinterpret_cast<__m512bh>(v); }

// The same on AVX512-BF16's dot products: A and B bf16, 32 elements of K per vector (pairs
// multiplied and summed into fp32 lanes, as oneDNN's bf16 kernels do).
template <int M>
LMF_AVX512_BF16 void row_dpbf16(const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb,
                                int64_t K, int64_t n, const float* bias, bool accumulate, float* C,
                                int64_t ldc) {
  const uint16_t* b = B + n * ldb;
  __m512 acc[M][kUnroll] = {};
  int64_t k = 0;
  for (; k + 32 * kUnroll <= K; k += 32 * kUnroll)
    for (int u = 0; u < kUnroll; ++u) {
      const __m512bh bv = bh(_mm512_loadu_si512(b + k + 32 * u));
      for (int m = 0; m < M; ++m)
        acc[m][u] =
            _mm512_dpbf16_ps(acc[m][u], bh(_mm512_loadu_si512(A + m * lda + k + 32 * u)), bv);
    }
  for (; k < K; k += 32) {
    const __mmask32 mk = K - k >= 32 ? ~__mmask32(0) : (__mmask32(1) << (K - k)) - 1;
    const __m512bh bv = bh(_mm512_maskz_loadu_epi16(mk, b + k));
    for (int m = 0; m < M; ++m)
      acc[m][0] =
          _mm512_dpbf16_ps(acc[m][0], bh(_mm512_maskz_loadu_epi16(mk, A + m * lda + k)), bv);
  }
  finish<M>(acc, n, bias, accumulate, C, ldc);
}

// Every row of B over the OpenMP threads in contiguous bands (each thread one sequential stream
// through B, which the hardware prefetchers follow best), row(M rows of A as a template
// argument, n).
template <typename Row>
void over_rows(int64_t M, int64_t N, const Row& row) {
  auto run = [&](auto rows) {
#pragma omp parallel for schedule(static) if (N > 64)
    for (int64_t n = 0; n < N; ++n) row(rows, n);
  };
  switch (M) {
    case 1:
      return run(std::integral_constant<int, 1>{});
    case 2:
      return run(std::integral_constant<int, 2>{});
    case 3:
      return run(std::integral_constant<int, 3>{});
    default:
      return run(std::integral_constant<int, 4>{});
  }
}

}  // namespace

bool gemv_takes(int64_t M) { return M >= 1 && M <= kGemvMaxRows && has_avx512(); }

void gemv(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
          const float* bias, bool accumulate, float* C, int64_t ldc) {
  LMF_CHECK(gemv_takes(M), "gemv: {} rows, or no AVX-512", M);
  over_rows(M, N, [&](auto rows, int64_t n) {
    row_avx512<decltype(rows)::value>(A, lda, B, ldb, K, n, bias, accumulate, C, ldc);
  });
}

void gemv_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B,
               int64_t ldb, const float* bias, bool accumulate, float* C, int64_t ldc) {
  LMF_CHECK(gemv_takes(M), "gemv_bf16: {} rows, or no AVX-512", M);
  if (has_avx512_bf16() && bf16_matmul_native()) {  // as gemm_bf16's other native products
    over_rows(M, N, [&](auto rows, int64_t n) {
      row_dpbf16<decltype(rows)::value>(A, lda, B, ldb, K, n, bias, accumulate, C, ldc);
    });
    return;
  }
  // Without AVX512-BF16, or where bf16 products run widened (Bf16Matmul): A widened once, B in
  // registers as it streams by (exact: the same products, accumulated in fp32).
  std::vector<float> a(static_cast<size_t>(M * K));
  for (int64_t m = 0; m < M; ++m) from_bf16_serial(a.data() + m * K, A + m * lda, K);
  over_rows(M, N, [&](auto rows, int64_t n) {
    row_avx512<decltype(rows)::value>(a.data(), K, B, ldb, K, n, bias, accumulate, C, ldc);
  });
}

}  // namespace lmforge::cpu

#pragma GCC diagnostic pop
