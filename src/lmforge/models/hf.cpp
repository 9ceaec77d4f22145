#include "lmforge/models/hf.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>

#include "lmforge/core/error.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/tokenizer/tokenizer.h"

namespace lmforge {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

struct Family {
  const char* arch;          // ModelConfig::arch
  const char* model_type;    // config.json "model_type"
  const char* architecture;  // config.json "architectures"
  bool has_head_dim;         // the config class lists "head_dim" (written always)
};

const Family kFamilies[] = {
    {"gpt2", "gpt2", "GPT2LMHeadModel", false},
    {"llama", "llama", "LlamaForCausalLM", true},
    {"mistral", "mistral", "MistralForCausalLM", true},
    {"qwen2", "qwen2", "Qwen2ForCausalLM", false},
    {"qwen3", "qwen3", "Qwen3ForCausalLM", true},
    {"phi3", "phi3", "Phi3ForCausalLM", false},
    {"gemma", "gemma", "GemmaForCausalLM", true},
    {"gemma2", "gemma2", "Gemma2ForCausalLM", true},
    {"gemma3", "gemma3_text", "Gemma3ForCausalLM", true},  // (Gemma 3's text-only models)
};

const Family* find_family(const std::string& name, bool by_arch = false) {
  for (const Family& f : kFamilies)
    if (name == (by_arch ? f.arch : f.model_type)) return &f;
  return nullptr;
}

// Keys every PretrainedConfig may carry that do not change the network's function: identity,
// token ids, generation defaults, head-task metadata and library switches.
const std::set<std::string> kMetadataKeys = {
    "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "initializer_range", "use_cache", "output_attentions", "output_hidden_states", "return_dict",
    "id2label", "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder",
    "is_decoder", "tokenizer_class", "prefix", "task_specific_params", "torchscript",
    "use_bfloat16", "tie_encoder_decoder", "cross_attention_hidden_size", "finetuning_task",
    "tf_legacy_loss", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "transformers.js_config", "is_llama_config", "auto_map", "cache_implementation",
    // GPT-2's sequence-summary head (for classification models, not the LM)
    "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
    "summary_first_dropout"};

// Dropout rates: lmforge trains without dropout, so a non-zero rate is reported, not applied.
const std::set<std::string> kDropoutKeys = {"attn_pdrop", "embd_pdrop", "resid_pdrop",
                                            "attention_dropout", "hidden_dropout"};

class ConfigReader {
 public:
  ConfigReader(const json& j, std::string source, HfConfig& out)
      : j_(j), src_(std::move(source)), out_(out) {}

  bool has(const std::string& k) {
    used_.insert(k);
    return j_.contains(k) && !j_[k].is_null();
  }
  const json& at(const std::string& k) {
    used_.insert(k);
    return j_.at(k);
  }
  int64_t integer(const std::string& k) {
    if (!has(k)) fail("{}: \"{}\" is missing; the config.json is incomplete", src_, k);
    if (!j_[k].is_number_integer()) bad(k, "an integer");
    return j_[k].get<int64_t>();
  }
  double number(const std::string& k, double dflt) {
    if (!has(k)) return dflt;
    if (!j_[k].is_number()) bad(k, "a number");
    return j_[k].get<double>();
  }
  bool boolean(const std::string& k, bool dflt) {
    if (!has(k)) return dflt;
    if (!j_[k].is_boolean()) bad(k, "true or false");
    return j_[k].get<bool>();
  }
  std::string string(const std::string& k, const std::string& dflt) {
    if (!has(k)) return dflt;
    if (!j_[k].is_string()) bad(k, "a string");
    return j_[k].get<std::string>();
  }
  // A field whose only supported value is `want` (absent or null also fine).
  template <typename V>
  void require(const std::string& k, const V& want, const std::string& why) {
    if (has(k) && j_[k] != json(want))
      fail("{}: \"{}\": {} is not supported ({}); lmforge supports {}", src_, k, j_[k].dump(), why,
           json(want).dump());
  }
  [[noreturn]] void unsupported(const std::string& k, const std::string& why) {
    fail("{}: \"{}\": {} is not supported ({})", src_, k, j_[k].dump(), why);
  }
  [[noreturn]] void bad(const std::string& k, const char* want) {
    fail("{}: \"{}\": expected {}, got {}", src_, k, want, j_[k].dump());
  }
  void note(const std::string& s) { out_.notes.push_back(s); }

  // Every key must have been looked at, be metadata, or be a dropout rate (noted when non-zero).
  void finish(const std::string& model_type) {
    for (auto& [k, v] : j_.items()) {
      if (used_.count(k) || kMetadataKeys.count(k)) continue;
      if (kDropoutKeys.count(k)) {
        if (v.is_number() && v.get<double>() != 0)
          note(fmt::format("{}={} ignored: lmforge trains without dropout", k, v.dump()));
        continue;
      }
      fail(
          "{}: \"{}\" ({}) is not supported by lmforge for model_type {}; remove it if it does "
          "not change the model, or use a supported architecture",
          src_, k, v.dump(), model_type);
    }
  }

  const std::string& source() const { return src_; }

