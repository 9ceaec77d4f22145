#include "lmforge/models/presets.h"

#include <fmt/ranges.h>

#include <functional>
#include <map>

#include "lmforge/core/error.h"

namespace lmforge {

namespace {

ModelConfig gpt2(int64_t L, int64_t NH, int64_t C) {
  ModelConfig c;  // defaults are GPT-2's
  c.n_layer = L;
  c.n_head = NH;
  c.n_embd = C;
  return c;
}

ModelConfig llama(int64_t L, int64_t NH, int64_t NKV, int64_t C, int64_t F) {
  ModelConfig c;
  c.arch = "llama";
  c.vocab_size = 128256;
  c.n_layer = L;
  c.n_head = NH;
  c.n_kv_head = NKV;
  c.n_embd = C;
  c.ffn_hidden = F;
  c.norm = "rmsnorm";
  c.norm_eps = 1e-5;
  c.mlp = "swiglu";
  c.pos = "rope";
  c.rope_theta = 500000;
  c.bias = false;
  c.tie_embeddings = false;
  return c;
}

// Llama 3.1/3.2 long-context rope scaling as in their config.json.
ModelConfig llama32(int64_t L, int64_t NH, int64_t C) {
  ModelConfig c = llama(L, NH, 8, C, 8192);
  c.max_seq_len = 131072;
  c.tie_embeddings = true;
  c.rope_scaling = {"llama3", 32.0, 1.0, 4.0, 8192};
  return c;
}

const std::map<std::string, std::function<ModelConfig()>>& table() {
  static const std::map<std::string, std::function<ModelConfig()>> t = {
      {"gpt2-tiny",
       [] {
         ModelConfig c = gpt2(4, 4, 128);
         c.max_seq_len = 256;
         return c;
       }},
      {"gpt2", [] { return gpt2(12, 12, 768); }},
      {"gpt2-medium", [] { return gpt2(24, 16, 1024); }},
      {"gpt2-large", [] { return gpt2(36, 20, 1280); }},
      {"gpt2-xl", [] { return gpt2(48, 25, 1600); }},
      {"llama3-tiny",
       [] {
         ModelConfig c = llama(4, 4, 2, 128, 352);
         c.max_seq_len = 256;
         c.rope_theta = 10000;
         return c;
       }},
      {"smollm2-135m",  // a ~100M Llama: HuggingFaceTB/SmolLM2-135M's shape
       [] {
         ModelConfig c = llama(30, 9, 3, 576, 1536);
         c.vocab_size = 49152;
         c.max_seq_len = 8192;
         c.rope_theta = 100000;
         c.tie_embeddings = true;
         return c;
       }},
      {"llama3.2-1b", [] { return llama32(16, 32, 2048); }},
      {"llama3.2-3b", [] { return llama32(28, 24, 3072); }},
      {"gemma3-270m",  // google/gemma-3-270m's shape (Gemma3ForCausalLM)
       [] {
         ModelConfig c = llama(18, 4, 1, 640, 2048);
         c.arch = "gemma3";
         c.vocab_size = 262144;
         c.max_seq_len = 32768;
         c.head_dim = 256;
         c.norm_eps = 1e-6;
         c.mlp = "geglu";
         c.rope_theta = 1e6;
         c.rope_local_theta = 1e4;
         c.sliding_window = 512;
         c.full_attention_every = 6;
         c.embed_scale = c.qk_norm = c.post_norms = c.tie_embeddings = true;
         c.norm_offset = 1;
         return c;
       }},
      {"gemma2-2b",  // google/gemma-2-2b's shape (Gemma2ForCausalLM)
       [] {
         ModelConfig c = llama(26, 8, 4, 2304, 9216);
         c.arch = "gemma2";
         c.vocab_size = 256000;
         c.max_seq_len = 8192;
         c.head_dim = 256;
         c.norm_eps = 1e-6;
         c.mlp = "geglu";
         c.rope_theta = 1e4;
         c.sliding_window = 4096;
         c.full_attention_every = 2;
         c.attn_softcap = 50;
         c.logit_softcap = 30;
         c.embed_scale = c.post_norms = c.tie_embeddings = true;
         c.norm_offset = 1;
         return c;
       }},
      {"llama3-8b",
       [] {
         ModelConfig c = llama(32, 32, 8, 4096, 14336);
         c.max_seq_len = 8192;
         return c;
       }},
  };
  return t;
}

}  // namespace

ModelConfig model_preset(const std::string& name) {
  auto it = table().find(name);
  if (it == table().end())
    fail("model.preset: unknown preset \"{}\"; known: {}", name,
         fmt::join(model_preset_names(), ", "));
  ModelConfig c = it->second();
  c.preset = name;
  return c;
}

std::vector<std::string> model_preset_names() {
  std::vector<std::string> names;
  for (auto& [k, v] : table()) names.push_back(k);
  return names;
}

}  // namespace lmforge
