// gemm and linear layers. fp32 matmuls go to oneDNN's sgemm (JIT, AVX2/AVX-512 chosen by
// oneDNN at run time, row-major). Called from inside an OpenMP region (attention heads), oneDNN
// runs single-threaded, which is what we want there.
#include <malloc.h>
#include <omp.h>
#include <oneapi/dnnl/dnnl.h>

#include <algorithm>
#include <type_traits>

#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/backend/cpu/vecmath.h"
#include "lmforge/core/dtype.h"
#include "lmforge/core/error.h"
#include "lmforge/core/tensor.h"  // oom_hint

namespace lmforge::cpu {

// oneDNN's sgemm mallocs its packing buffers on every call and frees them on return. glibc's
// default heap gives the freed top back to the kernel (brk, or madvise in a thread's arena) once
// it passes a trim threshold that depends on the allocation history, and every call then faults
// the buffers in again: a few hundred page faults per step or none, depending on what ran
// before. Freed memory stays in the heap instead (trimmed past 1 GiB), and allocations up to
// 64 MiB come from it (larger ones are lmforge's own, long-lived buffers): a step after the first
// touches no new memory. (Decoding's per-call buffers, the same.)
void keep_freed_heap() {
  static const bool kept = [] {
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
    mallopt(M_MMAP_THRESHOLD, 64 << 20);
    return true;
  }();
  (void)kept;
}

// Outside a parallel region, C is cut into one panel per thread (op(B)'s columns, or op(A)'s rows
// when C is taller than wide), each a single-threaded sgemm: oneDNN 2.6's own threading of an
// (N, T) product with few rows runs at half the panels' rate (Zen 4, 2 threads, GFLOP/s:
// 128 x 8192 x 2048 102 -> 170, 32 x 2048 x 2048 40 -> 107, 512 x 8192 x 2048 168 -> 204; as fast
// or faster at every training shape, in every transposition).
template <>
void gemm<float>(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                 int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  keep_freed_heap();
  auto sgemm = [&](int64_t m, int64_t n, const float* a, const float* b, float* c) {
    return static_cast<int>(
        dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', m, n, K, alpha, a, lda, b, ldb, beta, c, ldc));
  };
  const int threads = omp_in_parallel() ? 1 : omp_get_max_threads();
  int st = dnnl_success;
  if (threads > 1 && std::max(M, N) >= 32 * threads) {
    const bool by_cols = N >= M;
    const int64_t len = by_cols ? N : M, width = ((len + threads - 1) / threads + 15) / 16 * 16;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(max : st)
    for (int p = 0; p < threads; ++p) {
      const int64_t j0 = p * width, n = std::min(width, len - j0);
      if (n <= 0) continue;
      st = std::max(st, by_cols ? sgemm(M, n, A, tb ? B + j0 * ldb : B + j0, C + j0)
                                : sgemm(n, N, ta ? A + j0 : A + j0 * lda, B, C + j0 * ldc));
    }
  } else {
    st = sgemm(M, N, A, B, C);
  }
  if (st == dnnl_out_of_memory)  // its packing buffers
    fail("out of memory in a {}x{}x{} matmul; {}", M, N, K, oom_hint());
  LMF_CHECK(st == dnnl_success, "dnnl_sgemm failed ({}) M={} N={} K={}", st, M, N, K);
}

// Reference double gemm for gradient checks only (tiny shapes; speed is irrelevant here).
template <>
void gemm<double>(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A,
                  int64_t lda, const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      double acc = 0;
      for (int64_t k = 0; k < K; ++k) {
        double a = ta ? A[k * lda + i] : A[i * lda + k];
        double b = tb ? B[j * ldb + k] : B[k * ldb + j];
        acc += a * b;
      }
      C[i * ldc + j] = alpha * acc + (beta == 0 ? 0 : beta * C[i * ldc + j]);
    }
  }
}

template <typename T>
void linear_forward(T* out, const T* inp, const T* weight, const T* bias, int64_t N, int64_t C,
                    int64_t OC) {
  // out (N, OC) = inp (N, C) @ weight (OC, C)^T + bias (OC)
  if constexpr (std::is_same_v<T, float>)
    if (gemv_takes(N)) return gemv(N, OC, C, inp, C, weight, C, bias, false, out, OC);
  gemm<T>(false, true, N, OC, C, T(1), inp, C, weight, C, T(0), out, OC);
  if (bias) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; ++i)
      for (int64_t o = 0; o < OC; ++o) out[i * OC + o] += bias[o];
  }
}

