#include "lmforge/models/config.h"

#include <algorithm>
#include <iterator>

#include "lmforge/core/error.h"

namespace lmforge {

namespace {
constexpr const char* kLoraLayers[] = {"qkv", "proj", "fc", "down"};
// The items of a comma-separated list.
std::vector<std::string> comma_list(const std::string& s) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos <= s.size()) {
    size_t comma = s.find(',', pos);
    if (comma == std::string::npos) comma = s.size();
    out.push_back(s.substr(pos, comma - pos));
    pos = comma + 1;
  }
  return out;
}
bool module_matches(const std::string& module, const std::string& target);
}  // namespace

void ModelConfig::validate() const {
  auto need = [](bool ok, const char* key, const std::string& why) {
    if (!ok) fail("model.{}: {}", key, why);
  };
  need(arch == "gpt2" || arch == "llama" || arch == "mistral" || arch == "qwen2" ||
           arch == "qwen3" || arch == "phi3" || arch == "gemma" || arch == "gemma2" ||
           arch == "gemma3",
       "arch",
       "expected gpt2, llama, mistral, qwen2, qwen3, phi3, gemma, gemma2 or gemma3, got \"" + arch +
           "\"");
  need(vocab_size > 0, "vocab_size", "must be positive");
  need(n_layer > 0, "n_layer", "must be positive");
  need(n_head > 0, "n_head", "must be positive");
  need(head_dim >= 0, "head_dim", "must be >= 0 (0 = n_embd / n_head)");
  need(n_embd > 0 && (head_dim > 0 || n_embd % n_head == 0), "n_embd",
       fmt::format("{} must be a positive multiple of n_head={} (or set model.head_dim)", n_embd,
                   n_head));
  need(sliding_window >= 0, "sliding_window", "must be >= 0 (0 = off)");
  need(full_attention_every >= 0, "full_attention_every", "must be >= 0 (0 = off)");
  need(full_attention_every == 0 || sliding_window > 0, "full_attention_every",
       "picks the layers without a window; set model.sliding_window too");
  need(rope_local_theta >= 0, "rope_local_theta", "must be >= 0 (0 = rope_theta)");
  need(rope_scaling.type == "llama3" || rope_scaling.type == "linear", "rope_scaling.type",
       "expected llama3 or linear, got \"" + rope_scaling.type + "\"");
  need(rope_scaling.factor >= 0, "rope_scaling.factor",
       fmt::format("must be >= 0 (0 = no scaling), got {}", rope_scaling.factor));
  need(rope_scaling.factor == 0 || rope_scaling.type != "llama3" ||
           (rope_scaling.low_freq_factor > 0 &&
            rope_scaling.high_freq_factor > rope_scaling.low_freq_factor &&
            rope_scaling.original_max_position_embeddings > 0),
       "rope_scaling",
       "llama3 scaling needs 0 < low_freq_factor < high_freq_factor and "
       "original_max_position_embeddings > 0");
  need(init_std >= 0, "init_std", fmt::format("must be >= 0, got {}", init_std));
  need(rope_local_theta == 0 || (pos == "rope" && sliding_window > 0), "rope_local_theta",
       "is the RoPE base of the sliding-window layers; needs pos: rope and model.sliding_window");
  need(!post_norms || norm == "rmsnorm", "post_norms", "needs norm: rmsnorm");
  need(attn_scale_dim >= 0, "attn_scale_dim", "must be >= 0 (0 = the head size)");
  need(attn_softcap >= 0, "attn_softcap", "must be >= 0 (0 = off)");
  need(logit_softcap >= 0, "logit_softcap", "must be >= 0 (0 = off)");
  need(norm_offset == 0 || (norm == "rmsnorm" && norm_offset == 1), "norm_offset",
       "is 0, or 1 with norm: rmsnorm (Gemma's 1 + w)");
  need(!embed_scale || pos == "rope", "embed_scale",
       "scales the token embeddings of a rope model (Gemma); set pos: rope");
  need(!qk_norm || norm == "rmsnorm", "qk_norm", "needs norm: rmsnorm");
  need(kv_heads() > 0 && n_head % kv_heads() == 0, "n_kv_head",
       fmt::format("n_head={} must be a multiple of n_kv_head={}", n_head, kv_heads()));
  need(norm == "layernorm" || norm == "rmsnorm", "norm", "expected layernorm or rmsnorm");
  need(mlp == "gelu" || mlp == "swiglu" || mlp == "geglu", "mlp", "expected gelu, swiglu or geglu");
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
    need(lora.dropout >= 0 && lora.dropout < 1, "lora_dropout",
         fmt::format("must be in [0, 1) (0.05 typical), got {}", lora.dropout));
    std::vector<std::string> names;  // this family's modules, for the message
    for (const char* layer : kLoraLayers)
      for (const std::string& m : lora_module_names(layer))
        if (std::find(names.begin(), names.end(), m.substr(m.rfind('.') + 1)) == names.end())
          names.push_back(m.substr(m.rfind('.') + 1));
    std::string modules;
    for (const std::string& n : names) modules += (modules.empty() ? "" : ", ") + n;
    for (const std::string& t : comma_list(lora.targets)) {
      bool known =
          std::find(std::begin(kLoraLayers), std::end(kLoraLayers), t) != std::end(kLoraLayers);
      for (const char* layer : kLoraLayers)
        for (const std::string& m : lora_module_names(layer)) known |= module_matches(m, t);
      need(known, "lora_targets",
           fmt::format("\"{}\" is not a layer or module of this {} model; list some of qkv, "
                       "proj, fc, down or of its modules {} (comma-separated)",
                       t, arch, modules));
    }
  }
}

