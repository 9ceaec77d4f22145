// lmforge generate --checkpoint PATH --prompt TEXT [--max-tokens N --temperature T --top-k K
//                  --top-p P --seed S] [--chat-template chatml|llama3 [--system TEXT]]
#include "lmforge/eval/generate.h"

#include <fmt/core.h>

#include "commands.h"
#include "lmforge/tokenizer/chat_template.h"
#include "lmforge/train/checkpoint.h"

namespace lmforge::app {

void add_generate(CLI::App& app) {
  struct Opts {
    std::string checkpoint, prompt, chat_template, system;
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
  cmd->add_option("--chat-template", o->chat_template,
                  "chatml | llama3: the prompt is a user turn of a conversation in that template "
                  "(as the model was fine-tuned); prints the assistant's reply, which ends at the "
                  "end-of-turn token");
  cmd->add_option("--system", o->system, "With --chat-template: a system turn first");
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
    const bool chat = !o->chat_template.empty();
    if (!chat && !o->system.empty()) fail("--system: needs --chat-template");
    std::vector<int32_t> prompt;
    if (chat) {
      std::vector<ChatMessage> turns;
      if (!o->system.empty()) turns.push_back({"system", o->system});
      turns.push_back({"user", o->prompt});
      try {
        prompt =
            apply_chat_template(*tok, turns, o->chat_template, /*add_generation_prompt=*/true).ids;
      } catch (const Error& e) {
        fail("--chat-template: {}", e.what());
      }
      o->s.end_of_turn = *tok->special_id(chat_end_of_turn(o->chat_template));
    } else {
      prompt = tok->encode(o->prompt, false, true);
    }
    check_generate(mc, prompt, o->s, /*config_keys=*/false);  // before the prompt is echoed
    if (!chat) fmt::print("{}", o->prompt);
    std::fflush(stdout);
    generate(model, prompt, o->s, [&](int32_t id) {
      if (chat && (id == o->s.stop_token || id == o->s.end_of_turn)) return;  // the reply ends
      fmt::print("{}", tok->token_bytes(id));
      std::fflush(stdout);
    });
    fmt::print("\n");
  });
}

}  // namespace lmforge::app