 private:
  const json& j_;
  std::string src_;
  HfConfig& out_;
  std::set<std::string> used_;
};

// rope_theta and rope scaling: the legacy keys (rope_theta, rope_scaling) or transformers 5's
// rope_parameters, with transformers' precedence (convert_rope_params_to_dict): a non-empty
// legacy rope_scaling replaces rope_parameters whole; the top-level rope_theta and
// partial_rotary_factor only fill in what the parameters lack.
void read_rope(ConfigReader& r, const json& j, ModelConfig& m) {
  json params = json::object();
  if (r.has("rope_parameters")) {
    params = r.at("rope_parameters");
    if (!params.is_object()) r.bad("rope_parameters", "an object");
  }
  if (r.has("rope_scaling")) {
    if (!j.at("rope_scaling").is_object()) r.bad("rope_scaling", "an object or null");
    if (!j.at("rope_scaling").empty()) params = j.at("rope_scaling");
  }
  for (const char* k : {"rope_theta", "partial_rotary_factor"})
    if (r.has(k) && !params.contains(k)) params[k] = j.at(k);
  const std::string where = r.source() + ": rope_parameters";
  // A positive number under `k` (fallback when absent), or an error naming the file and key.
  auto positive = [&](const char* k, double fallback) {
    if (!params.contains(k)) return fallback;
    const json& v = params[k];
    if (!v.is_number() || !(v.get<double>() > 0))
      fail("{}: \"{}\": expected a positive number, got {}", where, k, v.dump());
    return v.get<double>();
  };
  std::string type = "default";
  for (const char* k : {"type", "rope_type"})  // rope_type wins
    if (params.contains(k)) {
      if (!params[k].is_string())
        fail("{}: \"{}\": expected a string, got {}", where, k, params[k].dump());
      type = params[k].get<std::string>();
    }
  if (type != "default" && type != "linear" && type != "llama3")
    fail("{}: rope_type \"{}\" is not supported (lmforge supports default, linear and llama3)",
         where, type);
  m.rope_theta = positive("rope_theta", 10000.0);
  for (auto& [k, v] : params.items()) {
    if (k == "rope_type" || k == "type" || k == "rope_theta") continue;
    if (k == "partial_rotary_factor") {
      if (!v.is_number() || v.get<double>() != 1.0)
        fail("{}: partial_rotary_factor={} is not supported (lmforge rotates whole heads)", where,
             v.dump());
      continue;
    }
    bool llama3_key = k == "factor" || k == "low_freq_factor" || k == "high_freq_factor" ||
                      k == "original_max_position_embeddings";
    if (!(type == "llama3" && llama3_key) && !(type == "linear" && k == "factor"))
      fail("{}: \"{}\" ({}) is not supported with rope_type {}", where, k, v.dump(), type);
  }
  if (type == "linear") {
    if (!params.contains("factor")) fail("{}: rope_type linear needs \"factor\"", where);
    m.rope_scaling.type = "linear";
    m.rope_scaling.factor = positive("factor", 0);
    return;
  }
  if (type == "llama3") {
    if (!params.contains("factor"))
      fail("{}: rope_type llama3 needs \"factor\" (e.g. 32.0 for Llama 3.2)", where);
    m.rope_scaling.factor = positive("factor", 0);
    m.rope_scaling.low_freq_factor = positive("low_freq_factor", 1.0);
    m.rope_scaling.high_freq_factor = positive("high_freq_factor", 4.0);
    // (absent: max_position_embeddings, as transformers' standardize_rope_params)
    m.rope_scaling.original_max_position_embeddings = static_cast<int64_t>(
        positive("original_max_position_embeddings", static_cast<double>(m.max_seq_len)));
  }
}

void read_gpt2(ConfigReader& r, ModelConfig& m) {
  m.norm = "layernorm";
  m.mlp = "gelu";
  m.pos = "learned";
  m.bias = true;
  m.vocab_size = r.integer("vocab_size");
  m.max_seq_len = r.integer("n_positions");
  if (r.has("n_ctx") && r.integer("n_ctx") != m.max_seq_len)
    r.unsupported("n_ctx", "it differs from n_positions");
  m.n_embd = r.integer("n_embd");
  m.n_layer = r.integer("n_layer");
  m.n_head = r.integer("n_head");
  m.ffn_hidden = r.has("n_inner") ? r.integer("n_inner") : 0;
  m.norm_eps = r.number("layer_norm_epsilon", 1e-5);
  std::string act = r.string("activation_function", "gelu_new");
  if (act != "gelu_new" && act != "gelu_pytorch_tanh")
    r.unsupported("activation_function", "lmforge's GPT-2 MLP uses the tanh GELU, gelu_new");
  r.require("scale_attn_weights", true, "attention is always scaled by 1/sqrt(head size)");
  r.require("scale_attn_by_inverse_layer_idx", false, "no per-layer attention scaling");
  r.require("add_cross_attention", false, "decoder-only");
  r.boolean("reorder_and_upcast_attn", false);  // numerics only: lmforge's softmax is fp64 anyway
  m.tie_embeddings = r.boolean("tie_word_embeddings", true);
}

void read_llama_like(ConfigReader& r, const json& j, const std::string& type, ModelConfig& m) {
  m.norm = "rmsnorm";
  m.mlp = "swiglu";
  m.pos = "rope";
  m.vocab_size = r.integer("vocab_size");
  m.n_embd = r.integer("hidden_size");
  m.ffn_hidden = r.integer("intermediate_size");
  m.n_layer = r.integer("num_hidden_layers");
  m.n_head = r.integer("num_attention_heads");
  m.n_kv_head = r.has("num_key_value_heads") ? r.integer("num_key_value_heads") : 0;
  if (m.n_kv_head == m.n_head) m.n_kv_head = 0;
  m.max_seq_len = r.integer("max_position_embeddings");
  m.norm_eps = r.number("rms_norm_eps", type == "phi3" ? 1e-5 : 1e-6);  // transformers' defaults
  if (r.has("head_dim")) {
    m.head_dim = r.integer("head_dim");
    if (m.n_head > 0 && m.head_dim * m.n_head == m.n_embd) m.head_dim = 0;  // the default
  }
  std::string act = r.string("hidden_act", "silu");
  if (act != "silu" && act != "swish")
    r.unsupported("hidden_act", "lmforge's gated MLP is SwiGLU (silu)");
  read_rope(r, j, m);
  if (r.has("pretraining_tp") && r.number("pretraining_tp", 1) != 1)  // (the same function)
    r.note(fmt::format(
        "pretraining_tp {} ignored: slicing the matmuls changes their rounding only (transformers "
        "5 ignores it too)",
        r.at("pretraining_tp").dump()));
  r.require("rope_interleaved", false, "lmforge uses the rotate-half RoPE layout");
  m.tie_embeddings = r.boolean("tie_word_embeddings", false);
  bool attn_bias = r.boolean("attention_bias", false), mlp_bias = r.boolean("mlp_bias", false);
  if (type == "qwen2") {
    m.qkv_bias = true;  // Qwen2 always has q/k/v biases and none elsewhere
  } else if (attn_bias || mlp_bias) {
    if (!(attn_bias && mlp_bias) || type != "llama")
      fail(
          "{}: attention_bias={} with mlp_bias={} is not supported for {} (lmforge has biases "
          "on all linear layers or none)",
          r.source(), attn_bias, mlp_bias, type);
    m.bias = true;
  }
  if (type == "qwen3") m.qk_norm = true;
  if (type == "mistral" || type == "phi3") {
    if (r.has("sliding_window"))
      m.sliding_window = r.integer("sliding_window");
    else if (type == "mistral" && !j.contains("sliding_window"))
      m.sliding_window = 4096;  // MistralConfig's default (null: none)
  } else if (type == "qwen2" || type == "qwen3") {
    // transformers windows layers i >= max_window_layers (default 28) under use_sliding_window
    r.has("max_window_layers");  // (read only with use_sliding_window)
    if (r.boolean("use_sliding_window", false)) {
      const int64_t full_layers = r.has("max_window_layers") ? r.integer("max_window_layers") : 28;
      if (full_layers < m.n_layer)
        r.unsupported("use_sliding_window",
                      fmt::format("a sliding window on layers {} to {} only (max_window_layers)",
                                  full_layers, m.n_layer - 1));
      r.note(fmt::format("use_sliding_window: no layer windows (max_window_layers {} >= {} layers)",
                         full_layers, m.n_layer));
    }
    if (r.has("sliding_window") && r.has("use_sliding_window") &&
        !r.boolean("use_sliding_window", false))
      r.note("sliding_window ignored: use_sliding_window is false");
    if (r.has("layer_types"))
      for (auto& t : r.at("layer_types"))
        if (t != "full_attention") r.unsupported("layer_types", "per-layer attention types");
  }
  if (type == "phi3") {
    // Only read by the longrope scaling, which read_rope() rejects.
    if (r.has("original_max_position_embeddings")) r.integer("original_max_position_embeddings");
    if (m.rope_scaling.factor > 0)  // (Phi3Config refuses them: default or longrope only)
      r.unsupported(r.has("rope_scaling") ? "rope_scaling" : "rope_parameters",
                    "Phi-3 takes no llama3 or linear RoPE scaling (transformers refuses it too)");
  }
}

// Gemma (GemmaForCausalLM), Gemma 2 (Gemma2ForCausalLM) and Gemma 3's text models
// (Gemma3ForCausalLM): Llama's layout with a GeGLU MLP, embeddings scaled by sqrt(hidden_size),
// RMSNorms that scale by 1 + weight (norm_offset); Gemma 2 adds norms on both branches' outputs,
// sliding-window layers (layer_types), query_pre_attn_scalar and soft-capped attention scores
// and logits; Gemma 3 has no soft-capping by default, adds q/k norms and gives the windowed layers
// their own RoPE base.
void read_gemma(ConfigReader& r, const json& j, const std::string& type, ModelConfig& m) {
  const bool g3 = type == "gemma3_text", g2 = type == "gemma2";
  m.norm = "rmsnorm";
  m.mlp = "geglu";
  m.pos = "rope";
  m.embed_scale = true;
  m.norm_offset = 1;
  m.qk_norm = g3;
  m.post_norms = g2 || g3;
  m.vocab_size = r.integer("vocab_size");
  m.n_embd = r.integer("hidden_size");
  m.ffn_hidden = r.integer("intermediate_size");
  m.n_layer = r.integer("num_hidden_layers");
  m.n_head = r.integer("num_attention_heads");
  // (transformers' defaults where a field is absent: GemmaConfig's, Gemma2Config's,
  // Gemma3TextConfig's)
  m.n_kv_head = r.has("num_key_value_heads") ? r.integer("num_key_value_heads") : g2 || g3 ? 4 : 16;
  if (m.n_kv_head == m.n_head) m.n_kv_head = 0;
  m.max_seq_len = r.integer("max_position_embeddings");
  m.norm_eps = r.number("rms_norm_eps", 1e-6);
  m.head_dim = r.has("head_dim") ? r.integer("head_dim") : 256;  // transformers' default
  if (m.n_head > 0 && m.head_dim * m.n_head == m.n_embd) m.head_dim = 0;
  // The gate's activation: the tanh GELU ("gelu" is Gemma's legacy name for it).
  for (const char* k : {"hidden_act", "hidden_activation"}) {
    const std::string act = r.string(k, "gelu_pytorch_tanh");
    if (act != "gelu_pytorch_tanh" && !(act == "gelu" && type == "gemma"))
      r.unsupported(k, "lmforge's Gemma MLP is GeGLU with the tanh GELU, gelu_pytorch_tanh");
  }
  m.tie_embeddings = r.boolean("tie_word_embeddings", true);
  r.require("attention_bias", false, "Gemma has no biases");
  if (r.has("use_bidirectional_attention") && r.boolean("use_bidirectional_attention", false))
    r.unsupported("use_bidirectional_attention", "lmforge's decoders are causal");
  if (type == "gemma") {
    read_rope(r, j, m);
    return;
  }
  // Soft-capping: a positive cap, or null (none; Gemma 3's default, Gemma 2's 50 and 30).
  auto cap = [&](const char* k, double fallback) {
    if (!r.has(k)) return j.contains(k) ? 0.0 : fallback;  // (has: present and not null)
    const double v = r.number(k, fallback);
    if (!(v > 0)) r.bad(k, "a positive number or null");
    return v;
  };
  m.attn_softcap = cap("attn_logit_softcapping", g2 ? 50.0 : 0.0);
  if (g3 && m.attn_softcap > 0) {  // Gemma3Attention passes no softcap to its attention
    r.note(fmt::format(
        "attn_logit_softcapping={:g} ignored: transformers' Gemma 3 attention does not apply it",
        m.attn_softcap));
    m.attn_softcap = 0;
  }
  m.logit_softcap = cap("final_logit_softcapping", g2 ? 30.0 : 0.0);
  // Scores scaled by query_pre_attn_scalar^-1/2 (256: transformers' default).
  const double qpas = r.number("query_pre_attn_scalar", 256);
  if (!(qpas >= 1) || qpas != static_cast<double>(static_cast<int64_t>(qpas)))
    r.bad("query_pre_attn_scalar", "a positive integer");
  m.attn_scale_dim = static_cast<int64_t>(qpas) == m.head_size() ? 0 : static_cast<int64_t>(qpas);
  // Which layers attend through the window: layer_types, or (as transformers builds it) every
  // other layer (Gemma 2) or every sliding_window_pattern-th (Gemma 3) is full; the
  // "_sliding_window_pattern" Gemma 3 writes is not read back.
  const int64_t pattern = !g3                               ? 2
                          : r.has("sliding_window_pattern") ? r.integer("sliding_window_pattern")
                                                            : 6;
  if (g3) r.has("_sliding_window_pattern");
  std::vector<bool> full(m.n_layer);
  if (r.has("layer_types")) {
    const json& t = r.at("layer_types");
    if (!t.is_array() || static_cast<int64_t>(t.size()) != m.n_layer)
      r.bad("layer_types", "a list of num_hidden_layers attention types");
    for (int64_t i = 0; i < m.n_layer; ++i) {
      if (t[i] != "full_attention" && t[i] != "sliding_attention")
        r.unsupported("layer_types", "full_attention and sliding_attention layers only");
      full[i] = t[i] == "full_attention";
    }
  } else {
    for (int64_t i = 0; i < m.n_layer; ++i) full[i] = pattern > 0 && (i + 1) % pattern == 0;
  }
  const int64_t first_full = std::find(full.begin(), full.end(), true) - full.begin();
  const bool windows = std::find(full.begin(), full.end(), false) != full.end();
  if (windows) {
    if (j.contains("sliding_window") && j["sliding_window"].is_null())
      r.unsupported("sliding_window",
                    "layers with sliding_attention need a window (transformers fails on it too)");
    m.sliding_window = r.has("sliding_window") ? r.integer("sliding_window") : 4096;
    m.full_attention_every = first_full < m.n_layer ? first_full + 1 : 0;
    for (int64_t i = 0; i < m.n_layer; ++i)
      if (full[i] != (m.full_attention_every > 0 && (i + 1) % m.full_attention_every == 0))
        r.unsupported("layer_types", "full attention on every N-th layer (N-1, 2N-1, ...) only");
  } else {
    r.has("sliding_window");  // (no layer uses it)
  }
  if (g2) {                        // one RoPE base for every layer, as Llama's
    r.has("sliding_window_size");  // (legacy, in the 9B and 27B configs: transformers ignores it)
    read_rope(r, j, m);
    return;
  }
  // RoPE: transformers 5's rope_parameters per layer type, with rope_scaling merged into the full
  // layers' entry (Gemma 3 4B and up: linear, factor 8), else rope_theta (full layers) and
  // rope_local_base_freq (sliding ones), else 1e6 and 1e4 (transformers' order). The sliding
  // layers are never scaled.
  double theta = r.number("rope_theta", 1e6), local = r.number("rope_local_base_freq", 1e4);
  json full_rope = json::object(), sliding_rope = json::object();
  if (r.has("rope_parameters")) {
    const json& p = r.at("rope_parameters");
    for (auto& [kind, v] : p.items()) {
      if ((kind != "full_attention" && kind != "sliding_attention") || !v.is_object())
        r.unsupported("rope_parameters", "full_attention and sliding_attention entries only");
      (kind == "full_attention" ? full_rope : sliding_rope) = v;
    }
  }
  if (r.has("rope_scaling")) {
    if (!r.at("rope_scaling").is_object()) r.bad("rope_scaling", "an object or null");
    for (auto& [k, x] : r.at("rope_scaling").items()) full_rope[k] = x;
  }
  for (const bool is_full : {true, false}) {
    const char* key = r.has("rope_scaling") && is_full ? "rope_scaling" : "rope_parameters";
    std::string type = "default";
    double factor = 0;
    for (auto& [k, x] : (is_full ? full_rope : sliding_rope).items()) {
      if ((k == "rope_type" || k == "type") && x.is_string()) {
        // (rope_type wins over the legacy type, as in transformers)
        if (k == "rope_type" || !(is_full ? full_rope : sliding_rope).contains("rope_type"))
          type = x.get<std::string>();
      } else if ((k == "rope_theta" || (k == "factor" && is_full)) && x.is_number() &&
                 x.get<double>() > 0) {
        (k == "factor" ? factor : is_full ? theta : local) = x.get<double>();
      } else {
        r.unsupported(key,
                      "default RoPE with a positive rope_theta, or linear scaling (a positive "
                      "factor) on the full-attention layers");
      }
    }
    if (type == "linear" && is_full && factor > 0) {
      m.rope_scaling.type = "linear";
      m.rope_scaling.factor = factor;
    } else if (type != "default" || factor > 0) {
      r.unsupported(key, "default RoPE, or linear scaling on the full-attention layers");
    }
  }
  m.rope_theta = theta;
  // (a windowed layer's own table whenever it differs from the full layers': another base, or
  // the full layers scaled)
  m.rope_local_theta = windows && (local != theta || m.rope_scaling.factor > 0) ? local : 0;
}

// hf_config_json's Gemma, Gemma 2 and Gemma 3 (the checks common to the Llama-like families
// done): the config.json fields on top of j's. cannot(key, value, hint) throws.
template <typename Cannot>
json gemma_config_json(const ModelConfig& m, json j, const Cannot& cannot) {
  const bool g3 = m.arch == "gemma3", g2 = m.arch == "gemma2";
  if (g3 && m.n_embd % m.n_head != 0)  // (Gemma3TextConfig.validate_architecture)
    cannot("n_embd", std::to_string(m.n_embd), "Gemma 3 needs a multiple of n_head");
  if (m.mlp != "geglu") cannot("mlp", m.mlp, "Gemma uses geglu");
  if (m.pos != "rope") cannot("pos", m.pos, "Gemma uses rope");
  if (!m.embed_scale) cannot("embed_scale", "false", "Gemma scales its embeddings");
  if (m.norm_offset != 1) cannot("norm_offset", "0", "Gemma's RMSNorms scale by 1 + w");
  if (m.bias || m.qkv_bias) cannot("bias", "true", "Gemma has no biases");
  if (m.qk_norm != g3) cannot("qk_norm", m.qk_norm ? "true" : "false", "Gemma 3 alone, always");
  if (m.post_norms != (g2 || g3))
    cannot("post_norms", m.post_norms ? "true" : "false", "Gemma 2 and 3 alone, always");
  if (m.rope_scaling.factor > 0 && m.rope_scaling.type != "linear")
    cannot("rope_scaling.type", m.rope_scaling.type, "Gemma's configs take linear RoPE scaling");
  // (Gemma 3's windowed layers have their own table, never scaled; Gemma and Gemma 2 scale all)
  if (g3 && m.rope_scaling.factor > 0 && m.sliding_window > 0 && m.rope_local_theta == 0)
    cannot("rope_local_theta", "0",
           "transformers' windowed layers are not scaled: set their base (Gemma 3: 10000)");
  if (m.arch == "gemma" && m.sliding_window)
    cannot("sliding_window", std::to_string(m.sliding_window), "choose arch gemma2 or gemma3");
  if (g2 && m.rope_local_theta > 0)
    cannot("rope_local_theta", fmt::format("{:g}", m.rope_local_theta), "choose arch gemma3");
  // (transformers before layer_types hard-codes Gemma 2's pattern: every other layer windowed)
  if (g2 && (m.sliding_window == 0 || m.full_attention_every != 2))
    cannot("full_attention_every", std::to_string(m.full_attention_every),
           "Gemma 2 windows every other layer: sliding_window > 0 and full_attention_every 2");
  j.update({{"hidden_size", m.n_embd},
            {"intermediate_size", m.ffn()},
            {"num_hidden_layers", m.n_layer},
            {"num_attention_heads", m.n_head},
            {"num_key_value_heads", m.kv_heads()},
            {"head_dim", m.head_size()},
            {"max_position_embeddings", m.max_seq_len},
            {"rms_norm_eps", m.norm_eps},
            {"attention_bias", false},
            {"attention_dropout", 0.0},
            {"rope_theta", m.rope_theta},
            {"rope_scaling", m.rope_scaling.factor > 0
                                 ? json{{"rope_type", "linear"}, {"factor", m.rope_scaling.factor}}
                                 : json(nullptr)}});
  if (m.arch == "gemma") {
    j["hidden_act"] = "gelu_pytorch_tanh";
    return j;
  }
  json types = json::array();
  for (int64_t l = 0; l < m.n_layer; ++l)
    types.push_back(m.window(l) > 0 ? "sliding_attention" : "full_attention");
  auto cap = [](double c) { return c > 0 ? json(c) : json(nullptr); };
  j.update({{"hidden_activation", "gelu_pytorch_tanh"},
            {"query_pre_attn_scalar", m.attn_scale_dim ? m.attn_scale_dim : m.head_size()},
            {"layer_types", types},
            // (no layer windows: Gemma3TextConfig's default; transformers' Gemma 3 builds a
            // window mask whatever the layers are, and fails on null)
            {"sliding_window", m.sliding_window ? m.sliding_window : 4096},
            {"attn_logit_softcapping", cap(m.attn_softcap)},
            {"final_logit_softcapping", cap(m.logit_softcap)},
            {"use_bidirectional_attention", false}});
  if (g3) j["rope_local_base_freq"] = m.rope_local_theta > 0 ? m.rope_local_theta : m.rope_theta;
  return j;
}

}  // namespace

