// gemm and linear layers through cuBLASLt (see matmul.h for the interface and numerics).
//
// Row-major on a column-major library: a row-major (r, c) matrix with leading dimension ld is, byte
// for byte, the column-major (c, r) matrix with the same ld, i.e. its transpose. So the row-major
// product C = op(A) op(B), an (M, N) matrix, is stored exactly like the column-major
// C^T = op(B)^T op(A)^T, an (N, M) matrix. cuBLASLt is therefore asked for the column-major
// D (m = N, n = M, k = K) = op_a(X) op_b(Y) with X = our B, Y = our A, and
//   X's stored layout: column-major (N, K) when B is (K, N) row-major (op_a = N), or (K, N) when
//                      B is stored transposed (N, K) row-major (op_a = T); ld = ldb;
//   Y's stored layout: column-major (K, M) when A is (M, K) row-major (op_b = N), or (M, K) when A
//                      is stored transposed (op_b = T); ld = lda;
//   D: column-major (N, M), ld = ldc.
// The bias epilogue adds a vector with one entry per row of D, i.e. per column of our C: the
// row-major broadcast bias (N) that linear_forward wants.
//
// Plans: one cuBLASLt matmul descriptor, three layouts and the heuristic's best algorithm per key
// (dtype, transposes, shape, leading dimensions, bias or not, and the alignment of each pointer,
// capped at 256 bytes: the heuristic assumes 256-byte aligned operands unless told otherwise,
// and an activation slice need not be). The cache lives for the process; nothing is freed at
// exit (the driver may be gone by then). A plan's algorithm is fixed once chosen, and cuBLASLt
// gives bitwise identical results for a fixed algorithm with the same toolkit on the same
// architecture and SM count, one stream at a time (cuBLAS "Results reproducibility").
// Fallbacks, so that no shape or alignment is an error: a bias the epilogue cannot take is
// broadcast into C first (then beta = 1); an operand no algorithm accepts goes to a plain tiled
// kernel (matmul_kernels.cu), with a one-line warning per plan.
//
// One handle and one 32 MiB workspace for every call: correct because every call is queued on the
// one compute stream (a second stream would need its own workspace).
#include "lmforge/backend/cuda/matmul.h"

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <mutex>
#include <type_traits>
#include <unordered_map>

#include "lmforge/backend/cuda/check.h"
#include "lmforge/backend/cuda/runtime.h"
#include "lmforge/core/error.h"

