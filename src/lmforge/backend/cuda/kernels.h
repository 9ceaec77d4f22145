// CUDA kernels, fp32: the GPU twins of the CPU reference kernels in backend/cpu/kernels.h, with
// the same argument order and semantics. Pointers are device pointers (plain C++ types: this
// header needs no CUDA headers); every call is queued on cuda::stream() and returns without
// synchronizing. As on the CPU, every backward ACCUMULATES (+=) into input and parameter
// gradients, except softmax_xent_backward, which writes dlogits (it may alias logits).
//
//   cuda::layernorm_forward(out, mean, rstd, inp, w, b, N, C, 1e-5);      // (N, C)
//   cuda::layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, N, C);  // dinp, dw, db +=
//
// Numerics: row statistics (norms) accumulate in double, as the CPU does; softmax_xent keeps
// a per-thread online max / sum of exp in fp32 and forms the logsumexp in double; column sums
// (norm weight gradients) and sum_squares accumulate in double. Elementwise kernels use the
// IEEE-rounded CUDA math library (no fast math).
//
// Determinism: every result is independent of scheduling (no floating-point atomics). Reductions
// use a partition fixed by the shapes alone and reduce it in a fixed order. Bit-identical to the
// CPU (same fp32 operations in the same order, no FMA contraction): embedding forward/backward
// (dwte gets each token's rows added in (b, t) order), rope, add/accumulate/scale/fill, AdamW.
//
// Scratch: the norm backwards (2 x 256 x C doubles at most: 3 MiB at C = 768),
// softmax_xent_forward with lse_sq_sum (N doubles) and sum_squares (1024 doubles) need a device
// buffer of partial sums: the only allocation here. It is made through cuda::malloc on first use
// (1 MiB at least) and regrown (after a stream synchronize) when a call needs more, so a training
// loop allocates only during its first step, never in steady state (nor in a graph capture after
// a warm-up step). Calls are stream-ordered, so one buffer serves them all; it lives until exit.
//
// Invalid ids: a kernel cannot raise, so a token id outside [0, V) gives a NaN row in
// embedding_forward (and is skipped by embedding_backward), and a target outside [0, V) other
// than ignore_index gives a NaN loss and a NaN gradient row: the NaN shows in the loss. Check ids
// on the host where they are there anyway.
#pragma once

#include <cstdint>

#include "lmforge/backend/gate.h"

namespace lmforge::cuda {

// out (B, T, C) = wte[tokens] (V, C) + wpe[t] (T, C); wpe may be null. pos (B*T, or null): the
// row of wpe for each token (packed rows) instead of t.
// Vocabulary parallelism: wte's V rows are ids [v0, v0 + V) of vocab_total (0: V); another
// rank's id reads a zero row (backward: adds nothing); an id outside [0, vocab_total) is NaN.
void embedding_forward(float* out, const int32_t* tokens, const float* wte, const float* wpe,
                       int64_t B, int64_t T, int64_t C, int64_t V, const int32_t* pos = nullptr,
                       int64_t v0 = 0, int64_t vocab_total = 0);
// The same from bf16 tables (bf16 master weights), widened exactly.
void embedding_forward(float* out, const int32_t* tokens, const uint16_t* wte, const uint16_t* wpe,
                       int64_t B, int64_t T, int64_t C, int64_t V, const int32_t* pos = nullptr);
// dwte += scatter of dout by token (deterministic: each block owns a channel slice and a set of
// vocabulary rows, and adds its tokens in (b, t) order); dwpe (if not null) += sum over b, or with
// pos (B*T; P rows of wpe) the same scatter as dwte's by position. dwte may be null (the
// positions' alone); its V rows are ids [v0, v0 + V) (vocabulary parallelism).
void embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens,
                        int64_t B, int64_t T, int64_t C, int64_t V, const int32_t* pos, int64_t P,
                        int64_t v0 = 0);

// LayerNorm over rows of C; mean, rstd (N) are saved for backward. bias / dbias may be null.
void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                       const float* bias, int64_t N, int64_t C, double eps);
void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout,
                        const float* inp, const float* weight, const float* mean, const float* rstd,
                        int64_t N, int64_t C);

// RMSNorm over N rows of C; row i lives at (i / group) * stride + (i % group) * C, as
// cpu::row_offset (group = 1, stride = C for a contiguous (N, C) tensor); scaled by offset +
// weight (Gemma: 1 + w).
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N,
                     int64_t C, double eps, int64_t group, int64_t stride, float offset = 0);
