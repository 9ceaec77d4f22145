// config.json -> ModelConfig for the published models of each family, as their files on the
// Hugging Face Hub read (older transformers' layout: rope_theta and rope_scaling at the top).
// The parameter counts are the ones the Hub reports for each checkpoint; lmforge's count for the
// mapped config must equal them exactly. Unsupported fields are one clear error naming them.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "lmforge/core/error.h"
#include "lmforge/io/config.h"
#include "lmforge/models/hf.h"
#include "lmforge/models/presets.h"
#include "lmforge/models/rope_table.h"
#include "lmforge/nn/transformer.h"
#include "testing/errors.h"
#include "testing/paths.h"
#include "testing/process.h"

namespace lmforge {
namespace {

using nlohmann::json;

struct Published {
  const char* name;
  int64_t params;
  const char* config;
};

const Published kModels[] = {
    {"gpt2", 124'439'808,
     R"({"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
      "attn_pdrop": 0.1, "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256,
      "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024,
      "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024, "resid_pdrop": 0.1,
      "summary_activation": null, "summary_first_dropout": 0.1, "summary_proj_to_labels": true,
      "summary_type": "cls_index", "summary_use_proj": true,
      "task_specific_params": {"text-generation": {"do_sample": true, "max_length": 50}},
      "vocab_size": 50257})"},
    {"Llama-2-7b", 6'738'415'616, R"({"architectures": ["LlamaForCausalLM"], "bos_token_id": 1,
      "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
      "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "llama",
      "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
      "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": null,
      "tie_word_embeddings": false, "torch_dtype": "float16",
      "transformers_version": "4.31.0.dev0", "use_cache": true, "vocab_size": 32000})"},
    {"Llama-3.1-8B", 8'030'261'248, R"({"architectures": ["LlamaForCausalLM"],
      "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 128000,
      "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
      "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
      "mlp_bias": false, "model_type": "llama", "num_attention_heads": 32,
      "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
      "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"},
      "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
      "transformers_version": "4.43.0.dev0", "use_cache": true, "vocab_size": 128256})"},
    {"Llama-3.2-1B", 1'235'814'400, R"({"architectures": ["LlamaForCausalLM"],
      "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 128000,
      "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
      "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072,
      "mlp_bias": false, "model_type": "llama", "num_attention_heads": 32,
      "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
      "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0,
      "low_freq_factor": 1.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"},
      "rope_theta": 500000.0, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
      "transformers_version": "4.45.0.dev0", "use_cache": true, "vocab_size": 128256})"},
    {"Mistral-7B-v0.1", 7'241'732'096, R"({"architectures": ["MistralForCausalLM"],
      "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096,
      "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
      "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32,
      "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
      "sliding_window": 4096, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
      "transformers_version": "4.34.0.dev0", "use_cache": true, "vocab_size": 32000})"},
    {"Qwen2.5-0.5B", 494'032'768, R"({"architectures": ["Qwen2ForCausalLM"],
      "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
      "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
      "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24,
      "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24,
      "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
      "sliding_window": 32768, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
      "transformers_version": "4.40.1", "use_cache": true, "use_sliding_window": false,
      "vocab_size": 151936})"},
    {"Qwen3-0.6B", 596'049'920, R"({"architectures": ["Qwen3ForCausalLM"],
      "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 151643,
      "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
      "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 40960,
      "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 16,
      "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
      "rope_scaling": null, "rope_theta": 1000000, "sliding_window": null,
      "tie_word_embeddings": true, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
      "use_cache": true, "use_sliding_window": false, "vocab_size": 151936})"},
    {"Phi-3-mini-4k", 3'821'079'552, R"({"_name_or_path": "Phi-3-mini-4k-instruct",
      "architectures": ["Phi3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config"}, "bos_token_id": 1,
      "embd_pdrop": 0.0, "eos_token_id": 32000, "hidden_act": "silu", "hidden_size": 3072,
      "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 4096,
      "model_type": "phi3", "num_attention_heads": 32, "num_hidden_layers": 32,
      "num_key_value_heads": 32, "original_max_position_embeddings": 4096, "pad_token_id": 32000,
      "resid_pdrop": 0.0, "rms_norm_eps": 1e-05, "rope_scaling": null, "rope_theta": 10000.0,
      "sliding_window": 2047, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
      "transformers_version": "4.40.2", "use_cache": true, "vocab_size": 32064})"},
    {"SmolLM2-135M", 134'515'008, R"({"architectures": ["LlamaForCausalLM"],
      "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 0,
      "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664,
      "intermediate_size": 1536, "is_llama_config": true, "max_position_embeddings": 8192,
      "mlp_bias": false, "model_type": "llama", "num_attention_heads": 9,
      "num_hidden_layers": 30, "num_key_value_heads": 3, "pretraining_tp": 1,
      "rms_norm_eps": 1e-05, "rope_interleaved": false, "rope_scaling": null,
      "rope_theta": 100000, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
      "transformers_version": "4.42.3", "use_cache": true, "vocab_size": 49152})"},
    {"TinyLlama-1.1B", 1'100'048'384, R"({"architectures": ["LlamaForCausalLM"],
      "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 2048,
      "initializer_range": 0.02, "intermediate_size": 5632, "max_position_embeddings": 2048,
      "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 22,
      "num_key_value_heads": 4, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
      "rope_scaling": null, "tie_word_embeddings": false, "torch_dtype": "float32",
      "transformers_version": "4.31.0.dev0", "use_cache": true, "vocab_size": 32000})"},
    {"Gemma-2B", 2'506'172'416, R"({"architectures": ["GemmaForCausalLM"],
      "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 2, "eos_token_id": 1,
      "head_dim": 256, "hidden_act": "gelu", "hidden_size": 2048, "initializer_range": 0.02,
      "intermediate_size": 16384, "max_position_embeddings": 8192, "model_type": "gemma",
      "num_attention_heads": 8, "num_hidden_layers": 18, "num_key_value_heads": 1,
      "pad_token_id": 0, "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 10000.0,
      "torch_dtype": "bfloat16", "transformers_version": "4.38.0.dev0", "use_cache": true,
      "vocab_size": 256000})"},
    {"Gemma-3-270M", 268'098'176, R"({"_sliding_window_pattern": 6,
      "architectures": ["Gemma3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "attn_logit_softcapping": null, "bos_token_id": 2, "eos_token_id": 1,
      "final_logit_softcapping": null, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
      "hidden_size": 640, "initializer_range": 0.02, "intermediate_size": 2048,
      "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
      "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4,
      "num_hidden_layers": 18, "num_key_value_heads": 1, "pad_token_id": 0,
      "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0,
      "rope_scaling": null, "rope_theta": 1000000.0, "sliding_window": 512,
      "torch_dtype": "bfloat16", "transformers_version": "4.55.0.dev0",
      "use_bidirectional_attention": false, "use_cache": true, "vocab_size": 262144})"},
    {"Gemma-3-1B", 999'885'952, R"({"architectures": ["Gemma3ForCausalLM"],
      "attention_bias": false, "attention_dropout": 0.0, "attn_logit_softcapping": null,
      "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 106],
      "final_logit_softcapping": null, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
      "hidden_size": 1152, "initializer_range": 0.02, "intermediate_size": 6912,
      "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4,
      "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0,
      "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
      "rope_scaling": null, "rope_theta": 1000000, "sliding_window": 512,
      "sliding_window_pattern": 6, "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
      "use_cache": true, "vocab_size": 262144})"},
    // Gemma 2 (transformers' Gemma2Config counts): soft-capping, every other layer windowed; the
    // 27B scales its scores by 144^-1/2 with head_dim 128 and carries a legacy
    // sliding_window_size.
    {"Gemma-2-2B", 2'614'341'888,
     R"({"architectures": ["Gemma2ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
       "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid",
       "eos_token_id": 1, "final_logit_softcapping": 30.0, "head_dim": 256,
       "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304,
       "initializer_range": 0.02, "intermediate_size": 9216, "max_position_embeddings": 8192,
       "model_type": "gemma2", "num_attention_heads": 8, "num_hidden_layers": 26,
       "num_key_value_heads": 4, "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
       "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "float32",
       "transformers_version": "4.42.4", "use_cache": true, "vocab_size": 256000})"},
    // Gemma 3 4B (multimodal): its text model (transformers' Gemma3ForCausalLM count from
    // text_config), the fields text_config leaves out at Gemma3TextConfig's defaults; linear RoPE
    // scaling on the full layers.
    {"Gemma-3-4B-it", 3'880'263'168,
     R"({"architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999,
       "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144,
       "initializer_range": 0.02, "mm_tokens_per_image": 256, "model_type": "gemma3",
       "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
       "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
       "sliding_window": 1024}, "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
       "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
       "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
       "patch_size": 14, "vision_use_head": false}})"},
    {"Gemma-2-27B", 27'227'128'320,
     R"({"architectures": ["Gemma2ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
       "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid",
       "eos_token_id": 1, "final_logit_softcapping": 30.0, "head_dim": 128,
       "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 4608,
       "initializer_range": 0.02, "intermediate_size": 36864, "max_position_embeddings": 8192,
       "model_type": "gemma2", "num_attention_heads": 32, "num_hidden_layers": 46,
       "num_key_value_heads": 16, "pad_token_id": 0, "query_pre_attn_scalar": 144,
       "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
       "sliding_window_size": 4096, "torch_dtype": "float32", "transformers_version": "4.42.0.dev0",
       "use_cache": true, "vocab_size": 256000})"},
};