// Gemma 3 4B and up (Gemma3ForConditionalGeneration, model_type gemma3): its text model, from
// text_config with Gemma3TextConfig's defaults where the Hub's configs leave fields out (they give
// only what differs), the top level's token ids and tie_word_embeddings; the vision tower and
// its projector are not imported (a note says so), the text model exports as Gemma3ForCausalLM.
HfConfig read_gemma3_multimodal(const json& j, const std::string& source) {
  static const std::set<std::string> kTop = {
      "text_config",     "vision_config",       "mm_tokens_per_image", "boi_token_index",
      "eoi_token_index", "image_token_index",   "boi_token_id",        "eoi_token_id",
      "image_token_id",  "tie_word_embeddings", "processor_class"};
  for (auto& [k, v] : j.items())
    if (!kTop.count(k) && !kMetadataKeys.count(k))
      fail(
          "{}: \"{}\" is not supported in a Gemma 3 multimodal config (lmforge imports its "
          "text_config's model)",
          source, k);
  if (!j.contains("text_config") || !j.at("text_config").is_object())
    fail("{}: \"text_config\": expected an object (the text model's config)", source);
  json t = j.at("text_config");
  if (t.contains("model_type") && t["model_type"] != "gemma3_text")
    fail("{}: text_config.model_type {} (expected \"gemma3_text\")", source,
         t["model_type"].dump());
  t["model_type"] = "gemma3_text";
  const std::pair<const char*, int64_t> kDefaults[] = {
      {"vocab_size", 262208},    {"hidden_size", 2304},      {"intermediate_size", 9216},
      {"num_hidden_layers", 26}, {"num_attention_heads", 8}, {"max_position_embeddings", 131072}};
  for (const auto& [k, v] : kDefaults)
    if (!t.contains(k)) t[k] = v;
  // (the image-text model ties its head by the top level's flag, and its forward does not
  // soft-cap the logits: Gemma3ForCausalLM's does)
  const json tie = j.contains("tie_word_embeddings") ? j.at("tie_word_embeddings") : json(true);
  t["tie_word_embeddings"] = tie.is_boolean() ? tie.get<bool>() : true;
  const bool capped =
      t.contains("final_logit_softcapping") && !t["final_logit_softcapping"].is_null();
  t["final_logit_softcapping"] = nullptr;
  for (const char* k : {"bos_token_id", "eos_token_id", "pad_token_id"})
    if (j.contains(k)) t[k] = j.at(k);
  HfConfig out = hf_config_from_json(t, source + ": text_config");
  if (j.contains("vision_config"))
    out.notes.push_back(
        "vision_config: the vision tower is not imported; lmforge trains the text model and "
        "exports it as Gemma3ForCausalLM");
  if (capped)
    out.notes.push_back(
        "text_config.final_logit_softcapping ignored, as Gemma3ForConditionalGeneration ignores "
        "it");
  return out;
}

