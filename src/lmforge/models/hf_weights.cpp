// Hugging Face checkpoints' weights (models/hf.h): where each lmforge parameter lies in HF's
// tensors (hf_pieces), loading them (whole or one parameter at a time), the export and PEFT
// adapters. config.json's mapping is in hf.cpp.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "lmforge/backend/cpu/kernels.h"
#include "lmforge/core/error.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/io/safetensors.h"
#include "lmforge/models/hf.h"
#include "lmforge/nn/transformer.h"
#include "lmforge/tokenizer/tokenizer.h"

namespace lmforge {

namespace fs = std::filesystem;
using json = nlohmann::json;

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
  // (Gemma 3's post_attention_layernorm is the attention branch's post norm; its MLP's pre-norm is
  // pre_feedforward_layernorm.)
  const bool post = m.post_norms;
  if (base == "norm1") return whole(l + "input_layernorm." + suffix);
  if (base == "norm2")
    return whole(l + (post ? "pre_feedforward_layernorm." : "post_attention_layernorm.") + suffix);
  if (base == "attn.post_norm") return whole(l + "post_attention_layernorm." + suffix);
  if (base == "mlp.post_norm") return whole(l + "post_feedforward_layernorm." + suffix);
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
  // A Gemma 3 image-text checkpoint: its text model under language_model (the Hub's files:
  // language_model.model.*, transformers 5's modules: model.language_model.*), beside a vision
  // tower and projector that are not imported.
  bool multimodal = false;
  if (m.arch == "gemma3")
    for (const std::string& name : set.names())
      multimodal |=
          name.starts_with("language_model.") || name.starts_with("model.language_model.");
  // Hub GPT-2 checkpoints predate the "transformer." prefix.
  auto resolve = [&](const std::string& name) {
    if (set.has(name)) return name;
    if (name.starts_with("transformer.") && set.has(name.substr(12))) return name.substr(12);
    if (multimodal) {
      const std::string rest = name.starts_with("model.") ? name.substr(6) : name;
      for (const std::string& at : {"language_model.model." + rest, "model.language_model." + rest,
                                    "language_model." + name})
        if (set.has(at)) return at;
    }
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
      set.release(name);  // (copied: its mapped pages need not stay resident)
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
  auto vision = [&](const std::string& name) {
    if (!multimodal) return false;
    for (const char* pre : {"vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                            "model.multi_modal_projector."})
      if (name.starts_with(pre)) return true;
    return false;
  };
  for (const std::string& name : set.names()) {
    if (used.count(name) || is_buffer(name) || vision(name)) continue;
    if ((name == "lm_head.weight" || name == "language_model.lm_head.weight") && m.tie_embeddings) {
      // Some exports store the tied head anyway; it must then equal the embedding.
      const Param& emb = layout.params().params().front();
      const std::vector<HfPiece> pieces = hf_pieces(m, emb.name, emb.shape[0]);
      LMF_CHECK(pieces.size() == 1 && !pieces[0].transpose, "the token embedding in {} pieces",
                pieces.size());
      // (stored alike: their bytes, read in place; else their fp32 values)
      const std::string emb_name = resolve(pieces[0].name);
      const bool alike = set.info(name).dtype == set.info(emb_name).dtype;
      const bool same =
          alike ? equal_bytes(set.get(name), set.get(emb_name))
                : equal_bytes(set.load(name, DType::kF32), set.load(emb_name, DType::kF32));
      set.release(name);
      set.release(emb_name);
      if (!same)
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
    LMF_CHECK(p.value.device() == Device::kCPU, "load_hf_weights: {} is not on the host", p.name);
    if (p.value.dtype() == DType::kBF16)  // bf16 values (rounded as every weight's conversion)
      cpu::to_bf16(p.value.bf16_data(), values, p.shape.numel());
    else
      std::copy(values, values + p.shape.numel(), p.value.data<float>());
  });
}

namespace {
// p's fp32 value on the host, with its LoRA adapters merged in: W + s B A for each module
// (rows of W) with its own A (lora_a's rows [k r, (k + 1) r) for module k) and B (its columns of
// lora_b, which holds B^T).
Tensor merged_value(const ModelConfig& m, const ParamSet& ps, const Param& p, double scale) {
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
  const int64_t r = b->shape[0], C = a->shape[1], OC = b->shape[1];
  std::vector<int64_t> first_row(OC);  // of A, for each row of W: its module's
  const std::vector<HfPiece> pieces = hf_pieces(m, p.name, OC);
  LMF_CHECK(static_cast<int64_t>(pieces.size()) * r == a->shape[0], "{}: {} modules, A {}", a->name,
            pieces.size(), a->shape.str());
  for (size_t k = 0; k < pieces.size(); ++k)
    for (int64_t o = pieces[k].row0; o < pieces[k].row0 + pieces[k].rows; ++o)
      first_row[o] = static_cast<int64_t>(k) * r;
  const float* A = af.data<float>();
  const float* Bt = bf.data<float>();
  float* W = w.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t o = 0; o < OC; ++o)
    for (int64_t c = 0; c < C; ++c) {
      double acc = 0;
      for (int64_t k = 0; k < r; ++k)
        acc += static_cast<double>(Bt[k * OC + o]) * A[(first_row[o] + k) * C + c];
      W[o * C + c] += static_cast<float>(scale * acc);
    }
  return w;
}
}  // namespace

void merge_lora_adapters(Transformer& model) {
  const ModelConfig& m = model.config();
  if (!m.lora.on() || model.adapters_off()) return;  // (merged already: never twice)
  for (Param& p : model.params().params()) {
    if (is_lora_param(p.name) || !p.name.ends_with(".weight") ||
        !model.params().find(p.name.substr(0, p.name.size() - 7) + ".lora_a"))
      continue;  // (a layer without adapters)
    LMF_CHECK(p.value.dtype() == DType::kF32 && p.value.device() == Device::kCPU,
              "merge_lora_adapters: {} is not fp32 on the host", p.name);
    const Tensor w = merged_value(m, model.params(), p, m.lora.scale());
    std::copy(w.data<float>(), w.data<float>() + w.numel(), p.value.data<float>());
  }
  model.params().invalidate_bf16();
  model.set_adapters(false);
}

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
    const Tensor value = m.lora.on() && merge_lora
                             ? merged_value(m, model.params(), p, m.lora.scale())
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
  // The source model's generation_config.json where the tokenizer came with one (its end ids and
  // sampling defaults, as transformers' save_pretrained keeps them), else the tokenizer's ids.
  // Ids past the tokenizer's (a vocabulary lmforge padded to a multiple of 64) stand for no text:
  // lmforge never samples them, and suppress_tokens has transformers' generate skip them too.
  json padding = json::array();
  for (int64_t id = tok ? tok->vocab_size() : m.vocab_size; id < m.vocab_size; ++id)
    padding.push_back(id);
  const std::string from = tok ? hf_tokenizer_dir(*tok) : "";
  const fs::path gen_path = fs::path(dir) / "generation_config.json";
  if (!from.empty() && fs::exists(fs::path(from) / "generation_config.json")) {
    std::string gen = read_file((fs::path(from) / "generation_config.json").string());
    // Its token ids in config.json too, as the source's (Llama 3.1's three end ids, Gemma's pad):
    // the tokenizer alone knows one EOS and no pad.
    json g = json::parse(gen, nullptr, /*allow_exceptions=*/false);
    for (const char* key : {"bos_token_id", "eos_token_id", "pad_token_id"})
      if (g.is_object() && g.contains(key) && !g[key].is_null()) config[key] = g[key];
    if (g.is_object() && !padding.empty()) {  // merged into the file's own list
      json& list = g["suppress_tokens"];
      if (!list.is_array()) list = json::array();
      bool added = false;
      for (const json& id : padding)
        if (std::find(list.begin(), list.end(), id) == list.end()) list.push_back(id), added = true;
      if (added) gen = g.dump(2) + "\n";
    }
    write_file_atomic(gen_path.string(), gen);
  } else {
    json gen = {{"bos_token_id", bos >= 0 ? json(bos) : json(nullptr)},
                {"eos_token_id", eos >= 0 ? json(eos) : json(nullptr)}};
    if (!padding.empty()) gen["suppress_tokens"] = padding;
    write_file_atomic(gen_path.string(), gen.dump(2) + "\n");
  }
  write_file_atomic((fs::path(dir) / "config.json").string(), config.dump(2) + "\n");
  if (tok) export_hf_tokenizer(*tok, dir);
}

namespace {

// A PEFT LoRA adapter directory whose adapter_config.json asks only for what lmforge computes.
struct PeftAdapter {
  std::string weights;  // adapter_model.safetensors
  int64_t r = 0;
  double scale = 0;    // PEFT's LoraLayer scaling: lora_alpha / r, or lora_alpha / sqrt(r) (rsLoRA)
  double dropout = 0;  // lora_dropout
};

PeftAdapter read_peft_adapter(const std::string& dir) {
  const fs::path cfg_path = fs::path(dir) / "adapter_config.json";
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
    refuse("peft_type", "lmforge takes LoRA adapters");
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
      refuse(k, "only LoRA's A and B of the base model's own layers are taken");
  for (const char* k : {"rank_pattern", "alpha_pattern"})
    if (c.contains(k) && !c[k].is_null() && !(c[k].is_object() && c[k].empty()))
      refuse(k, "one rank and alpha for every module");
  PeftAdapter a;
  a.weights = (fs::path(dir) / "adapter_model.safetensors").string();
  a.r = c["r"].get<int64_t>();
  const double alpha = c["lora_alpha"].get<double>();
  a.scale = flag("use_rslora") ? alpha / std::sqrt(static_cast<double>(a.r)) : alpha / a.r;
  if (c.contains("lora_dropout") && !c["lora_dropout"].is_null()) {
    if (!c["lora_dropout"].is_number() || !(c["lora_dropout"].get<double>() >= 0) ||
        !(c["lora_dropout"].get<double>() < 1))
      fail("{}: \"lora_dropout\" must be a number in [0, 1), got {}", where,
           c["lora_dropout"].dump());
    a.dropout = c["lora_dropout"].get<double>();
  }
  if (!fs::exists(a.weights)) fail("{}: no such file; a PEFT adapter needs it", a.weights);
  return a;
}

// One module's adapter in the file, A (r, in) and B (out, r) as stored, and where it lands: the
// rows [row0, row0 + rows) of an lmforge weight, module `piece` of that layer's hf_pieces.
struct PeftModule {
  Tensor a, b;
  Param* weight;
  int64_t piece, row0, rows;
};

// Every module of the adapter's file matched to the model's weights (its LoRA adapters' own
// parameters aside); Error naming the file and tensor for one that does not fit.
std::vector<PeftModule> peft_modules(Transformer& model, const PeftAdapter& ad) {
  const ModelConfig& m = model.config();
  struct Target {
    Param* param;
    int64_t piece, row0, rows;
  };
  std::map<std::string, Target> targets;
  for (Param& p : model.params().params()) {
    if (is_lora_param(p.name) || p.shape.ndim() != 2) continue;
    const std::vector<HfPiece> pieces = hf_pieces(m, p.name, p.shape[0]);
    for (size_t k = 0; k < pieces.size(); ++k)
      if (pieces[k].name.ends_with(".weight"))
        targets[pieces[k].name.substr(0, pieces[k].name.size() - 7)] = {
            &p, static_cast<int64_t>(k), pieces[k].row0, pieces[k].rows};
  }
  Safetensors st = Safetensors::open(ad.weights);
  std::vector<PeftModule> out;
  const std::string prefix = "base_model.model.", a_suffix = ".lora_A.weight",
                    b_suffix = ".lora_B.weight";
  for (const std::string& key : st.names()) {
    if (key.ends_with(b_suffix)) {  // taken with its A
      const std::string a_key = key.substr(0, key.size() - b_suffix.size()) + a_suffix;
      if (!st.has(a_key)) fail("{}: \"{}\" has no \"{}\"", ad.weights, key, a_key);
      continue;
    }
    if (!key.starts_with(prefix) || !key.ends_with(a_suffix))
      fail(
          "{}: tensor \"{}\" is not a LoRA A or B of a linear layer (embedding adapters and "
          "trained extras are not supported)",
          ad.weights, key);
    std::string module = key.substr(prefix.size(), key.size() - prefix.size() - a_suffix.size());
    const std::string b_key = prefix + module + b_suffix;
    if (!st.has(b_key)) fail("{}: \"{}\" has no \"{}\"", ad.weights, key, b_key);
    auto it = targets.find(module);
    if (it == targets.end() && module.starts_with("transformer."))  // Hub GPT-2's naming
      it = targets.find(module.substr(12));
    if (it == targets.end() && targets.count("transformer." + module))
      it = targets.find("transformer." + module);
    if (it == targets.end())
      fail("{}: module \"{}\" is no linear layer of this {} model; is the adapter for this base?",
           ad.weights, module, m.arch);
    const Target& t = it->second;
    Tensor a = st.load(key, DType::kF32), b = st.load(b_key, DType::kF32);
    const int64_t cols = t.param->shape[1], r = ad.r;
    // lmforge keeps every weight as (out, in), so PEFT's fan_in_fan_out (GPT-2's Conv1D, stored
    // (in, out)) needs no transpose: A and B are (r, in) and (out, r) either way.
    if (!(a.shape() == Shape{r, cols}) || !(b.shape() == Shape{t.rows, r}))
      fail("{}: \"{}\" is {} and its B {}, expected {} and {} (r = {}) for this base model",
           ad.weights, key, a.shape().str(), b.shape().str(), Shape{r, cols}.str(),
           Shape{t.rows, r}.str(), r);
    out.push_back({std::move(a), std::move(b), t.param, t.piece, t.row0, t.rows});
  }
  if (out.empty()) fail("{}: holds no LoRA weights", ad.weights);
  return out;
}

}  // namespace

void merge_peft_adapter(Transformer& model, const std::string& dir) {
  const PeftAdapter ad = read_peft_adapter(dir);
  model.params().invalidate_bf16();
  for (const PeftModule& mod : peft_modules(model, ad)) {
    const int64_t cols = mod.weight->shape[1], r = ad.r;
    const float* A = mod.a.data<float>();
    const float* B = mod.b.data<float>();
    float* W = mod.weight->value.data<float>() + mod.row0 * cols;
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < mod.rows; ++o)
      for (int64_t i = 0; i < cols; ++i) {
        double acc = 0;
        for (int64_t k = 0; k < r; ++k) acc += static_cast<double>(B[o * r + k]) * A[k * cols + i];
        W[o * cols + i] += static_cast<float>(ad.scale * acc);
      }
  }
}