#define LMF_CUBLAS(call)                                                             \
  do {                                                                               \
    cublasStatus_t s_ = (call);                                                      \
    if (s_ != CUBLAS_STATUS_SUCCESS)                                                 \
      ::lmforge::fail("cuBLASLt error {} ({}) in {} at {}:{}", static_cast<int>(s_), \
                      cublasLtGetStatusString(s_), #call, __FILE__, __LINE__);       \
  } while (0)

namespace lmforge::cuda {

namespace detail {}  // namespace detail

namespace {

// 32 MiB: NVIDIA's recommended cuBLAS workspace on Hopper (the largest split-K / stream-K
// configurations need it); smaller GPUs use less of it.
constexpr size_t kWorkspaceBytes = size_t(32) << 20;

enum class Dtype : uint8_t { kF32, kBf16 };

void* scratch(int slot, size_t bytes);  // below

struct Key {
  Dtype dtype;
  bool ta, tb, bias;
  bool d16;  // C/D bf16 (bf16 matmul outputs), else fp32
  int64_t M, N, K, lda, ldb, ldc;
  uint32_t align_a, align_b, align_c, align_bias;
  bool operator==(const Key&) const = default;
};

struct KeyHash {
  size_t operator()(const Key& k) const {
    size_t h =
        static_cast<size_t>(k.dtype) | (k.ta << 2) | (k.tb << 3) | (k.bias << 4) | (k.d16 << 5);
    for (int64_t v : {k.M, k.N, k.K, k.lda, k.ldb, k.ldc, int64_t(k.align_a), int64_t(k.align_b),
                      int64_t(k.align_c), int64_t(k.align_bias)})
      h = h * 1000003u ^ std::hash<int64_t>()(v);
    return h;
  }
};

struct Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t x = nullptr, y = nullptr, d = nullptr;  // X = our B, Y = our A, D = C
  cublasLtMatmulAlgo_t algo{};
  // A bias the epilogue could not take (no algorithm for it) is added by filling C's rows with
  // it and running the gemm with beta = 1.
  bool bias_epilogue = false;
  // cuBLASLt has no algorithm at all (an operand aligned to less than its element needs, say):
  // detail::gemm_fallback runs it, slowly but correctly.
  bool fallback = false;
  // The heuristic's answer is no promise: cublasLtMatmul may still refuse the configuration
  // (NOT_SUPPORTED / INVALID_VALUE). Until a call has succeeded, a refusal downgrades the plan
  // (the bias epilogue first, then the fallback kernel) instead of failing the run.
  bool checked = false;
  cublasStatus_t why = CUBLAS_STATUS_SUCCESS;  // the heuristic's last answer (for the warning)
};

// The largest power of two (at most 256) that divides the address.
uint32_t alignment(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 256;
  while (al > 1 && a % al != 0) al /= 2;
  return al;
}

class Lt {
 public:
  static Lt& get() {
    static Lt* lt = new Lt;  // never destroyed: see the file comment
    return *lt;
  }

  // C = alpha op(A) op(B) + beta C [+ bias]; M, N, K > 0 and bias implies beta == 0. d16: C is
  // bf16 (beta == 0), the fp32 result rounded once; where cuBLASLt has no algorithm for that (or
  // for its fp32 bias), the fp32 result goes through scratch and cuda::to_bf16.
  void run(Dtype dt, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const void* A,
           int64_t lda, const void* B, int64_t ldb, float beta, void* C, int64_t ldc,
           const float* bias, bool d16 = false) {
    Key key{dt,
            ta,
            tb,
            bias != nullptr,
            d16,
            M,
            N,
            K,
            lda,
            ldb,
            ldc,
            alignment(A),
            alignment(B),
            alignment(C),
            bias ? alignment(bias) : 0u};
    // A bf16 output's epilogue adds a bf16 bias: cuBLASLt takes no fp32 bias with a bf16 D (its
    // bias type is D's, but for FP8 kernels; INVALID_VALUE on CUDA 13), and PyTorch's autocast
    // rounds the bias to bf16 as well. Rounded into scratch slot 4 on the stream, before the gemm.
    const void* epi_bias = bias;
    if (d16 && bias) {
      auto* b16 = static_cast<uint16_t*>(scratch(4, size_t(N) * 2));
      to_bf16(b16, bias, N);
      epi_bias = b16;
      key.align_bias = alignment(b16);
    }
    std::unique_lock<std::mutex> lock(mu_);
    Plan& p = plan(key, epi_bias);
    if (d16 && (p.fallback || (bias && !p.bias_epilogue))) {
      lock.unlock();
      LMF_CHECK(ldc == N, "cuda gemm: a bf16 output needs ldc == N");
      auto* c32 = static_cast<float*>(scratch(3, size_t(M) * N * sizeof(float)));
      run(dt, ta, tb, M, N, K, alpha, A, lda, B, ldb, 0.0f, c32, N, bias);
      to_bf16(static_cast<uint16_t*>(C), c32, M * N);
      return;
    }
    if (p.fallback) {
      detail::gemm_fallback(dt == Dtype::kBf16, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta,
                            static_cast<float*>(C), ldc, bias);
      return;
    }
    if (bias && p.bias_epilogue) {
      // The descriptor is shared by every call with this key: point it at this call's bias.
      LMF_CUBLAS(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &epi_bias,
                                                sizeof(epi_bias)));
    }
    const float beta_in = beta;
    if (bias && !p.bias_epilogue) {
      detail::fill_rows(static_cast<float*>(C), M, N, ldc, bias);
      beta = 1.0f;
    }
    const cublasStatus_t st =
        cublasLtMatmul(handle_, p.op, &alpha, B, p.x, A, p.y, &beta, C, p.d, C, p.d, &p.algo,
                       workspace_, kWorkspaceBytes, static_cast<cudaStream_t>(stream()));
    if (!p.checked && (st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_INVALID_VALUE)) {
      // A refused call queues nothing (a filled C is filled again): downgrade, then run again.
      downgrade(p, key, st);
      lock.unlock();
      run(dt, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta_in, C, ldc, bias, d16);
      return;
    }
    LMF_CUBLAS(st);
    p.checked = true;
  }

  // How many plans exist, and how many of them left cuBLASLt (the fallback kernel) or its bias
  // epilogue: the tests assert that aligned shapes stay on the fast paths.
  MatmulPlanCounts counts() {
    std::lock_guard<std::mutex> lock(mu_);
    MatmulPlanCounts c;
    for (const auto& [k, p] : cache_) {
      ++c.plans;
      c.fallback += p.fallback;
      c.unfused_bias += k.bias && !p.fallback && !p.bias_epilogue;
    }
    return c;
  }

 private:
  Lt() {
    LMF_CUBLAS(cublasLtCreate(&handle_));
    workspace_ = cuda::malloc(kWorkspaceBytes);
  }

  Plan& plan(const Key& k, const void* bias) {
    auto it = cache_.find(k);
    if (it != cache_.end()) return it->second;

    const cudaDataType_t ab = k.dtype == Dtype::kBf16 ? CUDA_R_16BF : CUDA_R_32F;
    Plan p;
    // fp32 and bf16 both accumulate in fp32 and scale in fp32; CUBLAS_COMPUTE_32F keeps fp32
    // inputs in fp32 (no TF32), as the CPU's sgemm.
    LMF_CUBLAS(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const int32_t op_x = k.tb ? CUBLAS_OP_T : CUBLAS_OP_N;  // see the file comment
    const int32_t op_y = k.ta ? CUBLAS_OP_T : CUBLAS_OP_N;
    LMF_CUBLAS(
        cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_x, sizeof(op_x)));
    LMF_CUBLAS(
        cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_y, sizeof(op_y)));
    LMF_CUBLAS(cublasLtMatrixLayoutCreate(&p.x, ab, k.tb ? k.K : k.N, k.tb ? k.N : k.K, k.ldb));
    LMF_CUBLAS(cublasLtMatrixLayoutCreate(&p.y, ab, k.ta ? k.M : k.K, k.ta ? k.K : k.M, k.lda));
    LMF_CUBLAS(cublasLtMatrixLayoutCreate(&p.d, k.d16 ? CUDA_R_16BF : CUDA_R_32F, k.N, k.M, k.ldc));

    cublasLtMatmulPreference_t pref = preference(k);
    bool found = false;
    if (k.bias) {
      const int32_t epi = CUBLASLT_EPILOGUE_BIAS;
      const int32_t bias_type = k.d16 ? CUDA_R_16BF : CUDA_R_32F;
      LMF_CUBLAS(
          cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
      LMF_CUBLAS(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                                                &bias_type, sizeof(bias_type)));
      // The heuristic reads the bias pointer's alignment from the descriptor.
      LMF_CUBLAS(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias,
                                                sizeof(bias)));
      found = p.bias_epilogue = heuristic(p, pref);
      if (!found) no_epilogue(p);
    }
    if (!found) found = heuristic(p, pref);
    LMF_CUBLAS(cublasLtMatmulPreferenceDestroy(pref));
    p.fallback = !found;
    if (p.fallback)  // once per key: a slow path worth knowing about, not an error
      fmt::print(stderr,
                 "warning: cuBLASLt has no algorithm for the {} gemm M={} N={} K={} (trans_a={}, "
                 "trans_b={}, lda={}, ldb={}, ldc={}, alignments A/B/C/bias {}/{}/{}/{} bytes; "
                 "{}); using {}\n",
                 k.dtype == Dtype::kBf16 ? (k.d16 ? "bf16 (bf16 output)" : "bf16") : "fp32", k.M,
                 k.N, k.K, k.ta, k.tb, k.lda, k.ldb, k.ldc, k.align_a, k.align_b, k.align_c,
                 k.align_bias,
                 p.why == CUBLAS_STATUS_SUCCESS ? "no result" : cublasLtGetStatusName(p.why),
                 k.d16 ? "an fp32 gemm and a rounding pass" : "the plain CUDA fallback kernel");
    else if (k.d16 && k.bias && !p.bias_epilogue)
      fmt::print(stderr,
                 "warning: cuBLASLt takes no fp32 bias with a bf16 output for M={} N={} K={}; "
                 "using an fp32 gemm and a rounding pass\n",
                 k.M, k.N, k.K);
    return cache_.emplace(k, p).first->second;
  }

  cublasLtMatmulPreference_t preference(const Key& k) {
    cublasLtMatmulPreference_t pref = nullptr;
    LMF_CUBLAS(cublasLtMatmulPreferenceCreate(&pref));
    const uint64_t ws = kWorkspaceBytes;
    LMF_CUBLAS(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                    &ws, sizeof(ws)));
    const uint32_t al[4] = {k.align_b, k.align_a, k.align_c, k.align_c};  // X, Y, C, D
    const cublasLtMatmulPreferenceAttributes_t al_attr[4] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    for (int i = 0; i < 4; ++i)
      LMF_CUBLAS(cublasLtMatmulPreferenceSetAttribute(pref, al_attr[i], &al[i], sizeof(al[i])));
    if (k.d16) {
      // Split-K partial sums reduced in the output type (in place in D, or bf16 in the
      // workspace) would round more than once: a bf16 output is the fp32 sum rounded once.
      const uint32_t schemes =
          CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
      LMF_CUBLAS(cublasLtMatmulPreferenceSetAttribute(
          pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &schemes, sizeof(schemes)));
    }
    return pref;
  }

  void no_epilogue(Plan& p) {
    const int32_t none = CUBLASLT_EPILOGUE_DEFAULT, default_type = -1;
    const float* null_bias = nullptr;
    LMF_CUBLAS(
        cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &none, sizeof(none)));
    LMF_CUBLAS(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                                              &default_type, sizeof(default_type)));
    LMF_CUBLAS(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &null_bias,
                                              sizeof(null_bias)));
    p.bias_epilogue = false;
  }

  // cublasLtMatmul refused the heuristic's algorithm (status st): without the bias epilogue if the
  // plan had one (the bias then goes into C first), else the fallback kernel. One warning line.
  void downgrade(Plan& p, const Key& k, cublasStatus_t st) {
    const bool had_epilogue = p.bias_epilogue;
    if (had_epilogue) {
      no_epilogue(p);
      cublasLtMatmulPreference_t pref = preference(k);
      p.fallback = !heuristic(p, pref);
      LMF_CUBLAS(cublasLtMatmulPreferenceDestroy(pref));
    } else {
      p.fallback = true;
    }
    fmt::print(stderr,
               "warning: cuBLASLt refused its own algorithm for the {} gemm M={} N={} K={} "
               "({}); using {}\n",
               k.dtype == Dtype::kBf16 ? (k.d16 ? "bf16 (bf16 output)" : "bf16") : "fp32", k.M, k.N,
               k.K, cublasLtGetStatusName(st),
               k.d16        ? "an fp32 gemm and a rounding pass"
               : p.fallback ? "the plain CUDA fallback kernel"
                            : "the gemm without its bias epilogue");
  }

  // The heuristic's first choice into p.algo; false when it has none for this configuration.
  bool heuristic(Plan& p, cublasLtMatmulPreference_t pref) {
    cublasLtMatmulHeuristicResult_t r{};
    int n = 0;
    const cublasStatus_t st =
        cublasLtMatmulAlgoGetHeuristic(handle_, p.op, p.x, p.y, p.d, p.d, pref, 1, &r, &n);
    // NOT_SUPPORTED: no heuristic for this configuration; INVALID_VALUE: a layout or alignment
    // combination the library rejects (or a mistake in the descriptors: the warning names the
    // status). Either way the fallback kernel computes it.
    p.why = st;
    if (st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_INVALID_VALUE) return false;
    LMF_CUBLAS(st);
    if (n >= 1) p.why = r.state;
    if (n < 1 || r.state != CUBLAS_STATUS_SUCCESS || r.workspaceSize > kWorkspaceBytes)
      return false;
    p.algo = r.algo;
    return true;
  }

  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  std::mutex mu_;
  std::unordered_map<Key, Plan, KeyHash> cache_;
};