void PrintTo(const Published& p, std::ostream* os) { *os << p.name; }

class PublishedConfig : public ::testing::TestWithParam<Published> {};

TEST_P(PublishedConfig, MapsWithTheHubParameterCount) {
  const Published& p = GetParam();
  HfConfig hc = hf_config_from_json(json::parse(p.config), p.name);
  EXPECT_EQ(hc.model.num_params(), p.params);
  // Exporting the mapped config and reading it back gives the same model.
  json back = hf_config_json(hc.model, hc.bos_token_id, hc.eos_token_id, DType::kBF16);
  HfConfig again = hf_config_from_json(back, std::string(p.name) + " (exported)");
  EXPECT_EQ(again.model.num_params(), p.params);
  EXPECT_EQ(
      back.dump(),
      hf_config_json(again.model, again.bos_token_id, again.eos_token_id, DType::kBF16).dump());
}

// The ~100M Llama benchmark preset is SmolLM2-135M's shape: same count as the Hub's config.
TEST(Presets, SmolLM2PresetHasTheHubParameterCount) {
  EXPECT_EQ(model_preset("smollm2-135m").num_params(), 134'515'008);
}

INSTANTIATE_TEST_SUITE_P(Hub, PublishedConfig, ::testing::ValuesIn(kModels), [](const auto& info) {
  std::string n = info.param.name;
  for (char& c : n)
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  return n;
});

