// Named model presets with the sizes of the public configurations (HF config.json of
// openai-community/gpt2*, meta-llama/Llama-3.2-1B/3B, Meta-Llama-3-8B), plus tiny ones for
// tests and the demo.
//
//   ModelConfig c = model_preset("llama3.2-1b");
#pragma once

#include <string>
#include <vector>

#include "lmforge/models/config.h"

namespace lmforge {

// Throws Error listing the known names when `name` is unknown.
ModelConfig model_preset(const std::string& name);
std::vector<std::string> model_preset_names();

}  // namespace lmforge