// Device scratch that grows to the largest request and is then reused: bf16 copies of
// activations (slots 0, 1), the bias gradient's partial sums (slot 2), fp32 results on their
// way to a bf16 output (slot 3) and a bf16 output's bf16 bias (slot 4). Growing waits for the
// stream, since queued kernels may still read the old buffer; after the first step it never grows.
void* scratch(int slot, size_t bytes) {
  static std::mutex mu;
  static GrowingBuffer buf[5];
  std::lock_guard<std::mutex> lock(mu);
  return buf[slot].get(bytes);
}

void check_gemm_args(const char* what, bool ta, bool tb, int64_t M, int64_t N, int64_t K,
                     int64_t lda, int64_t ldb, int64_t ldc) {
  LMF_CHECK(M >= 0 && N >= 0 && K >= 0, "{}: M={} N={} K={}", what, M, N, K);
  if (M == 0 || N == 0 || K == 0) return;  // the library is not called
  LMF_CHECK(lda >= std::max<int64_t>(1, ta ? M : K) && ldb >= std::max<int64_t>(1, tb ? K : N) &&
                ldc >= std::max<int64_t>(1, N),
            "{}: leading dimensions lda={} ldb={} ldc={} too small for M={} N={} K={} "
            "(trans_a={}, trans_b={})",
            what, lda, ldb, ldc, M, N, K, ta, tb);
}

}  // namespace

