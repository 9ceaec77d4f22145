// ModelConfig: one decoder-only transformer that covers GPT-2 and the Llama family (Llama 2/3,
// Mistral, Qwen2/3, Phi-3, SmolLM, TinyLlama).
//
//   GPT-2:   norm=layernorm, mlp=gelu,   pos=learned, bias=true,  tie_embeddings=true
//   Llama3:  norm=rmsnorm,   mlp=swiglu, pos=rope,    bias=false, tie_embeddings=false (3.2: true)
//   Mistral: Llama + sliding_window;  Phi-3: Llama with HF's fused qkv/gate_up tensor names;
//   Qwen2:   Llama + qkv_bias;        Qwen3: Llama + qk_norm (and head_dim != n_embd / n_head)
//   Gemma:   Llama with mlp=geglu, embed_scale, tied embeddings; Gemma 2 adds post_norms,
//            sliding_window on all layers but every full_attention_every-th (2), attn_softcap
//            and logit_softcap; Gemma 3 (gemma3_text) drops the soft-capping for qk_norm and
//            rope_local_theta on the windowed layers (every 6th full). Gemma's RMSNorms scale by
//            1 + w (norm_offset 1, their weights starting at 0); attn_scale_dim is its
//            query_pre_attn_scalar.
//
// `arch` names the Hugging Face family (models/hf.h): the tensor names and config.json layout
// used for import and export. The other fields say what the network computes.
//
// Presets (models/presets.h) fill every field; any field can then be overridden by config.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "lmforge/backend/attn_score.h"

namespace lmforge {

// RoPE scaling; factor == 0 means off. type llama3: Llama 3.1's (the low frequencies divided by
// factor, the high ones kept, a smooth ramp between); linear: every frequency divided by factor
// (positions interpolated; Gemma 3 4B and up, on its full-attention layers).
struct RopeScaling {
  std::string type = "llama3";  // llama3 | linear
  double factor = 0;
  double low_freq_factor = 1;
  double high_freq_factor = 4;
  int64_t original_max_position_embeddings = 8192;
};

// Low-rank adapters (LoRA, Hu et al. 2021) on the linear layers of every block named in
// `targets`: lmforge's layers (qkv, proj, fc, down) or Hugging Face modules as PEFT's
// target_modules names them (q_proj, v_proj, mlp.c_proj, ...; docs/config.md). Each adapted
// module (ModelConfig::lora_pieces, lora_modules) computes W x + b + (alpha / rank) B (A x) with
// its own A (rank, in) and B (out, rank), B starting at 0, as PEFT's adapters; only the adapters
// train: every other parameter is frozen. rank 0 = off.
struct LoraConfig {
  int64_t rank = 0;
  double alpha = 16;
  std::string targets = "qkv,proj,fc,down";
  // PEFT's lora_dropout: training forwards zero each element of an adapter's input with this
  // probability (and scale the rest by 1 / (1 - dropout)); the base layer sees the whole input.
  double dropout = 0;
  bool on() const { return rank > 0; }
  double scale() const { return alpha / static_cast<double>(rank); }
};

struct ModelConfig {
  std::string preset;  // name it came from, for logs
  std::string arch =
      "gpt2";  // gpt2 | llama | mistral | qwen2 | qwen3 | phi3 | gemma | gemma2 | gemma3
  int64_t vocab_size = 50257;      // V
  int64_t max_seq_len = 1024;      // positions (learned table size / rope table size)
  int64_t n_layer = 12;            // L
  int64_t n_head = 12;             // NH
  int64_t n_kv_head = 0;           // NKV; 0 means = n_head (no GQA)
  int64_t n_embd = 768;            // C
  int64_t head_dim = 0;            // HS; 0 means n_embd / n_head
  int64_t ffn_hidden = 0;          // F; 0 means 4*C for gelu
  std::string norm = "layernorm";  // layernorm | rmsnorm
  double norm_eps = 1e-5;
  double norm_offset = 0;       // RMSNorms scale by norm_offset + w (Gemma: 1, w initialised to 0)
  std::string mlp = "gelu";     // gelu (GELU-tanh) | swiglu | geglu (gated, GELU-tanh)
  std::string pos = "learned";  // learned | rope
  double rope_theta = 10000;
  RopeScaling rope_scaling;
  bool bias = true;            // biases in every linear layer and LayerNorm (GPT-2)
  bool qkv_bias = false;       // q/k/v biases even when bias is false (Qwen2)
  bool qk_norm = false;        // RMSNorm over each q and k head before RoPE (Qwen3)
  int64_t sliding_window = 0;  // attend to the last W positions only; 0 = all (Mistral)
  // With sliding_window: layers N-1, 2N-1, ... attend to all positions, the others through the
  // window (Gemma 3: 6); 0 = every layer through the window.
  int64_t full_attention_every = 0;
  double rope_local_theta = 0;  // RoPE base of the windowed layers (Gemma 3: 10000); 0 = rope_theta
  bool embed_scale = false;     // token embeddings times sqrt(n_embd) (Gemma)
  bool post_norms = false;      // a norm on each branch's output before its residual add (Gemma 3)
  // Attention scores scaled by 1 / sqrt(attn_scale_dim) (Gemma's query_pre_attn_scalar); 0 = the
  // head size.
  int64_t attn_scale_dim = 0;
  double attn_softcap =
      0;  // attention scores soft-capped, cap tanh(s / cap) (Gemma 2: 50); 0 = off
  double logit_softcap = 0;  // the LM head's logits soft-capped likewise (Gemma 2: 30); 0 = off
  bool tie_embeddings = true;
  double init_std = 0.02;
  LoraConfig lora;

