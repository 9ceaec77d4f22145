// CPU reference kernels, llm.c style: outputs first, saved activations passed explicitly, a `d`
// prefix for gradients. Every backward ACCUMULATES (+=) into input and parameter gradients, so
// callers zero gradient buffers once per step; the one exception is softmax_xent_backward,
// which writes dlogits (it may alias logits). Templated on T = float (training) or double
// (finite-difference gradient checks). Row-wise statistics (norms, softmax) accumulate in
// double; reductions over rows are split by column so results do not depend on thread count.
//
// These are called through backend/ops.h, which checks shapes and dispatches on device/dtype.
#pragma once

#include <atomic>
#include <cstdint>

#include "lmforge/backend/attn_score.h"
#include "lmforge/backend/gate.h"

namespace lmforge::cpu {

// Token ids checked inside an OpenMP loop. An exception must not leave a parallel region (the
// process would end in std::terminate), so the loop notes the lowest bad position and skips it,
// and raise() throws after the loop (positions count from the pointer given):
//   IdCheck check;
//   #pragma omp parallel for
//   for (i ...) { if (!check.ok(ids, i, V)) continue; ... }
//   check.raise(ids, "token id", V);
struct IdCheck {
  std::atomic<int64_t> at{-1};
  bool ok(const int32_t* ids, int64_t i, int64_t V) {
    if (ids[i] >= 0 && ids[i] < V) return true;
    int64_t seen = at.load(std::memory_order_relaxed);  // keep the lowest: the same message
    while ((seen < 0 || i < seen) && !at.compare_exchange_weak(seen, i)) {
    }
    return false;
  }
  void raise(const int32_t* ids, const char* what, int64_t V) const;
};

// Keeps freed memory in glibc's heap and serves allocations up to 64 MiB from it (once per
// process; cpu/matmul.cpp says why): called by the fp32 gemm and by decoding.
void keep_freed_heap();

// C (M, N) = alpha * op(A) op(B) + beta * C, row-major. float goes to oneDNN's sgemm; double is
// a plain loop (used only by gradient checks on tiny shapes).
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
          int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc);

template <typename T>
void linear_forward(T* out, const T* inp, const T* weight, const T* bias, int64_t N, int64_t C,
                    int64_t OC);
template <typename T>
void linear_backward(T* dinp, T* dweight, T* dbias, const T* dout, const T* inp, const T* weight,
                     int64_t N, int64_t C, int64_t OC, bool dweight_accumulate = true,
                     bool dinp_accumulate = true);

// dbias (OC) += column sums of dout (N, OC; rows ld apart, OC when ld < 0), in double,
// deterministic whatever the threads. D = T, or uint16_t for a bf16 dout into fp32 dbias.
template <typename T, typename D = T>
void bias_grad(T* dbias, const D* dout, int64_t N, int64_t OC, int64_t ld = -1);

