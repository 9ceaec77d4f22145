// lmforge generate --checkpoint PATH --prompt TEXT [--max-tokens N --temperature T --top-k K
//                  --top-p P --seed S]
#include "lmforge/eval/generate.h"

#include <fmt/core.h>

#include "commands.h"
#include "lmforge/train/checkpoint.h"

namespace lmforge::app {

void add_generate(CLI::App& app) {
  struct Opts {
    std::string checkpoint, prompt;
    SamplingOptions s;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand("generate", "Sample text from a trained checkpoint");
  cmd->add_option("--checkpoint", o->checkpoint, "Checkpoint directory, or a run directory")
      ->required();
  cmd->add_option("--prompt", o->prompt, "Text to continue")->required();
  cmd->add_option("--max-tokens", o->s.max_tokens, "Tokens to generate")->capture_default_str();
  cmd->add_option("--temperature", o->s.temperature, "0 = greedy")->capture_default_str();
  cmd->add_option("--top-k", o->s.top_k, "Keep the K most likely tokens; 0 = off")
      ->capture_default_str();
  cmd->add_option("--top-p", o->s.top_p, "Nucleus sampling mass; 1 = off")->capture_default_str();
  cmd->add_option("--seed", o->s.seed, "Sampling seed")->capture_default_str();
  cmd->callback([o] {
    std::string dir = resolve_checkpoint(o->checkpoint);
    ModelConfig mc = checkpoint_model_config(dir);
    Transformer model(mc);
    load_checkpoint(dir, model, nullptr, nullptr);
    auto tok = checkpoint_tokenizer(dir);
    if (tok->vocab_size() > mc.vocab_size)
      fail("{}: the tokenizer has {} ids but model.vocab_size is {}; the checkpoint is corrupt",
           dir, tok->vocab_size(), mc.vocab_size);
    o->s.stop_token = tok->eos_id();
    o->s.vocab_limit = tok->vocab_size();
    const std::vector<int32_t> prompt = tok->encode(o->prompt, false, true);
    check_generate(mc, prompt, o->s, /*config_keys=*/false);  // before the prompt is echoed
    fmt::print("{}", o->prompt);
    std::fflush(stdout);
    generate(model, prompt, o->s, [&](int32_t id) {
      fmt::print("{}", tok->token_bytes(id));
      std::fflush(stdout);
    });
    fmt::print("\n");
  });
}

}  // namespace lmforge::app