MatmulPlanCounts matmul_plan_counts() { return Lt::get().counts(); }

void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  check_gemm_args("cuda::gemm", trans_a, trans_b, M, N, K, lda, ldb, ldc);
  if (M == 0 || N == 0) return;
  if (K == 0) {  // an empty sum: C = beta C
    detail::scale_rows(C, M, N, ldc, beta);
    return;
  }
  Lt::get().run(Dtype::kF32, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc,
                nullptr);
}

void gemm_bf16(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const uint16_t* A,
               int64_t lda, const uint16_t* B, int64_t ldb, const float* bias, bool accumulate,
               float* C, int64_t ldc) {
  check_gemm_args("cuda::gemm_bf16", trans_a, trans_b, M, N, K, lda, ldb, ldc);
  LMF_CHECK(!(bias && accumulate), "cuda::gemm_bf16: bias with accumulate");
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate) detail::fill_rows(C, M, N, ldc, bias);
    return;
  }
  Lt::get().run(Dtype::kBf16, trans_a, trans_b, M, N, K, 1.0f, A, lda, B, ldb,
                accumulate ? 1.0f : 0.0f, C, ldc, bias);
}

void linear_forward(float* out, const float* inp, const float* weight, const float* bias, int64_t N,
                    int64_t C, int64_t OC) {
  // out (N, OC) = inp (N, C) @ weight (OC, C)^T + bias (OC), the bias in the epilogue
  if (N == 0 || OC == 0) return;
  if (C == 0) {
    detail::fill_rows(out, N, OC, OC, bias);
    return;
  }
  check_gemm_args("cuda::linear_forward", false, true, N, OC, C, C, C, OC);
  Lt::get().run(Dtype::kF32, false, true, N, OC, C, 1.0f, inp, C, weight, C, 0.0f, out, OC, bias);
}