// bf16 mixed precision (cpu/bf16.cpp). dst = bf16(src), round to nearest even.
void to_bf16(uint16_t* dst, const float* src, int64_t n);
// The same without an OpenMP region, for short rows inside a parallel one.
void to_bf16_serial(uint16_t* dst, const float* src, int64_t n);
// fp32 = bf16, exact; over OpenMP threads when n is large (the _serial forms: inside parallel
// regions, where even an inactive nested region costs a team's set-up per call).
void from_bf16(float* dst, const uint16_t* src, int64_t n);
void from_bf16_serial(float* dst, const uint16_t* src, int64_t n);
// fp32 masters of bf16 values (AdamWOptions::fp32_masters): each master[i] that does not round
// (fp32_to_bf16_ftz) to value[i] becomes value[i], widened; the others are kept.
void keep_master(float* master, const uint16_t* value, int64_t n);
// How bf16 products run (gemm_bf16, gemm_bf16_tile, the weight-gradient kernel): natively
// (oneDNN's bf16 brgemm, lmforge's AMX and dot-product kernels) where the CPU multiplies bf16
// faster than fp32 (CpuFeatures::fast_bf16_products), else as fp32 GEMMs on the operands widened
// to fp32 (exact: the same products, accumulated in fp32; attention then takes its fp32 tiles).
// LMFORGE_BF16_MATMUL=native|widened overrides the CPU's choice; set_bf16_matmul (tests) too,
// kAuto restoring it.
enum class Bf16Matmul { kAuto, kNative, kWidened };
void set_bf16_matmul(Bf16Matmul mode);
bool bf16_matmul_native();
struct Bf16MatmulScope {  // set_bf16_matmul for a scope, kAuto again at its end
  explicit Bf16MatmulScope(Bf16Matmul mode) { set_bf16_matmul(mode); }
  ~Bf16MatmulScope() { set_bf16_matmul(Bf16Matmul::kAuto); }
  Bf16MatmulScope(const Bf16MatmulScope&) = delete;
  Bf16MatmulScope& operator=(const Bf16MatmulScope&) = delete;
};
// C (M, N) fp32 = op(A) op(B) [+ bias (N)] or C += op(A) op(B) (accumulate), A and B bf16 with
// fp32 accumulation, through oneDNN's matmul (AMX / AVX512-BF16 brgemm chosen at run time).
void gemm_bf16(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const uint16_t* A,
               int64_t lda, const uint16_t* B, int64_t ldb, const float* bias, bool accumulate,
               float* C, int64_t ldc);
// The same for small products computed by each OpenMP thread of a tiled kernel (attention),
// called from inside its parallel region: single-threaded, no lock (small_gemm_bf16 where the
// product fits, else per-thread oneDNN primitives). Only where the CPU has real bf16 products
// (AVX512-BF16 or AMX): gemm_bf16_tile_available().
bool gemm_bf16_tile_available();
void gemm_bf16_tile(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const uint16_t* A,
                    int64_t lda, const uint16_t* B, int64_t ldb, bool accumulate, float* C,
                    int64_t ldc);
// Matrix-vector products (cpu/gemv.cpp): C (M, N) = A (M, K) B (N, K)^T [+ bias (N)], or C +=
// with accumulate, for M <= kGemvMaxRows rows of A (decoding's activations against a weight),
// bound by streaming B once. fp32, or A and B bf16 (AVX512-BF16's dot products where bf16
// products run natively, bf16_matmul_native; else B widened in registers) with fp32 accumulation.
// linear_forward and gemm_bf16 send their (!trans_a, trans_b) products of such M here where
// gemv_takes(M): AVX-512 present (oneDNN otherwise).
constexpr int64_t kGemvMaxRows = 4;
bool gemv_takes(int64_t M);
void gemv(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
          const float* bias, bool accumulate, float* C, int64_t ldc);
void gemv_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B,
               int64_t ldb, const float* bias, bool accumulate, float* C, int64_t ldc);
// The weight-gradient product of our own (cpu/amx.cpp): C (M, N) fp32 = A^T B, or += with
// accumulate, A (K, M) and B (K, N) bf16 row-major, K short (the tokens of a step), on AMX tiles
// or, without AMX, with AVX512-BF16 dot products. gemm_bf16 sends its (trans_a, !trans_b) fp32
// products here where weight_grad_gemm_takes(M, N, K): K <= kWeightGradMaxK, the caller outside an
// OpenMP parallel region, bf16 products native (bf16_matmul_native), and AMX-BF16 present and
// granted by the OS, or else AVX512-BF16 and a gradient of at least 2^24 elements (an LM head's).
constexpr int64_t kWeightGradMaxK = 1024;
bool amx_gemm_available();
bool weight_grad_gemm_takes(int64_t M, int64_t N, int64_t K);
// gemm_bf16_tile's products where they fit (M <= 128, N <= 256, K <= 256: attention's tiles), run
// by the calling thread on AMX tiles, or with AVX512-BF16 dot products on CPUs without AMX; false
// (nothing done) past those sizes or with neither.
bool small_gemm_bf16(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const uint16_t* A,
                     int64_t lda, const uint16_t* B, int64_t ldb, bool accumulate, float* C,
                     int64_t ldc);
