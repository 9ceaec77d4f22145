// Causal grouped-query self-attention through cuDNN's fused flash attention (the cuDNN 9 backend
// graph API, cudnn_graph.h; no cudnn_frontend): bf16 Q/K/V/O on the tensor cores, fp32 softmax
// statistics. The bf16 path of the attention op under mixed precision (ops::attention_forward /
// attention_backward with bf16 = true on a CUDA tensor); the fp32 kernels of attention.h stay the
// fp32 path and the fallback.
//
//   if (cuda::cudnn_attention_supported(B, T, NH, NKV, HS, window) &&
//       cuda::cudnn_attention_forward(out, lse, qkv, B, T, NH, NKV, HS)) { /* done */ }
//   else cuda::attention_forward(out, lse, qkv, B, T, NH, NKV, HS, window);
//
// Same fp32 interface and semantics as cuda::attention_forward / attention_backward (window 0):
// qkv (B, T, (NH + 2*NKV) * HS) = [q heads | k heads | v heads], out (B, T, NH*HS), lse (B, NH, T)
// the natural-log logsumexp of each row of the scaled scores (scale 1/sqrt(HS)), backward adds
// into dqkv. Inside, qkv (and out, dout) are rounded to bf16 into device scratch of the same
// interleaved layout; Q, K, V, O, dO, dQ, dK, dV are 4-D [B, H, T, HS] views of it (strides
// T*W, HS, W, 1 with W the row width), K^T a [B, NKV, HS, T] view with the last two strides
// swapped. The forward writes lse straight from cuDNN's Stats ([B, NH, T, 1] fp32, the same
// layout) and O to bf16 scratch, then widens it into out; the backward writes bf16 dQ/dK/dV into
// a bf16 dqkv scratch and adds it (widened) into dqkv. So out and dqkv carry bf16 rounding.
//
// Graphs: the pointwise/matmul/reduction graphs cudnn_frontend's composite SDPA nodes build for
// cuDNN below 9.21 (see cudnn_attention.cpp for them op by op), matched by the fused flash
// attention engines. Plans (operation graph, the first heuristic-mode-A engine config that
// finalizes, its workspace size) are cached per (B, T, NH, NKV, HS, forward/backward) for the
// process. Scratch (the bf16 copies, the backward's fp32 dQ accumulator and dO.O row sums, the
// plan workspace) is one grow-only buffer per role, shared by all shapes: allocated when a shape
// first needs more, after a stream synchronize, so a training loop allocates only in its first
// step. Every call is queued on cuda::stream() and returns without waiting.
//
// Numerics: bf16 inputs; fp32 scores, softmax and statistics; P and dS are rounded to bf16 for
// the second matmuls (as FlashAttention does). The forward is deterministic; the backward's dQ is
// accumulated by cuDNN in fp32 across key blocks with atomics, so dQ (only dQ) can differ in its
// last bits from run to run.
//
// Failure: a graph or plan cuDNN will not build (no engine for this GPU or version) makes
// cudnn_attention_forward / backward return false without doing anything, after one warning line
// on stderr per shape and direction naming the cuDNN status; the caller runs the fp32 kernel.
// Both directions are built on a shape's first call and either both are used or neither (the
// fp32 backward cannot follow cuDNN's forward: their lse come from differently rounded q/k).
// An error while running a built plan is an Error. LMFORGE_CUDNN_ATTENTION=0 in the environment
// turns the path off (cudnn_attention_enabled() false), for A/B comparisons.
#pragma once

#include <cstdint>

namespace lmforge::cuda {

// False when the environment sets LMFORGE_CUDNN_ATTENTION=0 (read once).
bool cudnn_attention_enabled();

// The shapes cuDNN's fused attention takes: causal without a window, T >= 2, HS a multiple of 8 up
// to 128, NH a multiple of NKV, a cuDNN 9 runtime other than 9.10.0/9.10.1 (known SDPA bugs), and T
// a multiple of 128 before 9.16 (older backward engines need a padding mask otherwise). Whether an
// engine exists for the GPU is only known when the plan is built (the calls below).
bool cudnn_attention_supported(int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t HS,
                               int64_t window);
// Whether the bf16 attention op goes to cuDNN for this shape: enabled and supported (the one
// decision ops::attention_* and the Transformer's default bf16 attention gradients share).
bool cudnn_attention_takes(int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t HS,
                           int64_t window);

// The shape must be supported (an Error otherwise). true: queued; false: nothing was done,
// because cuDNN built no plan for this shape (warned once) or lse is not 16-byte aligned.
bool cudnn_attention_forward(float* out, float* lse, const float* qkv, int64_t B, int64_t T,
                             int64_t NH, int64_t NKV, int64_t HS);
// dqkv += the gradient; out and lse are the forward's.
bool cudnn_attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out,
                              const float* lse, int64_t B, int64_t T, int64_t NH, int64_t NKV,
                              int64_t HS);

// bf16 activations (bf16 matmul outputs): qkv and out already bf16, used as they are (no
// conversion of qkv or out either way); dout and dqkv fp32 (+=), or bf16 (below).
bool cudnn_attention_forward(uint16_t* out, float* lse, const uint16_t* qkv, int64_t B, int64_t T,
                             int64_t NH, int64_t NKV, int64_t HS);
bool cudnn_attention_backward(float* dqkv, const float* dout, const uint16_t* qkv,
                              const uint16_t* out, const float* lse, int64_t B, int64_t T,
                              int64_t NH, int64_t NKV, int64_t HS);
// And with dout bf16: dqkv bf16 is WRITTEN (cuDNN's dQ/dK/dV straight into it), not added to.
bool cudnn_attention_backward(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv,
                              const uint16_t* out, const float* lse, int64_t B, int64_t T,
                              int64_t NH, int64_t NKV, int64_t HS);

namespace detail {
// The conversions around the cuDNN plans (cudnn_attention_kernels.cu), on stream().
void bf16_to_fp32(float* dst, const uint16_t* src, int64_t n);     // dst = fp32(src)
void accumulate_bf16(float* dst, const uint16_t* src, int64_t n);  // dst += fp32(src)
}  // namespace detail

}  // namespace lmforge::cuda
