// lmforge generate --checkpoint PATH (--prompt TEXT | --prompts FILE.jsonl) [--num-samples N
//                  --batch B --max-tokens N --temperature T --top-k K --top-p P --seed S
//                  --precision fp32|bf16 --stats --ignore-eos]
//                  [--chat-template chatml|llama3 [--system TEXT]]
// lmforge chat --checkpoint PATH --chat-template chatml|llama3 [--system TEXT] [sampling flags]
#include "lmforge/eval/generate.h"

#include <fmt/core.h>
#include <unistd.h>

#include <algorithm>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>

#include "commands.h"
#include "lmforge/core/utf8.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/models/hf.h"
#include "lmforge/tokenizer/chat_template.h"
#include "lmforge/train/checkpoint.h"

namespace lmforge::app {

namespace {

// The sampling flags generate and chat share.
void add_sampling_options(CLI::App* cmd, SamplingOptions& s) {
  cmd->add_option("--max-tokens", s.max_tokens, "Tokens to generate")->capture_default_str();
  cmd->add_option("--temperature", s.temperature, "0 = greedy")->capture_default_str();
  cmd->add_option("--top-k", s.top_k, "Keep the K most likely tokens; 0 = off")
      ->capture_default_str();
  cmd->add_option("--top-p", s.top_p, "Nucleus sampling mass; 1 = off")->capture_default_str();
  cmd->add_option("--seed", s.seed, "Sampling seed")->check(unsigned_64())->capture_default_str();
}

// --precision: the weights the forwards read.
void add_precision_option(CLI::App* cmd, std::string& precision) {
  cmd->add_option("--precision", precision,
                  "fp32, or bf16: the weights held in bf16 (half the memory, about twice the "
                  "speed), the matmuls' inputs rounded to bf16 as in bf16 training")
      ->check(CLI::IsMember({"fp32", "bf16"}))
      ->capture_default_str();
}

// The template's ids for `turns` ready for the assistant's reply; --chat-template's errors.
std::vector<int32_t> chat_prompt(const Tokenizer& tok, const std::vector<ChatMessage>& turns,
                                 const std::string& format, SamplingOptions& s) {
  try {
    std::vector<int32_t> ids =
        apply_chat_template(tok, turns, format, /*add_generation_prompt=*/true).ids;
    s.add_stop(*tok.special_id(chat_end_of_turn(format)));
    return ids;
  } catch (const Error& e) {
    fail("--chat-template: {}", e.what());
  }
}

}  // namespace

Loaded load_for_sampling(const std::string& checkpoint, const std::string& precision,
                         SamplingOptions& s) {
  Loaded l;
  const bool bf16 = precision == "bf16";
  if (checkpoint.starts_with("hf:")) {  // a Hugging Face model directory, read as convert reads it
    const std::string dir = checkpoint.substr(3);
    const HfConfig hc = read_hf_config(dir);
    l.tok = hf_dir_tokenizer(dir, hc.model);
    for (const std::string& n : hc.notes) fmt::print(stderr, "note: {}\n", n);
    l.model = std::make_unique<Transformer>(hc.model);
    if (bf16) {  // bf16 values, each tensor rounded as it is read
      l.model->enable_bf16();
      l.model->use_bf16_master(/*convert=*/false);
    }
    load_hf_weights(*l.model, dir);
    for (int64_t id : hf_stop_token_ids(dir))  // where transformers' generate stops too
      if (id >= 0 && id < hc.model.vocab_size) s.add_stop(static_cast<int32_t>(id));
  } else {
    const std::string dir = resolve_checkpoint(checkpoint);
    const ModelConfig mc = checkpoint_model_config(dir);
    l = {std::make_unique<Transformer>(mc), checkpoint_tokenizer(dir)};
    const bool lora = mc.lora.on();
    if (bf16 && !lora) {  // bf16 values, the checkpoint's fp32 rounded as they are read
      l.model->enable_bf16();
      l.model->use_bf16_master(/*convert=*/false);
    }
    load_checkpoint(dir, *l.model, nullptr, nullptr);
    if (lora) {  // adapters folded into the weights (in fp32): the base model's speed
      merge_lora_adapters(*l.model);
      if (bf16) {
        l.model->enable_bf16();
        l.model->use_bf16_master();
      }
    }
    if (l.tok->vocab_size() > mc.vocab_size)
      fail("{}: the tokenizer has {} ids but model.vocab_size is {}; the checkpoint is corrupt",
           dir, l.tok->vocab_size(), mc.vocab_size);
  }
  for (int32_t id : stop_token_ids(*l.tok)) s.add_stop(id);  // (a checkpoint's copy of them too)
  s.vocab_limit = l.tok->vocab_size();
  return l;
}

void add_generate(CLI::App& app) {
  struct Opts {
    std::string checkpoint, prompt, prompts, chat_template, system, precision = "fp32";
    bool stats = false, ignore_eos = false, allow_special = false;
    int64_t samples = 1, batch = 8;
    SamplingOptions s;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand("generate", "Sample text from a trained checkpoint");
  cmd->add_option("--checkpoint", o->checkpoint,
                  "Checkpoint directory, a run directory, or hf:DIR (a Hugging Face model "
                  "directory: config.json, *.safetensors, a tokenizer)")
      ->required();
  cmd->add_option("--prompt", o->prompt, "Text to continue");
  cmd->add_option("--prompts", o->prompts,
                  "A JSONL file of prompts, one {\"prompt\": TEXT} per line, instead of --prompt: "
                  "prints one JSON line per prompt (and sample) in the file's order, {\"prompt\", "
                  "\"completion\", \"finish_reason\": \"stop\" | \"length\"} (+ \"sample\")");
  cmd->add_option("--num-samples", o->samples,
                  "Samples of each prompt, with seeds --seed, --seed + 1, ... (each prompt's k-th "
                  "what --seed + k gives it alone); each printed whole, then a line of dashes "
                  "(with --prompts: one JSON line each)")
      ->check(in_range(1))
      ->capture_default_str();
  cmd->add_option("--batch", o->batch,
                  "Sequences decoded at once with --num-samples or --prompts (each step's matmuls "
                  "read the weights once for all of them)")
      ->check(in_range(1))
      ->capture_default_str();
  add_sampling_options(cmd, o->s);
  cmd->add_option("--chat-template", o->chat_template,
                  "chatml | llama3: the prompt is a user turn of a conversation in that template "
                  "(as the model was fine-tuned); prints the assistant's reply, which ends at the "
                  "end-of-turn token");
  cmd->add_option("--system", o->system, "With --chat-template: a system turn first");
  add_precision_option(cmd, o->precision);
  cmd->add_flag("--stats", o->stats,
                "At the end, on stderr: the prompt's and the new tokens' times and tokens/s");
  cmd->add_flag("--ignore-eos", o->ignore_eos,
                "Go on past the end-of-text token, to --max-tokens (benchmarks)");
  cmd->add_flag("--allow-special", o->allow_special,
                "Read special tokens' text in the prompt (<|im_start|>, <|eot_id|>) as those "
                "tokens, as transformers' tokenizer does; by default it is plain text");
  cmd->callback([o, cmd] {
    set_oom_hint(kGenerationOomHint);
    if ((cmd->count("--prompt") > 0) == !o->prompts.empty())
      fail("generate: pass --prompt TEXT or --prompts FILE.jsonl (one of them)");
    const bool chat = !o->chat_template.empty();
    if (!chat && !o->system.empty()) fail("--system: needs --chat-template");
    if (chat && o->allow_special)  // the template's specials are its own; a message is text
      fail("--allow-special: not with --chat-template (a message's text is never a special token)");
    std::vector<std::string> texts =
        o->prompts.empty() ? std::vector<std::string>{o->prompt} : std::vector<std::string>{};
    if (!o->prompts.empty()) {
      for_each_jsonl_string(o->prompts, "prompt",
                            [&](std::string t) { texts.push_back(std::move(t)); });
      if (texts.empty()) fail("--prompts {}: no prompts in the file", o->prompts);
    }
    Loaded l = load_for_sampling(o->checkpoint, o->precision, o->s);
    const SamplingOptions ends = o->s;  // (a chat reply's end, never printed)
    if (o->ignore_eos) o->s.stop_tokens.clear();
    Transformer& model = *l.model;
    const Tokenizer* tok = l.tok.get();
    // Each text's ids, checked before anything is printed.
    check_sampling(o->s, /*config_keys=*/false);
    // Each sample is a sequence held to its end: a count no memory holds is refused up front.
    constexpr int64_t kMaxSequences = 10'000'000;
    if (o->samples > kMaxSequences / static_cast<int64_t>(texts.size()))
      fail(
          "--num-samples {}: more than {} sequences in one call ({} prompt{} x {}); split the "
          "work over calls with other --seed values",
          o->samples, kMaxSequences, texts.size(), texts.size() == 1 ? "" : "s", o->samples);
    std::vector<std::vector<int32_t>> prompts;
    for (size_t i = 0; i < texts.size(); ++i) {
      std::vector<int32_t> ids;
      if (chat) {
        std::vector<ChatMessage> turns;
        if (!o->system.empty()) turns.push_back({"system", o->system});
        turns.push_back({"user", texts[i]});
        ids = chat_prompt(*tok, turns, o->chat_template, o->s);
      } else {
        ids = tok->encode(texts[i], o->allow_special, /*add_bos=*/true);
      }
      if (ids.empty() && !o->prompts.empty())
        fail("--prompts {}: prompt {} is empty (no tokens)", o->prompts, i + 1);
      try {
        check_generate(model.config(), ids, o->s, /*config_keys=*/false);
      } catch (const Error& e) {
        if (o->prompts.empty()) throw;
        fail("--prompts {}: prompt {}: {}", o->prompts, i + 1, e.what());
      }
      prompts.push_back(std::move(ids));
    }
    // A reply of --max-tokens that cannot fit the context stops at its end: said up front.
    const int64_t context = model.config().max_seq_len;
    size_t longest = 0;
    for (const auto& p : prompts) longest = std::max(longest, p.size());
    if (o->s.max_tokens > context - static_cast<int64_t>(longest))  // (no overflow)
      fmt::print(stderr,
                 "lmforge generate: note: at most {} new tokens (the model's context is {}, the "
                 "{}prompt {}), not --max-tokens {}\n",
                 context - static_cast<int64_t>(longest), context,
                 prompts.size() > 1 ? "longest " : "", longest, o->s.max_tokens);
    // What a reply prints: every id but a chat's end of turn (or end of text).
    auto text_of = [&](int32_t id) {
      return chat && (ends.stops_at(id) || o->s.stops_at(id)) ? std::string()
                                                              : tok->token_bytes(id);
    };
    GenerateStats stats;
    if (o->prompts.empty() && o->samples == 1) {  // one sample, streamed
      if (!chat) fmt::print("{}", o->prompt);
      check_stdout(/*flush=*/true);
      Utf8Stream text;  // (a reply ending inside a character prints U+FFFD, not half of it)
      generate(
          model, prompts[0], o->s,
          [&](int32_t id) {
            fmt::print("{}", text.push(text_of(id)));
            check_stdout(/*flush=*/true);
          },
          &stats);
      fmt::print("{}\n", text.finish());
    } else {  // --num-samples of each prompt, decoded --batch at a time, printed in order
      std::vector<std::vector<int32_t>> runs;
      std::vector<uint64_t> seeds;
      for (const std::vector<int32_t>& p : prompts)
        for (int64_t k = 0; k < o->samples; ++k) {
          runs.push_back(p);
          seeds.push_back(o->s.seed + static_cast<uint64_t>(k));
        }
      std::vector<std::optional<std::vector<int32_t>>> done(runs.size());
      size_t printed = 0;
      auto print = [&](size_t r) {
        const size_t i = r / static_cast<size_t>(o->samples);
        const std::vector<int32_t>& ids = *done[r];
        std::string completion;
        for (int32_t id : ids) completion += text_of(id);
        if (o->prompts.empty()) {
          Utf8Stream text;
          fmt::print("{}{}{}\n---------------\n", chat ? "" : texts[i], text.push(completion),
                     text.finish());
        } else {
          const bool stop = !ids.empty() && o->s.stops_at(ids.back());
          if (stop && !chat)
            completion.resize(completion.size() - tok->token_bytes(ids.back()).size());
          nlohmann::ordered_json j = {{"prompt", texts[i]},
                                      {"completion", completion},
                                      {"finish_reason", stop ? "stop" : "length"}};
          if (o->samples > 1) j["sample"] = r % static_cast<size_t>(o->samples);
          fmt::print("{}\n",
                     j.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace));
        }
        check_stdout(/*flush=*/true);
      };
      generate_batch(
          model, runs, o->s, o->batch,
          [&](size_t r, const std::vector<int32_t>& ids) {
            done[r] = ids;
            for (; printed < done.size() && done[printed]; ++printed) print(printed);
          },
          &stats, seeds);
    }
    if (o->stats) fmt::print(stderr, "lmforge generate: {}\n", stats.str());
  });
}

// A conversation on stdin, one user turn per line: each reply is sampled from the whole
// conversation so far in the template (the oldest exchanges dropped when it outgrows the
// context, the system turn kept; the part the KV cache holds from the turn before not run
// again), streamed, and becomes part of it. /reset forgets the conversation; /exit or the end of
// input ends it.
void add_chat(CLI::App& app) {
  struct Opts {
    std::string checkpoint, chat_template, system, precision = "fp32";
    SamplingOptions s;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand(
      "chat", "Talk with a fine-tuned checkpoint: user turns from stdin, replies streamed");
  cmd->add_option("--checkpoint", o->checkpoint,
                  "Checkpoint directory, a run directory, or hf:DIR (a Hugging Face model "
                  "directory)")
      ->required();
  cmd->add_option("--chat-template", o->chat_template,
                  "chatml | llama3: the template the model was fine-tuned with")
      ->required();
  cmd->add_option("--system", o->system, "A system turn first");
  add_sampling_options(cmd, o->s);
  add_precision_option(cmd, o->precision);
  cmd->callback([o] {
    set_oom_hint(kGenerationOomHint);
    Loaded l = load_for_sampling(o->checkpoint, o->precision, o->s);
    Transformer& model = *l.model;
    const Tokenizer& tok = *l.tok;
    check_sampling(o->s, /*config_keys=*/false);
    const int64_t context = model.config().max_seq_len;
    const bool tty = isatty(STDIN_FILENO);
    std::vector<ChatMessage> turns;
    if (!o->system.empty()) turns.push_back({"system", o->system});
    const size_t first = turns.size();  // the first turn that may be dropped
    {  // the template (and the tokenizer's specials for it), and room left by the system turn
      std::vector<ChatMessage> probe = turns;
      probe.push_back({"user", ""});
      const size_t n = chat_prompt(tok, probe, o->chat_template, o->s).size();
      if (!o->system.empty() && static_cast<int64_t>(n) >= context / 2)
        fail(
            "--system: {} tokens with the template, half the model's context of {} or more; "
            "shorten it",
            n, context);
    }
    // The conversation's keys and values kept between turns: each turn runs only what follows
    // the part of the prompt the cache already holds (the new user turn, mostly).
    GenerateSession session;
    if (tty)
      fmt::print("lmforge chat ({} template; /reset forgets, /exit or Ctrl-D ends)\n",
                 o->chat_template);
    for (int64_t n = 0;; ++n) {
      if (tty) {
        fmt::print("> ");
        check_stdout(/*flush=*/true);
      }
      std::string line;
      if (!std::getline(std::cin, line) || line == "/exit") break;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;  // (no turn)
      if (line == "/reset") {
        turns.resize(first);
        session.reset();
        if (tty) fmt::print("(conversation reset)\n");
        continue;
      }
      // A turn that cannot fit even alone (after the system turn) is refused, the conversation
      // kept.
      std::vector<ChatMessage> alone(turns.begin(),
                                     turns.begin() + static_cast<std::ptrdiff_t>(first));
      alone.push_back({"user", line});
      const size_t alone_tokens = chat_prompt(tok, alone, o->chat_template, o->s).size();
      if (static_cast<int64_t>(alone_tokens) >= context) {
        fmt::print(stderr,
                   "lmforge: this turn has {} tokens with the template, beyond the "
                   "model's context of {}; say it in fewer words\n",
                   alone_tokens, context);
        continue;
      }
      turns.push_back({"user", line});
      std::vector<int32_t> prompt = chat_prompt(tok, turns, o->chat_template, o->s);
      // Room for a reply of max_tokens (at most a quarter of the context): drop the oldest
      // exchanges while there is an earlier one.
      const int64_t room = std::min<int64_t>(o->s.max_tokens, context / 4);
      bool dropped = false;
      while (static_cast<int64_t>(prompt.size()) + room > context && turns.size() > first + 1) {
        turns.erase(
            turns.begin() + static_cast<std::ptrdiff_t>(first),
            turns.begin() + static_cast<std::ptrdiff_t>(std::min(turns.size() - 1, first + 2)));
        prompt = chat_prompt(tok, turns, o->chat_template, o->s);
        dropped = true;
      }
      if (dropped)  // (stdout is the replies alone when piped)
        fmt::print(tty ? stdout : stderr,
                   "(the oldest turns no longer fit the context: dropped)\n");
      check_generate(model.config(), prompt, o->s, /*config_keys=*/false);
      SamplingOptions s = o->s;
      s.seed = o->s.seed + static_cast<uint64_t>(n);  // each reply its own draw
      std::vector<int32_t> reply;
      Utf8Stream text;
      generate(
          model, prompt, s,
          [&](int32_t id) {
            if (s.stops_at(id)) return;  // the reply ends
            reply.push_back(id);
            fmt::print("{}", text.push(tok.token_bytes(id)));
            check_stdout(/*flush=*/true);
          },
          nullptr, &session);
      fmt::print("{}\n", text.finish());
      check_stdout(/*flush=*/true);
      turns.push_back({"assistant", tok.decode(reply)});
    }
  });
}

}  // namespace lmforge::app