TEST(HfConfig, FieldsThatChangeTheNetwork) {
  HfConfig gpt2 = hf_config_from_json(json::parse(kModels[0].config), "gpt2");
  EXPECT_EQ(gpt2.notes.size(), 3u) << "attn/embd/resid_pdrop=0.1 are reported";
  EXPECT_TRUE(gpt2.model.tie_embeddings && gpt2.model.bias && gpt2.model.pos == "learned");

  HfConfig l31 = hf_config_from_json(json::parse(kModels[2].config), "llama3.1");
  EXPECT_EQ(l31.model.rope_scaling.factor, 8.0);
  EXPECT_EQ(l31.model.rope_theta, 500000.0);
  EXPECT_EQ(l31.model.kv_heads(), 8);
  EXPECT_EQ(l31.bos_token_id, 128000);

  HfConfig q3 = hf_config_from_json(json::parse(kModels[6].config), "qwen3");
  EXPECT_TRUE(q3.model.qk_norm);
  EXPECT_EQ(q3.model.head_size(), 128);
  EXPECT_EQ(q3.model.n_embd, 1024);
  HfConfig q2 = hf_config_from_json(json::parse(kModels[5].config), "qwen2");
  EXPECT_TRUE(q2.model.qkv_bias && !q2.model.bias);
  EXPECT_EQ(q2.model.sliding_window, 0) << "use_sliding_window is false";
  // transformers windows only layers i >= max_window_layers: here none (24 of 24), so the model is
  // the full-attention one; with max_window_layers 21 the last three: refused.
  json q2w = json::parse(kModels[5].config);
  q2w["use_sliding_window"] = true;
  HfConfig q2_all_full = hf_config_from_json(q2w, "qwen2");
  EXPECT_EQ(q2_all_full.model.sliding_window, 0);
  ASSERT_EQ(q2_all_full.notes.size(), 1u);
  EXPECT_NE(q2_all_full.notes[0].find("no layer windows"), std::string::npos);
  q2w["max_window_layers"] = 21;
  const std::string e = testing::error_of([&] { hf_config_from_json(q2w, "qwen2"); });
  EXPECT_NE(e.find("\"use_sliding_window\": true is not supported (a sliding window on layers 21 "
                   "to 23 only"),
            std::string::npos)
      << e;
  // pretraining_tp slices the matmuls (the same function, other rounding): noted, as transformers
  // 5 ignores it.
  json tp2 = json::parse(kModels[2].config);
  tp2["pretraining_tp"] = 2;
  HfConfig l_tp2 = hf_config_from_json(tp2, "llama");
  ASSERT_EQ(l_tp2.notes.size(), 1u);
  EXPECT_NE(l_tp2.notes[0].find("pretraining_tp 2 ignored"), std::string::npos);
  HfConfig mistral = hf_config_from_json(json::parse(kModels[4].config), "mistral");
  EXPECT_EQ(mistral.model.sliding_window, 4096);
  // Without rms_norm_eps each family takes transformers' default: 1e-5 for Phi-3, 1e-6 for Llama.
  json phi3 = json::parse(kModels[7].config), llama = json::parse(kModels[1].config);
  phi3.erase("rms_norm_eps");
  llama.erase("rms_norm_eps");
  EXPECT_EQ(hf_config_from_json(phi3, "phi3").model.norm_eps, 1e-5);
  EXPECT_EQ(hf_config_from_json(llama, "llama").model.norm_eps, 1e-6);
}