void gemm_bf16_weight_grad(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda,
                           const uint16_t* B, int64_t ldb, bool accumulate, float* C, int64_t ldc);
// The linear layer with a bf16 copy of the weight: activations and output gradients are rounded
// to bf16 on the way into the matmul; out, dinp, dweight, dbias stay fp32 (+= as above; dweight
// written instead when !dweight_accumulate, here and in linear_backward: the step's first
// gradient of a weight, see Param::grad_unwritten; dinp when !dinp_accumulate).
void linear_forward_bf16(float* out, const float* inp, const uint16_t* weight, const float* bias,
                         int64_t N, int64_t C, int64_t OC);
void linear_backward_bf16(float* dinp, float* dweight, float* dbias, const float* dout,
                          const float* inp, const uint16_t* weight, int64_t N, int64_t C,
                          int64_t OC, bool dweight_accumulate = true, bool dinp_accumulate = true);
// The same with the input already in bf16 (bf16 activations: the norms and activation functions
// write their matmul inputs in bf16), so nothing is converted on its way in.
void linear_forward_bf16(float* out, const uint16_t* inp, const uint16_t* weight, const float* bias,
                         int64_t N, int64_t C, int64_t OC);
void linear_backward_bf16(float* dinp, float* dweight, float* dbias, const float* dout,
                          const uint16_t* inp, const uint16_t* weight, int64_t N, int64_t C,
                          int64_t OC, bool dweight_accumulate = true, bool dinp_accumulate = true);
// And with the output gradient already in bf16 (rows ld >= OC apart); dbias (may be null) +=
// the column sums of the bf16 values.
void linear_backward_bf16_dout(float* dinp, float* dweight, float* dbias, const uint16_t* dout,
                               int64_t ld, const uint16_t* inp, const uint16_t* weight, int64_t N,
                               int64_t C, int64_t OC, bool dweight_accumulate = true,
                               bool dinp_accumulate = true);
// bf16 matmul outputs (bf16 activations): out (N, OC) = bf16(inp @ weight^T + bias), the fp32
// accumulator plus the fp32 bias rounded once to nearest even, as to_bf16 rounds; the input bf16
// or fp32 (rounded on its way in, as above).
// C (M, N) bf16 = bf16(op(A) op(B) [+ bias]): the fp32 result rounded once (bf16 activations).
void gemm_bf16(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const uint16_t* A,
               int64_t lda, const uint16_t* B, int64_t ldb, const float* bias, uint16_t* C,
               int64_t ldc);
void linear_forward_bf16(uint16_t* out, const uint16_t* inp, const uint16_t* weight,
                         const float* bias, int64_t N, int64_t C, int64_t OC);
// The backward with dinp in bf16, WRITTEN (not +=) as bf16(dout @ weight) whatever
// dinp_accumulate: the attention output's gradient under bf16 activations, which cuDNN reads as it
// is.
void linear_backward_bf16(uint16_t* dinp, float* dweight, float* dbias, const float* dout,
                          const uint16_t* inp, const uint16_t* weight, int64_t N, int64_t C,
                          int64_t OC, bool dweight_accumulate = true, bool dinp_accumulate = true);
void linear_forward_bf16(uint16_t* out, const float* inp, const uint16_t* weight, const float* bias,
                         int64_t N, int64_t C, int64_t OC);

// W is T, or uint16_t for bf16 tables (bf16 master weights), widened exactly.
// pos (B*T, optional): the position of each token for wpe (else t); each in [0, rows of wpe).
// Vocabulary parallelism: wte's V rows are ids [v0, v0 + V) of a vocabulary of vocab_total (0:
// V); a token outside them reads a zero row (forward) and adds nothing (backward).
template <typename T, typename W>
void embedding_forward(T* out, const int32_t* tokens, const W* wte, const W* wpe, int64_t B,
                       int64_t T_, int64_t C, int64_t V, const int32_t* pos = nullptr,
                       int64_t v0 = 0, int64_t vocab_total = 0);
