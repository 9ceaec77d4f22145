// Rotary-embedding cos/sin tables, (max_seq_len, HS/2) fp32, computed in double.
// inv_freq_i = theta^(-2i/HS), optionally rescaled as Llama 3.1 does ("llama3" rope_type):
// wavelengths shorter than original_max/high_freq_factor are kept, longer than
// original_max/low_freq_factor are divided by factor, and the band between is interpolated.
#pragma once

#include <vector>

#include "lmforge/core/tensor.h"
#include "lmforge/models/config.h"

namespace lmforge {

// local: the sliding-window layers' (ModelConfig::rope_local_theta, never rescaled).
std::vector<double> rope_inv_freq(const ModelConfig& cfg, bool local = false);
// Fills cos and sin, each (max_seq_len, HS/2) fp32.
void rope_tables(const ModelConfig& cfg, const Tensor& cos, const Tensor& sin, bool local = false);

}  // namespace lmforge
