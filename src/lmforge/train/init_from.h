// Where a run's initial weights come from (`init_from`): a Hugging Face model directory
// ("hf:DIR") or an lmforge checkpoint (a checkpoint or run directory, e.g. from `lmforge convert`
// or an earlier run). The source fixes the architecture and the tokenizer.
//
//   InitSource src = open_init_source("hf:models/SmolLM2-135M");
//   Transformer model(src.model);
//   src.load_weights(model);
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "lmforge/io/config.h"
#include "lmforge/models/config.h"
#include "lmforge/nn/params.h"
#include "lmforge/tokenizer/tokenizer.h"

namespace lmforge {

class Transformer;

struct InitSource {
  std::string spec;   // as given
  bool hf = false;    // Hugging Face directory, else an lmforge checkpoint
  std::string path;   // the directory (for a checkpoint: the resolved checkpoint directory)
  ModelConfig model;  // its architecture
  std::unique_ptr<Tokenizer> tokenizer;
  std::vector<std::string> notes;  // config.json fields accepted but not acted on

  void load_weights(Transformer& model) const;
  // The initial values of a run's model laid out as `layout` (the whole model, MeasureOnly will
  // do) from this source, one parameter at a time (ValueStream: for a part of the model made
  // without the whole): LoRA adapters the source lacks as init_adapters(adapter_seed) gives
  // them, the rest from the source. The stream refers to this source and `layout`.
  ValueStream values(const Transformer& layout, uint64_t adapter_seed) const;
};

// Throws Error naming the path when it is neither a HF model directory nor a checkpoint.
InitSource open_init_source(const std::string& spec);

// The run's model becomes the source's architecture (and LoRA as cfg configures it, or as the
// source carries it). A model key cfg.keys_given holds with another value than the source's is a
// conflict (fail); keys equal to the source's are fine, so a run's resolved config.yaml, which
// lists them all, loads again.
void adopt_init_model(Config& cfg, const InitSource& src);

}  // namespace lmforge