void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp,
                      const float* weight, const float* rstd, int64_t N, int64_t C, int64_t group,
                      int64_t stride, float offset = 0);

// Rotary embedding in place, HF "rotate_half" layout, as cpu::rope_forward; cos/sin (T_max, HS/2)
// are device arrays. backward applies the inverse rotation to dx in place.
// pos (B*T device array, or null): each token's position (else pos0 + t).
void rope_forward(float* x, const float* cos, const float* sin, int64_t B, int64_t T,
                  int64_t n_heads, int64_t HS, int64_t row_stride, int64_t pos0,
                  const int32_t* pos = nullptr);
void rope_backward(float* dx, const float* cos, const float* sin, int64_t B, int64_t T,
                   int64_t n_heads, int64_t HS, int64_t row_stride, int64_t pos0,
                   const int32_t* pos = nullptr);

// GELU, tanh approximation. backward: dinp += dout * gelu'(inp).
void gelu_forward(float* out, const float* inp, int64_t n);
void gelu_backward(float* dinp, const float* inp, const float* dout, int64_t n);
// inp (N, 2F) = [gate | up]; out (N, F) = act(gate) * up (gate.h). backward: dinp (N, 2F) +=.
void glu_forward(float* out, const float* inp, int64_t N, int64_t F, Gate gate);
void glu_backward(float* dinp, const float* inp, const float* dout, int64_t N, int64_t F,
                  Gate gate);

// bf16 activations: the same forwards writing their output rounded to bf16 (round to nearest
// even, denormals to zero: cpu::to_bf16 of the fp32 output, bit for bit), for a bf16 matmul to
// read directly. rmsnorm_forward's rows are contiguous here (group 1, stride C).
void layernorm_forward(uint16_t* out, float* mean, float* rstd, const float* inp,
                       const float* weight, const float* bias, int64_t N, int64_t C, double eps);
void rmsnorm_forward(uint16_t* out, float* rstd, const float* inp, const float* weight, int64_t N,
                     int64_t C, double eps, int64_t group, int64_t stride, float offset = 0);
void gelu_forward(uint16_t* out, const float* inp, int64_t n);
void glu_forward(uint16_t* out, const float* inp, int64_t N, int64_t F, Gate gate);

// bf16 matmul outputs (bf16 activations throughout): the activations read the fc matmul's bf16
// output and write bf16; their backwards read it too and WRITE (not +=) dinp rounded to bf16, the
// fc matmul's bf16 output gradient. RoPE rotates a bf16 qkv (and its backward a bf16 dqkv) in
// place (fp32 arithmetic, rounded once); add widens a bf16 residual branch. Each computes what its
// fp32 twin computes on the widened values and rounds as to_bf16 (RoPE and add are then
// bit-identical to the CPU).
void gelu_forward(uint16_t* out, const uint16_t* inp, int64_t n);
void gelu_backward(uint16_t* dinp, const uint16_t* inp, const float* dout, int64_t n);
void glu_forward(uint16_t* out, const uint16_t* inp, int64_t N, int64_t F, Gate gate);
void glu_backward(uint16_t* dinp, const uint16_t* inp, const float* dout, int64_t N, int64_t F,
                  Gate gate);
void rope_forward(uint16_t* x, const float* cos, const float* sin, int64_t B, int64_t T,
                  int64_t n_heads, int64_t HS, int64_t row_stride, int64_t pos0,
                  const int32_t* pos = nullptr);
void rope_backward(uint16_t* dx, const float* cos, const float* sin, int64_t B, int64_t T,
                   int64_t n_heads, int64_t HS, int64_t row_stride, int64_t pos0,
                   const int32_t* pos = nullptr);
void add(float* out, const float* a, const uint16_t* b, int64_t n);  // out = a + fp32(b)

// losses (N) = logsumexp(logits[i]) - logits[i, targets[i]], or 0 where targets[i] ==
// ignore_index. lse_sq_sum, if not null, is a DEVICE double that receives (=, not +=) the sum
// of logsumexp^2 over the non-ignored rows (for the z-loss), reduced in a fixed order (per-row
// values in scratch, then one block), so it is the same on every run.
// ldx: the logits' row stride (>= V; 0 = V).
void softmax_xent_forward(float* losses, const float* logits, const int32_t* targets, int64_t N,
                          int64_t V, int32_t ignore_index, double* lse_sq_sum, int64_t ldx = 0);
