// Hugging Face interop: config.json <-> ModelConfig and HF tensor names <-> lmforge parameters,
// for the families ModelConfig::arch names (gpt2, llama, mistral, qwen2, qwen3, phi3, gemma,
// gemma3 = Gemma 3's gemma3_text; SmolLM and TinyLlama are llama). docs/formats.md, "Hugging Face
// checkpoints", has the tables. hf.cpp maps config.json; hf_weights.cpp the tensors (import,
// export, PEFT adapters).
//
//   HfConfig hc = read_hf_config("models/SmolLM2-135M");   // throws on anything unsupported
//   Transformer model(hc.model);
//   load_hf_weights(model, "models/SmolLM2-135M");         // any of bf16/f16/f32, sharded or not
//   save_hf_model(model, tokenizer, "out/");                // config.json, weights, tokenizer
//
// Import is strict: a config.json field that would change the network and that lmforge does not
// implement is an Error naming it; fields that only matter to training in PyTorch (dropout) are
// reported as notes. Every tensor must be present, and a tensor lmforge would not use is an error
// too (except buffers that are not weights, such as GPT-2's attn.bias mask).
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "lmforge/core/dtype.h"
#include "lmforge/models/config.h"
#include "lmforge/nn/params.h"

namespace lmforge {

class Transformer;
class Tokenizer;

struct HfConfig {
  ModelConfig model;
  std::vector<std::string> notes;  // fields accepted but not acted on, for the user to see
  int64_t bos_token_id = -1, eos_token_id = -1;
};

// Maps DIR/config.json (or a config.json path) onto a ModelConfig; `preset` is set to "hf:DIR".
HfConfig read_hf_config(const std::string& dir);
// The ids a Hugging Face model's generate stops at: generation_config.json's eos_token_id (an id
// or a list: Llama 3 Instruct's [128001, 128009], Gemma 2's [1, 107]) where it has one, else
// config.json's; empty when neither names any.
std::vector<int64_t> hf_stop_token_ids(const std::string& dir);
// The directory of the Hugging Face tokenizer.json tok was loaded from (a model directory, or a
// checkpoint's copy of one, which keeps its generation_config.json beside it), else "".
std::string hf_tokenizer_dir(const Tokenizer& tok);
// The ids generation stops at with tok: its EOS, and hf_stop_token_ids of hf_tokenizer_dir(tok)
// in its vocabulary (Llama 3 Instruct's <|eot_id|> beside <|end_of_text|>), as transformers'
// generate; so after convert --from-hf or init_from: hf:DIR too.
std::vector<int32_t> stop_token_ids(const Tokenizer& tok);
HfConfig hf_config_from_json(const nlohmann::json& j, const std::string& source);
// The config.json transformers needs for `model` (its arch must be able to express it; throws
// naming the field otherwise). Token ids < 0 are written as null.
nlohmann::json hf_config_json(const ModelConfig& model, int64_t bos_token_id, int64_t eos_token_id,
                              DType dtype);

// One piece of an lmforge parameter in a HF checkpoint: rows [row0, row0 + rows) of the lmforge
// tensor are the HF tensor `name` (transposed for GPT-2's Conv1D layers).
struct HfPiece {
  std::string name;
  int64_t row0 = 0, rows = 0;
  bool transpose = false;
};
std::vector<HfPiece> hf_pieces(const ModelConfig& model, const std::string& param,
                               int64_t param_rows);

// Loads every parameter from DIR (model.safetensors or a sharded index), converting to fp32 (or
// rounding to bf16 for bf16 master values: use_bf16_master(false) before it).
void load_hf_weights(Transformer& model, const std::string& dir);
// The same values one parameter at a time: give(p, values) for every parameter of `layout` (a
// model of DIR's architecture, MeasureOnly will do) but LoRA's adapters, each whole in fp32.
void for_each_hf_weight(const Transformer& layout, const std::string& dir, const GiveValues& give);
// Writes config.json, generation_config.json, the weights (sharded past max_shard_bytes, with
// model.safetensors.index.json) in `dtype` (F32 or BF16) and the tokenizer files into dir.
// LoRA adapters are merged into their layers' weights (W + (alpha / r) B A); with merge_lora
// false they are left out (the base model, for save_peft_adapter).
void save_hf_model(const Transformer& model, const Tokenizer* tokenizer, const std::string& dir,
                   DType dtype, uint64_t max_shard_bytes, bool merge_lora = true);
// A LoRA model's adapters as a PEFT adapter directory: adapter_config.json (peft_type LORA,
// task_type CAUSAL_LM, r, lora_alpha, target_modules, fan_in_fan_out for GPT-2's Conv1D layers,
// base_model_name_or_path = base_model or null) and adapter_model.safetensors with PEFT's keys
// "base_model.model.<HF module>.lora_A.weight" (r, in) and ".lora_B.weight" (out, r). A fused
// lmforge layer that is several HF modules (Llama's qkv: q_proj, k_proj, v_proj; fc: gate_proj,
// up_proj) gives each its own A and its rows of B. For
// peft.PeftModel.from_pretrained on the base model (the init_from source, or save_hf_model with
// merge_lora false).
void save_peft_adapter(const Transformer& model, const std::string& dir,
                       const std::string& base_model, DType dtype);
// Folds a LoRA model's adapters into their layers' weights, W += (alpha / r) B A per module (as
// save_hf_model merges them), and turns the adapters off (Transformer::set_adapters): forwards
// then compute what they computed with them, at the base model's cost (generation). fp32 values
// on the host. Nothing when the adapters are off (merged already); the adapters are left as they
// were, so they must stay off (set_adapters(true) would count them twice).
void merge_lora_adapters(Transformer& model);
// Merges a PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors) into the
// model's weights as PEFT's merge_and_unload does: W += scale B A per targeted module, scale =
// lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), any subset of the linear layers (Llama's
// q_proj alone, say: its rows of the fused qkv). Throws Error naming the file and key for what it
// cannot merge exactly (DoRA, trained biases or extra modules, per-module ranks, embedding
// adapters, a module or shape this base model lacks).
void merge_peft_adapter(Transformer& model, const std::string& dir);
// The LoRA adapters that hold a PEFT adapter directory as it is (load_peft_adapter), on the
// base model of architecture `base`: its r, an alpha giving PEFT's scaling (rsLoRA's too), and
// the lmforge layers any of whose modules it adapts. Error as merge_peft_adapter.
LoraConfig peft_lora_config(const ModelConfig& base, const std::string& dir);
// Writes a PEFT adapter directory into the model's LoRA adapters (a model made with
// peft_lora_config's, its base weights loaded apart): each module's A and B exactly; a module
// of an adapted layer that the adapter leaves out gets A = B = 0, which training keeps at 0 (no
// gradient reaches either), so it stays without an adapter as in PEFT.
void load_peft_adapter(Transformer& model, const std::string& dir);

}  // namespace lmforge
