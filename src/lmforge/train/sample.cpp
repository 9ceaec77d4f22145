// The end-of-run sample (sample.*): its options, checked with the config (validate.cpp), and
// the text printed after training.
#include <fmt/core.h>

#include <algorithm>
#include <cstdio>

#include "lmforge/core/error.h"
#include "lmforge/core/tensor.h"
#include "lmforge/core/utf8.h"
#include "lmforge/eval/generate.h"
#include "lmforge/models/hf.h"
#include "lmforge/tokenizer/tokenizer.h"
#include "lmforge/train/trainer.h"

namespace lmforge {

SamplingOptions sampling_options(const Config& cfg, const Tokenizer* tok) {
  SamplingOptions o;
  o.max_tokens = cfg.sample.max_tokens;
  o.temperature = cfg.sample.temperature;
  o.top_k = cfg.sample.top_k;
  o.top_p = cfg.sample.top_p;
  o.seed = cfg.train.seed;
  o.vocab_limit = tok ? tok->vocab_size() : 0;
  if (tok)
    for (int32_t id : stop_token_ids(*tok)) o.add_stop(id);
  return o;
}

void print_run_sample(Transformer& model, const Config& cfg, const Tokenizer& tok) {
  model.to(Device::kCPU);  // (decode runs on the CPU)
  // The sample's decode buffers (the fp32 KV cache of its positions, the logits) asked for first:
  // under an address-space limit (ulimit -v) nearly reached, the decode's first oneDNN GEMMs
  // crashed (SIGSEGV) setting up state of their own instead of failing. The run is done and saved:
  // a sample that does not fit is skipped, said.
  const std::vector<int32_t> prompt_ids = tok.encode(cfg.sample.prompt, false, true);
  const ModelConfig& mc = model.config();
  const int64_t positions = std::min<int64_t>(
      mc.max_seq_len, static_cast<int64_t>(prompt_ids.size()) + cfg.sample.max_tokens);
  const double kv = 2.0 * 4.0 * static_cast<double>(mc.n_layer * positions) *
                    static_cast<double>(mc.kv_heads() * mc.head_size());
  try {
    check_host_memory(kv + 4.0 * static_cast<double>(mc.vocab_size), "the sample's decode buffers",
                      "sample from the checkpoint with lmforge generate where memory allows");
  } catch (const Error& e) {
    fmt::print(stderr, "lmforge: warning: no sample: {}\n", e.what());
    return;
  }
  fmt::print("--- sample ---\n{}", cfg.sample.prompt);
  Utf8Stream text;
  generate(model, prompt_ids, sampling_options(cfg, &tok), [&](int32_t id) {
    fmt::print("{}", text.push(tok.token_bytes(id)));
    std::fflush(stdout);
  });
  fmt::print("{}\n--------------\n", text.finish());
}

}  // namespace lmforge
