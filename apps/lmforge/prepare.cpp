// lmforge prepare [CONFIG.yaml] [--input PATH... --output DIR --tokenizer PATH ...]
#include "lmforge/data/prepare.h"

#include "commands.h"

namespace lmforge::app {

void add_prepare(CLI::App& app) {
  struct Opts {
    std::string config, output, tokenizer, name = "data", field, text_mode, format, chat_template;
    std::vector<std::string> inputs;
    double val_fraction = -1;
    int64_t shard_tokens = 0;
    int64_t seed = -1;
    int64_t stop_after = 0;
    int64_t val_docs = -1;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand(
      "prepare", "Tokenize .txt/.jsonl(.gz/.zst) into token shards (docs/formats.md)");
  cmd->add_option("config", o->config, "YAML with output, tokenizer, sources (docs/formats.md)");
  cmd->add_option("--input", o->inputs, "Files, directories or globs (one source, see --name)");
  cmd->add_option("--name", o->name, "Source name for --input")->capture_default_str();
  cmd->add_option("--output", o->output, "Output directory");
  cmd->add_option("--tokenizer", o->tokenizer, "Tokenizer (default: byte)");
  cmd->add_option("--field", o->field, "JSONL field (default: text, or messages for chat)");
  cmd->add_option("--format", o->format,
                  "text | chat (JSONL conversations for SFT: the loss on the assistant's tokens "
                  "only) | preference (JSONL prompt/chosen/rejected pairs for DPO, ORPO, SimPO "
                  "and KTO) | unpaired (JSONL prompt/completion/label for KTO; default: text)");
  cmd->add_option("--chat-template", o->chat_template,
                  "chat, preference, unpaired: chatml | llama3 (the tokenizer needs its special "
                  "tokens; chat's default: chatml; the others': none, plain text)");
  cmd->add_option("--text-mode", o->text_mode, ".txt documents: file | blank_line (default: file)");
  cmd->add_option("--val-fraction", o->val_fraction, "Share of documents for validation")
      ->check(in_range(0, 1));
  cmd->add_option("--val-docs", o->val_docs, "The first N documents are validation (a count)")
      ->check(in_range(0));
  cmd->add_option("--shard-tokens", o->shard_tokens, "Tokens per train shard")->check(in_range(1));
  cmd->add_option("--seed", o->seed, "Seed of the train/validation split")->check(in_range(0));
  cmd->add_option("--stop-after-shards", o->stop_after,
                  "Stop after N train shards, as an interruption would (for testing resume)")
      ->check(in_range(0));
  cmd->callback([o] {
    set_oom_hint(kPrepareOomHint);
    PrepareOptions p = o->config.empty() ? PrepareOptions{} : load_prepare_config(o->config);
    if (!o->inputs.empty()) {
      PrepareSource s;
      s.name = o->name;
      s.inputs = o->inputs;
      p.sources.push_back(s);
    }
    for (PrepareSource& s : p.sources) {
      if (!o->field.empty()) s.doc.field = o->field;
      if (!o->text_mode.empty()) s.doc.text_mode = o->text_mode;
      if (!o->format.empty()) s.doc.format = o->format;
      if (!o->chat_template.empty()) s.doc.chat_template = o->chat_template;
    }
    if (!o->output.empty()) p.output = o->output;
    if (!o->tokenizer.empty()) p.tokenizer = o->tokenizer;
    // A flag's split replaces CONFIG's, a count or a fraction (both flags: refused by prepare).
    if (o->val_fraction >= 0) {
      p.val_fraction = o->val_fraction;
      if (o->val_docs < 0) p.val_docs = 0;
    }
    if (o->val_docs >= 0) {
      p.val_docs = static_cast<uint64_t>(o->val_docs);
      if (o->val_fraction < 0) p.val_fraction = 0;
    }
    if (o->shard_tokens > 0) p.shard_tokens = static_cast<uint64_t>(o->shard_tokens);
    if (o->seed >= 0) p.seed = static_cast<uint64_t>(o->seed);
    p.stop_after_shards = o->stop_after;
    run_prepare(p);
  });
}

}  // namespace lmforge::app