namespace {
// Chunks of >= 128 rows, at most 64: with OC = 768 that is up to 24 x 64 blocks, enough to fill
// the GPU, and the chunking depends on the shape alone (so does the summation order).
int64_t bias_chunks(int64_t N) { return std::clamp<int64_t>((N + 127) / 128, 1, 64); }
}  // namespace

void bias_grad(float* dbias, const float* dout, int64_t N, int64_t OC) {
  if (N <= 0 || OC <= 0) return;
  const int64_t chunks = bias_chunks(N);
  auto* partial = static_cast<double*>(scratch(2, size_t(chunks) * OC * sizeof(double)));
  detail::bias_grad(dbias, dout, N, OC, OC, partial, chunks);
}

void bias_grad(float* dbias, const uint16_t* dout, int64_t N, int64_t OC, int64_t ld) {
  if (N <= 0 || OC <= 0) return;
  const int64_t chunks = bias_chunks(N);
  auto* partial = static_cast<double*>(scratch(2, size_t(chunks) * OC * sizeof(double)));
  detail::bias_grad(dbias, dout, N, OC, ld, partial, chunks);
}

void linear_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                     const float* weight, int64_t N, int64_t C, int64_t OC) {
  // dinp (N, C) += dout (N, OC) @ weight (OC, C); dweight (OC, C) += dout^T @ inp (N, C)
  if (dinp) gemm(false, false, N, C, OC, 1.0f, dout, OC, weight, C, 1.0f, dinp, C);
  if (dweight) gemm(true, false, OC, C, N, 1.0f, dout, OC, inp, C, 1.0f, dweight, C);
  if (dbias) bias_grad(dbias, dout, N, OC);
}

