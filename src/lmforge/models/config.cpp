#include "lmforge/models/config.h"

#include "lmforge/core/error.h"

namespace lmforge {

void ModelConfig::validate() const {
  auto need = [](bool ok, const char* key, const std::string& why) {
    if (!ok) fail("model.{}: {}", key, why);
  };
  need(arch == "gpt2" || arch == "llama", "arch", "expected gpt2 or llama, got \"" + arch + "\"");
  need(vocab_size > 0, "vocab_size", "must be positive");
  need(n_layer > 0, "n_layer", "must be positive");
  need(n_head > 0, "n_head", "must be positive");
  need(n_embd > 0 && n_embd % n_head == 0, "n_embd",
       fmt::format("{} must be a positive multiple of n_head={}", n_embd, n_head));
  need(kv_heads() > 0 && n_head % kv_heads() == 0, "n_kv_head",
       fmt::format("n_head={} must be a multiple of n_kv_head={}", n_head, kv_heads()));
  need(norm == "layernorm" || norm == "rmsnorm", "norm", "expected layernorm or rmsnorm");
  need(mlp == "gelu" || mlp == "swiglu", "mlp", "expected gelu or swiglu");
  need(pos == "learned" || pos == "rope", "pos", "expected learned or rope");
  need(pos != "rope" || head_size() % 2 == 0, "n_embd", "rope needs an even head size");
  need(max_seq_len > 0, "max_seq_len", "must be positive");
  need(ffn() > 0, "ffn_hidden", "must be positive");
}

int64_t ModelConfig::num_params() const {
  int64_t C = n_embd, F = ffn();
  int64_t per_norm = C * (norm == "layernorm" && bias ? 2 : 1);
  int64_t attn = C * qkv_dim() + C * C + (bias ? qkv_dim() + C : 0);
  int64_t mlp_p =
      mlp == "swiglu" ? 3 * C * F + (bias ? 2 * F + C : 0) : 2 * C * F + (bias ? F + C : 0);
  int64_t n = vocab_size * C + (pos == "learned" ? max_seq_len * C : 0);
  n += n_layer * (2 * per_norm + attn + mlp_p) + per_norm;
  if (!tie_embeddings) n += vocab_size * C;
  return n;
}

}  // namespace lmforge