template <typename T>
void embedding_backward(T* dwte, T* dwpe, const T* dout, const int32_t* tokens, int64_t B,
                        int64_t T_, int64_t C, int64_t V, const int32_t* pos = nullptr,
                        int64_t v0 = 0, int64_t vocab_total = 0);

template <typename T>
void layernorm_forward(T* out, T* mean, T* rstd, const T* inp, const T* weight, const T* bias,
                       int64_t N, int64_t C, double eps);
template <typename T>
void layernorm_backward(T* dinp, T* dweight, T* dbias, const T* dout, const T* inp, const T* weight,
                        const T* mean, const T* rstd, int64_t N, int64_t C);

// RMSNorm over N rows of C. Row i lives at (i / group) * stride + (i % group) * C: group = 1,
// stride = C for a contiguous (N, C) tensor; group = heads, stride = the qkv row width for
// per-head q/k norms (Qwen3) reading heads in place. Each row scales by offset + weight (Gemma's
// RMSNorms: 1 + w, added in fp32 as transformers adds it).
inline int64_t row_offset(int64_t i, int64_t C, int64_t group, int64_t stride) {
  return group == 1 ? i * stride : (i / group) * stride + (i % group) * C;
}
template <typename T>
void rmsnorm_forward(T* out, T* rstd, const T* inp, const T* weight, int64_t N, int64_t C,
                     double eps, int64_t group, int64_t stride, double offset = 0);
template <typename T>
void rmsnorm_backward(T* dinp, T* dweight, const T* dout, const T* inp, const T* weight,
                      const T* rstd, int64_t N, int64_t C, int64_t group, int64_t stride,
                      double offset = 0);

// Rotary embedding (HF "rotate_half" layout: pairs (i, i + HS/2)) applied in place to n_heads
// heads of HS at x + (b*T + t)*row_stride + h*HS, position pos0 + t. cos/sin are (T_max, HS/2).
// backward is the inverse rotation, applied in place to the gradient.
template <typename T>
// pos (B*T, optional): each token's position (a row of the tables); else pos0 + t.
void rope_forward(T* x, const float* cos, const float* sin, int64_t B, int64_t T_, int64_t n_heads,
                  int64_t HS, int64_t row_stride, int64_t pos0, const int32_t* pos = nullptr);
template <typename T>
void rope_backward(T* dx, const float* cos, const float* sin, int64_t B, int64_t T_,
                   int64_t n_heads, int64_t HS, int64_t row_stride, int64_t pos0,
                   const int32_t* pos = nullptr);
// The same on bf16 rows (bf16 activations): each row's heads widened, rotated in fp32 and rounded
// back, one row per OpenMP task.
void rope_bf16(uint16_t* x, const float* cos, const float* sin, int64_t B, int64_t T_,
               int64_t n_heads, int64_t HS, int64_t row_stride, int64_t pos0, const int32_t* pos,
               bool backward);

// Causal self-attention with grouped-query heads, tiled with an online softmax (FlashAttention):
// nothing of size (T, T) is stored. qkv is (B, T, (NH + 2*NKV) * HS) laid out as
// [q heads | k heads | v heads]; query head h reads kv head h / (NH / NKV). out is (B, T, NH*HS);
// lse (B, NH, T) keeps each row's logsumexp of the scaled scores for backward, which recomputes
// the probabilities from it and needs the forward's out. window > 0: query t sees keys
// (t - window, t] only (sliding window); 0 = all of [0, t]. backward adds into dqkv. Unlike the
// other softmaxes here, T = float keeps the online softmax's running max/sum in fp32.
template <typename T>
// doc_start (B*T, optional): packed rows; query t sees keys [doc_start[t], t] only, with
// doc_start[t] in [0, t] and never decreasing along a row. score: the scale and soft-capping
// (backend/attn_score.h).
void attention_forward(T* out, T* lse, const T* qkv, int64_t B, int64_t T_, int64_t NH, int64_t NKV,
                       int64_t HS, int64_t window, const int32_t* doc_start = nullptr,
                       const AttnScore& score = {});