LoraConfig peft_lora_config(const ModelConfig& base, const std::string& dir) {
  const PeftAdapter ad = read_peft_adapter(dir);
  ModelConfig m = base;
  m.lora = {};
  Transformer layout(m, Transformer::MeasureOnly{});
  std::map<std::string, std::set<int64_t>> adapted;  // layer -> its modules in the adapter
  for (const PeftModule& mod : peft_modules(layout, ad)) {
    const std::string layer = lora_layer_of(mod.weight->name);
    if (layer.empty())
      fail(
          "{}: the adapter's module on {} is outside the blocks' layers, where lmforge keeps "
          "LoRA adapters; merge it instead (convert without --keep-adapter)",
          ad.weights, mod.weight->name);
    adapted[layer].insert(mod.piece);
  }
  // A layer all of whose modules the adapter has by its name, else those modules by theirs
  // (Llama's q_proj and v_proj without k_proj: unambiguous last components).
  LoraConfig lc;
  lc.rank = ad.r;
  lc.alpha = ad.scale * static_cast<double>(ad.r);  // lmforge's scale is alpha / r
  lc.dropout = ad.dropout;
  lc.targets.clear();
  auto add = [&](const std::string& t) { lc.targets += (lc.targets.empty() ? "" : ",") + t; };
  for (const char* layer : {"qkv", "proj", "fc", "down"}) {  // lmforge's order
    if (!adapted.count(layer)) continue;
    const std::vector<std::string> names = m.lora_module_names(layer);
    if (adapted[layer].size() == names.size()) {
      add(layer);
      continue;
    }
    for (int64_t piece : adapted[layer]) add(names[piece].substr(names[piece].rfind('.') + 1));
  }
  return lc;
}