namespace {
// An LM head's vocabulary need not be a multiple of the GEMM tiles (GPT-2's 50257 is odd): its
// GEMMs run as an aligned part of the first OC / 64 * 64 rows of the weight and a narrow tail of
// the rest (nanoGPT and llm.c pad the vocabulary to 50304 for the same reason; here the model's
// shapes stay as they are). Small OC: one GEMM.
// f(r0, n) for the weight's rows [r0, r0 + n): the aligned part, then the tail if any.
template <typename F>
void vocab_parts(int64_t OC, F&& f) {
  const int64_t n1 = OC >= 4096 ? OC / 64 * 64 : OC;
  f(0, n1);
  if (n1 < OC) f(n1, OC - n1);
}
}  // namespace

void linear_forward_bf16(float* out, const uint16_t* inp, const uint16_t* weight, const float* bias,
                         int64_t N, int64_t C, int64_t OC, int64_t ldc) {
  if (ldc <= 0) ldc = OC;
  vocab_parts(OC, [&](int64_t r0, int64_t n) {
    gemm_bf16(false, true, N, n, C, inp, C, weight + r0 * C, C, bias ? bias + r0 : nullptr, false,
              out + r0, ldc);
  });
}

void linear_forward_bf16(float* out, const float* inp, const uint16_t* weight, const float* bias,
                         int64_t N, int64_t C, int64_t OC, int64_t ldc) {
  auto* x = static_cast<uint16_t*>(scratch(0, std::max<size_t>(1, size_t(N) * C) * 2));
  to_bf16(x, inp, N * C);
  linear_forward_bf16(out, x, weight, bias, N, C, OC, ldc);
}

void gemm_bf16(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const uint16_t* A,
               int64_t lda, const uint16_t* B, int64_t ldb, const float* bias, uint16_t* C,
               int64_t ldc) {
  check_gemm_args("cuda::gemm_bf16", trans_a, trans_b, M, N, K, lda, ldb, ldc);
  if (M == 0 || N == 0) return;
  if (K == 0) {  // the bias alone, rounded
    LMF_CHECK(ldc == N, "cuda::gemm_bf16: a bf16 output needs ldc == N");
    auto* c32 = static_cast<float*>(scratch(3, size_t(M) * N * sizeof(float)));
    detail::fill_rows(c32, M, N, N, bias);
    to_bf16(C, c32, M * N);
    return;
  }
  Lt::get().run(Dtype::kBf16, trans_a, trans_b, M, N, K, 1.0f, A, lda, B, ldb, 0.0f, C, ldc, bias,
                /*d16=*/true);
}

void linear_forward_bf16(uint16_t* out, const uint16_t* inp, const uint16_t* weight,
                         const float* bias, int64_t N, int64_t C, int64_t OC) {
  gemm_bf16(false, true, N, OC, C, inp, C, weight, C, bias, out, OC);
}

