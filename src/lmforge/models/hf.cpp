#include "lmforge/models/hf.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "lmforge/core/error.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/io/safetensors.h"
#include "lmforge/nn/transformer.h"
#include "lmforge/tokenizer/tokenizer.h"

namespace lmforge {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

struct Family {
  const char* model_type;    // config.json "model_type" and ModelConfig::arch
  const char* architecture;  // config.json "architectures"
  bool has_head_dim;         // the config class reads "head_dim"
};

const Family kFamilies[] = {
    {"gpt2", "GPT2LMHeadModel", false},      {"llama", "LlamaForCausalLM", true},
    {"mistral", "MistralForCausalLM", true}, {"qwen2", "Qwen2ForCausalLM", false},
    {"qwen3", "Qwen3ForCausalLM", true},     {"phi3", "Phi3ForCausalLM", false},
};

const Family* find_family(const std::string& model_type) {
  for (const Family& f : kFamilies)
    if (model_type == f.model_type) return &f;
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
    "transformers.js_config", "is_llama_config", "auto_map",
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
// rope_parameters.
void read_rope(ConfigReader& r, const json& j, ModelConfig& m) {
  json params = json::object();
  if (r.has("rope_parameters")) {
    params = r.at("rope_parameters");
    if (!params.is_object()) r.bad("rope_parameters", "an object");
  }
  if (r.has("rope_scaling")) {
    if (!j.at("rope_scaling").is_object()) r.bad("rope_scaling", "an object or null");
    for (auto& [k, v] : j.at("rope_scaling").items()) params[k] = v;
  }
  if (r.has("rope_theta")) params["rope_theta"] = j.at("rope_theta");
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
    if (!(type == "llama3" && llama3_key))
      fail("{}: \"{}\" ({}) is not supported with rope_type {}", where, k, v.dump(), type);
  }
  if (type == "llama3") {
    if (!params.contains("factor"))
      fail("{}: rope_type llama3 needs \"factor\" (e.g. 32.0 for Llama 3.2)", where);
    m.rope_scaling.factor = positive("factor", 0);
    m.rope_scaling.low_freq_factor = positive("low_freq_factor", 1.0);
    m.rope_scaling.high_freq_factor = positive("high_freq_factor", 4.0);
    m.rope_scaling.original_max_position_embeddings =
        static_cast<int64_t>(positive("original_max_position_embeddings", 8192));
  } else if (type != "default") {
    fail("{}: rope_type \"{}\" is not supported (lmforge supports default and llama3)", where,
         type);
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
  r.require("pretraining_tp", 1, "tensor-parallel slicing of the matmuls changes the numerics");
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
    if (r.has("sliding_window")) m.sliding_window = r.integer("sliding_window");
  } else if (type == "qwen2" || type == "qwen3") {
    r.has("max_window_layers");  // only used with use_sliding_window
    if (r.boolean("use_sliding_window", false))
      r.unsupported("use_sliding_window", "sliding window on some layers only");
    if (r.has("sliding_window") && r.has("use_sliding_window"))
      r.note("sliding_window ignored: use_sliding_window is false");
    if (r.has("layer_types"))
      for (auto& t : r.at("layer_types"))
        if (t != "full_attention") r.unsupported("layer_types", "per-layer attention types");
  }
  if (type == "phi3") {
    // Only read by the longrope scaling, which read_rope() rejects.
    if (r.has("original_max_position_embeddings")) r.integer("original_max_position_embeddings");
  }
}

}  // namespace