  int64_t kv_heads() const { return n_kv_head ? n_kv_head : n_head; }
  int64_t head_size() const { return head_dim ? head_dim : n_embd / n_head; }
  bool has_qkv_bias() const { return bias || qkv_bias; }
  int64_t ffn() const { return ffn_hidden ? ffn_hidden : 4 * n_embd; }
  int64_t qkv_dim() const { return (n_head + 2 * kv_heads()) * head_size(); }
  bool gated_mlp() const { return mlp != "gelu"; }                      // fc is [gate | up] (2F, C)
  int64_t fc_width() const { return gated_mlp() ? 2 * ffn() : ffn(); }  // fc's outputs
  // Layer l's attention window (0 = all positions) and whether it uses rope_local_theta.
  int64_t window(int64_t layer) const {
    return full_attention_every > 0 && (layer + 1) % full_attention_every == 0 ? 0 : sliding_window;
  }
  bool local_rope(int64_t layer) const { return rope_local_theta > 0 && window(layer) > 0; }
  // How attention forms its scores (scale, soft-capping).
  AttnScore attn_score() const { return {attn_scale_dim, static_cast<float>(attn_softcap)}; }
  // Throws Error naming the field when the combination is inconsistent.
  void validate() const;
  // Parameter count (tied embeddings counted once), without LoRA adapters; lora_params() counts
  // those.
  int64_t num_params() const;
  // The adapters' parameters held (adapted: those of the adapted modules alone; see
  // lora_modules).
  int64_t lora_params(bool adapted = false) const;
  // The output widths of the Hugging Face modules a layer of a block holds ("qkv", "proj", "fc",
  // "down"), in order: each has its own LoRA A. Llama's qkv is q_proj, k_proj and v_proj, its fc
  // gate_proj and up_proj; GPT-2's c_attn and c_fc and Phi-3's qkv_proj and gate_up_proj are one
  // module each, as proj and down are everywhere (models/hf.h hf_pieces splits alike).
  std::vector<int64_t> lora_pieces(const std::string& layer) const;
  int64_t lora_in(const std::string& layer) const;  // the layer's input width (each A's columns)
  // Those modules' names as Hugging Face's model has them under a block ("self_attn.q_proj",
  // GPT-2's "attn.c_attn"), and whether lora.targets adapts each: the layer's name, or a module
  // name or its last components (PEFT's rule: "c_proj" is both of GPT-2's). An adapted layer holds
  // an A and B for each of its modules; those of a module left out stay 0 (nn/linear.h).
  std::vector<std::string> lora_module_names(const std::string& layer) const;
  std::vector<bool> lora_modules(const std::string& layer) const;
  bool lora_adapts(const std::string& layer) const;  // any of its modules
  // Training FLOPs per token at sequence length T (forward + backward), as BENCHMARKS.md defines
  // them: 6 N + 12 L (NH HS) T, N = non-embedding parameters + the LM head; under LoRA (lmforge's
  // count of the work done) the frozen N count 4 (no weight gradients) and the adapters' 6.
  double flops_per_token(int64_t T) const;
  // One forward's (a distillation teacher's): 2 (N + adapters) + 4 L (NH HS) T.
  double forward_flops_per_token(int64_t T) const;
};

// The layer ("qkv", "proj", "fc", "down") a block parameter ("blocks.3.mlp.fc.lora_a") belongs
// to, or "".
std::string lora_layer_of(const std::string& param);

}  // namespace lmforge
