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

void adopt_init_model(Config& cfg, const InitSource& src) {
  ModelConfig want = src.model;
  if (src.hf) want.preset.clear();
  auto set = model_fields(cfg.model), from = model_fields(want);
  for (size_t i = 0; i < set.size(); ++i) {
    if (!cfg.keys_given.count("model." + set[i].key) || set[i].key == "init_std" ||
        set[i].key.starts_with("lora_"))  // adapters go on top of the source's architecture
      continue;
    std::string v = field_value(set[i]);
    // (model.vocab_size 0: the tokenizer's, which with init_from is the source's: its size)
    if (set[i].key == "vocab_size" && v == "0") continue;
    if (v != field_value(from[i]))
      fail(
          "model.{}: {} conflicts with init_from {} ({}); the architecture comes from init_from, "
          "remove model.{} from the config",
          set[i].key, v, src.spec, field_value(from[i]), set[i].key);
  }
  const LoraConfig lora = cfg.model.lora;
  cfg.model = src.model;
  if (src.hf) cfg.model.preset.clear();  // "hf:DIR" is not a preset name a config can load
  // LoRA as configured; keys not given keep the source's (a LoRA checkpoint continues as one).
  if (cfg.keys_given.count("model.lora_rank")) cfg.model.lora.rank = lora.rank;
  if (cfg.keys_given.count("model.lora_alpha")) cfg.model.lora.alpha = lora.alpha;
  if (cfg.keys_given.count("model.lora_targets")) cfg.model.lora.targets = lora.targets;
  if (cfg.keys_given.count("model.lora_dropout")) cfg.model.lora.dropout = lora.dropout;
  const LoraConfig& had = src.model.lora;
  const LoraConfig& now = cfg.model.lora;
  if (had.on() && (now.rank != had.rank || now.alpha != had.alpha || now.targets != had.targets))
    fail(
        "model.lora_*: init_from {} holds LoRA adapters (rank {}, alpha {}, on {}) that the "
        "config would drop or change; remove model.lora_* to continue them, or export it merged "
        "(lmforge export --to-hf DIR) and start from hf:DIR",
        src.spec, had.rank, had.alpha, had.targets);
}

}  // namespace lmforge
