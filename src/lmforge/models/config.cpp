#include "lmforge/models/config.h"

#include "lmforge/core/error.h"

namespace lmforge {

void ModelConfig::validate() const {
  auto need = [](bool ok, const char* key, const std::string& why) {
    if (!ok) fail("model.{}: {}", key, why);
  };
  need(arch == "gpt2" || arch == "llama" || arch == "mistral" || arch == "qwen2" ||
           arch == "qwen3" || arch == "phi3",
       "arch", "expected gpt2, llama, mistral, qwen2, qwen3 or phi3, got \"" + arch + "\"");
  need(vocab_size > 0, "vocab_size", "must be positive");
  need(n_layer > 0, "n_layer", "must be positive");
  need(n_head > 0, "n_head", "must be positive");
  need(head_dim >= 0, "head_dim", "must be >= 0 (0 = n_embd / n_head)");
  need(n_embd > 0 && (head_dim > 0 || n_embd % n_head == 0), "n_embd",
       fmt::format("{} must be a positive multiple of n_head={} (or set model.head_dim)", n_embd,
                   n_head));
  need(sliding_window >= 0, "sliding_window", "must be >= 0 (0 = off)");
  need(!qk_norm || norm == "rmsnorm", "qk_norm", "needs norm: rmsnorm");
  need(kv_heads() > 0 && n_head % kv_heads() == 0, "n_kv_head",
       fmt::format("n_head={} must be a multiple of n_kv_head={}", n_head, kv_heads()));
  need(norm == "layernorm" || norm == "rmsnorm", "norm", "expected layernorm or rmsnorm");
  need(mlp == "gelu" || mlp == "swiglu", "mlp", "expected gelu or swiglu");
  need(pos == "learned" || pos == "rope", "pos", "expected learned or rope");
  need(pos != "rope" || head_size() % 2 == 0, "n_embd", "rope needs an even head size");
  need(max_seq_len > 0, "max_seq_len", "must be positive");
  need(ffn() > 0, "ffn_hidden", "must be positive");
  need(norm_eps > 0, "norm_eps", fmt::format("must be positive, got {}", norm_eps));
  need(pos != "rope" || rope_theta > 0, "rope_theta",
       fmt::format("must be positive, got {}", rope_theta));
  // Far beyond any model, and small enough that the parameter counts cannot overflow.
  constexpr int64_t kMaxDim = int64_t{1} << 24;
  for (auto [key, v] : {std::pair{"vocab_size", vocab_size},
                        {"n_embd", n_embd},
                        {"n_head", n_head},
                        {"head_dim", head_dim},
                        {"ffn_hidden", ffn()},
                        {"max_seq_len", max_seq_len}})
    need(v <= kMaxDim, key, fmt::format("{} is beyond any model (at most {})", v, kMaxDim));
  need(n_layer <= 4096, "n_layer", fmt::format("{} is beyond any model (at most 4096)", n_layer));
  need(lora.rank >= 0 && lora.rank <= 65536, "lora_rank",
       fmt::format("must be in [0, 65536] (0 = off), got {}", lora.rank));
  if (lora.on()) {
    need(lora.alpha > 0 && lora.alpha < 1e9, "lora_alpha",
         fmt::format("must be positive, got {}", lora.alpha));
    size_t pos = 0;
    while (pos <= lora.targets.size()) {
      size_t comma = lora.targets.find(',', pos);
      if (comma == std::string::npos) comma = lora.targets.size();
      const std::string t = lora.targets.substr(pos, comma - pos);
      need(t == "qkv" || t == "proj" || t == "fc" || t == "down", "lora_targets",
           fmt::format("\"{}\" is not a layer; list some of qkv, proj, fc, down (comma-separated)",
                       t));
      pos = comma + 1;
    }
  }
}

bool LoraConfig::targets_layer(const std::string& layer) const {
  if (!on()) return false;
  size_t pos = 0;
  while (pos <= targets.size()) {
    size_t comma = targets.find(',', pos);
    if (comma == std::string::npos) comma = targets.size();
    if (targets.compare(pos, comma - pos, layer) == 0) return true;
    pos = comma + 1;
  }
  return false;
}

std::vector<int64_t> ModelConfig::lora_pieces(const std::string& layer) const {
  const bool fused = arch == "gpt2" || arch == "phi3";  // HF's own fused modules
  const int64_t q = n_head * head_size(), kv = kv_heads() * head_size();
  if (layer == "qkv") return fused ? std::vector<int64_t>{qkv_dim()} : std::vector{q, kv, kv};
  if (layer == "fc") {
    if (mlp != "swiglu") return {ffn()};
    return fused ? std::vector<int64_t>{2 * ffn()} : std::vector{ffn(), ffn()};
  }
  if (layer == "proj") return {n_embd};
  LMF_CHECK(layer == "down", "no layer {}", layer);
  return {n_embd};
}

int64_t ModelConfig::lora_params() const {
  if (!lora.on()) return 0;
  const int64_t C = n_embd, r = lora.rank;
  int64_t per_block = 0;
  // Each module its A (r, in) and B (out, r).
  for (auto [layer, in] : {std::pair<const char*, int64_t>{"qkv", C},
                           {"proj", n_head * head_size()},
                           {"fc", C},
                           {"down", ffn()}}) {
    if (!lora.targets_layer(layer)) continue;
    for (int64_t out : lora_pieces(layer)) per_block += r * (in + out);
  }
  return n_layer * per_block;
}

double ModelConfig::flops_per_token(int64_t T) const {
  int64_t N = num_params() - (pos == "learned" ? max_seq_len * n_embd : 0) -
              (tie_embeddings ? 0 : vocab_size * n_embd);
  return 6.0 * static_cast<double>(N) +
         12.0 * static_cast<double>(n_layer * n_head * head_size() * T);
}

int64_t ModelConfig::num_params() const {
  int64_t C = n_embd, F = ffn();
  int64_t per_norm = C * (norm == "layernorm" && bias ? 2 : 1);
  int64_t attn_out = n_head * head_size();
  int64_t attn = C * qkv_dim() + attn_out * C + (has_qkv_bias() ? qkv_dim() : 0) + (bias ? C : 0) +
                 (qk_norm ? 2 * head_size() : 0);
  int64_t mlp_p =
      mlp == "swiglu" ? 3 * C * F + (bias ? 2 * F + C : 0) : 2 * C * F + (bias ? F + C : 0);
  int64_t n = vocab_size * C + (pos == "learned" ? max_seq_len * C : 0);
  n += n_layer * (2 * per_norm + attn + mlp_p) + per_norm;
  if (!tie_embeddings) n += vocab_size * C;
  return n;
}

}  // namespace lmforge