std::vector<std::string> ModelConfig::lora_module_names(const std::string& layer) const {
  if (arch == "gpt2") {
    if (layer == "qkv") return {"attn.c_attn"};
    if (layer == "proj") return {"attn.c_proj"};
    return {layer == "fc" ? "mlp.c_fc" : "mlp.c_proj"};
  }
  if (layer == "qkv")
    return arch == "phi3" ? std::vector<std::string>{"self_attn.qkv_proj"}
                          : std::vector<std::string>{"self_attn.q_proj", "self_attn.k_proj",
                                                     "self_attn.v_proj"};
  if (layer == "proj") return {"self_attn.o_proj"};
  if (layer == "down") return {"mlp.down_proj"};
  if (!gated_mlp()) return {"mlp.fc"};  // (no such Hugging Face family)
  return arch == "phi3" ? std::vector<std::string>{"mlp.gate_up_proj"}
                        : std::vector<std::string>{"mlp.gate_proj", "mlp.up_proj"};
}

std::vector<bool> ModelConfig::lora_modules(const std::string& layer) const {
  const std::vector<std::string> names = lora_module_names(layer);
  std::vector<bool> on(names.size(), false);
  if (!lora.on()) return on;
  for (const std::string& t : comma_list(lora.targets))
    for (size_t i = 0; i < names.size(); ++i)
      on[i] = on[i] || t == layer || module_matches(names[i], t);
  return on;
}

bool ModelConfig::lora_adapts(const std::string& layer) const {
  const std::vector<bool> on = lora_modules(layer);
  return std::find(on.begin(), on.end(), true) != on.end();
}

std::string lora_layer_of(const std::string& param) {
  for (auto [part, layer] : {std::pair{".attn.qkv.", "qkv"},
                             {".attn.proj.", "proj"},
                             {".mlp.fc.", "fc"},
                             {".mlp.proj.", "down"}})
    if (param.find(part) != std::string::npos) return layer;
  return "";
}

namespace {
// PEFT's target_modules rule: a module matches a name equal to it or to its last components.
bool module_matches(const std::string& module, const std::string& target) {
  return module == target || (module.size() > target.size() && module.ends_with(target) &&
                              module[module.size() - target.size() - 1] == '.');
}
}  // namespace