HfConfig hf_config_from_json(const json& j, const std::string& source) {
  HfConfig out;
  if (!j.is_object()) fail("{}: expected a JSON object", source);
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
  m.arch = type;
  m.bias = false;
  if (type == "gpt2")
    read_gpt2(r, m);
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
  const Family* fam = find_family(m.arch);
  LMF_CHECK(fam, "arch {}", m.arch);
  const std::string type = m.arch;
  auto cannot = [&](const char* key, const std::string& value, const char* hint) {
    fail("model.{}={} cannot be expressed as a Hugging Face {} model; {}", key, value, type, hint);
  };
  auto token = [](int64_t id) { return id >= 0 ? json(id) : json(nullptr); };
  const int64_t HS = m.head_size();
  const bool default_hs = m.n_embd % m.n_head == 0 && HS == m.n_embd / m.n_head;
  json j = {{"architectures", {fam->architecture}},
            {"model_type", type},
            {"vocab_size", m.vocab_size},
            {"tie_word_embeddings", m.tie_embeddings},
            {"bos_token_id", token(bos)},
            {"eos_token_id", token(eos)},
            {"pad_token_id", nullptr},
            {"initializer_range", m.init_std},
            {"torch_dtype", dtype == DType::kBF16 ? "bfloat16" : "float32"}};
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
  if (m.sliding_window && type != "mistral" && type != "phi3")
    cannot("sliding_window", std::to_string(m.sliding_window), "choose arch mistral");
  if (!fam->has_head_dim && !default_hs)
    cannot("head_dim", std::to_string(m.head_dim), "HS must be n_embd / n_head");
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
  if (fam->has_head_dim) j["head_dim"] = HS;
  if (m.rope_scaling.factor > 0)
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

std::vector<HfPiece> hf_pieces(const ModelConfig& m, const std::string& param, int64_t param_rows) {
  const bool gpt2 = m.arch == "gpt2";
  const std::string pre = gpt2 ? "transformer." : "model.";
  auto whole = [&](const std::string& name, bool transpose = false) {
    return std::vector<HfPiece>{{name, 0, param_rows, transpose}};
  };
  if (param == "tok_emb.weight") return whole(pre + (gpt2 ? "wte.weight" : "embed_tokens.weight"));
  if (param == "pos_emb.weight") return whole(pre + "wpe.weight");
  if (param == "lm_head.weight") return whole("lm_head.weight");
  if (param.starts_with("norm_f."))
    return whole(pre + (gpt2 ? "ln_f." : "norm.") + param.substr(7));
  LMF_CHECK(param.starts_with("blocks."), "unexpected parameter {}", param);
  size_t dot = param.find('.', 7);
  const std::string layer = param.substr(7, dot - 7), rest = param.substr(dot + 1);
  const std::string suffix = rest.substr(rest.rfind('.') + 1);  // weight | bias
  const std::string base = rest.substr(0, rest.rfind('.'));
  const bool is_weight = suffix == "weight";
  if (gpt2) {
    const std::string h = pre + "h." + layer + ".";
    static const std::pair<const char*, const char*> names[] = {
        {"norm1", "ln_1"},           {"norm2", "ln_2"},
        {"attn.qkv", "attn.c_attn"}, {"attn.proj", "attn.c_proj"},
        {"mlp.fc", "mlp.c_fc"},      {"mlp.proj", "mlp.c_proj"}};
    for (auto& [ours, theirs] : names)
      if (base == ours) {
        bool conv1d = base != "norm1" && base != "norm2";  // HF GPT-2 stores (in, out)
        return whole(h + theirs + "." + suffix, conv1d && is_weight);
      }
    LMF_CHECK(false, "unexpected GPT-2 parameter {}", param);
  }
  const std::string l = pre + "layers." + layer + ".";
  const int64_t HS = m.head_size(), F = m.ffn();
  const int64_t q = m.n_head * HS, kv = m.kv_heads() * HS;
  if (base == "norm1") return whole(l + "input_layernorm." + suffix);
  if (base == "norm2") return whole(l + "post_attention_layernorm." + suffix);
  if (base == "attn.q_norm") return whole(l + "self_attn.q_norm." + suffix);
  if (base == "attn.k_norm") return whole(l + "self_attn.k_norm." + suffix);
  if (base == "attn.proj") return whole(l + "self_attn.o_proj." + suffix);
  if (base == "mlp.proj") return whole(l + "mlp.down_proj." + suffix);
  if (base == "attn.qkv") {
    if (m.arch == "phi3") return whole(l + "self_attn.qkv_proj." + suffix);
    return {{l + "self_attn.q_proj." + suffix, 0, q, false},
            {l + "self_attn.k_proj." + suffix, q, kv, false},
            {l + "self_attn.v_proj." + suffix, q + kv, kv, false}};
  }
  if (base == "mlp.fc") {
    if (m.arch == "phi3") return whole(l + "mlp.gate_up_proj." + suffix);
    return {{l + "mlp.gate_proj." + suffix, 0, F, false},
            {l + "mlp.up_proj." + suffix, F, F, false}};
  }
  LMF_CHECK(false, "unexpected parameter {}", param);
  return {};
}

namespace {

// Buffers some HF checkpoints carry that are not weights.
bool is_buffer(const std::string& name) {
  return name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") ||
         name.ends_with("rotary_emb.inv_freq");
}

bool equal_bytes(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

}  // namespace

void for_each_hf_weight(const Transformer& layout, const std::string& dir, const GiveValues& give) {
  SafetensorsSet set = SafetensorsSet::open(dir);
  const ModelConfig& m = layout.config();
  std::set<std::string> used;
  // Hub GPT-2 checkpoints predate the "transformer." prefix.
  auto resolve = [&](const std::string& name) {
    if (set.has(name)) return name;
    if (name.starts_with("transformer.") && set.has(name.substr(12))) return name.substr(12);
    fail("{}: tensor \"{}\" is missing; the checkpoint does not match its config.json", set.path(),
         name);
  };
  for (const Param& p : layout.params().params()) {
    if (is_lora_param(p.name)) continue;  // LoRA adapters on top keep their initial values
    const int64_t rows = p.shape[0];
    const int64_t cols = p.shape.numel() / rows;
    Tensor value = Tensor::empty(p.shape, DType::kF32);
    for (const HfPiece& piece : hf_pieces(m, p.name, rows)) {
      std::string name = resolve(piece.name);
      used.insert(name);
      Tensor t = set.load(name, DType::kF32);
      Shape want = piece.transpose       ? Shape{cols, piece.rows}
                   : p.shape.ndim() == 1 ? Shape{piece.rows}
                                         : Shape{piece.rows, cols};
      if (!(t.shape() == want))
        fail("{}: tensor \"{}\" has shape {}, expected {} from config.json", set.path(), name,
             t.shape().str(), want.str());
      Tensor dst = value.slice(piece.row0, piece.rows);
      if (!piece.transpose) {
        dst.copy_from(t);
        continue;
      }
      const float* s = t.data<float>();
      float* d = dst.data<float>();
      for (int64_t r = 0; r < piece.rows; ++r)
        for (int64_t c = 0; c < cols; ++c) d[r * cols + c] = s[c * piece.rows + r];
    }
    give(p, value.data<float>());
  }
  for (const std::string& name : set.names()) {
    if (used.count(name) || is_buffer(name)) continue;
    if (name == "lm_head.weight" && m.tie_embeddings) {
      // Some exports store the tied head anyway; it must then equal the embedding.
      const Param& emb = layout.params().params().front();
      const std::vector<HfPiece> pieces = hf_pieces(m, emb.name, emb.shape[0]);
      LMF_CHECK(pieces.size() == 1 && !pieces[0].transpose, "the token embedding in {} pieces",
                pieces.size());
      if (!equal_bytes(set.load(name, DType::kF32), set.load(resolve(pieces[0].name), DType::kF32)))
        fail(
            "{}: lm_head.weight differs from the token embedding but config.json says "
            "tie_word_embeddings=true",
            set.path());
      continue;
    }
    fail(
        "{}: tensor \"{}\" has no place in lmforge's {} model; the checkpoint holds a variant "
        "lmforge does not support",
        set.path(), name, m.arch);
  }
}

void load_hf_weights(Transformer& model, const std::string& dir) {
  model.params().invalidate_bf16();  // the weights change below; bf16 copies follow on use
  for_each_hf_weight(model, dir, [](const Param& p, const float* values) {
    LMF_CHECK(p.value.dtype() == DType::kF32 && p.value.device() == Device::kCPU,
              "load_hf_weights: {} is not fp32 on the host", p.name);
    std::copy(values, values + p.shape.numel(), p.value.data<float>());
  });
}

namespace {
// p's fp32 value on the host, with a LoRA adapter merged in: W + s B A (lora_b holds B^T).
Tensor merged_value(const ParamSet& ps, const Param& p, double scale) {
  Tensor w = p.value.dtype() == DType::kF32 ? p.value.clone() : p.value.to(DType::kF32);
  if (!p.name.ends_with(".weight")) return w;
  const std::string layer = p.name.substr(0, p.name.size() - 7);
  const Param *a = nullptr, *b = nullptr;
  for (const Param& q : ps.params()) {
    if (q.name == layer + ".lora_a") a = &q;
    if (q.name == layer + ".lora_b") b = &q;
  }
  if (!a || !b) return w;
  const Tensor af = a->value.to(DType::kF32), bf = b->value.to(DType::kF32);
  const int64_t r = a->shape[0], C = a->shape[1], OC = b->shape[1];
  const float* A = af.data<float>();
  const float* Bt = bf.data<float>();
  float* W = w.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t o = 0; o < OC; ++o)
    for (int64_t c = 0; c < C; ++c) {
      double acc = 0;
      for (int64_t k = 0; k < r; ++k) acc += static_cast<double>(Bt[k * OC + o]) * A[k * C + c];
      W[o * C + c] += static_cast<float>(scale * acc);
    }
  return w;
}
}  // namespace

void save_hf_model(const Transformer& model, const Tokenizer* tok, const std::string& dir,
                   DType dtype, uint64_t max_shard_bytes, bool merge_lora) {
  LMF_CHECK(dtype == DType::kF32 || dtype == DType::kBF16, "export dtype {}", dtype_name(dtype));
  const ModelConfig& m = model.config();
  int64_t bos = tok ? tok->bos_id() : -1, eos = tok ? tok->eos_id() : -1;
  json config = hf_config_json(m, bos, eos, dtype);  // throws before anything is written
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const Param& p : model.params().params()) {
    if (is_lora_param(p.name)) continue;  // merged into their layers' weights, or left out
    const int64_t rows = p.value.size(0), cols = p.value.numel() / rows;
    // fp32 (bf16 master weights widened), LoRA merged.
    const Tensor value = m.lora.on() && merge_lora ? merged_value(model.params(), p, m.lora.scale())
                         : p.value.dtype() == DType::kF32 ? p.value
                                                          : p.value.to(DType::kF32);
    for (const HfPiece& piece : hf_pieces(m, p.name, rows)) {
      Tensor src = value.slice(piece.row0, piece.rows), t;
      if (piece.transpose) {
        t = Tensor::empty({cols, piece.rows}, DType::kF32);
        const float* s = src.data<float>();
        float* d = t.data<float>();
        for (int64_t r = 0; r < piece.rows; ++r)
          for (int64_t c = 0; c < cols; ++c) d[c * piece.rows + r] = s[r * cols + c];
      } else {
        t = src.clone();
      }
      tensors.emplace_back(piece.name, dtype == DType::kF32 ? t : t.to(dtype));
    }
  }
  fs::create_directories(dir);
  write_safetensors_set(dir, tensors, {{"format", "pt"}}, max_shard_bytes);
  write_file_atomic((fs::path(dir) / "config.json").string(), config.dump(2) + "\n");
  json gen = {{"bos_token_id", bos >= 0 ? json(bos) : json(nullptr)},
              {"eos_token_id", eos >= 0 ? json(eos) : json(nullptr)}};
  write_file_atomic((fs::path(dir) / "generation_config.json").string(), gen.dump(2) + "\n");
  if (tok) export_hf_tokenizer(*tok, dir);
}