// dlogits (N, V) = dloss * (softmax(logits) (1 + 2 z_loss lse) - onehot(target)); ignored rows
// get 0. Writes (does not accumulate); dlogits may alias logits. dloss is a host value.
// Final-logit soft-capping (ops::softcap_forward / softcap_backward): x (N, V) = cap tanh(x / cap)
// in place; dx = dy (1 - (y / cap)^2), dy and y (N, V), dx rows ldd apart (float: may be dy or
// y; uint16_t: bf16, rounded once).
void softcap_rows(float* x, int64_t N, int64_t V, float cap);
void softcap_grad_rows(float* dx, int64_t ldd, const float* dy, const float* y, int64_t N,
                       int64_t V, float cap);
void softcap_grad_rows(uint16_t* dx, int64_t ldd, const float* dy, const float* y, int64_t N,
                       int64_t V, float cap);
void softmax_xent_backward(float* dlogits, const float* logits, const int32_t* targets, float dloss,
                           int64_t N, int64_t V, int32_t ignore_index, double z_loss);
// The same written rounded to bf16 (bf16_ftz) into rows ld >= V apart (the LM head's backward
// matmul input; ld a multiple of 8 keeps its rows 16-byte aligned); the padding is not written.
void softmax_xent_backward(uint16_t* dlogits, int64_t ld, const float* logits,
                           const int32_t* targets, float dloss, int64_t N, int64_t V,
                           int32_t ignore_index, double z_loss);
// Forward and backward in one pass (training), as softmax_xent_forward then
// softmax_xent_backward: losses and lse_sq_sum (a device double, =), and dlogits (fp32, may alias
// logits; or bf16 rows ld apart, the logits' rows then ldx >= V apart: 0 = V). row_scale
// (optional, N floats on the device): row i's gradient scaled by dloss * row_scale[i].
void softmax_xent_forward_backward(float* losses, double* lse_sq_sum, float* dlogits,
                                   const float* logits, const int32_t* targets, float dloss,
                                   int64_t N, int64_t V, int32_t ignore_index, double z_loss,
                                   const float* row_scale = nullptr);
void softmax_xent_forward_backward(float* losses, double* lse_sq_sum, uint16_t* dlogits, int64_t ld,
                                   const float* logits, const int32_t* targets, float dloss,
                                   int64_t N, int64_t V, int32_t ignore_index, double z_loss,
                                   int64_t ldx = 0, const float* row_scale = nullptr);

// Vocabulary parallelism (as cpu::softmax_xent_stats and cpu::softmax_xent_parallel): stats (N
// x 3 device doubles) per row: a (m, s) pair with s exp(m) the sum of exp over its columns (this
// kernel writes (lse, 1)) and the target's logit if it is among columns [v0, v0 + V) of
// vocab_total, else 0; zeros for ignored rows. softmax_xent_parallel: from every rank's stats
// (P x N x 3), losses, lse_sq_sum (a device double, =) and, when given, dlogits (fp32 in the
// logits' rows, may alias them; or bf16 rows ld apart) of these columns; row_scale optional.
// ldx: the logits' row stride (>= V; 0 = V).
void softmax_xent_stats(double* stats, const float* logits, const int32_t* targets, int64_t N,
                        int64_t V, int32_t ignore_index, int64_t v0, int64_t vocab_total,
                        int64_t ldx = 0);
void softmax_xent_parallel(float* losses, double* lse_sq_sum, float* dlogits, uint16_t* dlogits16,
                           int64_t ld, const float* logits, const int32_t* targets,
                           const double* all_stats, int64_t P, float dloss, int64_t N, int64_t V,
                           int32_t ignore_index, double z_loss, int64_t v0,
                           const float* row_scale = nullptr, int64_t ldx = 0);

// Knowledge distillation per row (as cpu::softmax_distill_forward_backward): dlogits fp32 (ld = V,
// may alias logits) or, when dlogits16 is given, bf16 rows ld apart; logits rows ldx apart; teacher
// rows ldt apart (0 = V: its own LM head's chunk may be padded as the logits are).
void softmax_distill_forward_backward(float* losses, float* kl, float* dlogits, uint16_t* dlogits16,
                                      int64_t ld, const float* logits, int64_t ldx,
                                      const float* teacher, int64_t ldt, const int32_t* targets,
                                      float dloss, int64_t N, int64_t V, int32_t ignore_index,
                                      double alpha, double temperature);