void linear_forward_bf16(uint16_t* out, const float* inp, const uint16_t* weight, const float* bias,
                         int64_t N, int64_t C, int64_t OC) {
  auto* x = static_cast<uint16_t*>(scratch(0, std::max<size_t>(1, size_t(N) * C) * 2));
  to_bf16(x, inp, N * C);
  linear_forward_bf16(out, x, weight, bias, N, C, OC);
}

namespace {
// dout rounded into scratch for the GEMMs; dinp fp32 (+=) or bf16 (written); dbias from the fp32
// dout.
template <typename DinT>
void linear_backward_rounding_dout(DinT* dinp, float* dweight, float* dbias, const float* dout,
                                   const uint16_t* inp, const uint16_t* weight, int64_t N,
                                   int64_t C, int64_t OC) {
  if (dinp || dweight) {
    // bf16(dout) with rows padded to 16 bytes: with GPT-2's vocabulary (OC = 50257) the LM head's
    // rows would be 2-byte aligned, and Hopper's fast GEMM kernels want 16-byte strides (llm.c pads
    // the vocabulary to 50304 for the same reason). The padding is never read (K, M = OC).
    const int64_t ld = (OC + 7) / 8 * 8;
    auto* d = static_cast<uint16_t*>(scratch(0, std::max<size_t>(1, size_t(N) * ld) * 2));
    if (ld == OC)
      to_bf16(d, dout, N * OC);
    else
      detail::to_bf16_rows(d, ld, dout, N, OC);
    if constexpr (std::is_same_v<DinT, float>) {
      linear_backward_bf16_dout(dinp, dweight, nullptr, d, ld, inp, weight, N, C, OC);
    } else {
      if (dinp) gemm_bf16(false, false, N, C, OC, d, ld, weight, C, nullptr, dinp, C);
      linear_backward_bf16_dout(nullptr, dweight, nullptr, d, ld, inp, weight, N, C, OC);
    }
  }
  if (dbias) bias_grad(dbias, dout, N, OC);
}
}  // namespace

void linear_backward_bf16(float* dinp, float* dweight, float* dbias, const float* dout,
                          const uint16_t* inp, const uint16_t* weight, int64_t N, int64_t C,
                          int64_t OC) {
  linear_backward_rounding_dout(dinp, dweight, dbias, dout, inp, weight, N, C, OC);
}

void linear_backward_bf16(uint16_t* dinp, float* dweight, float* dbias, const float* dout,
                          const uint16_t* inp, const uint16_t* weight, int64_t N, int64_t C,
                          int64_t OC) {
  linear_backward_rounding_dout(dinp, dweight, dbias, dout, inp, weight, N, C, OC);
}

void linear_backward_bf16_dout(float* dinp, float* dweight, float* dbias, const uint16_t* dout,
                               int64_t ld, const uint16_t* inp, const uint16_t* weight, int64_t N,
                               int64_t C, int64_t OC) {
  // dinp: the sum over OC as the aligned part plus the tail; dweight: its rows likewise.
  if (dinp)
    vocab_parts(OC, [&](int64_t r0, int64_t n) {
      gemm_bf16(false, false, N, C, n, dout + r0, ld, weight + r0 * C, C, nullptr, true, dinp, C);
    });
  if (dweight)
    vocab_parts(OC, [&](int64_t r0, int64_t n) {
      gemm_bf16(true, false, n, C, N, dout + r0, ld, inp, C, nullptr, true, dweight + r0 * C, C);
    });
  if (dbias) bias_grad(dbias, dout, N, OC, ld);
}

void linear_backward_bf16(float* dinp, float* dweight, float* dbias, const float* dout,
                          const float* inp, const uint16_t* weight, int64_t N, int64_t C,
                          int64_t OC) {
  uint16_t* x = nullptr;
  if (dweight) {  // slot 1: slot 0 holds bf16(dout)
    x = static_cast<uint16_t*>(scratch(1, std::max<size_t>(1, size_t(N) * C) * 2));
    to_bf16(x, inp, N * C);
  }
  linear_backward_bf16(dinp, dweight, dbias, dout, x, weight, N, C, OC);
}

}  // namespace lmforge::cuda