HfConfig hf_config_from_json(const json& j, const std::string& source) {
  HfConfig out;
  if (!j.is_object()) fail("{}: expected a JSON object", source);
  if (j.contains("model_type") && j["model_type"] == "gemma3")
    return read_gemma3_multimodal(j, source);
  ConfigReader r(j, source, out);
  std::string type = r.string("model_type", "");
  if (!find_family(type)) {
    std::string known;
    for (const Family& f : kFamilies)
      known += std::string(known.empty() ? "" : ", ") + f.model_type;
    fail("{}: model_type \"{}\" is not supported; lmforge imports {}", source, type, known);
  }
  ModelConfig& m = out.model;
  m = ModelConfig{};
  m.arch = find_family(type)->arch;
  m.bias = false;
  if (type == "gpt2")
    read_gpt2(r, m);
  else if (type.starts_with("gemma"))
    read_gemma(r, j, type, m);
  else
    read_llama_like(r, j, type, m);
  m.init_std = r.number("initializer_range", 0.02);
  if (r.has("quantization_config"))
    r.unsupported("quantization_config", "lmforge loads unquantized weights");
  auto token = [&](const char* k) -> int64_t {
    if (!r.has(k) || !j.at(k).is_number_integer()) return -1;  // null or a list: no single id
    return j.at(k).get<int64_t>();
  };
  out.bos_token_id = token("bos_token_id");
  out.eos_token_id = token("eos_token_id");
  r.finish(type);
  try {
    m.validate();
  } catch (const Error& e) {
    fail("{}: {}", source, e.what());
  }
  return out;
}