// RoPE and window settings read as transformers' config classes read them (their defaults, and
// its precedence: a non-empty legacy rope_scaling replaces rope_parameters; the top-level
// rope_theta and partial_rotary_factor only fill in), checked against transformers itself.
TEST(HfConfig, RopeAndWindowAsTransformersReadsThem) {
  if (testing::python().empty()) GTEST_SKIP() << "configured without LMFORGE_PYTHON";
  const json base = {
      {"model_type", "llama"},          {"vocab_size", 300},      {"hidden_size", 64},
      {"intermediate_size", 128},       {"num_hidden_layers", 2}, {"num_attention_heads", 4},
      {"max_position_embeddings", 8192}};
  const json params500 = {{"rope_type", "default"}, {"rope_theta", 500.0}};
  const json linear4 = {{"rope_type", "linear"}, {"factor", 4.0}};
  const json llama3 = {{"rope_type", "llama3"},
                       {"factor", 8.0},
                       {"low_freq_factor", 1.0},
                       {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 1024}};
  std::vector<json> configs;
  auto with = [&](json extra) {
    json j = base;
    j.update(extra);
    configs.push_back(j);
  };
  with({{"rope_parameters", params500}, {"rope_theta", 10000.0}});
  with({{"rope_parameters", params500}, {"rope_scaling", linear4}});
  with({{"rope_parameters", params500}, {"rope_scaling", json::object()}});
  with({{"rope_theta", 123.0}});
  with({{"rope_scaling", llama3}, {"rope_theta", 500000.0}});
  json llama3_7 = llama3;
  llama3_7["rope_theta"] = 7.0;
  with({{"rope_parameters", llama3_7}, {"rope_theta", 500000.0}});
  json llama3_no_original = llama3;  // (transformers takes max_position_embeddings)
  llama3_no_original.erase("original_max_position_embeddings");
  with({{"rope_scaling", llama3_no_original}, {"max_position_embeddings", 2048}});
  with({{"model_type", "mistral"}});
  with({{"model_type", "mistral"}, {"sliding_window", nullptr}});
  with({{"model_type", "mistral"}, {"sliding_window", 16}});
  with({{"model_type", "phi3"}, {"partial_rotary_factor", 1.0}, {"rope_theta", 777.0}});
  std::string dir = testing::temp_dir("hf-config-ref");
  std::ofstream(dir + "/in.json") << json(configs).dump();
  const std::string cmd = "'" + testing::python() + "' '" + testing::source_dir() +
                          "/tests/reference/hf_config_ref.py' --configs '" + dir +
                          "/in.json' --out '" + dir + "/out.json'";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  const json ref = json::parse(testing::slurp(dir + "/out.json"));
  ASSERT_EQ(ref.size(), configs.size());
  for (size_t i = 0; i < configs.size(); ++i) {
    SCOPED_TRACE(configs[i].dump());
    const ModelConfig m = hf_config_from_json(configs[i], "config.json").model;
    EXPECT_EQ(m.rope_theta, ref[i]["rope_theta"].get<double>());
    const std::string type = ref[i]["rope_type"];
    EXPECT_EQ(m.rope_scaling.factor > 0 ? m.rope_scaling.type : "default", type);
    if (type != "default") {
      EXPECT_EQ(m.rope_scaling.factor, ref[i]["factor"].get<double>());
    }
    if (type == "llama3") {
      EXPECT_EQ(m.rope_scaling.original_max_position_embeddings,
                ref[i]["original_max_position_embeddings"].get<int64_t>());
    }
    EXPECT_EQ(m.sliding_window,
              ref[i]["sliding_window"].is_null() ? 0 : ref[i]["sliding_window"].get<int64_t>());
  }
}

