#include "lmforge/train/init_from.h"

#include <filesystem>

#include "lmforge/core/error.h"
#include "lmforge/models/hf.h"
#include "lmforge/nn/transformer.h"
#include "lmforge/train/checkpoint.h"

namespace lmforge {

namespace fs = std::filesystem;

InitSource open_init_source(const std::string& spec) {
  InitSource src;
  src.spec = spec;
  if (spec.starts_with("hf:")) {
    src.hf = true;
    src.path = spec.substr(3);
    HfConfig hc = read_hf_config(src.path);
    src.model = hc.model;
    src.notes = hc.notes;
    try {
      src.tokenizer = load_tokenizer(src.path);
    } catch (const Error& e) {
      fail("{}: no usable tokenizer in the model directory ({})", spec, e.what());
    }
    if (src.tokenizer->vocab_size() > src.model.vocab_size)
      fail("{}: the tokenizer has {} ids but config.json says vocab_size {}", spec,
           src.tokenizer->vocab_size(), src.model.vocab_size);
    return src;
  }
  std::error_code ec;
  if (fs::exists(fs::path(spec) / "config.json", ec) && !fs::exists(fs::path(spec) / "state.json"))
    fail("init_from: {} looks like a Hugging Face model directory; write hf:{}", spec, spec);
  src.path = resolve_checkpoint(spec);
  src.model = checkpoint_model_config(src.path);
  src.tokenizer = checkpoint_tokenizer(src.path);
  return src;
}

void InitSource::load_weights(Transformer& m) const {
  if (hf)
    load_hf_weights(m, path);
  else
    load_checkpoint(path, m, nullptr, nullptr);
}

ValueStream InitSource::values(const Transformer& layout, uint64_t adapter_seed) const {
  return [this, &layout, adapter_seed](const GiveValues& give) {
    if (!model.lora.on()) layout.for_each_adapter_init(adapter_seed, give);
    if (hf)
      for_each_hf_weight(layout, path, give);
    else
      for_each_checkpoint_value(path, layout.params(), give);
  };
}

}  // namespace lmforge