void load_peft_adapter(Transformer& model, const std::string& dir) {
  const PeftAdapter ad = read_peft_adapter(dir);
  const ModelConfig& m = model.config();
  LMF_CHECK(m.lora.rank == ad.r, "load_peft_adapter: the model's LoRA rank {}, the adapter's {}",
            m.lora.rank, ad.r);
  std::map<std::string, Param*> by_name;
  for (Param& p : model.params().params()) by_name[p.name] = &p;
  // Every adapter parameter starts at 0: a module the adapter leaves out (Llama's k_proj when it
  // targets q_proj and v_proj) keeps A = B = 0, where training leaves it (no gradient reaches
  // either), so it stays absent, as in PEFT.
  for (Param& p : model.params().params())
    if (is_lora_param(p.name)) p.value.zero_();
  for (const PeftModule& mod : peft_modules(model, ad)) {
    const std::string layer = mod.weight->name.substr(0, mod.weight->name.size() - 7);
    auto a = by_name.find(layer + ".lora_a"), b = by_name.find(layer + ".lora_b");
    if (a == by_name.end() || b == by_name.end())
      fail("{}: the adapter has {} but the model has no LoRA adapters on {}", ad.weights,
           mod.weight->name, layer);
    const int64_t r = ad.r, cols = mod.weight->shape[1], OC = b->second->shape[1];
    LMF_CHECK(a->second->value.dtype() == DType::kF32 && a->second->shape[1] == cols,
              "load_peft_adapter: {}", a->second->name);
    // A: rows [piece r, (piece + 1) r) of lora_a; B (rows, r): columns [row0, row0 + rows) of
    // lora_b (B^T).
    std::copy(mod.a.data<float>(), mod.a.data<float>() + r * cols,
              a->second->value.data<float>() + mod.piece * r * cols);
    float* bt = b->second->value.data<float>();
    for (int64_t o = 0; o < mod.rows; ++o)
      for (int64_t k = 0; k < r; ++k) bt[k * OC + mod.row0 + o] = mod.b.data<float>()[o * r + k];
  }
  model.params().invalidate_bf16();
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
    // (P r, in): each module's A; (r, out): B^T, each module's in its columns
    const Tensor af = a.value.to(DType::kF32), bt = b.value.to(DType::kF32);
    const int64_t r = b.shape[0], out = b.shape[1];
    const std::vector<HfPiece> pieces = hf_pieces(m, w.name, w.shape[0]);
    LMF_CHECK(static_cast<int64_t>(pieces.size()) * r == a.shape[0], "{}: {} modules, A {}", a.name,
              pieces.size(), a.shape.str());
    for (size_t j = 0; j < pieces.size(); ++j) {
      const HfPiece& piece = pieces[j];
      conv1d = conv1d || piece.transpose;
      const std::string module = piece.name.substr(0, piece.name.rfind(".weight"));
      Tensor bp = Tensor::empty({piece.rows, r}, DType::kF32);  // B's rows of this module
      for (int64_t i = 0; i < piece.rows; ++i)
        for (int64_t k = 0; k < r; ++k)
          bp.data<float>()[i * r + k] = bt.data<float>()[k * out + piece.row0 + i];
      const Tensor ap = af.slice(static_cast<int64_t>(j) * r, r).clone();
      // A module with A = B = 0 has no adapter (load_peft_adapter: one the imported adapter left
      // out, which training keeps at 0): left out again.
      auto zero = [](const Tensor& t) {
        const float* v = t.data<float>();
        return std::all_of(v, v + t.numel(), [](float x) { return x == 0.0f; });
      };
      if (zero(ap) && zero(bp)) continue;
      const std::string key = "base_model.model." + module;
      tensors.emplace_back(key + ".lora_A.weight", dtype == DType::kF32 ? ap : ap.to(dtype));
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
                 {"lora_dropout", m.lora.dropout},
                 {"bias", "none"},
                 {"target_modules", std::vector<std::string>(targets.begin(), targets.end())},
                 {"fan_in_fan_out", conv1d},
                 {"use_rslora", false},
                 {"init_lora_weights", true},
                 {"inference_mode", true},
                 {"modules_to_save", nullptr},
                 {"base_model_name_or_path", base_model.empty() ? json(nullptr) : json(base_model)},
                 {"revision", nullptr}};
  if (tensors.empty())
    fail("{}: every LoRA adapter of the model is 0 (A = B = 0); there is no adapter to export",
         dir);
  fs::create_directories(dir);
  SafetensorsWriter wr;
  for (const auto& [name, t] : tensors) wr.add(name, t);
  wr.metadata = {{"format", "pt"}};
  wr.write((fs::path(dir) / "adapter_model.safetensors").string());
  write_file_atomic((fs::path(dir) / "adapter_config.json").string(), config.dump(2) + "\n");
}

}  // namespace lmforge