void merge_peft_adapter(Transformer& model, const std::string& dir) {
  const fs::path cfg_path = fs::path(dir) / "adapter_config.json";
  const std::string weights = (fs::path(dir) / "adapter_model.safetensors").string();
  std::ifstream in(cfg_path);
  if (!in)
    fail(
        "{}: cannot read it; expected a PEFT adapter directory (adapter_config.json, "
        "adapter_model.safetensors)",
        cfg_path.string());
  json c;
  try {
    c = json::parse(in);
  } catch (const std::exception& e) {
    fail("{}: malformed JSON ({})", cfg_path.string(), e.what());
  }
  const std::string where = cfg_path.string();
  auto refuse = [&](const std::string& key, const std::string& why) {
    fail("{}: \"{}\": {} is not supported ({})", where, key, c[key].dump(), why);
  };
  if (!c.is_object()) fail("{}: expected a JSON object", where);
  // A boolean field: absent or null is false; anything but a boolean is an error naming it.
  auto flag = [&](const char* k) {
    if (!c.contains(k) || c[k].is_null()) return false;
    if (!c[k].is_boolean()) fail("{}: \"{}\" must be true or false, got {}", where, k, c[k].dump());
    return c[k].get<bool>();
  };
  if (!c.contains("peft_type") || c["peft_type"] != "LORA")
    refuse("peft_type", "lmforge merges LoRA adapters");
  if (!c.contains("r") || !c["r"].is_number_integer() || c["r"].get<int64_t>() < 1)
    fail("{}: \"r\" must be a positive integer", where);
  if (!c.contains("lora_alpha") || !c["lora_alpha"].is_number())
    fail("{}: \"lora_alpha\" must be a number", where);
  if (flag("use_dora")) refuse("use_dora", "DoRA's magnitude vectors");
  if (c.contains("bias") && !c["bias"].is_null() && c["bias"] != "none")
    refuse("bias", "trained biases");
  // PiSSA, OLoRA, CorDA and LoftQ adapters apply to a residual of the base model, not to the base
  // (unless PEFT converted them to plain LoRA on save, which records init_lora_weights true).
  if (c.contains("init_lora_weights") && c["init_lora_weights"].is_string()) {
    const std::string init = c["init_lora_weights"].get<std::string>();
    if (init.starts_with("pissa") || init == "olora" || init == "corda" || init == "loftq")
      refuse("init_lora_weights",
             "the adapter applies to a modified base; save it converted "
             "to plain LoRA (PEFT's path_initial_model_for_weight_conversion)");
  }
  for (const char* k :
       {"modules_to_save", "layers_to_transform", "layers_pattern", "layer_replication"})
    if (c.contains(k) && !c[k].is_null() && !(c[k].is_array() && c[k].empty()))
      refuse(k, "only LoRA's A and B of the base model's own layers are merged");
  for (const char* k : {"rank_pattern", "alpha_pattern"})
    if (c.contains(k) && !c[k].is_null() && !(c[k].is_object() && c[k].empty()))
      refuse(k, "one rank and alpha for every module");
  const int64_t r = c["r"].get<int64_t>();
  const double alpha = c["lora_alpha"].get<double>();
  // PEFT's LoraLayer scaling: alpha / r, or alpha / sqrt(r) with rsLoRA.
  const double scale = flag("use_rslora") ? alpha / std::sqrt(static_cast<double>(r)) : alpha / r;

  // HF module -> the rows of the lmforge parameter that hold its weight.
  const ModelConfig& m = model.config();
  struct Target {
    Param* param;
    int64_t row0, rows;
  };
  std::map<std::string, Target> targets;
  for (Param& p : model.params().params()) {
    if (is_lora_param(p.name) || p.value.ndim() != 2) continue;
    for (const HfPiece& piece : hf_pieces(m, p.name, p.value.size(0)))
      if (piece.name.ends_with(".weight"))
        targets[piece.name.substr(0, piece.name.size() - 7)] = {&p, piece.row0, piece.rows};
  }
  if (!fs::exists(weights)) fail("{}: no such file; a PEFT adapter needs it", weights);
  Safetensors st = Safetensors::open(weights);
  model.params().invalidate_bf16();
  int merged = 0;
  const std::string prefix = "base_model.model.", a_suffix = ".lora_A.weight",
                    b_suffix = ".lora_B.weight";
  for (const std::string& key : st.names()) {
    if (key.ends_with(b_suffix)) {  // merged with its A
      const std::string a_key = key.substr(0, key.size() - b_suffix.size()) + a_suffix;
      if (!st.has(a_key)) fail("{}: \"{}\" has no \"{}\"", weights, key, a_key);
      continue;
    }
    if (!key.starts_with(prefix) || !key.ends_with(a_suffix))
      fail(
          "{}: tensor \"{}\" is not a LoRA A or B of a linear layer (embedding adapters and "
          "trained extras are not supported)",
          weights, key);
    std::string module = key.substr(prefix.size(), key.size() - prefix.size() - a_suffix.size());
    const std::string b_key = prefix + module + b_suffix;
    if (!st.has(b_key)) fail("{}: \"{}\" has no \"{}\"", weights, key, b_key);
    auto it = targets.find(module);
    if (it == targets.end() && module.starts_with("transformer."))  // Hub GPT-2's naming
      it = targets.find(module.substr(12));
    if (it == targets.end() && targets.count("transformer." + module))
      it = targets.find("transformer." + module);
    if (it == targets.end())
      fail("{}: module \"{}\" is no linear layer of this {} model; is the adapter for this base?",
           weights, module, m.arch);
    const Target& t = it->second;
    const Tensor a = st.load(key, DType::kF32), b = st.load(b_key, DType::kF32);
    const int64_t cols = t.param->value.size(1);
    if (!(a.shape() == Shape{r, cols}) || !(b.shape() == Shape{t.rows, r}))
      fail("{}: \"{}\" is {} and its B {}, expected {} and {} (r = {}) for this base model",
           weights, key, a.shape().str(), b.shape().str(), Shape{r, cols}.str(),
           Shape{t.rows, r}.str(), r);
    // W (out, in) += scale B A: lmforge keeps every weight as (out, in), so PEFT's fan_in_fan_out
    // (GPT-2's Conv1D, stored (in, out)) needs no transpose here.
    const float* A = a.data<float>();
    const float* B = b.data<float>();
    float* W = t.param->value.data<float>() + t.row0 * cols;
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < t.rows; ++o)
      for (int64_t i = 0; i < cols; ++i) {
        double acc = 0;
        for (int64_t k = 0; k < r; ++k) acc += static_cast<double>(B[o * r + k]) * A[k * cols + i];
        W[o * cols + i] += static_cast<float>(scale * acc);
      }
    ++merged;
  }
  if (merged == 0) fail("{}: holds no LoRA weights", weights);
}