// Each mutation of a valid config must fail with an error naming `field`.
TEST(HfConfig, UnsupportedFieldsAreNamed) {
  struct Bad {
    int model;  // index into kModels
    const char* key;
    json value;
    const char* field;  // must appear in the error
  };
  const Bad cases[] = {
      {2, "rope_scaling", {{"rope_type", "yarn"}, {"factor", 4.0}}, "yarn"},
      {2, "rope_scaling", {{"rope_type", "dynamic"}, {"factor", 2.0}}, "dynamic"},
      {2, "hidden_act", "gelu", "hidden_act"},
      {2, "attention_bias", true, "attention_bias"},
      {2, "quantization_config", {{"quant_method", "gptq"}}, "quantization_config"},
      {2, "some_new_field", 1, "some_new_field"},
      {2, "model_type", "falcon", "falcon"},
      {0, "activation_function", "relu", "activation_function"},
      {0, "scale_attn_by_inverse_layer_idx", true, "scale_attn_by_inverse_layer_idx"},
      {8, "rope_interleaved", true, "rope_interleaved"},
      {7, "rope_scaling", {{"type", "longrope"}, {"long_factor", {1.0}}}, "long"},
      {7,
       "rope_scaling",
       {{"rope_type", "linear"}, {"factor", 2.0}},
       "rope_scaling"},  // (Phi3Config)
      {2, "num_hidden_layers", "32", "num_hidden_layers"},
      {2, "rope_scaling", {{"rope_type", "llama3"}, {"low_freq_factor", 1.0}}, "factor"},
      {2, "rope_scaling", {{"rope_type", "llama3"}, {"factor", -8.0}}, "factor"},
      {2, "rope_scaling", {{"rope_type", nullptr}}, "rope_type"},
      {2, "rope_theta", "500000", "rope_theta"},
      {2, "rope_theta", -1.0, "rope_theta"},
      // Soft-capping that is not a positive cap, Gemma 3 4B's RoPE scaling, a fractional
      // attention scale, a layer pattern that is not every N-th, bidirectional attention, another
      // gate, RoPE bases per layer type in Gemma 2.
      {11, "attn_logit_softcapping", -50.0, "attn_logit_softcapping"},
      {13, "final_logit_softcapping", "30", "final_logit_softcapping"},
      {11, "rope_scaling", {{"rope_type", "yarn"}, {"factor", 8.0}}, "rope_scaling"},
      {11, "rope_scaling", {{"rope_type", "linear"}}, "rope_scaling"},
      {14, "vision_tower", 1, "vision_tower"},
      {11, "query_pre_attn_scalar", 168.5, "query_pre_attn_scalar"},
      {13, "layer_types", json(std::vector<std::string>(25, "sliding_attention")), "layer_types"},
      {13, "hidden_activation", "silu", "hidden_activation"},
      {13, "rope_local_base_freq", 1e4, "rope_local_base_freq"},
      {11, "layer_types", json(std::vector<std::string>(17, "sliding_attention")), "layer_types"},
      {11, "use_bidirectional_attention", true, "use_bidirectional_attention"},
      {11, "sliding_window", nullptr, "sliding_window"},  // (windowed layers: HF fails)
      {13, "sliding_window", nullptr, "sliding_window"},
      {11, "hidden_activation", "gelu", "hidden_activation"},
      {10, "hidden_act", "silu", "hidden_act"},
      {2, "model_type", "gemma4", "gemma4"},
  };
  for (const Bad& b : cases) {
    json j = json::parse(kModels[b.model].config);
    j[b.key] = b.value;
    try {
      hf_config_from_json(j, "config.json");
      ADD_FAILURE() << b.key << "=" << b.value.dump() << " was accepted";
    } catch (const Error& e) {
      std::string msg = e.what();
      EXPECT_NE(msg.find(b.field), std::string::npos) << b.key << ": " << msg;
      EXPECT_NE(msg.find("config.json"), std::string::npos) << msg;
    }
  }
}

// Gemma 3 1B as transformers reads it: every sixth layer full, a window of 512 on the others with
// RoPE base 10000 against 1e6; the 270M's layer_types say the same. Without layer_types the
// pattern is sliding_window_pattern's (transformers ignores the "_sliding_window_pattern" it
// writes), and without query_pre_attn_scalar the scale is transformers' default 1/sqrt(256).
// The gemma3-270m and gemma2-2b presets are what google/gemma-3-270m's and google/gemma-2-2b's
// config.json map to, field for field.
TEST(Presets, GemmaPresetsAreTheHubConfigs) {
  for (const auto& [index, name] : {std::pair{11, "gemma3-270m"}, {13, "gemma2-2b"}}) {
    ModelConfig hub = hf_config_from_json(json::parse(kModels[index].config), name).model;
    ModelConfig preset = model_preset(name);
    auto a = model_fields(hub), b = model_fields(preset);
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) {
      if (a[i].key == "preset") continue;
      EXPECT_EQ(field_value(a[i]), field_value(b[i])) << name << " " << a[i].key;
    }
  }
}