std::vector<int64_t> ModelConfig::lora_pieces(const std::string& layer) const {
  const bool fused = arch == "gpt2" || arch == "phi3";  // HF's own fused modules
  const int64_t q = n_head * head_size(), kv = kv_heads() * head_size();
  if (layer == "qkv") return fused ? std::vector<int64_t>{qkv_dim()} : std::vector{q, kv, kv};
  if (layer == "fc") {
    if (!gated_mlp()) return {ffn()};
    return fused ? std::vector<int64_t>{2 * ffn()} : std::vector{ffn(), ffn()};
  }
  if (layer == "proj") return {n_embd};
  LMF_CHECK(layer == "down", "no layer {}", layer);
  return {n_embd};
}

int64_t ModelConfig::lora_in(const std::string& layer) const {
  if (layer == "proj") return n_head * head_size();
  if (layer == "down") return ffn();
  LMF_CHECK(layer == "qkv" || layer == "fc", "no layer {}", layer);
  return n_embd;
}

int64_t ModelConfig::lora_params(bool adapted) const {
  if (!lora.on()) return 0;
  const int64_t r = lora.rank;
  int64_t per_block = 0;
  // Each module of an adapted layer its A (r, in) and B (out, r) (those it leaves out too: they
  // are held, at 0), or with `adapted` those of the modules adapted alone.
  for (const char* layer : kLoraLayers) {
    if (!lora_adapts(layer)) continue;
    const int64_t in = lora_in(layer);
    const std::vector<int64_t> pieces = lora_pieces(layer);
    const std::vector<bool> on = lora_modules(layer);
    for (size_t i = 0; i < pieces.size(); ++i)
      if (!adapted || on[i]) per_block += r * (in + pieces[i]);
  }
  return n_layer * per_block;
}

namespace {
// N of the FLOP counts: the parameters but the learned positions and an untied input table.
double flop_params(const ModelConfig& c) {
  return static_cast<double>(c.num_params() - (c.pos == "learned" ? c.max_seq_len * c.n_embd : 0) -
                             (c.tie_embeddings ? 0 : c.vocab_size * c.n_embd));
}
}  // namespace

double ModelConfig::flops_per_token(int64_t T) const {
  // LoRA computes no gradient for the frozen weights (forward and input gradient: 4 a parameter)
  // and the whole 6 for each adapter's.
  const double N = flop_params(*this);
  const double weights =
      lora.on() ? 4.0 * N + 6.0 * static_cast<double>(lora_params(/*adapted=*/true)) : 6.0 * N;
  return weights + 12.0 * static_cast<double>(n_layer * n_head * head_size() * T);
}

double ModelConfig::forward_flops_per_token(int64_t T) const {
  return 2.0 * (flop_params(*this) + static_cast<double>(lora_params(/*adapted=*/true))) +
         4.0 * static_cast<double>(n_layer * n_head * head_size() * T);
}

int64_t ModelConfig::num_params() const {
  int64_t C = n_embd, F = ffn();
  int64_t per_norm = C * (norm == "layernorm" && bias ? 2 : 1);
  int64_t attn_out = n_head * head_size();
  int64_t attn = C * qkv_dim() + attn_out * C + (has_qkv_bias() ? qkv_dim() : 0) + (bias ? C : 0) +
                 (qk_norm ? 2 * head_size() : 0);
  int64_t mlp_p = gated_mlp() ? 3 * C * F + (bias ? 2 * F + C : 0) : 2 * C * F + (bias ? F + C : 0);
  int64_t n = vocab_size * C + (pos == "learned" ? max_seq_len * C : 0);
  n += n_layer * ((post_norms ? 4 : 2) * per_norm + attn + mlp_p) + per_norm;
  if (!tie_embeddings) n += vocab_size * C;
  return n;
}

}  // namespace lmforge