template <typename T>
void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* out, const T* lse, int64_t B,
                        int64_t T_, int64_t NH, int64_t NKV, int64_t HS, int64_t window,
                        const int32_t* doc_start = nullptr, const AttnScore& score = {});
// The same on bf16 qkv and out (bf16 activations) with bf16 tile products (gemm_bf16_tile: only
// where gemm_bf16_tile_available()), head size at most kMaxBf16HeadSize. backward adds into an
// fp32 dqkv; dout is fp32 or bf16.
constexpr int64_t kMaxBf16HeadSize = 256;
// Whether ops take these kernels for bf16 attention on the CPU: the tile products available, the
// head size within kMaxBf16HeadSize, and not switched off (tests: set_bf16_attention_tiles(false)
// sends bf16 attention to the fp32 kernels on widened copies, as on CPUs without the products).
bool bf16_attention_tiles(int64_t HS);
void set_bf16_attention_tiles(bool on);
void attention_forward_bf16(uint16_t* out, float* lse, const uint16_t* qkv, int64_t B, int64_t T_,
                            int64_t NH, int64_t NKV, int64_t HS, int64_t window,
                            const int32_t* doc_start = nullptr, const AttnScore& score = {});
template <typename DO>
void attention_backward_bf16(float* dqkv, const DO* dout, const uint16_t* qkv, const uint16_t* out,
                             const float* lse, int64_t B, int64_t T_, int64_t NH, int64_t NKV,
                             int64_t HS, int64_t window, const int32_t* doc_start = nullptr,
                             const AttnScore& score = {});
// Inference with a KV cache: n new query rows (stride q_stride) at positions pos0.. attend to
// kcache/vcache (NKV, T_max, HS) positions [0, pos0 + i] (within the window, if any). out is
// (n, NH*HS). KV = float, or uint16_t: a bf16 cache, widened as it is read.
template <typename KV>
void attention_decode(float* out, const float* q, int64_t q_stride, const KV* kcache,
                      const KV* vcache, int64_t n, int64_t pos0, int64_t T_max, int64_t NH,
                      int64_t NKV, int64_t HS, int64_t window, const AttnScore& score = {});

// Soft-capping (Gemma 2; cpu/softcap.cpp): x = cap tanh(in_scale x / cap) in place on x[0, n) by
// the calling thread, with deriv[j] = 1 - tanh^2 unless deriv is null. softcap_rows: the same on
// (rows, cols) over OpenMP threads (the LM head's logits). softcap_grad_rows: dx = dy (1 -
// (y / cap)^2) from the capped y, dy and y (rows, cols), dx rows ldd apart, fp32 (may be dy or
// y) or bf16 (rounded once).
template <typename T>
void softcap_serial(T* x, T* deriv, int64_t n, T cap, T in_scale = 1);
template <typename T>  // float, double
void softcap_rows(T* x, int64_t rows, int64_t cols, T cap);
template <typename D, typename T>  // (D, T): (float, float), (uint16_t, float), (double, double)
void softcap_grad_rows(D* dx, int64_t ldd, const T* dy, const T* y, int64_t rows, int64_t cols,
                       T cap);

