// Matrix-vector products of decoding (one to four rows of activations against a weight):
// C (M, N) = A (M, K) B (N, K)^T [+ bias], M <= kGemvMaxRows. They are bound by reading B once
// from memory, which oneDNN's GEMMs at M = 1 do at half the bandwidth or less (bf16 weights no
// faster than fp32 ones; measured with `lmforge bench matmul --shape 1xNxK`). Here each thread
// streams a contiguous band of B's rows, four at a time against every row of A, accumulating in
// fp32 vector lanes and summing the lanes once per output.
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

constexpr int kRowsB = 4;  // B's rows per block

// Outputs of B's rows n0 .. n0 + nb - 1 (nb <= 4; the missing rows read row n0 again and are
// discarded) for the M rows of A: 16 elements of K per step, B fp32 or bf16 (widened exactly).
template <int M, typename TB>
LMF_AVX512 void block_avx512(const float* A, int64_t lda, const TB* B, int64_t ldb, int64_t K,
                             int64_t n0, int64_t nb, const float* bias, bool accumulate, float* C,
                             int64_t ldc) {
  const TB* b[kRowsB];
  for (int r = 0; r < kRowsB; ++r) b[r] = B + (n0 + (r < nb ? r : 0)) * ldb;
  __m512 acc[M][kRowsB];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < kRowsB; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mk = lanes(K - k);
    __m512 bv[kRowsB];
    for (int r = 0; r < kRowsB; ++r) bv[r] = load16(b[r] + k, mk);
    for (int m = 0; m < M; ++m) {
      const __m512 av = load16(A + m * lda + k, mk);
      for (int r = 0; r < kRowsB; ++r) acc[m][r] = _mm512_fmadd_ps(av, bv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < nb; ++r) {
      float v = _mm512_reduce_add_ps(acc[m][r]);
      if (bias) v += bias[n0 + r];
      float& c = C[m * ldc + n0 + r];
      c = accumulate ? c + v : v;
    }
}

// The same on AVX512-BF16's dot products: A and B bf16, 32 elements of K per step (pairs
// multiplied and summed into fp32 lanes, as oneDNN's bf16 kernels do).
template <int M>
LMF_AVX512_BF16 void block_dpbf16(const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb,
                                  int64_t K, int64_t n0, int64_t nb, const float* bias,
                                  bool accumulate, float* C, int64_t ldc) {
  const uint16_t* b[kRowsB];
  for (int r = 0; r < kRowsB; ++r) b[r] = B + (n0 + (r < nb ? r : 0)) * ldb;
  __m512 acc[M][kRowsB];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < kRowsB; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const __mmask32 mk = K - k >= 32 ? ~__mmask32(0) : (__mmask32(1) << (K - k)) - 1;
    __m512bh bv[kRowsB];
    for (int r = 0; r < kRowsB; ++r)
      bv[r] = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(mk, b[r] + k));
    for (int m = 0; m < M; ++m) {
      const __m512bh av = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(mk, A + m * lda + k));
      for (int r = 0; r < kRowsB; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], av, bv[r]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < nb; ++r) {
      float v = _mm512_reduce_add_ps(acc[m][r]);
      if (bias) v += bias[n0 + r];
      float& c = C[m * ldc + n0 + r];
      c = accumulate ? c + v : v;
    }
}

// Every block of B's rows over the OpenMP threads (contiguous bands: each thread streams its own
// part of B), block(M rows of A as a template argument, n0, nb).
template <typename Block>
void over_blocks(int64_t M, int64_t N, const Block& block) {
  const int64_t blocks = (N + kRowsB - 1) / kRowsB;
  auto run = [&](auto rows) {
#pragma omp parallel for schedule(static) if (blocks > 1)
    for (int64_t i = 0; i < blocks; ++i)
      block(rows, i * kRowsB, std::min<int64_t>(kRowsB, N - i * kRowsB));
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
  over_blocks(M, N, [&](auto rows, int64_t n0, int64_t nb) {
    block_avx512<decltype(rows)::value>(A, lda, B, ldb, K, n0, nb, bias, accumulate, C, ldc);
  });
}

void gemv_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B,
               int64_t ldb, const float* bias, bool accumulate, float* C, int64_t ldc) {
  LMF_CHECK(gemv_takes(M), "gemv_bf16: {} rows, or no AVX-512", M);
  if (has_avx512_bf16()) {
    over_blocks(M, N, [&](auto rows, int64_t n0, int64_t nb) {
      block_dpbf16<decltype(rows)::value>(A, lda, B, ldb, K, n0, nb, bias, accumulate, C, ldc);
    });
    return;
  }
  // Without AVX512-BF16: A widened once (exact), B widened in registers as it streams by.
  std::vector<float> a(static_cast<size_t>(M * K));
  for (int64_t m = 0; m < M; ++m) from_bf16_serial(a.data() + m * K, A + m * lda, K);
  over_blocks(M, N, [&](auto rows, int64_t n0, int64_t nb) {
    block_avx512<decltype(rows)::value>(a.data(), K, B, ldb, K, n0, nb, bias, accumulate, C, ldc);
  });
}

}  // namespace lmforge::cpu

#pragma GCC diagnostic pop
