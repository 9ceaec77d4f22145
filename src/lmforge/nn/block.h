// One transformer block (pre-norm, as GPT-2 and Llama):
//   x_mid = x + post1?(proj(attention(rope(qk_norm?(qkv(norm1(x)))))))
//   x_out = x_mid + post2?(mlp(norm2(x_mid)))
//   mlp: fc -> gelu -> proj  |  gate_up -> swiglu or geglu -> down
// (post1, post2: ModelConfig::post_norms, Gemma 3's norms of each branch's output.)
// Activations for one (B, T) live in Block::Acts, planned once; backward reuses shared gradient
// scratch (BlockScratch) across blocks since it runs one block at a time.
//
// Activation checkpointing (Recompute): with kSelective the cheap, large activations (norm
// outputs, the MLP activation) are shared by all blocks and recomputed before each block's
// backward; attention keeps only its output and logsumexp (B, NH, T), small enough to keep per
// block (its backward recomputes the probabilities tile by tile anyway). With kFull every
// activation but the block's output is shared and the whole block forward is recomputed. The
// kernels are deterministic, so the recomputed values, and hence the loss and gradients, are
// bit-identical to kNone.
#pragma once

#include <string>

#include "lmforge/models/config.h"
#include "lmforge/nn/linear.h"
#include "lmforge/nn/norm.h"

namespace lmforge {

// Where the tokens of a batch sit: RoPE's tables and, for packed rows (several documents in a
// row), each token's position in its document and its document's first position in the row
// (ops.h; undefined: one sequence per row from position 0).
struct Positions {
  Tensor cos, sin;              // (max_seq_len, HS/2) fp32; undefined when pos != rope
  Tensor cos_local, sin_local;  // the sliding-window layers' (ModelConfig::rope_local_theta)
  Tensor ids, doc_start;  // (B, T) int32 on the model's device (the group's rows under sequence
                          // parallelism), or undefined
};

// Gradient buffers shared by all blocks during backward.
struct BlockScratch {
  Tensor dnorm;     // (B, T, C)
  Tensor dqkv;      // (B, T, Cq); bf16 with bf16 attention gradients (written by its backward)
  Tensor dqkv_raw;  // (B, T, Cq) before the q/k norm (qk_norm only)
  Tensor datt;      // (B, T, C); likewise (written by proj's backward)
  Tensor dfc;       // (B, T, F or 2F); bf16 when fc_out is (written by the activation's backward)
  Tensor dact;      // (B, T, F)
  Tensor dlora;     // (B*T, P r): LoRA adapters' gradient scratch (Linear::backward; the group's
                    // rows under sequence parallelism, as every buffer here)
  Tensor dlora_b;   // fp32, the largest (P r, OC) of a layer of P > 1 modules (Linear::backward)
  Tensor dlora_x;   // (B*T, widest adapted input) fp32: LoRA dropout's input gradient, or none
  // bf16_attention_grads (with bf16 matmul outputs): d(att) and d(qkv) in bf16, the types cuDNN's
  // attention backward reads and writes, so no conversion passes around it on a GPU.
  // row_shards: sequence parallelism's (PartialSums), whose attention and MLP gradients are the
  // group's rows.
  void plan(Arena& a, const ModelConfig& c, int64_t B, int64_t T,
            DType matmul_output_dtype = DType::kF32, bool bf16_attention_grads = false,
            int64_t row_shards = 1);
};

// Tensor parallelism's seam (dist/tensor_parallel.h). A block that holds one rank's share of
// the attention heads and of the MLP's hidden units (Megatron-LM's column- and row-parallel
// layers) computes partial sums of its two residual branches in forward and of its norms' input
// gradients in backward; sum() adds a partial sum over the ranks that share the block, in place
// (fp32). The block knows nothing else of the split.
//
// With sequence parallelism (row_shards() = the group's ranks), the norms and residual adds run
// on this rank's own rows (B, T) alone and attention and the MLP on the whole group's
// (row_shards() B, T), rank r's rows the r-th block of them: gather() collects every rank's rows
// before the column-parallel matmuls (and their outputs' gradients before the row-parallel
// ones' backward), and sum_scatter() replaces sum(): it adds the partial sums over the ranks and
// keeps this rank's rows.
class PartialSums {
 public:
  virtual ~PartialSums() = default;
  virtual void sum(const Tensor& t) const = 0;
  virtual int64_t row_shards() const { return 1; }
  // local (R, ...) of every rank into all (row_shards() R, ...), in rank order (fp32 or bf16).
  virtual void gather(const Tensor& local, const Tensor& all) const {}
  // all (row_shards() R, ...) fp32 partial sums, summed over the ranks: this rank's rows into
  // local (R, ...).
  virtual void sum_scatter(const Tensor& all, const Tensor& local) const {}
};

// The MLP's activation of fc's output: GELU, or a gated unit (SwiGLU, GeGLU) of [gate | up].
void mlp_activation_forward(const ModelConfig& c, const Tensor& act, const Tensor& fc_out);
void mlp_activation_backward(const ModelConfig& c, const Tensor& dfc, const Tensor& fc_out,
                             const Tensor& dact);
// RoPE's tables for layer `layer` (the sliding-window layers' own under rope_local_theta).
std::pair<const Tensor*, const Tensor*> rope_of(const ModelConfig& c, const Positions& pos,
                                                int64_t layer);

enum class Recompute { kNone, kSelective, kFull };
// "none" | "selective" | "full"; throws Error naming train.activation_checkpointing otherwise.
Recompute parse_recompute(const std::string& s);

struct Block {
  ModelConfig cfg;
  int64_t layer = 0;  // its index: the attention window and RoPE table (ModelConfig::window)
  Norm norm1, norm2;
  Norm post1, post2;        // ModelConfig::post_norms: on the attention's and the MLP's outputs
  Linear qkv, proj;         // attention
  Linear fc, down;          // mlp: fc is (F, C) for gelu or (2F, C) = [gate | up] for swiglu
  Param* q_norm = nullptr;  // (HS) each, when cfg.qk_norm
  Param* k_norm = nullptr;
  const PartialSums* partial = nullptr;  // tensor parallelism (see PartialSums), or none
  // bf16 activations (set before plan under bf16 precision): the tensors that only feed matmuls
  // (n1_out, n2_out, act) are planned in bf16 and written rounded by the norms and the activation
  // function, so the bf16 matmuls read them as they are (no conversion pass, half the memory).
  // The values are the ones the matmuls would round fp32 ones to: training is bit-identical.
  DType matmul_input_dtype = DType::kF32;
  // bf16 matmul outputs (bf16 activations throughout, as torch.autocast and llm.c keep them):
  // qkv, the attention output, fc_out and the two residual branches (att_proj, mlp_out) are
  // planned in bf16 and written rounded by the matmuls; RoPE rotates the bf16 qkv, attention
  // reads and writes bf16 (cuDNN's own types on a GPU; there its gradients d(att) and d(qkv) are
  // bf16 too, see BlockScratch), the activation function reads bf16 and its backward writes
  // d(fc_out) in bf16 for the fc matmul's backward, and the residual adds
  // widen the branch. Unlike the bf16 matmul inputs this rounds values the fp32 path keeps, so
  // training is close to it, not identical. Models with q/k norms keep qkv and attention fp32.
  DType matmul_output_dtype = DType::kF32;
  // The matmul weights' dtype (bf16 under bf16 precision, set before plan): LoRA's B expansion's.
  DType matmul_weight_dtype = DType::kF32;
  // LoRA's dropout (LoraConfig::dropout) in this training forward and its backward (and
  // recompute): on, and the key its layers' masks derive from (Transformer::queue_trunk).
  bool lora_dropping = false;
  uint32_t lora_drop_key = 0;
  LoraDropout lora_drop(const Linear& l, const Tensor& x, const Tensor& g = {}) const;
  // qkv's and the attention output's dtype.
  DType attention_dtype() const { return cfg.qk_norm ? DType::kF32 : matmul_output_dtype; }