template <typename T>
void gelu_forward(T* out, const T* inp, int64_t n);
template <typename T>
void gelu_backward(T* dinp, const T* inp, const T* dout, int64_t n);
// inp (N, 2F) = [gate | up]; out (N, F) = act(gate) * up (backend/gate.h).
template <typename T>
void glu_forward(T* out, const T* inp, int64_t N, int64_t F, Gate gate);
template <typename T>
void glu_backward(T* dinp, const T* inp, const T* dout, int64_t N, int64_t F, Gate gate);
// The four on bf16 activations (a bf16 input; a bf16 output, or a bf16 dinp written, not added
// to): the fp32 kernels' arithmetic on the widened input, rounded to nearest even, in one pass.
// false (nothing done) where the CPU has no AVX512-BF16: the caller widens into fp32 blocks.
bool gelu_forward_bf16(uint16_t* out, const uint16_t* inp, int64_t n);
bool gelu_backward_bf16(uint16_t* dinp, const uint16_t* inp, const float* dout, int64_t n);
bool glu_forward_bf16(uint16_t* out, const uint16_t* inp, int64_t N, int64_t F, Gate gate);
bool glu_backward_bf16(uint16_t* dinp, const uint16_t* inp, const float* dout, int64_t N, int64_t F,
                       Gate gate);

// losses[i] = logsumexp(logits[i]) - logits[i, targets[i]], or 0 where targets[i] == ignore_index.
template <typename T>
void softmax_xent_forward(T* losses, const T* logits, const int32_t* targets, int64_t N, int64_t V,
                          int32_t ignore_index, double* lse_sq_sum);
// dlogits = dloss * (softmax(logits) - onehot(target)); rows with ignore_index get 0.
template <typename T>
void softmax_xent_backward(T* dlogits, const T* logits, const int32_t* targets, T dloss, int64_t N,
                           int64_t V, int32_t ignore_index, double z_loss);
// Both in one pass over each row (training): losses and lse_sq_sum as softmax_xent_forward,
// dlogits (may alias logits) as softmax_xent_backward, from one logsumexp per row. row_scale
// (optional, N): row i's gradient is scaled by dloss * row_scale[i] (per-sequence objectives).
template <typename T>
void softmax_xent_forward_backward(T* losses, T* dlogits, const T* logits, const int32_t* targets,
                                   T dloss, int64_t N, int64_t V, int32_t ignore_index,
                                   double z_loss, double* lse_sq_sum,
                                   const float* row_scale = nullptr);

// The same two writing dlogits in bf16, rows ld >= V apart (the padding not written): each value
// the fp32 kernel's rounded as to_bf16 rounds it (the LM head's backward matmul input).
void softmax_xent_backward_bf16(uint16_t* dlogits, int64_t ld, const float* logits,
                                const int32_t* targets, float dloss, int64_t N, int64_t V,
                                int32_t ignore_index, double z_loss);
void softmax_xent_forward_backward_bf16(float* losses, uint16_t* dlogits, int64_t ld,
                                        const float* logits, const int32_t* targets, float dloss,
                                        int64_t N, int64_t V, int32_t ignore_index, double z_loss,
                                        double* lse_sq_sum, const float* row_scale = nullptr);

// Vocabulary parallelism: logits (N, V) are the columns [v0, v0 + V) of a vocabulary of
// vocab_total split over P ranks. softmax_xent_stats writes per row (stats: N x 3 doubles) the
// max of its logits, the sum of exp(logit - max) and the target's logit where the target is among
// the columns (else 0); zeros where the target is ignored. softmax_xent_parallel takes every
// rank's stats (all_stats: P x N x 3) and writes the row's loss lse - x_y and lse^2 sum as
// softmax_xent_forward, and with dlogits (fp32, may alias logits; or bf16 rows ld apart) the
// gradient of its columns as softmax_xent_forward_backward.
void softmax_xent_stats(double* stats, const float* logits, const int32_t* targets, int64_t N,
                        int64_t V, int32_t ignore_index, int64_t v0, int64_t vocab_total);
void softmax_xent_parallel(float* losses, double* lse_sq_sum, float* dlogits, uint16_t* dlogits16,
                           int64_t ld, const float* logits, const int32_t* targets,
                           const double* all_stats, int64_t P, float dloss, int64_t N, int64_t V,
                           int32_t ignore_index, double z_loss, int64_t v0,
                           const float* row_scale = nullptr);

