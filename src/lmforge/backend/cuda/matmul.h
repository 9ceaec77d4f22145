// Matmuls and linear layers on the GPU, the twins of cpu::gemm / cpu::linear_* (cpu/kernels.h)
// with the same row-major semantics, through cuBLASLt. Every pointer is device memory; every call
// is queued on cuda::stream() and returns without waiting for the GPU.
//
//   cuda::gemm(false, true, N, OC, C, 1.0f, inp, C, weight, C, 0.0f, out, OC);  // out = inp W^T
//   cuda::linear_backward(dinp, dweight, dbias, dout, inp, weight, N, C, OC);    // all +=
//
// Plans (cuBLASLt matmul descriptor, layouts and the heuristic's algorithm) are cached per shape,
// dtype, epilogue and operand alignment, so a training step queries no heuristic and allocates
// nothing after its first: one cuBLASLt handle and one 32 MiB workspace serve every call, and
// the bf16 conversion / bias-gradient scratch grows during the first step only.
//
// Numerics: fp32 gemms use CUBLAS_COMPUTE_32F (true fp32 FMA, no TF32), so they match the CPU's
// sgemm to accumulation-order rounding. bf16 gemms read bf16 A/B and accumulate and write fp32.
// bias_grad sums columns in double, in a fixed order: bitwise reproducible run to run.
#pragma once

#include <cstdint>
#include <string>

namespace lmforge::cuda {

// C (M, N) = alpha * op(A) op(B) + beta * C, row-major, fp32. beta == 0: C is not read.
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// out (N, OC) = inp (N, C) @ weight (OC, C)^T + bias (OC); bias may be null.
void linear_forward(float* out, const float* inp, const float* weight, const float* bias, int64_t N,
                    int64_t C, int64_t OC);
// dinp (N, C) += dout @ weight; dweight (OC, C) += dout^T @ inp; dbias (OC) += column sums of
// dout. Any of dinp, dweight, dbias may be null (not wanted).
void linear_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                     const float* weight, int64_t N, int64_t C, int64_t OC);

// dbias (OC) += column sums of dout (N, OC), accumulated in double in a fixed order.
void bias_grad(float* dbias, const float* dout, int64_t N, int64_t OC);
// The same of a bf16 dout with rows ld >= OC apart.
void bias_grad(float* dbias, const uint16_t* dout, int64_t N, int64_t OC, int64_t ld);

// dst = bf16(src), round to nearest even with denormals flushed to zero: bit-identical to
// cpu::to_bf16 (fp32_to_bf16_ftz), NaN stays NaN.
void to_bf16(uint16_t* dst, const float* src, int64_t n);
// fp32 = bf16, exact.
void from_bf16(float* dst, const uint16_t* src, int64_t n);
// As cpu::keep_master: master[i] = value[i] widened wherever master[i] does not round to it.
void keep_master(float* master, const uint16_t* value, int64_t n);

// C (M, N) fp32 = op(A) op(B) [+ bias (N)], or C += op(A) op(B) when accumulate; A and B bf16,
// fp32 accumulation. bias and accumulate are exclusive (as cpu::gemm_bf16).
void gemm_bf16(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const uint16_t* A,
               int64_t lda, const uint16_t* B, int64_t ldb, const float* bias, bool accumulate,
               float* C, int64_t ldc);

// The linear layer with a bf16 copy of the weight: inp and dout are rounded to bf16 on the way
// into the matmul (scratch owned here); out, dinp, dweight, dbias stay fp32 (+= as above).
void linear_forward_bf16(float* out, const float* inp, const uint16_t* weight, const float* bias,
                         int64_t N, int64_t C, int64_t OC, int64_t ldc = 0);
void linear_backward_bf16(float* dinp, float* dweight, float* dbias, const float* dout,
                          const float* inp, const uint16_t* weight, int64_t N, int64_t C,
                          int64_t OC);
// The same with the input already in bf16 (bf16 activations: the norms and activation functions
// write their matmul inputs in bf16), so nothing is converted on its way in.
// ldc: out's row stride (>= OC; 0 = OC), e.g. the LM head's logits padded to 16-byte rows.
void linear_forward_bf16(float* out, const uint16_t* inp, const uint16_t* weight, const float* bias,
                         int64_t N, int64_t C, int64_t OC, int64_t ldc = 0);