  struct Acts {
    Norm::Saved n1, n2, p1, p2;                     // (p1, p2: the post norms')
    Tensor n1_out, qkv, lse, att, att_proj, x_mid;  // (B,T,C) (B,T,Cq) (B,NH,T) (B,T,C) ...
    Tensor qkv_raw, rstd_q, rstd_k;                 // qk_norm: qkv before the norm, stats
    Tensor n2_out, fc_out, act, mlp_out, x_out;
    Tensor t_qkv, t_proj, t_fc, t_down;  // LoRA adapters' activations (B*T, P r), fp32
    // (shared by all blocks) LoRA's B of a layer of several modules expanded block-diagonally
    // (Linear::lora_b_weight), matmul_weight_dtype; undefined without such a layer.
    // Sequence parallelism (shared by all blocks): a norm's output gathered over the group's rows
    // (the matmul input dtype), and the group's rows of a branch's partial sums, or of a gradient
    // (fp32).
    Tensor n_full, full;
    Tensor lora_b_full;
    Tensor lora_x;  // (shared) the LoRA dropout's dropped input (fp32), without dropout none
    // post_norms: att_proj and mlp_out are the branches before their norms (fp32, kept), and
    // `branch` (shared) each norm's output, added to the stream.
    Tensor branch;
  };
  int64_t row_shards() const { return partial ? partial->row_shards() : 1; }

  void declare(ParamSet& ps, const std::string& prefix, const ModelConfig& c, int64_t layer);
  // Allocates acts; with a Recompute mode other than kNone, the tensors that mode recomputes are
  // views of `shared` (planned once with kNone) instead, and with a `shared` from plan_shared the
  // residual branches are its one buffer.
  void plan(Arena& a, Acts& acts, int64_t B, int64_t T, Recompute mode = Recompute::kNone,
            const Acts* shared = nullptr) const;
  // The activations all blocks share under `mode`: the residual branches' buffer (att_proj and
  // mlp_out, consumed by the adds right after their GEMMs), plus what kSelective recomputes, or
  // under kFull a whole set.
  void plan_shared(Arena& a, Acts& shared, int64_t B, int64_t T, Recompute mode) const;
  // Re-runs what `mode` did not keep, from the block input x, before backward.
  void recompute(const Acts& acts, const Tensor& x, const Positions& pos, Recompute mode) const;
  void forward(const Acts& acts, const Tensor& x, const Positions& pos) const;
  // dres: on entry d(x_out); on exit d(x). Parameter gradients +=.
  void backward(const Tensor& dres, const Tensor& x, const Acts& acts, const BlockScratch& s,
                const Positions& pos) const;
};

}  // namespace lmforge