template <typename T>
void linear_backward(T* dinp, T* dweight, T* dbias, const T* dout, const T* inp, const T* weight,
                     int64_t N, int64_t C, int64_t OC, bool dw_acc, bool dx_acc) {
  if (dinp) gemm<T>(false, false, N, C, OC, T(1), dout, OC, weight, C, T(dx_acc ? 1 : 0), dinp, C);
  if (dweight)
    gemm<T>(true, false, OC, C, N, T(1), dout, OC, inp, C, T(dw_acc ? 1 : 0), dweight, C);
  if (dbias) bias_grad(dbias, dout, N, OC);
}

// GCC 12 reports the intrinsics' deliberately undefined pass-through operands as
// maybe-uninitialized once inlined (as in adamw.cpp): off for the kernel below.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
namespace {
inline double widen(float x) { return x; }
inline double widen(double x) { return x; }
inline double widen(uint16_t x) { return bf16_to_fp32(x); }  // a bf16 output gradient

// acc[j] = sum over the N rows (ld apart) of x[j], j < nc <= 64, in row order in double lanes: the
// scalar loop's sums (fp32 and bf16 widen to double exactly), 8 columns per lane vector.
template <typename D>
LMF_AVX512 void column_sums_avx512(double* acc, const D* x, int64_t N, int64_t ld, int64_t nc) {
  __m512d a[8];
  for (int k = 0; k < 8; ++k) a[k] = _mm512_setzero_pd();
  const int quads = static_cast<int>((nc + 15) / 16);
  for (int64_t i = 0; i < N; ++i)
    for (int q = 0; q < quads; ++q) {
      const __m512 v = load16(x + i * ld + 16 * q, lanes(nc - 16 * q));  // masked lanes: zeros
      a[2 * q] = _mm512_add_pd(a[2 * q], lo_pd(v));
      a[2 * q + 1] = _mm512_add_pd(a[2 * q + 1], hi_pd(v));
    }
  double w[64];
  for (int k = 0; k < 8; ++k) _mm512_storeu_pd(w + 8 * k, a[k]);
  for (int64_t j = 0; j < nc; ++j) acc[j] = w[j];
}
}  // namespace
#pragma GCC diagnostic pop

template <typename T, typename D>
void bias_grad(T* dbias, const D* dout, int64_t N, int64_t OC, int64_t ld) {
  // Column sums in double, each column summed in row order by one thread: deterministic
  // whatever the thread count. Blocks of columns keep the row walk in cache lines.
  if (ld < 0) ld = OC;
  constexpr int64_t kCols = 64;
  const int64_t blocks = (OC + kCols - 1) / kCols;
#pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t o0 = blk * kCols, n = std::min(kCols, OC - o0);
    double acc[kCols] = {};
    if constexpr (std::is_same_v<T, float>) {
      if (has_avx512()) {
        column_sums_avx512(acc, dout + o0, N, ld, n);
        for (int64_t j = 0; j < n; ++j) dbias[o0 + j] += static_cast<T>(acc[j]);
        continue;
      }
    }
    for (int64_t i = 0; i < N; ++i) {
      const D* row = dout + i * ld + o0;
      for (int64_t j = 0; j < n; ++j) acc[j] += widen(row[j]);
    }
    for (int64_t j = 0; j < n; ++j) dbias[o0 + j] += static_cast<T>(acc[j]);
  }
}

#define LMF_INSTANTIATE(T)                                                                      \
  template void bias_grad<T, T>(T*, const T*, int64_t, int64_t, int64_t);                       \
  template void linear_forward<T>(T*, const T*, const T*, const T*, int64_t, int64_t, int64_t); \
  template void linear_backward<T>(T*, T*, T*, const T*, const T*, const T*, int64_t, int64_t,  \
                                   int64_t, bool, bool);
LMF_INSTANTIATE(float)
LMF_INSTANTIATE(double)
#undef LMF_INSTANTIATE
template void bias_grad<float, uint16_t>(float*, const uint16_t*, int64_t, int64_t, int64_t);

}  // namespace lmforge::cpu
