// Causal grouped-query self-attention on the GPU, fp32: the twin of cpu::attention_forward /
// attention_backward (cpu/kernels.h) with the same layout, masking and saved lse. Pointers are
// device memory; calls are queued on cuda::stream() and return without waiting.
//
//   cuda::attention_forward(out, lse, qkv, B, T, NH, NKV, HS, window, doc_start);  // (B, T, NH*HS)
//   cuda::attention_backward(dqkv, dout, qkv, out, lse, B, T, NH, NKV, HS, window, doc_start);
//
// qkv is (B, T, (NH + 2*NKV) * HS) = [q heads | k heads | v heads]; query head h reads kv head
// h / (NH / NKV). window > 0: query t sees keys (t - window, t]; 0: all of [0, t]. doc_start
// (B, T) device array, or null: packed rows, query t sees keys [doc_start[t], t] only (doc_start
// in [0, t], never decreasing along a row), as the CPU's. lse (B, NH, T)
// is each row's logsumexp of the scaled scores. HS up to 128 (any value; smaller head sizes are
// padded with zeros in shared memory), NH a multiple of NKV; anything else is an Error.
//
// FlashAttention (Dao et al. 2022) forward, FlashAttention-2 (Dao 2023) backward recomputing P
// from lse, in fp32 on the CUDA cores: nothing of size (T, T) is stored. Deterministic, without
// floating-point atomics: dK/dV of a key tile are accumulated in registers by the one block that
// owns that tile (walking every query head of its group and every query tile in a fixed order),
// dQ of a query tile by the one block that owns it, in a second kernel. See attention.cu.
//
// bf16 training: cuDNN's fused SDPA forward/backward through the cuDNN graph API (tensor cores,
// bf16 in, fp32 softmax statistics) is in cudnn_attention.h, with this same fp32 interface;
// ops::attention_forward/backward take it under bf16 mixed precision when cuDNN takes the shape
// (window 0, HS a multiple of 8) and fall back to these fp32 kernels otherwise. These stay the
// fp32 path and the reference the cuDNN path is tested against.
#pragma once

#include <cstdint>

#include "lmforge/backend/attn_score.h"

namespace lmforge::cuda {

// score: the scores' scale and soft-capping (backend/attn_score.h), as the CPU's.
void attention_forward(float* out, float* lse, const float* qkv, int64_t B, int64_t T, int64_t NH,
                       int64_t NKV, int64_t HS, int64_t window, const int32_t* doc_start = nullptr,
                       const AttnScore& score = {});
// Adds into dqkv (B, T, (NH + 2*NKV) * HS). out and lse are the forward's.
void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out,
                        const float* lse, int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t HS,
                        int64_t window, const int32_t* doc_start = nullptr,
                        const AttnScore& score = {});

}  // namespace lmforge::cuda
