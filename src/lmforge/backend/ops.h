// The op interface: every layer calls these, and every backend implements them. Each op has a
// forward and a backward; backward ops ACCUMULATE (+=) into gradients (see cpu/kernels.h).
// Dispatch happens here, once, on the tensors' device and dtype (fp32, or fp64 for gradient
// checks); op bodies never test the device. A tensor that is !defined() means "absent" (no
// bias, no learned positions, no gradient wanted).
//
//   ops::linear_forward(out, x, w, b);                 // out (N, OC) = x (N, C) w^T + b
//   ops::linear_backward(dx, dw, db, dout, x, w);      // dx, dw, db +=
#pragma once

#include <cstdint>
#include <vector>

#include "lmforge/backend/attn_score.h"
#include "lmforge/backend/gate.h"
#include "lmforge/core/tensor.h"

namespace lmforge::ops {

// (N, OC) = (N, C) @ (OC, C)^T + (OC); leading dims of inp/out are flattened into N. A bf16
// weight (the bf16 copy of an fp32 parameter) selects mixed precision: inp and dout are rounded
// to bf16 for the matmul (or are bf16 already), accumulation is fp32, and out is fp32 or bf16 (bf16
// matmul outputs: the fp32 result plus bias rounded once). A bf16 dout (rows ld >= OC apart) is
// taken as it is, its bias gradient summed in double; dweight and dbias are fp32 (+=), dinp fp32
// (+=) or bf16 (bf16 attention gradients: written, the fp32 result rounded once).
// !dweight_accumulate: dweight is written (dout^T inp), not added to: a weight's first gradient of
// the step (Param::accumulate_grad), what it held is ignored. !dinp_accumulate: an fp32 dinp is
// written (dout W) likewise: the layer is its first contribution (no zeroing pass before).
void linear_forward(const Tensor& out, const Tensor& inp, const Tensor& weight, const Tensor& bias);
void linear_backward(const Tensor& dinp, const Tensor& dweight, const Tensor& dbias,
                     const Tensor& dout, const Tensor& inp, const Tensor& weight,
                     bool dweight_accumulate = true, bool dinp_accumulate = true);

// Packed rows (several documents in one row of a batch; data.packing: best_fit) pass the ops
// below, as (B, T) int32 tensors on the ops' device, each token's position within its document
// (`positions`, for learned positions and RoPE) and the first position of its document in the
// row (`doc_start`, for attention: in [0, t], never decreasing along a row). Absent: one sequence
// per row from position 0.

// out (B, T, C) = wte[tokens] + wpe[t] (or wpe[positions]); tokens (B, T) int32; wpe may be
// absent. The tables may be bf16 (bf16 master weights; both alike), widened exactly into fp32 rows.
// Vocabulary parallelism: wte's rows are ids [vocab_begin, vocab_begin + rows) of a
// vocabulary of vocab_total (0: wte's rows); a token outside them reads a zero row and its
// gradient goes nowhere.
void embedding_forward(const Tensor& out, const Tensor& tokens, const Tensor& wte,
                       const Tensor& wpe, const Tensor& positions = {}, int64_t vocab_begin = 0,
                       int64_t vocab_total = 0);
void embedding_backward(const Tensor& dwte, const Tensor& dwpe, const Tensor& dout,
                        const Tensor& tokens, const Tensor& positions = {}, int64_t vocab_begin = 0,
                        int64_t vocab_total = 0);

// Over the last dimension C; mean/rstd are (N) saved for backward. bias may be absent.
void layernorm_forward(const Tensor& out, const Tensor& mean, const Tensor& rstd, const Tensor& inp,
                       const Tensor& weight, const Tensor& bias, double eps);
void layernorm_backward(const Tensor& dinp, const Tensor& dweight, const Tensor& dbias,
                        const Tensor& dout, const Tensor& inp, const Tensor& weight,
                        const Tensor& mean, const Tensor& rstd);
// RMSNorm's scale is offset + weight (Gemma's 1 + w, added in fp32).
void rmsnorm_forward(const Tensor& out, const Tensor& rstd, const Tensor& inp, const Tensor& weight,
                     double eps, double offset = 0);
void rmsnorm_backward(const Tensor& dinp, const Tensor& dweight, const Tensor& dout,
                      const Tensor& inp, const Tensor& weight, const Tensor& rstd,
                      double offset = 0);
// Qwen3's q/k norm: RMSNorm over each head of HS (weights wq, wk: (HS)) of the q and k parts of
// qkv (B, T, (NH + 2 NKV) * HS); v is copied. rstd_q (B*T*NH), rstd_k (B*T*NKV) saved for backward.
void qk_norm_forward(const Tensor& out, const Tensor& rstd_q, const Tensor& rstd_k,
                     const Tensor& inp, const Tensor& wq, const Tensor& wk, int64_t n_head,
                     int64_t n_kv_head, double eps, double offset = 0);
void qk_norm_backward(const Tensor& dinp, const Tensor& dwq, const Tensor& dwk, const Tensor& dout,
                      const Tensor& inp, const Tensor& wq, const Tensor& wk, const Tensor& rstd_q,
                      const Tensor& rstd_k, int64_t n_head, int64_t n_kv_head, double offset = 0);

// In place on the q and k heads of qkv (B, T, (NH + 2 NKV) * HS); cos/sin are (T_max, HS/2)
// fp32 tables (models/rope_table.h). backward applies the inverse rotation to dqkv in place. A
// bf16 qkv (or dqkv) is rotated in fp32 and its q and k heads rounded. Token t is at position
// pos0 + t, or positions[b, t] when given.
void rope_forward(const Tensor& qkv, const Tensor& cos, const Tensor& sin, int64_t n_head,
                  int64_t n_kv_head, int64_t pos0, const Tensor& positions = {});
void rope_backward(const Tensor& dqkv, const Tensor& cos, const Tensor& sin, int64_t n_head,
                   int64_t n_kv_head, int64_t pos0, const Tensor& positions = {});

// out (B, T, NH*HS); lse (B, NH, T) the logsumexp of each row of scaled scores, saved for
// backward; qkv (B, T, (NH + 2 NKV) * HS). Causal; window > 0 limits query t to keys
// (t - window, t] (Mistral/Phi-3 sliding window); doc_start further limits it to keys from
// doc_start[b, t] on (packed rows: no attention across documents; cuDNN is not used then).
// Tiled with an online softmax (FlashAttention),
// so no (T, T) buffer exists; backward recomputes the probabilities from qkv and lse, takes the
// forward's out, and adds into dqkv. bf16: the run is bf16 mixed precision, so a bf16 kernel
// may be used: on a CUDA tensor, cuDNN's fused flash attention (bf16 Q/K/V/O, fp32 softmax
// statistics; backend/cuda/cudnn_attention.h) when it takes the shape and builds a plan, else the
// fp32 kernel; LMFORGE_CUDNN_ATTENTION=0 in the environment keeps the fp32 kernel. The CPU
// ignores it (fp32 attention). bf16 activations: qkv and out may both be bf16, with dout and dqkv
// both fp32 (dqkv +=) or both bf16 (dqkv written, rounded once); cuDNN then reads and writes them
// as they are, and the fp32 kernel (the CPU, or a shape cuDNN does not take) runs on fp32 copies
// in grow-only scratch outside the activation plan. rope_backward takes a bf16 dqkv likewise.
// score: the scores' scale and soft-capping (backend/attn_score.h); cuDNN takes the plain ones
// only.
void attention_forward(const Tensor& out, const Tensor& lse, const Tensor& qkv, int64_t n_head,
                       int64_t n_kv_head, int64_t window = 0, bool bf16 = false,
                       const Tensor& doc_start = {}, const AttnScore& score = {});
void attention_backward(const Tensor& dqkv, const Tensor& dout, const Tensor& qkv,
                        const Tensor& out, const Tensor& lse, int64_t n_head, int64_t n_kv_head,
                        int64_t window = 0, bool bf16 = false, const Tensor& doc_start = {},
                        const AttnScore& score = {});

// dst (bf16) = src (fp32) rounded to nearest even (the bf16 copies of the matmul weights).
void to_bf16(const Tensor& dst, const Tensor& src);
// dst (fp32) = src (bf16), exact (fp32 working copies of bf16 master weights).
void from_bf16(const Tensor& dst, const Tensor& src);
// fp32 masters of bf16 values (AdamWOptions::fp32_masters): every element of master (fp32) that
// does not round to nearest (as to_bf16) to value's (bf16) becomes value's, widened; the rest stay.
void keep_master(const Tensor& master, const Tensor& value);

// bf16 activations: inp may be bf16 (the fc matmul's output; out is then bf16), and the backward
// then WRITES (not +=) a bf16 dinp from an fp32 dout, each the fp32 arithmetic on the widened
// input rounded once.
void gelu_forward(const Tensor& out, const Tensor& inp);
void gelu_backward(const Tensor& dinp, const Tensor& inp, const Tensor& dout);
// inp (N, 2F) = [gate | up] -> out (N, F) = act(gate) * up (SwiGLU, GeGLU: backend/gate.h)
void glu_forward(const Tensor& out, const Tensor& inp, Gate gate);
void glu_backward(const Tensor& dinp, const Tensor& inp, const Tensor& dout, Gate gate);

// losses (N) per row (0 where target == ignore_index); lse_sq_sum (one fp64 element on the
// logits' device) = the sum over the kept rows of logsumexp(logits)^2 (for the z-loss). Reads
// nothing back: a GPU step stays asynchronous until its caller sums the losses.
// vocab > 0: the logits' rows are padded past it (a GPU only), the padding not read.
void softmax_xent_rows(const Tensor& losses, const Tensor& logits, const Tensor& targets,
                       int32_t ignore_index, const Tensor& lse_sq_sum, int64_t vocab = 0);
// Final-logit soft-capping (Gemma 2's final_logit_softcapping): x = cap tanh(x / cap) in place
// on logits x (N, V), fp32 (or fp64 on the host). softcap_backward: dx = dy (1 - (y / cap)^2) from
// the capped logits y and their gradient dy (both (N, V)); dx like y (may be dy or y), or bf16
// (N, ld >= V: the LM head's bf16 dlogits; each rounded once, the padding not written).
void softcap_forward(const Tensor& x, double cap);
void softcap_backward(const Tensor& dx, const Tensor& dy, const Tensor& y, double cap);
// The sum of x's elements in double, on the host (fp32, or fp64 on the host; one read-back on a
// GPU).
double sum(const Tensor& x);
// softmax_xent_rows, then the mean loss over rows whose target != ignore_index (0 if none);
// mean_lse_sq, if given, receives the mean over those rows of logsumexp(logits)^2.
double softmax_xent_forward(const Tensor& losses, const Tensor& logits, const Tensor& targets,
                            int32_t ignore_index, double* mean_lse_sq = nullptr);
// dlogits = dloss * (softmax (1 + 2 z_loss lse) - onehot): the gradient of
// dloss * (xent + z_loss * lse^2) (PaLM's z-loss); writes (not +=) and may alias logits.
void softmax_xent_backward(const Tensor& dlogits, const Tensor& logits, const Tensor& targets,
                           double dloss, int32_t ignore_index, double z_loss = 0);
// softmax_xent_rows and softmax_xent_backward in one pass over the logits (training: one
// logsumexp per row): the same losses, dlogits and lse_sq_sum, bit for bit (the rows' lse^2
// added in order). dlogits may alias logits, or be bf16: (N, ld >= V) rows,
// each rounded to bf16 as to_bf16 would (the LM head's backward matmul input; the padding is not
// written).
// vocab > 0: the logits' rows are padded past the vocab (last(logits) > vocab; a GPU with bf16
// dlogits only: the LM head's 16-byte rows there), the padding is not read.
// row_scale (optional; N fp32 on the logits' device): row i's gradient is scaled by dloss *
// row_scale[i] (per-sequence objectives such as DPO weigh each row's tokens by their sequence's
// gradient).
void softmax_xent_forward_backward(const Tensor& losses, const Tensor& lse_sq_sum,
                                   const Tensor& dlogits, const Tensor& logits,
                                   const Tensor& targets, int32_t ignore_index, double dloss,
                                   double z_loss = 0, int64_t vocab = 0,
                                   const Tensor& row_scale = {});

// The loss over a vocabulary split by columns (dist/tensor_parallel.h): logits (N, V) are
// the columns [vocab_begin, vocab_begin + V) of vocab_total. softmax_xent_stats writes each row's
// statistics (stats: N x 3 fp64: a pair (m, s) with s exp(m) the sum of the exponentials of its
// logits (the CPU writes their max and sum of exp(logit - max), a GPU (lse, 1)), and the
// target's logit if it is among the columns, else 0). A target outside the vocabulary is an
// Error on the CPU and NaN on a GPU, as the whole vocabulary's ops. Given every rank's (all_stats:
// P x N x 3, rank order), softmax_xent_parallel writes the losses, lse_sq_sum and, where dlogits is
// defined, the gradient of these columns, as softmax_xent_forward_backward would over the whole
// vocabulary. vocab > 0: the logits' rows are padded past it (a GPU only), the padding not read.
void softmax_xent_stats(const Tensor& stats, const Tensor& logits, const Tensor& targets,
                        int32_t ignore_index, int64_t vocab_begin, int64_t vocab_total,
                        int64_t vocab = 0);
void softmax_xent_parallel(const Tensor& losses, const Tensor& lse_sq_sum, const Tensor& dlogits,
                           const Tensor& logits, const Tensor& targets, const Tensor& all_stats,
                           int32_t ignore_index, double dloss, double z_loss, int64_t vocab_begin,
                           const Tensor& row_scale = {}, int64_t vocab = 0);

// Knowledge distillation (train.objective: distill): per row with a target, losses = (1 - alpha)
// CE + alpha T^2 KL(softmax(teacher / T) || softmax(logits / T)) (Hinton et al. 2015), kl = the
// KL term; dlogits = dloss * d losses / d logits, written as softmax_xent_forward_backward writes
// it (fp32, may alias logits; or bf16 rows). teacher: (N, V) fp32. Rows with ignore_index get 0.
void softmax_distill_forward_backward(const Tensor& losses, const Tensor& kl, const Tensor& dlogits,
                                      const Tensor& logits, const Tensor& teacher,
                                      const Tensor& targets, int32_t ignore_index, double dloss,
                                      double alpha, double temperature, int64_t vocab = 0);

// The same over a vocabulary split by columns (dist/tensor_parallel.h; backend/distill_stats.h):
// logits and teacher (N, V) fp32 are the columns [vocab_begin, vocab_begin + V) of vocab_total.
// softmax_distill_stats writes each row's statistics (stats: N x kDistillStats fp64; an Error for
// a target outside the vocabulary on the CPU, NaN on a GPU). Given every rank's (all_stats: P x N
// x kDistillStats, rank order), softmax_distill_parallel writes losses, kl and, where dlogits is
// defined, the gradient of these columns as softmax_distill_forward_backward would over the whole
// vocabulary. vocab > 0: the logits' rows are padded past it (a GPU only).
void softmax_distill_stats(const Tensor& stats, const Tensor& logits, const Tensor& teacher,
                           const Tensor& targets, int32_t ignore_index, int64_t vocab_begin,
                           int64_t vocab_total, double temperature, int64_t vocab = 0);
void softmax_distill_parallel(const Tensor& losses, const Tensor& kl, const Tensor& dlogits,
                              const Tensor& logits, const Tensor& teacher, const Tensor& targets,
                              const Tensor& all_stats, int32_t ignore_index, double dloss,
                              double alpha, double temperature, int64_t vocab_begin,
                              int64_t vocab = 0);

// b may be bf16 (a residual branch's bf16 matmul output), widened exactly; out and a fp32.
void add(const Tensor& out, const Tensor& a, const Tensor& b);
void accumulate(const Tensor& dst, const Tensor& src);
// A block of one 2-D tensor into another (a fused layer's LoRA adapters, nn/linear.h): the rows
// [dst_row, dst_row + rows) by columns [dst_col, dst_col + cols) of dst = (or += with
// accumulate: fp32 or fp64) the block of src of that size at (src_row, src_col). Same dtype and
// device; any dtype when copying.
void copy_block(const Tensor& dst, int64_t dst_row, int64_t dst_col, const Tensor& src,
                int64_t src_row, int64_t src_col, int64_t rows, int64_t cols,
                bool accumulate = false);
// Inverted dropout (LoRA's lora_dropout, nn/linear.h): out (fp32) = inp (fp32, or bf16 widened)
// * keep_i / (1 - p), element i kept when sr_bits(key, i) >= p 2^32 (core/stochastic_round.h's
// hash): a mask no buffer holds, the same on every backend and when recomputed for backward.
// dropout_backward: dinp (fp32) += g * keep_i / (1 - p), the same mask.
void dropout_forward(const Tensor& out, const Tensor& inp, double p, uint32_t key);
void dropout_backward(const Tensor& dinp, const Tensor& g, double p, uint32_t key);
void scale(const Tensor& x, double s);
// y = a y + b x, elementwise.
void axpby(const Tensor& y, double a, const Tensor& x, double b);
double sum_squares(const Tensor& x);

// grad_scale multiplies the gradient as it is read (clipping); param_bf16 receives bf16(param).
// A bf16 param is a bf16 master weight: updated in fp32 and written back rounded stochastically
// with bits hashed from (sr_seed, step, sr_index + i), sr_index being the flat index of its first
// element (core/stochastic_round.h), so every backend and every resume rounds alike.
void adamw_update(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                  double lr, double beta1, double beta2, double eps, double weight_decay,
                  int64_t step, const Tensor& param_bf16 = Tensor(), double grad_scale = 1.0,
                  uint64_t sr_seed = 0, int64_t sr_index = 0);
// One AdamW step over many parameters (AdamW::step): each item updated exactly as
// adamw_update(param, grad, m, v, ..., decay ? weight_decay : 0, step, param_bf16, grad_scale,
// sr_seed, sr_index) would; on a GPU in one launch (cuda::adamw_update_many) instead of one per
// item.
struct AdamwItem {
  Tensor param, grad, m, v, param_bf16;
  bool decay = true;
  int64_t sr_index = 0;
  // param is the fp32 master of the bf16 value param_bf16 (LoRA's adapters under bf16 master
  // weights): keep_master(param, param_bf16) first (on a GPU inside the one launch).
  bool keep_master = false;
};
void adamw_update_all(const std::vector<AdamwItem>& items, double lr, double beta1, double beta2,
                      double eps, double weight_decay, int64_t step, double grad_scale = 1.0,
                      uint64_t sr_seed = 0);

}  // namespace lmforge::ops

namespace lmforge {
// The seam for the CUDA backend: a build without it links a stub that raises a clear error.
[[noreturn]] void cuda_unavailable(const char* op);
}  // namespace lmforge