// The same over a vocabulary split by columns (as cpu::softmax_distill_stats and
// cpu::softmax_distill_parallel; backend/distill_stats.h): logits rows ldx apart (0 = V), teacher
// rows ldt apart (0 = V); stats N x kDistillStats device doubles (a target outside vocab_total:
// NaN). dlogits fp32 in the logits' rows (may alias them), or bf16 rows ld apart, or neither.
void softmax_distill_stats(double* stats, const float* logits, int64_t ldx, const float* teacher,
                           int64_t ldt, const int32_t* targets, int64_t N, int64_t V,
                           int32_t ignore_index, int64_t v0, int64_t vocab_total,
                           double temperature);
void softmax_distill_parallel(float* losses, float* kl, float* dlogits, uint16_t* dlogits16,
                              int64_t ld, const float* logits, int64_t ldx, const float* teacher,
                              int64_t ldt, const int32_t* targets, const double* all_stats,
                              int64_t P, float dloss, int64_t N, int64_t V, int32_t ignore_index,
                              double alpha, double temperature, int64_t v0);

void add(float* out, const float* a, const float* b, int64_t n);  // out = a + b
void accumulate(float* dst, const float* src, int64_t n);         // dst += src
// dst += src on `cols` columns of `rows` rows ld elements apart (both the same layout), e.g. the
// v part of a packed qkv gradient.
void accumulate_rows(float* dst, const float* src, int64_t rows, int64_t cols, int64_t ld);
// dst += src on a block of `rows` rows by `cols` columns, dst's rows ldd apart and src's lds.
void accumulate_block(float* dst, int64_t ldd, const float* src, int64_t lds, int64_t rows,
                      int64_t cols);
// ops::dropout_forward / dropout_backward: element i kept when sr_bits(key, i) >= cut, scaled.
// The input x (fp32) or h (bf16): one of them.
void dropout_forward(float* out, const float* x, const uint16_t* h, int64_t n, uint32_t cut,
                     float scale, uint32_t key);
void dropout_backward(float* dinp, const float* g, int64_t n, uint32_t cut, float scale,
                      uint32_t key);
void scale(float* x, float s, int64_t n);                           // x *= s
void axpby(float* y, float a, const float* x, float b, int64_t n);  // y = a y + b x
void fill(float* x, float value, int64_t n);                        // x = value
void zero(float* x, int64_t n);                                     // x = 0
// Sum of squares of x in double into the DEVICE double *result (= by default; += with
// accumulate, e.g. over the tensors of a global gradient norm, in call order). Deterministic:
// blocks of a size fixed by n, then one fixed-order reduction of the block sums.
void sum_squares(double* result, const float* x, int64_t n, bool accumulate = false);
// The sum of x, likewise (e.g. a step's per-row losses, read back once).
void sum(double* result, const float* x, int64_t n, bool accumulate = false);

// One AdamW step, the same operations in the same order and fp32 rounding as
// cpu::adamw_update (no fused multiply-adds), so p, m, v are bit-identical to the CPU's.
// p16, if not null, receives bf16(p) (round to nearest even, denormals to zero).
// g is multiplied by fp32(grad_scale) as it is read (gradient clipping).
void adamw_update(float* p, const float* g, float* m, float* v, uint16_t* p16, int64_t n, double lr,
                  double beta1, double beta2, double eps, double weight_decay, int64_t step,
                  double grad_scale = 1.0);
// bf16 master weights: cpu::adamw_update_sr, bit-identical.
void adamw_update_sr(uint16_t* p, const float* g, float* m, float* v, int64_t n, double lr,
                     double beta1, double beta2, double eps, double weight_decay, int64_t step,
                     double grad_scale, uint32_t key, uint32_t index0);

// A whole optimizer step in one launch (as torch's fused multi-tensor AdamW): each slot is
// updated as adamw_update (fp32 p with an optional bf16 copy p16) or, with sr, adamw_update_sr
// (bf16 p, key and index0 as there); decay chooses weight_decay or none. Bit-identical to one
// call per slot. `slots` is host memory (copied to the device with the launch).
struct AdamwSlot {
  void* p;  // float*, or uint16_t* with sr
  const float* g;
  float* m;
  float* v;
  uint16_t* p16;  // fp32 p only; may be null
  int64_t n;
  uint32_t key, index0;  // sr only
  bool sr, decay;
  // p is the fp32 master of the bf16 value p16 (LoRA's adapters under bf16 master weights):
  // first widened from it wherever it does not round to it (as cuda::keep_master).
  bool keep = false;
};
void adamw_update_many(const AdamwSlot* slots, int64_t count, double lr, double beta1, double beta2,
                       double eps, double weight_decay, int64_t step, double grad_scale);

// fp32 -> bf16 (to_bf16) is declared in matmul.h, beside the bf16 gemms that use it.

}  // namespace lmforge::cuda