std::vector<int64_t> hf_stop_token_ids(const std::string& dir) {
  for (const char* name : {"generation_config.json", "config.json"}) {
    const fs::path p = fs::path(dir) / name;
    if (!fs::exists(p)) continue;
    json j;
    try {
      j = json::parse(read_file(p.string()));
    } catch (const json::exception& e) {
      fail("{}: not JSON ({})", p.string(), e.what());
    }
    if (!j.is_object() || !j.contains("eos_token_id") || j["eos_token_id"].is_null()) continue;
    const json& e = j["eos_token_id"];
    std::vector<int64_t> ids;
    for (const json& v : e.is_array() ? e : json::array({e}))
      if (v.is_number_integer()) ids.push_back(v.get<int64_t>());
    if (!ids.empty()) return ids;
  }
  return {};
}

std::string hf_tokenizer_dir(const Tokenizer& tok) {
  if (!tok.kind().starts_with("hf-")) return "";
  const fs::path src(tok.source());
  return src.filename() == "tokenizer.json" ? src.parent_path().string() : "";
}

std::vector<int32_t> stop_token_ids(const Tokenizer& tok) {
  std::vector<int32_t> out;
  if (tok.eos_id() >= 0) out.push_back(tok.eos_id());
  if (const std::string dir = hf_tokenizer_dir(tok); !dir.empty())
    for (int64_t id : hf_stop_token_ids(dir))
      if (id >= 0 && id < tok.vocab_size() && id != tok.eos_id())
        out.push_back(static_cast<int32_t>(id));
  return out;
}