TEST(HfConfig, Gemma3LayerTypesAndRopeBases) {
  for (int i : {11, 12}) {
    const ModelConfig m = hf_config_from_json(json::parse(kModels[i].config), "g3").model;
    EXPECT_EQ(m.arch, "gemma3");
    EXPECT_EQ(m.mlp, "geglu");
    EXPECT_TRUE(m.embed_scale && m.qk_norm && m.post_norms && m.tie_embeddings);
    EXPECT_EQ(m.sliding_window, 512);
    EXPECT_EQ(m.full_attention_every, 6);
    EXPECT_EQ(m.window(4), 512);
    EXPECT_EQ(m.window(5), 0);
    EXPECT_EQ(m.rope_theta, 1e6);
    EXPECT_EQ(m.rope_local_theta, 1e4);
  }
  json j = json::parse(kModels[11].config);
  j.erase("layer_types");
  j["_sliding_window_pattern"] = 3;  // (not read: transformers' default 6 applies)
  EXPECT_EQ(hf_config_from_json(j, "g3").model.full_attention_every, 6);
  j["sliding_window_pattern"] = 3;
  EXPECT_EQ(hf_config_from_json(j, "g3").model.full_attention_every, 3);
  // rope_parameters per layer type win over the top-level keys (transformers' setdefault).
  j["rope_parameters"] = {{"full_attention", {{"rope_type", "default"}, {"rope_theta", 5e5}}},
                          {"sliding_attention", {{"rope_type", "default"}, {"rope_theta", 2e4}}}};
  const ModelConfig r = hf_config_from_json(j, "g3").model;
  EXPECT_EQ(r.rope_theta, 5e5);
  EXPECT_EQ(r.rope_local_theta, 2e4);
  // Without query_pre_attn_scalar the scores are scaled by transformers' default 256^-1/2 whatever
  // the head size (Gemma 3 27B: 168 with head_dim 128).
  j = json::parse(kModels[11].config);
  j.erase("query_pre_attn_scalar");
  j["head_dim"] = 128;
  j["hidden_size"] = 512;  // (not 4 x 128: head_dim is explicit)
  EXPECT_EQ(hf_config_from_json(j, "g3").model.attn_scale_dim, 256);
  j["query_pre_attn_scalar"] = 168;
  EXPECT_EQ(hf_config_from_json(j, "g3").model.attn_scale_dim, 168);
  j["query_pre_attn_scalar"] = 128;  // = head_dim: the plain scale
  EXPECT_EQ(hf_config_from_json(j, "g3").model.attn_scale_dim, 0);
  // Gemma 3's logits are soft-capped when a config asks for it (null: none); its attention scores
  // never are (Gemma3Attention passes no softcap to its attention): the key is noted, ignored, and
  // a model that caps them cannot be exported as Gemma 3.
  j["attn_logit_softcapping"] = 20.0;
  j["final_logit_softcapping"] = 15.0;
  const HfConfig g3 = hf_config_from_json(j, "g3");
  EXPECT_EQ(g3.model.attn_softcap, 0.0);
  EXPECT_EQ(g3.model.logit_softcap, 15.0);
  ASSERT_EQ(g3.notes.size(), 1u);
  EXPECT_NE(g3.notes[0].find("attn_logit_softcapping=20 ignored"), std::string::npos);
  EXPECT_NO_THROW(hf_config_json(g3.model, -1, -1, DType::kF32));
  ModelConfig capped = g3.model;
  capped.attn_softcap = 20;
  EXPECT_THROW(hf_config_json(capped, -1, -1, DType::kF32), Error);
}