void save_peft_adapter(const Transformer& model, const std::string& dir,
                       const std::string& base_model, DType dtype) {
  const ModelConfig& m = model.config();
  LMF_CHECK(m.lora.on(), "save_peft_adapter without LoRA adapters");
  const ParamSet& ps = model.params();
  auto find = [&ps](const std::string& name) -> const Param& {
    for (const Param& p : ps.params())
      if (p.name == name) return p;
    LMF_CHECK(false, "no parameter {}", name);
    return ps.params().front();
  };
  std::vector<std::pair<std::string, Tensor>> tensors;
  std::set<std::string> targets;
  bool conv1d = false;
  for (const Param& a : ps.params()) {
    if (!a.name.ends_with(".lora_a")) continue;
    const std::string layer = a.name.substr(0, a.name.size() - 7);
    const Param& b = find(layer + ".lora_b");
    const Param& w = find(layer + ".weight");
    const Tensor af = a.value.to(DType::kF32), bt = b.value.to(DType::kF32);  // (r, in), (r, out)
    const int64_t r = a.shape[0], out = b.shape[1];
    for (const HfPiece& piece : hf_pieces(m, w.name, w.shape[0])) {
      conv1d = conv1d || piece.transpose;
      const std::string module = piece.name.substr(0, piece.name.rfind(".weight"));
      Tensor bp = Tensor::empty({piece.rows, r}, DType::kF32);  // B's rows of this module
      for (int64_t i = 0; i < piece.rows; ++i)
        for (int64_t k = 0; k < r; ++k)
          bp.data<float>()[i * r + k] = bt.data<float>()[k * out + piece.row0 + i];
      const std::string key = "base_model.model." + module;
      tensors.emplace_back(key + ".lora_A.weight",
                           dtype == DType::kF32 ? af.clone() : af.to(dtype));
      tensors.emplace_back(key + ".lora_B.weight", dtype == DType::kF32 ? bp : bp.to(dtype));
      // PEFT matches target_modules as suffixes of the module names: the last two components
      // tell GPT-2's attn.c_proj from its mlp.c_proj.
      const size_t last = module.rfind('.'), before = module.rfind('.', last - 1);
      targets.insert(module.substr(before + 1));
    }
  }
  json config = {{"peft_type", "LORA"},
                 {"task_type", "CAUSAL_LM"},
                 {"r", m.lora.rank},
                 {"lora_alpha", m.lora.alpha},
                 {"lora_dropout", 0.0},
                 {"bias", "none"},
                 {"target_modules", std::vector<std::string>(targets.begin(), targets.end())},
                 {"fan_in_fan_out", conv1d},
                 {"use_rslora", false},
                 {"init_lora_weights", true},
                 {"inference_mode", true},
                 {"modules_to_save", nullptr},
                 {"base_model_name_or_path", base_model.empty() ? json(nullptr) : json(base_model)},
                 {"revision", nullptr}};
  fs::create_directories(dir);
  SafetensorsWriter wr;
  for (const auto& [name, t] : tensors) wr.add(name, t);
  wr.metadata = {{"format", "pt"}};
  wr.write((fs::path(dir) / "adapter_model.safetensors").string());
  write_file_atomic((fs::path(dir) / "adapter_config.json").string(), config.dump(2) + "\n");
}

}  // namespace lmforge