HfConfig read_hf_config(const std::string& dir) {
  fs::path p = fs::is_directory(dir) ? fs::path(dir) / "config.json" : fs::path(dir);
  std::ifstream in(p);
  if (!in)
    fail("{}: cannot read it; expected a Hugging Face model directory with config.json",
         p.string());
  json j;
  try {
    j = json::parse(in);
  } catch (const std::exception& e) {
    fail("{}: malformed JSON ({})", p.string(), e.what());
  }
  HfConfig hc = hf_config_from_json(j, p.string());
  hc.model.preset = "hf:" + dir;
  return hc;
}

json hf_config_json(const ModelConfig& m, int64_t bos, int64_t eos, DType dtype) {
  const Family* fam = find_family(m.arch, /*by_arch=*/true);
  LMF_CHECK(fam, "arch {}", m.arch);
  const std::string type = m.arch;
  auto cannot = [&](const char* key, const std::string& value, const char* hint) {
    fail("model.{}={} cannot be expressed as a Hugging Face {} model; {}", key, value, type, hint);
  };
  auto token = [](int64_t id) { return id >= 0 ? json(id) : json(nullptr); };
  const int64_t HS = m.head_size();
  const bool default_hs = m.n_embd % m.n_head == 0 && HS == m.n_embd / m.n_head;
  json j = {{"architectures", {fam->architecture}},
            {"model_type", fam->model_type},
            {"vocab_size", m.vocab_size},
            {"tie_word_embeddings", m.tie_embeddings},
            {"bos_token_id", token(bos)},
            {"eos_token_id", token(eos)},
            {"pad_token_id", nullptr},
            {"initializer_range", m.init_std},
            {"torch_dtype", dtype == DType::kBF16 ? "bfloat16" : "float32"}};
  // Gemma 2's and 3's alone: the scores' scale and soft-capping
  if (type == "gemma3" && m.attn_softcap > 0)
    cannot("attn_softcap", fmt::format("{:g}", m.attn_softcap),
           "transformers' Gemma 3 attention does not apply it (choose arch gemma2)");
  if (type != "gemma2" && type != "gemma3") {
    if (m.attn_scale_dim)
      cannot("attn_scale_dim", std::to_string(m.attn_scale_dim), "choose arch gemma2");
    if (m.attn_softcap > 0)
      cannot("attn_softcap", fmt::format("{:g}", m.attn_softcap), "choose arch gemma2");
    if (m.logit_softcap > 0)
      cannot("logit_softcap", fmt::format("{:g}", m.logit_softcap), "choose arch gemma2");
  }
  if (type == "gpt2") {
    if (m.norm != "layernorm") cannot("norm", m.norm, "GPT-2 uses layernorm");
    if (m.mlp != "gelu") cannot("mlp", m.mlp, "GPT-2 uses gelu");
    if (m.pos != "learned") cannot("pos", m.pos, "GPT-2 uses learned positions");
    if (!m.bias) cannot("bias", "false", "GPT-2 has biases");
    if (m.kv_heads() != m.n_head) cannot("n_kv_head", std::to_string(m.n_kv_head), "no GQA");
    if (!default_hs) cannot("head_dim", std::to_string(m.head_dim), "HS = n_embd / n_head");
    if (m.qk_norm) cannot("qk_norm", "true", "choose arch qwen3");
    if (m.sliding_window) cannot("sliding_window", std::to_string(m.sliding_window), "no window");
    j.update({{"n_positions", m.max_seq_len},
              {"n_ctx", m.max_seq_len},
              {"n_embd", m.n_embd},
              {"n_layer", m.n_layer},
              {"n_head", m.n_head},
              {"n_inner", m.ffn_hidden ? json(m.ffn_hidden) : json(nullptr)},
              {"activation_function", "gelu_new"},
              {"layer_norm_epsilon", m.norm_eps},
              {"attn_pdrop", 0.0},
              {"embd_pdrop", 0.0},
              {"resid_pdrop", 0.0},
              {"scale_attn_weights", true}});
    return j;
  }
  if (m.norm != "rmsnorm") cannot("norm", m.norm, "this family uses rmsnorm");
  if (type.starts_with("gemma")) return gemma_config_json(m, j, cannot);
  if (m.norm_offset != 0) cannot("norm_offset", "1", "choose arch gemma, gemma2 or gemma3");
  if (m.embed_scale) cannot("embed_scale", "true", "choose arch gemma, gemma2 or gemma3");
  if (m.post_norms) cannot("post_norms", "true", "choose arch gemma2 or gemma3");
  if (m.full_attention_every || m.rope_local_theta)
    cannot("full_attention_every", std::to_string(m.full_attention_every),
           "choose arch gemma2 or gemma3 (windows on some layers; rope_local_theta: gemma3)");
  if (m.mlp != "swiglu") cannot("mlp", m.mlp, "this family uses swiglu");
  if (m.pos != "rope") cannot("pos", m.pos, "this family uses rope");
  if (m.qk_norm != (type == "qwen3"))
    cannot("qk_norm", m.qk_norm ? "true" : "false", "only qwen3 has q/k norms, and always");
  if (m.qkv_bias && !m.bias && type != "qwen2")
    cannot("qkv_bias", "true", "choose arch qwen2 (q/k/v biases only)");
  if (type == "qwen2" && (!m.qkv_bias || m.bias))
    cannot("qkv_bias", m.qkv_bias ? "true" : "false", "qwen2 has q/k/v biases and no others");
  if (m.bias && type != "llama")
    cannot("bias", "true", "choose arch llama (attention_bias, mlp_bias)");
  if (type == "phi3" && m.rope_scaling.factor > 0)  // (Phi3Config: default or longrope only)
    cannot("rope_scaling.factor", fmt::format("{:g}", m.rope_scaling.factor),
           "Phi-3's config takes no llama3 or linear RoPE scaling");
  if (m.sliding_window && type != "mistral" && type != "phi3")
    cannot("sliding_window", std::to_string(m.sliding_window), "choose arch mistral");
  j.update({{"hidden_size", m.n_embd},
            {"intermediate_size", m.ffn()},
            {"num_hidden_layers", m.n_layer},
            {"num_attention_heads", m.n_head},
            {"num_key_value_heads", m.kv_heads()},
            {"max_position_embeddings", m.max_seq_len},
            {"rms_norm_eps", m.norm_eps},
            {"hidden_act", "silu"},
            {"attention_dropout", 0.0},
            {"rope_theta", m.rope_theta}});
  // (Qwen2's and Phi-3's attention read head_dim too, though their configs do not list it.)
  if (fam->has_head_dim || !default_hs) j["head_dim"] = HS;
  if (m.rope_scaling.factor > 0 && m.rope_scaling.type == "linear")
    j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", m.rope_scaling.factor}};
  else if (m.rope_scaling.factor > 0)
    j["rope_scaling"] = {
        {"rope_type", "llama3"},
        {"factor", m.rope_scaling.factor},
        {"low_freq_factor", m.rope_scaling.low_freq_factor},
        {"high_freq_factor", m.rope_scaling.high_freq_factor},
        {"original_max_position_embeddings", m.rope_scaling.original_max_position_embeddings}};
  else
    j["rope_scaling"] = nullptr;
  if (type == "llama") {
    j["attention_bias"] = m.bias;
    j["mlp_bias"] = m.bias;
  }
  if (type == "qwen3") j["attention_bias"] = false;
  if (type == "mistral" || type == "phi3")
    j["sliding_window"] = m.sliding_window ? json(m.sliding_window) : json(nullptr);
  if (type == "qwen2" || type == "qwen3") {
    j["use_sliding_window"] = false;
    j["sliding_window"] = nullptr;
  }
  if (type == "phi3") {
    j["original_max_position_embeddings"] = m.max_seq_len;
    j["embd_pdrop"] = 0.0;
    j["resid_pdrop"] = 0.0;
  }
  return j;
}

}  // namespace lmforge