// Gemma 3 4B's multimodal config: its text model with Gemma3TextConfig's defaults, linear RoPE
// scaling on the full layers only (the windowed ones keep their own unscaled table, even at the
// same base), the vision tower noted as not imported.
TEST(HfConfig, Gemma3MultimodalTextModel) {
  const HfConfig hc = hf_config_from_json(json::parse(kModels[14].config), "4b");
  const ModelConfig& m = hc.model;
  EXPECT_EQ(m.arch, "gemma3");
  EXPECT_EQ(m.vocab_size, 262208);
  EXPECT_EQ(m.n_embd, 2560);
  EXPECT_EQ(m.n_head, 8);
  EXPECT_EQ(m.kv_heads(), 4);
  EXPECT_EQ(m.head_size(), 256);
  EXPECT_EQ(m.max_seq_len, 131072);
  EXPECT_TRUE(m.qk_norm && m.post_norms && m.tie_embeddings);
  EXPECT_EQ(m.sliding_window, 1024);
  EXPECT_EQ(m.full_attention_every, 6);
  EXPECT_EQ(m.rope_scaling.type, "linear");
  EXPECT_EQ(m.rope_scaling.factor, 8.0);
  EXPECT_EQ(m.rope_theta, 1e6);
  EXPECT_EQ(m.rope_local_theta, 1e4);
  ASSERT_EQ(hc.notes.size(), 1u);
  EXPECT_NE(hc.notes[0].find("vision"), std::string::npos);
  json j = json::parse(kModels[14].config);
  j["text_config"]["rope_local_base_freq"] = 1e6;  // the same base: still its own, unscaled
  EXPECT_EQ(hf_config_from_json(j, "4b").model.rope_local_theta, 1e6);
  // The scaled and unscaled tables: every frequency of the full layers' divided by 8.
  const std::vector<double> full = rope_inv_freq(m, false), local = rope_inv_freq(m, true);
  ModelConfig plain = m;
  plain.rope_scaling.factor = 0;
  const std::vector<double> unscaled = rope_inv_freq(plain, false);
  for (size_t i = 0; i < full.size(); ++i) EXPECT_DOUBLE_EQ(full[i] * 8, unscaled[i]);
  EXPECT_DOUBLE_EQ(local[1], 1.0 / std::pow(1e4, 2.0 / 256));
  j = json::parse(kModels[14].config);
  j["text_config"]["model_type"] = "gemma2";
  EXPECT_THROW(hf_config_from_json(j, "4b"), Error);
  // The image-text model's forward does not soft-cap its logits (Gemma3ForCausalLM's would): the
  // key is noted and ignored. Its head is tied by the top level's flag.
  j = json::parse(kModels[14].config);
  j["text_config"]["final_logit_softcapping"] = 30.0;
  j["text_config"]["tie_word_embeddings"] = false;
  const HfConfig capped = hf_config_from_json(j, "4b");
  EXPECT_EQ(capped.model.logit_softcap, 0);
  EXPECT_TRUE(capped.model.tie_embeddings);
  EXPECT_EQ(capped.notes.size(), 2u);
  j["model_type"] = nullptr;  // (not a string: an error naming it, not a JSON exception)
  EXPECT_THROW(hf_config_from_json(j, "4b"), Error);
}

// Linear RoPE scaling (rope_type linear: every frequency / factor) in a Llama config reads and
// exports back; Phi-3's config class takes none, so its export refuses it.
TEST(HfConfig, LinearRopeScalingRoundTrips) {
  json j = json::parse(kModels[1].config);  // Llama 2 7B
  j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 2.0}};
  const ModelConfig m = hf_config_from_json(j, "llama2").model;
  EXPECT_EQ(m.rope_scaling.type, "linear");
  EXPECT_EQ(m.rope_scaling.factor, 2.0);
  const json back = hf_config_json(m, -1, -1, DType::kF32);
  EXPECT_EQ(back.at("rope_scaling"), (json{{"rope_type", "linear"}, {"factor", 2.0}}));
  EXPECT_EQ(hf_config_from_json(back, "back").model.rope_scaling.type, "linear");
  ModelConfig phi3 = hf_config_from_json(json::parse(kModels[7].config), "phi3").model;
  phi3.rope_scaling = m.rope_scaling;
  EXPECT_THROW(hf_config_json(phi3, -1, -1, DType::kF32), Error);
  j["rope_scaling"] = {{"rope_type", "linear"}};  // (no factor)
  EXPECT_THROW(hf_config_from_json(j, "llama2"), Error);
}

