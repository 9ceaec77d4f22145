// The gate of a gated MLP (GLU variants, Shazeer 2020): inp (N, 2F) = [gate | up], out (N, F) =
// act(gate) * up.
#pragma once

#include <cstdint>

namespace lmforge {

enum class Gate : uint8_t {
  kSilu,  // SwiGLU: silu(gate) * up (Llama, Mistral, Qwen, Phi-3)
  kGelu,  // GeGLU: gelu_tanh(gate) * up (Gemma's gelu_pytorch_tanh)
};

}  // namespace lmforge