// Knowledge distillation per row with a target: losses = (1 - alpha) CE + alpha T^2 KL(q || p^T)
// with q = softmax(teacher / T), p^T = softmax(logits / T); kl = the KL term; dlogits (may alias
// logits) = dloss d losses / d logits. Rows with ignore_index get 0.
void softmax_distill_forward_backward(float* losses, float* kl, float* dlogits, const float* logits,
                                      const float* teacher, const int32_t* targets, float dloss,
                                      int64_t N, int64_t V, int32_t ignore_index, double alpha,
                                      double temperature);

// The same over a vocabulary split by columns (backend/distill_stats.h): logits and teacher (N, V)
// are the columns [v0, v0 + V) of vocab_total. softmax_distill_stats writes each row's
// kDistillStats statistics; softmax_distill_parallel, from every rank's (all_stats: P x N x
// kDistillStats), the losses, kl and (when dlogits is given) the gradient of these columns for
// rows [r0, r0 + n) of N: dlogits holds those rows alone (row r0 first; may alias logits' when
// r0 = 0, n = N), every other array all N.
void softmax_distill_stats(double* stats, const float* logits, const float* teacher,
                           const int32_t* targets, int64_t N, int64_t V, int32_t ignore_index,
                           int64_t v0, int64_t vocab_total, double temperature);
void softmax_distill_parallel(float* losses, float* kl, float* dlogits, const float* logits,
                              const float* teacher, const int32_t* targets, const double* all_stats,
                              int64_t P, float dloss, int64_t N, int64_t r0, int64_t n, int64_t V,
                              int32_t ignore_index, double alpha, double temperature, int64_t v0);

template <typename T>
void add(T* out, const T* a, const T* b, int64_t n);
// out = a + b with b bf16, widened exactly (a residual branch's bf16 matmul output).
void add(float* out, const float* a, const uint16_t* b, int64_t n);
// ops::dropout_forward / dropout_backward: element i kept when sr_bits(key, i) >= cut, scaled by
// `scale`; the input x (fp32) or h (bf16), one of them.
void dropout_forward(float* out, const float* x, const uint16_t* h, int64_t n, uint32_t cut,
                     float scale, uint32_t key);
void dropout_backward(float* dinp, const float* g, int64_t n, uint32_t cut, float scale,
                      uint32_t key);
template <typename T>
void accumulate(T* dst, const T* src, int64_t n);
template <typename T>
void scale(T* x, T s, int64_t n);
// y = a y + b x (Muon's momentum and update).
template <typename T>
void axpby(T* y, T a, const T* x, T b, int64_t n);
// Sum of squares in double, in fixed-size blocks so the result is independent of thread count.
template <typename T>
double sum_squares(const T* x, int64_t n);

// One AdamW step (Loshchilov & Hutter 2019), in the order torch.optim.AdamW applies it:
// p *= 1 - lr*wd; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2;
// p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps), with bc_i = 1 - beta_i^step.
// p16, if not null, receives bf16(p) in the same pass (the weights' copy for bf16 matmuls).
// Vectorized with AVX-512 where present, bit-identical to the portable loop.
// g is multiplied by fp32(grad_scale) as it is read (gradient clipping), the rounding of scaling
// the gradient in place first.
void adamw_update(float* p, const float* g, float* m, float* v, uint16_t* p16, int64_t n, double lr,
                  double beta1, double beta2, double eps, double weight_decay, int64_t step,
                  double grad_scale = 1.0);
// bf16 master weights (train.master_weights: bf16): the same update of p (bf16, widened exactly),
// written back rounded stochastically with the bits sr_bits(key, index0 + i) of
// core/stochastic_round.h; m and v as adamw_update. AVX-512 where present, bit-identical to the
// scalar definition.
void adamw_update_sr(uint16_t* p, const float* g, float* m, float* v, int64_t n, double lr,
                     double beta1, double beta2, double eps, double weight_decay, int64_t step,
                     double grad_scale, uint32_t key, uint32_t index0);

}  // namespace lmforge::cpu