// Gemma 2 as transformers reads it: post norms without q/k norms, every other layer windowed
// (layer 1, 3, ... full), soft-capped scores and logits (50 and 30 when the keys are absent, none
// when null), one RoPE base; the 27B's scale 144^-1/2.
TEST(HfConfig, Gemma2SoftCappingAndWindows) {
  const ModelConfig m = hf_config_from_json(json::parse(kModels[13].config), "g2").model;
  EXPECT_EQ(m.arch, "gemma2");
  EXPECT_TRUE(m.embed_scale && m.post_norms && !m.qk_norm && m.tie_embeddings);
  EXPECT_EQ(m.norm_offset, 1);
  EXPECT_EQ(m.sliding_window, 4096);
  EXPECT_EQ(m.full_attention_every, 2);
  EXPECT_EQ(m.window(0), 4096);
  EXPECT_EQ(m.window(1), 0);
  EXPECT_EQ(m.rope_theta, 1e4);
  EXPECT_EQ(m.rope_local_theta, 0);
  EXPECT_EQ(m.attn_softcap, 50.0);
  EXPECT_EQ(m.logit_softcap, 30.0);
  EXPECT_EQ(m.attn_scale_dim, 0);
  EXPECT_EQ(hf_config_from_json(json::parse(kModels[15].config), "g27").model.attn_scale_dim, 144);
  json j = json::parse(kModels[13].config);
  j.erase("attn_logit_softcapping");
  j.erase("final_logit_softcapping");
  EXPECT_EQ(hf_config_from_json(j, "g2").model.attn_softcap, 50.0);
  EXPECT_EQ(hf_config_from_json(j, "g2").model.logit_softcap, 30.0);
  j["attn_logit_softcapping"] = nullptr;
  j["final_logit_softcapping"] = nullptr;
  EXPECT_EQ(hf_config_from_json(j, "g2").model.attn_softcap, 0.0);
  EXPECT_EQ(hf_config_from_json(j, "g2").model.logit_softcap, 0.0);
  // transformers 5's layer_types and rope_parameters
  j = json::parse(kModels[13].config);
  json types = json::array();
  for (int i = 0; i < 26; ++i) types.push_back(i % 2 ? "full_attention" : "sliding_attention");
  j["layer_types"] = types;
  j.erase("rope_theta");
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 2e4}};
  const ModelConfig t5 = hf_config_from_json(j, "g2").model;
  EXPECT_EQ(t5.full_attention_every, 2);
  EXPECT_EQ(t5.rope_theta, 2e4);
}

TEST(HfConfig, ExportRefusesWhatTheFamilyCannotExpress) {
  HfConfig l = hf_config_from_json(json::parse(kModels[2].config), "llama");
  ModelConfig m = l.model;
  m.qk_norm = true;
  EXPECT_THROW(hf_config_json(m, -1, -1, DType::kF32), Error);
  m = l.model;
  m.sliding_window = 128;
  EXPECT_THROW(hf_config_json(m, -1, -1, DType::kF32), Error);
  m = l.model;
  m.arch = "gpt2";
  EXPECT_THROW(hf_config_json(m, -1, -1, DType::kF32), Error);
  // Soft-capping and the scores' scale: Gemma 2 and 3 alone (a GPT-2 trained with capped logits
  // must not export as one without them); Gemma 2 windows every other layer.
  const ModelConfig gpt2 = hf_config_from_json(json::parse(kModels[0].config), "gpt2").model,
                    gemma = hf_config_from_json(json::parse(kModels[10].config), "gemma").model,
                    gemma2 = hf_config_from_json(json::parse(kModels[13].config), "g2").model;
  EXPECT_NO_THROW(hf_config_json(gpt2, -1, -1, DType::kF32));
  for (ModelConfig c : {gpt2, l.model, gemma}) {
    ModelConfig x = c;
    x.logit_softcap = 30;
    EXPECT_THROW(hf_config_json(x, -1, -1, DType::kF32), Error) << c.arch;
    x = c;
    x.attn_softcap = 50;
    EXPECT_THROW(hf_config_json(x, -1, -1, DType::kF32), Error) << c.arch;
    x = c;
    x.attn_scale_dim = 96;
    EXPECT_THROW(hf_config_json(x, -1, -1, DType::kF32), Error) << c.arch;
  }
  m = gemma2;
  m.full_attention_every = 3;
  EXPECT_THROW(hf_config_json(m, -1, -1, DType::kF32), Error);
}

// Muon orthogonalizes each projection of the fused attn.qkv and mlp.fc apart: their row blocks are
// the Hugging Face modules a Llama-family checkpoint holds them as (q_proj, k_proj, v_proj;
// gate_proj, up_proj), in every preset with such modules, GQA and head sizes included.
TEST(Presets, MuonRowBlocksAreTheHfModules) {
  for (const char* name : {"llama3-tiny", "smollm2-135m", "gemma3-270m", "gemma2-2b"}) {
    SCOPED_TRACE(name);
    const ModelConfig m = model_preset(name);
    const Transformer layout(m, Transformer::MeasureOnly{});
    int checked = 0;
    for (const Param& p : layout.params().params()) {
      if (!p.name.ends_with("attn.qkv.weight") && !p.name.ends_with("mlp.fc.weight")) continue;
      std::vector<int64_t> modules;
      for (const HfPiece& piece : hf_pieces(m, p.name, p.shape[0])) modules.push_back(piece.rows);
      ASSERT_GT(modules.size(), 1u) << p.name;
      EXPECT_EQ(p.row_blocks, modules) << p.name;
      ++checked;
    }
    EXPECT_EQ(checked, 2 * m.n_layer);
  }
}

}  // namespace
}  // namespace lmforge