void linear_backward_bf16(float* dinp, float* dweight, float* dbias, const float* dout,
                          const uint16_t* inp, const uint16_t* weight, int64_t N, int64_t C,
                          int64_t OC);
// And with the output gradient already in bf16 (rows ld >= OC apart); dbias (may be null) += its
// column sums.
void linear_backward_bf16_dout(float* dinp, float* dweight, float* dbias, const uint16_t* dout,
                               int64_t ld, const uint16_t* inp, const uint16_t* weight, int64_t N,
                               int64_t C, int64_t OC);
// bf16 matmul outputs: out (N, OC) bf16 = the fp32 result (accumulator + fp32 bias) rounded once
// to nearest even (cuBLASLt's bf16 D; an fp32 gemm and to_bf16 where it has no algorithm), from a
// bf16 input or an fp32 one rounded on its way in.
// C (M, N) bf16 = bf16(op(A) op(B) [+ bias]), the fp32 result rounded once (ldc == N where
// cuBLASLt has no algorithm for it).
void gemm_bf16(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const uint16_t* A,
               int64_t lda, const uint16_t* B, int64_t ldb, const float* bias, uint16_t* C,
               int64_t ldc);
void linear_forward_bf16(uint16_t* out, const uint16_t* inp, const uint16_t* weight,
                         const float* bias, int64_t N, int64_t C, int64_t OC);
// The backward with dinp in bf16, WRITTEN (not +=) as bf16(dout @ weight) (the attention
// output's gradient under bf16 activations, which cuDNN reads as it is).
void linear_backward_bf16(uint16_t* dinp, float* dweight, float* dbias, const float* dout,
                          const uint16_t* inp, const uint16_t* weight, int64_t N, int64_t C,
                          int64_t OC);
void linear_forward_bf16(uint16_t* out, const float* inp, const uint16_t* weight, const float* bias,
                         int64_t N, int64_t C, int64_t OC);

// The cuBLASLt plans made so far (one per shape, layout and alignment), and how many of them run
// on the slow paths: the plain fallback kernel, or the bias added outside the epilogue. For tests
// (aligned shapes must stay on cuBLASLt) and diagnostics.
struct MatmulPlanCounts {
  int64_t plans = 0, fallback = 0, unfused_bias = 0;
};
MatmulPlanCounts matmul_plan_counts();

namespace detail {
// Small kernels of matmul_kernels.cu, launched on stream() (for matmul.cpp only).
// dst rows of ld elements = bf16(src (rows, cols)), as to_bf16; the padding is not written.
void to_bf16_rows(uint16_t* dst, int64_t ld, const float* src, int64_t rows, int64_t cols);
// C (M, N) rows = bias (N), or 0 when bias is null.
void fill_rows(float* C, int64_t M, int64_t N, int64_t ldc, const float* bias);
// C (M, N) *= beta; beta == 0 writes 0 (NaN in C does not survive, as with a gemm's beta = 0).
void scale_rows(float* C, int64_t M, int64_t N, int64_t ldc, float beta);
// C = alpha op(A) op(B) + beta C [+ bias (N)] by a plain shared-memory tiled kernel (fp32 FMA,
// k in order), for the rare operands cuBLASLt has no algorithm for (an odd alignment); A and B
// are fp32, or bf16 (uint16_t) when bf16. M, N, K > 0.
void gemm_fallback(bool bf16, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                   float alpha, const void* A, int64_t lda, const void* B, int64_t ldb, float beta,
                   float* C, int64_t ldc, const float* bias);
// dbias (OC) += column sums of dout (N, OC; rows ld apart; fp32 or bf16): chunks partial sums per
// column into partial (chunks, OC) doubles, then each column's partials added in chunk order.
void bias_grad(float* dbias, const float* dout, int64_t N, int64_t OC, int64_t ld, double* partial,
               int64_t chunks);
void bias_grad(float* dbias, const uint16_t* dout, int64_t N, int64_t OC, int64_t ld,
               double* partial, int64_t chunks);

}  // namespace detail

}  // namespace lmforge::cuda
